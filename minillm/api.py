"""The public functions: load a checkpoint or a tokenizer, save a model, name a dtype or a device."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import MiniLLMError
from .formats.families import load_config
from .model import Model

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


def load(name_or_path: str | Path, dtype=torch.float32, device="cpu", *, strict: bool = False) -> Model:
    """Load a checkpoint without transformers: a local directory or hub repo id (config.json +
    safetensors), or a `.gguf` file (dequantized into `dtype`; needs `pip install "minillm[gguf]"`).

    Config keys minillm does not know give one ConfigWarning naming them; `strict=True` makes
    that an error. Keys that would change the forward pass are refused by name either way."""
    from .formats.checkpoint import load_model
    from .formats.gguf import is_gguf
    from .formats.hub import resolve_model_dir

    if not isinstance(strict, bool):
        raise MiniLLMError(f"load: strict must be True or False, got {strict!r}")
    dtype, device = parse_dtype(dtype), parse_device(device)
    if device.type == "meta":  # the weights would load as shapes only, and every call would fail
        raise MiniLLMError(f"unsupported device {str(device)!r} for a model (use cpu, cuda, cuda:N or mps)")
    if is_gguf(name_or_path):
        from .formats.gguf import load_model as load_gguf

        model = load_gguf(name_or_path, dtype, device, strict=strict)
        model.source = str(name_or_path)
        return model
    directory = resolve_model_dir(name_or_path)
    config = load_config(directory, strict=strict)
    model = load_model(directory, config, dtype, device)
    model.source = str(name_or_path)
    return model


def load_tokenizer(name_or_path: str | Path):
    """tokenizer.json (tokenizers), tokenizer.model (sentencepiece) or a .gguf file: .encode / .decode."""
    from .formats.tokenizer import load_tokenizer as _load

    return _load(name_or_path)


def save_pretrained(model: Model, directory: str | Path, dtype=None) -> Path:
    """Write the model as config.json + model.safetensors in its family's Hugging Face format."""
    from .formats.checkpoint import save_pretrained as _save

    return _save(model, directory, None if dtype is None else parse_dtype(dtype))
