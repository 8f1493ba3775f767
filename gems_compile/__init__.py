"""gems_compile: Triton kernels and a torch.compile backend, a drop-in for the ``flag_gems`` API.

``import flag_gems`` registers the ``torch.ops.flag_gems.*`` ops and exposes the public
functions (``rms_norm``, ``fused_add_rms_norm``, ``silu_and_mul``, ...).
"""

from __future__ import annotations

import logging
import os
import sys

import torch

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

# Without a CUDA device, Triton can only run through its CPU interpreter, which reads
# TRITON_INTERPRET when a function is decorated: Triton's own library functions are
# decorated when triton is imported, ours during this import. So the switch is flipped
# here only if triton is not imported yet (an explicit TRITON_INTERPRET is respected).
# Otherwise no kernel can run in this process: flag_gems.availability records why, and the
# first kernel refused warns on stderr (warnings) and explain() says it in its first line.
from . import availability as _availability  # noqa: E402

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    if "TRITON_INTERPRET" not in os.environ and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
        logger.info("no CUDA device: flag_gems kernels run through Triton's CPU interpreter")
    else:
        _why = ("triton was imported before flag_gems without TRITON_INTERPRET=1"
                if "TRITON_INTERPRET" not in os.environ else f"TRITON_INTERPRET={os.environ['TRITON_INTERPRET']!r}")
        _availability.set_unavailable(
            f"no CUDA device and {_why}: flag_gems kernels cannot run in this process and every op falls back "
            "to PyTorch; set TRITON_INTERPRET=1 at process start (before importing triton or transformers)"
        )
        logger.warning("%s", _availability.unavailable())

from .runtime import device, vendor_name  # noqa: E402  (GEMS_VENDOR; raises for an unknown vendor)

from . import lowerings as _lowerings  # noqa: F401  (registers torch.ops.flag_gems.*)
from . import c_runtime as _c_runtime  # noqa: E402

_c_runtime.start()  # the C++ runtime when it was built (flag_gems.c_operators)
from .backend import explain, flag_gems_backend
from .eager import all_registered_ops, disable, enable, only_enable, use_gems
from .lowerings.act_and_mul import gelu_and_mul, gelu_and_mul_fused, silu_and_mul, silu_and_mul_fused
from .lowerings.attention import scaled_dot_product_attention
from .lowerings.matmul import addmm, bmm, mm
from .kernels._autotune import config_for
from .lowerings.rms_norm import add_rms_norm, fused_add_rms_norm, rms_norm
from .lowerings.rotary_embedding import apply_rotary_pos_emb, apply_rotary_pos_emb_hf, rotary_embedding_cache
from .modules import GemsDeepseekYarnRoPE, GemsRMSNorm, GemsRope, GemsSiluAndMul

__version__ = "0.1.0"

__all__ = [
    "GemsDeepseekYarnRoPE",
    "GemsFusionPass",
    "GemsRMSNorm",
    "GemsRope",
    "GemsSiluAndMul",
    "add_rms_norm",
    "addmm",
    "all_registered_ops",
    "apply_gems_patches_to_vllm",
    "apply_rotary_pos_emb",
    "apply_rotary_pos_emb_hf",
    "bmm",
    "config_for",
    "device",
    "disable",
    "enable",
    "explain",
    "flag_gems_backend",
    "fused_add_rms_norm",
    "gelu_and_mul",
    "gelu_and_mul_fused",
    "inductor_pass",
    "mm",
    "only_enable",
    "rms_norm",
    "rotary_embedding_cache",
    "scaled_dot_product_attention",
    "silu_and_mul",
    "silu_and_mul_fused",
    "use_gems",
    "vendor_name",
    "vllm_pass",
    "warmup",
]



_LAZY = {
    # The Inductor passes import torch._inductor (seconds), the vLLM pass vLLM too: only when asked for.
    "GemsFusionPass": ".inductor",
    "inductor_pass": ".inductor",
    "vllm_pass": ".vllm",
    "apply_gems_patches_to_vllm": ".vllm",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        # Kept in the module's namespace: vLLM resolves "flag_gems.vllm_pass" through __dict__.
        globals()[name] = value
        return value
    # warmup lives in flag_gems.pretune, which `python -m flag_gems.pretune` runs as __main__: not imported here.
    if name == "warmup":
        from .pretune import warmup

        return warmup
    raise AttributeError(f"module 'flag_gems' has no attribute {name!r}")
