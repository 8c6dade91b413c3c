"""The command line's arguments: one parser, its argument types, and its one-line errors.

Every bad argument is `minillm: error: ...` on stderr and exit code 2 (no usage dump). Each
subcommand names its function in minillm/cli/commands.py by `args.command`.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys

from .. import __version__
from ..core.contract import POSITIONS
from ..limits import MAX_THREADS

DEFAULT_CACHE_SIZE = 1024  # capped at the checkpoint's trained context unless given
MAX_SEED = (1 << 64) - 1  # torch.Generator.manual_seed takes at most 64 bits
TEXT_HELP = ("UTF-8 text file(s), '-' for stdin (default: the shipped sample, the opening of Frankenstein, "
             "minillm/data/sample.txt)")
TEXT_RULE = ("Text must be valid UTF-8: invalid bytes or lone surrogates are refused with their "
             "offset, never replaced.")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `minillm: error: ...` and exit code 2, no usage dump."""

    def error(self, message: str):
        self.exit(2, f"minillm: error: {' '.join(message.split())}\n")

    def _print_message(self, message, file=None):
        """argparse ignores a failed write, so `minillm --help > /dev/full` exited 0: a failed
        stdout is one line on stderr and exit code 2 (a closed pipe, `| head`, stays quiet)."""
        if not message:
            return
        file = file or sys.stderr
        try:
            file.write(message)
            file.flush()
        except BrokenPipeError:
            raise
        except (OSError, ValueError, AttributeError) as e:
            if file is sys.stderr:
                return
            try:
                print(f"minillm: error: cannot write to stdout: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
                fd = os.open(os.devnull, os.O_WRONLY)  # what stays buffered cannot fail a second time
                os.dup2(fd, file.fileno())
                os.close(fd)
            except (OSError, ValueError, AttributeError):
                pass
            raise SystemExit(2) from None


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
    from .. import DTYPES

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
    p.add_argument("-m", "--model", dest="model_flag", metavar="MODEL", help="MODEL, as an option (mlx-lm's spelling)")
    p.add_argument("--strict-config", action="store_true",
                   help="refuse config keys minillm does not know (default: warn, naming them, and load)")
    p.add_argument("--dtype", type=_dtype_name, default="float32",
                   help="float32 (default), bfloat16, float16 or float64")
    p.add_argument("--device", type=_device_name, default="cpu", help="cpu (default), cuda, cuda:N or mps")
    p.add_argument("--threads", type=_int_at_least(1, MAX_THREADS, " (far more than any machine has cores)"),
                   help=f"torch CPU threads, at most {MAX_THREADS} (default: torch's choice)")
    p.add_argument("--int8", action="store_true",
                   help="weight-only int8 for the decoder's projections (CPU; not exact: per-row scales, bfloat16 "
                        "products, the head kept float; see minillm/fast/quant.py)")
    p.add_argument("--no-fast", action="store_true",
                   help="run the core alone (minillm/core/), without the fast layer: the same results, slower")
    if cache_flags:
        p.add_argument("--compile", action="store_true",
                       help="torch.compile the decode step (compiles once, ~20 s for SmolLM2; pays on long streams)")
        p.add_argument("--tensor-parallel", action="store_true",
                       help="under torchrun: split the heads and MLP over the ranks (minillm/parallel/); "
                            "only rank 0 prints or writes")
        p.add_argument("--sinks", type=_int_at_least(0), default=4, help="attention-sink tokens kept (default 4)")
        p.add_argument("--cache-size", type=_int_at_least(1), metavar="S",
                       help=f"keys in the cache, sinks + window, the new token included "
                            f"(default {DEFAULT_CACHE_SIZE}, or the checkpoint's context if smaller)")
        p.add_argument("--positions", choices=POSITIONS, default="cache",
                       help="position convention once the cache is full: cache (default, the paper's: keys at "
                            "their ranks in the cache) or absolute (keys at their text positions, the query at t)")
    return p


def _sampling(p: argparse.ArgumentParser, max_new_help: str) -> None:
    p.add_argument("--max-new-tokens", type=_int_at_least(-1), default=256, metavar="N", help=max_new_help)
    # mlx-lm's and llama.cpp's spellings; a separate argument, so that an error names what was typed
    p.add_argument("-n", "--max-tokens", dest="max_new_tokens", type=_int_at_least(-1), default=argparse.SUPPRESS,
                   metavar="N", help="the same as --max-new-tokens")
    p.add_argument("--temperature", type=_float_in(0), default=0.8, help="0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=_int_at_least(0), default=0, help="sample from the k most likely (0: off)")
    p.add_argument("--top-p", type=_float_in(0, 1, low_open=True), default=0.95,
                   help="nucleus sampling mass (default 0.95; 1: off)")
    p.add_argument("--seed", type=_int_at_least(0, MAX_SEED, " (64 bits)"), default=0,
                   help="sampling seed, 0 to 2**64-1 (default 0)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past an end-of-sequence token")


def build_parser() -> argparse.ArgumentParser:
    from ..apps.evaluate import DENSE_MAX_TOKENS, MODES

    parser = _Parser(prog="minillm",
                     description="StreamingLLM in pure PyTorch: attention sinks + a rolling KV window. " + TEXT_RULE)
    parser.add_argument("--version", action="version", version=f"minillm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", parents=[_common()], help="generate text, streaming",
                       description="Generate text through a fixed-size sink+window cache, printing it as it "
                                   "comes. A prompt of any length is read in constant memory. " + TEXT_RULE)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("-p", "--prompt", metavar="TEXT", help="the prompt (valid UTF-8; anything else is refused)")
    src.add_argument("--prompt-file", metavar="F", help="read the prompt from a UTF-8 file")
    _sampling(g, "tokens to generate (default 256; 0: none; -1: endless, until Ctrl-C)")

    c = sub.add_parser("chat", parents=[_common()], help="multi-turn chat over one streaming cache",
                       description="A conversation over one persistent streaming cache. Turns come from a "
                                   "JSONL file ({\"turn\": \"...\"} per line) or, interactively, from stdin. "
                                   + TEXT_RULE)
    c.add_argument("--prompts", metavar="F.jsonl", help="JSONL file of user turns (default: read stdin)")
    c.add_argument("--no-template", "--no-chat-template", dest="no_template", action="store_true",
                   help="use the plain 'USER: ... ASSISTANT:' format even if the checkpoint has a chat template")
    c.add_argument("--system", metavar="TEXT", help="a system prompt, rendered by the chat template")
    _sampling(c, "tokens per reply at most (default 256; 0: none; -1: until EOS)")

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
    b.add_argument("--no-chat-template", "--raw", dest="no_template", action="store_true",
                   help="feed each prompt as raw text; by default a checkpoint with a chat template gets "
                        "each prompt as one user turn with the generation prompt (as mlx-lm does)")
    _sampling(b, "tokens per prompt at most (default 256; 0: none; -1: until EOS); a line's "
                 "\"max_new_tokens\" wins")

    p = sub.add_parser("ppl", parents=[_common()], help="long-text perplexity",
                       description="Perplexity of long text (files concatenated, Gutenberg boilerplate stripped). "
                                   + TEXT_RULE)
    p.add_argument("--text", nargs="+", metavar="FILE", help=TEXT_HELP)
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
    p.add_argument("--data-parallel", action="store_true",
                   help="score each file as its own stream and pool them (exp of total NLL over total tokens); "
                        "under torchrun the files are split over the ranks, with the same result")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON (checked before the work)")
    p.add_argument("--plot", metavar="OUT.png",
                   help="plot running log-PPL against tokens, as .png, .pdf or .svg (needs matplotlib)")

    s = sub.add_parser("serve", parents=[_common()], help="an OpenAI-compatible HTTP server (needs the serve extra)",
                       description="Serve the model over HTTP as OpenAI's API (/v1/chat/completions, /v1/completions, "
                                   "/v1/models, /health, /metrics): one engine thread batches every request into one "
                                   "cache of --batch-size rows; each conversation is a stream that later requests "
                                   "continue, parked out of the cache when idle. SIGINT/SIGTERM drain and exit 0. "
                                   "Needs fastapi and uvicorn (the package's `serve` extra).")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=_int_at_least(0, 65535), default=8000, help="port (default 8000; 0: any free one)")
    s.add_argument("--batch-size", type=_int_at_least(1), default=8, metavar="B",
                   help="requests decoded together: the cache's rows (default 8)")
    s.add_argument("--max-sessions", type=_int_at_least(0), default=64, metavar="N",
                   help="idle conversation streams kept (parked out of the cache, least recently used "
                        "dropped first; default 64)")
    s.add_argument("--session-dir", metavar="DIR",
                   help="park idle streams here as files, so a restarted server continues the conversations")
    s.add_argument("--api-key", metavar="KEY", help="require `Authorization: Bearer KEY` on every /v1 request "
                                                    "and /metrics (default: the MINILLM_API_KEY variable, else none)")
    s.add_argument("--served-model-name", metavar="NAME", help="the model id clients send (default: MODEL's name)")
    s.add_argument("--max-prefill-tokens", type=_int_at_least(1), default=256, metavar="N",
                   help="prompt tokens prefilled per step, between decode steps (default 256)")
    s.add_argument("--queue-size", type=_int_at_least(1), metavar="Q",
                   help="requests waiting for a row before a 429 (default 4 x --batch-size)")
    s.add_argument("--max-tokens-limit", type=_int_at_least(1), default=16384, metavar="N",
                   help="the largest max_tokens a request may ask for (default 16384)")
    s.add_argument("--default-max-tokens", type=_int_at_least(0), default=512, metavar="N",
                   help="max_tokens of a request that gives none (default 512)")
    s.add_argument("--max-prompt-tokens", type=_int_at_least(1), default=65536, metavar="N",
                   help="the longest conversation or prompt a request may send, in tokens, rendered whole "
                        "(default 65536)")
    s.add_argument("--max-messages", type=_int_at_least(1), default=4096, metavar="N",
                   help="the most messages one request may send (default 4096)")
    s.add_argument("--max-body-bytes", type=_int_at_least(1), default=4 << 20, metavar="N",
                   help="the largest request body, in bytes (default 4 MiB); larger ones get a 413")
    s.add_argument("--drain-timeout", type=_float_in(0), default=30.0, metavar="SEC",
                   help="on SIGINT/SIGTERM, how long requests in flight may run before they are cancelled (default 30)")

    a = sub.add_parser("attn", parents=[_common(cache_flags=False)], help="attention maps and sink scores",
                       description="Per-layer attention maps (heads averaged) of a dense forward over the first "
                                   "tokens of a text, and the per-layer attention-sink score.")
    a.add_argument("--text", nargs="+", metavar="FILE", help=TEXT_HELP)
    a.add_argument("--png", required=True, metavar="OUT",
                   help="where to draw the maps, as .png, .pdf or .svg (needs matplotlib)")
    a.add_argument("--tokens", type=_int_at_least(2), default=128, metavar="T",
                   help="tokens to map, from the start (default 128)")
    a.add_argument("--min-query", type=_int_at_least(0), metavar="Q",
                   help="sink score over queries with index >= Q (default T/2)")
    a.add_argument("--json", metavar="OUT", help="write the sink scores as JSON")
    return parser


# Options every subcommand has, which a user may put before the subcommand (`minillm --threads 1
# generate`): moved after it. The value-taking ones take their value with them.
GLOBAL_VALUED = ("--threads", "--dtype", "--device", "-m", "--model")
GLOBAL_FLAGS = ("--strict-config", "--no-fast", "--int8")
COMMAND_NAMES = ("generate", "chat", "batch", "ppl", "attn", "serve")


def hoist_global_options(argv: list[str]) -> list[str]:
    """`minillm --threads 1 generate ...` -> `minillm generate --threads 1 ...`. Anything else before
    the subcommand is left where it is, for argparse to judge (--help, --version, a bad option)."""
    moved, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if arg in COMMAND_NAMES:
            return argv[:i] + [arg] + moved + argv[i + 1:] if moved else argv
        if name in GLOBAL_VALUED and "=" in arg or name in GLOBAL_FLAGS:
            moved.append(arg)
            argv = argv[:i] + argv[i + 1:]
        elif arg in GLOBAL_VALUED and i + 1 < len(argv):
            moved += argv[i:i + 2]
            argv = argv[:i] + argv[i + 2:]
        else:  # something the top level does not know: argparse reports it
            return (moved + argv) if moved else argv
    return moved + argv


def finish(args) -> None:
    """What argparse cannot say: MODEL given as -m/--model, and `ppl/attn --text x.txt MODEL`.

    `--text` takes one or more files, so a MODEL typed after them lands in the list. A directory
    or a .gguf file is never a text, so the last item that is one is taken as MODEL when no MODEL
    was given (a hub repo id there cannot be told from a missing file: put it first, or use -m)."""
    from pathlib import Path

    from ..errors import MiniLLMError

    flag = getattr(args, "model_flag", None)
    if flag is not None:
        if args.model is not None and args.model != flag:
            raise MiniLLMError(f"two models given: {args.model!r} and -m/--model {flag!r} (give one)")
        args.model = flag
    text = getattr(args, "text", None)
    if args.model is None and text and len(text) > 1:
        last = Path(text[-1])
        if last.is_dir() or (last.suffix.lower() == ".gguf" and last.is_file()):
            args.model, args.text = text[-1], text[:-1]
