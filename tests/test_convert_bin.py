"""Tests for tools/convert_bin.py: .bin -> safetensors, single and sharded, and refusing pickles."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

TOOL = Path(__file__).resolve().parents[1] / "tools" / "convert_bin.py"
_spec = importlib.util.spec_from_file_location("convert_bin", TOOL)
convert_bin = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_bin)


def _state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(10, 4, generator=g)
    qkv = torch.randn(12, 4, generator=g)
    return {
        "embed.weight": emb,
        "lm_head.weight": emb,  # tied: same storage
        "q.weight": qkv[:4],  # views into one fused tensor
        "k.weight": qkv[4:8],
        "v.weight": qkv[8:].t(),  # ... one of them non-contiguous
        "norm.weight": torch.ones(4, dtype=torch.bfloat16),
        "step": torch.tensor(3, dtype=torch.int64),
        "empty": torch.zeros(0),
    }


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_single_file(tmp_path, capsys):
    sd = _state_dict()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    out = tmp_path / "out"
    assert convert_bin.main([str(tmp_path), "--out", str(out)]) == 0
    _assert_same(load_file(out / "model.safetensors"), sd)
    assert (out / "config.json").read_text() == '{"model_type": "llama"}'  # copied along
    assert "model.safetensors" in capsys.readouterr().out
    # In place (default --out), then refusing to overwrite.
    assert convert_bin.main([str(tmp_path)]) == 0
    _assert_same(load_file(tmp_path / "model.safetensors"), sd)
    assert convert_bin.main([str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_sharded(tmp_path):
    sd = _state_dict()
    names = list(sd)
    shards = {
        "pytorch_model-00001-of-00002.bin": names[:3],
        "pytorch_model-00002-of-00002.bin": names[3:],
    }
    for file, keys in shards.items():
        torch.save({k: sd[k] for k in keys}, tmp_path / file)
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert convert_bin.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0

    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    got = {}
    for file in set(index["weight_map"].values()):
        got |= load_file(tmp_path / "out" / file)
    _assert_same(got, sd)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())


def test_shard_not_matching_index(tmp_path, capsys):
    torch.save({"a": torch.ones(2)}, tmp_path / "s1.bin")
    index = {"weight_map": {"b": "s1.bin"}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert convert_bin.main([str(tmp_path)]) == 2
    assert "does not match pytorch_model.bin.index.json" in capsys.readouterr().err


def test_errors(tmp_path, capsys):
    assert convert_bin.main([str(tmp_path)]) == 2
    assert "no pytorch_model.bin or pytorch_model.bin.index.json in" in capsys.readouterr().err
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a torch file")
    assert convert_bin.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("convert_bin: error: cannot read") and err.count("\n") == 1, err
    torch.save([torch.ones(1)], tmp_path / "pytorch_model.bin")  # loads fine, but not a dict
    assert convert_bin.main([str(tmp_path)]) == 2
    assert "not a flat state dict" in capsys.readouterr().err


class _Payload:
    """Unpickling this would call print(): stands for any code a malicious pickle could run."""

    def __reduce__(self):
        return (print, ("UNPICKLED",))


def test_refuses_arbitrary_objects(tmp_path):
    torch.save({"w": torch.ones(2), "obj": _Payload()}, tmp_path / "pytorch_model.bin")
    proc = subprocess.run(
        [sys.executable, str(TOOL), str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("convert_bin: error: refusing to load")
    assert "objects other than tensors (Unsupported global: GLOBAL print" in proc.stderr
    assert proc.stderr.count("\n") == 1 and "UNPICKLED" not in proc.stdout
    assert not (tmp_path / "model.safetensors").exists()
