"""Pure Triton kernels and their host launchers (no autograd, no dispatcher, no FX).

One module per op family; launchers take and return tensors and validate their inputs.
Pointwise ops come from one generator (``pointwise.OPS``); ``add`` is its ``a + b``.
"""

from .pointwise import OPS as POINTWISE_OPS
from .rms_norm import rms_norm_bwd, rms_norm_fwd

add = POINTWISE_OPS["add"]

__all__ = ["POINTWISE_OPS", "add", "rms_norm_bwd", "rms_norm_fwd"]
