"""``torch.ops.flag_gems.add_tensor``: broadcasting add with autograd (upstream FlagGems schema).

The kernel is the pointwise generator's ``add`` (``kernels/pointwise.py``): any strides,
broadcasting, torch's type promotion, float/int/bool dtypes. Inputs it does not take
(complex dtypes, a CPU tensor beside a CUDA one, too many non-coalescable dims...) fall
back to ``torch.add``, so the op is correct on every input ``torch.add`` accepts. The
``aten.add.*`` registry entries live with the other pointwise ops in ``pointwise.py``.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from ..kernels.pointwise import OPS
from . import pointwise  # noqa: F401  (registers the aten pointwise entries, add.Tensor included)
from .registry import register_fused

logger = logging.getLogger(__name__)

__all__ = ["add_tensor"]

_ADD = OPS["add"]
_warned: set[str] = set()


@torch.library.custom_op("flag_gems::add_tensor", mutates_args=())
def add_tensor(self: Tensor, other: Tensor) -> Tensor:
    """``self + other`` with broadcasting and type promotion (upstream FlagGems ``add_tensor``).

    Args:
        self, other: broadcastable tensors.

    Returns:
        A new tensor of the broadcast shape and promoted dtype.

    Raises:
        ValueError: the shapes do not broadcast.
        RuntimeError: what ``torch.add`` raises for other bad inputs (e.g. several devices).
    """
    try:
        torch.broadcast_shapes(self.shape, other.shape)
    except RuntimeError as e:
        raise ValueError(f"other: shape {list(other.shape)} does not broadcast with self {list(self.shape)}") from e
    reason = _ADD.reason(self, other)
    if reason is not None:
        if reason not in _warned:
            _warned.add(reason)
            logger.info("add_tensor falls back to torch.add: %s", reason)
        return torch.add(self, other)
    return _ADD(self, other)


@add_tensor.register_fake
def _(self, other):
    shape = torch.broadcast_shapes(self.shape, other.shape)
    device = self.device if self.dim() > 0 or other.dim() == 0 else other.device
    return torch.empty(shape, dtype=torch.result_type(self, other), device=device)


def _setup(ctx, inputs, output):
    self, other = inputs
    ctx.shapes = (self.shape, other.shape)
    ctx.dtypes = (self.dtype, other.dtype)


def _backward(ctx, grad):
    grads = []
    for shape, dtype, needed in zip(ctx.shapes, ctx.dtypes, ctx.needs_input_grad):
        grads.append(grad.sum_to_size(shape).to(dtype) if needed else None)
    return tuple(grads)


add_tensor.register_autograd(_backward, setup_context=_setup)

register_fused("flag_gems::add_tensor", kernel="flag_gems.pointwise.add")
