"""The `minillm` command line: a thin layer over the library.

    minillm generate [MODEL] --prompt TEXT        stream text from a fixed-size sink+window cache
    minillm chat     [MODEL] [--prompts F.jsonl]  a conversation over one persistent cache
    minillm batch    [MODEL] --input F.jsonl      many prompts at once (continuous batching), JSONL out
    minillm ppl      [MODEL] --text FILE [...]    long-text perplexity: streaming/window/recompute/dense
    minillm attn     [MODEL] --text FILE --png P  attention maps and per-layer attention-sink scores

MODEL is a local checkpoint directory or a hub repo id; without it, the shipped default
`weights/llama-tiny`. The cache is `--sinks N` plus a window, `--cache-size S` keys in all (the
new token included), as in the library's `new_cache(sinks=N, window=S-N)`.

Bad input is one line on stderr (`minillm: error: ...`) and exit code 2; Ctrl-C exits with 130
and no traceback (`ppl` first prints what it scored so far).

Text rule: every text (`--prompt`, `--prompt-file`, `--text`, chat turns from a file or stdin)
must be valid UTF-8. Invalid bytes or lone surrogates are refused, naming where and the offset;
nothing is silently replaced. Outputs (`--json`, `--plot`, `--png`, `--output`) are checked before the work,
never overwrite an input, and are written atomically (a temporary file renamed into place).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

from . import __version__
from .errors import MiniLLMError
from .limits import MAX_THREADS

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "weights" / "llama-tiny"
DEFAULT_CACHE_SIZE = 1024  # capped at the checkpoint's trained context unless given
MAX_SEED = (1 << 64) - 1  # torch.Generator.manual_seed takes at most 64 bits
TEXT_RULE = ("Text must be valid UTF-8: invalid bytes or lone surrogates are refused with their "
             "offset, never replaced.")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `minillm: error: ...` and exit code 2, no usage dump."""

    def error(self, message: str):
        self.exit(2, f"minillm: error: {' '.join(message.split())}\n")


def _int_at_least(low: int, high: int | None = None, high_why: str = ""):
    """An argparse type: an integer >= low (and <= high, if given; `high_why` says why)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text[:40]!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}{high_why}, got {text[:40]}")
        return value
    return parse


def _device_name(text: str) -> str:
    """An argparse type: cpu, cuda, cuda:N or mps (checked before torch sees it)."""
    if not re.fullmatch(r"(cpu|mps)(:0)?|cuda(:\d{1,4})?", text.strip().lower()):
        raise argparse.ArgumentTypeError(f"unknown device {text[:40]!r} (use cpu, cuda, cuda:N or mps)")
    return text.strip().lower()


def _dtype_name(text: str) -> str:
    from . import DTYPES

    if text.lower().removeprefix("torch.") not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text[:40]!r} (use float32, bfloat16, float16 or float64)")
    return text


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
                   help="checkpoint directory, hub repo id or .gguf file (default: the shipped weights/llama-tiny)")
    p.add_argument("--strict-config", action="store_true",
                   help="refuse config keys minillm does not know (default: warn, naming them, and load)")
    p.add_argument("--dtype", type=_dtype_name, default="float32",
                   help="float32 (default), bfloat16, float16 or float64")
    p.add_argument("--device", type=_device_name, default="cpu", help="cpu (default), cuda, cuda:N or mps")
    p.add_argument("--threads", type=_int_at_least(1, MAX_THREADS, " (far more than any machine has cores)"),
                   help=f"torch CPU threads, at most {MAX_THREADS} (default: torch's choice)")
    p.add_argument("--int8", action="store_true",
                   help="weight-only int8 (CPU; not exact: per-row scales, see minillm/quant.py)")
    if cache_flags:
        p.add_argument("--compile", action="store_true",
                       help="torch.compile the decode step (compiles once, ~20 s for SmolLM2; pays on long streams)")
        p.add_argument("--sinks", type=_int_at_least(0), default=4, help="attention-sink tokens kept (default 4)")
        p.add_argument("--cache-size", type=_int_at_least(1), metavar="S",
                       help=f"keys in the cache, sinks + window, the new token included "
                            f"(default {DEFAULT_CACHE_SIZE}, or the checkpoint's context if smaller)")
    return p


def _sampling(p: argparse.ArgumentParser, max_new_help: str) -> None:
    p.add_argument("--max-new-tokens", type=_int_at_least(-1), default=256, metavar="N", help=max_new_help)
    p.add_argument("--temperature", type=_float_in(0), default=0.8, help="0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=_int_at_least(0), default=0, help="sample from the k most likely (0: off)")
    p.add_argument("--top-p", type=_float_in(0, 1, low_open=True), default=0.95,
                   help="nucleus sampling mass (default 0.95; 1: off)")
    p.add_argument("--seed", type=_int_at_least(0, MAX_SEED, " (64 bits)"), default=0,
                   help="sampling seed, 0 to 2**64-1 (default 0)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past an end-of-sequence token")


def build_parser() -> argparse.ArgumentParser:
    from .evaluate import DENSE_MAX_TOKENS, MODES

    parser = _Parser(prog="minillm",
                     description="StreamingLLM in pure PyTorch: attention sinks + a rolling KV window. " + TEXT_RULE)
    parser.add_argument("--version", action="version", version=f"minillm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", parents=[_common()], help="generate text, streaming",
                       description="Generate text through a fixed-size sink+window cache, printing it as it "
                                   "comes. A prompt of any length is read in constant memory. " + TEXT_RULE)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="the prompt (valid UTF-8; anything else is refused)")
    src.add_argument("--prompt-file", metavar="F", help="read the prompt from a UTF-8 file")
    _sampling(g, "tokens to generate (default 256; 0: none; -1: endless, until Ctrl-C)")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", parents=[_common()], help="multi-turn chat over one streaming cache",
                       description="A conversation over one persistent streaming cache. Turns come from a "
                                   "JSONL file ({\"turn\": \"...\"} per line) or, interactively, from stdin. "
                                   + TEXT_RULE)
    c.add_argument("--prompts", metavar="F.jsonl", help="JSONL file of user turns (default: read stdin)")
    c.add_argument("--no-template", action="store_true",
                   help="use the plain 'USER: ... ASSISTANT:' format even if the checkpoint has a chat template")
    c.add_argument("--system", metavar="TEXT", help="a system prompt, rendered by the chat template")
    _sampling(c, "tokens per reply at most (default 256; 0: none; -1: until EOS)")
    c.set_defaults(func=cmd_chat)

    b = sub.add_parser("batch", parents=[_common()], help="generate for many prompts at once",
                       description="Generate for every prompt of a JSONL file through one cache of --batch-size "
                                   "rows (continuous batching: a finished row takes the next prompt at once). "
                                   'Input lines: {"prompt": "...", and optionally "max_new_tokens", "seed", '
                                   '"temperature", "id"}. Output lines, in input order: {"line", "id", "prompt", '
                                   '"text", "tokens", "stop"}, or {"line", "id", "error"} for a malformed line '
                                   "(the others still run; the exit code is then 2). " + TEXT_RULE)
    b.add_argument("--input", required=True, metavar="F.jsonl", help='JSONL prompts, one object per line ("-": stdin)')
    b.add_argument("--output", default="-", metavar="OUT.jsonl",
                   help="where to write the results (default -: stdout); a file is written atomically")
    b.add_argument("--batch-size", type=_int_at_least(1), default=8, metavar="B",
                   help="prompts generated at once: the cache's rows (default 8)")
    _sampling(b, "tokens per prompt at most (default 256; 0: none; -1: until EOS); a line's "
                 "\"max_new_tokens\" wins")
    b.set_defaults(func=cmd_batch)

    p = sub.add_parser("ppl", parents=[_common()], help="long-text perplexity",
                       description="Perplexity of long text (files concatenated, Gutenberg boilerplate stripped). "
                                   + TEXT_RULE)
    p.add_argument("--text", nargs="+", required=True, metavar="FILE", help="UTF-8 text file(s)")
    p.add_argument("--mode", nargs="+", choices=MODES, default=["streaming"], metavar="MODE",
                   help=f"one or more of {', '.join(MODES)} (default streaming)")
    p.add_argument("--max-tokens", type=_int_at_least(2), metavar="N", help="score only the first N tokens")
    p.add_argument("--stride", type=_int_at_least(1), metavar="K",
                   help="recompute scores every K-th token from a seeded random offset; every mode "
                        "then also reports ppl_strided over that subset")
    p.add_argument("--seed", type=_int_at_least(0, MAX_SEED, " (64 bits)"), default=0,
                   help="seed of the stride offset (default 0)")
    p.add_argument("--exact-loop", action="store_true",
                   help="feed one token at a time (the reference) instead of the parallel evaluation")
    p.add_argument("--dense-max-tokens", type=_int_at_least(1), default=DENSE_MAX_TOKENS, metavar="N",
                   help=f"refuse dense mode past N tokens: its cache grows with the text (default {DENSE_MAX_TOKENS})")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON (checked before the work)")
    p.add_argument("--plot", metavar="OUT.png",
                   help="plot running log-PPL against tokens, as .png, .pdf or .svg (needs matplotlib)")
    p.set_defaults(func=cmd_ppl)

    a = sub.add_parser("attn", parents=[_common(cache_flags=False)], help="attention maps and sink scores",
                       description="Per-layer attention maps (heads averaged) of a dense forward over the first "
                                   "tokens of a text, and the per-layer attention-sink score.")
    a.add_argument("--text", nargs="+", required=True, metavar="FILE", help="UTF-8 text file(s)")
    a.add_argument("--png", required=True, metavar="OUT",
                   help="where to draw the maps, as .png, .pdf or .svg (needs matplotlib)")
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


FIGURE_FORMATS = (".png", ".pdf", ".svg")


def _check_outputs(outputs: dict[str, str | None], inputs: list[str], model_dir: str | None = None,
                   figures: tuple[str, ...] = ()) -> None:
    """Fail before the work, not after it, when an output cannot be written: its directory must
    exist and take a new file (probed with a real temporary file), the path must not be a
    directory or a non-regular file (/dev/full, a FIFO), figures need an explicit supported
    extension, no two outputs may share a path, and no output may be one of the inputs (a text
    file, the prompts, or a file of the model's directory)."""
    seen: dict[str, str] = {}
    protected = {os.path.realpath(p): p for p in inputs}
    if model_dir is not None and os.path.isdir(model_dir):
        for name in os.listdir(model_dir):
            protected[os.path.realpath(os.path.join(model_dir, name))] = os.path.join(model_dir, name)
    elif model_dir is not None and os.path.isfile(model_dir):  # a single-file checkpoint (GGUF)
        protected[os.path.realpath(model_dir)] = model_dir
    inodes = {}  # a hard link to an input is the input too
    for real, p in protected.items():
        try:
            st = os.stat(real)
            inodes[(st.st_dev, st.st_ino)] = p
        except OSError:
            pass
    for flag, path in outputs.items():
        if path is None:
            continue
        if not path or not path.strip():
            raise MiniLLMError(f"{flag}: the output path is empty")
        if "\0" in path:
            raise MiniLLMError(f"{flag}: the output path contains a NUL byte")
        real = os.path.realpath(path)
        if path.endswith(os.sep) or os.path.isdir(path):
            raise MiniLLMError(f"{flag} {path} is a directory; give a file name")
        if os.path.exists(path) and not os.path.isfile(path):
            raise MiniLLMError(f"{flag} {path} is not a regular file (a device or a pipe); give a file name")
        if flag in figures:
            ext = os.path.splitext(path)[1].lower()
            if ext not in FIGURE_FORMATS:
                raise MiniLLMError(f"{flag} {path}: unsupported figure format {ext or '(no extension)'}; "
                                   f"use {', '.join(FIGURE_FORMATS)}")
        try:
            st = os.stat(real)
            linked = inodes.get((st.st_dev, st.st_ino))
        except OSError:
            linked = None
        if real in protected or linked is not None:
            raise MiniLLMError(f"{flag} {path} is an input of this run ({protected.get(real, linked)}); "
                               f"it is never overwritten")
        if real in seen:
            raise MiniLLMError(f"{flag} and {seen[real]} are the same file {path}; give each its own")
        seen[real] = flag
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise MiniLLMError(f"{flag} {path} is not writable")
        directory = os.path.dirname(real)
        if not os.path.isdir(directory):
            raise MiniLLMError(f"{flag} {path}: directory {os.path.dirname(path) or '.'} does not exist")
        try:  # the one sure test: make (and remove) a file where the output will go
            fd, probe = tempfile.mkstemp(dir=directory, prefix=".minillm-probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise MiniLLMError(f"{flag} {path}: cannot write in {os.path.dirname(path) or '.'} "
                               f"({e.strerror or e})") from None


def _write_atomic(path: str, flag: str, write) -> None:
    """`write(tmp_path)` into a temporary file next to `path`, then rename it over `path`: a
    failure (a full disk, Ctrl-C) leaves the old file, never a half-written one."""
    real = os.path.realpath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(real), prefix=f".{os.path.basename(real)}.",
                               suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; an output gets the usual permissions
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, real)
    except OSError as e:
        raise MiniLLMError(f"cannot write {flag} {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_json(path: str, flag: str, data: dict) -> None:
    text = json.dumps(data, indent=1, allow_nan=False) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    _write_atomic(path, flag, write)


def _save_figure(plt, fig, path: str, flag: str, dpi: int) -> None:
    fmt = os.path.splitext(path)[1].lower().lstrip(".")
    try:
        _write_atomic(path, flag, lambda tmp: fig.savefig(tmp, dpi=dpi, format=fmt))
    finally:
        plt.close(fig)


def check_text(text: str, where: str) -> str:
    """The text rule: `text` must be valid UTF-8. A lone surrogate (what Python makes of invalid
    bytes in argv or a surrogateescape stream, or a "\\ud800" JSON escape) is refused, naming
    `where`, the offset and the byte; nothing is replaced."""
    for i, ch in enumerate(text):
        if "\ud800" <= ch <= "\udfff":
            if "\udc80" <= ch <= "\udcff":  # surrogateescape: an undecodable byte
                raise MiniLLMError(f"{where} is not valid UTF-8: byte 0x{ord(ch) - 0xDC00:02x} at character "
                                   f"{i} cannot be decoded")
            raise MiniLLMError(f"{where} contains a lone surrogate U+{ord(ch):04X} at character {i}, "
                               f"which is not valid UTF-8 text")
    return text


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
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", minillm.ConfigWarning)
            model = minillm.load(name, dtype=args.dtype, device=args.device, strict=args.strict_config)
            tok = minillm.load_tokenizer(name)
        for w in caught:  # one line each, as every other warning of the CLI
            if issubclass(w.category, minillm.ConfigWarning):
                _warn(" ".join(str(w.message).split()) + " (--strict-config refuses them)")
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    except MiniLLMError:
        raise
    except Exception as e:  # a corrupt file can raise anything; the user needs one line, not a trace
        first = (str(e).strip().splitlines() or [""])[0]
        raise MiniLLMError(f"cannot load model {name}: {type(e).__name__}: {first}") from None
    model.eval()
    if getattr(args, "int8", False):
        from .quant import quantize_int8
        quantize_int8(model)
    if getattr(args, "compile", False):
        model.compile_decode()
    return model, tok


def _cache_shape(args, model, rows: int = 1) -> tuple[int, int]:
    """(sinks, window) from --sinks and --cache-size, with the trained-context warning; the cache
    of `rows` streams must fit in memory."""
    trained = model.config.max_position_embeddings
    S = args.cache_size if args.cache_size is not None else min(DEFAULT_CACHE_SIZE, trained)
    if S <= args.sinks:
        raise MiniLLMError(f"--cache-size must exceed --sinks (got --cache-size {S}, --sinks {args.sinks}): "
                           f"the window needs at least one slot")
    import torch

    from .limits import cache_bytes, check_fits

    what = f"--cache-size {S}: a KV cache of {S} keys" if rows == 1 else \
        f"--batch-size {rows} --cache-size {S}: a KV cache of {rows} x {S} keys"
    check_fits(cache_bytes(model.config, rows, args.sinks, S - args.sinks, torch.finfo(model.dtype).bits // 8),
               model.device, what)
    if S > trained:
        _warn(f"--cache-size {S} exceeds the checkpoint's trained context ({trained} positions); "
              f"positions past it were never trained")
    return args.sinks, S - args.sinks


def _flush_print(text: str) -> None:
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except (OSError, ValueError) as e:  # /dev/full, a closed or failing stdout
        raise MiniLLMError(f"cannot write to stdout: {getattr(e, 'strerror', None) or e}") from None


def _max_new(args) -> int | None:
    return None if args.max_new_tokens == -1 else args.max_new_tokens


# ----------------------------------------------------------------------------------------------
# generate


def cmd_generate(args) -> int:
    from .generation import generate
    from .text import read_text

    if args.prompt is not None:
        prompt = check_text(args.prompt, "--prompt")
    else:
        prompt = read_text(args.prompt_file, gutenberg=False)
    if not prompt:
        raise MiniLLMError("the prompt is empty")
    model, tok = _load(args)
    sinks, window = _cache_shape(args, model)
    ids = tok.encode(prompt)
    decoder = tok.decoder(start_of_text=False)  # the output continues the prompt
    n, interrupted, start = 0, False, time.perf_counter()
    try:
        for token in generate(model, ids, max_new_tokens=_max_new(args),
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
            turns.append(check_text(obj["turn"], f"{path}:{lineno}: the turn"))
        elif isinstance(obj, dict) and isinstance(obj.get("turns"), list) and all(
                isinstance(t, str) for t in obj["turns"]):
            turns.extend(check_text(t, f"{path}:{lineno}: turn {k + 1}") for k, t in enumerate(obj["turns"]))
        else:
            raise MiniLLMError(f'{path}:{lineno}: expected an object like {{"turn": "..."}}')
    if not turns:
        raise MiniLLMError(f"{path}: no turns")
    return turns


def _stdin_turns():
    """Turns from stdin, one per line (the text rule applies: invalid UTF-8 is refused)."""
    stdin = sys.stdin
    if stdin is None:  # a closed stdin: no turns
        return
    if hasattr(stdin, "reconfigure"):  # undecodable bytes arrive as surrogates, for check_text
        try:
            stdin.reconfigure(errors="surrogateescape")
        except (ValueError, OSError):
            pass
    try:
        interactive = stdin.isatty()
    except (ValueError, OSError):
        return
    lineno = 0
    while True:
        try:
            line = input("USER: ") if interactive else stdin.readline()
        except EOFError:
            return
        except (OSError, ValueError) as e:  # a closed or failing stdin
            raise MiniLLMError(f"cannot read stdin: {getattr(e, 'strerror', None) or e}") from None
        if not interactive and not line:
            return
        lineno += 1
        line = check_text(line.rstrip("\n"), f"stdin line {lineno}")
        if line.strip():
            yield line, interactive


def cmd_chat(args) -> int:
    from .generation import ChatSession

    turns = read_turns(args.prompts) if args.prompts is not None else None
    model, tok = _load(args)
    sinks, window = _cache_shape(args, model)
    session = ChatSession(model, tok, sinks=sinks, window=window, max_new_tokens=_max_new(args),
                          temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                          seed=args.seed, ignore_eos=args.ignore_eos, use_template=not args.no_template,
                          system=args.system)
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
    print(f"minillm: {session.turns} turns, {int(cache.tokens_seen[0])} tokens through a cache of "
          f"{cache.sinks}+{cache.window} in {seconds:.1f} s"
          f"{' (chat template)' if session.template else ''}{', interrupted' if interrupted else ''}",
          file=sys.stderr)
    return 130 if interrupted else 0


# ----------------------------------------------------------------------------------------------
# batch


PROMPT_KEYS = ("prompt", "max_new_tokens", "seed", "temperature", "id")


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_prompt_line(line: str, where: str) -> dict:
    """One JSONL line of `batch`: {"prompt": str, optionally "max_new_tokens" (int >= -1; -1:
    until EOS), "seed" (0 to 2**64-1), "temperature" (a finite number >= 0), "id" (any JSON,
    echoed)}; other keys are returned under "unknown". Raises MiniLLMError naming `where`."""
    try:
        obj = json.loads(line, parse_constant=_no_constant)
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, an integer of over 4300 digits
        raise MiniLLMError(f"{where}: not valid JSON ({getattr(e, 'msg', None) or e})") from None
    if not isinstance(obj, dict):
        raise MiniLLMError(f'{where}: expected an object like {{"prompt": "..."}}, got {type(obj).__name__}')
    if "prompt" not in obj:
        raise MiniLLMError(f'{where}: no "prompt" (expected an object like {{"prompt": "..."}})')
    prompt = obj["prompt"]
    if not isinstance(prompt, str):
        raise MiniLLMError(f'{where}: "prompt" must be a string, got {type(prompt).__name__}')
    if not prompt:
        raise MiniLLMError(f"{where}: the prompt is empty")
    out = {"prompt": check_text(prompt, f"{where}: the prompt"), "id": obj.get("id"),
           "unknown": [k for k in obj if k not in PROMPT_KEYS]}
    for key, low, high in (("max_new_tokens", -1, None), ("seed", 0, MAX_SEED)):
        if key in obj:
            v = obj[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high):
                rule = f"an integer >= {low}" if high is None else f"an integer in [{low}, 2**64-1]"
                raise MiniLLMError(f'{where}: "{key}" must be {rule}, got {json.dumps(v)[:40]}')
            out[key] = v
    if "temperature" in obj:
        v = obj["temperature"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
            raise MiniLLMError(f'{where}: "temperature" must be a number >= 0, got {json.dumps(v)[:40]}')
        out["temperature"] = v
    return out


def read_prompts(path: str) -> tuple[str, list[tuple[int, dict | str]]]:
    """The name to report `path` by, and its non-blank lines as (line number, parsed line) or
    (line number, error message). The whole input must be valid UTF-8 (the text rule)."""
    from .text import MAX_TEXT_BYTES, read_text

    if path == "-":
        name = "stdin"
        if sys.stdin is None:
            raise MiniLLMError("--input -: there is no stdin")
        try:
            data = sys.stdin.buffer.read(MAX_TEXT_BYTES + 1)
        except (OSError, ValueError, AttributeError) as e:
            raise MiniLLMError(f"cannot read stdin: {getattr(e, 'strerror', None) or e}") from None
        if len(data) > MAX_TEXT_BYTES:
            raise MiniLLMError(f"stdin holds more than {MAX_TEXT_BYTES >> 30} GiB of prompts")
        try:
            text = data.decode("utf-8-sig").replace("\r\n", "\n")
        except UnicodeDecodeError as e:
            raise MiniLLMError(f"stdin is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start} "
                               f"cannot be decoded)") from None
    else:
        name, text = path, read_text(path, gutenberg=False)
    lines = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                lines.append((lineno, parse_prompt_line(line, f"{name}:{lineno}")))
            except MiniLLMError as e:
                lines.append((lineno, str(e)))
    if not lines:
        raise MiniLLMError(f"{name}: no prompts")
    return name, lines


class _Records:
    """The output records, kept in input order: to stdout as soon as every earlier line is done,
    or to a file, atomically, at the end."""

    def __init__(self, path: str, order: list[int]):
        self.path, self.order, self.done, self.printed = path, order, {}, 0

    def add(self, lineno: int, record: dict) -> None:
        self.done[lineno] = json.dumps(record, ensure_ascii=False, allow_nan=False)
        if self.path == "-":
            while self.printed < len(self.order) and self.order[self.printed] in self.done:
                _flush_print(self.done[self.order[self.printed]] + "\n")
                self.printed += 1

    def finish(self) -> None:
        """Write what is done (after Ctrl-C, the lines not finished have no record)."""
        lines = [self.done[n] for n in self.order if n in self.done]
        if self.path == "-":
            for text in lines[self.printed:]:
                _flush_print(text + "\n")
            return

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(t + "\n" for t in lines)
        _write_atomic(self.path, "--output", write)


def _line_error(records: _Records, lineno: int, message: str, line_id=None) -> None:
    """A malformed line: one line on stderr, and an error record in its place in the output."""
    print(f"minillm: error: {' '.join(message.split())}", file=sys.stderr)
    records.add(lineno, {"line": lineno, "id": line_id, "error": message})


def _batch_jobs(args, name: str, good: list[tuple[int, dict]], tok, records: _Records) -> tuple[list, int]:
    """(line number, parsed line, Request) for each good line, and how many encode to nothing.

    A line's seed defaults to --seed + (line number - 1): it depends on the line alone, whatever
    the other lines hold, and the first line gets `minillm generate --seed S`'s stream."""
    from .batch import Request, row_seed

    jobs, empty = [], 0
    for lineno, p in good:
        ids = tok.encode(p["prompt"])
        if not ids:
            empty += 1
            _line_error(records, lineno, f"{name}:{lineno}: the prompt encodes to no tokens", p["id"])
            continue
        settings = {"seed": p.get("seed", row_seed(args.seed, lineno - 1))}
        if "max_new_tokens" in p:
            settings["max_new_tokens"] = None if p["max_new_tokens"] == -1 else p["max_new_tokens"]
        if "temperature" in p:
            settings["temperature"] = p["temperature"]
        jobs.append((lineno, p, Request(ids, **settings)))
    return jobs, empty


def _run_batch(args, name: str, model, tok, jobs: list, records: _Records) -> tuple[int, float, bool]:
    """Generate every job, a record as each finishes; (tokens generated, EOS not counted, seconds,
    interrupted)."""
    from tqdm import tqdm

    from .batch import generate_batch

    rows = min(args.batch_size, len(jobs))
    sinks, window = _cache_shape(args, model, rows)
    print(f"minillm: {len(jobs)} prompts from {name}, {rows} at a time through a cache of {sinks}+{window}",
          file=sys.stderr)
    drawn: dict[int, list[int]] = {}
    tokens, interrupted, start = 0, False, time.perf_counter()
    bar = tqdm(total=len(jobs), unit="prompt", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
    try:
        for index, token, stop in generate_batch(
                model, [r for _, _, r in jobs], batch_size=rows, max_new_tokens=_max_new(args),
                temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p, seed=args.seed,
                sinks=sinks, window=window, eos_ids=tok.eos_ids, ignore_eos=args.ignore_eos,
                vocab_size=tok.vocab_size):
            got = drawn.setdefault(index, [])
            if token is not None and stop != "eos":  # the EOS id ends the text; it is not part of it
                got.append(token)
                tokens += 1
            if stop is None:
                continue
            del drawn[index]
            lineno, p, _ = jobs[index]
            decoder = tok.decoder(start_of_text=False)  # the text continues the prompt
            text = "".join(decoder.push(t) for t in got) + decoder.flush()
            records.add(lineno, {"line": lineno, "id": p["id"], "prompt": p["prompt"], "text": text,
                                 "tokens": len(got), "stop": stop})
            bar.update(1)
            bar.set_postfix_str(f"{tokens / max(time.perf_counter() - start, 1e-9):.0f} tok/s", refresh=False)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    return tokens, time.perf_counter() - start, interrupted


def cmd_batch(args) -> int:
    inputs = [] if args.input == "-" else [args.input]
    if args.output != "-":
        _check_outputs({"--output": args.output}, inputs, _model_dir(args))
    name, lines = read_prompts(args.input)
    records = _Records(args.output, [n for n, _ in lines])
    bad, warned = 0, set()
    for lineno, parsed in lines:
        if isinstance(parsed, str):
            bad += 1
            _line_error(records, lineno, parsed)
            continue
        for key in parsed["unknown"]:
            if key not in warned:
                warned.add(key)
                _warn(f"{name}:{lineno}: ignoring the unknown key {key!r} (known: {', '.join(PROMPT_KEYS)})")
    good = [(n, p) for n, p in lines if not isinstance(p, str)]
    jobs, tokens, seconds, interrupted = [], 0, 0.0, False
    if good:
        model, tok = _load(args)
        jobs, empty = _batch_jobs(args, name, good, tok, records)
        bad += empty
        if jobs:
            tokens, seconds, interrupted = _run_batch(args, name, model, tok, jobs, records)
    records.finish()
    done = sum(1 for n, _, _ in jobs if n in records.done)
    print(f"minillm: {done} of {len(jobs)} prompts, {tokens} tokens in {seconds:.1f} s "
          f"({tokens / max(seconds, 1e-9):.1f} tokens/s)" + (f"; {bad} malformed line(s)" if bad else "")
          + (", interrupted" if interrupted else ""), file=sys.stderr)
    return 130 if interrupted else 2 if bad else 0


# ----------------------------------------------------------------------------------------------
# ppl


def _fmt(x: float | None, width: int = 10) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.3f}"


def _finite(x):
    return None if x is None or not math.isfinite(x) else x


def _model_dir(args) -> str:
    return str(DEFAULT_MODEL) if args.model is None else args.model


def cmd_ppl(args) -> int:
    from .evaluate import check_dense, perplexity
    from .generation import sink_prefix
    from .text import read_texts

    modes = list(dict.fromkeys(args.mode))
    _check_outputs({"--json": args.json, "--plot": args.plot}, args.text, _model_dir(args), figures=("--plot",))
    plt = _need_matplotlib("--plot") if args.plot else None
    text = read_texts(args.text)
    model, tok = _load(args)
    sinks, window = _cache_shape(args, model)
    ids = tok.encode(text)
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    if len(ids) < 2:
        raise MiniLLMError(f"the text is {len(ids)} token(s) long; perplexity needs at least 2")
    if "dense" in modes:  # refuse before spending time on the other modes
        check_dense(model, len(ids) - 1 + len(sink_prefix(model.config)), args.dense_max_tokens)
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
    for mode, r in results.items():  # "-": nothing scored (never a NaN standing in for it)
        ppl = r.ppl if r.tokens else None
        ppl_strided = r.ppl_strided if (strided and int((r.subset & r.scored).sum())) else None
        rate = f"{r.tokens_per_s:>10.0f}" if r.tokens and r.seconds > 0 else f"{'-':>10}"
        row = f"{mode:<10} {r.tokens:>8} {_fmt(ppl)}" + (f" {_fmt(ppl_strided)}" if strided else "")
        lines.append(row + f" {rate}" + ("  (interrupted)" if r.interrupted else ""))
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
        _write_json(args.json, "--json", out)
    if plt is not None:
        from .plots import running_ppl_figure

        curves = {f"{mode} (PPL {r.ppl:.2f})": r.nll_curve() for mode, r in results.items() if r.tokens}
        title = f"{Path(args.model or DEFAULT_MODEL).name}: cache {sinks}+{window}"
        fig = running_ppl_figure(plt, curves, S, model.config.max_position_embeddings, len(ids), title)
        _save_figure(plt, fig, args.plot, "--plot", dpi=120)
    return 130 if interrupted else 0


# ----------------------------------------------------------------------------------------------
# attn


def cmd_attn(args) -> int:
    from .generation import sink_prefix
    from .sinks import attention_maps, attention_probs, attention_sink_scores
    from .text import read_texts

    _check_outputs({"--png": args.png, "--json": args.json}, args.text, _model_dir(args), figures=("--png",))
    plt = _need_matplotlib("--png")
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
        _write_json(args.json, "--json", out)
    from .plots import attention_map_figure

    title = f"{Path(args.model or DEFAULT_MODEL).name}: first {maps.shape[1]} tokens"
    fig = attention_map_figure(plt, maps, scores.per_layer, title)
    _save_figure(plt, fig, args.png, "--png", dpi=110)
    return 0


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
        if stream is not None and hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="replace")
            except (ValueError, OSError):  # a closed stream
                pass
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
