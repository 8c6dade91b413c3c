"""Reading text files for `ppl`, `attn` and prompts: UTF-8 (BOM or not), any line ends, Gutenberg.

Project Gutenberg books (the corpus, PG19) wrap the text in a licence header and footer between
the lines `*** START OF ... ***` and `*** END OF ... ***`; `strip_gutenberg` keeps what lies
between them, so perplexity is measured on the book and not on the licence. Line ends are
normalised to "\\n", so a CRLF file and its LF copy give the same tokens.

Every failure is a one-line MiniLLMError naming the file: missing, a directory, a device
(/dev/zero) or a socket (a pipe is read as a stream), unreadable, larger than MAX_TEXT_BYTES, not
UTF-8 (with the offending byte and its offset), or empty.
"""

from __future__ import annotations

import os
import re
import sys

from ..errors import MiniLLMError

# The largest text read (1 GiB, a few hundred books): its token ids alone would take ~10 GB as
# Python ints, so anything larger, or an endless pipe, is refused instead of exhausting memory.
MAX_TEXT_BYTES = 1 << 30

# "*** START OF THE PROJECT GUTENBERG EBOOK ..." / "*** START OF THIS PROJECT GUTENBERG EBOOK ...".
# ("*** START: FULL LICENSE ***" in the footer does not match: no "OF".)
_START = re.compile(r"^\*{3}\s*START OF\b.*$", re.IGNORECASE | re.MULTILINE)
_END = re.compile(r"^\*{3}\s*END OF\b.*$", re.IGNORECASE | re.MULTILINE)
# Older files also close the book with a plain line just above the END marker.
_END_LINE = re.compile(r"\n[ \t]*End of (the )?Project Gutenberg\b[^\n]*\s*$", re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    """The text between the Gutenberg START and END marker lines (each optional), trimmed; an
    "End of the Project Gutenberg EBook ..." line just above the END marker goes too."""
    start = _START.search(text)
    if start:
        text = text[start.end():]
    end = _END.search(text)
    if end:
        text = _END_LINE.sub("", text[: end.start()])
    return text.strip()


def read_text(path: str | os.PathLike, *, gutenberg: bool = True) -> str:
    """The contents of a UTF-8 text file, BOM dropped, line ends as "\\n", Gutenberg boilerplate
    stripped (when `gutenberg`). Raises MiniLLMError if it cannot be read or holds no text."""
    from .reading import read_bytes

    # A regular file, or a pipe read as a stream (`--text <(zcat book.gz)`, a named FIFO: Ctrl-C
    # ends the wait); a directory, a device (/dev/zero would be read forever) or a socket is
    # refused by kind before it is opened.
    data = read_bytes(path, limit=MAX_TEXT_BYTES, pipes=True)
    return decode_text(data, str(path), gutenberg=gutenberg)


def read_stdin_text(*, gutenberg: bool = True) -> str:
    """`read_text` for standard input (a file named "-" on the command line)."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:
        raise MiniLLMError("-: there is no stdin to read")
    try:
        data = stream.read(MAX_TEXT_BYTES + 1)
    except (OSError, ValueError) as e:
        raise MiniLLMError(f"cannot read stdin: {getattr(e, 'strerror', None) or e}") from None
    return decode_text(data, "stdin", gutenberg=gutenberg)


def decode_text(data: bytes, path: str, *, gutenberg: bool = True) -> str:
    """The text of `data`, read from `path`: the checks and clean-up of `read_text`."""
    if len(data) > MAX_TEXT_BYTES:
        raise MiniLLMError(f"{path} is larger than {MAX_TEXT_BYTES >> 30} GiB; tokenizing it would need tens of "
                           f"GB (use a part of it)")
    try:
        text = data.decode("utf-8-sig")  # utf-8-sig drops a leading byte-order mark
    except UnicodeDecodeError as e:
        raise MiniLLMError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start} "
                           f"cannot be decoded)") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    raw_empty = not text.strip()
    if gutenberg:
        text = strip_gutenberg(text)
    if not text.strip():
        why = "empty" if raw_empty else "no text between the Gutenberg START/END markers"
        raise MiniLLMError(f"{path} has no text ({why})")
    return text


def read_texts(paths, *, gutenberg: bool = True) -> str:
    """Several files read with `read_text` and concatenated (as the paper concatenates PG19 books),
    separated by a blank line."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise MiniLLMError("no text file given")
    return "\n\n".join(read_text(p, gutenberg=gutenberg) for p in paths)
