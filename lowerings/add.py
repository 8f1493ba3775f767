"""``torch.ops.flag_gems.add_tensor``: broadcasting add with autograd (upstream FlagGems schema).

Inputs the kernel does not take (integer dtypes, a CPU scalar beside a CUDA tensor,
more than 4 non-coalescable dims) fall back to ``torch.add``, so the op is correct on
every input ``torch.add`` accepts.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from ..kernels.add import add, add_unsupported_reason
from .registry import register

logger = logging.getLogger(__name__)

__all__ = ["add_tensor"]

_warned: set[str] = set()


@torch.library.custom_op("flag_gems::add_tensor", mutates_args=())
def add_tensor(self: Tensor, other: Tensor) -> Tensor:
    """``self + other`` with broadcasting (upstream FlagGems ``add_tensor``).

    Args:
        self, other: broadcastable tensors on one device.

    Returns:
        A new tensor of the broadcast shape and promoted dtype.

    Raises:
        RuntimeError: what ``torch.add`` raises for these inputs (e.g. shapes that do not broadcast).
    """
    reason = add_unsupported_reason(self, other)
    if reason is not None:
        if reason not in _warned:
            _warned.add(reason)
            logger.info("add_tensor falls back to torch.add: %s", reason)
        return torch.add(self, other)
    return add(self, other)


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


def _supports_add(self, other, alpha=1):
    if alpha != 1:
        return "alpha != 1"
    return add_unsupported_reason(self, other)


# Opt-in: one add alone moves the same bytes as the native kernel and costs more host
# time to launch; it pays only inside fused patterns (to be confirmed by the GPU benchmark).
@register(
    torch.ops.aten.add.Tensor,
    kernel="flag_gems.add",
    supports=_supports_add,
    default=False,
    reason="alone, no faster than the native add (same bytes, more host time); fused where part of a pattern",
)
def _add_tensor_aten(self, other, alpha=1):
    """``aten.add.Tensor`` signature over the broadcasting add kernel (after ``_supports_add``)."""
    return add(self, other)
