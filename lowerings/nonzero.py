"""``torch.ops.flag_gems.nonzero`` and the ``aten.nonzero`` registry entry, served by ``kernels/nonzero.py``.

- ``nonzero(Tensor self) -> Tensor``: ``[count, self.dim()]`` int64 indices, as ``torch.nonzero``
  (one of FlagGems' C++-runtime ops). Inputs the kernel does not take (complex dtypes, more
  than 8 dims, devices it does not run on) go to ``torch.nonzero``. The output size depends on
  the data: the fake implementation gives it an unbacked size, and the op syncs the device
  like torch's. No autograd (an integer result).

The registry entry ``aten.nonzero.default`` is on in the eager mode, as every entry (the kernel
moves the bytes native's does and syncs as it does); not measured on a GPU yet, so neither in
``preset="fast"`` nor lowered in graphs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import nonzero as kn
from ._utils import row_tensor_reason
from .registry import register, register_fused

__all__ = ["nonzero"]

aten = torch.ops.aten


def _reason(self) -> str | None:
    why = row_tensor_reason(self, "self", kn.DTYPES, strided=True)
    if why is not None:
        return why
    if self.dim() > kn.MAX_DIMS:
        return f"{self.dim()} dims (the kernel unravels at most {kn.MAX_DIMS})"
    if self.numel() >= 2**31:
        return f"{self.numel()} elements (at most 2**31 - 1)"
    return None


@torch.library.custom_op("flag_gems::nonzero", mutates_args=())
def nonzero(self: Tensor) -> Tensor:
    """``torch.nonzero(self)``: the row-major ``[count, self.dim()]`` int64 indices of its non-zeros.

    Args:
        self: any tensor (any strides; complex dtypes and more than 8 dims through ``torch.nonzero``).

    Returns:
        A new int64 tensor on self's device.
    """
    if _reason(self) is not None:
        return torch.nonzero(self)
    return kn.nonzero(self)


@nonzero.register_fake
def _(self):
    count = torch.library.get_ctx().new_dynamic_size()
    return self.new_empty((count, self.dim()), dtype=torch.int64)


def _supports(self):
    return _reason(self)


@register(aten.nonzero.default, kernel="flag_gems.nonzero", supports=_supports)
def nonzero_default(self):
    """``aten::nonzero``."""
    return kn.nonzero(self)

register_fused("flag_gems::nonzero", kernel="flag_gems.nonzero")
