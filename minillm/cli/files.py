"""What the command line reads and writes, safely.

- The text rule (`check_text`): every text must be valid UTF-8; invalid bytes or lone surrogates
  are refused, naming where and the offset; nothing is silently replaced.
- Outputs (`--json`, `--plot`, `--png`, `--output`) are checked before the work (`check_outputs`),
  never overwrite an input, and a file is written atomically (`write_output`: a temporary file
  renamed into place), so a failure or Ctrl-C leaves the old file, never half of a new one.
- A stream is written in place, never renamed over (`output_kind`): a path naming one of this
  process's open descriptors (/dev/stdout, /dev/stderr, /dev/fd/N, /proc/self/fd/N, or a symlink
  to one) is written through that descriptor, so `--json /dev/stdout >> log.txt` appends to
  log.txt as the shell opened it; a FIFO, a terminal or another character device (/dev/null) is
  opened and written. A block device, a socket or a directory is refused.
- stdout that fails (a full disk, a closed pipe) is one MiniLLMError (`flush_print`).
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import tempfile

from ..atomic import write_atomic
from ..errors import MiniLLMError

FIGURE_FORMATS = (".png", ".pdf", ".svg")


def check_outputs(outputs: dict[str, str | None], inputs: list[str], model_dir: str | None = None,
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
        kind = output_kind(path, flag)
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
        if kind != "file":  # a stream: written in place, no temporary file next to it
            continue
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


_FD_PATH = re.compile(r"/dev/(stdin|stdout|stderr)|/dev/fd/(\d+)|/proc/(self|thread-self|\d+)/fd/(\d+)")
_STD_FDS = {"stdin": 0, "stdout": 1, "stderr": 2}


def open_descriptor(path: str) -> int | None:
    """The descriptor of this process that `path` names: /dev/stdout, /dev/stderr, /dev/fd/N,
    /proc/self/fd/N or /proc/<this pid>/fd/N, directly or through symlinks; None for any other path."""
    p = os.path.abspath(path)
    for _ in range(40):  # a symlink chain (out.json -> /dev/stdout -> /proc/self/fd/1)
        for candidate in (p, os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))):
            m = _FD_PATH.fullmatch(candidate)
            if m and (m.group(3) in (None, "self", "thread-self") or int(m.group(3)) == os.getpid()):
                return _STD_FDS[m.group(1)] if m.group(1) else int(m.group(2) or m.group(4))
        if not os.path.islink(p):
            return None
        p = os.path.normpath(os.path.join(os.path.dirname(p), os.readlink(p)))
    return None


def output_kind(path: str, flag: str) -> str:
    """How `path` is written: "fd" (one of this process's open descriptors, written through it),
    "stream" (a FIFO, a terminal, a character device: opened and written in place) or "file" (a
    regular file or a new one: written atomically). Anything else is refused by name."""
    fd = open_descriptor(path)
    if fd is not None:
        try:
            mode = os.fstat(fd).st_mode
            import fcntl

            access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        except (OSError, ImportError):
            raise MiniLLMError(f"{flag} {path}: descriptor {fd} is not open") from None
        if access not in (os.O_WRONLY, os.O_RDWR):
            raise MiniLLMError(f"{flag} {path}: descriptor {fd} is not open for writing")
        if stat.S_ISDIR(mode):
            raise MiniLLMError(f"{flag} {path}: descriptor {fd} is a directory")
        return "fd"
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "file"  # a new file (or one behind a dangling link): its directory is checked next
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        return "stream"
    what = ("a directory" if stat.S_ISDIR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    raise MiniLLMError(f"{flag} {path} is {what}, not a file or a stream; give a file name")


def write_output(path: str, flag: str, write) -> None:
    """`write(f)` into a binary file object for `path`. A regular file (or a new one): a temporary
    file next to it, renamed over it, so a failure (a full disk, Ctrl-C) leaves the old file, never
    a half-written one. A stream (`output_kind`): written in place, never renamed over."""
    kind = output_kind(path, flag)
    try:
        if kind == "fd":
            fd = open_descriptor(path)
            for stream in (sys.stdout, sys.stderr):  # what was printed before comes first
                if stream is not None and getattr(stream, "fileno", None) is not None:
                    try:
                        if stream.fileno() == fd:
                            stream.flush()
                    except (ValueError, OSError):
                        pass
            with os.fdopen(os.dup(fd), "wb") as f:  # the shell's descriptor: its offset, its O_APPEND
                write(f)
        elif kind == "stream":
            with open(path, "wb") as f:
                write(f)
        else:
            write_atomic(path, write)
    except OSError as e:
        raise MiniLLMError(f"cannot write {flag} {path}: {e.strerror or e}") from None


def write_json(path: str, flag: str, data: dict) -> None:
    data = (json.dumps(data, indent=1, allow_nan=False) + "\n").encode("utf-8")
    write_output(path, flag, lambda f: f.write(data))


def save_figure(plt, fig, path: str, flag: str, dpi: int) -> None:
    fmt = os.path.splitext(path)[1].lower().lstrip(".")
    try:
        write_output(path, flag, lambda f: fig.savefig(f, dpi=dpi, format=fmt))
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


def need_matplotlib(flag: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MiniLLMError(f"{flag} needs matplotlib: pip install matplotlib (the minillm-sinks[plot] extra)") from None
    return plt


def flush_print(text: str) -> None:
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except (OSError, ValueError) as e:  # /dev/full, a closed or failing stdout
        raise MiniLLMError(f"cannot write to stdout: {getattr(e, 'strerror', None) or e}") from None
