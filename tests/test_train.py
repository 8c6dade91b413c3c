"""Tests for tools/train.py on tiny CPU runs (a few steps of 2-layer models, seconds each).

- tokenizers: BPE and sentencepiece training is deterministic and loads through minillm;
- data: the split, the separators and the tokenizer check;
- gradients: the dense SDPA forward that training uses gives the same gradients as the explicit
  scores path, and the zero-sink (SoftMax-off-by-one) path is differentiable;
- runs: bit-identical weights for the same seed, and run(N) == run(N/2) + resume;
- export: every family (and the sink-token variant) reloads through minillm.load with the
  trained weights' logits, and transformers loads it and gives the same logits;
- crashes: a run SIGKILLed at random moments and inside every stage of a save, then resumed,
  ends bit-identical to an uninterrupted run.

The corpus is generated here (seeded pseudo-English from tiny_ckpt.training_text, laid out as
train.py expects: five training books plus the two held-out names), so nothing needs ../shared.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import minillm
from minillm.errors import MiniLLMError
from minillm.core.model import Model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_ckpt import training_text  # noqa: E402
from util import random_model, rel_err, tiny_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("minillm_train_tool", REPO / "tools" / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

TINY = ["--layers", "2", "--hidden", "32", "--heads", "4", "--context", "24", "--batch", "3", "--warmup", "2",
        "--eval-every", "2", "--eval-windows", "3", "--log-every", "2", "--threads", "1", "--dtype", "float32"]


TRAIN_BOOKS = ("alpha.txt", "beta.txt", "gamma.txt", "delta.txt", "epsilon.txt")


def make_corpus(directory: Path) -> Path:
    """Seven seeded pseudo-English books of ~40K characters: five train, the two HELDOUT names."""
    directory.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(TRAIN_BOOKS + train.HELDOUT):
        (directory / name).write_text(training_text(40_000, seed=100 + seed) + "\n", encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Tiny BPE and sentencepiece tokenizers and their data files, from a generated corpus."""
    d = tmp_path_factory.mktemp("train")
    corpus = ["--corpus", str(make_corpus(d / "corpus")), "--max-chars", "40000"]
    for kind, extra in (("bpe", []), ("sp", ["--sentencepiece"])):
        assert train.main(["tokenizer", "--out", str(d / kind), "--vocab", "400", *extra, *corpus]) == 0
        assert train.main(["data", "--tokenizer", str(d / kind), "--out", str(d / f"{kind}.safetensors"),
                           *corpus]) == 0
    return d


def run_model(prepared, out, family, *extra, kind="bpe", steps=4):
    argv = ["model", "--family", family, "--data", str(prepared / f"{kind}.safetensors"),
            "--tokenizer", str(prepared / kind), "--out", str(out), "--steps", str(steps), *TINY, *extra]
    assert train.main(argv) == 0
    return out


def trained_weights(out) -> dict:
    """The final weights from the resumable training state (not from the export)."""
    from safetensors.torch import load_file

    t = load_file(str(train.state_tensors_path(Path(out) / train.STATE_DIR)))
    return {k[len("model."):]: v for k, v in t.items() if k.startswith("model.")}


def final_state(out) -> dict:
    """Every tensor of the saved training state: weights, AdamW moments and steps, sampler RNG."""
    from safetensors.torch import load_file

    return load_file(str(train.state_tensors_path(Path(out) / train.STATE_DIR)))


# ----------------------------------------------------------------------------------------------


def test_tokenizers_deterministic_and_loadable(prepared, tmp_path):
    corpus = ["--corpus", str(prepared / "corpus"), "--max-chars", "40000"]
    for kind, name, extra in (("bpe", "tokenizer.json", []), ("sp", "tokenizer.model", ["--sentencepiece"])):
        assert train.main(["tokenizer", "--out", str(tmp_path / kind), "--vocab", "400", *extra, *corpus]) == 0
        assert (tmp_path / kind / name).read_bytes() == (prepared / kind / name).read_bytes()
        tok = minillm.load_tokenizer(prepared / kind)
        assert tok.backend == ("sentencepiece" if kind == "sp" else "tokenizers")
        assert tok.vocab_size == 400
        gen = json.loads((prepared / kind / "generation_config.json").read_text())
        assert (tok.bos_id, tok.eos_id) == (gen["bos_token_id"], gen["eos_token_id"])
        assert train.special_id(prepared / kind, "<sink>") not in (tok.bos_id, tok.eos_id)
        text = "It was a dark night; the wind blew.\n\nChapter 2"
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and tok.decode(ids[1:]) == text
    # The sentencepiece folder has no tokenizer.json, so minillm must take the sentencepiece path.
    assert not (prepared / "sp" / "tokenizer.json").exists()


def test_data_file(prepared):
    tok = minillm.load_tokenizer(prepared / "bpe")
    train_ids, held, info = train.load_data(prepared / "bpe.safetensors", prepared / "bpe")
    assert info["eos_id"] == tok.eos_id and info["bos_id"] == tok.bos_id and info["vocab_size"] == 400
    assert int((train_ids == tok.eos_id).sum()) == 5  # five training books, each closed by </s>
    assert int((held == tok.eos_id).sum()) == 2  # frankenstein and katrine
    assert int(train_ids.max()) < 400 and int(train_ids.min()) >= 0
    from safetensors import safe_open

    with safe_open(str(prepared / "bpe.safetensors"), "pt") as f:
        books = [name for name, _, _ in json.loads(f.metadata()["heldout_books"])]
    assert books == list(train.HELDOUT)
    with pytest.raises(MiniLLMError, match="different tokenizer"):
        train.load_data(prepared / "bpe.safetensors", prepared / "sp")


def test_samples_start_with_bos_or_sink():
    ids = torch.arange(100, 200)
    for prefix in ([0], [2, 0]):
        x, y = train.Sampler(ids, context=16, prefix=prefix, seed=0).batch(4)
        assert x.shape == y.shape == (4, 16)
        assert (x[:, : len(prefix)] == torch.tensor(prefix)).all()
        assert (y[:, : len(prefix) - 1] == -100).all()  # BOS after <sink> is not a target
        assert (y[:, len(prefix) - 1:] >= 100).all() and (x[:, len(prefix):] == y[:, len(prefix) - 1:-1]).all()
        assert (y[:, len(prefix):] == y[:, len(prefix) - 1:-1] + 1).all()  # consecutive text


@pytest.mark.parametrize("variant", ["llama_gqa", "mpt", "falcon_rw", "gpt_neox_parallel"])
def test_sdpa_gradients_equal_explicit_path(variant):
    """Training uses the dense SDPA forward; its gradients must be those of the explicit scores."""
    model = random_model(tiny_config(variant), std=0.2).requires_grad_(True)  # built for inference; train it
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(1))
    grads = []
    for probs in (None, []):
        model.zero_grad()
        F.cross_entropy(model(ids, attn_probs=probs)[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert g.abs().max() > 0, name
        assert rel_err(g, grads[1][name]) < 1e-10, name


def test_zero_sink_is_differentiable():
    """The zero-sink path is the explicit one: check its gradient against a finite difference."""
    model = random_model(tiny_config("gpt_neox_parallel", zero_sink=True), std=0.2).requires_grad_(True)
    ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(2))

    def loss():
        return F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    loss().backward()
    params = list(model.parameters())
    direction = [torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(i))
                 for i, p in enumerate(params)]
    analytic = sum((p.grad * d).sum() for p, d in zip(params, direction)).item()
    eps = 1e-6
    with torch.no_grad():
        values = []
        for sign in (1, -1):
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
            values.append(loss().item())
            for p, d in zip(params, direction):
                p.sub_(sign * eps * d)
    numeric = (values[0] - values[1]) / (2 * eps)
    assert abs(analytic - numeric) < 1e-6 * max(1.0, abs(analytic))
    assert all(p.grad.abs().max() > 0 for p in params)


def test_deterministic_and_resume(prepared, tmp_path):
    a = run_model(prepared, tmp_path / "a", "llama", steps=6)
    b = run_model(prepared, tmp_path / "b", "llama", steps=6)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    # Interrupted after 3 steps (the state is saved), then resumed to 6: the same weights.
    c = run_model(prepared, tmp_path / "c", "llama", "--stop-after", "3", "--save-every", "2", steps=6)
    assert json.loads((c / "train_state" / "state.json").read_text())["step"] == 3
    run_model(prepared, c, "llama", "--resume", steps=6)
    assert (a / "model.safetensors").read_bytes() == (c / "model.safetensors").read_bytes()
    log = json.loads((c / "train_log.json").read_text())
    assert log["steps"] == 6 and log["tokens_seen"] == 6 * 3 * 24
    assert [h["step"] for h in log["history"]] == [0, 2, 4, 6]
    # A resumed run must keep the settings of the run it continues.
    argv = ["model", "--family", "llama", "--data", str(prepared / "sp.safetensors"), "--tokenizer",
            str(prepared / "sp"), "--out", str(c), "--steps", "6", "--resume", *TINY, "--lr", "1e-3"]
    assert train.main(argv) == 2


# Each family in its shipped layout, plus Falcon-40B's grouped QKV and the sink-token variant.
CASES = {
    "llama": ("llama", [], "sp"),
    "mpt": ("mpt", [], "bpe"),
    "gpt_neox": ("gpt_neox", [], "bpe"),
    "gpt_neox_sink": ("gpt_neox", ["--sink-token"], "bpe"),
    "falcon_7b": ("falcon", ["--kv-heads", "1"], "bpe"),
    "falcon_40b": ("falcon", ["--kv-heads", "2"], "bpe"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_reloads_and_matches_transformers(prepared, tmp_path, case):
    family, extra, kind = CASES[case]
    out = run_model(prepared, tmp_path / case, family, *extra, kind=kind)
    config = json.loads((out / "config.json").read_text())
    sink = train.special_id(prepared / kind, "<sink>")
    assert config.get("minillm", {}).get("sink_token_id") == (sink if "--sink-token" in extra else None)
    assert (out / ("tokenizer.model" if kind == "sp" else "tokenizer.json")).is_file()
    tok = minillm.load_tokenizer(out)
    assert tok.backend == ("sentencepiece" if kind == "sp" else "tokenizers")

    model = minillm.load(out, dtype=torch.float32)
    trained = minillm.fast.enable(Model(model.config))  # the same path as `load` gives: the same computation
    trained.load_state_dict(trained_weights(out))
    ids = tok.encode("The whale rose from the sea, and all the crew cried out.")
    if model.config.sink_token_id is not None:
        ids = [model.config.sink_token_id] + ids
    ids = torch.tensor([ids[:24]])  # the trained context (transformers' MPT builds ALiBi for max_seq_len)
    with torch.no_grad():
        ours = model(ids)
        assert torch.equal(ours, trained.eval()(ids))  # float32 export: the trained weights exactly

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(ids).logits
    assert rel_err(ours, theirs) <= 1e-4


def test_zero_sink_and_bf16_autocast(prepared, tmp_path):
    out = run_model(prepared, tmp_path / "zs", "gpt_neox", "--zero-sink", "--amp", "bf16", "--keep-best", steps=8)
    config = json.loads((out / "config.json").read_text())
    assert config["minillm"]["zero_sink"] is True
    model = minillm.load(out)
    assert model.config.zero_sink
    init = Model(model.config)
    train.init_weights(init, 0)
    assert not torch.equal(model.layers[0].attn.wqkv.weight, init.layers[0].attn.wqkv.weight)  # it trained
    log = json.loads((out / "train_log.json").read_text())
    assert log["bf16_autocast"]
    # It learned: the step-0 evaluation is the untrained model, which is uniform (ln 400 = 5.99)
    # up to its N(0, 0.02) init; 8 steps must take a real margin off it (5.99 -> 5.72 here,
    # deterministic on CPU), every evaluation lower than the one before.
    losses = [h["heldout_loss"] for h in log["history"]]
    assert [h["step"] for h in log["history"]] == [0, 2, 4, 6, 8]
    assert abs(losses[0] - math.log(400)) < 0.05
    assert losses[-1] < losses[0] - 0.2
    assert all(b < a for a, b in zip(losses, losses[1:]))


class FakeClock:
    """Stands in for the `time` module inside train.py: each time() call advances 0.02 s, so a
    --time-limit run is a deterministic function of the code, not of the machine's load."""

    def __init__(self, tick: float = 0.02):
        self.now, self.tick = 1e9, tick
        self.time_ns, self.sleep = time.time_ns, time.sleep

    def time(self) -> float:
        self.now += self.tick
        return self.now


def test_time_limit_fits_the_steps(prepared, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "time", FakeClock())
    out = run_model(prepared, tmp_path / "t", "mpt", "--time-limit", "6", "--eval-every", "0", steps=10**6)
    log = json.loads((out / "train_log.json").read_text())
    # Calibrated once, the step count fitted to the limit, and all of it trained before the limit.
    assert "calibration:" in capsys.readouterr().out
    assert 10 < log["total_steps"] < 10**6 and log["steps"] == log["total_steps"]
    assert log["wall_seconds_this_run"] < 6


def test_errors_are_one_line(prepared, tmp_path, capsys):
    base = ["model", "--data", str(prepared / "bpe.safetensors"), "--tokenizer", str(prepared / "bpe"),
            "--out", str(tmp_path / "x"), "--steps", "1", *TINY]
    cases = [
        (["--family", "mpt", "--kv-heads", "2"], "one KV head per query head"),
        (["--family", "gpt_neox", "--sink-token", "--zero-sink"], "pick one"),
        (["--family", "llama", "--resume"], "no training state"),
        (["--family", "llama", "--hidden", "30"], "not a multiple"),
    ]
    for extra, message in cases:
        assert train.main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert train.main(["data", "--tokenizer", str(tmp_path / "none"), "--out", str(tmp_path / "d")]) == 2
    assert train.main(["model", "--family", "llama", "--data", str(tmp_path / "none.safetensors"),
                       "--tokenizer", str(prepared / "bpe"), "--out", str(tmp_path / "y"), "--steps", "1"]) == 2


# ----------------------------------------------------------------------------------------------
# SIGKILL at any moment, then --resume: bit-identical to a run that was never interrupted.

SAVE_STAGES = ("json-in-place", "tensors-written", "tensors-in-place", "json-written")  # see save_state


def _launch(argv, env_extra=None):
    """tools/train.py in a child process; its stdout+stderr lines arrive on a queue."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    p = subprocess.Popen([sys.executable, str(REPO / "tools" / "train.py"), *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in p.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return p, lines


def _wait_for(lines, predicate, timeout=60.0) -> str | None:
    """The first line satisfying predicate, or None if the child exited first."""
    deadline = time.monotonic() + timeout
    while True:
        line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        if line is None or predicate(line):
            return line


def test_sigkill_at_any_moment_then_resume_is_bit_identical(prepared, tmp_path):
    """Four SIGKILLs inside a save, one at each stage boundary of save_state (the child pauses
    there: TRAIN_PAUSE_IN_SAVE), and three at seeded random moments of training (saves every
    step, so they land in saves too); after each kill the run is restarted with --resume (fresh
    while no state.json exists yet). The finished run's whole state (weights, AdamW moments and
    steps, sampler RNG) and its export equal an uninterrupted run's, bit for bit."""
    steps = 40
    common = ["--save-every", "1", "--log-every", "1", "--eval-every", "10"]
    ref = run_model(prepared, tmp_path / "ref", "llama", *common, steps=steps)
    out = tmp_path / "killed"
    state_json = out / train.STATE_DIR / "state.json"
    argv = ["model", "--family", "llama", "--data", str(prepared / "bpe.safetensors"), "--tokenizer",
            str(prepared / "bpe"), "--out", str(out), "--steps", str(steps), *TINY, *common]
    rng = random.Random(11)
    kills = [("stage", s) for s in SAVE_STAGES] + [("random", rng.uniform(0.0, 0.25)) for _ in range(3)]
    landed, resumed_at = [], []
    for kind, where in kills + [("finish", None)]:
        resume = state_json.is_file()
        if resume:
            resumed_at.append(json.loads(state_json.read_text())["step"])
        env = {"TRAIN_PAUSE_IN_SAVE": where} if kind == "stage" else {}
        p, lines = _launch(argv + (["--resume"] if resume else []), env)
        try:
            if kind == "stage":  # the child announces the stage, then sleeps in the middle of the save
                line = _wait_for(lines, lambda s: s.startswith(f"save-stage {where} "))
                assert line is not None, f"the run ended without reaching save stage {where}"
                p.send_signal(signal.SIGKILL)
            elif kind == "random":  # once it trains (imports are past), at a random moment
                if _wait_for(lines, lambda s: s.startswith("step ")) is not None:
                    time.sleep(where)
                    p.send_signal(signal.SIGKILL)
            rc = p.wait(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        if kind == "finish":
            assert rc == 0
        else:
            landed.append((kind, rc))
    assert landed[:4] == [("stage", -signal.SIGKILL)] * 4  # every kill inside a save landed
    assert sum(rc == -signal.SIGKILL for _, rc in landed) >= 6, landed  # the random ones too, mostly
    assert resumed_at == sorted(resumed_at) and resumed_at[-1] > 0, resumed_at

    want, got = final_state(ref), final_state(out)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert json.loads(state_json.read_text())["step"] == steps
    assert (ref / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    # The last save removed what the killed saves left behind (including safetensors' own .tmpXXXXXX).
    names = sorted(f.name for f in (out / train.STATE_DIR).iterdir())
    assert len(names) == 2 and names[1] == "state.json" and names[0] == train.state_tensors_path(
        out / train.STATE_DIR).name, names
