"""Memory estimates, checked before a large allocation instead of failing (or swapping) inside it.

`new_cache` and `minillm attn` ask `check_fits` first: a cache of a billion keys, or attention maps
over 40,000 tokens, is refused up front with the size it would need, instead of an out-of-memory
traceback after minutes (or the machine swapping itself to a halt). Every forward asks
`check_forward` (a dense forward over 20,000 tokens with `attn_probs`, a perplexity
`recompute_batch` of a million windows): the limit is the memory available on the device (on the
CPU, also within the process's own limits: `ulimit -v`, a container's cgroup `memory.max`), so a
caller raises it by freeing memory or by asking for less at a time (a cache, `logits_to_keep`,
smaller batches).
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


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def process_limit_bytes() -> int | None:
    """What this process may still allocate under its own limits (None: none set): an address-space
    limit (`ulimit -v`, RLIMIT_AS) less what it already maps, and a cgroup v2 `memory.max` (a
    container's limit) less its `memory.current`. A machine's free memory says nothing of these."""
    found = []
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        mapped = _status_bytes("VmSize")
        if soft != resource.RLIM_INFINITY and mapped is not None:
            found.append(max(0, soft - mapped))
    except (ImportError, OSError, ValueError):  # pragma: no cover - not POSIX
        pass
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
                found.append(max(0, int(limit) - int(f.read())))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def available_bytes(device) -> int | None:
    """Memory that can still be allocated on `device` (None: unknown, then nothing is refused);
    on the CPU, also within the process's own limits (`process_limit_bytes`)."""
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind == "cpu":
        free, limit = _cpu_available_bytes(), process_limit_bytes()
        return limit if free is None else free if limit is None else min(free, limit)
    if kind == "cuda":
        import torch

        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):  # pragma: no cover - no usable CUDA
            return None
    return None


def _cpu_available_bytes() -> int | None:
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


CHECK_FORWARD_FROM = 1 << 28  # forwards estimated below 256 MiB are not measured against the device


def forward_bytes(model, batch: int, tokens: int, capacity: int | None, keep: int, probs: bool) -> int:
    """Working memory of one `model(...)` call over (batch, tokens) ids: the logits kept, one
    layer's attention scores (explicit in the core and under `attn_probs`; a bias mask under
    ALiBi) and activations of the largest piece, and every layer's probabilities under `attn_probs`.
    `capacity`: the cache's keys (sinks + window), None for the dense forward."""
    c = model.config
    elem = model.dtype.itemsize
    n = tokens if capacity is None else min(tokens, model.max_chunk)  # a cached forward runs in pieces
    ctx = n + (capacity or 0)  # keys a query of the largest piece can see
    explicit = probs or model.fast is None or c.zero_sink
    copies = 3 if explicit else 0 if c.positions == "rope" else 1
    need = copies * batch * c.num_heads * n * ctx * 4
    need += batch * n * (4 * c.hidden_size + 3 * c.intermediate_size) * elem
    need += (1 if capacity is None else 2) * batch * (keep or tokens) * c.vocab_size * max(elem, 4)
    if probs:
        need += c.num_layers * batch * c.num_heads * tokens * ctx * elem
    return need


def check_forward(model, batch: int, tokens: int, cache, keep: int, probs: bool, what: str = "") -> None:
    """Refuse a forward whose working memory (`forward_bytes`) passes what the device has."""
    capacity = None if cache is None else cache.sinks + cache.window
    need = forward_bytes(model, batch, tokens, capacity, keep, probs)
    if need > CHECK_FORWARD_FROM:
        check_fits(need, model.device, what or f"a forward over {batch} x {tokens} tokens"
                   f"{' with attn_probs' if probs else ''}{' without a cache' if cache is None else ''}")
