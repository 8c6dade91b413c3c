"""Train minillm's shipped tiny models on the public-domain books in ../shared/corpus.

    python tools/train.py tokenizer --out runs/tok-bpe [--vocab 4096] [--sentencepiece]
    python tools/train.py data --tokenizer runs/tok-bpe --out runs/data-bpe.safetensors
    python tools/train.py model --family gpt_neox --data runs/data-bpe.safetensors \
        --tokenizer runs/tok-bpe --out runs/pythia-tiny [--sink-token | --zero-sink] ...

Split: every book except frankenstein.txt and katrine.txt trains; those two are held out.

- `tokenizer` trains a byte-level BPE (`tokenizers`) with the specials <s> (BOS), </s> (EOS) and
  <sink> (the dedicated sink token of the paper's section 3.3). With --sentencepiece it writes a
  sentencepiece BPE `tokenizer.model` (byte fallback, Llama's settings) instead, so that the
  Llama-format model exercises minillm's sentencepiece path.
- `data` tokenizes both splits with that tokenizer (through minillm.load_tokenizer, exactly as
  evaluation will) into flat id tensors in one safetensors file; </s> separates books.
- `model` trains with minillm's own `Model` (its dense forward is differentiable) and exports
  with `minillm.save_pretrained` in the family's Hugging Face format. Every sample is a random
  window of the train ids with BOS at position 0 (what made a first-token sink appear in
  ../shared/NOTES-sinks.md); --sink-token puts the learnable <sink> before it.

Training state (model, AdamW moments, step, RNG) is saved as safetensors + JSON, never a pickle,
and --resume continues bit-exactly on CPU. Every file is written atomically (temporary file, fsync,
rename), state.json last, so a run killed at any moment, even inside a save, resumes from the
last complete save (see save_state). The run is deterministic given --seed on CPU (batches
come from a CPU generator, so they are the same on every device). With --time-limit the run fits
its step count to the time after a short calibration (logged, so `--steps N` reproduces it) and
always stops, saves and exports before the limit.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

import minillm  # noqa: E402
from minillm.core.config import ModelConfig  # noqa: E402
from minillm.formats.families import from_hf_config, to_hf_config  # noqa: E402
from minillm.errors import MiniLLMError  # noqa: E402
from minillm.core.model import Model  # noqa: E402
from minillm.formats.text import read_text  # noqa: E402

CORPUS = REPO.parent / "shared" / "corpus"
HELDOUT = ("frankenstein.txt", "katrine.txt")
BOS, EOS, SINK = "<s>", "</s>", "<sink>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json")
DATA_FORMAT = "minillm-train-data-1"
STATE_DIR = "train_state"


def fail(msg: str):
    raise MiniLLMError(msg)


# ----------------------------------------------------------------------------------------------
# Corpus


def read_split(corpus: Path, max_chars: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """([(name, text)] for training, [(name, text)] held out), in file-name order."""
    if not corpus.is_dir():
        fail(f"corpus folder not found: {corpus}")
    books = sorted(corpus.glob("*.txt"))
    missing = [h for h in HELDOUT if not (corpus / h).is_file()]
    if missing:
        fail(f"held-out book {missing[0]} not found in {corpus}")
    train, held = [], []
    for path in books:
        text = read_text(path)  # BOM, CRLF and Gutenberg licence gone, as evaluation reads it
        if max_chars:
            text = text[:max_chars]
        (held if path.name in HELDOUT else train).append((path.name, text))
    if not train:
        fail(f"no training books (*.txt other than {', '.join(HELDOUT)}) in {corpus}")
    return train, held


# ----------------------------------------------------------------------------------------------
# tokenizer


def train_bpe(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tokenizers import processors

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    # The models are trained with BOS at position 0: the post-processor says so, so that every
    # reader of tokenizer.json (minillm, transformers) adds it. BOS is the first special token (id 0).
    tk.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[BOS, EOS, SINK], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # Paragraphs, with their blank line: GPT-2's pre-tokenizer regex splits "\n\nIt" into
    # "\n", "\n", "It" anyway, so paragraphs lose nothing and keep the units small.
    tk.train_from_iterator((p + "\n\n" for t in texts for p in t.split("\n\n")), trainer)
    return tk


def train_sentencepiece(texts: list[str], vocab: int) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for t in texts for line in t.split("\n") if line.strip()]),
        model_writer=buf, model_type="bpe", vocab_size=vocab, byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece=BOS, eos_piece=EOS,
        user_defined_symbols=[SINK],
        # Llama's settings: text kept as is (newlines become byte pieces), digits split.
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, character_coverage=0.99995, num_threads=1, minloglevel=2)
    return buf.getvalue()


def cmd_tokenizer(args) -> int:
    train, _ = read_split(Path(args.corpus), args.max_chars)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:  # never leave a stale file of the other kind behind
        (out / name).unlink(missing_ok=True)
    texts = [t for _, t in train]
    if args.sentencepiece:
        (out / "tokenizer.model").write_bytes(train_sentencepiece(texts, args.vocab))
        tok_cfg = {"tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>", "add_bos_token": True,
                   "add_eos_token": False, "add_dummy_prefix_space": True, "legacy": False}
    else:
        train_bpe(texts, args.vocab).save(str(out / "tokenizer.json"))
        tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True}
    tok_cfg.update({"bos_token": BOS, "eos_token": EOS, "additional_special_tokens": [SINK],
                    "clean_up_tokenization_spaces": False})
    write_json(out / "tokenizer_config.json", tok_cfg)
    bos, eos, sink = (special_id(out, s) for s in (BOS, EOS, SINK))
    write_json(out / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos})
    tok = minillm.load_tokenizer(out)
    print(f"tokenizer: {tok.backend}, {tok.vocab_size} tokens, bos={bos} eos={eos} sink={sink} -> {out}")
    return 0


def special_id(tok_dir: Path, token: str) -> int:
    """The id of a special token in a tokenizer folder written by `cmd_tokenizer`."""
    tok_dir = Path(tok_dir)
    if (tok_dir / "tokenizer.json").is_file():
        added = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens", [])
        found = [a["id"] for a in added if a.get("content") == token]
        if found:
            return found[0]
    elif (tok_dir / "tokenizer.model").is_file():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
        i = sp.piece_to_id(token)
        if sp.id_to_piece(i) == token:
            return i
    fail(f"tokenizer in {tok_dir} has no {token} token (train it with `train.py tokenizer`)")


def tokenizer_digest(tok_dir: Path) -> str:
    for name in ("tokenizer.json", "tokenizer.model"):
        if (Path(tok_dir) / name).is_file():
            return hashlib.sha256((Path(tok_dir) / name).read_bytes()).hexdigest()
    fail(f"no tokenizer.json or tokenizer.model in {tok_dir}")


# ----------------------------------------------------------------------------------------------
# data


def cmd_data(args) -> int:
    from safetensors.torch import save_file

    tok_dir = Path(args.tokenizer)
    tok = minillm.load_tokenizer(tok_dir)
    if tok.eos_id is None or tok.bos_id is None:
        fail(f"tokenizer in {tok_dir} needs BOS and EOS ids")
    train, held = read_split(Path(args.corpus), args.max_chars)
    tensors, meta = {}, {}
    for split, books in (("train", train), ("heldout", held)):
        ids, spans = [], []
        for name, text in books:  # each book, then </s> as the separator
            start = len(ids)
            ids += tok.encode(text, add_bos=False) + [tok.eos_id]
            spans.append([name, start, len(ids)])
        dtype = torch.int16 if tok.vocab_size <= 2**15 else torch.int32
        tensors[split] = torch.tensor(ids, dtype=dtype)
        meta[f"{split}_books"] = json.dumps(spans)
    meta.update(format=DATA_FORMAT, bos_id=str(tok.bos_id), eos_id=str(tok.eos_id),
                sink_id=str(special_id(tok_dir, SINK)), vocab_size=str(tok.vocab_size),
                tokenizer_sha256=tokenizer_digest(tok_dir))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")  # atomically, like every file this tool writes
    save_file(tensors, str(tmp), metadata=meta)
    _fsync_file(tmp)
    os.replace(tmp, out)
    print(f"data: {len(tensors['train']):,} train and {len(tensors['heldout']):,} held-out tokens -> {out}")
    return 0


def load_data(path: Path, tok_dir: Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    from safetensors import safe_open

    if not Path(path).is_file():
        fail(f"data file not found: {path} (make it with `train.py data`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != DATA_FORMAT:
                fail(f"{path}: not a train.py data file")
            train, held = f.get_tensor("train").long(), f.get_tensor("heldout").long()
    except MiniLLMError:
        raise
    except Exception as e:  # safetensors' own error types for a corrupt file
        fail(f"{path}: cannot read ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})")
    if meta["tokenizer_sha256"] != tokenizer_digest(tok_dir):
        fail(f"{path} was tokenized with a different tokenizer than the one in {tok_dir}")
    info = {k: int(meta[k]) for k in ("bos_id", "eos_id", "sink_id", "vocab_size")}
    return train, held, info


# ----------------------------------------------------------------------------------------------
# model: configuration and initialisation


def build_config(family: str, *, vocab: int, layers: int, hidden: int, heads: int, kv_heads: int | None,
                 intermediate: int | None, context: int, sink_token_id: int | None = None,
                 zero_sink: bool = False) -> ModelConfig:
    """A ModelConfig of the family's usual shape (Llama-2, Pythia, MPT-7B, Falcon-7B/40B)."""
    if hidden % heads:
        fail(f"--hidden {hidden} is not a multiple of --heads {heads}")
    hd = hidden // heads
    common = dict(family=family, vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                  head_dim=hd, max_position_embeddings=context, sink_token_id=sink_token_id,
                  zero_sink=zero_sink)
    if family != "llama" and family != "falcon" and kv_heads not in (None, heads):
        fail(f"--kv-heads: {family} has one KV head per query head")
    if family == "llama":
        kv = kv_heads or max(1, heads // 2)
        cfg = ModelConfig(**common, num_kv_heads=kv, intermediate_size=intermediate or 688, norm="rmsnorm",
                          norm_eps=1e-5, norm_bias=False, activation="swiglu")
    elif family == "gpt_neox":  # Pythia: parallel residual, a quarter of each head rotated, biases
        cfg = ModelConfig(**common, num_kv_heads=heads, intermediate_size=intermediate or 4 * hidden,
                          activation="gelu", parallel_residual=True, qkv_bias=True, out_bias=True,
                          mlp_bias=True, qkv_layout="interleaved", rotary_dim=max(2, hd // 4 // 2 * 2))
    elif family == "mpt":  # ALiBi, no biases, tied embeddings, no learned positions (so it streams)
        cfg = ModelConfig(**common, num_kv_heads=heads, intermediate_size=intermediate or 4 * hidden,
                          norm_bias=False, activation="gelu", tie_word_embeddings=True, positions="alibi",
                          alibi="mpt", alibi_bias_max=8.0, learned_pos_emb=False)
    elif family == "falcon":  # one KV head: Falcon-7B's layout; more: Falcon-40B's grouped layout
        kv = kv_heads or 1
        cfg = ModelConfig(**common, num_kv_heads=kv, intermediate_size=intermediate or 4 * hidden,
                          activation="gelu", parallel_residual=True, shared_norm=kv == 1,
                          tie_word_embeddings=True, qkv_layout="split" if kv == 1 else "grouped")
    else:
        fail(f"unknown family {family!r}")
    # What we export must load back as exactly this config.
    if from_hf_config(to_hf_config(cfg)) != cfg:
        fail(f"these sizes cannot be stored exactly in the {family} format (try another --intermediate)")
    return cfg


def init_weights(model: Model, seed: int) -> None:
    """GPT-2 style: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers); norms 1, biases 0."""
    g = torch.Generator().manual_seed(seed)
    scaled = 0.02 / math.sqrt(2 * model.config.num_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():  # a fixed order, so a fixed init
            if p.dim() == 1:
                p.fill_(1.0 if name.endswith("norm.weight") else 0.0)
            else:
                std = scaled if name.endswith(("attn.wo.weight", "mlp.w_out.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std)


# ----------------------------------------------------------------------------------------------
# model: samples, schedule, evaluation


class Sampler:
    """Random windows of the train ids behind a fixed prefix ([<sink>] + [BOS]), from a CPU generator."""

    def __init__(self, ids: torch.Tensor, context: int, prefix: list[int], seed: int):
        self.ids, self.prefix = ids, torch.tensor(prefix, dtype=torch.long)
        self.n_text = context + 1 - len(prefix)  # text tokens per sample, inputs and targets
        if self.n_text < 2 or len(ids) < self.n_text:
            fail(f"--context {context} does not fit the data ({len(ids)} tokens)")
        self.g = torch.Generator().manual_seed(seed)

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.ids) - self.n_text + 1, (size,), generator=self.g)
        return make_samples(self.ids, starts, self.n_text, self.prefix)


def make_samples(ids, starts, n_text, prefix) -> tuple[torch.Tensor, torch.Tensor]:
    text = ids[starts[:, None] + torch.arange(n_text)]
    seq = torch.cat([prefix.expand(len(starts), -1), text], dim=1)  # (B, context + 1)
    inputs, targets = seq[:, :-1], seq[:, 1:].clone()
    targets[:, : len(prefix) - 1] = -100  # BOS after <sink> is given, not predicted
    return inputs, targets


def lr_at(step: int, total: int, base: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup, then cosine decay to floor * base at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))


def lm_loss(model, inputs, targets, amp) -> torch.Tensor:
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(inputs)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


@torch.no_grad()
def heldout_loss(model, held: torch.Tensor, context: int, prefix: list[int], windows: int, batch: int,
                 device, amp) -> float:
    """Mean loss over `windows` evenly spaced held-out windows, in the training format."""
    prefix_t = torch.tensor(prefix, dtype=torch.long)
    n_text = context + 1 - len(prefix)
    starts = torch.linspace(0, len(held) - n_text, max(1, min(windows, len(held) // n_text))).long()
    total, count = 0.0, 0
    for s in starts.split(batch):
        x, y = make_samples(held, s, n_text, prefix_t)
        n = int((y != -100).sum())
        total += lm_loss(model, x.to(device), y.to(device), amp).item() * n
        count += n
    return total / count


# ----------------------------------------------------------------------------------------------
# model: resumable training state (safetensors for tensors, JSON for scalars)

# Settings a resumed run must share with the run it continues.
FIXED = ("family", "layers", "hidden", "heads", "kv_heads", "intermediate", "context", "batch", "lr",
         "warmup", "weight_decay", "seed", "sink_token", "zero_sink", "no_bos", "keep_best", "epochs")


def opt_params(opt) -> list:
    """Parameters in the optimizer's own order (the indices of its state_dict)."""
    return [p for group in opt.param_groups for p in group["params"]]


def save_state(directory: Path, model, opt, sampler, best, info: dict) -> None:
    """Write the training state so that a process killed at ANY moment (SIGKILL included, during
    this function too) leaves a directory that --resume reads as one complete saved step.

    - The tensors go to a new file with a unique name (`state-<step>-<nonce>.safetensors`), written
      under a temporary name, fsynced and renamed into place; nothing refers to it yet.
    - state.json, written last (temporary file, fsync, os.replace, directory fsync), names that file
      and its step. os.replace is atomic, so state.json is always the old or the new one, and the
      file it names is complete, because it was in place before state.json was.
    - Only then are older tensors files and leftover temporaries removed.
    TRAIN_PAUSE_IN_SAVE=<stage> (tests only) announces that stage on stderr and stops there, so
    that a test can land a SIGKILL inside the save at a chosen point (tests/test_train.py).
    """
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    t = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if best is not None:
        t.update({f"best.{k}": v.contiguous() for k, v in best.items()})
    for i, p in enumerate(opt_params(opt)):
        for key, value in opt.state.get(p, {}).items():
            t[f"optim.{i}.{key}"] = value.detach().cpu().contiguous()
    t["rng.sampler"] = sampler.g.get_state()
    step = info["step"]
    name = f"state-{step:09d}-{os.getpid()}-{time.time_ns()}.safetensors"
    _save_stage("begin", step)
    tmp = directory / (name + ".tmp")
    save_file(t, str(tmp), metadata={"step": str(step)})
    _save_stage("tensors-written", step)
    _fsync_file(tmp)
    os.replace(tmp, directory / name)
    _fsync_dir(directory)
    _save_stage("tensors-in-place", step)
    write_json(directory / "state.json", {**info, "tensors": name}, stage=lambda s: _save_stage(s, step))
    _save_stage("json-in-place", step)
    # Superseded tensors files and the temporaries of killed saves: ours end in .tmp, and
    # safetensors' own save_file writes a `.tmpXXXXXX` file and renames it (seen with 0.8).
    for old in directory.iterdir():
        if old.name != name and old.is_file() and (
                old.name.endswith(".tmp") or old.name.startswith(".tmp") or
                (old.name.startswith("state") and old.name.endswith(".safetensors"))):
            old.unlink(missing_ok=True)
    _save_stage("done", step)


def _save_stage(stage: str, step: int) -> None:
    if os.environ.get("TRAIN_PAUSE_IN_SAVE") == stage:
        print(f"save-stage {stage} step {step}", file=sys.stderr, flush=True)
        time.sleep(600)  # the crash test kills the process here


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def state_tensors_path(directory: Path) -> Path:
    """The tensors file that `directory`/state.json names (state.safetensors for older states)."""
    info = json.loads((Path(directory) / "state.json").read_text(encoding="utf-8"))
    return Path(directory) / info.get("tensors", "state.safetensors")


def load_state(directory: Path, args, model, opt, sampler) -> tuple[dict, dict | None]:
    from safetensors import safe_open

    js = directory / "state.json"
    if not js.is_file():
        fail(f"--resume: no training state in {directory}")
    try:
        info = json.loads(js.read_text(encoding="utf-8"))
        st = directory / info.get("tensors", "state.safetensors")
        if "/" in info.get("tensors", "") or not st.is_file():
            fail(f"--resume: {js.name} in {directory} names a missing tensors file {st.name}")
        with safe_open(str(st), framework="pt") as f:
            step = (f.metadata() or {}).get("step")
            t = {k: f.get_tensor(k) for k in f.keys()}
    except MiniLLMError:
        raise
    except Exception as e:  # JSON or safetensors errors from a damaged file
        fail(f"--resume: cannot read the training state in {directory} ({type(e).__name__})")
    if step != str(info.get("step")):
        fail(f"--resume: {st.name} and {js.name} are from different steps (interrupted save)")
    for key in FIXED:
        if info["settings"].get(key) != getattr(args, key):
            fail(f"--resume: --{key.replace('_', '-')} was {info['settings'].get(key)!r} in the saved run, "
                 f"now {getattr(args, key)!r}")
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")}, strict=True)
    state = {}
    for i, _ in enumerate(opt_params(opt)):
        prefix = f"optim.{i}."
        s = {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}
        if s:
            state[i] = s
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)
    sampler.g.set_state(t["rng.sampler"])
    best = {k[5:]: v for k, v in t.items() if k.startswith("best.")} or None
    return info, best


# ----------------------------------------------------------------------------------------------
# model: the training run


class StopFlag:
    """Set by SIGTERM/SIGINT while training, so an interrupted run still saves and exports."""

    def __enter__(self):
        self.set = False
        self.old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        print(f"signal {signum}: stopping after this step", flush=True)
        self.set = True


def cmd_model(args) -> int:
    t_start = time.time()
    deadline = t_start + args.time_limit if args.time_limit else None
    if args.threads:
        torch.set_num_threads(args.threads)
    device = minillm.parse_device(args.device)
    amp = {"auto": device.type == "cuda", "bf16": True, "off": False}[args.amp]
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in float32
    tok_dir, out = Path(args.tokenizer), Path(args.out)
    train_ids, held_ids, info = load_data(Path(args.data), tok_dir)
    if args.sink_token and args.zero_sink:
        fail("--sink-token and --zero-sink are separate variants; pick one")
    prefix = ([info["sink_id"]] if args.sink_token else []) + ([] if args.no_bos else [info["bos_id"]])
    config = build_config(args.family, vocab=info["vocab_size"], layers=args.layers, hidden=args.hidden,
                          heads=args.heads, kv_heads=args.kv_heads, intermediate=args.intermediate,
                          context=args.context, sink_token_id=info["sink_id"] if args.sink_token else None,
                          zero_sink=args.zero_sink)
    model = Model(config)
    init_weights(model, args.seed)
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    params = list(model.parameters())
    decay = [p for p in params if p.dim() >= 2]  # matrices and embeddings; not norms or biases
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95),
                            eps=1e-8, fused=device.type == "cuda")
    sampler = Sampler(train_ids, args.context, prefix, args.seed)
    per_step = args.batch * args.context
    if args.steps:
        total = args.steps
    elif args.epochs:
        total = max(1, round(args.epochs * len(train_ids) / per_step))
    else:
        fail("give --steps or --epochs")
    forward = torch.compile(model) if args.compile else model

    state = {"step": 0, "total_steps": total, "tokens_seen": 0, "train_seconds": 0.0, "history": [],
             "best": None, "calibrated": False, "settings": {k: getattr(args, k) for k in FIXED}}
    best = None  # the best held-out weights, on the CPU (--keep-best)
    if args.resume:
        state, best = load_state(out / STATE_DIR, args, model, opt, sampler)
        total = state["total_steps"] = args.steps or state["total_steps"]
        print(f"resumed at step {state['step']} of {total}", flush=True)

    def evaluate() -> float:
        model.eval()
        loss = heldout_loss(forward, held_ids, args.context, prefix, args.eval_windows, args.batch, device, amp)
        model.train()
        return loss

    print(f"{config.family}: {n_params:,} parameters, {len(train_ids):,} train tokens, {total} steps of "
          f"{args.batch} x {args.context} tokens ({total * per_step / len(train_ids):.1f} epochs), "
          f"device {device}{', bf16 autocast' if amp else ''}", flush=True)
    t0 = time.time()
    seconds_before, step0 = state["train_seconds"], state["step"]
    mark = (t0, step0)  # for tokens/s
    losses: list[torch.Tensor] = []
    recent: list[float] = []  # the train losses of the last log interval
    eval_seconds = 0.0
    calib_at = min(30.0, 0.1 * args.time_limit) if args.time_limit else None
    reserve = min(15.0, 0.1 * args.time_limit)  # seconds kept for the final save, eval and export
    calib_mark = None

    with StopFlag() as stop:
        while True:
            step = state["step"]
            now = time.time()
            if args.eval_every and step % args.eval_every == 0 and not _evaluated(state, step):
                te = time.time()
                h = evaluate()
                eval_seconds = time.time() - te
                is_best = state["best"] is None or h < state["best"]["heldout_loss"]
                state["history"].append({
                    "step": step, "tokens_seen": state["tokens_seen"], "heldout_loss": h,
                    "train_loss": sum(recent) / len(recent) if recent else None,
                    "seconds": round(seconds_before + now - t0, 1)})
                if is_best:
                    state["best"] = {"step": step, "heldout_loss": h}
                    if args.keep_best:
                        best = {k: v.detach().to("cpu", copy=True).contiguous()
                                for k, v in model.state_dict().items()}
                print(f"eval step {step}: held-out loss {h:.4f}{' (best)' if is_best else ''} "
                      f"[{eval_seconds:.1f} s]", flush=True)
            if step >= total or stop.set or (args.stop_after and step - step0 >= args.stop_after):
                break
            if deadline and now + 2 * eval_seconds + reserve > deadline:
                print(f"time limit: stopping at step {step} of {total}", flush=True)
                break
            # Once, after start-up and the first evals are past, fit the step count to the time
            # limit (logged, so `--steps N` reproduces the schedule).
            if calib_at and not state["calibrated"]:
                if calib_mark is None and now - t0 >= calib_at / 2:
                    calib_mark = (now, step)
                elif calib_mark is not None and now - t0 >= calib_at and step > calib_mark[1]:
                    per = (now - calib_mark[0]) / (step - calib_mark[1])  # evals included
                    room = deadline - now - 1.5 * reserve - eval_seconds
                    fit = step + max(1, int(0.92 * room / per))
                    if fit < total:
                        print(f"calibration: {per * 1000:.1f} ms/step; {total} steps do not fit in "
                              f"--time-limit {args.time_limit:g}, training {fit} steps", flush=True)
                        total = state["total_steps"] = fit
                    state["calibrated"] = True

            x, y = sampler.batch(args.batch)
            lr = lr_at(step, total, args.lr, args.warmup)
            for group in opt.param_groups:
                group["lr"] = lr
            loss = lm_loss(forward, x.to(device), y.to(device), amp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.detach())
            state["step"] = step = step + 1
            state["tokens_seen"] += per_step

            if step % args.log_every == 0 or step == total:
                recent = torch.stack(losses).tolist()  # one device sync per log line
                losses = []
                now = time.time()
                tps = (step - mark[1]) * per_step / max(1e-9, now - mark[0])
                mark = (now, step)
                print(f"step {step}/{total} | loss {sum(recent) / len(recent):.4f} | lr {lr:.2e} | "
                      f"{tps / 1000:.1f}k tok/s | {now - t0:.0f} s", flush=True)
            if args.save_every and step % args.save_every == 0 and step < total:
                state["train_seconds"] = seconds_before + time.time() - t0
                save_state(out / STATE_DIR, model, opt, sampler, best, state)

    if losses:
        recent = torch.stack(losses).tolist()
    state["train_seconds"] = seconds_before + time.time() - t0
    save_state(out / STATE_DIR, model, opt, sampler, best, state)
    final_h = state["history"][-1]["heldout_loss"] if _evaluated(state, state["step"]) else evaluate()
    use_best = args.keep_best and best is not None and state["best"]["heldout_loss"] < final_h
    export(model, config, best if use_best else None, args, out)
    log = {
        "command": "python tools/train.py " + shlex.join(args.argv),
        "family": config.family, "parameters": n_params, "device": device_name(device),
        "torch": torch.__version__, "bf16_autocast": amp,
        "wall_seconds_this_run": round(time.time() - t_start, 1),
        "train_seconds": round(state["train_seconds"], 1),
        "steps": state["step"], "total_steps": total, "tokens_seen": state["tokens_seen"],
        "epochs": round(state["tokens_seen"] / len(train_ids), 2), "train_tokens": len(train_ids),
        "heldout_tokens": len(held_ids), "final_train_loss": sum(recent) / len(recent) if recent else None,
        "final_heldout_loss": final_h,
        "exported": (f"best held-out checkpoint: step {state['best']['step']}, held-out loss "
                     f"{state['best']['heldout_loss']:.4f}") if use_best else "final weights",
        "sample_prefix": prefix, "export_dtype": args.dtype, "history": state["history"],
    }
    write_json(out / "train_log.json", log)
    print(f"exported {out} ({log['exported']}); final train loss {log['final_train_loss']}, held-out loss "
          f"{final_h:.4f}; {log['wall_seconds_this_run']} s", flush=True)
    return 0


def _evaluated(state: dict, step: int) -> bool:
    return bool(state["history"]) and state["history"][-1]["step"] == step


def export(model: Model, config: ModelConfig, weights: dict | None, args, out: Path) -> None:
    """HF-format config.json + model.safetensors + the tokenizer files, checked by reloading."""
    cpu = Model(config)
    cpu.load_state_dict(weights if weights is not None else {k: v.detach().cpu() for k, v in model.state_dict().items()})
    dtype = minillm.parse_dtype(args.dtype)
    minillm.save_pretrained(cpu, out, dtype=dtype)
    _int_alibi_bias_max(out / "config.json")
    for name in TOKENIZER_FILES:
        if (Path(args.tokenizer) / name).is_file():
            shutil.copyfile(Path(args.tokenizer) / name, out / name)
    # The file must reload (through minillm's strict loader) to the weights we meant to write.
    loaded = minillm.load(out, dtype=torch.float32)
    cpu = cpu.to(dtype).float().eval()
    ids = torch.arange(min(16, config.vocab_size))[None]
    with torch.no_grad():
        got, want = loaded(ids), cpu(ids)
        if not ((got - want).abs().max() <= 1e-6 * want.abs().max()):
            fail(f"exported checkpoint in {out} does not reload to the trained weights")


def _int_alibi_bias_max(path: Path) -> None:
    """Work around save_pretrained writing MPT's alibi_bias_max as 8.0: transformers 5 requires an int."""
    data = json.loads(path.read_text(encoding="utf-8"))
    attn = data.get("attn_config") or {}
    if isinstance(attn.get("alibi_bias_max"), float) and attn["alibi_bias_max"].is_integer():
        attn["alibi_bias_max"] = int(attn["alibi_bias_max"])
        write_json(path, data)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return str(device)


def write_json(path: Path, data, stage=None) -> None:
    """Atomically: a temporary file in the same directory, fsync, os.replace, directory fsync.
    A reader (or a run killed meanwhile) sees the old file or the new one, never a part of one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    if stage is not None:
        stage("json-written")
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tokenizer", help="train a byte-level BPE (or sentencepiece) tokenizer")
    t.add_argument("--out", required=True)
    t.add_argument("--vocab", type=int, default=4096)
    t.add_argument("--sentencepiece", action="store_true", help="write tokenizer.model instead of tokenizer.json")
    t.add_argument("--corpus", default=str(CORPUS))
    t.add_argument("--max-chars", type=int, default=0, help="use only the first N characters of each book (tests)")
    t.set_defaults(func=cmd_tokenizer)

    d = sub.add_parser("data", help="tokenize the train and held-out splits")
    d.add_argument("--tokenizer", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--corpus", default=str(CORPUS))
    d.add_argument("--max-chars", type=int, default=0)
    d.set_defaults(func=cmd_data)

    m = sub.add_parser("model", help="train a model and export it in a family's HF format")
    m.add_argument("--family", required=True, choices=["llama", "mpt", "gpt_neox", "falcon"])
    m.add_argument("--data", required=True)
    m.add_argument("--tokenizer", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--layers", type=int, default=6)
    m.add_argument("--hidden", type=int, default=256)
    m.add_argument("--heads", type=int, default=8)
    m.add_argument("--kv-heads", type=int, default=None, help="llama: default heads/2; falcon: default 1")
    m.add_argument("--intermediate", type=int, default=None, help="default: 688 (llama), 4 x hidden (others)")
    m.add_argument("--context", type=int, default=512, help="training window (tokens per sample)")
    m.add_argument("--batch", type=int, default=32)
    m.add_argument("--steps", type=int, default=0, help="optimizer steps (or use --epochs)")
    m.add_argument("--epochs", type=float, default=0.0, help="passes over the train tokens, as steps")
    m.add_argument("--lr", type=float, default=3e-3)
    m.add_argument("--warmup", type=int, default=200)
    m.add_argument("--weight-decay", type=float, default=0.1)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--device", default="cpu")
    m.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto",
                   help="bf16 autocast: auto = on for CUDA only")
    m.add_argument("--dtype", default="float16", help="storage dtype of the exported weights")
    m.add_argument("--sink-token", action="store_true", help="prepend the learnable <sink> to every sample")
    m.add_argument("--zero-sink", action="store_true", help="SoftMax-off-by-one (a minillm extension)")
    m.add_argument("--no-bos", action="store_true", help="samples start mid-text, without BOS")
    m.add_argument("--eval-every", type=int, default=200)
    m.add_argument("--eval-windows", type=int, default=128)
    m.add_argument("--log-every", type=int, default=50)
    m.add_argument("--save-every", type=int, default=1000)
    m.add_argument("--keep-best", action="store_true", help="export the best held-out checkpoint")
    m.add_argument("--resume", action="store_true", help="continue from OUT/train_state")
    m.add_argument("--stop-after", type=int, default=0, help="stop after N steps of this run (an interruption)")
    m.add_argument("--time-limit", type=float, default=0.0, help="seconds; fit the steps, stop and export in time")
    m.add_argument("--threads", type=int, default=0)
    m.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    m.set_defaults(func=cmd_model)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except MiniLLMError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
