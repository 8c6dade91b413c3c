"""One rank of the tensor-parallel tests (tests/test_parallel.py): a server that runs jobs.

The test process starts W of these (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the
environment, as torchrun sets them) and sends every rank the same job, one JSON line on stdin;
each rank answers one JSON line on stdout, prefixed with RESULT. One process group serves many
jobs, so Hypothesis can draw its examples in the test process and each example costs one job.

A job compares the rank's shard (`minillm.load(..., tensor_parallel=True)`) with the whole model
loaded in the same process (the one-process reference), and answers numbers, never just "ok".
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback

import torch

torch.set_num_threads(1)

import minillm  # noqa: E402
from minillm.errors import MiniLLMError  # noqa: E402

RANK, WORLD = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
_models: dict = {}


def model(path, dtype="float64", fast=True, tp=True):
    key = (path, dtype, fast, tp)
    if key not in _models:
        _models[key] = minillm.load(path, dtype=dtype, fast=fast, tensor_parallel=tp)
    return _models[key]


def diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def job_init(_):
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    return {"rank": dist.get_rank(), "world": dist.get_world_size()}


def job_load_error(j):
    """The one-line error of a load that must be refused (paths may differ per rank)."""
    path = j["paths"][RANK] if "paths" in j else j["path"]
    try:
        minillm.load(path, tensor_parallel=True)
    except MiniLLMError as e:
        return {"error": str(e)}
    return {"error": None}


def job_dense(j):
    """Dense logits of the shard and of the whole model, both fast settings as asked."""
    out = {}
    ids = torch.tensor(j["ids"])
    for fast in j.get("fasts", [True, False]):
        tp, full = model(j["path"], j["dtype"], fast), model(j["path"], j["dtype"], fast, tp=False)
        got, want = tp(ids), full(ids)
        out[f"fast={fast}"] = {"diff": diff(got, want), "scale": want.abs().max().item(), "shape": list(got.shape)}
    return out


def job_stream(j):
    """Chunks of a stream past S (then decode steps), through the shard's cache and the whole model's."""
    ids = torch.tensor(j["ids"])
    worst = {}
    for fast in j.get("fasts", [True, False]):
        tp, full = model(j["path"], j["dtype"], fast), model(j["path"], j["dtype"], fast, tp=False)
        ct, cf = (m.new_cache(ids.shape[0], j["sinks"], j["window"]) for m in (tp, full))
        w, p = 0.0, 0
        for n in j["chunks"]:
            w = max(w, diff(tp(ids[:, p : p + n], cache=ct), full(ids[:, p : p + n], cache=cf)))
            p += n
        worst[f"fast={fast}"] = {"diff": w, "seen": int(ct.tokens_seen[0]), "cache_heads": ct.k.shape[2],
                                 "full_heads": cf.k.shape[2]}
    return worst


def job_schedule(j):
    """A ragged batched schedule with resets (lengths per row; 0/1 everywhere is per-row decode)."""
    worst = {}
    tokens = torch.tensor(j["tokens"])  # (steps, B, T)
    for fast in j.get("fasts", [True, False]):
        tp, full = model(j["path"], j["dtype"], fast), model(j["path"], j["dtype"], fast, tp=False)
        ct, cf = (m.new_cache(tokens.shape[1], j["sinks"], j["window"]) for m in (tp, full))
        w = 0.0
        for step, (lengths, resets) in enumerate(zip(j["lengths"], j["resets"])):
            if resets:
                ct.reset(resets)
                cf.reset(resets)
            a = tp(tokens[step], cache=ct, lengths=lengths)
            b = full(tokens[step], cache=cf, lengths=lengths)
            for r, n in enumerate(lengths):  # padded positions are unspecified
                if n:
                    w = max(w, diff(a[r, :n], b[r, :n]))
        assert ct.tokens_seen.tolist() == cf.tokens_seen.tolist()
        worst[f"fast={fast}"] = w
    return worst


def job_generate(j):
    """Greedy generate and generate_batch; and sampling with a different seed on every rank, which
    still gives every rank rank 0's tokens (rank 0 samples and broadcasts)."""
    tp, full = model(j["path"], j["dtype"]), model(j["path"], j["dtype"], tp=False)
    kw = dict(max_new_tokens=j["n"], sinks=2, window=6, ignore_eos=True)
    greedy = list(minillm.generate(tp, j["prompt"], temperature=0, **kw))
    want = list(minillm.generate(full, j["prompt"], temperature=0, **kw))
    batch = [(e.index, e.token) for e in minillm.generate_batch(tp, j["prompts"], batch_size=2, temperature=0, **kw)]
    batch_want = [(e.index, e.token) for e in minillm.generate_batch(full, j["prompts"], batch_size=2, temperature=0,
                                                                     **kw)]
    sampled = list(minillm.generate(tp, j["prompt"], temperature=1.0, seed=RANK, **kw))
    return {"greedy": greedy, "want": want, "batch": batch, "batch_want": batch_want, "sampled": sampled}


def job_share(j):
    """What this rank holds, and which checkpoint tensors it read whole."""
    from minillm.formats import checkpoint

    read_whole = []
    original = checkpoint._Tensors.get

    def spy(self, name):
        read_whole.append(name)
        return original(self, name)

    checkpoint._Tensors.get = spy
    try:
        tp = minillm.load(j["path"], dtype="float64", tensor_parallel=True)
    finally:
        checkpoint._Tensors.get = original
    full = model(j["path"], "float64", tp=False)
    replicated = sum(p.numel() for n, p in full.named_parameters() if not n.startswith("layers.") or "norm" in n)
    sharded = sum(p.numel() for n, p in full.named_parameters()) - replicated
    g = full.config
    row_biases = sum(p.numel() for n, p in full.named_parameters() if n.endswith(("wo.bias", "w_out.bias")))
    kv_rows = 0 if g.num_kv_heads % WORLD == 0 else g.num_layers * 2 * g.num_kv_heads * g.head_dim * (
        g.hidden_size + g.qkv_bias)  # fewer KV heads than ranks: replicated
    calls = []
    for block in tp.layers:  # count the all-reduces of one forward (the shard's own, wrapped)
        block.reduce = lambda x, f=block.reduce: calls.append(x.shape) or f(x)
    tp(torch.zeros(1, 3, dtype=torch.int64))
    c = tp.new_cache(1, 2, 4)
    return {"allreduces": len(calls), "layers": g.num_layers, "parallel_residual": g.parallel_residual,
            "params": sum(p.numel() for p in tp.parameters()), "replicated": replicated + row_biases + kv_rows,
            "sharded": sharded - row_biases - kv_rows,
            "cache_heads": c.k.shape[2], "kv": full.config.num_kv_heads, "read_whole": read_whole}


def job_rows(j):
    """export_row / import_row between the shard's caches, and into a model of another world size."""
    tp, full = model(j["path"], "float64"), model(j["path"], "float64", tp=False)
    ids = torch.tensor(j["ids"])
    a, b, cf = tp.new_cache(1, 2, 4), tp.new_cache(2, 2, 4), full.new_cache(1, 2, 4)
    tp(ids[:, :-1], cache=a)
    b.import_row(1, a.export_row(0))
    moved = diff(tp(ids[:, -1:], cache=a), tp(torch.cat([ids[:, -1:]] * 2), cache=b)[1:])
    errors = []
    for target, state in ((cf, a.export_row(0)), (a, cf.export_row(0))):
        try:
            target.import_row(0, state)
            errors.append(None)
        except MiniLLMError as e:
            errors.append(str(e))
    return {"moved": moved, "errors": errors}


def job_reference_logits(j):
    """Logits of a larger model (SmolLM2): the whole model on rank 0 only, every rank's shard
    compared with it (and rank 0's logits sent to the others, which must hold the same)."""
    import torch.distributed as dist

    ids = torch.tensor(j["ids"])
    tp = minillm.load(j["path"], dtype=j["dtype"], tensor_parallel=True)
    got = tp(ids)
    first = got.clone()
    dist.broadcast(first, src=0)
    out = {"vs_rank0": diff(got, first), "params": sum(p.numel() for p in tp.parameters()),
           "cache_heads": tp.new_cache(1, 4, 8).k.shape[2]}
    del tp
    if RANK == 0:
        full = minillm.load(j["path"], dtype=j["dtype"])
        want = full(ids)
        out.update(diff=diff(got, want), scale=want.abs().max().item(),
                   full_params=sum(p.numel() for p in full.parameters()))
    dist.barrier()
    return out


def job_cli(j):
    """`minillm ...` in this rank, inside the group (as torchrun runs it): exit status and output."""
    import contextlib
    import io

    from minillm.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdout, sys.stderr
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(j["argv"])
            printed = sys.stdout is out  # rank 0 prints; the others were silenced
    finally:
        sys.stdout, sys.stderr = saved
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue(), "printed": printed}


JOBS = {name[4:]: f for name, f in globals().items() if name.startswith("job_")}


def main():
    for line in sys.stdin:
        j = json.loads(line)
        try:
            result = {"ok": JOBS[j["job"]](j)}
        except Exception as e:  # answered, so the test names it (and the other ranks are not waited on)
            result = {"exception": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        sys.stdout.write("RESULT " + json.dumps(result) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
