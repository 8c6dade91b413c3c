"""Opening input files: regular files only, bounded reads, and one JSON loader that cannot crash.

Every file minillm reads (config.json, the safetensors shards and their index, tokenizer files,
generation_config.json, tokenizer_config.json, chat_template.jinja, a GGUF, the CLI's texts) is
first checked here with `os.stat`, before anything opens it: a FIFO would block `open()` forever
(inside a library, where Ctrl-C cannot reach it), a device such as /dev/zero never ends, and a
directory gives an unrelated error ("No such device"). Each is refused by name and kind:
"config.json is a FIFO, not a regular file". Files minillm reads itself are then opened
non-blocking and checked again on the open descriptor, so a file swapped for a FIFO in between
cannot block either. A text input of the CLI may be a pipe (`--text <(zcat book.gz)`, a named
FIFO): that read is a stream, and Ctrl-C ends it.

`parse_json` is the only JSON parser of the package. Besides syntax errors (one line, with the
position), it refuses nesting deeper than MAX_JSON_DEPTH before parsing (Python's parser recurses,
and 100,000 `[` raise RecursionError, or crash a process that raised its recursion limit), an
integer of more than MAX_INT_DIGITS digits (naming where it is, instead of advising
`sys.set_int_max_str_digits`) and a key given twice in one object (the last would win silently).
"""

from __future__ import annotations

import json
import os
import re
import stat
from itertools import accumulate
from pathlib import Path
from typing import Any

from ..errors import MiniLLMError

# The largest JSON file read (config.json, tokenizer_config.json, an index): real ones are at
# most a few MB; parsing a larger one into Python objects would take many times its size.
MAX_JSON_BYTES = 100 << 20
MAX_JSON_DEPTH = 100  # real configs nest 3 or 4 levels
MAX_INT_DIGITS = 4300  # Python's own default limit for int(str)


def kind_of(mode: int) -> str:
    """'a directory', 'a FIFO', ... for an st_mode that is not a regular file."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"  # pragma: no cover - doors, whiteouts


def _describe(path: str | os.PathLike, mode: int) -> str:
    kind = kind_of(mode)
    return f"{os.fspath(path)} is {kind}, not a regular file" if kind.startswith("a ") else \
        f"{os.fspath(path)} is not a regular file"


def check_input(path: str | os.PathLike, *, optional: bool = False, pipes: bool = False,
                what: str = "file") -> os.stat_result | None:
    """Stat `path` (following symlinks) and refuse anything but a regular file, by name and kind.

    optional: a missing file gives None instead of an error (generation_config.json and friends).
    pipes: a FIFO is accepted too (a text input the CLI reads as a stream)."""
    if isinstance(path, str) and not path:  # "" is not "." (a directory) nor a missing file
        raise MiniLLMError(f"the {what} path is empty")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise MiniLLMError(f"{os.fspath(path)} is a symbolic link to a missing file") from None
        if optional:
            return None
        raise MiniLLMError(f"no such {what}: {os.fspath(path)}") from None
    except NotADirectoryError:
        if optional:
            return None
        raise MiniLLMError(f"no such {what}: {os.fspath(path)} (a part of the path is not a directory)") from None
    except OSError as e:  # permission denied on a parent, a name too long, a symlink loop
        raise MiniLLMError(f"cannot read {os.fspath(path)}: {e.strerror or e}") from None
    except ValueError as e:  # an embedded NUL byte
        raise MiniLLMError(f"cannot read {os.fspath(path)!r}: {e}") from None
    if stat.S_ISREG(st.st_mode) or (pipes and stat.S_ISFIFO(st.st_mode)):
        return st
    raise MiniLLMError(_describe(path, st.st_mode))


def is_present(path: str | os.PathLike) -> bool:
    """Whether an optional file is there; True also for a directory or FIFO of that name, so that
    the caller then refuses it by kind (through `check_input`) instead of looking elsewhere."""
    return os.path.lexists(path)


def read_bytes(path: str | os.PathLike, *, limit: int, pipes: bool = False, what: str = "file") -> bytes:
    """Up to `limit` + 1 bytes of a regular file (or, with `pipes`, a FIFO: read as a stream,
    interruptible by Ctrl-C). The caller compares the length with `limit`."""
    st = check_input(path, pipes=pipes, what=what)
    fifo = stat.S_ISFIFO(st.st_mode)
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    try:
        if fifo:  # blocks until a writer opens it, like `cat`; SIGINT interrupts the wait
            fd = os.open(path, flags)
        else:  # never blocks, even if the file became a FIFO since the stat
            fd = os.open(path, flags | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise MiniLLMError(f"cannot read {os.fspath(path)}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or (pipes and stat.S_ISFIFO(st.st_mode))):
            raise MiniLLMError(_describe(path, st.st_mode))
        if not fifo and hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            return _read_at_most(f, limit + 1, st.st_size if stat.S_ISREG(st.st_mode) else 0)
    except OSError as e:
        raise MiniLLMError(f"cannot read {os.fspath(path)}: {e.strerror or e}") from None
    finally:
        if fd >= 0:
            os.close(fd)


def _read_at_most(f, n: int, size_hint: int) -> bytes:
    """Up to n bytes, in pieces: a buffer of n bytes is never allocated up front (a 1 GiB cap
    would be 1 GiB for every small file); a regular file is read in one piece of its size."""
    chunks, total = [], 0
    step = size_hint + 1 if size_hint else 1 << 20
    while total < n:
        chunk = f.read(min(max(step, 1 << 16), n - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        step = 1 << 20
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def read_text_file(path: str | os.PathLike, *, limit: int = MAX_JSON_BYTES, what: str = "file",
                   encoding: str = "utf-8-sig") -> str:
    """A small UTF-8 file (a config, a chat template) as text; one-line errors naming it.
    ("utf-8-sig" drops a byte-order mark; "utf-8" keeps it, as transformers reads templates.)"""
    data = read_bytes(path, limit=limit, what=what)
    if len(data) > limit:
        raise MiniLLMError(f"{os.fspath(path)} is larger than {limit >> 20} MiB; it cannot be a {what}")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise MiniLLMError(f"{os.fspath(path)} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                           f"{e.start} cannot be decoded)") from None


def read_json(path: str | os.PathLike, *, what: str = "JSON file", optional: bool = False,
              expect_object: bool = True) -> Any:
    """The JSON value of a file (see `parse_json`); with `optional`, None when it is absent."""
    if optional and not is_present(path):
        return None
    text = read_text_file(path, what=what)
    data = parse_json(text, os.fspath(path))
    if expect_object and not isinstance(data, dict):
        raise MiniLLMError(f"{os.fspath(path)}: expected a JSON object, got {_json_type(data)}")
    return data


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(v), type(v).__name__)


# ----------------------------------------------------------------------------------------------
# JSON

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DEPTH = {"[": 1, "{": 1, "]": -1, "}": -1}


def json_depth(text: str) -> int:
    """How deeply `text` nests arrays and objects (brackets inside strings do not count), found
    without recursion: fast for large files and safe for hostile ones."""
    if "[" not in text and "{" not in text:
        return 0
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(accumulate(map(_DEPTH.__getitem__, brackets)), default=0)


class _BigInt:
    """An integer literal too long to convert, kept as its digit count until its place is known."""

    def __init__(self, digits: int):
        self.digits = digits


def _parse_int(s: str):
    digits = len(s) - (s[0] == "-")
    return int(s) if digits <= MAX_INT_DIGITS else _BigInt(digits)


class _Duplicate(Exception):
    pass


def _unique(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


def _find_big(value: Any) -> tuple[str, int] | None:
    """(where, digits) of the first _BigInt in a parsed value, walking without recursion."""
    stack = [("", value)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, _BigInt):
            return where, v.digits
        if isinstance(v, dict):
            stack.extend((f"{where}.{k}" if where else str(k), x) for k, x in reversed(v.items()))
        elif isinstance(v, list):
            stack.extend((f"{where}[{i}]", x) for i, x in reversed(list(enumerate(v))))
    return None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json(text: str, where: str, *, constants: bool = True, unique_keys: bool = True,
               position: bool = True) -> Any:
    """The value of a JSON text, or a one-line MiniLLMError beginning with `where`.

    constants=False refuses NaN, Infinity and -Infinity (which Python's parser accepts);
    position=False leaves the line and column out of a syntax error (`where` names the line)."""
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise MiniLLMError(f"{where}: JSON nested {depth} levels deep (at most {MAX_JSON_DEPTH})")
    big = []

    def parse_int(s):
        v = _parse_int(s)
        if isinstance(v, _BigInt):
            big.append(v)
        return v

    kw: dict[str, Any] = {"parse_int": parse_int}
    if unique_keys:
        kw["object_pairs_hook"] = _unique
    if not constants:
        kw["parse_constant"] = _no_constant
    try:
        value = json.loads(text, **kw)
    except json.JSONDecodeError as e:
        at = f": line {e.lineno} column {e.colno}" if position else ""
        raise MiniLLMError(f"{where}: not valid JSON ({e.msg}{at})") from None
    except _Duplicate as e:
        raise MiniLLMError(f"{where}: the key {str(e.args[0])[:80]!r} appears twice in one object") from None
    except ValueError as e:  # NaN / Infinity when refused
        raise MiniLLMError(f"{where}: not valid JSON ({e})") from None
    except RecursionError:  # pragma: no cover - the depth check comes first
        raise MiniLLMError(f"{where}: JSON nested too deeply") from None
    if big:
        found = _find_big(value)
        at = f" at {found[0]}" if found and found[0] else ""
        raise MiniLLMError(f"{where}: the number{at} has {big[0].digits} digits, too large to be a value "
                           f"here (at most {MAX_INT_DIGITS} digits)")
    return value


def safe_path_in(directory: Path, name: Any, where: str) -> Path:
    """`directory / name` for a file name read from a file (an index's shard names): a non-empty
    relative path that stays inside `directory` (no '..', not absolute), or a MiniLLMError."""
    if not isinstance(name, str) or not name.strip():
        raise MiniLLMError(f"{where}: a file name must be a non-empty string, got {json.dumps(name)[:60]}")
    p = Path(name)
    if p.is_absolute() or name.startswith(("/", "\\")) or ".." in p.parts or "\\" in name or "\x00" in name:
        raise MiniLLMError(f"{where}: file name {name[:80]!r} is not a plain name inside {directory}")
    return directory / p
