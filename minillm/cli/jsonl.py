"""The JSONL inputs and outputs of `minillm chat` and `minillm batch`.

    chat --prompts F.jsonl    {"turn": "..."} per line (MT-Bench's {"turns": [...]} too); or stdin
    batch --input F.jsonl     {"prompt": "...", optionally "max_new_tokens", "seed", "temperature", "id"}
    batch --output OUT.jsonl  one record per input line, in input order (`Records`)

Every text follows the text rule (`check_text`); a malformed line is a MiniLLMError naming
`file:line`.
"""

from __future__ import annotations

import json
import math
import sys

from .._probe import reached as _reached
from ..errors import MiniLLMError
from ..formats.reading import parse_json
from .files import check_text, flush_print, write_output
from .parser import MAX_SEED


def read_turns(path: str) -> list[str]:
    """User turns from a JSONL file: {"turn": "..."} per line (MT-Bench's {"turns": [...]} also works)."""
    from ..formats.text import read_text

    turns = []
    for lineno, line in enumerate(read_text(path, gutenberg=False).split("\n"), 1):
        if not line.strip():
            continue
        obj = parse_json(line, f"{path}:{lineno}", position=False)
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


def stdin_turns():
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


PROMPT_KEYS = ("prompt", "max_new_tokens", "seed", "temperature", "id")


def parse_prompt_line(line: str, where: str) -> dict:
    """One JSONL line of `batch`: {"prompt": str, optionally "max_new_tokens" (int >= -1; -1:
    until EOS), "seed" (0 to 2**64-1), "temperature" (a finite number >= 0), "id" (any JSON,
    echoed)}; other keys are returned under "unknown". Raises MiniLLMError naming `where`."""
    # One line, one record: a syntax error, NaN/Infinity, nesting past 100 levels, an integer of
    # over 4300 digits or a key given twice is this line's error, never a traceback.
    obj = parse_json(line, where, constants=False, position=False)
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
    from ..formats.text import MAX_TEXT_BYTES, read_text

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


class Records:
    """The output records, kept in input order: to stdout as soon as every earlier line is done,
    or to a file, atomically, at the end."""

    def __init__(self, path: str, order: list[int]):
        self.path, self.order, self.done, self.printed = path, order, {}, 0

    def add(self, lineno: int, record: dict) -> None:
        self.done[lineno] = json.dumps(record, ensure_ascii=False, allow_nan=False)
        _reached(f"record {lineno}")  # tests send their signal once a record is done
        if self.path == "-":
            while self.printed < len(self.order) and self.order[self.printed] in self.done:
                # Counted before it is printed: an interrupt (SIGINT, SIGTERM) that lands while the
                # line is being flushed leaves it in stdout's buffer, and `finish` must not print it
                # a second time.
                self.printed += 1
                flush_print(self.done[self.order[self.printed - 1]] + "\n")

    def finish(self) -> None:
        """Write what is done (after Ctrl-C, the lines not finished have no record)."""
        lines = [self.done[n] for n in self.order if n in self.done]
        if self.path == "-":
            for text in lines[self.printed:]:
                flush_print(text + "\n")
            return

        write_output(self.path, "--output", lambda f: f.writelines((t + "\n").encode("utf-8") for t in lines))
