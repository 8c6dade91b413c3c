"""The command line under torchrun: `--tensor-parallel` (generate, chat, batch, ppl) and `ppl --data-parallel`.

    torchrun --nproc-per-node 2 $(which minillm) generate MODEL -p "..." --tensor-parallel
    torchrun --nproc-per-node 2 $(which minillm) ppl MODEL --text a.txt b.txt c.txt --data-parallel

The process group comes from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT):
gloo on the CPU, NCCL on CUDA (each rank on cuda:LOCAL_RANK). Only rank 0 prints or writes; the
other ranks compute the same things silently. Every rank must read the same inputs, so stdin (which
reaches one process only) is refused: give the turns, prompts or texts as files.
"""

from __future__ import annotations

import math
import os
import sys

from ..errors import MiniLLMError


_OWNED = []  # the group start() made (stop() ends only that one; a caller's own group is left alone)


def wants_group(args) -> bool:
    return bool(getattr(args, "tensor_parallel", False) or getattr(args, "data_parallel", False))


def start(args) -> None:
    """Initialise the process group from torchrun's environment; silence every rank but 0."""
    import torch
    import torch.distributed as dist

    flag = "--tensor-parallel" if getattr(args, "tensor_parallel", False) else "--data-parallel"
    if getattr(args, "tensor_parallel", False) and getattr(args, "data_parallel", False):
        raise MiniLLMError("--tensor-parallel and --data-parallel: give one (data parallelism loads the whole "
                           "model on every rank)")
    stdin = {"chat": args.command == "chat" and getattr(args, "prompts", None) is None,
             "batch": getattr(args, "input", None) == "-",
             "ppl": "-" in (getattr(args, "text", None) or [])}
    if stdin.get(args.command):
        what = {"chat": "--prompts F.jsonl", "batch": "--input F.jsonl", "ppl": "--text FILE"}[args.command]
        raise MiniLLMError(f"{flag}: stdin reaches only one rank; give {what}")
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing and not dist.is_initialized():
        if flag == "--data-parallel" and len(missing) == 4:
            return  # one process: the files are all this process's
        raise MiniLLMError(f"{flag} runs under torchrun (torchrun --nproc-per-node W $(which minillm) ...); "
                           f"{', '.join(missing)} not set")
    if not dist.is_initialized():
        cuda = str(args.device).startswith("cuda")
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            args.device = f"cuda:{local}"
        dist.init_process_group("nccl" if cuda else "gloo")
        _OWNED.append(True)
    if dist.get_rank() != 0:
        quiet = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115  (held for the process's life)
        sys.stdout = sys.stderr = quiet
        for name in ("json", "plot"):
            if getattr(args, name, None):
                setattr(args, name, None)  # rank 0 writes them
        if getattr(args, "output", None) not in (None, "-"):
            args.output = "-"  # stdout, which is silent here


def stop() -> None:
    import torch.distributed as dist

    if _OWNED and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        _OWNED.clear()


def rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(values: list) -> list:
    """Every rank's list, concatenated in rank order (one process: its own)."""
    import torch.distributed as dist

    rank, world = rank_world()
    if world == 1:
        return list(values)
    every = [None] * world
    dist.all_gather_object(every, values)
    return [v for part in every for v in part]


def pooled_ppl(nll_sum: float, tokens: int) -> float:
    if not tokens:
        return float("nan")
    mean = nll_sum / tokens
    return math.exp(mean) if not mean >= 709.0 else math.inf
