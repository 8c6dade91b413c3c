"""A second hostile-input sweep (issue 20, "Done means"): inputs that no test lists, each run in
its own process with a wall-clock limit and a memory cap, classified as

    clean           CLI: exit 2 and exactly one stderr line `minillm: error: ...` (no traceback), or a
                    success the case checks is right; API: a one-line MiniLLMError, or a checked success
    traceback       any other exception, a traceback on stderr, an unexpected exit status
    hang            still running at the time limit (--timeout, per case)
    memory          hit the address-space cap (--mem-gib; RLIMIT_AS): MemoryError, "can't allocate
                    memory", or killed while allocating
    silently wrong  no error, but the result is wrong (each such case has a check that detects it:
                    a file replaced, a record lost, an input accepted that must be refused, NaN...)
    misleading      a refusal whose message names the wrong cause (or refuses a legitimate input),
                    or that is not one line

    /work/venv/bin/python tools/hostile_sweep.py [--tree PATH] [--json OUT] [--only CAT] [--case ID]

`--tree` is the minillm tree under test (PYTHONPATH; default: the repository holding this script),
so the same sweep runs against any branch. Every file a case needs is built at run time in a
temporary directory (one setup process), from the tree's weights/llama-tiny and tests/ helpers
(tests/tiny_ckpt.py for a byte-level-BPE checkpoint, gguf's GGUFWriter for GGUF files).

API cases that cannot hang, bomb memory or need a signal are grouped into one process per
category (each with its own try/except and alarm; if that process dies or times out, the rest of
the group is rerun one process per case); every CLI, signal, pipe, special-file, hang-prone and
memory case runs alone. The environment sets OMP_NUM_THREADS=1 and HF_HUB_OFFLINE=1 (no case may
wait on the network).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

CATEGORIES = {
    1: "metadata vs content (a small file, unbounded memory/time)",
    2: "chat template budget",
    3: "special files",
    4: "duplicate / inconsistent tensors",
    5: "writing to streams",
    6: "SIGTERM",
    7: "deeply nested JSON",
    8: "sampling at the edges of float32",
    9: "API argument types",
    10: "API memory bombs",
    11: "misleading messages",
}
OUTCOMES = ["clean", "traceback", "hang", "memory", "silently wrong", "misleading"]
MEMORY_MARKS = ("MemoryError", "can't allocate memory", "Cannot allocate memory", "std::bad_alloc",
                "Unable to allocate", "out of memory", "ArrayMemoryError", "OutOfMemory")


@dataclass
class Case:
    id: str
    cat: int
    desc: str
    clean: str  # what "clean" means for this input
    kind: str  # "api", "cli", "sh" (a bash line, {mini} is the CLI), "sig" (a signal during a run)
    code: str = ""  # api: the snippet (helpers: M(), T(), want(), greedy(), D, LLAMA, ...)
    argv: list = field(default_factory=list)  # cli: arguments after `python -m minillm`
    sh: str = ""  # sh / sig: a bash line
    expect: str = "refuse"  # "refuse" | "ok" (must succeed, checked) | "either" (a clean refusal or a checked success)
    frag: str = ""  # a refusal's message must contain this (case-insensitive); else "misleading"
    avoid: tuple = ()  # ... and none of these
    check: Callable | None = None  # success check: check(d, rc, out, err) -> None or what is wrong
    prep: str = ""  # setup code (run once, in the setup process) that builds this case's files
    stdin: bytes | None = None
    group: bool = False  # api: may share a process with the category's other grouped cases
    timeout: float | None = None
    sig: tuple = ()  # sig: (signal, wait-for text on stderr or "probe:<point>", extra delay s, repeat)
    sig_check: Callable | None = None  # sig: check(d, rc, out, err) -> None or what is wrong
    check_outcome: str = "silently wrong"  # what a failed success check counts as


CASES: list[Case] = []


def case(*args, **kw):
    CASES.append(Case(*args, **kw))


# ------------------------------------------------------------------------------------------------
# Setup: one process builds every case's files in D (the helpers below, then each case's `prep`)

SETUP_HEAD = r'''
import json, os, shutil, socket, struct, sys, traceback
from pathlib import Path
D = Path(os.environ["SWEEP_D"]); TREE = Path(os.environ["SWEEP_TREE"])
LLAMA = TREE / "weights" / "llama-tiny"; PYTHIA = TREE / "weights" / "pythia-tiny"
sys.path.insert(0, str(TREE / "tests"))

def copy(name, src=None):
    t = D / name
    shutil.copytree(src or LLAMA, t, symlinks=True)
    return t

def cfg(d, drop=(), **kv):
    p = Path(d) / "config.json"
    c = json.loads(p.read_text())
    c.update(kv)
    for k in drop:
        c.pop(k, None)
    p.write_text(json.dumps(c))
    return p

def st_raw(path, header, data=b""):
    h = header if isinstance(header, (bytes, str)) else json.dumps(header)
    h = h.encode() if isinstance(h, str) else h
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + data)

def st_tensors():
    from safetensors.torch import load_file
    return load_file(str(LLAMA / "model.safetensors"))

def fifo(path):
    path = Path(path)
    if path.exists() or path.is_symlink():
        path.unlink()
    os.mkfifo(path)

def sock(path):
    path = Path(path)
    if path.exists():
        path.unlink()
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))  # left bound, never listening: a socket file on disk
    SOCKETS.append(s)
SOCKETS = []

def add_key_raw(path, key, raw):
    """Insert `"key": raw` as the last member of the JSON object in `path` (raw text, any depth)."""
    t = Path(path).read_text()
    end = t.rstrip().rfind("}")
    Path(path).write_text(t[:end].rstrip() + f', "{key}": ' + raw + "}")

def deep(n, open_="[", close="]", inner="1"):
    return open_ * n + inner + close * n

_TINY = []
def tiny():
    """tests/tiny_ckpt.py's byte-level-BPE Llama (a GGUF needs a BPE vocabulary)."""
    if not _TINY:
        from tiny_ckpt import build_tiny_checkpoint
        _TINY.append(build_tiny_checkpoint(D / "_tiny"))
    return _TINY[0]

def gguf_file(name, arch=None, kv=None, template="{% for m in messages %}{{ m['content'] }}{% endfor %}",
              drop_kv=()):
    """A GGUF of tiny(): `arch` overrides llama.* keys ({key: value or (value, "uint64")}), `kv`
    adds any key ({key: (value, kind)}), as test_gguf.write_gguf writes it."""
    import gguf, numpy as np
    import minillm
    from minillm.formats.checkpoint import hf_state_dict
    from minillm.formats.gguf import ARCHITECTURES
    from test_gguf import llama_cpp_permute
    ck = tiny()
    model = minillm.load(ck)
    c = model.config
    tj = json.loads((ck / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    added = {t["id"]: t["content"] for t in tj["added_tokens"]}
    for i, t in added.items():
        tokens[i] = t
    types = [3 if i in added else 1 for i in range(len(tokens))]
    path = D / name
    w = gguf.GGUFWriter(str(path), "llama")
    keys = {"block_count": c.num_layers, "context_length": c.max_position_embeddings,
            "embedding_length": c.hidden_size, "feed_forward_length": c.intermediate_size,
            "attention.head_count": c.num_heads, "attention.head_count_kv": c.num_kv_heads,
            "rope.dimension_count": c.head_dim}
    keys.update(arch or {})
    for k, v in keys.items():
        if k in drop_kv:
            continue
        v, kind = v if isinstance(v, tuple) else (v, "uint32")
        getattr(w, f"add_{kind}")(f"llama.{k}", v)
    w.add_float32("llama.rope.freq_base", c.rope_theta)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", c.norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(True)
    if template is not None:
        w.add_chat_template(template)
    for k, (v, kind) in (kv or {}).items():
        getattr(w, f"add_{kind}")(k, v)
    hf_to_gguf = {}
    spec = ARCHITECTURES["llama"]
    for g, h in spec["tensors"].items():
        for i in range(c.num_layers) if "{i}" in g else [None]:
            hf_to_gguf[h.format(i=i)] = g.format(i=i)
    for hname, t in hf_state_dict(model).items():
        if hname == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = t.float().numpy()
        gname = hf_to_gguf[hname]
        if gname.endswith("attn_q.weight"):
            a = llama_cpp_permute(a, c.num_heads)
        elif gname.endswith("attn_k.weight"):
            a = llama_cpp_permute(a, c.num_kv_heads)
        w.add_tensor(gname, a)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path

def gguf_layout(path):
    """Byte offsets in a GGUF v3 file: header counts, each key's value, each tensor's info."""
    b = Path(path).read_bytes()
    pos = 8
    n_t, n_kv = struct.unpack_from("<QQ", b, pos)
    out = {"n_tensors": 8, "n_kv": 16, "kv": {}, "tensors": {}}
    pos = 24
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    def value(pos, t):
        if t == 8:
            (n,) = struct.unpack_from("<Q", b, pos)
            return pos + 8 + n
        if t == 9:
            et, n = struct.unpack_from("<IQ", b, pos)
            pos += 12
            for _ in range(n):
                pos = value(pos, et)
            return pos
        return pos + sizes[t]
    for _ in range(n_kv):
        (kl,) = struct.unpack_from("<Q", b, pos)
        key = b[pos + 8: pos + 8 + kl].decode()
        tpos = pos + 8 + kl
        (t,) = struct.unpack_from("<I", b, tpos)
        out["kv"][key] = (pos, tpos, t)
        pos = value(tpos + 4, t)
    for _ in range(n_t):
        start = pos
        (nl,) = struct.unpack_from("<Q", b, pos)
        name = b[pos + 8: pos + 8 + nl].decode()
        pos += 8 + nl
        (nd,) = struct.unpack_from("<I", b, pos)
        dims = pos + 4
        pos = dims + 8 * nd
        out["tensors"][name] = {"start": start, "dims": dims, "ndims": nd, "type": pos, "offset": pos + 4}
        pos += 12
    return out

def patch(path, offset, fmt, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))

def patch_bytes(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)

def texts():
    words = ("the whale and the sea were dark and the ship sailed on through the night while the captain "
             "watched the stars").split()
    import random
    rng = random.Random(0)
    (D / "ok.txt").write_text(" ".join(rng.choice(words) for _ in range(60)) + ".\n", encoding="utf-8")
    (D / "long.txt").write_text(" ".join(rng.choice(words) for _ in range(40000)), encoding="utf-8")
    turns = [{"turn": "Hello there"}, {"turn": "the whale and the sea"}, {"turn": "What next?"}]
    (D / "turns.jsonl").write_text("\n".join(json.dumps(t) for t in turns) + "\n", encoding="utf-8")
    (D / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": p, "id": i}) for i, p in enumerate(
        ["It was a dark", "The whale", "Call me", "The sea"])) + "\n", encoding="utf-8")
    (D / "out").mkdir(exist_ok=True)
texts()
'''

SETUP_CASE = r'''
try:
{body}
except BaseException:
    FAILED[{cid!r}] = traceback.format_exc().strip().splitlines()[-1]
'''

SETUP_TAIL = r'''
(D / "_setup_failed.json").write_text(json.dumps(FAILED))  # (socket files stay on disk after exit)
'''

# ------------------------------------------------------------------------------------------------
# The API harness: run one or more snippets, one JSON result line each

API_HEAD = r'''
import json, math, os, signal, sys, time, traceback
RESULT = open(os.environ["SWEEP_RESULT"], "a", encoding="utf-8")
D = os.environ["SWEEP_D"]; TREE = os.environ["SWEEP_TREE"]
LLAMA = os.path.join(TREE, "weights", "llama-tiny"); PYTHIA = os.path.join(TREE, "weights", "pythia-tiny")
import torch
import minillm
from minillm.errors import MiniLLMError

class Wrong(Exception):
    pass

class Hang(BaseException):
    pass

_C = {}
def M(path=None):
    path = path or LLAMA
    if path not in _C:
        _C[path] = minillm.load(path)
    return _C[path]

def T(path=None):
    path = path or LLAMA
    key = ("tok", path)
    if key not in _C:
        _C[key] = minillm.load_tokenizer(path)
    return _C[key]

def want(cond, what):
    if not cond:
        raise Wrong(what)

def greedy(ids, n, model=None):
    return list(minillm.generate(model or M(), ids, max_new_tokens=n, temperature=0, ignore_eos=True))

def valid_ids(out, n=None, model=None):
    V = (model or M()).config.vocab_size
    want(all(isinstance(t, int) and 0 <= t < V for t in out), f"ids out of range: {out[:8]}")
    if n is not None:
        want(len(out) == n, f"{len(out)} tokens, expected {n}")

def _alarm(signum, frame):
    raise Hang()

def run_one(cid, code, limit):
    t0 = time.time()
    if limit:
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(int(limit))
    try:
        exec(compile(code, cid, "exec"), dict(globals()))
        r = {"status": "ok", "msg": ""}
    except Wrong as e:
        r = {"status": "wrong", "msg": str(e)}
    except MiniLLMError as e:
        r = {"status": "refused", "msg": str(e)}
    except Hang as e:
        r = {"status": "hang", "msg": str(e) or f"past {limit} s (alarm)"}
    except MemoryError as e:
        r = {"status": "memory", "msg": f"{type(e).__name__}: {e}"}
    except BaseException as e:
        tb = traceback.format_exc().strip().splitlines()
        r = {"status": "exception", "msg": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
             "where": tb[-3] if len(tb) >= 3 else ""}
    finally:
        if limit:
            signal.alarm(0)
    r.update(id=cid, seconds=round(time.time() - t0, 2))
    RESULT.write(json.dumps(r) + "\n")
    RESULT.flush()
'''


# ------------------------------------------------------------------------------------------------
# The cases. {d} is the sweep's temporary directory, {llama} the tree's weights/llama-tiny.

GEN = ["generate", "{d}/{name}", "--prompt", "hi", "--max-new-tokens", "1"]


def ck(name):
    return [a.replace("{name}", name) for a in GEN]


# ---- 1. metadata vs content ---------------------------------------------------------------------
C1 = "exit 2, one line naming the impossible field, before allocating or looping"
for cid, arch, what in [
        ("gguf-head-count-1e9", {"attention.head_count": 10**9}, "head_count 10^9"),
        ("gguf-head-count-kv-1e9", {"attention.head_count_kv": 10**9}, "head_count_kv 10^9"),
        ("gguf-embedding-2^40", {"embedding_length": (2**40, "uint64")}, "embedding_length 2^40"),
        ("gguf-ffn-1e12", {"feed_forward_length": (10**12, "uint64")}, "feed_forward_length 10^12"),
        ("gguf-rope-dim-1e9", {"rope.dimension_count": 10**9}, "rope.dimension_count 10^9"),
        ("gguf-block-count-2^32-1", {"block_count": 2**32 - 1}, "block_count 2^32-1 (uint32 max)"),
        ("gguf-block-count-u64-2^63", {"block_count": (2**63, "uint64")}, "block_count 2^63 as uint64")]:
    case(f"1/{cid}", 1, f"a tiny GGUF claiming {what}", C1, "cli",
         argv=["generate", f"{{d}}/{cid}.gguf", "--prompt", "hi", "--max-new-tokens", "1"],
         prep=f"gguf_file('{cid}.gguf', arch={arch!r})")
case("1/gguf-context-2^62", 1, "a GGUF claiming context_length 2^62 (a claim only; the default cache is 1024)",
     "exit 0 with 1 token (the cache is capped at 1024), or a clean refusal", "cli",
     argv=["generate", "{d}/gguf-context-2^62.gguf", "--prompt", "hi", "--max-new-tokens", "1", "--ignore-eos"],
     prep="gguf_file('gguf-context-2^62.gguf', arch={'context_length': (2**62, 'uint64')})", expect="either",
     check=lambda d, rc, out, err: None if "1 tokens" in err else "no '1 tokens' summary")
for cid, key, count, what in [
        ("gguf-tokens-count-2^40", "tokenizer.ggml.tokens", 2**40, "a token list whose count says 2^40"),
        ("gguf-merges-count-1e8", "tokenizer.ggml.merges", 10**8, "a merges list whose count says 10^8"),
        ("gguf-token-types-count-2^50", "tokenizer.ggml.token_type", 2**50, "a token_type list whose count says 2^50")]:
    case(f"1/{cid}", 1, f"a GGUF with {what} (the file holds a few hundred)", C1, "cli",
         argv=["generate", f"{{d}}/{cid}.gguf", "--prompt", "hi", "--max-new-tokens", "1"],
         prep=f"p = gguf_file('{cid}.gguf'); L = gguf_layout(p); patch(p, L['kv']['{key}'][1] + 8, '<Q', {count})")
case("1/gguf-name-len-2^50", 1, "a GGUF whose general.name string claims 2^50 bytes", C1, "cli",
     argv=["generate", "{d}/gguf-name-len-2^50.gguf", "--prompt", "hi", "--max-new-tokens", "1"],
     prep="p = gguf_file('gguf-name-len-2^50.gguf', kv={'general.name': ('tiny', 'string')}); "
          "L = gguf_layout(p); patch(p, L['kv']['general.name'][1] + 4, '<Q', 2**50)")
case("1/gguf-n-tensors-1e12", 1, "a GGUF header claiming 10^12 tensors", C1, "cli",
     argv=["generate", "{d}/gguf-n-tensors-1e12.gguf", "--prompt", "hi", "--max-new-tokens", "1"],
     prep="p = gguf_file('gguf-n-tensors-1e12.gguf'); patch(p, 8, '<Q', 10**12)")
case("1/gguf-n-kv-2^60", 1, "a GGUF header claiming 2^60 metadata pairs", C1, "cli",
     argv=["generate", "{d}/gguf-n-kv-2^60.gguf", "--prompt", "hi", "--max-new-tokens", "1"],
     prep="p = gguf_file('gguf-n-kv-2^60.gguf'); patch(p, 16, '<Q', 2**60)")
case("1/gguf-tensor-dim-2^40", 1, "a GGUF tensor info whose first dim claims 2^40", C1, "cli",
     argv=["generate", "{d}/gguf-tensor-dim-2^40.gguf", "--prompt", "hi", "--max-new-tokens", "1"],
     prep="p = gguf_file('gguf-tensor-dim-2^40.gguf'); L = gguf_layout(p); "
          "patch(p, L['tensors']['token_embd.weight']['dims'], '<Q', 2**40)")
case("1/gguf-tensor-offset-2^50", 1, "a GGUF tensor whose data offset points 2^50 bytes past the start", C1,
     "cli", argv=["generate", "{d}/gguf-tensor-offset-2^50.gguf", "--prompt", "hi", "--max-new-tokens", "1"],
     prep="p = gguf_file('gguf-tensor-offset-2^50.gguf'); L = gguf_layout(p); "
          "patch(p, L['tensors']['output_norm.weight']['offset'], '<Q', 2**50)")
case("1/gguf-tensor-ndims-1e6", 1, "a GGUF tensor info claiming 10^6 dimensions", C1, "cli",
     argv=["generate", "{d}/gguf-tensor-ndims-1e6.gguf", "--prompt", "hi", "--max-new-tokens", "1"],
     prep="p = gguf_file('gguf-tensor-ndims-1e6.gguf'); L = gguf_layout(p); "
          "patch(p, L['tensors']['token_embd.weight']['dims'] - 4, '<I', 10**6)")
for cid, kv, what in [
        ("cfg-intermediate-1e12", {"intermediate_size": 10**12}, "intermediate_size 10^12"),
        ("cfg-vocab-2^40", {"vocab_size": 2**40}, "vocab_size 2^40"),
        ("cfg-hidden-2^31", {"hidden_size": 2**31, "num_attention_heads": 2**26, "num_key_value_heads": 2**26},
         "hidden_size 2^31 over 2^26 heads"),
        ("cfg-heads-1e8", {"num_attention_heads": 10**8, "num_key_value_heads": 10**8, "head_dim": 32},
         "num_attention_heads 10^8 with head_dim 32"),
        ("cfg-layers-2^31", {"num_hidden_layers": 2**31 - 1}, "num_hidden_layers 2^31-1"),
        ("cfg-head-dim-2^40", {"head_dim": 2**40}, "head_dim 2^40")]:
    case(f"1/{cid}", 1, f"config.json claiming {what} over the 11 MB llama-tiny weights", C1, "cli",
         argv=ck(cid), prep=f"cfg(copy('{cid}'), **{kv!r})")
case("1/cfg-max-pos-1e18", 1, "config.json max_position_embeddings 10^18 (a claim; the default cache is 1024)",
     "exit 0 with 1 token, or a clean refusal", "cli", argv=ck("cfg-max-pos-1e18") + ["--ignore-eos"],
     prep="cfg(copy('cfg-max-pos-1e18'), max_position_embeddings=10**18)", expect="either",
     check=lambda d, rc, out, err: None if "1 tokens" in err else "no '1 tokens' summary")
case("1/st-tensor-2^50-bytes", 1, "a safetensors header declaring one [2^24, 2^24] F32 tensor (2^50 bytes) in a "
     "100-byte file", C1, "cli", argv=ck("st-2^50"),
     prep="c = copy('st-2^50'); st_raw(c / 'model.safetensors', {'model.embed_tokens.weight': {'dtype': 'F32', "
          "'shape': [2**24, 2**24], 'data_offsets': [0, 2**50]}}, b'0' * 64)")
case("1/st-offsets-past-end", 1, "a safetensors tensor whose data_offsets end 2^40 bytes past the file", C1, "cli",
     argv=ck("st-offsets"),
     prep="c = copy('st-offsets'); st_raw(c / 'model.safetensors', {'model.norm.weight': {'dtype': 'F32', "
          "'shape': [2**38], 'data_offsets': [0, 2**40]}}, b'0' * 64)")
case("1/st-header-len-1e8", 1, "a safetensors header length of 10^8 in a 40-byte file", C1, "cli",
     argv=ck("st-hlen"), prep="c = copy('st-hlen'); p = c / 'model.safetensors'; "
                              "p.write_bytes(struct.pack('<Q', 10**8) + b'{\"a\":1}' + b' ' * 32)")
case("1/index-100k-shards", 1, "an index naming 100,000 shards that do not exist (a 4 MB index)", C1, "cli",
     argv=ck("idx-many"), frag="missing",
     prep="c = copy('idx-many'); (c / 'model.safetensors').unlink(); "
          "(c / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': "
          "{f't{i}': f'model-{i:06d}-of-100000.safetensors' for i in range(100000)}}))")
case("1/tokjson-added-id-1e12", 1, "a tokenizer.json whose added token claims id 10^12", C1, "cli",
     argv=["generate", "{d}/tokjson-bigid", "--prompt", "hi", "--max-new-tokens", "1"],
     prep="c = copy('tokjson-bigid', PYTHIA); t = json.loads((c / 'tokenizer.json').read_text()); "
          "t['added_tokens'].append({'id': 10**12, 'content': '<huge>', 'single_word': False, 'lstrip': False, "
          "'rstrip': False, 'normalized': False, 'special': True}); (c / 'tokenizer.json').write_text(json.dumps(t))")

# ---- 2. chat templates ---------------------------------------------------------------------------
C2 = "exit 2, one line saying the template ran past its time/size budget (or failed), within a few seconds"
TEMPLATES = [
    ("tpl-messages-times", "{% for x in messages * 99999 %}{% for y in messages * 99999 %}{% endfor %}{% endfor %}",
     "nested loops over messages*99999"),
    ("tpl-string-loops", "{% for a in 'x' * 99999 %}{% for b in 'y' * 99999 %}{{ '' }}{% endfor %}{% endfor %}",
     "nested loops over 99999-character strings"),
    ("tpl-recursive-macro", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "an endlessly recursive macro"),
    ("tpl-loop-recursive", "{% for m in messages recursive %}{{ loop([m]) }}{% endfor %}",
     "a `recursive` for-loop that recurses forever"),
    ("tpl-one-huge-string", "{{ 'x' * 10**10 }}", "one 10 GB string at once"),
    ("tpl-range-list", "{{ range(10**6)|list|string * 10**4 }}", "a 10^6-element list's text, 10^4 times"),
    ("tpl-doubling", "{% set ns = namespace(s='xy') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
                     "{% endfor %}{{ ns.s }}", "a string doubled 40 times"),
    ("tpl-int-power", "{{ 9 ** (9 ** 9) }}", "9**(9**9) (a 370-million-digit integer)"),
    ("tpl-content-times", "{% for m in messages %}{{ m['content'] * 10**8 }}{% endfor %}",
     "each message repeated 10^8 times (~1 GB)"),
    ("tpl-sort-bomb", "{{ (range(99999)|list * 300)|sort|join(',') }}", "sorting and joining 3x10^7 numbers"),
    ("tpl-replace-bomb", "{% set ns = namespace(s='ab') %}{% for i in range(30) %}{% set ns.s = ns.s|replace('a', 'aa')"
                         " ~ ns.s %}{% endfor %}{{ ns.s|length }}", "a string growing by replace() in a loop"),
    ("tpl-format-width", "{{ '%999999999d'|format(1) }}", "a format width of 10^9"),
]
for cid, tpl, what in TEMPLATES:
    case(f"2/{cid}", 2, f"chat_template.jinja with {what}", C2, "cli",
         argv=["chat", f"{{d}}/{cid}", "--prompts", "{d}/turns.jsonl", "--max-new-tokens", "1"],
         prep=f"(copy('{cid}') / 'chat_template.jinja').write_text({tpl!r})", timeout=30)
case("2/tpl-raise-multiline", 2, "a template whose raise_exception message has 3 lines",
     "exit 2, exactly one error line", "cli",
     argv=["chat", "{d}/tpl-raise", "--prompts", "{d}/turns.jsonl", "--max-new-tokens", "1"],
     prep="(copy('tpl-raise') / 'chat_template.jinja').write_text(\"{{ raise_exception('one\\\\ntwo\\\\nthree') }}\")")
case("2/tpl-sandbox-escape", 2, "a template reaching ''.__class__.__mro__[1].__subclasses__()",
     "exit 2, one line (the sandbox refuses)", "cli",
     argv=["chat", "{d}/tpl-escape", "--prompts", "{d}/turns.jsonl", "--max-new-tokens", "1"],
     prep="(copy('tpl-escape') / 'chat_template.jinja').write_text(\"{{ ''.__class__.__mro__[1].__subclasses__() }}\")")
case("2/tpl-config-list-default-bomb", 2, "tokenizer_config.json chat_template as a named list whose 'default' "
     "loops 10^10 times", C2, "cli",
     argv=["chat", "{d}/tpl-cfglist", "--prompts", "{d}/turns.jsonl", "--max-new-tokens", "1"], timeout=30,
     prep="c = copy('tpl-cfglist'); t = json.loads((c / 'tokenizer_config.json').read_text()); "
          "t['chat_template'] = [{'name': 'default', 'template': \"{% for a in range(99999) %}{% for b in 'x' * 99999 %}"
          "{% endfor %}{% endfor %}\"}]; (c / 'tokenizer_config.json').write_text(json.dumps(t))")
case("2/tpl-gguf-bomb", 2, "a GGUF whose tokenizer.chat_template builds 'z' * 10^9 per message", C2, "cli",
     argv=["chat", "{d}/tpl-bomb.gguf", "--prompts", "{d}/turns.jsonl", "--max-new-tokens", "1"], timeout=30,
     prep="gguf_file('tpl-bomb.gguf', template=\"{% for m in messages %}{{ 'z' * 10**9 }}{% endfor %}\")")
case("2/tpl-thread-loop", 2, "ChatSession.turn in a worker thread with a template that loops ~10^10 times",
     "a one-line MiniLLMError from the worker within a few seconds", "api", timeout=30,
     prep="(copy('tpl-thread') / 'chat_template.jinja').write_text(\"{% for a in 'x' * 99999 %}{% for b in 'y' * 99999 %}"
          "{% endfor %}{% endfor %}\")",
     code="""
import threading
box = {}
def work():
    try:
        s = minillm.ChatSession(M(), minillm.load_tokenizer(D + '/tpl-thread'), max_new_tokens=1)
        box['out'] = ''.join(s.turn('hi'))
    except BaseException as e:
        box['err'] = e
th = threading.Thread(target=work, daemon=True); th.start(); th.join(20)
if th.is_alive():
    raise Hang('the render in a worker thread is still running after 20 s')
if 'err' in box:
    raise box['err']
""")
case("2/tpl-empty-output", 2, "a template that renders nothing at all",
     "exit 2 naming the empty render, or a checked success", "cli", expect="either",
     argv=["chat", "{d}/tpl-empty", "--prompts", "{d}/turns.jsonl", "--max-new-tokens", "1"],
     prep="(copy('tpl-empty') / 'chat_template.jinja').write_text('{# nothing #}')",
     check=lambda d, rc, out, err: None if "3 turns" in err else "no '3 turns' summary")

# ---- 3. special files ----------------------------------------------------------------------------
C3 = "exit 2 within seconds, one line naming the file and its kind (FIFO, socket, device, directory, loop)"
for cid, prep, what in [
        ("fifo-config", "fifo(copy('fifo-config') / 'config.json')", "config.json is a FIFO"),
        ("fifo-tokenizer-model", "fifo(copy('fifo-tokenizer-model') / 'tokenizer.model')", "tokenizer.model is a FIFO"),
        ("fifo-tokenizer-config", "fifo(copy('fifo-tokenizer-config') / 'tokenizer_config.json')",
         "tokenizer_config.json is a FIFO"),
        ("fifo-generation-config", "fifo(copy('fifo-generation-config') / 'generation_config.json')",
         "generation_config.json is a FIFO"),
        ("fifo-index", "c = copy('fifo-index'); (c / 'model.safetensors').unlink(); fifo(c / 'model.safetensors.index.json')",
         "model.safetensors.index.json is a FIFO (no model.safetensors)"),
        ("socket-config", "sock(copy('socket-config') / 'config.json')", "config.json is a unix socket"),
        ("socket-weights", "sock(copy('socket-weights') / 'model.safetensors')", "model.safetensors is a unix socket"),
        ("zero-config", "c = copy('zero-config'); (c / 'config.json').unlink(); os.symlink('/dev/zero', c / 'config.json')",
         "config.json is a symlink to /dev/zero"),
        ("zero-weights", "c = copy('zero-weights'); (c / 'model.safetensors').unlink(); "
                         "os.symlink('/dev/zero', c / 'model.safetensors')", "model.safetensors is a symlink to /dev/zero"),
        ("urandom-genconfig", "c = copy('urandom-genconfig'); (c / 'generation_config.json').unlink(); "
                              "os.symlink('/dev/urandom', c / 'generation_config.json')",
         "generation_config.json is a symlink to /dev/urandom"),
        ("loop-weights", "c = copy('loop-weights'); (c / 'model.safetensors').unlink(); "
                         "os.symlink('b.safetensors', c / 'model.safetensors'); os.symlink('model.safetensors', c / 'b.safetensors')",
         "model.safetensors is a symlink loop"),
        ("loop-config", "c = copy('loop-config'); (c / 'config.json').unlink(); os.symlink('config.json', c / 'config.json')",
         "config.json is a symlink to itself"),
        ("dir-tokenizer-model", "c = copy('dir-tokenizer-model'); (c / 'tokenizer.model').unlink(); (c / 'tokenizer.model').mkdir()",
         "tokenizer.model is a directory"),
        ("dir-config", "c = copy('dir-config'); (c / 'config.json').unlink(); (c / 'config.json').mkdir()",
         "config.json is a directory")]:
    case(f"3/{cid}", 3, what, C3, "cli", argv=ck(cid), prep=prep, timeout=25)
case("3/fifo-chat-template", 3, "chat_template.jinja is a FIFO", C3, "cli", timeout=25,
     argv=["chat", "{d}/fifo-chat-template", "--prompts", "{d}/turns.jsonl", "--max-new-tokens", "1"],
     prep="fifo(copy('fifo-chat-template') / 'chat_template.jinja')")
for cid, model, what in [("model-dev-zero", "/dev/zero", "the model argument is /dev/zero"),
                         ("model-dev-null", "/dev/null", "the model argument is /dev/null"),
                         ("model-fifo-gguf", "{d}/pipe.gguf", "the model argument is a FIFO named pipe.gguf"),
                         ("model-symlink-loop", "{d}/self-loop", "the model argument is a symlink to itself"),
                         ("model-proc-self-mem", "/proc/self/mem", "the model argument is /proc/self/mem")]:
    case(f"3/{cid}", 3, what, C3, "cli", argv=["generate", model, "--prompt", "hi", "--max-new-tokens", "1"],
         prep={"model-fifo-gguf": "fifo(D / 'pipe.gguf')",
               "model-symlink-loop": "os.symlink('self-loop', D / 'self-loop')"}.get(cid, ""), timeout=25)
case("3/fifo-config-sigint", 3, "config.json is a FIFO, and Ctrl-C arrives once the process has imported torch",
     "exit 2 (refused) or 130 (interrupted) within seconds of the SIGINT, no traceback", "sig", timeout=30,
     sh="exec {mini} generate {d}/fifo-config2 --prompt hi --max-new-tokens 1 --threads 1",
     prep="fifo(copy('fifo-config2') / 'config.json')", sig=(signal.SIGINT, "probe:torch", 4.0, 1),
     sig_check=lambda d, rc, out, err: None if rc in (2, 130) and "Traceback" not in err
     else f"exit {rc} after SIGINT: {_last(err)}")
case("3/gguf-dir", 3, "a directory named m.gguf holding a config.json", C3, "cli",
     argv=["generate", "{d}/dirgguf/m.gguf", "--prompt", "hi", "--max-new-tokens", "1"],
     prep="(D / 'dirgguf').mkdir(); shutil.copytree(LLAMA, D / 'dirgguf' / 'm.gguf')", expect="either",
     check=lambda d, rc, out, err: None if "1 tokens" in err else "no '1 tokens' summary")

# ---- 4. duplicate / inconsistent tensors ---------------------------------------------------------
C4 = "exit 2, one line naming the tensor (or the index entry) that is duplicated or inconsistent"
SHARDS = r'''
def shards(name, split, index=None, tweak=None):
    """Split llama-tiny's tensors into shards: split(name) -> list of shard numbers holding it."""
    from safetensors.torch import save_file
    import torch
    c = copy(name); (c / 'model.safetensors').unlink()
    t = st_tensors()
    files, wm = {}, {}
    for k, v in t.items():
        for s in split(k):
            files.setdefault(s, {})[k] = v.clone() if tweak is None else tweak(k, s, v.clone())
            wm.setdefault(k, f"model-{s:05d}-of-00002.safetensors")
    for s, ts in files.items():
        save_file(ts, str(c / f"model-{s:05d}-of-00002.safetensors"), metadata={"format": "pt"})
    idx = {"metadata": {}, "weight_map": wm} if index is None else index(wm)
    (c / "model.safetensors.index.json").write_text(json.dumps(idx))
    return c
'''
for cid, prep, what in [
        ("dup-norm", "shards('dup-norm', lambda k: [1, 2] if k == 'model.norm.weight' else [1 + ('layers.3' in k)], "
                     "tweak=lambda k, s, v: v * 0 if s == 2 and k == 'model.norm.weight' else v)",
         "both shards hold model.norm.weight (the second all zeros)"),
        ("dup-embed", "shards('dup-embed', lambda k: [1, 2] if 'embed_tokens' in k else [1 + ('layers.5' in k)], "
                      "tweak=lambda k, s, v: v.flip(0) if s == 2 and 'embed_tokens' in k else v)",
         "both shards hold embed_tokens (rows reversed in the second)"),
        ("index-points-wrong-shard", "shards('index-points-wrong-shard', lambda k: [1 + ('layers.2' in k)], "
         "index=lambda wm: {'weight_map': {k: ('model-00001-of-00002.safetensors' if 'layers.2.mlp' in k else v) "
         "for k, v in wm.items()}})", "the index maps layers.2.mlp.* to shard 1; they are in shard 2"),
        ("index-omits-tensor", "shards('index-omits-tensor', lambda k: [1 + ('layers.1' in k)], "
         "index=lambda wm: {'weight_map': {k: v for k, v in wm.items() if k != 'model.layers.1.input_layernorm.weight'}})",
         "a tensor held by a shard but absent from the index"),
        ("index-extra-tensor", "shards('index-extra-tensor', lambda k: [1 + ('layers.1' in k)], "
         "index=lambda wm: {'weight_map': {**wm, 'model.layers.9.ghost.weight': 'model-00001-of-00002.safetensors'}})",
         "the index lists a tensor that no shard holds"),
        ("index-weight-map-null", "shards('index-weight-map-null', lambda k: [1 + ('layers.1' in k)], "
         "index=lambda wm: {'weight_map': None})", "weight_map is null"),
        ("index-weight-map-int-values", "shards('index-weight-map-int-values', lambda k: [1 + ('layers.1' in k)], "
         "index=lambda wm: {'weight_map': {k: 5 for k in wm}})", "weight_map values are integers"),
        ("index-top-list", "shards('index-top-list', lambda k: [1 + ('layers.1' in k)], index=lambda wm: [wm])",
         "the index file is a JSON list"),
        ("index-dotdot", "shards('index-dotdot', lambda k: [1 + ('layers.1' in k)], "
         "index=lambda wm: {'weight_map': {k: '../../../../../../etc/passwd' for k in wm}})",
         "the index maps every tensor to ../../../../etc/passwd"),
        ("index-absolute", "shards('index-absolute', lambda k: [1 + ('layers.1' in k)], "
         "index=lambda wm: {'weight_map': {k: str(LLAMA / 'model.safetensors') for k in wm}})",
         "the index maps every tensor to an absolute path (another checkpoint)")]:
    case(f"4/{cid}", 4, what, C4, "cli", argv=ck(cid), prep=prep)
case("4/st-json-duplicate-key", 4, "a safetensors header that lists model.norm.weight twice (JSON duplicate key)",
     C4, "cli", argv=ck("st-dupkey"), prep=r'''
c = copy('st-dupkey'); p = c / 'model.safetensors'; b = p.read_bytes(); n = struct.unpack('<Q', b[:8])[0]
h = json.loads(b[8:8 + n]); data = b[8 + n:]
e = h['model.norm.weight']; lo, hi = e['data_offsets']
other = h['model.layers.0.input_layernorm.weight']
dup = json.dumps({'model.norm.weight': other})[1:-1]
text = json.dumps(h)[:-1] + ', ' + dup + '}'
pad = (8 - len(text) % 8) % 8
st_raw(p, text + ' ' * pad, data)''')
case("4/st-overlapping-offsets", 4, "two tensors of one safetensors file sharing the same bytes (overlapping "
     "data_offsets)", C4, "cli", argv=ck("st-overlap"), prep=r'''
c = copy('st-overlap'); p = c / 'model.safetensors'; b = p.read_bytes(); n = struct.unpack('<Q', b[:8])[0]
h = json.loads(b[8:8 + n]); data = b[8 + n:]
h['model.layers.1.input_layernorm.weight'] = dict(h['model.layers.0.input_layernorm.weight'])
text = json.dumps(h); text += ' ' * ((8 - len(text) % 8) % 8)
st_raw(p, text, data)''')
case("4/gguf-duplicate-tensor", 4, "a GGUF holding blk.0.attn_q.weight twice (the second was attn_k's)", C4, "cli",
     argv=["generate", "{d}/dup-tensor.gguf", "--prompt", "hi", "--max-new-tokens", "1"],
     prep="p = gguf_file('dup-tensor.gguf'); L = gguf_layout(p); s = L['tensors']['blk.0.attn_k.weight']['start']; "
          "patch_bytes(p, s + 8, b'blk.0.attn_q.weight')")
case("4/gguf-duplicate-key", 4, "a GGUF whose eos_token_id key is renamed to a second bos_token_id", C4, "cli",
     argv=["generate", "{d}/dup-key.gguf", "--prompt", "hi", "--max-new-tokens", "1"],
     prep="p = gguf_file('dup-key.gguf'); L = gguf_layout(p); s = L['kv']['tokenizer.ggml.eos_token_id'][0]; "
          "patch_bytes(p, s + 8, b'tokenizer.ggml.bos_token_id')")
case("4/single-and-index", 4, "model.safetensors and a sharded index both present, with different weights",
     "exit 2 naming the ambiguity, or it loads one and says which (exit 0)", "cli", expect="either",
     argv=ck("single-and-index") + ["--ignore-eos"],
     prep="c = shards('single-and-index', lambda k: [1 + ('layers.1' in k)], "
          "tweak=lambda k, s, v: v * 0 if 'norm' in k else v); shutil.copy(LLAMA / 'model.safetensors', c)",
     check=lambda d, rc, out, err: None if "1 tokens" in err else "no '1 tokens' summary")

# ---- 5. writing to streams -----------------------------------------------------------------------
OLD = "old line 1\\nold line 2\\n"


def _kept_old(name, want_json=None):
    def check(d, rc, out, err):
        text = (Path(d) / name).read_text(errors="replace")
        if not text.startswith("old line 1\nold line 2\n"):
            return f"{name}: the earlier content is gone (now {text[:60]!r})"
        rest = text[len("old line 1\nold line 2\n"):]
        if want_json == "obj" and "{" not in rest:
            return f"{name}: the JSON was not appended ({rest[:60]!r})"
        if want_json == "lines" and '"line"' not in rest:
            return f"{name}: no records appended ({rest[:60]!r})"
        return None
    return check


C5 = "the stream is written in place (earlier content kept, the output appended), or a clean refusal"
PPL = "{mini} ppl {llama} --text {d}/ok.txt --threads 1"
ATTN = "{mini} attn {llama} --text {d}/ok.txt --png {d}/out/a.png --tokens 16 --threads 1"
BATCH = "{mini} batch {llama} --input {d}/prompts.jsonl --max-new-tokens 2 --threads 1"
for cid, line, name, kind, what in [
        ("ppl-json-stderr-append", PPL + " --json /dev/stderr 2>>{d}/log-a.txt", "log-a.txt", "obj",
         "ppl --json /dev/stderr with stderr appended to a log"),
        ("attn-json-stdout-append", ATTN + " --json /dev/stdout >>{d}/log-b.txt", "log-b.txt", "obj",
         "attn --json /dev/stdout >> log"),
        ("batch-proc-self-fd1-append", BATCH + " --output /proc/self/fd/1 >>{d}/log-c.txt", "log-c.txt", "lines",
         "batch --output /proc/self/fd/1 >> log"),
        ("ppl-json-fd3-append", PPL + " --json /dev/fd/3 3>>{d}/log-d.txt", "log-d.txt", "obj",
         "ppl --json /dev/fd/3 with fd 3 opened for append"),
        ("batch-fd3-append", BATCH + " --output /dev/fd/3 3>>{d}/log-e.txt", "log-e.txt", "lines",
         "batch --output /dev/fd/3 3>> log"),
        ("batch-stderr-append", BATCH + " --output /dev/stderr 2>>{d}/log-f.txt", "log-f.txt", "lines",
         "batch --output /dev/stderr 2>> log"),
        ("ppl-plot-fd3-append", PPL + " --plot /dev/fd/3.svg 3>>{d}/log-g.txt", "log-g.txt", None,
         "ppl --plot onto /dev/fd/3.svg (no such fd path) with fd 3 appending"),
        ("attn-png-stdout-svg-append", "{mini} attn {llama} --text {d}/ok.txt --tokens 16 --threads 1 "
         "--png /dev/stdout >>{d}/log-h.txt", "log-h.txt", None, "attn --png /dev/stdout >> log (a figure onto a log)")]:
    case(f"5/{cid}", 5, what, C5, "sh", sh=f"printf '{OLD}' > {{d}}/{name}; {line}", expect="either",
         check=_kept_old(name, kind))


def _pipe_json(d, rc, out, err):
    try:
        start = out.index("{")
        json.loads(out[start:])
    except ValueError as e:
        return f"the pipe did not get the JSON ({e}; stdout {out[:80]!r})"
    return None


def _pipe_records(n):
    def check(d, rc, out, err):
        recs = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
        return None if len(recs) == n else f"{len(recs)} records in the pipe, expected {n}"
    return check


case("5/ppl-json-stdout-pipe", 5, "ppl --json /dev/stdout | cat (a pipe is written in place)",
     "exit 0 and the JSON arrives in the pipe", "sh", sh=PPL + " --json /dev/stdout | cat; exit ${{PIPESTATUS[0]}}", expect="ok",
     check=_pipe_json)
case("5/attn-json-fd-pipe", 5, "attn --json /dev/fd/1 | cat", "exit 0 and the JSON arrives in the pipe", "sh",
     sh=ATTN + " --json /dev/fd/1 | cat; exit ${{PIPESTATUS[0]}}", expect="ok", check=_pipe_json)
case("5/batch-output-devstdout-pipe", 5, "batch --output /dev/stdout | cat",
     "exit 0 and the 4 records arrive in the pipe", "sh", sh=BATCH + " --output /dev/stdout | cat; exit ${{PIPESTATUS[0]}}", expect="ok",
     check=_pipe_records(4))


for cid, line, what in [
        ("version-full", "{mini} --version > /dev/full", "--version > /dev/full"),
        ("generate-help-full", "{mini} generate --help > /dev/full", "generate --help > /dev/full"),
        ("ppl-table-full", PPL + " > /dev/full", "ppl's table > /dev/full"),
        ("batch-stdout-full", BATCH + " > /dev/full", "batch --output - > /dev/full"),
        ("chat-full", "{mini} chat {llama} --prompts {d}/turns.jsonl --max-new-tokens 2 --threads 1 > /dev/full",
         "chat > /dev/full"),
        ("attn-full", ATTN + " > /dev/full", "attn's scores > /dev/full")]:
    case(f"5/{cid}", 5, what, "exit 2, one line reporting the failed write (never exit 0)", "sh", sh=line)
case("5/json-symlink-target", 5, "ppl --json onto a symlink to a file in another directory",
     "the link's target gets the JSON and the link stays a link, or a clean refusal", "sh", expect="either",
     sh="mkdir -p {d}/real && printf 'old' > {d}/real/r.json && ln -sf {d}/real/r.json {d}/out/link.json && "
        + PPL + " --json {d}/out/link.json",
     check=lambda d, rc, out, err: None if (Path(d, "out/link.json").is_symlink() and
                                            Path(d, "real/r.json").read_text().lstrip().startswith("{"))
     else "the symlink was replaced by a file (its target kept the old content)")
case("5/batch-output-hardlink", 5, "batch --output onto a file with a second hard link elsewhere",
     "both names see the new records (written in place), or a clean refusal", "sh", expect="either",
     sh="printf 'old' > {d}/out/h1.jsonl && ln -f {d}/out/h1.jsonl {d}/h2.jsonl && " + BATCH +
        " --output {d}/out/h1.jsonl",
     check=lambda d, rc, out, err: None if Path(d, "h2.jsonl").read_text() == Path(d, "out/h1.jsonl").read_text()
     else "the hard link was broken: the other name keeps the old content")
case("5/attn-json-pipe-closed-early", 5, "attn --json /dev/stdout | head -c 5 (the reader leaves early)",
     "no traceback; exit 0, 2 or a quiet broken-pipe stop", "sh", expect="either",
     sh=ATTN + " --json /dev/stdout | head -c 5 >/dev/null; exit ${{PIPESTATUS[0]}}",
     check=lambda d, rc, out, err: None)

# ---- 6. SIGTERM ----------------------------------------------------------------------------------
C6 = "exit 143 after writing what was finished (as SIGINT does), no traceback"


def _term(what_check=None):
    def check(d, rc, out, err):
        if "Traceback" in err:
            return f"traceback: {_last(err)}"
        if rc != 143:
            extra = what_check(d, rc, out, err) if what_check else None
            return f"exit {rc}, expected 143" + (f"; {extra}" if extra else "")
        return what_check(d, rc, out, err) if what_check else None
    return check


def _json_has(path, key):
    def check(d, rc, out, err):
        p = Path(d) / path
        if not p.exists():
            return f"{path} was not written (the finished scores are lost)"
        data = json.loads(p.read_text())
        return None if key in json.dumps(data) else f"{path} lacks {key!r}"
    return check


def _records_in(path, n):
    def check(d, rc, out, err):
        p = Path(d) / path
        recs = [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []
        done = [r for r in recs if "text" in r]
        return None if len(done) >= n else f"{len(done)} finished records in {path}, expected >= {n}"
    return check


LONGB = ("printf '%s\\n' '{{\"prompt\": \"a\", \"max_new_tokens\": 2}}' '{{\"prompt\": \"b\", \"max_new_tokens\": 2}}' "
         "'{{\"prompt\": \"c\", \"max_new_tokens\": -1}}' > {d}/term.jsonl; ")
for cid, line, wait, delay, what, chk in [
        ("term-ppl-json", "exec {mini} ppl {llama} --text {d}/long.txt --mode recompute --max-tokens 6000 --threads 1 "
                          "--json {d}/out/term.json", "modes:", 3.0, "SIGTERM during ppl --json (recompute)",
         _json_has("out/term.json", "interrupted")),
        ("term-generate-endless", "exec {mini} generate {llama} --prompt hi --max-new-tokens -1 --ignore-eos --threads 1",
         "probe:torch", 4.0, "SIGTERM during an endless generate", None),
        ("term-chat-stdin-wait", "exec {mini} chat {llama} --max-new-tokens 2 --threads 1",
         "probe:torch", 4.0, "SIGTERM while chat waits on stdin", None),
        ("term-batch-stdout", LONGB + "exec {mini} batch {llama} --input {d}/term.jsonl --batch-size 3 --temperature 0 "
                              "--ignore-eos --threads 1", "at a time", 3.0,
         "SIGTERM during batch writing to stdout, 2 of 3 prompts done", None),
        ("term-batch-stdin-file", LONGB + "exec {mini} batch {llama} --input - --output {d}/out/tb.jsonl --batch-size 3 "
                                  "--ignore-eos --threads 1 < {d}/term.jsonl", "at a time", 3.0,
         "SIGTERM during batch --input - --output file, 2 of 3 prompts done", _records_in("out/tb.jsonl", 2)),
        ("term-load", "exec {mini} ppl {llama} --text {d}/long.txt --threads 1", "probe:torch", 0.0,
         "SIGTERM right after torch is imported (during start-up/loading)", None),
        ("term-attn", "exec {mini} attn {llama} --text {d}/long.txt --tokens 512 --png {d}/out/t.png --no-fast "
                      "--threads 1", "probe:torch", 3.0, "SIGTERM during attn",
         lambda d, rc, out, err: None if not list(Path(d, "out").glob(".t.png*")) else "a temporary file was left"),
        ("term-ppl-plot", "exec {mini} ppl {llama} --text {d}/long.txt --mode recompute --max-tokens 6000 --threads 1 "
                          "--plot {d}/out/tp.svg", "modes:", 3.0, "SIGTERM during ppl --plot",
         lambda d, rc, out, err: None if not [p for p in Path(d, "out").iterdir() if p.name.startswith(".tp")]
         else "a temporary file was left")]:
    case(f"6/{cid}", 6, what, C6, "sig", sh=line, sig=(signal.SIGTERM, wait, delay, 1), sig_check=_term(chk),
         timeout=60)
case("6/term-twice-ppl", 6, "two SIGTERMs 0.2 s apart during ppl --json", C6, "sig",
     sh="exec {mini} ppl {llama} --text {d}/long.txt --mode recompute --max-tokens 6000 --threads 1 "
        "--json {d}/out/term2.json", sig=(signal.SIGTERM, "modes:", 3.0, 2), timeout=60,
     sig_check=_term(_json_has("out/term2.json", "interrupted")))
case("6/int-then-term-batch", 6, "SIGINT then SIGTERM during batch --output file",
     "exit 130 or 143 with the finished records written, no traceback", "sig", timeout=60,
     sh=LONGB.replace("term.jsonl", "term3.jsonl") + "exec {mini} batch {llama} --input {d}/term3.jsonl "
        "--output {d}/out/tb3.jsonl --batch-size 3 --ignore-eos --threads 1",
     sig=("INT+TERM", "at a time", 3.0, 1),
     sig_check=lambda d, rc, out, err: (f"exit {rc}" if rc not in (130, 143) else None) or
     _records_in("out/tb3.jsonl", 2)(d, rc, out, err))

# ---- 7. deeply nested JSON -----------------------------------------------------------------------
C7 = "a per-line error record (batch) or exit 2 with one line naming the file/line, no RecursionError"
N = 100000


def _batch_records(n_ok, n_err):
    def check(d, rc, out, err):
        recs = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
        ok = [r for r in recs if "text" in r]
        bad = [r for r in recs if "error" in r]
        if len(ok) != n_ok or len(bad) != n_err:
            return f"{len(ok)} results + {len(bad)} error records, expected {n_ok} + {n_err}"
        return None
    return check


for cid, line, what in [
        ("batch-deep-id", '{"prompt": "hi", "id": ' + "[" * N + "]" * N + "}", "an id nested 10^5 lists deep"),
        ("batch-deep-dict-key", '{"prompt": "hi", "extra": ' + '{"a": ' * N + "1" + "}" * N + "}",
         "an unknown key holding a dict nested 10^5 deep"),
        ("batch-bare-brackets", "[" * N, "10^5 opening brackets and nothing else"),
        ("batch-deep-prompt", '{"prompt": ' + "[" * 5000 + '"x"' + "]" * 5000 + "}", "a prompt nested 5000 lists deep"),
        ("batch-deep-seed", '{"prompt": "hi", "seed": ' + '{"s": ' * 3000 + "1" + "}" * 3000 + "}",
         "a seed nested 3000 dicts deep")]:
    case(f"7/{cid}", 7, f"batch line 2 of 3 is {what}", "exit 2, an error record for line 2, the 2 others run",
         "cli", argv=["batch", "{llama}", "--input", f"{{d}}/{cid}.jsonl", "--max-new-tokens", "1"],
         prep=f"(D / '{cid}.jsonl').write_text(json.dumps({{'prompt': 'a'}}) + '\\n' + {line!r} + '\\n' + "
              f"json.dumps({{'prompt': 'b'}}) + '\\n')",
         expect="refuse", check=None)
    CASES[-1].check = _batch_records(2, 1)
    CASES[-1].expect = "records"
case("7/batch-stdin-deep", 7, "batch --input - with a 10^5-deep line on stdin",
     "exit 2, an error record for line 1, line 2 runs", "cli", expect="records",
     argv=["batch", "{llama}", "--input", "-", "--max-new-tokens", "1"],
     stdin=("[" * N + "\n" + '{"prompt": "b"}\n').encode(), check=_batch_records(1, 1))
case("7/chat-deep-turns", 7, 'a chat turns line {"turns": [[[...]]]} 10^5 deep', C7, "cli",
     argv=["chat", "{llama}", "--prompts", "{d}/deep-turns.jsonl", "--max-new-tokens", "1"],
     prep=f"(D / 'deep-turns.jsonl').write_text('{{\"turns\": ' + '[' * {N} + ']' * {N} + '}}\\n')")
case("7/chat-deep-extra", 7, "a chat turns line with an extra key nested 10^5 dicts deep", C7, "cli",
     argv=["chat", "{llama}", "--prompts", "{d}/deep-extra.jsonl", "--max-new-tokens", "1"],
     prep=f"(D / 'deep-extra.jsonl').write_text('{{\"turn\": \"hi\", \"x\": ' + '{{\"a\": ' * {N} + '1' + '}}' * {N} + '}}\\n')",
     expect="either", check=lambda d, rc, out, err: None if "1 turns" in err else "no '1 turns' summary")
for cid, fname, what in [
        ("rope-scaling-deep", "config.json", "config.json's rope_scaling nested 10^5 dicts deep"),
        ("tokcfg-deep", "tokenizer_config.json", "tokenizer_config.json with added_tokens_decoder 10^5 deep"),
        ("gencfg-deep", "generation_config.json", "generation_config.json with eos_token_id 10^5 lists deep"),
        ("index-deep", "model.safetensors.index.json", "the shard index's metadata nested 10^5 deep"),
        ("tokjson-deep", "tokenizer.json", "tokenizer.json's normalizer nested 10^5 deep (pythia-tiny)")]:
    key = {"config.json": "rope_scaling", "tokenizer_config.json": "added_tokens_decoder",
           "generation_config.json": "eos_token_id", "model.safetensors.index.json": "metadata",
           "tokenizer.json": "normalizer"}[fname]
    src = "PYTHIA" if fname == "tokenizer.json" else "None"
    body = ("'{\"a\": ' * N + '1' + '}' * N" if key != "eos_token_id" else "'[' * N + '1' + ']' * N")
    prep = f"c = copy('{cid}', {src}); p = c / '{fname}'; N = {N}; "
    if fname.startswith("model."):
        prep += "p.write_text(json.dumps({'weight_map': {'model.norm.weight': 'model.safetensors'}})); "
    prep += f"add_key_raw(p, '{key}', {body})"
    case(f"7/{cid}", 7, what, C7, "cli", argv=ck(cid), prep=prep)
case("7/api-load-config-deep", 7, "minillm.load_config on a config.json nested 10^5 deep under an unknown key",
     "a one-line MiniLLMError", "api", prep="c = copy('api-cfg-deep'); add_key_raw(c / 'config.json', 'x', '[' * 100000 + ']' * 100000)",
     code="import warnings\nwarnings.simplefilter('ignore')\nminillm.load_config(D + '/api-cfg-deep')")

# ---- 8. sampling at the edges --------------------------------------------------------------------
C8g = "greedy (the library's argmax tokens) or a one-line MiniLLMError; never a crash or a dropped token"
for cid, kw in [("top-p-1e-46", "top_p=1e-46"), ("top-p-5e-324", "top_p=5e-324"), ("top-p-1.4e-45", "top_p=1.4e-45"),
                ("top-p-1e-39", "top_p=1e-39"), ("temp-1e-45-topk1", "temperature=1e-45, top_k=1"),
                ("temp-1e-39", "temperature=1e-39"), ("temp-2^-149-top-p-2^-149", "temperature=2.0**-149, top_p=2.0**-149")]:
    case(f"8/api-{cid}", 8, f"generate({kw}) on a real prompt", C8g, "api", expect="either", group=True,
         code=f"ids = T().encode('It was a dark'); out = list(minillm.generate(M(), ids, max_new_tokens=6, "
              f"ignore_eos=True, {kw})); want(out == greedy(ids, 6), f'not greedy: {{out}} vs {{greedy(ids, 6)}}')")
C8v = "valid token ids (the right count), or a one-line MiniLLMError"
for cid, kw in [("temp-inf", "temperature=float('inf')"), ("temp-1e308", "temperature=1e308"),
                ("temp-3.5e38", "temperature=3.5e38"), ("top-k-2^63", "top_k=2**63"),
                ("top-k-2^63-1", "top_k=2**63 - 1"), ("top-p-tiny-temp-huge", "top_p=1e-40, temperature=1e30"), ("top-k-2^31", "top_k=2**31"), ("top-k-10^100", "top_k=10**100"),
                ("top-p-1-minus-ulp", "top_p=1 - 2**-53"), ("top-p-subnormal-f32-plus", "top_p=2.0**-126"),
                ("top-k-vocab-plus-1", "top_k=4097"), ("temp-1e-30-top-k-2", "temperature=1e-30, top_k=2"),
                ("seed-2^64-1-temp-huge", "seed=2**64 - 1, temperature=1e38")]:
    case(f"8/api-{cid}", 8, f"generate({kw})", C8v, "api", expect="either", group=True,
         code=f"out = list(minillm.generate(M(), [1, 50, 60], max_new_tokens=5, ignore_eos=True, {kw})); "
              f"valid_ids(out, 5)")
case("8/api-request-temp-1e-320", 8, "generate_batch with Request(temperature=1e-320) (a float64 subnormal)", C8g,
     "api", expect="either", group=True,
     code="ids = T().encode('The whale'); ev = list(minillm.generate_batch(M(), [minillm.Request(ids, temperature=1e-320)], "
          "max_new_tokens=5, ignore_eos=True)); out = [e.token for e in ev]; want(out == greedy(ids, 5), f'{out}')")
case("8/api-chat-top-p-1e-50", 8, "ChatSession(top_p=1e-50).turn", C8g, "api", expect="either", group=True,
     code="s = minillm.ChatSession(M(), T(), top_p=1e-50, max_new_tokens=4); text = ''.join(s.turn('Hello')); "
          "s2 = minillm.ChatSession(M(), T(), temperature=0, max_new_tokens=4); want(text == ''.join(s2.turn('Hello')), "
          "f'{text!r} is not the greedy reply')")
for cid, flags in [("cli-top-p-1e-50", ["--top-p", "1e-50"]), ("cli-temp-1e-39", ["--temperature", "1e-39"]),
                   ("cli-top-p-1e-45-temp-1e-45", ["--top-p", "1e-45", "--temperature", "1e-45"])]:
    case(f"8/{cid}", 8, f"generate {' '.join(flags)}", "exit 0 with the greedy text (checked), or exit 2 one line",
         "cli", expect="either",
         argv=["generate", "{llama}", "--prompt", "It was a dark", "--max-new-tokens", "6", "--ignore-eos"] + flags,
         check=lambda d, rc, out, err: _same_as_greedy(d, out))
for cid, flags in [("cli-temp-1e309", ["--temperature", "1e309"]), ("cli-top-k-10^20", ["--top-k", "1" + "0" * 20]),
                   ("cli-top-k-2^63", ["--top-k", str(2**63)]), ("cli-temp-3.4e38", ["--temperature", "3.4e38"])]:
    case(f"8/{cid}", 8, f"generate {' '.join(flags)}", "exit 0 with 4 tokens, or exit 2 one line", "cli",
         expect="either", argv=["generate", "{llama}", "--prompt", "hi", "--max-new-tokens", "4", "--ignore-eos"] + flags,
         check=lambda d, rc, out, err: None if "4 tokens" in err else "no '4 tokens' summary")
case("8/batch-line-temp-1e400", 8, 'a batch line with "temperature": 1e400 (JSON reads inf)',
     "an error record for the line (exit 2) or 3 valid tokens", "cli", expect="either",
     argv=["batch", "{llama}", "--input", "{d}/temp-inf.jsonl", "--max-new-tokens", "3", "--ignore-eos"],
     prep="(D / 'temp-inf.jsonl').write_text('{\"prompt\": \"hi\", \"temperature\": 1e400}\\n')",
     check=lambda d, rc, out, err: None if '"tokens": 3' in out else f"no 3-token record: {out[:100]!r}")
case("8/batch-line-temp-neg-zero", 8, 'a batch line with "temperature": -0.0', "greedy or a clean error record", "cli",
     expect="either", argv=["batch", "{llama}", "--input", "{d}/temp-negz.jsonl", "--max-new-tokens", "3", "--ignore-eos"],
     prep="(D / 'temp-negz.jsonl').write_text('{\"prompt\": \"hi\", \"temperature\": -0.0}\\n')",
     check=lambda d, rc, out, err: None if '"tokens": 3' in out else f"no 3-token record: {out[:100]!r}")

# ---- 9. API argument types -----------------------------------------------------------------------
C9 = "a one-line MiniLLMError naming the argument"
API9 = [
    ("generate-bytes-prompt", "list(minillm.generate(M(), b'hello', max_new_tokens=2))",
     "generate(model, b'hello'): bytes are a sequence of ints, read as token ids"),
    ("generate-bytearray", "list(minillm.generate(M(), bytearray(b'hi'), max_new_tokens=2))", "generate(bytearray)"),
    ("generate-dict-prompt", "list(minillm.generate(M(), {5: 'a', 9: 'b'}, max_new_tokens=2))",
     "generate(prompt={5: 'a', 9: 'b'}): a dict, read as its keys"),
    ("generate-set-prompt", "list(minillm.generate(M(), {3, 1, 2}, max_new_tokens=2))", "generate(prompt={3, 1, 2}): unordered"),
    ("generate-2d-tensor", "list(minillm.generate(M(), torch.tensor([[1, 2], [3, 4]]), max_new_tokens=2))",
     "generate(2-D tensor of 2 rows)"),
    ("generate-max-new-inf", "list(minillm.generate(M(), [1, 2], max_new_tokens=float('inf')))", "max_new_tokens=inf"),
    ("generate-max-new-np", "import numpy as np\nlist(minillm.generate(M(), [1, 2], max_new_tokens=np.float64(2.5)))",
     "max_new_tokens=np.float64(2.5)"),
    ("generate-eos-dict", "list(minillm.generate(M(), [1, 2], max_new_tokens=2, eos_ids={1: 'x'}))", "eos_ids={1: 'x'}"),
    ("generate-eos-huge", "list(minillm.generate(M(), [1, 2], max_new_tokens=2, eos_ids=[2**70]))", "eos_ids=[2**70]"),
    ("generate-eos-bytes", "list(minillm.generate(M(), [1, 2], max_new_tokens=2, eos_ids=b'\\x02'))", "eos_ids=b'\\x02'"),
    ("generate-ignore-eos-str", "list(minillm.generate(M(), [1, 2], max_new_tokens=2, ignore_eos='no'))",
     "ignore_eos='no' (a truthy string)"),
    ("generate-temperature-bool", "list(minillm.generate(M(), [1, 2], max_new_tokens=2, temperature=True))",
     "temperature=True"),
    ("generate-top-k-bool", "list(minillm.generate(M(), [1, 2], max_new_tokens=2, top_k=True))", "top_k=True"),
    ("generate-top-p-complex", "list(minillm.generate(M(), [1, 2], max_new_tokens=2, top_p=0.5j))", "top_p=0.5j"),
    ("generate-vocab-size-huge", "list(minillm.generate(M(), [1, 2], max_new_tokens=2, vocab_size=10**12))",
     "vocab_size=10**12 (past the model's vocabulary)"),
    ("generate-window-np-int", "import numpy as np\nlist(minillm.generate(M(), [1, 2], max_new_tokens=2, window=np.int64(-3)))",
     "window=np.int64(-3)"),
    ("model-lengths-str", "c = M().new_cache(2, 2, 8); M()(torch.ones(2, 3, dtype=torch.long), cache=c, lengths='12')",
     "model(..., lengths='12')"),
    ("model-lengths-float", "c = M().new_cache(2, 2, 8); M()(torch.ones(2, 3, dtype=torch.long), cache=c, lengths=[1.5, 2])",
     "model(..., lengths=[1.5, 2])"),
    ("model-lengths-float-tensor", "c = M().new_cache(2, 2, 8); M()(torch.ones(2, 3, dtype=torch.long), cache=c, "
     "lengths=torch.tensor([2.5, 1.0]))", "lengths=torch.tensor([2.5, 1.0])"),
    ("model-lengths-huge", "c = M().new_cache(2, 2, 8); M()(torch.ones(2, 3, dtype=torch.long), cache=c, lengths=[2**70, 1])",
     "lengths=[2**70, 1]"),
    ("model-lengths-wrong-count", "c = M().new_cache(2, 2, 8); M()(torch.ones(2, 3, dtype=torch.long), cache=c, lengths=[1])",
     "lengths of 1 entry for 2 rows"),
    ("model-logits-keep-neg", "M()(torch.ones(1, 3, dtype=torch.long), logits_to_keep=-1)", "logits_to_keep=-1"),
    ("model-logits-keep-float", "M()(torch.ones(1, 3, dtype=torch.long), logits_to_keep=1.5)", "logits_to_keep=1.5"),
    ("model-logits-keep-str", "M()(torch.ones(1, 3, dtype=torch.long), logits_to_keep='2')", "logits_to_keep='2'"),
    ("model-cache-rows-mismatch", "c = M().new_cache(3, 2, 8); M()(torch.ones(1, 3, dtype=torch.long), cache=c)",
     "a 1-row input into a 3-row cache"),
    ("model-attn-probs-tuple", "M()(torch.ones(1, 3, dtype=torch.long), attn_probs=())", "attn_probs=()"),
    ("new-cache-batch-float", "M().new_cache(batch_size=2.0)", "new_cache(batch_size=2.0)"),
    ("new-cache-sinks-bool", "M().new_cache(sinks=True)", "new_cache(sinks=True)"),
    ("cache-reset-out-of-range", "M().new_cache(2, 2, 8).reset(rows=[5])", "cache.reset(rows=[5])"),
    ("cache-reset-str", "M().new_cache(2, 2, 8).reset(rows='0')", "cache.reset(rows='0')"),
    ("cache-export-neg", "M().new_cache(2, 2, 8).export_row(-1)", "cache.export_row(-1)"),
    ("cache-export-float", "M().new_cache(2, 2, 8).export_row(1.0)", "cache.export_row(1.0)"),
    ("cache-import-str", "M().new_cache(2, 2, 8).import_row(0, 'state')", "cache.import_row(0, 'state')"),
    ("cache-import-other-shape", "s = M().new_cache(1, 2, 8).export_row(0); M().new_cache(1, 4, 16).import_row(0, s)",
     "import a RowState of a 2+8 cache into a 4+16 cache"),
    ("cache-tokens-seen-nan", "c = M().new_cache(1, 2, 8); c.tokens_seen = float('nan')", "cache.tokens_seen = nan"),
    ("cache-tokens-seen-str", "c = M().new_cache(1, 2, 8); c.tokens_seen = '5'", "cache.tokens_seen = '5'"),
    ("cache-tokens-seen-neg", "c = M().new_cache(1, 2, 8); c.tokens_seen = -3", "cache.tokens_seen = -3"),
    ("chat-tokenizer-str", "minillm.ChatSession(M(), 'weights/llama-tiny')", "ChatSession(model, a path as the tokenizer)"),
    ("chat-row-out-of-range", "c = M().new_cache(2, 4, 60); minillm.ChatSession(M(), T(), cache=c, row=7)",
     "ChatSession(cache of 2 rows, row=7)"),
    ("chat-row-without-cache", "minillm.ChatSession(M(), T(), row=1)", "ChatSession(row=1) without a cache"),
    ("chats-n-zero", "minillm.ChatSessions(M(), T(), 0)", "ChatSessions(n=0)"),
    ("chats-n-float", "minillm.ChatSessions(M(), T(), 2.0)", "ChatSessions(n=2.0)"),
    ("chats-turns-bad-index", "list(minillm.ChatSessions(M(), T(), 2, max_new_tokens=1).turns({5: 'hi'}))",
     "ChatSessions.turns({5: 'hi'}) on 2 sessions"),
    ("chats-turns-int-text", "list(minillm.ChatSessions(M(), T(), 2, max_new_tokens=1).turns({0: 5}))",
     "ChatSessions.turns({0: 5})"),
    ("chats-turns-bool-key", "list(minillm.ChatSessions(M(), T(), 2, max_new_tokens=1).turns({True: 'hi'}))",
     "ChatSessions.turns({True: 'hi'})"),
    ("chat-turn-bytes", "list(minillm.ChatSession(M(), T(), max_new_tokens=1).turn(b'hi'))", "ChatSession.turn(b'hi')"),
    ("chat-turn-none", "list(minillm.ChatSession(M(), T(), max_new_tokens=1).turn(None))", "ChatSession.turn(None)"),
    ("tok-encode-none", "T().encode(None)", "tok.encode(None)"),
    ("tok-encode-int", "T().encode(123)", "tok.encode(123)"),
    ("tok-decode-none", "T().decode(None)", "tok.decode(None)"),
    ("tok-decode-2d", "T().decode(torch.tensor([[1, 2], [3, 4]]))", "tok.decode(2-D tensor)"),
    ("tok-decode-huge-id", "T().decode([2**70])", "tok.decode([2**70])"),
    ("tok-decoder-push-huge", "T().decoder().push(2**70)", "tok.decoder().push(2**70)"),
    ("tok-decoder-push-float", "T().decoder().push(1.0)", "tok.decoder().push(1.0)"),
    ("tok-decoder-push-neg", "T(PYTHIA).decoder().push(-3)", "pythia tok.decoder().push(-3)"),
    ("tok-encode-add-bos-str", "T().encode('hi', add_bos='no')", "tok.encode('hi', add_bos='no')"),
    ("request-none-ids", "list(minillm.generate_batch(M(), [minillm.Request(None)], max_new_tokens=1))",
     "generate_batch([Request(None)])"),
    ("request-seed-str", "list(minillm.generate_batch(M(), [minillm.Request([1, 2], seed='7')], max_new_tokens=1))",
     "Request(seed='7')"),
    ("batch-mixed-text", "list(minillm.generate_batch(M(), [[1, 2], 'text'], max_new_tokens=1))",
     "generate_batch([[1, 2], 'text'])"),
    ("batch-bytes-prompt", "list(minillm.generate_batch(M(), [b'abc'], max_new_tokens=1))",
     "generate_batch([b'abc']): bytes read as ids"),
    ("batch-dict-prompts", "list(minillm.generate_batch(M(), {0: [1, 2]}, max_new_tokens=1))",
     "generate_batch({0: [1, 2]}): a dict of prompts"),
    ("save-none-dir", "minillm.save_pretrained(M(), None)", "save_pretrained(model, None)"),
    ("save-dev-null", "minillm.save_pretrained(M(), '/dev/null')", "save_pretrained(model, '/dev/null')"),
    ("save-not-a-model", "minillm.save_pretrained('weights/llama-tiny', D + '/out/s1')", "save_pretrained(a path, dir)"),
    ("quantize-none", "minillm.quantize_int8(None)", "quantize_int8(None)"),
    ("quantize-head-str", "minillm.quantize_int8(minillm.load(LLAMA), head='yes')", "quantize_int8(head='yes')"),
    ("ppl-prefix-str", "minillm.evaluate.perplexity(M(), list(range(1, 30)), prefix='ab')", "perplexity(prefix='ab')"),
    ("ppl-prefix-neg", "minillm.evaluate.perplexity(M(), list(range(1, 30)), prefix=[-1])", "perplexity(prefix=[-1])"),
    ("ppl-interruptible-str", "minillm.evaluate.perplexity(M(), list(range(1, 30)), interruptible='yes')",
     "perplexity(interruptible='yes')"),
    ("ppl-exact-loop-int", "minillm.evaluate.perplexity(M(), list(range(1, 30)), exact_loop=2)", "perplexity(exact_loop=2)"),
    ("attn-tokens-bool", "from minillm.apps import attention_maps as a\na.attention_probs(M(), [1, 2, 3, 4], tokens=True)",
     "attention_probs(tokens=True)"),
    ("sink-scores-minq-float", "from minillm.apps import attention_maps as a\n"
     "a.attention_sink_scores(M(), [1, 2, 3, 4, 5, 6], min_query=1.5)", "attention_sink_scores(min_query=1.5)"),
    ("parse-dtype-none", "minillm.parse_dtype(None)", "parse_dtype(None)"),
    ("parse-device-int", "minillm.parse_device(3.5)", "parse_device(3.5)"),
    ("load-bytes-path", "minillm.load(LLAMA.encode())", "load(a bytes path)"),
    ("load-list-path", "minillm.load([LLAMA])", "load([path])"),
    ("load-dtype-f8e5m2", "m = minillm.load(LLAMA, dtype=torch.float8_e5m2); list(minillm.generate(m, [1, 2], max_new_tokens=1))",
     "load(dtype=torch.float8_e5m2) then generate"),
    ("load-dtype-complex", "minillm.load(LLAMA, dtype=torch.complex64)", "load(dtype=torch.complex64)"),
    ("load-tokenizer-none", "minillm.load_tokenizer(None)", "load_tokenizer(None)"),
    ("load-tokenizer-int", "minillm.load_tokenizer(7)", "load_tokenizer(7)"),
    ("load-config-none", "minillm.load_config(None)", "load_config(None)"),
    ("from-hf-config-list", "minillm.from_hf_config([])", "from_hf_config([])"),
    ("from-hf-config-type-int", "minillm.from_hf_config({'model_type': 5})", "from_hf_config({'model_type': 5})"),
    ("compile-decode-str", "minillm.compile_decode('model')", "compile_decode('model')"),
]
for cid, code, what in API9:
    case(f"9/{cid}", 9, what, C9, "api", code=code, group=True)
case("9/generate-max-new-1e15-lazy", 9, "generate(max_new_tokens=10**15), taking 3 tokens",
     "3 valid tokens at once (a lazy generator), or a one-line MiniLLMError", "api", expect="either", group=True,
     code="import itertools\nout = list(itertools.islice(minillm.generate(M(), [1, 2], max_new_tokens=10**15, "
          "ignore_eos=True), 3)); valid_ids(out, 3)")
case("9/generate-numpy-ids", 9, "generate(np.array([1, 50, 60]))", "the same tokens as the list, or a one-line error",
     "api", expect="either", group=True,
     code="import numpy as np\nout = list(minillm.generate(M(), np.array([1, 50, 60]), max_new_tokens=3, temperature=0, "
          "ignore_eos=True)); want(out == greedy([1, 50, 60], 3), f'{out}')")
case("9/generate-range-ids", 9, "generate(range(1, 6))", "the same tokens as the list, or a one-line error", "api",
     expect="either", group=True,
     code="out = list(minillm.generate(M(), range(1, 6), max_new_tokens=3, temperature=0, ignore_eos=True)); "
          "want(out == greedy([1, 2, 3, 4, 5], 3), f'{out}')")
case("9/save-onto-loaded-dir", 9, "save_pretrained(other model, the directory a live model was loaded from)",
     "the live model keeps its weights and the directory reloads as the saved model, or a one-line MiniLLMError",
     "api", expect="either", prep="copy('save-src')",
     code="""
src = D + '/save-src'; m = minillm.load(src)
w0 = m.lm_head.weight.detach().clone() if getattr(m, 'lm_head', None) is not None else None
other = minillm.load(LLAMA)
with torch.no_grad():
    for p in other.parameters():
        p.mul_(0.5)
minillm.save_pretrained(other, src)
if w0 is not None:
    want(torch.equal(m.lm_head.weight.detach(), w0), 'the live model changed when its file was overwritten')
want(m(torch.tensor([[1, 50, 60]])).isfinite().all(), 'the live model gives non-finite logits after the save')
back = minillm.load(src)
want(torch.allclose(back(torch.tensor([[1, 50, 60]])), other(torch.tensor([[1, 50, 60]]))), 'the saved checkpoint is not the saved model')
""")

# ---- 10. API memory bombs ------------------------------------------------------------------------
C10 = "a one-line MiniLLMError before allocating (the cap is not hit)"
for cid, code, what in [
        ("new-cache-batch-1e9", "M().new_cache(batch_size=10**9, window=8)", "new_cache(batch_size=10**9, window=8)"),
        ("new-cache-sinks-1e9", "M().new_cache(1, sinks=10**9, window=1)", "new_cache(sinks=10**9, window=1)"),
        ("new-cache-2^20x2^10", "M().new_cache(batch_size=2**20, sinks=0, window=2**10)", "new_cache(2^20 rows x 2^10 keys)"),
        ("generate-batch-window-1e8", "list(minillm.generate_batch(M(), [[1, 2]] * 3, window=10**8, max_new_tokens=1))",
         "generate_batch(window=10**8)"),
        ("generate-batch-endless-rows", "import itertools\nlist(itertools.islice(minillm.generate_batch(M(), "
         "itertools.repeat([1, 2]), batch_size=10**6, max_new_tokens=1), 2))", "generate_batch(an endless iterator, batch_size=10**6)"),
        ("chats-1e7", "minillm.ChatSessions(M(), T(), 10**7, window=4)", "ChatSessions(n=10**7, window=4)"),
        ("forward-batch-64x4096", "M()(torch.ones(64, 4096, dtype=torch.long))",
         "a dense forward of 64 x 4096 tokens (its logits alone are 4.3 GB)"),
        ("forward-300k-tokens", "M()(torch.ones(1, 300000, dtype=torch.long))",
         "a dense forward over 300,000 tokens (logits 4.9 GB)"),
        ("forward-keep-all-300k-cache", "c = M().new_cache(1, 4, 60); M()(torch.ones(1, 300000, dtype=torch.long), cache=c)",
         "a 300,000-token chunk through a 64-key cache, every logit kept (4.9 GB)"),
        ("ppl-block-1e6-long", "ids = list(range(1, 4000)) * 30\nminillm.evaluate.perplexity(M(), ids, block=10**6)",
         "perplexity(120k ids, block=10**6)"),
        ("ppl-dense-200k", "ids = list(range(1, 4000)) * 50\nminillm.evaluate.perplexity(M(), ids, mode='dense', "
         "dense_max_tokens=10**6)", "perplexity(200k ids, mode='dense', dense_max_tokens=10**6)"),
        ("sink-scores-20k", "from minillm.apps import attention_maps as a\n"
         "a.attention_sink_scores(M(), list(range(1, 4000)) * 5, tokens=20000)", "attention_sink_scores(tokens=20000)"),
        ("attn-maps-probs-given-huge", "from minillm.apps import attention_maps as a\n"
         "a.attention_maps(M(), list(range(1, 4000)) * 5, tokens=20000)", "attention_maps(tokens=20000)"),
        ("tok-decode-1e8-ids", "T().decode([5] * 10**8)", "tok.decode of 10^8 ids (the caller's list is 800 MB)")]:
    case(f"10/{cid}", 10, what, C10, "api", code=code, timeout=45)
CASES[-1].expect, CASES[-1].clean = "either", "text, or a one-line MiniLLMError; the cap is not hit"
CASES[-1].code = "out = T().decode([5] * 10**8); want(isinstance(out, str), 'not a str')"

# ---- 11. messages name the real cause ------------------------------------------------------------
C11 = "exit 2, one line naming the real cause (and no flag the user did not give)"
for cid, kv, frag, avoid, what in [
        ("hidden-36-heads-8", {"hidden_size": 36, "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": None},
         "hidden_size", ("rotary_dim",), "hidden_size 36 over 8 heads (not divisible)"),
        ("kv-heads-3-of-8", {"num_key_value_heads": 3}, "num_key_value_heads", (), "num_key_value_heads 3 with 8 heads"),
        ("max-pos-2", {"max_position_embeddings": 2}, "max_position_embeddings", ("(got --cache-size",),
         "max_position_embeddings 2 (no cache flag given)"),
        ("max-pos-4", {"max_position_embeddings": 4}, "max_position_embeddings", ("(got --cache-size",),
         "max_position_embeddings 4 = the default sinks (no cache flag given)"),
        ("vocab-5000-digits", {"vocab_size": "INT5000"}, "vocab_size", ("set_int_max_str_digits",),
         "vocab_size written with 5000 digits"),
        ("layers-float", {"num_hidden_layers": 6.5}, "num_hidden_layers", (), "num_hidden_layers 6.5"),
        ("eps-1e400", {"rms_norm_eps": "FLOAT1e400"}, "rms_norm_eps", (), "rms_norm_eps 1e400 (JSON reads inf)")]:
    kv = {k: v for k, v in kv.items() if v is not None}
    prep = f"c = copy('{cid}'); cfg(c, drop={('head_dim',) if cid.startswith('hidden') else ()!r}, **{kv!r})"
    if "INT5000" in str(kv) or "FLOAT" in str(kv):
        k = next(iter(kv))
        lit = "'9' * 5000" if "INT5000" in str(kv) else "'1e400'"
        prep = (f"c = copy('{cid}'); p = c / 'config.json'; t = json.loads(p.read_text()); t['{k}'] = 0; "
                f"p.write_text(json.dumps(t).replace('\"{k}\": 0', '\"{k}\": ' + {lit}))")
    case(f"11/{cid}", 11, f"config.json {what}", C11, "cli", argv=ck(cid), prep=prep, frag=frag, avoid=avoid)
case("11/gguf-context-3", 11, "a GGUF with context_length 3, run with no cache flags", C11, "cli",
     argv=["ppl", "{d}/ctx3.gguf", "--text", "{d}/ok.txt"], prep="gguf_file('ctx3.gguf', arch={'context_length': 3})",
     frag="context", avoid=("(got --cache-size",))  # blamed on a flag never given; advising one is fine
case("11/gguf-heads-0", 11, "a GGUF with head_count 0", C11, "cli",
     argv=["generate", "{d}/heads0.gguf", "--prompt", "hi"], prep="gguf_file('heads0.gguf', arch={'attention.head_count': 0})",
     frag="head_count", avoid=("division", "ZeroDivision"))
case("11/gencfg-eos-5000-digits", 11, "generation_config.json eos_token_id with 5000 digits", C11, "cli",
     argv=ck("gencfg-digits"), frag="eos_token_id", avoid=("set_int_max_str_digits",),
     prep="c = copy('gencfg-digits'); (c / 'generation_config.json').write_text('{\"eos_token_id\": ' + '7' * 5000 + '}')")
case("11/batch-line-max-new-5000-digits", 11, "a batch line with max_new_tokens of 5000 digits",
     "an error record naming max_new_tokens, exit 2, without sys.set_int_max_str_digits advice", "cli", expect="records",
     argv=["batch", "{llama}", "--input", "{d}/mnt-digits.jsonl", "--max-new-tokens", "1"],
     prep="(D / 'mnt-digits.jsonl').write_text('{\"prompt\": \"hi\", \"max_new_tokens\": ' + '8' * 5000 + '}\\n"
          "{\"prompt\": \"b\"}\\n')",
     check=lambda d, rc, out, err: "advises set_int_max_str_digits: " + next(
         ln for ln in (out + err).splitlines() if "set_int_max_str_digits" in ln)[:200]
     if "set_int_max_str_digits" in out + err else _batch_records(1, 1)(d, rc, out, err), check_outcome="misleading")
case("11/cli-top-k-5000-digits", 11, "--top-k with 5000 digits", "exit 2, one line on --top-k, no int-digits advice",
     "cli", argv=["generate", "{llama}", "--prompt", "hi", "--top-k", "9" * 5000], frag="--top-k",
     avoid=("set_int_max_str_digits",))
case("11/st-f8-dtype", 11, "a safetensors tensor stored as F8_E4M3 (upcast exactly, or refused by name)",
     "exit 0 with 1 token, or exit 2 naming model.norm.weight", "cli", argv=ck("st-f8") + ["--ignore-eos"],
     frag="model.norm.weight", expect="either", check=lambda d, rc, out, err: None if "1 tokens" in err else "no '1 tokens'", prep="from safetensors.torch import save_file\nimport torch\nc = copy('st-f8'); t = st_tensors(); "
     "t['model.norm.weight'] = t['model.norm.weight'].to(torch.float8_e4m3fn); save_file(t, str(c / 'model.safetensors'))")
case("11/only-bin", 11, "a checkpoint with only pytorch_model.bin", "exit 2, one line pointing at tools/convert_bin.py",
     "cli", argv=ck("only-bin"), frag="convert",
     prep="c = copy('only-bin'); (c / 'model.safetensors').rename(c / 'pytorch_model.bin')")
case("11/model-trailing-newline", 11, "the model path with a trailing newline", "exit 2, one line showing the path",
     "cli", argv=["generate", "{llama}\n", "--prompt", "hi"], frag="llama-tiny")
case("11/device-cuda-cpu-torch", 11, "--device cuda on a CPU-only torch", "exit 2, one line saying CUDA is unavailable",
     "cli", argv=["generate", "{llama}", "--prompt", "hi", "--device", "cuda"], frag="cuda")
case("11/pythia-rotary-pct-tiny", 11, "pythia config rotary_pct 0.001 (less than 2 rotated dims)", C11, "cli",
     argv=ck("rotary-tiny"), frag="rotary_pct", prep="cfg(copy('rotary-tiny', PYTHIA), rotary_pct=0.001)")
case("11/llama-hidden-act-relu", 11, "config.json hidden_act 'relu6' (unsupported)", C11, "cli",
     argv=ck("act-relu6"), frag="hidden_act", prep="cfg(copy('act-relu6'), hidden_act='relu6')")


def _last(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


GREEDY_CACHE: dict = {}


def _same_as_greedy(d, out):
    g = GREEDY_CACHE.get("g")
    if g is None:
        return None if out.strip() else "empty output"
    return None if out == g else f"not the greedy text: {out[:60]!r} vs {g[:60]!r}"


# ------------------------------------------------------------------------------------------------
# Running

def _limits(mem_bytes):
    def pre():
        os.setsid()
        resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return pre


class Runner:
    def __init__(self, tree: Path, d: Path, timeout: float, mem: int):
        self.tree, self.d, self.timeout, self.mem = tree, d, timeout, mem
        self.env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                        HF_HUB_OFFLINE="1", SWEEP_D=str(d), SWEEP_TREE=str(tree), PYTHONDONTWRITEBYTECODE="1",
                        TQDM_DISABLE="1")
        self.mini = f"{sys.executable} -m minillm"

    def subs(self, s: str) -> str:
        return s.replace("{d}", str(self.d)).replace("{llama}", str(self.tree / "weights" / "llama-tiny")) \
            .replace("{mini}", self.mini).replace("{{", "{").replace("}}", "}")

    def popen(self, args, timeout, stdin=None, env=None, shell=False):
        p = subprocess.Popen(args, cwd=self.d, env=env or self.env, stdin=subprocess.PIPE if stdin is not None
                             else subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             preexec_fn=_limits(self.mem))
        try:
            out, err = p.communicate(stdin, timeout=timeout)
            return p.returncode, out.decode(errors="replace"), err.decode(errors="replace"), False
        except subprocess.TimeoutExpired:
            _kill_group(p)
            out, err = p.communicate()
            return None, out.decode(errors="replace"), err.decode(errors="replace"), True

    # -- API ---------------------------------------------------------------------------------
    def run_api(self, cases: list[Case], per_case_alarm: bool) -> dict:
        res_file = Path(tempfile.mktemp(prefix="res-", suffix=".jsonl", dir=self.d))
        res_file.touch()
        body = [API_HEAD]
        for c in cases:
            body.append(f"run_one({c.id!r}, {textwrap.dedent(c.code)!r}, {int(c.timeout or self.timeout) if per_case_alarm else 0})")
        env = dict(self.env, SWEEP_RESULT=str(res_file))
        limit = sum((c.timeout or self.timeout) for c in cases) if per_case_alarm else (cases[0].timeout or self.timeout)
        limit = min(limit, 30 + 20 * len(cases)) if len(cases) > 1 else limit
        t0 = time.time()
        script = res_file.with_suffix(".py")
        script.write_text("\n".join(body))
        rc, out, err, timed_out = self.popen([sys.executable, str(script)], limit, env=env)
        script.unlink()
        got = {}
        for line in res_file.read_text().splitlines():
            r = json.loads(line)
            got[r["id"]] = r
        res_file.unlink()
        if len(cases) == 1 and cases[0].id not in got:
            c = cases[0]
            if timed_out:
                got[c.id] = {"status": "hang", "msg": f"no result after {limit:.0f} s"}
            elif _is_memory(err, rc):
                got[c.id] = {"status": "memory", "msg": _memline(err, rc)}
            else:
                got[c.id] = {"status": "exception", "msg": f"process ended (exit {rc}): {_last(err)}"}
            got[c.id]["seconds"] = round(time.time() - t0, 1)
        return got

    # -- CLI ---------------------------------------------------------------------------------
    def run_cli(self, c: Case):
        timeout = c.timeout or self.timeout
        if c.kind == "cli":
            argv = [self.subs(a) for a in c.argv]
            if argv and argv[0] in ("generate", "chat", "ppl", "attn", "batch") and "--threads" not in argv:
                argv += ["--threads", "1"]
            return self.popen([sys.executable, "-m", "minillm", *argv], timeout, stdin=c.stdin)
        return self.popen(["bash", "-c", self.subs(c.sh)], timeout, stdin=c.stdin)

    def run_sig(self, c: Case):
        sig, wait, delay, repeat = c.sig
        probe = self.d / f"probe-{abs(hash(c.id))}.txt"
        env = dict(self.env, MINILLM_STARTUP_PROBE=str(probe))
        errf = tempfile.TemporaryFile()
        outf = tempfile.TemporaryFile()
        p = subprocess.Popen(["bash", "-c", self.subs(c.sh)], cwd=self.d, env=env,
                             stdin=subprocess.PIPE if "chat" in c.sh and "--prompts" not in c.sh else subprocess.DEVNULL,
                             stdout=outf, stderr=errf, preexec_fn=_limits(self.mem))
        t0 = time.time()
        limit = c.timeout or self.timeout
        reached = False
        while time.time() - t0 < limit and p.poll() is None:
            if wait.startswith("probe:"):
                reached = probe.exists() and wait[6:] in probe.read_text()
            else:
                errf.seek(0)
                reached = wait in errf.read().decode(errors="replace")
            if reached:
                break
            time.sleep(0.1)
        sent = False
        if reached and p.poll() is None:
            time.sleep(delay)
            sigs = [signal.SIGINT, signal.SIGTERM] if sig == "INT+TERM" else [sig] * repeat
            for s in sigs:
                try:
                    p.send_signal(s)
                except ProcessLookupError:
                    pass
                time.sleep(0.2)
            sent = True
        try:
            rc = p.wait(timeout=max(5.0, limit - (time.time() - t0)) if sent else max(1.0, limit - (time.time() - t0)))
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(p)
            p.wait()
            rc, timed_out = None, True
        errf.seek(0)
        outf.seek(0)
        err, out = errf.read().decode(errors="replace"), outf.read().decode(errors="replace")
        if not sent and not timed_out:
            return rc, out, err, False, f"ended (exit {rc}) before the signal point {wait!r}: {_last(err)}"
        return rc, out, err, timed_out, None


def _kill_group(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            p.kill()
        except ProcessLookupError:
            pass


def _is_memory(err: str, rc) -> bool:
    return any(m in err for m in MEMORY_MARKS) or rc in (-signal.SIGKILL, -signal.SIGSEGV, -signal.SIGABRT, 137, 134, 139) \
        and ("alloc" in err.lower() or "memory" in err.lower())


def _memline(err, rc):
    for ln in err.splitlines():
        if any(m in ln for m in MEMORY_MARKS):
            return ln.strip()[:300]
    return f"exit {rc}: {_last(err)}"


def _msg_ok(c: Case, msg: str) -> str | None:
    """None if the refusal's message is right for this case, else why it misleads."""
    low = msg.lower()
    if c.frag and c.frag.lower() not in low:
        return f"message lacks {c.frag!r}: {msg[:200]}"
    for a in c.avoid:
        if a.lower() in low:
            return f"message names {a!r}: {msg[:200]}"
    return None


def classify_api(c: Case, r: dict) -> tuple[str, str]:
    st, msg = r["status"], r.get("msg", "")
    if st == "ok":
        if c.expect == "refuse":
            return "silently wrong", f"accepted (no error): {c.desc}"
        return "clean", "checked success"
    if st == "wrong":
        return "silently wrong", msg
    if st == "refused":
        lines = msg.strip().splitlines()
        if len(lines) != 1:
            return "misleading", f"MiniLLMError of {len(lines)} lines: {lines[0][:200] if lines else ''!r}"
        if c.expect == "ok":
            return "misleading", f"refused a legitimate input: {msg[:200]}"
        bad = _msg_ok(c, msg)
        return ("misleading", bad) if bad else ("clean", msg[:200])
    if st == "hang":
        return "hang", msg
    if st == "memory" or (st == "exception" and any(m in msg for m in MEMORY_MARKS)):
        return "memory", msg
    return "traceback", msg + (f"  [at {r['where'].strip()}]" if r.get("where") else "")


def classify_cli(c: Case, rc, out, err, timed_out, d) -> tuple[str, str]:
    if timed_out:
        return "hang", f"still running after {c.timeout or 0:.0f} s; last stderr: {_last(err)[:150]}"
    if "Traceback" in err:
        if _is_memory(err, rc):
            return "memory", _memline(err, rc)
        return "traceback", _last(err)
    if _is_memory(err, rc) and not (rc == 2 and err.count("minillm: error:") == 1
                                    and "memory" not in _last(err).lower()):
        return "memory", _memline(err, rc)
    errs = [ln for ln in err.splitlines() if ln.startswith("minillm: error:")]
    if c.expect == "records":
        if rc not in (0, 2) or (rc == 2 and not errs):
            return "traceback", f"exit {rc}: {_last(err)}"
        bad = c.check(d, rc, out, err) if c.check else None
        return (c.check_outcome, bad) if bad else ("clean", f"exit {rc}; {_last(err)[:150]}")
    if rc == 2:
        is_batch = (c.argv[:1] == ["batch"]) or " batch " in c.sh  # batch ends with its summary line
        if len(errs) != 1 or not (is_batch or _last(err).startswith("minillm: error:")):
            return "misleading", f"exit 2 with {len(errs)} error lines: {_last(err)[:200]}"
        if c.expect == "ok":
            return "misleading", f"refused a legitimate input: {errs[0][:200]}"
        bad = _msg_ok(c, errs[0])
        return ("misleading", bad) if bad else ("clean", errs[0][:200])
    if rc == 0:
        if c.expect == "refuse":
            extra = c.check(d, rc, out, err) if c.check else None
            return "silently wrong", f"exit 0 (accepted)" + (f"; {extra}" if extra else f": {c.desc}")
        bad = c.check(d, rc, out, err) if c.check else None
        return ("silently wrong", bad) if bad else ("clean", "exit 0, checked")
    if rc is not None and rc < 0:
        return "traceback", f"killed by signal {-rc}: {_last(err)}"
    return "traceback", f"exit {rc}: {_last(err)}"


def classify_sig(c: Case, rc, out, err, timed_out, early, d) -> tuple[str, str]:
    if early:
        return "traceback", early
    if timed_out:
        return "hang", f"still running {c.timeout:.0f} s after the signal; last stderr: {_last(err)[:150]}"
    if "Traceback" in err:
        return "traceback", _last(err)
    bad = c.sig_check(d, rc, out, err) if c.sig_check else None
    return ("silently wrong", bad) if bad else ("clean", f"exit {rc}")


def setup(runner: Runner, cases: list[Case]) -> dict:
    parts = [SETUP_HEAD, SHARDS, "FAILED = {}"]
    for c in cases:
        if c.prep:
            parts.append(SETUP_CASE.format(body=textwrap.indent(textwrap.dedent(c.prep).strip(), "    "), cid=c.id))
    parts.append(SETUP_TAIL)
    script = "\n".join(parts)
    env = dict(runner.env)
    (runner.d / "_setup.py").write_text(script)
    p = subprocess.run([sys.executable, str(runner.d / "_setup.py")], cwd=runner.d, env=env, capture_output=True, text=True,
                       timeout=900)
    if p.returncode != 0:
        shutil.rmtree(runner.d, ignore_errors=True)
        sys.exit(f"hostile_sweep: the setup failed:\n{p.stderr[-3000:]}")
    failed = json.loads((runner.d / "_setup_failed.json").read_text())
    # the greedy text for the sampling checks
    rc, out, err, _ = runner.popen([sys.executable, "-m", "minillm", "generate", str(runner.tree / "weights" / "llama-tiny"),
                                    "--prompt", "It was a dark", "--max-new-tokens", "6", "--ignore-eos",
                                    "--temperature", "0", "--threads", "1"], 120)
    if rc == 0:
        GREEDY_CACHE["g"] = out
    return failed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1],
                    help="the minillm tree under test (default: this script's repository)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    ap.add_argument("--only", type=int, action="append", help="run only this category (repeatable)")
    ap.add_argument("--case", action="append", help="run only this case id (repeatable)")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--mem-gib", type=float, default=4.0, help="address-space cap per process (GiB)")
    ap.add_argument("--jobs", type=int, default=2, help="cases run at once")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)

    ids = [c.id for c in CASES]
    dup = {i for i in ids if ids.count(i) > 1}
    assert not dup, dup
    cases = [c for c in CASES if (not args.only or c.cat in args.only) and (not args.case or c.id in args.case)]
    if args.list:
        for c in cases:
            print(f"{c.id:45} {c.kind:4} {c.desc}")
        print(f"{len(cases)} cases", file=sys.stderr)
        return 0
    if not cases:
        sys.exit("hostile_sweep: no case matches")
    for c in cases:
        if c.timeout is None:
            c.timeout = args.timeout
    d = Path(tempfile.mkdtemp(prefix="hostile-sweep-"))
    runner = Runner(args.tree.resolve(), d, args.timeout, int(args.mem_gib * 2**30))
    t_start = time.time()
    print(f"hostile_sweep: {len(cases)} cases against {runner.tree}; files in {d}", file=sys.stderr)
    failed = setup(runner, cases)
    print(f"hostile_sweep: setup done in {time.time() - t_start:.0f} s"
          + (f"; {len(failed)} case(s) could not be built" if failed else ""), file=sys.stderr)

    results: dict[str, dict] = {}
    done = [0]

    def record(c: Case, outcome: str, detail: str, seconds: float):
        results[c.id] = {"id": c.id, "category": c.cat, "description": c.desc, "clean_means": c.clean,
                         "outcome": outcome, "detail": detail, "seconds": round(seconds, 1)}
        done[0] += 1
        print(f"[{done[0]:3}/{len(cases)}] {outcome:15} {c.id} ({seconds:.1f} s)"
              + ("" if outcome == "clean" else f": {detail[:160]}"), file=sys.stderr, flush=True)

    runnable = []
    for c in cases:
        if c.id in failed:
            record(c, "traceback", f"SETUP FAILED (the sweep's own fault, not minillm's): {failed[c.id]}", 0)
        else:
            runnable.append(c)

    def run_single(c: Case):
        t0 = time.time()
        if c.kind == "api":
            r = runner.run_api([c], per_case_alarm=False)[c.id]
            outcome, detail = classify_api(c, r)
        elif c.kind == "sig":
            rc, out, err, timed_out, early = runner.run_sig(c)
            outcome, detail = classify_sig(c, rc, out, err, timed_out, early, d)
        else:
            rc, out, err, timed_out = runner.run_cli(c)
            try:
                outcome, detail = classify_cli(c, rc, out, err, timed_out, d)
            except Exception as e:  # a check that cannot read its file: the output is not there
                outcome, detail = "silently wrong", f"check failed: {type(e).__name__}: {e}"
        record(c, outcome, detail, time.time() - t0)

    def run_group(group: list[Case]):
        t0 = time.time()
        got = runner.run_api(group, per_case_alarm=True)
        rest = []
        for c in group:
            if c.id in got:
                outcome, detail = classify_api(c, got[c.id])
                record(c, outcome, detail, got[c.id].get("seconds", 0))
            else:
                rest.append(c)
        for c in rest:  # the group's process died or timed out: the rest run alone
            run_single(c)
        return time.time() - t0

    groups: dict[int, list[Case]] = {}
    singles = []
    for c in runnable:
        if c.kind == "api" and c.group:
            groups.setdefault(c.cat, []).append(c)
        else:
            singles.append(c)
    with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run_group, g) for g in groups.values()]
        futures += [pool.submit(run_single, c) for c in singles]
        for f in futures:
            f.result()

    elapsed = time.time() - t_start
    report = render(cases, results, elapsed, runner.tree, args)
    print(report)
    if args.json:
        args.json.write_text(json.dumps({"tree": str(runner.tree), "seconds": round(elapsed), "cases": [
            results[c.id] for c in cases], "table": table(cases, results)}, indent=1))
    if args.keep:
        print(f"hostile_sweep: files kept in {d}", file=sys.stderr)
    else:
        shutil.rmtree(d, ignore_errors=True)
    return 0


def table(cases, results) -> dict:
    t = {}
    for cat in sorted({c.cat for c in cases}):
        counts = {o: 0 for o in OUTCOMES}
        for c in cases:
            if c.cat == cat:
                counts[results[c.id]["outcome"]] += 1
        t[cat] = {"category": CATEGORIES[cat], "inputs": sum(counts.values()), **counts}
    return t


def render(cases, results, elapsed, tree, args) -> str:
    t = table(cases, results)
    head = "| # | category | inputs | " + " | ".join(OUTCOMES) + " |"
    lines = [head, "|" + "---|" * (3 + len(OUTCOMES))]
    total = {o: 0 for o in ["inputs", *OUTCOMES]}
    for cat, row in t.items():
        lines.append(f"| {cat} | {row['category']} | {row['inputs']} | " + " | ".join(str(row[o]) for o in OUTCOMES) + " |")
        for k in total:
            total[k] += row[k]
    lines.append("| | **total** | **" + str(total["inputs"]) + "** | " + " | ".join(f"**{total[o]}**" for o in OUTCOMES) + " |")
    lines += ["", f"{len(cases)} inputs in {elapsed:.0f} s against {tree}.", "", "Non-clean cases:", ""]
    bad = [results[c.id] for c in cases if results[c.id]["outcome"] != "clean"]
    for r in bad:
        lines.append(f"- `{r['id']}` **{r['outcome']}**: {r['description']} -- {r['detail']}")
    if not bad:
        lines.append("- none")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
