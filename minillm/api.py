"""The public functions: load a checkpoint or a tokenizer, save a model, name a dtype or a device."""

from __future__ import annotations

from pathlib import Path

import torch

from .checks import DTYPES, check_model, check_path, parse_device, parse_dtype  # noqa: F401  (public here)
from .errors import MiniLLMError
from .formats.families import load_config
from .core.model import Model


def load(name_or_path: str | Path, dtype=torch.float32, device="cpu", *, strict: bool = False,
         fast: bool = True, quantize: str | None = None, compile: bool = False,
         tensor_parallel: bool = False) -> Model:
    """Load a checkpoint without transformers: a local directory or hub repo id (config.json +
    safetensors), or a `.gguf` file (dequantized into `dtype`; needs the `gguf` package: `pip install gguf`,
    the `minillm-sinks[gguf]` extra).

    Config keys minillm does not know give one ConfigWarning naming them; `strict=True` makes
    that an error. Keys that would change the forward pass are refused by name either way.

    `fast=True` (the default) gives the model minillm's fast layer (minillm/fast/: SDPA kernels,
    the decode step, the CPU weight layout), held equal to the core by the tests; `fast=False`
    runs the core (minillm/core/) alone, and no code of minillm/fast/ is imported.
    `quantize="int8"` then quantizes the weights (`minillm.quantize_int8`), and `compile=True`
    compiles the decode step (`minillm.compile_decode`), both parts of the fast layer.

    The model is for inference: its parameters need no gradients (`model.requires_grad_(True)`
    to train it). `model.eos_ids` holds the ids that end a reply (EOS and the chat template's
    end-of-turn token, minillm/formats/stops.py), where generation stops by default.

    `tensor_parallel=True`, inside an initialised torch.distributed process group of W ranks
    (torchrun; gloo or NCCL), returns this rank's shard: its share of the query heads, KV heads and
    MLP width, read from its own slices of the file (minillm/parallel/). Every call then works as
    in one process, on every rank, each returning the full logits. `model.config` is the shard's
    (its heads and width); `model.shard.config` is the whole model's."""
    from .formats.checkpoint import load_model
    from .formats.gguf import is_gguf
    from .formats.hub import resolve_model_dir
    from .formats.stops import directory_stop_ids

    check_path("load: name_or_path", name_or_path)
    for name, flag in (("strict", strict), ("fast", fast), ("compile", compile), ("tensor_parallel", tensor_parallel)):
        if not isinstance(flag, bool):
            raise MiniLLMError(f"load: {name} must be True or False, got {flag!r}")
    if quantize not in (None, "int8"):
        raise MiniLLMError(f"load: quantize must be None or 'int8', got {quantize!r}")
    if not fast and (quantize or compile):
        raise MiniLLMError(f"load: fast=False runs the core alone; {'quantize' if quantize else 'compile'} "
                           f"belongs to the fast layer (drop one of them)")
    dtype, device = parse_dtype(dtype), parse_device(device)
    if device.type == "meta":  # the weights would load as shapes only, and every call would fail
        raise MiniLLMError(f"unsupported device {str(device)!r} for a model (use cpu, cuda, cuda:N or mps)")
    build = None  # the formats' own loader: the whole model
    if tensor_parallel:
        from . import parallel

        build = parallel.load_shard  # this rank's shard, from its own slices
        parallel.current_group()  # refused at once without a process group
        parallel.LOADING.clear()
    try:
        if is_gguf(name_or_path):
            from .formats.gguf import load_model as load_gguf

            model = load_gguf(name_or_path, dtype, device, strict=strict, build=build)
        else:
            directory = resolve_model_dir(name_or_path)
            model = load_model(directory, load_config(directory, strict=strict), dtype, device, build)
            model.eos_ids = directory_stop_ids(directory, model.config.vocab_size)
    except MiniLLMError as e:
        if tensor_parallel and not parallel.LOADING:  # failed before the ranks met: tell the others
            parallel.share_failure(str(e))
        raise
    model.source = str(name_or_path)
    if fast:
        from .fast import enable

        enable(model)
    if quantize == "int8":
        from .fast.quant import quantize_int8

        quantize_int8(model)
    if compile:
        from .fast import compile_decode

        compile_decode(model)
    return model


def load_tokenizer(name_or_path: str | Path):
    """tokenizer.json (tokenizers), tokenizer.model (sentencepiece) or a .gguf file: .encode / .decode."""
    from .formats.tokenizer import load_tokenizer as _load

    return _load(check_path("load_tokenizer: name_or_path", name_or_path))


def save_pretrained(model: Model, directory: str | Path, dtype=None, *, tokenizer=None) -> Path:
    """Write the model as config.json + model.safetensors in its family's Hugging Face format,
    into `directory` (made if missing; an existing file there is refused, never replaced); with
    `tokenizer=`, its files and chat template too (`tokenizer.save_pretrained`), so the directory is
    a whole checkpoint for `minillm.load` and `minillm.load_tokenizer`."""
    import os

    from .formats.checkpoint import save_pretrained as _save
    from .formats.tokenizer import Tokenizer

    check_model(model)
    check_path("save_pretrained: directory", directory)
    if getattr(model, "shard", None) is not None:  # its config and weights are one rank's share
        raise MiniLLMError(f"save_pretrained: this model is rank {model.shard.rank}'s shard of {model.shard.world} "
                           f"(tensor_parallel=True); save a model loaded without tensor_parallel")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise MiniLLMError(f"save_pretrained: {os.fspath(directory)} exists and is not a directory; give a "
                           f"directory to write config.json and model.safetensors into")
    if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
        raise MiniLLMError(f"save_pretrained: tokenizer must be a minillm Tokenizer (from minillm.load_tokenizer), "
                           f"got {type(tokenizer).__name__}")
    dtype = None if dtype is None else parse_dtype(dtype)
    try:
        out = _save(model, directory, dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    except OSError as e:  # a parent that is a file, no permission, a full disk
        raise MiniLLMError(f"save_pretrained: cannot write {os.fspath(directory)}: {e.strerror or e}") from None
    return out
