"""The public functions: load a checkpoint or a tokenizer, save a model, name a dtype or a device."""

from __future__ import annotations

from pathlib import Path

import torch

from .checks import DTYPES, check_model, check_path, parse_device, parse_dtype  # noqa: F401  (public here)
from .errors import MiniLLMError
from .formats.families import load_config
from .core.model import Model


def load(name_or_path: str | Path, dtype=torch.float32, device="cpu", *, strict: bool = False,
         fast: bool = True) -> Model:
    """Load a checkpoint without transformers: a local directory or hub repo id (config.json +
    safetensors), or a `.gguf` file (dequantized into `dtype`; needs `pip install "minillm[gguf]"`).

    Config keys minillm does not know give one ConfigWarning naming them; `strict=True` makes
    that an error. Keys that would change the forward pass are refused by name either way.

    `fast=True` (the default) gives the model minillm's fast layer (minillm/fast/: SDPA kernels,
    the decode step, the CPU weight layout), held equal to the core by the tests; `fast=False`
    runs the core (minillm/core/) alone, and no code of minillm/fast/ is imported."""
    from .formats.checkpoint import load_model
    from .formats.gguf import is_gguf
    from .formats.hub import resolve_model_dir

    check_path("load: name_or_path", name_or_path)
    for name, flag in (("strict", strict), ("fast", fast)):
        if not isinstance(flag, bool):
            raise MiniLLMError(f"load: {name} must be True or False, got {flag!r}")
    dtype, device = parse_dtype(dtype), parse_device(device)
    if device.type == "meta":  # the weights would load as shapes only, and every call would fail
        raise MiniLLMError(f"unsupported device {str(device)!r} for a model (use cpu, cuda, cuda:N or mps)")
    if is_gguf(name_or_path):
        from .formats.gguf import load_model as load_gguf

        model = load_gguf(name_or_path, dtype, device, strict=strict)
    else:
        directory = resolve_model_dir(name_or_path)
        model = load_model(directory, load_config(directory, strict=strict), dtype, device)
    model.source = str(name_or_path)
    if fast:
        from .fast import enable

        enable(model)
    return model


def load_tokenizer(name_or_path: str | Path):
    """tokenizer.json (tokenizers), tokenizer.model (sentencepiece) or a .gguf file: .encode / .decode."""
    from .formats.tokenizer import load_tokenizer as _load

    return _load(check_path("load_tokenizer: name_or_path", name_or_path))


def save_pretrained(model: Model, directory: str | Path, dtype=None) -> Path:
    """Write the model as config.json + model.safetensors in its family's Hugging Face format,
    into `directory` (made if missing; an existing file there is refused, never replaced)."""
    import os

    from .formats.checkpoint import save_pretrained as _save

    check_model(model)
    check_path("save_pretrained: directory", directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise MiniLLMError(f"save_pretrained: {os.fspath(directory)} exists and is not a directory; give a "
                           f"directory to write config.json and model.safetensors into")
    dtype = None if dtype is None else parse_dtype(dtype)
    try:
        return _save(model, directory, dtype)
    except OSError as e:  # a parent that is a file, no permission, a full disk
        raise MiniLLMError(f"save_pretrained: cannot write {os.fspath(directory)}: {e.strerror or e}") from None
