"""Test configuration: pick the device, and run Triton through its interpreter without a GPU.

TRITON_INTERPRET must be set before Triton decorates any kernel, so it is set here,
at collection, before any test module imports flag_gems.
"""

import os
import sys
import zlib

import pytest
import torch

# The checkout's root holds the folders kernels/ and lowerings/ (installed as flag_gems.kernels and
# flag_gems.lowerings). `python -m pytest` puts the working directory on sys.path, where kernels/
# then shadows the PyPI package `kernels` that transformers imports when it is installed (a
# dependency of recent huggingface releases): every HF model test failed with "cannot import name
# 'CUDAProperties' from 'kernels'". The tests import the package as flag_gems only, so the root
# leaves sys.path, here and (PYTHONSAFEPATH, Python >= 3.11) in the subprocesses tests start.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]
os.environ["PYTHONSAFEPATH"] = "1"
for _name in ("kernels", "lowerings"):
    _mod = sys.modules.get(_name)
    if _mod is not None and os.path.dirname(os.path.dirname(os.path.abspath(getattr(_mod, "__file__", None) or os.sep))) == _ROOT:
        del sys.modules[_name]

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="slow; pass --runslow")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def fresh_dynamo():
    """An empty Dynamo cache: compile tests reuse the same forward code with new modules and dtypes."""
    torch._dynamo.reset()
    yield


@pytest.fixture
def cpp_dev():
    """The device whose ops the C++ wrappers serve: CUDA, or the CPU with the wrappers registered
    for the test (their launches then go through the Python hook to Triton's interpreter)."""
    from flag_gems import c_runtime

    if not c_runtime.available:
        pytest.skip(f"C++ runtime unavailable: {c_runtime.reason}")
    if torch.cuda.is_available():
        yield "cuda"
        return
    had = "CPU" in c_runtime.installed_keys()
    c_runtime.install("CPU")
    yield "cpu"
    if not had:
        c_runtime.uninstall("CPU")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different but reproducible seed per test: fresh inputs, no flaky reruns.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


# Test modules import the shared helpers (tests/accuracy.py) by name.
sys.path.insert(0, os.path.dirname(__file__))
