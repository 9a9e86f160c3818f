"""Shared test configuration."""

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

import flatness

# Subprocesses (the command line, the examples) must import the flatness
# under test: a relative PYTHONPATH (PYTHONPATH=src) does not resolve from
# their working directories, and they would fall back on an installed copy,
# possibly of another checkout.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(Path(flatness.__file__).resolve().parents[1]),
     *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)]
)

# Property tests run model code: no per-example deadline, few examples by
# default (CI can raise it with HYPOTHESIS_PROFILE=thorough).
settings.register_profile(
    "default", deadline=None, max_examples=25,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# The test models are tiny: one thread is faster than two, and it keeps the
# spawned multi-process tests from oversubscribing the cores.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of many tiny ops (on 2 busy cores the
    thread pool costs more than it saves); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=__import__("zoo").FAST)
def zoo_case(request):
    """Each case of the model zoo (``tests/zoo.py``) except the compiled one."""
    return __import__("zoo").CASES[request.param]


@pytest.fixture(params=sorted(__import__("cases").CURVATURE_CASES))
def curvature_case(request):
    """Each small float64 curvature case of ``tests/cases.py``: (model
    factory, input shape, number of classes)."""
    return __import__("cases").CURVATURE_CASES[request.param]
