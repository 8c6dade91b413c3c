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
    assert "config.json" in msg and "not valid JSON" in msg


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


# --- issue 20: sizes from the file, special files, unique tensors, nested JSON, real causes ------

def shard(ckpt: Path, layout: dict[str, list[str]], index: dict | None | str = "auto") -> None:
    """Split model.safetensors into the shards `layout` names ({file: [tensor names]}); write the
    index (`auto`: the true one; a dict: that weight_map; None: no index)."""
    tensors = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()
    for f, names in layout.items():
        save_file({n: tensors[n] for n in names}, str(ckpt / f), metadata={"format": "pt"})
    if index == "auto":
        index = {n: f for f, names in layout.items() for n in names}
    if index is not None:
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))


def halves(ckpt: Path) -> tuple[list[str], list[str]]:
    names = sorted(load_file(str(ckpt / "model.safetensors")))
    return names[: len(names) // 2], names[len(names) // 2:]


def test_a_tensor_in_two_shards_is_refused_by_name(ckpt):
    # Before: the later shard won silently (a garbage lm_head: generate printed "⁇ ⁇ ⁇").
    a, b = halves(ckpt)
    head = "model.embed_tokens.weight" if "lm_head.weight" not in a + b else "lm_head.weight"
    a, b = [n for n in a if n != head] + [head], [n for n in b if n != head] + [head]
    shard(ckpt, {"a.safetensors": a, "b.safetensors": b}, index=None)
    msg = load_error(ckpt)
    assert f"tensor {head} appears twice" in msg and "a.safetensors" in msg and "b.safetensors" in msg


def test_a_tensor_in_two_shards_is_refused_with_an_index_too(ckpt):
    a, b = halves(ckpt)
    shard(ckpt, {"a.safetensors": a, "b.safetensors": b + [a[0]]})
    assert f"tensor {a[0]} appears twice" in load_error(ckpt)


def test_true_index_loads(ckpt):
    want = minillm.load(ckpt).lm_head.weight
    a, b = halves(ckpt)
    shard(ckpt, {"model-1.safetensors": a, "model-2.safetensors": b})
    assert torch.equal(minillm.load(ckpt).lm_head.weight, want)


@pytest.mark.parametrize("lie, needle", [
    ("unlisted", "holds tensor {x}, which the index does not list"),
    ("elsewhere", "lists tensor {x} in b.safetensors, but it is in a.safetensors"),
    ("phantom", "lists tensor model.layers.0.ghost.weight in a.safetensors, which does not hold it"),
])
def test_an_index_that_disagrees_with_its_shards_is_refused(ckpt, lie, needle):
    a, b = halves(ckpt)
    index = {n: "a.safetensors" for n in a} | {n: "b.safetensors" for n in b}
    x = a[0]
    if lie == "unlisted":
        del index[x]
    elif lie == "elsewhere":
        index[x] = "b.safetensors"
    else:
        index["model.layers.0.ghost.weight"] = "a.safetensors"
    shard(ckpt, {"a.safetensors": a, "b.safetensors": b}, index=index)
    msg = load_error(ckpt)
    assert "model.safetensors.index.json" in msg and needle.format(x=x) in msg, msg


@pytest.mark.parametrize("weight_map, needle", [
    (["model-1.safetensors"], '"weight_map" must be an object'),
    ("model-1.safetensors", '"weight_map" must be an object'),
    ({}, "lists no tensors"),
    ({"model.norm.weight": 3}, "must be a file name, got 3"),
    ({"model.norm.weight": None}, "must be a file name, got null"),
    ({"model.norm.weight": ["a"]}, "must be a file name"),
    ({"model.norm.weight": "../outside.safetensors"}, "is not a plain name inside"),
    ({"model.norm.weight": "/etc/passwd"}, "is not a plain name inside"),
    ({"model.norm.weight": ""}, "must be a non-empty string"),
])
def test_a_weight_map_of_the_wrong_json_type_is_refused(ckpt, weight_map, needle):
    # Before: AttributeError ('list' object has no attribute 'values'), or a path outside the model.
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    msg = load_error(ckpt)
    assert "model.safetensors.index.json" in msg and needle in msg, msg


def test_an_index_that_is_not_an_object(ckpt):
    (ckpt / "model.safetensors.index.json").write_text("[]")
    assert 'expected an object with a "weight_map"' in load_error(ckpt)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "model.safetensors.index.json",
                                  "tokenizer_config.json", "generation_config.json"])
def test_a_directory_where_a_file_belongs_is_named_by_kind(ckpt, name):
    # Before: "No such device" for model.safetensors; optional files were silently skipped.
    (ckpt / "tokenizer.json").write_bytes((Path(__file__).parents[1] / "weights" / "pythia-tiny" /
                                           "tokenizer.json").read_bytes())
    path = ckpt / name
    if path.exists():
        path.unlink()
    path.mkdir()
    with pytest.raises(MiniLLMError) as info:
        minillm.load(ckpt) if name not in ("tokenizer_config.json", "generation_config.json") else \
            minillm.load_tokenizer(ckpt)
    assert f"{path} is a directory, not a regular file" == str(info.value)


def test_a_device_where_a_file_belongs_is_named_by_kind(ckpt):
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").symlink_to("/dev/null")
    assert load_error(ckpt) == f"{ckpt / 'config.json'} is a character device, not a regular file"


def test_a_socket_where_a_file_belongs_is_named_by_kind(ckpt):
    import socket

    (ckpt / "model.safetensors").unlink()
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(ckpt / "model.safetensors"))
        assert load_error(ckpt) == f"{ckpt / 'model.safetensors'} is a socket, not a regular file"
    finally:
        s.close()


def test_a_dangling_symlink_is_named(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").symlink_to(ckpt / "gone.safetensors")
    assert "model.safetensors is a symbolic link to a missing file" in load_error(ckpt)


@pytest.mark.parametrize("text, needle", [
    ("[" * 100_000, "JSON nested 100000 levels deep (at most 100)"),
    ('{"a": ' * 5000 + "1" + "}" * 5000, "JSON nested 5000 levels deep"),
    ('{"model_type": "llama", "x": "' + "[" * 100_000 + '"}', "model_type"),  # brackets in a string: fine
])
def test_deeply_nested_config_json_is_one_line(ckpt, text, needle):
    # Before: RecursionError (or, with a raised recursion limit, a segmentation fault).
    (ckpt / "config.json").write_text(text)
    assert needle in load_error(ckpt)


def test_deep_json_cannot_crash_a_process_with_a_raised_recursion_limit(ckpt):
    import subprocess
    import sys

    (ckpt / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    code = ("import sys, minillm; sys.setrecursionlimit(10**6)\n"
            f"try: minillm.load({str(ckpt)!r})\nexcept minillm.MiniLLMError as e: print(e)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "nested 200000 levels deep" in r.stdout, (r.returncode, r.stderr[-500:])


def test_a_5000_digit_integer_names_its_key(ckpt):
    # Before: "Exceeds the limit (4300 digits) ...; use sys.set_int_max_str_digits()".
    (ckpt / "config.json").write_text(json.dumps(json.loads((ckpt / "config.json").read_text()) | {"hidden_size": 7})
                                      .replace('"hidden_size": 7', '"hidden_size": ' + "9" * 5000))
    msg = load_error(ckpt)
    assert "config.json: the number at hidden_size has 5000 digits" in msg and "set_int_max_str_digits" not in msg


def test_a_key_given_twice_is_refused(ckpt):
    text = (ckpt / "config.json").read_text()
    (ckpt / "config.json").write_text(text.replace("{", '{"num_hidden_layers": 1, ', 1))
    assert "the key 'num_hidden_layers' appears twice" in load_error(ckpt)


def test_a_million_layers_costs_nothing_before_the_refusal(ckpt):
    # Before: 62 s and 2.9 GB (every layer's tensor names were built before the check).
    import tracemalloc

    edit_config(ckpt, num_hidden_layers=200_000)
    tracemalloc.start()
    try:
        msg = load_error(ckpt)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "config.json declares 200000 layers, but the checkpoint holds tensors for 2" in msg
    assert peak < 20 << 20, peak


@pytest.mark.parametrize("changes, needle", [
    (dict(hidden_size=30, num_attention_heads=4, head_dim=None),
     "'hidden_size' = 30 is not divisible by 'num_attention_heads' = 4"),
    (dict(hidden_size=28, num_attention_heads=4, num_key_value_heads=2, head_dim=None),
     "gives an odd head size, 7"),
    (dict(head_dim=7), "'head_dim' = 7 is odd"),
    (dict(num_key_value_heads=3), "'num_attention_heads' = 4 is not a multiple of 'num_key_value_heads' = 3"),
    (dict(num_attention_heads=2**31 - 1, num_key_value_heads=1, head_dim=2**31 - 2), "too large to exist"),
])
def test_messages_name_the_config_keys_at_fault(ckpt, changes, needle):
    # Before: "config: rotary_dim=7 must be even ..." for hidden 30 / 4 heads, a RuntimeError for overflow.
    data = json.loads((ckpt / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    (ckpt / "config.json").write_text(json.dumps(data))
    msg = load_error(ckpt)
    assert needle in msg and "rotary_dim" not in msg, msg
