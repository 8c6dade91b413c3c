"""Memory estimates, checked before a large allocation instead of failing (or swapping) inside it.

`new_cache` and `minillm attn` ask `check_fits` first: a cache of a billion keys, or attention maps
over 40,000 tokens, is refused up front with the size it would need, instead of an out-of-memory
traceback after minutes (or the machine swapping itself to a halt).
"""

from __future__ import annotations

import os

from .errors import MiniLLMError

# The most torch CPU threads the CLI accepts: far above any machine's cores (oversubscribing only
# slows a run down), far below the tens of thousands of OpenMP threads that crash the process.
MAX_THREADS = 1024


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def cache_bytes(config, batch_size: int, sinks: int, window: int, elem_bytes: int) -> int:
    """Bytes of a SinkCache: K and V for every layer, plus the un-rotated sink keys under RoPE."""
    per_key = config.num_layers * batch_size * config.num_kv_heads * config.head_dim * elem_bytes
    raw_sinks = sinks if config.positions == "rope" else 0
    return per_key * (2 * (sinks + window) + raw_sinks)


def available_bytes(device) -> int | None:
    """Memory that can still be allocated on `device` (None: unknown, then nothing is refused)."""
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind == "cuda":
        import torch

        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):  # pragma: no cover - no usable CUDA
            return None
    if kind != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def check_fits(nbytes: int, device, what: str) -> None:
    """Refuse `what` by name when it needs more memory than `device` has available."""
    free = available_bytes(device)
    if free is not None and nbytes > free:
        raise MiniLLMError(f"{what} needs {human_bytes(nbytes)}, more than the {human_bytes(free)} "
                           f"available on {device}")
