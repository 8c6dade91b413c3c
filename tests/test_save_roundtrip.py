"""`minillm.save_pretrained` writes checkpoints that transformers and minillm both read back.

For every variant in tests/util.VARIANTS, a float32 random model is saved; transformers'
`AutoModelForCausalLM.from_pretrained` must load it with no missing, unexpected or mismatched
tensor and give the same logits (rel err <= 1e-4), and `minillm.load` must give identical logits
(bit for bit: saving is a permutation of rows, never arithmetic). The `minillm` extension block in
config.json (sink_token_id) is ignored by transformers, which still loads the model.
"""

from __future__ import annotations

import json

import pytest
import torch

import minillm
from util import VARIANTS, random_model, rel_err, tiny_config

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()
transformers.logging.set_verbosity_error()

IDS = torch.randint(0, 61, (2, 19), generator=torch.Generator().manual_seed(0))


def config_for(variant: str, **overrides):
    if variant == "mpt":  # transformers' MPT port hard-codes a 4 x d_model MLP
        overrides.setdefault("intermediate_size", 4 * 4 * 8)
    return tiny_config(variant, heads=4, head_dim=8, layers=2, **overrides)


def hf_load(directory):
    # Falcon ALiBi: transformers' eager path adds the bias twice; its SDPA path is Falcon's math
    # (see test_parity.py). The other families use their default.
    family = json.loads((directory / "config.json").read_text())["model_type"]
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        directory, output_loading_info=True, attn_implementation="sdpa" if family == "falcon" else None)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.float().eval()


def check_round_trip(model, directory) -> float:
    minillm.save_pretrained(model, directory)
    with torch.no_grad():
        want = model(IDS)
        again = minillm.load(directory)(IDS)
        theirs = hf_load(directory)(IDS).logits
    assert torch.equal(again, want)
    return rel_err(theirs, want)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_save_then_load_in_transformers_and_minillm(variant, tmp_path):
    model = random_model(config_for(variant), dtype=torch.float32, seed=1)
    assert check_round_trip(model, tmp_path) <= 1e-4


@pytest.mark.parametrize("variant", ["llama_gqa", "falcon_7b", "falcon_40b", "gpt_neox_parallel"])
def test_tied_embeddings_round_trip(variant, tmp_path):
    model = random_model(config_for(variant, tie_word_embeddings=True), dtype=torch.float32, seed=2)
    assert check_round_trip(model, tmp_path) <= 1e-4


def test_falcon_40b_one_norm_round_trip(tmp_path):
    # New decoder layout with num_ln_in_parallel_attn = 1: grouped QKV, one shared norm.
    model = random_model(config_for("falcon_40b", shared_norm=True), dtype=torch.float32, seed=3)
    assert check_round_trip(model, tmp_path) <= 1e-4
    assert json.loads((tmp_path / "config.json").read_text())["num_ln_in_parallel_attn"] == 1


def test_sink_token_extension_still_loads_in_transformers(tmp_path):
    model = random_model(config_for("llama_gqa", sink_token_id=5), dtype=torch.float32, seed=4)
    assert check_round_trip(model, tmp_path) <= 1e-4
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["minillm"] == {"sink_token_id": 5}
    assert minillm.load(tmp_path).config.sink_token_id == 5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_save_in_reduced_precision(dtype, tmp_path):
    model = random_model(config_for("gpt_neox_parallel"), dtype=torch.float32, seed=5)
    minillm.save_pretrained(model, tmp_path, dtype=dtype)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == str(dtype).removeprefix("torch.")
    loaded = minillm.load(tmp_path, dtype=dtype)
    for (name, got), want in zip(loaded.state_dict().items(), model.to(dtype).state_dict().values()):
        assert torch.equal(got, want), name
