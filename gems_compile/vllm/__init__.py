"""flag_gems for vLLM: three ways in, and a plugin that sets them up in every vLLM process.

1. **Patches** (any mode, eager too): :func:`apply_gems_patches_to_vllm` routes vLLM's
   RMSNorm, SiLU·mul, GELU·mul and rotary embedding kernels to flag_gems through what the
   installed vLLM offers (IR-op providers, ``torch.ops._C`` kernels, CustomOp forwards),
   found by feature detection (:mod:`.patches`).
2. **Backend** (modes 1/2): ``compilation_config={"mode": 2, "backend": "flag_gems"}`` uses
   the ``flag_gems`` ``torch.compile`` backend; its compiled artifact is serializable, so
   vLLM's AOT compile (on by default with torch >= 2.10) saves and reloads it.
3. **Pass** (mode 3, vLLM's own piecewise compiler with Inductor): ``flag_gems.vllm_pass``
   runs in vLLM's post-grad pass manager (:mod:`.fusion_pass`).

The ``vllm.general_plugins`` entry point :func:`register` (:mod:`.plugin`) does, per
``GEMS_VLLM``, ``flag_gems.enable()``, the patches and the pass in each vLLM process.

Importing this package does not import vLLM; the functions that need it do.
"""

from __future__ import annotations

from .patches import apply_gems_patches_to_vllm, patched, remove_gems_patches_from_vllm
from .plugin import install_vllm_pass, parse_modes, register, uninstall_vllm_pass

__all__ = [
    "GemsVllmPass",
    "apply_gems_patches_to_vllm",
    "install_vllm_pass",
    "parse_modes",
    "patched",
    "register",
    "remove_gems_patches_from_vllm",
    "uninstall_vllm_pass",
    "vllm_pass",
]


def __getattr__(name):
    # The pass imports torch._inductor (and vLLM when installed): only when asked for.
    if name in ("vllm_pass", "GemsVllmPass"):
        from . import fusion_pass

        value = getattr(fusion_pass, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flag_gems.vllm' has no attribute {name!r}")
