"""Reading text files: BOM, CRLF, Gutenberg boilerplate, and one-line errors for bad files."""

from pathlib import Path

import pytest

from minillm.errors import MiniLLMError
from minillm.formats.text import read_text, read_texts, strip_gutenberg

BOOK = (
    "The Project Gutenberg EBook of Something\r\n"
    "This eBook is for the use of anyone anywhere.\r\n"
    "\r\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK SOMETHING ***\r\n"
    "\r\n"
    "Chapter 1\r\n"
    "It was a dark night — “quoted”.\r\n"
    "\r\n"
    "End of the Project Gutenberg EBook of Something\r\n"
    "\r\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK SOMETHING ***\r\n"
    "\r\n"
    "*** START: FULL LICENSE ***\r\n"
    "Licence text.\r\n"
)


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_bom_crlf_and_gutenberg_markers(tmp_path):
    p = write(tmp_path, "book.txt", b"\xef\xbb\xbf" + BOOK.encode("utf-8"))
    assert read_text(p) == "Chapter 1\nIt was a dark night — “quoted”."
    raw = read_text(p, gutenberg=False)
    assert not raw.startswith("\ufeff") and "\r" not in raw and "FULL LICENSE" in raw


def test_same_text_for_lf_crlf_and_cr(tmp_path):
    lf = BOOK.replace("\r\n", "\n")
    texts = {read_text(write(tmp_path, f"{i}.txt", s.encode())) for i, s in
             enumerate([lf, BOOK, lf.replace("\n", "\r")])}
    assert len(texts) == 1


@pytest.mark.parametrize("text, want", [
    ("header\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nbody\n", "body"),  # START only
    ("body\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nlicence\n", "body"),  # END only
    ("  plain text, no markers\n", "plain text, no markers"),
    ("*** start of this project gutenberg ebook x ***\nbody\n*** end of this ***\n", "body"),
    ("a line with *** START OF inside is not a marker\n", "a line with *** START OF inside is not a marker"),
])
def test_strip_gutenberg(text, want):
    assert strip_gutenberg(text) == want


def test_concatenation(tmp_path):
    a = write(tmp_path, "a.txt", BOOK.encode())
    b = write(tmp_path, "b.txt", b"second book")
    assert read_texts([a, b]) == "Chapter 1\nIt was a dark night — “quoted”.\n\nsecond book"
    assert read_texts(str(b)) == "second book"


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.txt", "no such file"),
    (lambda d: d, "is a directory"),
    (lambda d: write(d, "latin1.txt", "café".encode("latin-1")), "is not UTF-8 text (byte 0xe9 at offset 3"),
    (lambda d: write(d, "empty.txt", b""), "has no text (empty)"),
    (lambda d: write(d, "blank.txt", b"\xef\xbb\xbf \r\n\r\n"), "has no text (empty)"),
    (lambda d: write(d, "licence.txt", b"*** START OF X ***\n\n*** END OF X ***\nlicence"),
     "no text between the Gutenberg START/END markers"),
])
def test_errors_are_one_line(tmp_path, make, message):
    with pytest.raises(MiniLLMError, match=None) as e:
        read_text(make(tmp_path))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unreadable_file(tmp_path, monkeypatch):
    p = write(tmp_path, "secret.txt", b"text")

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    import minillm.formats.reading

    monkeypatch.setattr(minillm.formats.reading.os, "open", deny)  # chmod 000 does not stop root
    with pytest.raises(MiniLLMError, match="cannot read .*secret.txt: Permission denied"):
        read_text(p)


def test_no_files():
    with pytest.raises(MiniLLMError, match="no text file"):
        read_texts([])


def test_gutenberg_shaped_books(tmp_path):
    # The two shapes the corpus books come in: START/END markers with CRLF and no BOM, and a BOM
    # with CRLF and no markers (the project's books, reproduced here so no outside file is needed).
    marked = ("The Project Gutenberg eBook of Katrine\r\n\r\nThis eBook is for the use of anyone.\r\n"
              "*** START OF THE PROJECT GUTENBERG EBOOK KATRINE ***\r\n\r\nKATRINE\r\n\r\nChapter I\r\n"
              "The story begins.\r\n*** END OF THE PROJECT GUTENBERG EBOOK KATRINE ***\r\n"
              "Project Gutenberg license text.\r\n")
    (tmp_path / "katrine.txt").write_bytes(marked.encode("utf-8"))
    (tmp_path / "frankenstein.txt").write_bytes(b"\xef\xbb\xbf" + "Letter 1\r\n\r\nTo Mrs. Saville\r\n".encode())
    katrine = read_text(tmp_path / "katrine.txt")
    assert "*** START OF" not in katrine and "*** END OF" not in katrine
    assert "Project Gutenberg" not in katrine and "\r" not in katrine and "The story begins." in katrine
    frank = read_text(tmp_path / "frankenstein.txt")
    assert frank.startswith("Letter 1\n") and "\r" not in frank