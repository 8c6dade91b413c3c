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
import os
import re
from pathlib import Path

import torch

from ..errors import MiniLLMError, first_line
from ..core.config import ModelConfig
from ..progress import report
from .families import FAMILIES, to_hf_config
from .reading import check_input, is_present, read_json, safe_path_in

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


def layer_name(c: ModelConfig, i: int, ours: str) -> str | tuple[str, ...] | None:
    """The checkpoint name(s) of parameter `ours` (relative to `layers.{i}.`) of layer i, or None."""
    wm = FAMILIES[c.family].weight_map(c)
    theirs = wm["layer"].get(ours)
    if theirs is None:
        return None
    prefix = wm["layer_prefix"].format(i=i)
    return tuple(prefix + t for t in theirs) if isinstance(theirs, tuple) else prefix + theirs


def name_pairs(c: ModelConfig) -> dict[str, str | tuple[str, ...]]:
    """Every possible engine parameter name -> its checkpoint name(s), layers expanded.

    Its size grows with num_layers: a loader calls it only once the checkpoint is known to hold
    that many layers (see `check_layers`)."""
    wm = FAMILIES[c.family].weight_map(c)
    pairs = dict(wm["global"])
    for i in range(c.num_layers):
        prefix = wm["layer_prefix"].format(i=i)
        for ours, theirs in wm["layer"].items():
            pairs[f"layers.{i}.{ours}"] = (tuple(prefix + t for t in theirs) if isinstance(theirs, tuple)
                                           else prefix + theirs)
    return pairs


def check_layers(config: ModelConfig, names: set[str], declared: str) -> None:
    """Refuse a config that declares more layers than the checkpoint holds, before anything is
    built for them: the work is bounded by the number of tensors the file really has (a config
    or GGUF claiming 10^9 layers is refused at once). `declared` says where the count came from."""
    n = config.num_layers
    held = 0
    # Each layer has its own output projection, so a file with N tensors holds at most N layers.
    limit = min(n, len(names))
    while held < limit:
        probe = layer_name(config, held, "attn.wo.weight")
        if probe is None or probe not in names:
            break
        held += 1
    if held < n:
        missing = layer_name(config, held, "attn.wo.weight")
        raise MiniLLMError(f"{declared} {n} layers, but the checkpoint holds tensors for {held} "
                           f"(missing tensor {missing})")


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: the shards its index lists (each a regular
    file inside the directory), model.safetensors, or else every *.safetensors file."""
    return _checkpoint_files(directory)[0]


def _checkpoint_files(directory: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """(files, the index's tensor -> shard map or None)."""
    index = directory / INDEX_FILE
    if is_present(index):
        data = read_json(index, what="safetensors index", expect_object=False)
        if not isinstance(data, dict) or "weight_map" not in data:
            raise MiniLLMError(f"{index}: invalid safetensors index (expected an object with a \"weight_map\")")
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise MiniLLMError(f"{index}: invalid safetensors index (\"weight_map\" must be an object of "
                               f"tensor name -> shard file, got {type(weight_map).__name__})")
        if not weight_map:
            raise MiniLLMError(f"{index}: invalid safetensors index (\"weight_map\" lists no tensors)")
        where = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str):
                raise MiniLLMError(f"{index}: invalid safetensors index (the shard of {name[:80]} must be a file "
                                   f"name, got {json.dumps(shard)[:60]})")
            where[name] = safe_path_in(directory, shard, f"{index}: weight_map[{name[:80]!r}]")
        files = sorted(set(where.values()))
        for f in files:
            if not os.path.lexists(f):
                raise MiniLLMError(f"{index} names a missing shard: {f.relative_to(directory)}")
            check_input(f)
        return files, where
    single = directory / SINGLE_FILE
    if is_present(single):
        check_input(single)
        return [single], None
    others = sorted(p for p in directory.glob("*.safetensors"))
    if others:
        for f in others:
            check_input(f)
        return others, None
    if list(directory.glob("pytorch_model*.bin")):
        raise MiniLLMError(f"{directory} has only pytorch_model*.bin; minillm reads safetensors only. "
                           f"Convert it with: python tools/convert_bin.py {directory}")
    raise MiniLLMError(f"no model.safetensors or {INDEX_FILE} in {directory}")


class _Tensors:
    """Lazy access to the tensors of one or more safetensors files.

    Every tensor name is unique across the files (a second copy would silently replace the
    first), and with an index each tensor is in the shard the index names, and the index names
    every tensor the shards hold."""

    def __init__(self, files: list[Path], index: dict[str, Path] | None = None, index_path: Path | None = None):
        from safetensors import safe_open

        self.where: dict[str, Path] = {}
        self.handles = {}
        self.declared_layers = "config.json declares"
        for f in files:
            check_input(f)  # a FIFO would block inside the library, out of Ctrl-C's reach
            try:
                handle = safe_open(str(f), framework="pt", device="cpu")
                names = list(handle.keys())
            except Exception as e:  # safetensors raises its own error type for corrupt headers
                raise MiniLLMError(f"{f.name}: not a valid safetensors file ({first_line(e)})") from None
            self.handles[f] = handle
            for name in names:
                if name in self.where:
                    raise MiniLLMError(f"tensor {name} appears twice: in {self.where[name].name} and in {f.name} "
                                       "(a checkpoint holds each tensor once)")
                self.where[name] = f
        if index is not None:
            for name, f in self.where.items():
                if name not in index:
                    raise MiniLLMError(f"{index_path}: {f.name} holds tensor {name}, which the index does not list")
                if index[name] != f:
                    raise MiniLLMError(f"{index_path}: lists tensor {name} in {index[name].name}, but it is in "
                                       f"{f.name}")
            for name, f in index.items():
                if name not in self.where:
                    raise MiniLLMError(f"{index_path}: lists tensor {name[:80]} in {f.name}, which does not hold it")

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

    # Slices, for a tensor-parallel shard (minillm/parallel/): only these bytes are read.
    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.handles[self.where[name]].get_slice(name).get_shape())

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._slice(name, lambda s: s[start:stop])

    def get_cols(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._slice(name, lambda s: s[:, start:stop])

    def _slice(self, name, take) -> torch.Tensor:
        f = self.where[name]
        try:
            return take(self.handles[f].get_slice(name))
        except Exception as e:
            raise MiniLLMError(f"{f.name}: cannot read a slice of tensor {name} ({first_line(e)})") from None



def load_model(directory: Path, config: ModelConfig, dtype: torch.dtype, device: torch.device, build=None):
    """A safetensors checkpoint directory -> the model, built by `build(tensors, config, dtype,
    device)`: `load_tensors` by default, a tensor-parallel shard's loader (minillm/parallel/) for one rank."""
    files, index = _checkpoint_files(directory)
    tensors = _Tensors(files, index, directory / INDEX_FILE)
    return (build or load_tensors)(tensors, config, dtype, device)


def load_tensors(tensors, config: ModelConfig, dtype: torch.dtype, device: torch.device, make=None):
    """Build the model on the meta device and assign a tensor source's tensors, strictly.

    `tensors` has `names()` (Hugging Face names), `get(name)` and `describe(name)` (the name as the
    file spells it, for errors): safetensors files here, a GGUF file in `gguf.py`. `make(config)`
    builds the model (default: `Model`; a tensor-parallel shard's in minillm/parallel/)."""
    from ..core.model import Model

    names = tensors.names()
    family = FAMILIES[config.family]
    adjust = getattr(family, "adjust_to_checkpoint", None)
    if adjust is not None:
        config = adjust(config, names)
    check_layers(config, names, getattr(tensors, "declared_layers", "the config declares"))
    pairs = name_pairs(config)
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated, whatever the sizes
            model = (make or Model)(config)
    except (RuntimeError, OverflowError, ValueError) as e:  # a product of sizes past what torch can index
        raise MiniLLMError(f"the config's sizes (hidden_size {config.hidden_size}, {config.num_heads} heads of "
                           f"{config.head_dim}, vocab_size {config.vocab_size}, intermediate_size "
                           f"{config.intermediate_size}) make a tensor too large to exist ({first_line(e)})") from None
    expected = {k: v.shape for k, v in model.state_dict().items()}
    perm = qkv_permutation(config)

    state, used = {}, set()
    for done, (ours, shape) in enumerate(expected.items()):
        report("tensors", done, len(expected))
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
    report("tensors", len(expected), len(expected))
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
