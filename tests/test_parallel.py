"""Tensor parallelism (minillm/parallel/) on CPU: W gloo ranks on 127.0.0.1, each equal to one process.

One process group per world size serves every check (tests/parallel_worker.py: each rank runs the
jobs this process sends it; starting torch processes is the slow part). Every job compares the
rank's shard with the whole model loaded in the same rank, so the reference is one process:
- every family and variant at W = 2 and W = 3: dense logits within 1e-9 (float64) / 1e-5 (float32),
  with the fast layer on and off; streaming chunks past S; Hypothesis-drawn ragged batched
  schedules with resets and per-row decode (drawn here, sent to every rank: each rank runs the same
  example, and a failure shrinks); greedy generate and generate_batch; sampling that follows rank 0;
- each rank holds only its share (parameters, cache heads) and reads no sharded tensor whole;
- a quantized GGUF whose blocks straddle the shard boundary; SmolLM2-135M at W = 3 from its GGUF;
- every bad input (no group, a width that does not split, ranks on different checkpoints, a row
  state moved to a model of another world size) gets its one-line MiniLLMError.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minillm
from tiny_ckpt import tiny_checkpoint  # noqa: F401  (fixture)
from util import random_model, tiny_config

HERE = Path(__file__).resolve().parent
VOCAB = 61
# Every variant, with 12 heads so that W = 2 and W = 3 both split them (the KV heads as each has).
VARIANTS = {
    "llama_gqa": {}, "llama_mqa": {}, "falcon_7b": {}, "falcon_40b": {}, "falcon_rw": {}, "mpt": {},
    "gpt_neox_parallel": {}, "gpt_neox_sequential": {},
    "llama_zero_sink": {"base": "llama_gqa", "zero_sink": True},
    "llama_sink_token": {"base": "llama_gqa", "sink_token_id": 3},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Group:
    """W rank processes serving jobs: `run(job)` sends it to every rank, returns every answer."""

    def __init__(self, world: int):
        port = _free_port()
        self.procs = []
        for rank in range(world):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
            self.procs.append(subprocess.Popen([sys.executable, str(HERE / "parallel_worker.py")], env=env,
                                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))

    def run(self, job: dict, timeout: float = 300, ranks=None) -> list:
        procs = self.procs if ranks is None else [self.procs[r] for r in ranks]
        for p in procs:
            p.stdin.write(json.dumps(job) + "\n")
            p.stdin.flush()
        answers = []
        deadline = time.monotonic() + timeout
        for rank, p in enumerate(procs):
            sel = selectors.DefaultSelector()
            sel.register(p.stdout, selectors.EVENT_READ)
            while True:
                if not sel.select(max(0.0, deadline - time.monotonic())):
                    self.close()
                    pytest.fail(f"rank {rank} did not answer {job['job']} within {timeout} s")
                line = p.stdout.readline()
                if not line:
                    pytest.fail(f"rank {rank} exited (status {p.wait()}) during {job['job']}")
                if line.startswith("RESULT "):
                    break
            answer = json.loads(line[len("RESULT "):])
            if "exception" in answer:
                pytest.fail(f"rank {rank}, job {job['job']}: {answer['exception']}\n{answer['trace']}")
            answers.append(answer["ok"])
        return answers

    def close(self):
        for p in self.procs:  # nothing to keep: stopped at once, not through gloo's shutdown
            if p.poll() is None:
                p.kill()
            p.wait()
            p.stdin.close()
            p.stdout.close()


def _checkpoint(root: Path, name: str, **overrides) -> str:
    spec = {**VARIANTS.get(name, {}), **overrides}
    base = spec.pop("base", name)
    config = tiny_config(base, heads=12, head_dim=4, vocab=VOCAB, **{"intermediate_size": 96, **spec})
    path = root / name
    minillm.save_pretrained(random_model(config, dtype=torch.float32, seed=len(name)), path)
    return str(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    paths = {name: _checkpoint(root, name) for name in VARIANTS}
    paths["other_weights"] = _checkpoint(root, "llama_gqa_other", base="llama_gqa")
    paths["five_heads"] = str(root / "five_heads")
    minillm.save_pretrained(random_model(tiny_config("llama_mha", heads=5, head_dim=4, vocab=VOCAB)),
                            paths["five_heads"])
    paths["odd_width"] = _checkpoint(root, "odd_width", base="llama_gqa", intermediate_size=97)
    return paths


def _ids(B: int, T: int, seed: int = 0) -> list:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed)).tolist()


def _start(world: int, ckpts) -> Group:
    g = Group(world)
    no_group = g.run({"job": "load_error", "path": ckpts["llama_gqa"]})  # before the group exists
    g.run({"job": "init"})
    g.no_group = no_group
    return g


@pytest.fixture(scope="module")
def group2(ckpts):
    g = _start(2, ckpts)
    yield g
    g.close()


@pytest.fixture(scope="module")
def group3(ckpts):
    g = _start(3, ckpts)
    yield g
    g.close()


def _check_dense(group, path):
    for dtype, tol in (("float64", 1e-9), ("float32", 1e-5)):
        for answer in group.run({"job": "dense", "path": path, "dtype": dtype, "ids": _ids(2, 13)}):
            for fast, r in answer.items():
                assert r["shape"] == [2, 13, VOCAB]
                assert r["diff"] <= tol * r["scale"], (dtype, fast, r)


def _check_stream(group, path):
    # S = 2 + 5: chunks of 4, 9, 1, 1, 6 tokens pass S several times, then decode steps.
    for answer in group.run({"job": "stream", "path": path, "dtype": "float64", "ids": _ids(2, 21, 1),
                             "sinks": 2, "window": 5, "chunks": [4, 9, 1, 1, 6]}):
        for fast, r in answer.items():
            assert r["seen"] == 21
            assert r["diff"] <= 1e-9, (fast, r)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_at_w2_equals_one_process(group2, ckpts, variant):
    _check_dense(group2, ckpts[variant])
    _check_stream(group2, ckpts[variant])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_at_w3_equals_one_process(group3, ckpts, variant):
    _check_dense(group3, ckpts[variant])
    _check_stream(group3, ckpts[variant])


@st.composite
def schedules(draw):
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, 5))
    steps = draw(st.integers(1, 6))
    decode = draw(st.booleans())  # every length 0 or 1: the per-row decode step
    lengths = [[draw(st.integers(0, 1 if decode else T)) for _ in range(B)] for _ in range(steps)]
    resets = [draw(st.lists(st.integers(0, B - 1), max_size=B, unique=True)) if s else [] for s in range(steps)]
    tokens = [[[draw(st.integers(0, VOCAB - 1)) for _ in range(T)] for _ in range(B)] for _ in range(steps)]
    return {"lengths": lengths, "resets": resets, "tokens": tokens, "sinks": draw(st.integers(0, 2)),
            "window": draw(st.integers(1, 4))}


@settings(max_examples=6, deadline=None)
@given(schedule=schedules(), variant=st.sampled_from(["llama_gqa", "falcon_7b", "mpt", "gpt_neox_parallel"]))
def test_ragged_batched_schedules_with_resets_equal_one_process(group2, ckpts, schedule, variant):
    for answer in group2.run({"job": "schedule", "path": ckpts[variant], "dtype": "float64", **schedule}):
        for fast, worst in answer.items():
            assert worst <= 1e-9, (fast, worst)


@pytest.mark.parametrize("variant", ["llama_gqa", "llama_sink_token", "falcon_rw"])
def test_generate_gives_one_process_tokens_and_sampling_follows_rank_0(group2, ckpts, variant):
    prompts = [_ids(1, k, k)[0] for k in (3, 7, 2)]
    answers = group2.run({"job": "generate", "path": ckpts[variant], "dtype": "float64", "n": 12,
                          "prompt": prompts[1], "prompts": prompts})
    for a in answers:
        assert a["greedy"] == a["want"] and len(a["greedy"]) == 12
        assert sorted(map(tuple, a["batch"])) == sorted(map(tuple, a["batch_want"]))
        assert a["sampled"] == answers[0]["sampled"]  # each rank drew with its own seed: rank 0's won


def test_each_rank_holds_only_its_share_and_reads_only_its_slices(group2, group3, ckpts):
    for group, W in ((group2, 2), (group3, 3)):
        for variant in ("llama_gqa", "llama_mqa", "falcon_rw", "falcon_7b", "gpt_neox_parallel"):
            for rank, a in enumerate(group.run({"job": "share", "path": ckpts[variant]})):
                # One all-reduce per row-parallel projection; a parallel block sums first: one per layer.
                assert a["allreduces"] == a["layers"] * (1 if a["parallel_residual"] else 2), (variant, a)
                assert a["params"] <= a["replicated"] + a["sharded"] / W, a
                assert a["params"] < a["replicated"] + a["sharded"] / (W - 1), a  # not a bigger share
                kv = a["kv"]
                assert a["cache_heads"] == (kv // W if kv % W == 0 else 1), a
                sliced = [n for n in a["read_whole"] if any(k in n for k in ("q_proj", "k_proj", "v_proj", "o_proj",
                          "gate_proj", "up_proj", "down_proj", "query_key_value", "dense"))]
                # No rank reads a sharded tensor whole; rank 0 reads the row-parallel biases (it adds them).
                row_biases = [n for n in sliced if n.endswith(("o_proj.bias", "attention.dense.bias",
                                                               "dense_4h_to_h.bias", "down_proj.bias"))]
                assert sliced == (row_biases if rank == 0 else []), sliced


def test_row_state_moves_between_shard_caches_and_not_to_another_world_size(group2, ckpts):
    for a in group2.run({"job": "rows", "path": ckpts["llama_gqa"], "ids": _ids(1, 9)}):
        assert a["moved"] <= 1e-12
        assert a["errors"][0] == ("import_row: the state comes from a model split over 2 rank(s), this cache's "
                                  "model over 1")
        assert a["errors"][1] == ("import_row: the state comes from a model split over 1 rank(s), this cache's "
                                  "model over 2")


def test_bad_inputs_get_one_line_errors(group2, group3, ckpts):
    for a in group2.no_group:
        assert a["error"].startswith("tensor_parallel=True needs an initialised torch.distributed process group")
    cases = [
        ({"path": ckpts["five_heads"]}, "tensor_parallel: 5 query heads do not split over 2 ranks"),
        ({"path": ckpts["odd_width"]}, "tensor_parallel: the MLP's intermediate width 97 does not split over 2 ranks"),
        ({"paths": [ckpts["llama_gqa"], ckpts["other_weights"]]},
         "tensor_parallel: the ranks disagree on the checkpoint's weights (rank(s) [1] differ from rank 0)"),
        ({"paths": [ckpts["llama_gqa"], ckpts["mpt"]]},
         "tensor_parallel: the ranks disagree on the checkpoint (config and tensor shapes)"),
    ]
    # A rank that fails before the ranks meet (its file is missing) tells the others, which do not wait.
    answers = group2.run({"job": "load_error", "paths": [ckpts["llama_gqa"], ckpts["llama_gqa"] + "-missing"]})
    assert answers[1]["error"].startswith("model directory not found") or "missing" in answers[1]["error"], answers
    assert answers[0]["error"] == f"tensor_parallel: rank 1 failed: {answers[1]['error']}"
    for job, message in cases:
        for a in group2.run({"job": "load_error", **job}):
            assert a["error"] is not None and a["error"].startswith(message), a
            assert "\n" not in a["error"]
    for a in group3.run({"job": "load_error", "path": ckpts["falcon_40b"]}):
        assert a["error"] is None  # 6 KV heads: 2 per rank
    # 4 KV heads over 3 ranks: neither split nor replicated evenly.
    path = str(Path(ckpts["llama_gqa"]).parent / "kv4")
    minillm.save_pretrained(random_model(tiny_config("llama_gqa", heads=12, head_dim=4, vocab=VOCAB,
                                                     num_kv_heads=4, intermediate_size=96)), path)
    for a in group3.run({"job": "load_error", "path": path}):
        assert a["error"].startswith("tensor_parallel: 4 KV heads do not split over 3 ranks"), a


# ---- GGUF: a quantized file whose blocks straddle the boundary, and SmolLM2-135M at W = 3


@pytest.fixture(scope="module")
def q8_gguf(tiny_checkpoint, tmp_path_factory):
    """A Q8_0 GGUF (blocks of 32) of a Llama with hidden 96 and MLP width 160: at W = 2 each rank
    takes 48 of o_proj's columns and 80 of down_proj's, so a block straddles each boundary."""
    gguf = pytest.importorskip("gguf")
    from test_gguf import write_gguf

    root = tmp_path_factory.mktemp("tp-gguf")
    d = root / "ckpt"
    d.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny_checkpoint / f, d / f)
    vocab = minillm.load(tiny_checkpoint).config.vocab_size
    config = tiny_config("llama_gqa", heads=12, head_dim=8, vocab=vocab, intermediate_size=160)
    minillm.save_pretrained(random_model(config, dtype=torch.float32, std=0.05), d)
    return str(write_gguf(root / "q8.gguf", d, qtype=gguf.GGMLQuantizationType.Q8_0)), vocab


def test_quantized_gguf_blocks_straddling_the_boundary(group2, q8_gguf):
    path, vocab = q8_gguf
    ids = torch.randint(0, vocab, (1, 11), generator=torch.Generator().manual_seed(3)).tolist()
    for a in group2.run({"job": "dense", "path": path, "dtype": "float64", "ids": ids, "fasts": [True]}):
        assert a["fast=True"]["diff"] <= 1e-9 * a["fast=True"]["scale"], a


def test_smollm2_at_w3_from_its_gguf(group3):
    from test_smollm2 import _gguf_path

    path = str(_gguf_path())
    tok = minillm.load_tokenizer(path)
    ids = [tok.encode("The paper streams Llama-2-70B with attention sinks, four tokens kept at the start.")]
    answers = group3.run({"job": "reference_logits", "path": path, "dtype": "float32", "ids": ids}, timeout=600)
    a0 = answers[0]
    assert a0["diff"] <= 1e-4 * a0["scale"], a0
    for a in answers:
        assert a["vs_rank0"] <= 1e-4 * a0["scale"]
        assert a["cache_heads"] == 1  # 3 KV heads over 3 ranks
        assert a["params"] < a0["full_params"] / 2


# ---- The command line: --tensor-parallel and ppl --data-parallel, in the ranks of the group (as
# torchrun runs them), and once under torchrun itself


def _one_process(argv, capsys) -> tuple[int, str, str]:
    from minillm.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_tensor_parallel_equals_one_process_and_only_rank_0_writes(group2, tiny_checkpoint, tmp_path, capsys):
    m = str(tiny_checkpoint)
    (tmp_path / "p.jsonl").write_text('{"prompt": "The whale"}\n{"prompt": "A ship at sea"}\n{"prompt": "He"}\n')
    (tmp_path / "turns.jsonl").write_text('{"turn": "Hello there"}\n{"turn": "And the sea?"}\n')
    common = ["--temperature", "0", "--max-new-tokens", "8", "--ignore-eos", "--cache-size", "12", "--sinks", "2"]
    runs = {
        "generate": ["generate", m, "-p", "The whale and the ship", *common],
        "chat": ["chat", m, "--prompts", tmp_path / "turns.jsonl", *common],
        "batch": ["batch", m, "--input", tmp_path / "p.jsonl", "--batch-size", "2", *common],
    }
    for name, argv in runs.items():
        code, want, _ = _one_process(argv, capsys)
        assert code == 0 and want.strip()
        answers = group2.run({"job": "cli", "argv": [str(a) for a in argv] + ["--tensor-parallel"]})
        assert [a["code"] for a in answers] == [0, 0], answers
        assert answers[0]["stdout"] == want, name
        assert answers[1]["stdout"] == answers[1]["stderr"] == "" and not answers[1]["printed"]
    out = tmp_path / "out.jsonl"
    answers = group2.run({"job": "cli", "argv": [str(a) for a in runs["batch"]] + ["--tensor-parallel", "--output",
                                                                                    str(out)]})
    assert [a["code"] for a in answers] == [0, 0]
    assert out.read_text().strip() == want.strip()  # rank 0 wrote the file; rank 1 wrote nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "p.jsonl", "turns.jsonl"]


def test_cli_ppl_data_parallel_equals_one_process(group2, tiny_checkpoint, tmp_path, capsys):
    from tiny_ckpt import training_text

    files = []
    for i, n in enumerate((900, 1400, 600)):
        files.append(tmp_path / f"t{i}.txt")
        files[-1].write_text(training_text(n, seed=i + 5))
    argv = ["ppl", str(tiny_checkpoint), "--text", *map(str, files), "--cache-size", "24", "--sinks", "2",
            "--mode", "streaming", "window", "--data-parallel"]
    code, _, _ = _one_process([*argv, "--json", tmp_path / "one.json"], capsys)
    assert code == 0
    answers = group2.run({"job": "cli", "argv": [*argv, "--json", str(tmp_path / "two.json")]})
    assert [a["code"] for a in answers] == [0, 0]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one.pop("ranks") == 1 and two.pop("ranks") == 2
    assert one == two  # every file's NLL sum and the pooled PPL, exactly
    # ppl --tensor-parallel: the same perplexities as one process (float32 sums in another order).
    tp_argv = ["ppl", str(tiny_checkpoint), "--text", str(files[0]), "--cache-size", "24", "--sinks", "2",
               "--mode", "streaming", "dense"]
    code, _, _ = _one_process([*tp_argv, "--json", tmp_path / "tp1.json"], capsys)
    answers = group2.run({"job": "cli", "argv": [*tp_argv, "--tensor-parallel", "--json", str(tmp_path / "tp2.json")]})
    assert code == 0 and [a["code"] for a in answers] == [0, 0]
    tp1, tp2 = (json.loads((tmp_path / f).read_text())["modes"] for f in ("tp1.json", "tp2.json"))
    for mode in ("streaming", "dense"):
        assert tp1[mode]["tokens"] == tp2[mode]["tokens"] > 100
        assert abs(tp1[mode]["ppl"] - tp2[mode]["ppl"]) <= 1e-5 * tp1[mode]["ppl"]
    # Each file's stream is the one `ppl --text FILE` scores.
    code, out, _ = _one_process(["ppl", str(tiny_checkpoint), "--text", files[1], "--cache-size", "24", "--sinks", "2",
                                 "--json", tmp_path / "single.json"], capsys)
    single = json.loads((tmp_path / "single.json").read_text())["modes"]["streaming"]
    assert single["ppl"] == one["modes"]["streaming"]["files"][1]["ppl"]


def test_cli_parallel_refusals(group2, tiny_checkpoint, capsys):
    m = str(tiny_checkpoint)
    code, _, err = _one_process(["generate", m, "-p", "x", "--tensor-parallel"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("minillm: error: --tensor-parallel runs under torchrun")
    answers = group2.run({"job": "cli", "argv": ["chat", m, "--tensor-parallel"]})
    assert [a["code"] for a in answers] == [2, 2]
    assert answers[0]["stderr"] == ("minillm: error: --tensor-parallel: stdin reaches only one rank; give "
                                    "--prompts F.jsonl\n")


def test_torchrun_generate_tensor_parallel(tiny_checkpoint, capsys):
    """The real launcher: torchrun --nproc-per-node 2 $(which minillm) generate ... --tensor-parallel."""
    argv = ["generate", str(tiny_checkpoint), "-p", "The whale", "--temperature", "0", "-n", "10", "--ignore-eos"]
    code, want, _ = _one_process(argv, capsys)
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this Python")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "minillm", *argv,
                           "--tensor-parallel", "--threads", "1"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == want  # rank 0's text, once
    assert proc.stderr.count("minillm: 10 tokens at") == 1


def test_a_shard_is_not_saved_as_a_checkpoint(tmp_path):
    """A shard's config and weights are one rank's share: saving them would write a wrong model."""
    from minillm.errors import MiniLLMError
    from minillm.parallel import ShardedModel, plan_shard

    shard = plan_shard(tiny_config("llama_gqa", heads=12, head_dim=4, vocab=VOCAB, intermediate_size=96), 1, 2)
    model = ShardedModel(shard.local, shard)
    assert (model.config.num_heads, model.config.num_kv_heads, model.config.intermediate_size) == (6, 3, 48)
    with pytest.raises(MiniLLMError, match=r"^save_pretrained: this model is rank 1's shard of 2 \(tensor_parallel"):
        minillm.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
