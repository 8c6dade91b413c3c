"""Hugging Face checkpoints <-> minillm state dicts, strictly, through each family's name map.

Loading reads `model.safetensors` or a sharded `model.safetensors.index.json` (never a pickle),
builds the model on the meta device and assigns the converted tensors, so no random
initialisation is ever materialised. It is strict: every checkpoint tensor is used or matched by
the family's IGNORED patterns, every parameter is filled with its exact shape, and each error names
the offending tensor.

Fused QKV layouts are a permutation of rows: `qkv_permutation(config)` gives, for the engine's
[q; k; v] rows, the checkpoint row each comes from. Saving applies its inverse.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import MiniLLMError, first_line
from ..core.config import ModelConfig
from .families import FAMILIES, to_hf_config

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def qkv_permutation(c: ModelConfig) -> torch.Tensor | None:
    """Rows of the checkpoint's fused QKV that make the engine's [q; k; v], or None if already so."""
    H, KV, hd = c.num_heads, c.num_kv_heads, c.head_dim
    if c.qkv_layout == "split":
        return None
    rows = torch.arange((H + 2 * KV) * hd)
    if c.qkv_layout == "interleaved":  # (H, 3, hd): per head q, k, v
        return rows.view(H, 3, hd).transpose(0, 1).reshape(-1)
    if c.qkv_layout == "grouped":  # (KV, H/KV + 2, hd): per group, its queries, then k, then v
        g = H // KV
        grouped = rows.view(KV, g + 2, hd)
        return torch.cat([grouped[:, :g].reshape(-1), grouped[:, g].reshape(-1), grouped[:, g + 1].reshape(-1)])
    raise MiniLLMError(f"unknown qkv_layout {c.qkv_layout!r}")


def name_pairs(c: ModelConfig) -> dict[str, str | tuple[str, ...]]:
    """Every possible engine parameter name -> its checkpoint name(s), layers expanded."""
    wm = FAMILIES[c.family].weight_map(c)
    pairs = dict(wm["global"])
    for i in range(c.num_layers):
        prefix = wm["layer_prefix"].format(i=i)
        for ours, theirs in wm["layer"].items():
            pairs[f"layers.{i}.{ours}"] = (tuple(prefix + t for t in theirs) if isinstance(theirs, tuple)
                                           else prefix + theirs)
    return pairs


def checkpoint_files(directory: Path) -> list[Path]:
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise MiniLLMError(f"{index}: invalid safetensors index ({e})") from None
        files = [directory / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise MiniLLMError(f"{index} names a missing shard: {f.name}")
        return files
    single = directory / SINGLE_FILE
    if single.is_file():
        return [single]
    others = sorted(p.name for p in directory.glob("*.safetensors"))
    if others:
        return [directory / p for p in others]
    if list(directory.glob("pytorch_model*.bin")):
        raise MiniLLMError(f"{directory} has only pytorch_model*.bin; minillm reads safetensors only. "
                           f"Convert it with: python tools/convert_bin.py {directory}")
    raise MiniLLMError(f"no model.safetensors or {INDEX_FILE} in {directory}")


class _Tensors:
    """Lazy access to the tensors of one or more safetensors files."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self.where: dict[str, Path] = {}
        self.handles = {}
        for f in files:
            try:
                handle = safe_open(str(f), framework="pt", device="cpu")
                names = list(handle.keys())
            except Exception as e:  # safetensors raises its own error type for corrupt headers
                raise MiniLLMError(f"{f.name}: not a valid safetensors file ({first_line(e)})") from None
            self.handles[f] = handle
            for name in names:
                self.where[name] = f

    def names(self) -> set[str]:
        return set(self.where)

    def describe(self, name: str) -> str:
        return name

    def get(self, name: str) -> torch.Tensor:
        f = self.where[name]
        try:
            return self.handles[f].get_tensor(name)
        except Exception as e:
            raise MiniLLMError(f"{f.name}: cannot read tensor {name} ({first_line(e)})") from None



def load_model(directory: Path, config: ModelConfig, dtype: torch.dtype, device: torch.device):
    """A safetensors checkpoint directory -> the model (see `load_tensors`)."""
    return load_tensors(_Tensors(checkpoint_files(directory)), config, dtype, device)


def load_tensors(tensors, config: ModelConfig, dtype: torch.dtype, device: torch.device):
    """Build the model on the meta device and assign a tensor source's tensors, strictly.

    `tensors` has `names()` (Hugging Face names), `get(name)` and `describe(name)` (the name as the
    file spells it, for errors): safetensors files here, a GGUF file in `gguf.py`."""
    from ..core.model import Model

    names = tensors.names()
    family = FAMILIES[config.family]
    adjust = getattr(family, "adjust_to_checkpoint", None)
    if adjust is not None:
        config = adjust(config, names)
    pairs = name_pairs(config)
    # Every layer's tensors must exist before a model of that many layers is built (a config that
    # claims 100,000 layers is then refused at once, not after minutes of building).
    for i in range(config.num_layers):
        probe = pairs.get(f"layers.{i}.attn.wo.weight")
        if probe is not None and probe not in names:
            raise MiniLLMError(f"checkpoint is missing tensor {probe} (layer {i} of the {config.num_layers} "
                               "the config declares)")
    with torch.device("meta"):
        model = Model(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    perm = qkv_permutation(config)

    state, used = {}, set()
    for ours, shape in expected.items():
        theirs = pairs[ours]
        parts = theirs if isinstance(theirs, tuple) else (theirs,)
        for name in parts:
            if name not in names:
                raise MiniLLMError(f"checkpoint is missing tensor {name} (for {ours})")
        loaded = [tensors.get(name) for name in parts]
        for name, t in zip(parts, loaded):
            if not t.dtype.is_floating_point:  # an integer or bool tensor cast to float is garbage
                raise MiniLLMError(f"tensor {tensors.describe(name)} has dtype {str(t.dtype).removeprefix('torch.')}, "
                                   "expected a floating-point weight")
        if len(loaded) > 1 and len({t.shape[1:] for t in loaded} | {tuple(shape[1:])}) > 1:
            raise MiniLLMError(f"tensors {' + '.join(map(tensors.describe, parts))} have shapes "
                               f"{', '.join(str(tuple(t.shape)) for t in loaded)}; each must be "
                               f"(rows, {', '.join(map(str, shape[1:]))}) for this config")
        t = loaded[0] if len(loaded) == 1 else torch.cat(loaded, dim=0)
        if ".attn.wqkv." in ours and perm is not None and t.shape[0] == perm.numel():
            t = t[perm]
        if tuple(t.shape) != tuple(shape):
            raise MiniLLMError(f"tensor {' + '.join(map(tensors.describe, parts))} has shape {tuple(t.shape)}, "
                               f"expected {tuple(shape)} for this config")
        state[ours] = t.to(device=device, dtype=dtype)
        used.update(parts)

    ignored = [re.compile(p) for p in family.IGNORED]
    if config.tie_word_embeddings:  # a tied head is the embedding; a stored copy is ignored
        ignored.append(re.compile(re.escape(pairs["lm_head.weight"])))
    for name in sorted(names - used):
        if not any(p.fullmatch(name) for p in ignored):
            raise MiniLLMError(f"unexpected tensor {tensors.describe(name)} in checkpoint (not used by a "
                               f"{config.family} model with this config)")
    model.load_state_dict(state, strict=True, assign=True)
    # A loaded model is for inference: no parameter asks for a gradient, so a forward records no
    # autograd graph (the README's loop would otherwise keep every step's graph alive). Training
    # turns them back on (`model.requires_grad_(True)`), as tools/train.py's fresh models have them.
    return model.requires_grad_(False).eval()


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights under the family's checkpoint names and fused layouts."""
    if getattr(model, "quantized", None):
        raise MiniLLMError(f"this model was quantized ({model.quantized}) in memory; save the float model instead "
                           f"(checkpoints are written in float)")
    c = model.config
    pairs = name_pairs(c)
    perm = qkv_permutation(c)
    out = {}
    for ours, t in model.state_dict().items():
        t = t.detach()
        if ".attn.wqkv." in ours and perm is not None:
            t = t[torch.argsort(perm)]
        theirs = pairs[ours]
        if isinstance(theirs, tuple):  # split the fused rows back into q/k/v (or gate/up)
            if ".attn.wqkv." in ours:
                sizes = [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim]
            else:
                sizes = [t.shape[0] // len(theirs)] * len(theirs)
            for name, piece in zip(theirs, t.split(sizes, dim=0)):
                out[name] = piece.contiguous()
        else:
            out[theirs] = t.contiguous()
    return out


def save_pretrained(model, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write config.json + model.safetensors in the family's Hugging Face format."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf = to_hf_config(model.config)
    state = hf_state_dict(model)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    hf["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
    save_file({k: v.cpu() for k, v in state.items()}, str(directory / SINGLE_FILE), metadata={"format": "pt"})
    return directory
