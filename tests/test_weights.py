"""The shipped checkpoints in weights/: intact, documented, loadable.

- The SHA-256 and size of every file in every weights/<model>/ folder match the table in
  weights/README.md, and that table lists exactly the files that are there.
- The per-model training table in weights/README.md matches each train_log.json (steps, tokens,
  exported step, losses, wall time) and the files (parameters, bytes).
- Every model loads with minillm.load + load_tokenizer and gives finite logits, dense and
  streaming; the sink-token and zero-sink extensions are in the configs that need them.
- The issue's size limits hold: each model.safetensors at most 25 MB, all together at most 80 MB.
"""

import hashlib
import json
import math
import re
from pathlib import Path

import pytest
import torch

import minillm

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
README = (WEIGHTS / "README.md").read_text(encoding="utf-8")
MODELS = sorted(p.name for p in WEIGHTS.iterdir() if p.is_dir())

FILE_ROW = re.compile(r"^\| ([\w.-]+) \| ([\w.-]+) \| (\d+) \| ([0-9a-f]{64}) \|$", re.MULTILINE)
FILES = {(m, f): (int(size), sha) for m, f, size, sha in FILE_ROW.findall(README)}


def model_rows() -> dict[str, list[str]]:
    rows = {}
    for line in README.splitlines():
        m = re.match(r"^\| `([\w-]+)` \|(.*)\|$", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in m.group(2).split("|")]
    return rows


def num(cell: str) -> float:
    return float(cell.replace(",", ""))


def test_the_six_models_are_shipped():
    assert MODELS == sorted(["llama-tiny", "mpt-tiny", "falcon-tiny", "pythia-tiny", "pythia-tiny-sink",
                             "pythia-tiny-zerosink"])


def test_readme_lists_exactly_the_shipped_files():
    present = {(m, f.name) for m in MODELS for f in (WEIGHTS / m).iterdir()}
    assert set(FILES) == present


@pytest.mark.parametrize("model", MODELS)
def test_sha256_and_size_match_readme(model):
    for f in sorted((WEIGHTS / model).iterdir()):
        size, sha = FILES[(model, f.name)]
        data = f.read_bytes()
        assert len(data) == size, f"{model}/{f.name}: size changed"
        assert hashlib.sha256(data).hexdigest() == sha, f"{model}/{f.name}: SHA-256 differs from weights/README.md"


def test_size_limits():
    sizes = [(WEIGHTS / m / "model.safetensors").stat().st_size for m in MODELS]
    assert max(sizes) <= 25e6 and sum(sizes) <= 80e6


@pytest.mark.parametrize("model", MODELS)
def test_training_table_matches_train_log(model):
    log = json.loads((WEIGHTS / model / "train_log.json").read_text(encoding="utf-8"))
    cells = model_rows()[model]
    (_arch, _tok, attempt, shape, steps, tokens, best_step, best_tokens, best_train, best_held,
     final_train, final_held, wall, params, size) = cells
    batch = int(re.search(r"--batch (\d+)", log["command"]).group(1))
    context = int(re.search(r"--context (\d+)", log["command"]).group(1))
    assert shape == f"{batch} x {context}" and int(attempt) == (2 if batch == 8 else 1)
    assert num(steps) == log["steps"] and num(tokens) == log["tokens_seen"] == log["steps"] * batch * context
    exported = int(re.search(r"step (\d+)", log["exported"]).group(1))
    best = next(h for h in log["history"] if h["step"] == exported)
    assert num(best_step) == exported
    assert num(best_tokens) == best["tokens_seen"] == exported * batch * context
    assert math.isclose(num(best_train), best["train_loss"], abs_tol=6e-5)
    assert math.isclose(num(best_held), best["heldout_loss"], abs_tol=6e-5)
    assert math.isclose(num(final_train), log["final_train_loss"], abs_tol=6e-5)
    assert math.isclose(num(final_held), log["final_heldout_loss"], abs_tol=6e-5)
    assert num(wall) == log["wall_seconds_this_run"]
    assert num(params) == log["parameters"]
    assert num(size) == (WEIGHTS / model / "model.safetensors").stat().st_size
    assert f"```\n{log['command']}\n```" in README  # the exact command is quoted


@pytest.mark.parametrize("model", MODELS)
def test_loads_and_gives_finite_logits(model):
    m = minillm.load(WEIGHTS / model)
    tok = minillm.load_tokenizer(WEIGHTS / model)
    assert sum(p.numel() for p in m.parameters()) == json.loads(
        (WEIGHTS / model / "train_log.json").read_text(encoding="utf-8"))["parameters"]
    ids = torch.tensor([tok.encode("It was a dark and stormy night; the rain fell in torrents.")])
    assert ids.shape[1] > 5 and int(ids.max()) < m.config.vocab_size
    with torch.no_grad():
        dense = m(ids)
        cache = m.new_cache(batch_size=1, sinks=2, window=6)  # evicts after 8 tokens
        streamed = m(ids, cache=cache)
    assert dense.shape == (1, ids.shape[1], m.config.vocab_size)
    assert torch.isfinite(dense).all() and torch.isfinite(streamed).all()
    n = 8  # while nothing is evicted, streaming is the dense forward
    assert torch.allclose(streamed[:, :n], dense[:, :n], atol=1e-4, rtol=1e-4)
    assert tok.decode(ids[0, 1:].tolist()).strip().startswith("It was a dark")


def test_extensions_are_where_they_belong():
    configs = {m: minillm.load_config(WEIGHTS / m) for m in MODELS}
    assert configs["pythia-tiny-sink"].sink_token_id == 2
    assert configs["pythia-tiny-zerosink"].zero_sink is True
    for name, c in configs.items():
        if name != "pythia-tiny-sink":
            assert c.sink_token_id is None, name
        if name != "pythia-tiny-zerosink":
            assert not c.zero_sink, name
    raw = json.loads((WEIGHTS / "pythia-tiny-zerosink" / "config.json").read_text(encoding="utf-8"))
    assert raw["minillm"]["zero_sink"] is True  # a minillm extension key, not a transformers one


def test_readme_states_licence_and_zero_sink_warning():
    assert "CC0-1.0" in README and "Apache-2.0" in README
    assert "minillm extension" in README and "silently ignore" in README
