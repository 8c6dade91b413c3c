"""Argument checks of the library: integers, dtypes and devices (the CLI has its own argparse types).

`check_int("window", window, 1)` returns `window` if it is an int (a bool is not) of at least 1,
and otherwise raises a MiniLLMError that names the argument, the rule and the value given.
"""

from __future__ import annotations

import torch

from .errors import MiniLLMError


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None, *,
              none_ok: bool = False, hint: str = ""):
    if value is None and none_ok:
        return None
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum):
        return value
    rule = "an integer"
    if minimum is not None and maximum is not None:
        rule += f" in [{minimum}, {maximum}]"
    elif minimum is not None:
        rule += f" >= {minimum}"
    elif maximum is not None:
        rule += f" <= {maximum}"
    raise MiniLLMError(f"{name} must be {rule}{' or None' if none_ok else ''}{hint}, got {value!r}")


def check_model(model, what: str = "model") -> None:
    """A model is anything called like minillm's Model with a config and new_cache (duck-typed,
    so wrappers and test doubles pass); a tokenizer, a path or None is refused by name."""
    if not (callable(model) and hasattr(model, "config") and hasattr(model, "new_cache")):
        raise MiniLLMError(f"{what} must be a minillm Model (from minillm.load), got {type(model).__name__}")


DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype.is_floating_point:
            return dtype
    elif isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.lower().removeprefix("torch.")]
    raise MiniLLMError(f"unknown dtype {dtype!r} (use one of float32, bfloat16, float16, float64)")


def parse_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise MiniLLMError(f"unknown device {device!r} (use cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MiniLLMError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise MiniLLMError(f"device {device!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise MiniLLMError(f"device {device!r} requested but MPS is not available")
    return dev


def tracing() -> bool:
    """Whether torch.compile is tracing the caller (`torch.compile(model)`). A check that reads a
    tensor's values (a token id out of range) would break the graph there, so the model skips it
    while traced: out-of-range ids then fail in the embedding, as in transformers' compiled models."""
    return torch.compiler.is_compiling()
