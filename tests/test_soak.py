"""A few hundred steps of tools/soak.py (the long runs and their figures are in docs/soak.md)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("minillm_soak_tool", REPO / "tools" / "soak.py")
soak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_decode_soak_reports(tmp_path, dtype):
    out = tmp_path / "soak.json"
    assert soak.main(["--steps", "400", "--window", "60", "--dtype", dtype, "--progress", "200",
                      "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["tokens"] == r["timed_calls"] == r["cache_tokens_seen"] == 400 and r["cache_size"] == 64
    assert r["nonfinite_logits"] == 0 and r["dtype"] == dtype
    assert r["distinct_tokens_fed_last_10k"] > 50  # sampled feedback: no collapse onto one token
    for clock in ("wall", "cpu"):
        lat = r["latency"][clock]
        assert lat["window"] == (400 - 64) // 2 and lat["first_median_ms"] > 0 and lat["ratio_last_over_first"] > 0
    assert r["memory_kb"]["after_fill"]["rss_kb"] > 0 and r["memory_kb"]["end"]["hwm_kb"] > 0
    assert r["machine"]["threads"] == 1 and r["model"]["params"] == 164_288


def test_chunk_soak_goes_through_every_chunk_length(tmp_path):
    out = tmp_path / "chunk.json"
    need = 32 + 3 * sum(soak.chunk_pattern(0, 32))
    assert soak.main(["--mode", "chunk", "--steps", str(need), "--window", "28", "--progress", "10000",
                      "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["tokens"] == r["cache_tokens_seen"] == need and r["nonfinite_logits"] == 0
    pattern = r["latency"]["wall"]["pattern"]
    assert 1 in pattern and max(pattern) > 1024 > 32  # decode-sized, past S, past the model's pieces
    assert r["timed_calls"] >= 3 * len(pattern)


def test_soak_refuses_a_run_that_never_fills_the_cache(capsys):
    with pytest.raises(SystemExit):
        soak.main(["--steps", "100", "--window", "1020"])
    assert "--steps must exceed" in capsys.readouterr().err
