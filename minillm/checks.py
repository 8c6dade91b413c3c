"""Argument checks of the library: integers, dtypes and devices (the CLI has its own argparse types).

`check_int("window", window, 1)` returns `window` if it is an int (a bool is not) of at least 1,
and otherwise raises a MiniLLMError that names the argument, the rule and the value given.
"""

from __future__ import annotations

import os

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


def check_path(name: str, value):
    """A path (str or os.PathLike, not empty, no NUL byte), returned as given; None, a number or
    a tensor is refused by name (open() would raise a bare TypeError)."""
    if isinstance(value, os.PathLike):
        value_s = os.fspath(value)
    elif isinstance(value, str):
        value_s = value
    else:
        raise MiniLLMError(f"{name} must be a path (a str or os.PathLike), got {type(value).__name__}")
    if not isinstance(value_s, str) or not value_s.strip() or "\0" in value_s:
        raise MiniLLMError(f"{name} must be a non-empty path without NUL bytes, got {value!r:.80}")
    return value


def check_bool(name: str, value) -> bool:
    """A flag must be True or False: "no" or [] would be read by their truth."""
    if not isinstance(value, bool):
        raise MiniLLMError(f"{name} must be True or False, got {value!r:.80}")
    return value


def check_tokenizer(tokenizer, what: str = "tokenizer") -> None:
    """A tokenizer is anything with encode, decode and eos_ids (minillm.load_tokenizer's, duck-typed)."""
    if not all(hasattr(tokenizer, a) for a in ("encode", "decode", "eos_ids")):
        raise MiniLLMError(f"{what} must be a tokenizer (from minillm.load_tokenizer), got {type(tokenizer).__name__}")


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
    """One of the dtypes the engine runs (float32, float64, bfloat16, float16), by name or as a
    torch.dtype; any other (float8, an integer type) is refused up front, by name."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise MiniLLMError(f"dtype {dtype} is not supported (use one of float32, bfloat16, float16, float64)")
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
