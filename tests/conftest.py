"""Shared pytest setup: Hypothesis profiles and the path to ../shared.

Profiles: `default` is quick enough for every local run; `ci` (selected by .ci/run through
HYPOTHESIS_PROFILE=ci) draws more examples. Deadlines are off: model forwards vary in time on
shared machines, and a flaky deadline proves nothing about correctness.
"""

import os
from pathlib import Path

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


REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} (the project's shared folder) is not present")
    return SHARED
