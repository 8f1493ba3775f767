"""Registry entries for the negative log-likelihood loss, served by ``kernels/loss.py``.

Overloads (each ``impl`` takes exactly the overload's arguments)::

    nll_loss_forward.default  nll_loss_backward.default

``cross_entropy`` (every ``*ForCausalLM`` / ``*ForMaskedLM`` loss in ``transformers``) is
``log_softmax`` (an entry of ``lowerings/reduction.py``) followed by these two.

Scope: ``self`` of shape ``[n_rows, n_classes]`` (fp16/bf16/fp32, any strides), int64
``target`` of shape ``[n_rows]``, ``reduction`` none/mean/sum, any ``ignore_index``, no class
weights. Values are torch's: the same ``output`` and ``total_weight`` (fp32 sums, one
rounding), the same gradient. Everything else is a ``supports`` reason, so the eager mode
runs the native kernel (and torch's errors): ``weight=`` given, a 1-d ``self`` (one sample),
a uint8 target, mismatched shapes, fp64, symbolic sizes, devices the kernels do not run on.

Target *values* are not checked (that needs the data, a device sync): an out-of-range
target, which torch rejects, gives a NaN loss for its row and a zero gradient row, never an
out-of-bounds access (see ``kernels/loss.py``).

``supports`` reads metadata only, so it runs on FakeTensors and adds no guards.

Policies (``flag_gems.lowerings.registry``): on in the eager mode, as every entry. Not in the
GPU benchmark yet (neither in ``preset="fast"`` nor lowered in graphs); the forward is
latency-bound (one read per row, one program, as torch's CUDA kernel) and the backward writes
the gradient once, as torch's zero + scatter do.
"""

from __future__ import annotations

import logging

import torch

from ..kernels import loss as K
from ._utils import row_tensor_reason
from .registry import register

logger = logging.getLogger(__name__)

__all__ = ["TARGETS"]

aten = torch.ops.aten

_SYM = (torch.SymInt, torch.SymFloat, torch.SymBool)


def _common_reason(self, target, weight, reduction, ignore_index) -> str | None:
    """Why the kernels cannot take ``self``/``target`` and these options (None when they can). Metadata only."""
    why = row_tensor_reason(self, "self", strided=True)
    if why is not None:
        return why
    if not isinstance(target, torch.Tensor):
        return f"target is a {type(target).__name__}, not a tensor"
    if target.dtype != torch.int64:
        return f"target dtype {target.dtype} (the kernels take int64 class indices)"
    if any(isinstance(s, torch.SymInt) for s in (*target.shape, *target.stride())):
        return "target has symbolic sizes or strides (left to aten/Inductor)"
    if weight is not None:
        return "class weights (weight=) are not supported"
    if isinstance(reduction, _SYM) or reduction not in K.REDUCTIONS:
        return f"reduction {reduction!r} (expected 0 none, 1 mean or 2 sum)"
    if isinstance(ignore_index, _SYM) or not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        return f"ignore_index {ignore_index!r} (expected an int)"
    if self.dim() != 2:
        return f"a {self.dim()}-d self (the kernels take [n_rows, n_classes])"
    if target.dim() != 1 or target.shape[0] != self.shape[0]:
        return f"target shape {list(target.shape)} does not match self {list(self.shape)} (expected [n_rows])"
    if target.device != self.device:
        return f"target on {target.device}, self on {self.device}"
    return None


def _forward_supports(self, target, weight, reduction, ignore_index):
    return _common_reason(self, target, weight, reduction, ignore_index)


@register(aten.nll_loss_forward.default, kernel="flag_gems.loss.nll_loss_forward", supports=_forward_supports,
          checks_in_impl=True)
def nll_loss_forward(self, target, weight, reduction, ignore_index):
    """``aten::nll_loss_forward`` for 2-d input without class weights: ``(output, total_weight)``.

    Raises:
        NotImplementedError: exactly when ``supports`` gives a reason.
    """
    why = _common_reason(self, target, weight, reduction, ignore_index)
    if why is not None:
        raise NotImplementedError(f"flag_gems nll_loss_forward: {why}")
    return K.nll_loss_forward(self, target, reduction, ignore_index)


def _backward_reason(grad_output, self, target, weight, reduction, ignore_index, total_weight) -> str | None:
    why = _common_reason(self, target, weight, reduction, ignore_index)
    if why is not None:
        return why
    for name, t in (("grad_output", grad_output), ("total_weight", total_weight)):
        if not isinstance(t, torch.Tensor):
            return f"{name} is a {type(t).__name__}, not a tensor"
        if t.dtype != self.dtype:
            return f"{name} dtype {t.dtype} differs from self's {self.dtype}"
        if t.device != self.device:
            return f"{name} on {t.device}, self on {self.device}"
        if any(isinstance(s, torch.SymInt) for s in (*t.shape, *t.stride())):
            return f"{name} has symbolic sizes or strides"
    if reduction == 0:
        if grad_output.dim() != 1 or grad_output.shape[0] != self.shape[0]:
            return f"grad_output shape {list(grad_output.shape)} for reduction none (expected [{self.shape[0]}])"
    elif grad_output.dim() > 1 or grad_output.numel() != 1:
        return f"grad_output shape {list(grad_output.shape)} for a reduced loss (expected one element)"
    if total_weight.numel() != 1:
        return f"total_weight shape {list(total_weight.shape)} (expected one element)"
    return None


def _backward_supports(grad_output, self, target, weight, reduction, ignore_index, total_weight):
    return _backward_reason(grad_output, self, target, weight, reduction, ignore_index, total_weight)


@register(aten.nll_loss_backward.default, kernel="flag_gems.loss.nll_loss_backward", supports=_backward_supports,
          checks_in_impl=True)
def nll_loss_backward(grad_output, self, target, weight, reduction, ignore_index, total_weight):
    """``aten::nll_loss_backward`` for 2-d input without class weights: the contiguous gradient of ``self``.

    Raises:
        NotImplementedError: exactly when ``supports`` gives a reason.
    """
    why = _backward_reason(grad_output, self, target, weight, reduction, ignore_index, total_weight)
    if why is not None:
        raise NotImplementedError(f"flag_gems nll_loss_backward: {why}")
    return K.nll_loss_backward(grad_output, self, target, reduction, ignore_index, total_weight)


TARGETS = (aten.nll_loss_forward.default, aten.nll_loss_backward.default)
