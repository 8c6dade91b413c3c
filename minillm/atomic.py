"""Atomic replacement of a regular file (standard library only): the CLI's outputs and saved
streams (`SinkCache.save`, `ChatSession.save`) are written through it."""

from __future__ import annotations

import os
import tempfile


def write_atomic(path, write) -> None:
    """`write(f)` into a temporary file next to `path` (a binary file object), then rename it over
    `path`: a failure (a full disk, Ctrl-C) leaves the old file, never a half-written one. Raises
    OSError; the caller names the file in its own message."""
    real = os.path.realpath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(real), prefix=f".{os.path.basename(real)}.",
                               suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; an output gets the usual permissions
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, real)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
