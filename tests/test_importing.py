"""The API as an importer meets it (issue 21): inference by default, stopping, chat templates,
text streaming, quantization twice, saved sessions and caches, packaging a model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import minillm
from minillm.errors import MiniLLMError
from util import random_model, tiny_config

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "weights" / "llama-tiny"


# ------------------------------------------------------------------------------------------------
# Inference by default: no autograd graph from a loaded model


@pytest.mark.parametrize("fast", [True, False])
def test_loaded_model_records_no_graph(fast):
    """The README's loop, without torch.no_grad(): no parameter asks for a gradient, so no step
    keeps a graph (which grew the process by ~390 MB per 1,000 decode steps)."""
    model = minillm.load(TINY, fast=fast)
    assert not any(p.requires_grad for p in model.parameters())
    assert torch.is_grad_enabled()
    ids = torch.tensor([[1, 5, 9, 13]])
    assert model(ids).grad_fn is None
    cache = model.new_cache(1, sinks=2, window=6)
    logits = model(ids, cache=cache)
    for _ in range(3):
        logits = model(logits[:, -1:].argmax(-1), cache=cache)
        assert logits.grad_fn is None and not logits.requires_grad
    assert not cache.k.requires_grad and not cache.v.requires_grad


def test_random_models_are_for_inference_and_training_turns_gradients_on():
    model = random_model(tiny_config("llama_gqa"))
    assert not any(p.requires_grad for p in model.parameters())
    assert model(torch.tensor([[1, 2, 3]])).grad_fn is None
    model.requires_grad_(True)  # a trainer's explicit choice
    loss = model(torch.tensor([[1, 2, 3]])).sum()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
