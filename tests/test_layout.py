"""The package's structure: no import cycles (tools/layout.py reads the source, imports nothing)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_no_import_cycles():
    r = subprocess.run([sys.executable, str(REPO / "tools" / "layout.py"), "--cycles"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "import cycles: 0", r.stdout + r.stderr


def test_no_document_outside_the_repository_is_cited():
    # The engine's contract lives in docs/streaming.md; nothing cites a file the clone lacks.
    for path in [*(REPO / "minillm").rglob("*.py"), *(REPO / "tests").glob("*.py"), *(REPO / "docs").rglob("*.md"),
                 REPO / "README.md"]:
        if path.name == "test_layout.py":
            continue
        text = path.read_text(encoding="utf-8")
        assert "DESIGN.md" not in text, path
