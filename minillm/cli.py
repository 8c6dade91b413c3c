"""The `minillm` command line: a thin layer over the library.

    minillm generate [MODEL] --prompt TEXT        stream text from a fixed-size sink+window cache
    minillm chat     [MODEL] [--prompts F.jsonl]  a conversation over one persistent cache
    minillm ppl      [MODEL] --text FILE [...]    long-text perplexity: streaming/window/recompute/dense
    minillm attn     [MODEL] --text FILE --png P  attention maps and per-layer attention-sink scores

MODEL is a local checkpoint directory or a hub repo id; without it, the shipped default
`weights/llama-tiny`. The cache is `--sinks N` plus a window, `--cache-size S` keys in all (the
new token included), as in the library's `new_cache(sinks=N, window=S-N)`.

Bad input is one line on stderr (`minillm: error: ...`) and exit code 2; Ctrl-C exits with 130
and no traceback (`ppl` first prints what it scored so far).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from . import __version__
from .errors import MiniLLMError

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "weights" / "llama-tiny"
DEFAULT_CACHE_SIZE = 1024  # capped at the checkpoint's trained context unless given


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `minillm: error: ...` and exit code 2, no usage dump."""

    def error(self, message: str):
        self.exit(2, f"minillm: error: {' '.join(message.split())}\n")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def _float_in(low: float, high: float = math.inf, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (low < value if low_open else low <= value) or not value <= high:
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"must be in {bounds}, got {text}")
        return value
    return parse


def _common(cache_flags: bool = True) -> argparse.ArgumentParser:
    p = _Parser(add_help=False)
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="checkpoint directory or hub repo id (default: the shipped weights/llama-tiny)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16 or float64")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    p.add_argument("--threads", type=_int_at_least(1), help="torch CPU threads (default: torch's choice)")
    if cache_flags:
        p.add_argument("--sinks", type=_int_at_least(0), default=4, help="attention-sink tokens kept (default 4)")
        p.add_argument("--cache-size", type=_int_at_least(1), metavar="S",
                       help=f"keys in the cache, sinks + window, the new token included "
                            f"(default {DEFAULT_CACHE_SIZE}, or the checkpoint's context if smaller)")
    return p


def _sampling(p: argparse.ArgumentParser, max_new_help: str) -> None:
    p.add_argument("--max-new-tokens", type=_int_at_least(0), default=256, metavar="N", help=max_new_help)
    p.add_argument("--temperature", type=_float_in(0), default=0.8, help="0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=_int_at_least(0), default=0, help="sample from the k most likely (0: off)")
    p.add_argument("--top-p", type=_float_in(0, 1, low_open=True), default=0.95,
                   help="nucleus sampling mass (default 0.95; 1: off)")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="sampling seed (default 0)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past an end-of-sequence token")


def build_parser() -> argparse.ArgumentParser:
    from .evaluate import DENSE_MAX_TOKENS, MODES

    parser = _Parser(prog="minillm",
                     description="StreamingLLM in pure PyTorch: attention sinks + a rolling KV window.")
    parser.add_argument("--version", action="version", version=f"minillm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", parents=[_common()], help="generate text, streaming",
                       description="Generate text through a fixed-size sink+window cache, printing it as it comes.")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="the prompt")
    src.add_argument("--prompt-file", metavar="F", help="read the prompt from a UTF-8 file")
    _sampling(g, "tokens to generate (default 256; 0: endless, until Ctrl-C)")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", parents=[_common()], help="multi-turn chat over one streaming cache",
                       description="A conversation over one persistent streaming cache. Turns come from a "
                                   "JSONL file ({\"turn\": \"...\"} per line) or, interactively, from stdin.")
    c.add_argument("--prompts", metavar="F.jsonl", help="JSONL file of user turns (default: read stdin)")
    c.add_argument("--no-template", action="store_true",
                   help="use the plain 'USER: ... ASSISTANT:' format even if the checkpoint has a chat template")
    _sampling(c, "tokens per reply at most (default 256; 0: until EOS)")
    c.set_defaults(func=cmd_chat)

    p = sub.add_parser("ppl", parents=[_common()], help="long-text perplexity",
                       description="Perplexity of long text (files concatenated, Gutenberg boilerplate stripped).")
    p.add_argument("--text", nargs="+", required=True, metavar="FILE", help="UTF-8 text file(s)")
    p.add_argument("--mode", nargs="+", choices=MODES, default=["streaming"], metavar="MODE",
                   help=f"one or more of {', '.join(MODES)} (default streaming)")
    p.add_argument("--max-tokens", type=_int_at_least(2), metavar="N", help="score only the first N tokens")
    p.add_argument("--stride", type=_int_at_least(1), metavar="K",
                   help="recompute scores every K-th token from a seeded random offset; every mode "
                        "then also reports ppl_strided over that subset")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of the stride offset (default 0)")
    p.add_argument("--exact-loop", action="store_true",
                   help="feed one token at a time (the reference) instead of the parallel evaluation")
    p.add_argument("--dense-max-tokens", type=_int_at_least(1), default=DENSE_MAX_TOKENS, metavar="N",
                   help=f"refuse dense mode past N tokens: its cache grows with the text (default {DENSE_MAX_TOKENS})")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="plot running log-PPL against tokens (needs matplotlib)")
    p.set_defaults(func=cmd_ppl)

    a = sub.add_parser("attn", parents=[_common(cache_flags=False)], help="attention maps and sink scores",
                       description="Per-layer attention maps (heads averaged) of a dense forward over the first "
                                   "tokens of a text, and the per-layer attention-sink score.")
    a.add_argument("--text", nargs="+", required=True, metavar="FILE", help="UTF-8 text file(s)")
    a.add_argument("--png", required=True, metavar="OUT", help="where to draw the maps (needs matplotlib)")
    a.add_argument("--tokens", type=_int_at_least(2), default=128, metavar="T",
                   help="tokens to map, from the start (default 128)")
    a.add_argument("--min-query", type=_int_at_least(0), metavar="Q",
                   help="sink score over queries with index >= Q (default T/2)")
    a.add_argument("--json", metavar="OUT", help="write the sink scores as JSON")
    a.set_defaults(func=cmd_attn)
    return parser


# ----------------------------------------------------------------------------------------------
# Shared steps


def _warn(message: str) -> None:
    print(f"minillm: warning: {message}", file=sys.stderr)


def _check_output(path: str | None, what: str) -> None:
    """Fail before the work, not after it, when an output file cannot be written."""
    if path is not None and not Path(path).resolve().parent.is_dir():
        raise MiniLLMError(f"{what}: directory {Path(path).parent} does not exist")


def _need_matplotlib(flag: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MiniLLMError(f"{flag} needs matplotlib: pip install 'minillm[plot]'") from None
    return plt


def _load(args):
    """(model, tokenizer) named by args.model, or the shipped default; any failure is one line."""
    import torch

    import minillm

    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.model
    if name is None:
        if not DEFAULT_MODEL.is_dir():
            raise MiniLLMError(f"no MODEL given and the default checkpoint {DEFAULT_MODEL} is missing")
        name = str(DEFAULT_MODEL)
    try:
        model = minillm.load(name, dtype=args.dtype, device=args.device)
        tok = minillm.load_tokenizer(name)
    except MiniLLMError:
        raise
    except Exception as e:  # a corrupt file can raise anything; the user needs one line, not a trace
        first = (str(e).strip().splitlines() or [""])[0]
        raise MiniLLMError(f"cannot load model {name}: {type(e).__name__}: {first}") from None
    model.eval()
    return model, tok


def _cache_shape(args, model) -> tuple[int, int]:
    """(sinks, window) from --sinks and --cache-size, with the trained-context warning."""
    trained = model.config.max_position_embeddings
    S = args.cache_size if args.cache_size is not None else min(DEFAULT_CACHE_SIZE, trained)
    if S <= args.sinks:
        raise MiniLLMError(f"--cache-size must exceed --sinks (got --cache-size {S}, --sinks {args.sinks}): "
                           f"the window needs at least one slot")
    if S > trained:
        _warn(f"--cache-size {S} exceeds the checkpoint's trained context ({trained} positions); "
              f"positions past it were never trained")
    return args.sinks, S - args.sinks


def _flush_print(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------------
# generate


def cmd_generate(args) -> int:
    from .generation import generate
    from .text import read_text

    prompt = args.prompt if args.prompt is not None else read_text(args.prompt_file, gutenberg=False)
    if not prompt:
        raise MiniLLMError("the prompt is empty")
    model, tok = _load(args)
    sinks, window = _cache_shape(args, model)
    ids = tok.encode(prompt)
    decoder = tok.decoder(start_of_text=False)  # the output continues the prompt
    n, interrupted, start = 0, False, time.perf_counter()
    try:
        for token in generate(model, ids, max_new_tokens=args.max_new_tokens or None,
                              temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                              seed=args.seed, sinks=sinks, window=window, eos_ids=tok.eos_ids,
                              ignore_eos=args.ignore_eos, vocab_size=tok.vocab_size):
            if token in tok.eos_ids and not args.ignore_eos:
                break
            n += 1
            text = decoder.push(token)
            if text:
                _flush_print(text)
    except KeyboardInterrupt:
        interrupted = True
    _flush_print(decoder.flush() + "\n")
    seconds = time.perf_counter() - start
    print(f"minillm: {n} tokens in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} tokens/s), "
          f"cache {sinks}+{window}{', interrupted' if interrupted else ''}", file=sys.stderr)
    return 130 if interrupted else 0


# ----------------------------------------------------------------------------------------------
# chat


def read_turns(path: str) -> list[str]:
    """User turns from a JSONL file: {"turn": "..."} per line (MT-Bench's {"turns": [...]} also works)."""
    from .text import read_text

    turns = []
    for lineno, line in enumerate(read_text(path, gutenberg=False).split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MiniLLMError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if isinstance(obj, dict) and isinstance(obj.get("turn"), str):
            turns.append(obj["turn"])
        elif isinstance(obj, dict) and isinstance(obj.get("turns"), list) and all(
                isinstance(t, str) for t in obj["turns"]):
            turns.extend(obj["turns"])
        else:
            raise MiniLLMError(f'{path}:{lineno}: expected an object like {{"turn": "..."}}')
    if not turns:
        raise MiniLLMError(f"{path}: no turns")
    return turns


def _stdin_turns():
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("USER: ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and not line:
            return
        line = line.rstrip("\n")
        if line.strip():
            yield line, interactive


def cmd_chat(args) -> int:
    from .generation import ChatSession

    turns = read_turns(args.prompts) if args.prompts else None
    model, tok = _load(args)
    sinks, window = _cache_shape(args, model)
    session = ChatSession(model, tok, sinks=sinks, window=window, max_new_tokens=args.max_new_tokens or None,
                          temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                          seed=args.seed, ignore_eos=args.ignore_eos, use_template=not args.no_template)
    source = ((t, False) for t in turns) if turns is not None else _stdin_turns()
    interrupted, start = False, time.perf_counter()
    try:
        for turn, echoed in source:
            if not echoed:
                _flush_print(f"USER: {turn}\n")
            _flush_print("ASSISTANT:")
            for piece in session.turn(turn):
                _flush_print(piece)
            _flush_print("\n")
    except KeyboardInterrupt:
        interrupted = True
        _flush_print("\n")
    seconds = time.perf_counter() - start
    cache = session.cache
    print(f"minillm: {session.turns} turns, {cache.tokens_seen} tokens through a cache of "
          f"{cache.sinks}+{cache.window} in {seconds:.1f} s"
          f"{' (chat template)' if session.template else ''}{', interrupted' if interrupted else ''}",
          file=sys.stderr)
    return 130 if interrupted else 0


# ----------------------------------------------------------------------------------------------
# ppl


def _fmt(x: float | None, width: int = 10) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.3f}"


def _finite(x):
    return None if x is None or not math.isfinite(x) else x


def cmd_ppl(args) -> int:
    from .evaluate import _check_dense, perplexity
    from .generation import sink_prefix
    from .text import read_texts

    modes = list(dict.fromkeys(args.mode))
    plt = _need_matplotlib("--plot") if args.plot else None
    _check_output(args.json, "--json")
    _check_output(args.plot, "--plot")
    text = read_texts(args.text)
    model, tok = _load(args)
    sinks, window = _cache_shape(args, model)
    ids = tok.encode(text)
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    if len(ids) < 2:
        raise MiniLLMError(f"the text is {len(ids)} token(s) long; perplexity needs at least 2")
    if "dense" in modes:  # refuse before spending time on the other modes
        _check_dense(model, len(ids) - 1 + len(sink_prefix(model.config)), args.dense_max_tokens)
    S = sinks + window
    print(f"minillm: {len(ids)} tokens from {len(args.text)} file(s); cache {sinks}+{window} (S={S}); "
          f"modes: {' '.join(modes)}", file=sys.stderr)

    results = {}
    for mode in modes:
        r = perplexity(model, ids, mode, sinks, window, stride=args.stride, seed=args.seed,
                       exact_loop=args.exact_loop, progress=True, dense_max_tokens=args.dense_max_tokens,
                       interruptible=True)
        results[mode] = r
        if r.interrupted:
            break
    interrupted = any(r.interrupted for r in results.values())

    strided = args.stride is not None
    head = f"{'mode':<10} {'tokens':>8} {'PPL':>10}" + (f" {'PPL@stride':>10}" if strided else "") + f" {'tokens/s':>10}"
    lines = [head]
    for mode, r in results.items():
        row = f"{mode:<10} {r.tokens:>8} {_fmt(r.ppl)}" + (f" {_fmt(r.ppl_strided)}" if strided else "")
        lines.append(row + f" {r.tokens_per_s:>10.0f}" + ("  (interrupted)" if r.interrupted else ""))
    if strided:
        first = next(iter(results.values()))
        lines.append(f"stride {args.stride}, offset {first.offset}: PPL@stride is over the same "
                     f"{int(first.subset.sum())} tokens in every mode")
    _flush_print("\n".join(lines) + "\n")

    if args.json:
        out = {"model": args.model or str(DEFAULT_MODEL), "files": list(args.text), "tokens": len(ids),
               "sinks": sinks, "cache_size": S, "dtype": args.dtype, "exact_loop": args.exact_loop,
               "modes": {}}
        if strided:
            first = next(iter(results.values()))
            out.update(stride=args.stride, offset=first.offset, seed=args.seed)
        for mode, r in results.items():
            d = {k: _finite(v) if isinstance(v, float) else v for k, v in r.summary().items()}
            d["nll_curve"] = r.nll_curve()
            out["modes"][mode] = d
        if interrupted:
            out["interrupted"] = True
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    if plt is not None:
        _plot_ppl(plt, results, args, S, model.config.max_position_embeddings, len(ids))
    return 130 if interrupted else 0


def _plot_ppl(plt, results, args, S: int, trained: int, n_tokens: int) -> None:
    """Running log-PPL against tokens, one line per mode (the paper's Figure 3)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    settled = []  # curve values past the first tokens (whose running mean swings wildly) set the y range
    for (mode, r), style in zip(results.items(), ["-", "--", "-.", ":"]):
        curve = r.nll_curve()
        if curve:
            ax.plot([x for x, _ in curve], [y for _, y in curve], ls=style, label=f"{mode} (PPL {r.ppl:.2f})")
            settled += [y for x, y in curve if x > min(100, n_tokens // 20)] or [y for _, y in curve]
    if settled:
        lo, hi = min(settled), max(settled)
        ax.set_ylim(lo - 0.1 * (hi - lo) - 0.05, hi + 0.1 * (hi - lo) + 0.05)
    ax.axvline(S, color="gray", ls=":", lw=1)
    ax.text(S, ax.get_ylim()[1], f" S={S}", va="top", fontsize=8, color="gray")
    if trained < n_tokens:
        ax.axvline(trained, color="gray", ls="--", lw=1)
        ax.text(trained, ax.get_ylim()[0], f" trained context {trained}", va="bottom", fontsize=8, color="gray")
    ax.set_xlabel("tokens")
    ax.set_ylabel("log PPL (running mean NLL)")
    ax.set_title(f"{Path(args.model or DEFAULT_MODEL).name}: cache {args.sinks}+{S - args.sinks}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# attn


def cmd_attn(args) -> int:
    from .evaluate import attention_maps, attention_probs, attention_sink_scores
    from .generation import sink_prefix
    from .text import read_texts

    plt = _need_matplotlib("--png")
    _check_output(args.png, "--png")
    _check_output(args.json, "--json")
    text = read_texts(args.text)
    model, tok = _load(args)
    ids = tok.encode(text)
    T = min(args.tokens, len(ids) + len(sink_prefix(model.config)))
    if T < 2:
        raise MiniLLMError(f"the text is {len(ids)} token(s) long; attention maps need at least 2")
    if T < args.tokens:
        _warn(f"the text has only {T} tokens; mapping those")
    if args.min_query is not None and args.min_query >= T:
        raise MiniLLMError(f"--min-query {args.min_query} must be below the number of tokens ({T})")
    probs = attention_probs(model, ids, T)
    maps = attention_maps(model, ids, probs=probs)
    scores = attention_sink_scores(model, ids, min_query=args.min_query, probs=probs)

    lines = [f"attention on token 0 from queries {scores.min_query}..{T - 1} (uniform would be "
             f"{scores.uniform:.4f})", f"{'layer':>5} {'mean':>8} {'max head':>9}"]
    for i, (m, h) in enumerate(zip(scores.per_layer, scores.strongest_head)):
        lines.append(f"{i:>5} {m:>8.4f} {h:>9.4f}")
    _flush_print("\n".join(lines) + "\n")
    if args.json:
        out = {"model": args.model or str(DEFAULT_MODEL), "files": list(args.text), **scores.to_dict()}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    _plot_maps(plt, maps, scores, args)
    return 0


def _plot_maps(plt, maps, scores, args) -> None:
    from .plots import attention_map_figure

    title = f"{Path(args.model or DEFAULT_MODEL).name}: first {maps.shape[1]} tokens"
    fig = attention_map_figure(plt, maps, scores.per_layer, title)
    fig.savefig(args.png, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a one-line usage error
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 0
    for stream in (sys.stdout, sys.stderr):  # a model can sample bytes a console cannot show
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    try:
        return args.func(args)
    except MiniLLMError as e:
        print(f"minillm: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `minillm generate ... | head`: stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
