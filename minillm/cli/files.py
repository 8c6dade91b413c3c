"""What the command line reads and writes, safely.

- The text rule (`check_text`): every text must be valid UTF-8; invalid bytes or lone surrogates
  are refused, naming where and the offset; nothing is silently replaced.
- Outputs (`--json`, `--plot`, `--png`, `--output`) are checked before the work (`check_outputs`),
  never overwrite an input, and are written atomically (`write_atomic`: a temporary file renamed
  into place), so a failure or Ctrl-C leaves the old file, never half of a new one.
- stdout that fails (a full disk, a closed pipe) is one MiniLLMError (`flush_print`).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

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


def write_atomic(path: str, flag: str, write) -> None:
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


def write_json(path: str, flag: str, data: dict) -> None:
    text = json.dumps(data, indent=1, allow_nan=False) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    write_atomic(path, flag, write)


def save_figure(plt, fig, path: str, flag: str, dpi: int) -> None:
    fmt = os.path.splitext(path)[1].lower().lstrip(".")
    try:
        write_atomic(path, flag, lambda tmp: fig.savefig(tmp, dpi=dpi, format=fmt))
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
