"""Convert a checkpoint's pytorch_model*.bin weights to safetensors, which is all minillm reads.

    python tools/convert_bin.py DIR [--out OUT]

Reads DIR/pytorch_model.bin, or the shards listed in DIR/pytorch_model.bin.index.json, and writes
OUT/model.safetensors, or OUT/model-0000i-of-0000n.safetensors + OUT/model.safetensors.index.json
(OUT defaults to DIR). When OUT is another directory, the small config and tokenizer files are
copied along, so OUT is a complete model directory.

The .bin files are pickles: they are loaded with `torch.load(..., weights_only=True)`, which only
rebuilds tensors and plain containers and refuses any other object, so converting an untrusted
checkpoint cannot run its code. Tensors that share storage (tied embeddings) are cloned, since
safetensors refuses shared storage. Errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import sys
from pathlib import Path

import torch

SINGLE_BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
SINGLE_ST = "model.safetensors"
ST_INDEX = "model.safetensors.index.json"
# Copied to --out so that it is a loadable model directory on its own.
SIDE_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
]


class ConvertError(Exception):
    """A problem with the input, explained in one line."""


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} state dict from one .bin file, without unpickling arbitrary objects."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _unpickler_detail(str(e))
        if "Unsupported global" in detail:
            # weights_only=True refused a class or function: the file is not plain tensors.
            raise ConvertError(
                f"refusing to load {path}: it holds objects other than tensors ({detail})"
            ) from None
        raise ConvertError(f"cannot read {path}: not a torch weights file ({detail})") from None
    except Exception as e:  # a truncated zip, an unreadable file, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(f"cannot read {path}: {first}") from None
    if not isinstance(sd, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()
    ):
        raise ConvertError(f"{path} is not a flat state dict of named tensors")
    return sd


def _unpickler_detail(message: str) -> str:
    """The one useful sentence of torch's long weights_only error, on one line."""
    detail = message.partition("WeightsUnpickler error:")[2] or message
    detail = " ".join(detail.split())  # one line
    for cut in (" Please use", " Check the documentation"):
        detail = detail.partition(cut)[0]
    return detail.strip() or "unsupported pickle content"


def unshare(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors with no storage in common (what safetensors accepts)."""
    seen: set[int] = set()
    out = {}
    for name, t in sd.items():
        ptr = t.untyped_storage().data_ptr()
        # A second tensor on the same storage (e.g. lm_head tied to embed_tokens) gets a copy;
        # so does a non-contiguous view. Zero-size tensors have no storage to share.
        if (ptr in seen and t.numel() > 0) or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def save_st(sd: dict[str, torch.Tensor], path: Path) -> int:
    """Write one safetensors file; return the bytes of tensor data written."""
    from safetensors.torch import save_file

    sd = unshare(sd)
    save_file(sd, str(path), metadata={"format": "pt"})  # "pt": what transformers expects
    return sum(t.numel() * t.element_size() for t in sd.values())


def convert(src: Path, out: Path) -> list[Path]:
    """Convert src's .bin weights into out; return the files written."""
    if not src.is_dir():
        raise ConvertError(f"not a directory: {src}")
    out.mkdir(parents=True, exist_ok=True)
    for existing in (out / SINGLE_ST, out / ST_INDEX):
        if existing.exists():
            raise ConvertError(f"{existing} already exists; remove it or choose another --out")

    written: list[Path] = []
    if (src / BIN_INDEX).is_file():
        written += _convert_sharded(src, out)
    elif (src / SINGLE_BIN).is_file():
        save_st(load_bin(src / SINGLE_BIN), out / SINGLE_ST)
        written.append(out / SINGLE_ST)
    else:
        raise ConvertError(f"no {SINGLE_BIN} or {BIN_INDEX} in {src}")

    if out.resolve() != src.resolve():
        for name in SIDE_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, out / name)
                written.append(out / name)
    return written


def _convert_sharded(src: Path, out: Path) -> list[Path]:
    index_path = src / BIN_INDEX
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        assert isinstance(weight_map, dict)
    except Exception:
        raise ConvertError(f"{index_path} has no valid 'weight_map'") from None
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if "/" in shard or "\\" in shard or not (src / shard).is_file():
            raise ConvertError(f"{index_path} lists a missing shard: {shard}")

    new_map: dict[str, str] = {}
    total = 0
    written = []
    for i, shard in enumerate(shards, start=1):
        sd = load_bin(src / shard)
        expected = {k for k, v in weight_map.items() if v == shard}
        if set(sd) != expected:
            extra, missing = sorted(set(sd) - expected), sorted(expected - set(sd))
            raise ConvertError(
                f"{src / shard} does not match {BIN_INDEX}: "
                f"unlisted {extra[:3]}, missing {missing[:3]}"
            )
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += save_st(sd, out / name)
        new_map.update({k: name for k in sd})
        written.append(out / name)
        del sd  # one shard in memory at a time

    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(new_map.items()))}
    (out / ST_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [*written, out / ST_INDEX]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="convert_bin", description="Convert pytorch_model*.bin weights to safetensors."
    )
    parser.add_argument("dir", type=Path, help="model directory holding pytorch_model*.bin")
    parser.add_argument("--out", type=Path, help="output directory (default: DIR)")
    args = parser.parse_args(argv)
    try:
        written = convert(args.dir, args.out or args.dir)
    except (ConvertError, OSError) as e:
        print(f"convert_bin: error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
