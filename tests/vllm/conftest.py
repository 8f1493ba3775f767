"""Tests against the real vLLM package (CI installs vLLM 0.33.0 CPU-only in its own venv).

Without vLLM every test here is skipped, so the main test command stays light. On a machine
without CUDA, vLLM needs ``VLLM_TARGET_DEVICE=cpu`` to build a ``VllmConfig``: set here unless
given.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

sys.path.insert(0, os.path.dirname(__file__))

@pytest.fixture(scope="session")
def c_ops():
    """vLLM's ``_C`` op schemas, defined as a GPU build has them (see vllm_helpers.define_c_ops)."""
    from vllm_helpers import define_c_ops

    with define_c_ops() as lib:
        yield lib


@pytest.fixture
def vllm_config(c_ops):
    """A CPU ``VllmConfig`` made current (layers read it when built); custom ops off, Inductor's default."""
    from vllm.config import CompilationConfig, VllmConfig, set_current_vllm_config

    cfg = VllmConfig(compilation_config=CompilationConfig(custom_ops=["none"]))
    with set_current_vllm_config(cfg):
        yield cfg


@pytest.fixture
def unpatched():
    """No flag_gems patch in effect before and after the test."""
    from flag_gems.vllm import remove_gems_patches_from_vllm

    remove_gems_patches_from_vllm()
    yield
    remove_gems_patches_from_vllm()
