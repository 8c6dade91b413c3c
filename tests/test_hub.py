"""Tests for minillm.formats.hub.resolve_model_dir: local paths, repo-id checks, and the offline hub cache.

huggingface_hub reads HF_HOME / HF_HUB_OFFLINE / HF_ENDPOINT when it is imported, so the cases
that touch the hub run in a fresh subprocess with those variables set. No test uses the network:
"online" runs point HF_ENDPOINT at a closed local port.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minillm.errors import MiniLLMError
from minillm.formats.hub import resolve_model_dir

REPO_ROOT = Path(__file__).resolve().parents[1]

# Resolves each repo id given on the command line; prints one JSON line per id:
# ["ok", path] or ["MiniLLMError", message].
_SCRIPT = """
import json, sys
from minillm.errors import MiniLLMError
from minillm.formats.hub import resolve_model_dir
for repo in sys.argv[1:]:
    try:
        print(json.dumps(["ok", str(resolve_model_dir(repo))]))
    except MiniLLMError as e:
        print(json.dumps(["MiniLLMError", str(e)]))
"""


def _resolve_in_subprocess(hf_home: Path, *repo_ids: str, **env: str) -> list[list[str]]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}  # no user settings
    base |= {
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        **env,
    }
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, *repo_ids],
        env=base, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def _fake_cached_repo(hf_home: Path, repo_id: str) -> Path:
    """Lay out a hub cache entry by hand: refs/main -> commit, snapshots/<commit>/files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (snapshot / "config.json").write_text('{"model_type": "llama"}')
    (snapshot / "tokenizer.json").write_text("{}")
    return snapshot


def test_local_directory(tmp_path, monkeypatch):
    assert resolve_model_dir(tmp_path) == tmp_path
    assert resolve_model_dir(str(tmp_path)) == tmp_path
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m").mkdir()
    assert resolve_model_dir("~/m") == tmp_path / "m"
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("m") == Path("m")  # a bare name that is a local dir stays local


@pytest.mark.parametrize(
    "path", ["./missing", "/no/such/dir", "~/no-such-model-dir", "a/b/c", "weights/typo"]
)
def test_missing_local_path(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()  # so "weights/typo" is a local path, not owner/name
    with pytest.raises(MiniLLMError, match="model directory not found: "):
        resolve_model_dir(path)


def test_file_is_not_a_model_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MiniLLMError, match="model directory is a file, not a directory"):
        resolve_model_dir(tmp_path / "config.json")
    with pytest.raises(MiniLLMError, match="model directory not found"):
        resolve_model_dir(tmp_path / "missing")  # a Path object is always local


@pytest.mark.parametrize(
    "bad", ["bad id", "owner/na--me", "-owner/name", "owner/", "x" * 97, "a/..b"]
)
def test_malformed_repo_id(bad):
    with pytest.raises(MiniLLMError, match="not a local directory or a hub repo id"):
        resolve_model_dir(bad)


def test_offline_hub_cache(tmp_path):
    snapshot = _fake_cached_repo(tmp_path, "owner/tiny-model")
    missing, cached = _resolve_in_subprocess(
        tmp_path, "EleutherAI/pythia-160m", "owner/tiny-model", HF_HUB_OFFLINE="1"
    )
    assert missing[0] == "MiniLLMError"
    msg = missing[1]
    assert "EleutherAI/pythia-160m" in msg and "not in the local cache" in msg
    assert "hub cannot be reached" in msg and "HF_HUB_OFFLINE=1" in msg and "\n" not in msg
    assert cached == ["ok", str(snapshot)]


def test_unreachable_hub(tmp_path):
    snapshot = _fake_cached_repo(tmp_path, "tiny-model")  # a repo id without an owner
    missing, cached = _resolve_in_subprocess(
        tmp_path, "EleutherAI/pythia-160m", "tiny-model", HF_ENDPOINT="http://127.0.0.1:9"
    )
    assert missing[0] == "MiniLLMError"
    assert "EleutherAI/pythia-160m" in missing[1] and "hub cannot be reached" in missing[1]
    assert "HF_HUB_OFFLINE" not in missing[1]
    assert cached == ["ok", str(snapshot)]  # a cached snapshot is used when the hub is down
