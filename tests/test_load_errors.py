"""Bad input to `minillm.load`: each case gets a one-line MiniLLMError that names the problem.

A valid tiny checkpoint is written with `minillm.save_pretrained` and then broken in one way per
test: the directory, config.json, the safetensors files (tensors missing, extra, mis-shaped,
truncated, corrupt), a pickle-only directory, and bad dtype or device names. (The CLI's exit code
for these is tested with the CLI.)
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import minillm
from minillm.errors import MiniLLMError
from util import random_model, tiny_config


def load_error(*args, **kwargs) -> str:
    """The message of the MiniLLMError that minillm.load raises; asserts it is a single line."""
    with pytest.raises(MiniLLMError) as info:
        minillm.load(*args, **kwargs)
    msg = str(info.value)
    assert msg and "\n" not in msg, repr(msg)
    return msg


@pytest.fixture
def ckpt(tmp_path) -> Path:
    """A valid float32 Llama-GQA checkpoint (config.json + model.safetensors)."""
    model = random_model(tiny_config("llama_gqa"), dtype=torch.float32)
    directory = tmp_path / "ckpt"
    minillm.save_pretrained(model, directory)
    minillm.load(directory)  # valid before each test breaks it
    return directory


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def edit_tensors(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


# --- the directory and config.json ------------------------------------------------------------

def test_missing_directory(tmp_path):
    missing = tmp_path / "no-such-model"
    msg = load_error(missing)
    assert "not found" in msg and str(missing) in msg


def test_missing_directory_given_as_string(tmp_path):
    missing = str(tmp_path / "nope")
    assert missing in load_error(missing)


def test_path_is_a_file(ckpt):
    path = ckpt / "config.json"
    msg = load_error(path)
    assert "not a directory" in msg and str(path) in msg


def test_missing_config_json(ckpt):
    (ckpt / "config.json").unlink()
    msg = load_error(ckpt)
    assert "config.json" in msg and "not found" in msg


def test_invalid_json(ckpt):
    (ckpt / "config.json").write_text('{"model_type": "llama", "hidden_size": 32,,}')
    msg = load_error(ckpt)
    assert "config.json" in msg and "invalid JSON" in msg


def test_config_not_an_object(ckpt):
    (ckpt / "config.json").write_text("[1, 2, 3]")
    assert "config.json" in load_error(ckpt)


def test_unknown_model_type(ckpt):
    edit_config(ckpt, model_type="mamba")
    msg = load_error(ckpt)
    assert "unknown model_type 'mamba'" in msg


def test_missing_model_type(ckpt):
    path = ckpt / "config.json"
    data = json.loads(path.read_text())
    del data["model_type"]
    path.write_text(json.dumps(data))
    assert "model_type" in load_error(ckpt)


def test_unsupported_rope_scaling(ckpt):
    edit_config(ckpt, rope_scaling={"type": "dynamic", "factor": 2.0})
    msg = load_error(ckpt)
    assert "rope_scaling" in msg and "dynamic" in msg


def test_missing_required_key(ckpt):
    path = ckpt / "config.json"
    data = json.loads(path.read_text())
    del data["num_hidden_layers"]
    path.write_text(json.dumps(data))
    assert "num_hidden_layers" in load_error(ckpt)


def test_wrong_value_type(ckpt):
    edit_config(ckpt, hidden_size="32")
    assert "hidden_size" in load_error(ckpt)


# --- the tensors -------------------------------------------------------------------------------

def test_missing_tensor(ckpt):
    edit_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    msg = load_error(ckpt)
    assert "missing tensor model.layers.1.mlp.down_proj.weight" in msg


def test_unexpected_tensor(ckpt):
    edit_tensors(ckpt, lambda t: t.update({"model.layers.0.self_attn.rotary_scale": torch.ones(3)}))
    msg = load_error(ckpt)
    assert "unexpected tensor model.layers.0.self_attn.rotary_scale" in msg


def test_unexpected_layer(ckpt):
    # A layer beyond num_hidden_layers: the config and the weights disagree.
    edit_tensors(ckpt, lambda t: t.update({"model.layers.2.input_layernorm.weight": torch.ones(32)}))
    assert "model.layers.2.input_layernorm.weight" in load_error(ckpt)


def test_wrong_shape(ckpt):
    def shrink(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:-1].clone()
    edit_tensors(ckpt, shrink)
    msg = load_error(ckpt)
    assert "model.layers.0.mlp.up_proj.weight" in msg and "shape" in msg


def test_config_disagrees_with_tensors(ckpt):
    edit_config(ckpt, num_key_value_heads=4)  # the checkpoint has 2 KV heads
    msg = load_error(ckpt)
    assert "k_proj" in msg and "shape" in msg


def test_truncated_safetensors(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msg = load_error(ckpt)
    assert "model.safetensors" in msg


def test_corrupt_safetensors_header(ckpt):
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8:8 + n] = b"x" * n  # the JSON header, garbled
    path.write_bytes(bytes(data))
    msg = load_error(ckpt)
    assert "model.safetensors" in msg and "safetensors" in msg


def test_header_length_past_end_of_file(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 10**12) + data[8:])
    assert "model.safetensors" in load_error(ckpt)


def test_empty_safetensors_file(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"")
    assert "model.safetensors" in load_error(ckpt)


def test_no_weights_at_all(ckpt):
    (ckpt / "model.safetensors").unlink()
    msg = load_error(ckpt)
    assert "model.safetensors" in msg and str(ckpt) in msg


def test_bin_only_directory_points_to_converter(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not read")  # never unpickled
    msg = load_error(ckpt)
    assert "pytorch_model" in msg and "tools/convert_bin.py" in msg


def test_sharded_index_names_missing_shard(ckpt):
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    msg = load_error(ckpt)
    assert "model-00001-of-00002.safetensors" in msg


def test_sharded_index_invalid_json(ckpt):
    (ckpt / "model.safetensors.index.json").write_text("{")
    assert "model.safetensors.index.json" in load_error(ckpt)


# --- dtype and device --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float8", "int32", "fp33", torch.int64, 3])
def test_bad_dtype(ckpt, dtype):
    msg = load_error(ckpt, dtype=dtype)
    assert "dtype" in msg and str(dtype) in msg


@pytest.mark.parametrize("device", ["gpu7", "cuda:x", "tpu"])
def test_bad_device_name(ckpt, device):
    msg = load_error(ckpt, device=device)
    assert "device" in msg and device in msg


def test_cuda_when_unavailable(ckpt):
    if torch.cuda.is_available():
        msg = load_error(ckpt, device=f"cuda:{torch.cuda.device_count()}")  # one past the last
        assert "does not exist" in msg
    else:
        msg = load_error(ckpt, device="cuda")
        assert "'cuda'" in msg and "not available" in msg


def test_dtype_checked_before_reading_anything(tmp_path):
    # A bad dtype is reported even when the path is also wrong: the cheapest check comes first.
    assert "dtype" in load_error(tmp_path / "missing", dtype="float8")


# --- review fixes ------------------------------------------------------------------------------

def test_fused_parts_of_mismatched_shape(ckpt):
    # q, k, v (and gate, up) are concatenated into one projection; a part of the wrong width is
    # named before the concatenation could fail.
    def edit(t):
        k = "model.layers.0.self_attn.k_proj.weight"
        t[k] = torch.zeros(t[k].shape[0], t[k].shape[1] + 3)
    edit_tensors(ckpt, edit)
    msg = load_error(ckpt)
    assert "self_attn.k_proj.weight" in msg and "have shapes" in msg


def test_a_config_claiming_100000_layers_is_refused_at_once(ckpt):
    import time

    edit_config(ckpt, num_hidden_layers=100_000)
    start = time.perf_counter()
    msg = load_error(ckpt)
    assert "missing tensor model.layers." in msg and "100000" in msg
    assert time.perf_counter() - start < 30  # not after building 100,000 layers


def test_integer_and_bool_tensors_where_floats_belong(ckpt):
    def edit(t):
        t["model.norm.weight"] = t["model.norm.weight"].to(torch.int16)
    edit_tensors(ckpt, edit)
    assert "has dtype int16, expected a floating-point weight" in load_error(ckpt)
