"""RMSNorm and residual-add + RMSNorm as ``torch.ops.flag_gems`` ops, with the public functions.

Ops (schemas are supersets of upstream FlagGems'; the extra arguments have defaults):

- ``rms_norm(Tensor input, Tensor? weight, float epsilon, float weight_offset=0.0,
  bool round_before_weight=False) -> Tensor``
- ``add_rms_norm(Tensor input, Tensor residual, Tensor? weight, float epsilon, ...) -> (Tensor, Tensor)``:
  the functional form, ``(y, h)`` with ``h = input + residual``; the compile backend uses it,
  since an in-place op in a compiled graph costs clones after functionalization.
- ``fused_add_rms_norm(Tensor(a!) input, Tensor(b!) residual, Tensor? weight, float epsilon, ...) -> ()``:
  in place, as upstream and vLLM: ``input <- y``, ``residual <- h``.
- ``rms_norm_backward(...)``: the backward both functional ops' autograd formulas call, so that
  AOT autograd can trace the backward graph.

``weight_offset=1.0`` is Gemma's ``(1 + w)``; ``round_before_weight=True`` is HF Llama's
``weight * hidden.to(input_dtype)`` rounding. The norm is over the last dim.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from ..kernels.rms_norm import check_rms_norm_args, rms_norm_bwd, rms_norm_fwd
from ..c_runtime import fast_ops
from ._utils import eager_fast_path
from .registry import register_fused

logger = logging.getLogger(__name__)

__all__ = ["rms_norm", "fused_add_rms_norm", "add_rms_norm"]


# --------------------------------------------------------------------------- ops


@torch.library.custom_op("flag_gems::rms_norm", mutates_args=())
def _rms_norm_op(
    input: Tensor,
    weight: Tensor | None,
    epsilon: float,
    weight_offset: float = 0.0,
    round_before_weight: bool = False,
) -> Tensor:
    y, _ = rms_norm_fwd(input, weight, epsilon, weight_offset=weight_offset, round_before_weight=round_before_weight)
    return y


@_rms_norm_op.register_fake
def _(input, weight, epsilon, weight_offset=0.0, round_before_weight=False):
    check_rms_norm_args(input, weight, None)
    return torch.empty_like(input, memory_format=torch.contiguous_format)


@torch.library.custom_op("flag_gems::add_rms_norm", mutates_args=())
def _add_rms_norm_op(
    input: Tensor,
    residual: Tensor,
    weight: Tensor | None,
    epsilon: float,
    weight_offset: float = 0.0,
    round_before_weight: bool = False,
) -> tuple[Tensor, Tensor]:
    return rms_norm_fwd(
        input, weight, epsilon, residual=residual, weight_offset=weight_offset, round_before_weight=round_before_weight
    )


@_add_rms_norm_op.register_fake
def _(input, residual, weight, epsilon, weight_offset=0.0, round_before_weight=False):
    check_rms_norm_args(input, weight, residual)
    y = torch.empty_like(input, memory_format=torch.contiguous_format)
    return y, torch.empty_like(y)


@torch.library.custom_op("flag_gems::fused_add_rms_norm", mutates_args=("input", "residual"))
def _fused_add_rms_norm_op(
    input: Tensor,
    residual: Tensor,
    weight: Tensor | None,
    epsilon: float,
    weight_offset: float = 0.0,
    round_before_weight: bool = False,
) -> None:
    rms_norm_fwd(
        input,
        weight,
        epsilon,
        residual=residual,
        weight_offset=weight_offset,
        round_before_weight=round_before_weight,
        out=input,
        residual_out=residual,
    )


@_fused_add_rms_norm_op.register_fake
def _(input, residual, weight, epsilon, weight_offset=0.0, round_before_weight=False):
    check_rms_norm_args(input, weight, residual)


@torch.library.custom_op("flag_gems::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    grad_out: Tensor,
    input: Tensor,
    weight: Tensor | None,
    epsilon: float,
    weight_offset: float,
    round_before_weight: bool,
    grad_h: Tensor | None,
    need_weight_grad: bool,
) -> tuple[Tensor, Tensor]:
    dx, dw = rms_norm_bwd(
        grad_out,
        input,
        weight,
        epsilon,
        dh=grad_h,
        weight_offset=weight_offset,
        round_before_weight=round_before_weight,
        compute_dw=need_weight_grad,
    )
    return dx, (dw if dw is not None else input.new_empty(0))


@_rms_norm_backward_op.register_fake
def _(grad_out, input, weight, epsilon, weight_offset, round_before_weight, grad_h, need_weight_grad):
    dx = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    dw = torch.empty_like(weight) if (need_weight_grad and weight is not None) else input.new_empty(0)
    return dx, dw


def _rms_norm_setup(ctx, inputs, output):
    input, weight, epsilon, weight_offset, round_before_weight = inputs
    ctx.save_for_backward(input, weight)
    ctx.args = (epsilon, weight_offset, round_before_weight)


def _rms_norm_backward(ctx, grad):
    input, weight = ctx.saved_tensors
    need_dw = weight is not None and ctx.needs_input_grad[1]
    dx, dw = torch.ops.flag_gems.rms_norm_backward(grad, input, weight, *ctx.args, None, need_dw)
    return dx, (dw if need_dw else None), None, None, None


_rms_norm_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)


def _add_rms_norm_setup(ctx, inputs, output):
    _, _, weight, epsilon, weight_offset, round_before_weight = inputs
    # Save h (an output), not the inputs: the in-place public function overwrites them.
    ctx.save_for_backward(output[1], weight)
    ctx.args = (epsilon, weight_offset, round_before_weight)


def _add_rms_norm_backward(ctx, grad_y, grad_h):
    h, weight = ctx.saved_tensors
    need_dw = weight is not None and ctx.needs_input_grad[2]
    if grad_y is None:
        grad_y = torch.zeros_like(h)
    dx, dw = torch.ops.flag_gems.rms_norm_backward(grad_y, h, weight, *ctx.args, grad_h, need_dw)
    # d(input) and d(residual) are the same tensor: h = input + residual.
    return dx, dx, (dw if need_dw else None), None, None, None


_add_rms_norm_op.register_autograd(_add_rms_norm_backward, setup_context=_add_rms_norm_setup)


# ------------------------------------------------------------------ public API


def _flatten_normalized(x: Tensor, normalized_shape, weight: Tensor | None):
    """Check ``normalized_shape`` against x and flatten a multi-dim one into the last dim."""
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    ns = tuple(int(s) for s in normalized_shape)
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if len(ns) == 0 or tuple(x.shape[-len(ns):]) != ns or x.dim() < len(ns):
        raise ValueError(f"normalized_shape: expected the trailing dims of x {list(x.shape)}, got {list(ns)}")
    if weight is not None and tuple(weight.shape) != ns:
        raise ValueError(f"weight: expected shape {list(ns)} (normalized_shape), got {list(weight.shape)}")
    if len(ns) == 1:
        return x, weight, False
    return x.flatten(-len(ns)), (weight.reshape(-1) if weight is not None else None), True


def rms_norm(
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float = 1e-5,
    *,
    weight_offset: float = 0.0,
    round_before_weight: bool = False,
) -> Tensor:
    """RMSNorm over the trailing ``normalized_shape`` dims: ``x * rsqrt(mean(x^2) + eps) * (weight_offset + weight)``.

    Args:
        x: input, fp16/bf16/fp32, any strides.
        normalized_shape: trailing dims to normalize over (int or sequence).
        weight: tensor of shape ``normalized_shape``, or None for no scale.
        eps: added to the mean square.
        weight_offset: 1.0 for Gemma's ``(1 + weight)`` form.
        round_before_weight: round the normalized value to x's dtype before the weight multiply
            (HF Llama's numerics).

    Returns:
        Tensor of x's shape and dtype. Differentiable in x and weight.

    Raises:
        TypeError: unsupported dtype. ValueError: shapes do not match.
        NotImplementedError: a CPU tensor outside Triton's interpreter mode.
    """
    x2, w2, flat = _flatten_normalized(x, normalized_shape, weight)
    if eager_fast_path(x2, w2):
        cpp = fast_ops(x2.device.type)  # the C++ wrapper when the C++ runtime serves this device
        if cpp is not None:
            y = cpp.rms_norm(x2, w2, eps, weight_offset, round_before_weight)
        else:
            y, _ = rms_norm_fwd(x2, w2, eps, weight_offset=weight_offset, round_before_weight=round_before_weight)
    else:
        y = torch.ops.flag_gems.rms_norm(x2, w2, eps, weight_offset, round_before_weight)
    return y.view(x.shape) if flat else y


def add_rms_norm(
    x: Tensor,
    residual: Tensor,
    weight: Tensor | None = None,
    eps: float = 1e-5,
    *,
    weight_offset: float = 0.0,
    round_before_weight: bool = False,
) -> tuple[Tensor, Tensor]:
    """Functional residual-add + RMSNorm over the last dim: ``h = x + residual``, ``y = rms_norm(h)``.

    Args:
        x: input ``[*, n]``.
        residual: x's shape and dtype.
        weight: ``[n]`` or None.
        eps, weight_offset, round_before_weight: as in :func:`rms_norm`.

    Returns:
        ``(y, h)``, both new tensors of x's shape and dtype. Differentiable.

    Raises:
        TypeError / ValueError / NotImplementedError: as in :func:`rms_norm`.
    """
    if eager_fast_path(x, residual, weight):
        cpp = fast_ops(x.device.type)
        if cpp is not None:
            return cpp.add_rms_norm(x, residual, weight, eps, weight_offset, round_before_weight)
        return rms_norm_fwd(
            x, weight, eps, residual=residual, weight_offset=weight_offset, round_before_weight=round_before_weight
        )
    return torch.ops.flag_gems.add_rms_norm(x, residual, weight, eps, weight_offset, round_before_weight)


def fused_add_rms_norm(
    x: Tensor,
    residual: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None,
    eps: float = 1e-5,
    *,
    weight_offset: float = 0.0,
    round_before_weight: bool = False,
) -> tuple[Tensor, Tensor]:
    """In-place residual-add + RMSNorm (upstream FlagGems signature).

    Writes ``h = x + residual`` into ``residual`` and ``rms_norm(h) * weight`` into ``x``,
    also when they are non-contiguous (upstream leaves a non-contiguous x unchanged).

    Args:
        x: input, overwritten with the normalized output.
        residual: x's shape and dtype, overwritten with ``x + residual``.
        normalized_shape: trailing dims to normalize over.
        weight: tensor of shape ``normalized_shape``, or None.
        eps, weight_offset, round_before_weight: as in :func:`rms_norm`.

    Returns:
        ``(x, residual)``, the updated tensors.

    Raises:
        TypeError / ValueError / NotImplementedError: as in :func:`rms_norm`.
    """
    x2, w2, flat = _flatten_normalized(x, normalized_shape, weight)
    if not isinstance(residual, Tensor) or residual.shape != x.shape:
        got = list(residual.shape) if isinstance(residual, Tensor) else type(residual).__name__
        raise ValueError(f"residual: expected a tensor of shape {list(x.shape)} (x's shape), got {got}")
    if not flat:
        if eager_fast_path(x, residual, weight):
            cpp = fast_ops(x.device.type)
            if cpp is not None:
                cpp.fused_add_rms_norm(x, residual, weight, eps, weight_offset, round_before_weight)
                return x, residual
            rms_norm_fwd(
                x, weight, eps, residual=residual, weight_offset=weight_offset,
                round_before_weight=round_before_weight, out=x, residual_out=residual,
            )
            return x, residual
        if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, weight))):
            torch.ops.flag_gems.fused_add_rms_norm(x, residual, weight, eps, weight_offset, round_before_weight)
            return x, residual
    # Autograd, or a multi-dim normalized_shape: compute functionally and write back in
    # place, so that autograd records the in-place update as it would for torch ops.
    r2 = residual.flatten(x2.dim() - 1) if flat else residual
    y, h = add_rms_norm(x2, r2, w2, eps, weight_offset=weight_offset, round_before_weight=round_before_weight)
    residual.copy_(h.view(residual.shape))
    x.copy_(y.view(x.shape))
    return x, residual


# The ops in the registry's table of flag_gems ops: (name, kernel, the fusion pass that emits it).
for _name, _kernel, _pass in (
    ("rms_norm", "flag_gems.rms_norm.fwd", "rms_norm"),
    ("add_rms_norm", "flag_gems.rms_norm.fwd", "rms_norm"),
    ("fused_add_rms_norm", "flag_gems.rms_norm.fwd", None),
    ("rms_norm_backward", "flag_gems.rms_norm.bwd", None),
):
    register_fused(f"flag_gems::{_name}", kernel=_kernel, fused_by=_pass,
                   measured_as=("flag_gems::add_rms_norm",) if "add" in _name else None)
