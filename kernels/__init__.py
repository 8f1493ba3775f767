"""Pure Triton kernels and their host launchers (no autograd, no dispatcher, no FX).

One module per op family; launchers take and return tensors and validate their inputs.
"""

from .add import add
from .rms_norm import rms_norm_bwd, rms_norm_fwd

__all__ = ["add", "rms_norm_bwd", "rms_norm_fwd"]
