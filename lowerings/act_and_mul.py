"""Gated-MLP activations (SiLU·mul, GELU·mul) as ``torch.ops.flag_gems`` ops, with the public functions.

Ops:

- ``silu_and_mul(Tensor a, Tensor b) -> Tensor``: ``silu(a) * b`` (upstream FlagGems schema).
- ``gelu_and_mul(Tensor a, Tensor b, str approximate="none") -> Tensor``: ``gelu(a) * b``.
- ``silu_and_mul_fused(Tensor x) -> Tensor`` / ``gelu_and_mul_fused(Tensor x, str approximate="none") -> Tensor``:
  the one-tensor form, ``x[..., 2d] -> act(x[..., :d]) * x[..., d:]`` (vLLM's ``SiluAndMul``
  layout; what the compile backend emits for ``chunk(2) -> act -> mul``).
- ``silu_and_mul_out(Tensor(a!) out, Tensor x) -> ()``: the one-tensor form written into
  ``out``, vLLM's ``silu_and_mul(Tensor! result, Tensor input)`` convention.
- ``{silu,gelu}_and_mul[_fused]_backward``: the backward ops the autograd formulas call,
  so that AOT autograd traces the backward as one op. They recompute the activation from
  the saved inputs (no activation is saved).

The out= op has no autograd formula (an in-place write into ``out``); the functional ops do.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from ..kernels.act_and_mul import (
    act_and_mul_bwd,
    act_and_mul_fused_bwd,
    act_and_mul_fused_fwd,
    act_and_mul_fwd,
    act_code,
    check_act_and_mul_args,
    check_act_and_mul_fused_args,
    check_out,
)
from ..c_runtime import fast_ops
from ._utils import eager_fast_path
from .registry import register_fused

logger = logging.getLogger(__name__)

__all__ = ["silu_and_mul", "gelu_and_mul", "silu_and_mul_fused", "gelu_and_mul_fused"]


def _half_shape(x: Tensor) -> tuple[int, ...]:
    return (*x.shape[:-1], x.shape[-1] // 2)


# ------------------------------------------------------------ two-tensor ops


@torch.library.custom_op("flag_gems::silu_and_mul", mutates_args=())
def _silu_and_mul_op(a: Tensor, b: Tensor) -> Tensor:
    return act_and_mul_fwd(a, b, "silu")


@_silu_and_mul_op.register_fake
def _(a, b):
    check_act_and_mul_args(a, b)
    return torch.empty(a.shape, dtype=a.dtype, device=a.device)


@torch.library.custom_op("flag_gems::gelu_and_mul", mutates_args=())
def _gelu_and_mul_op(a: Tensor, b: Tensor, approximate: str = "none") -> Tensor:
    return act_and_mul_fwd(a, b, "gelu", approximate)


@_gelu_and_mul_op.register_fake
def _(a, b, approximate="none"):
    act_code("gelu", approximate)
    check_act_and_mul_args(a, b)
    return torch.empty(a.shape, dtype=a.dtype, device=a.device)


@torch.library.custom_op("flag_gems::silu_and_mul_backward", mutates_args=())
def _silu_and_mul_backward_op(grad_out: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    return act_and_mul_bwd(grad_out, a, b, "silu")


@_silu_and_mul_backward_op.register_fake
def _(grad_out, a, b):
    check_act_and_mul_args(a, b)
    return torch.empty(a.shape, dtype=a.dtype, device=a.device), torch.empty(a.shape, dtype=a.dtype, device=a.device)


@torch.library.custom_op("flag_gems::gelu_and_mul_backward", mutates_args=())
def _gelu_and_mul_backward_op(
    grad_out: Tensor, a: Tensor, b: Tensor, approximate: str = "none"
) -> tuple[Tensor, Tensor]:
    return act_and_mul_bwd(grad_out, a, b, "gelu", approximate)


@_gelu_and_mul_backward_op.register_fake
def _(grad_out, a, b, approximate="none"):
    act_code("gelu", approximate)
    check_act_and_mul_args(a, b)
    return torch.empty(a.shape, dtype=a.dtype, device=a.device), torch.empty(a.shape, dtype=a.dtype, device=a.device)


def _pair_setup(ctx, inputs, output):
    a, b = inputs[0], inputs[1]
    ctx.save_for_backward(a, b)
    ctx.approximate = inputs[2] if len(inputs) > 2 else None


def _silu_and_mul_backward(ctx, grad):
    a, b = ctx.saved_tensors
    da, db = torch.ops.flag_gems.silu_and_mul_backward(grad, a, b)
    return da, db


def _gelu_and_mul_backward(ctx, grad):
    a, b = ctx.saved_tensors
    da, db = torch.ops.flag_gems.gelu_and_mul_backward(grad, a, b, ctx.approximate)
    return da, db, None


_silu_and_mul_op.register_autograd(_silu_and_mul_backward, setup_context=_pair_setup)
_gelu_and_mul_op.register_autograd(_gelu_and_mul_backward, setup_context=_pair_setup)


# ------------------------------------------------------------ one-tensor ops


@torch.library.custom_op("flag_gems::silu_and_mul_fused", mutates_args=())
def _silu_and_mul_fused_op(x: Tensor) -> Tensor:
    return act_and_mul_fused_fwd(x, "silu")


@_silu_and_mul_fused_op.register_fake
def _(x):
    check_act_and_mul_fused_args(x)
    return torch.empty(_half_shape(x), dtype=x.dtype, device=x.device)


@torch.library.custom_op("flag_gems::gelu_and_mul_fused", mutates_args=())
def _gelu_and_mul_fused_op(x: Tensor, approximate: str = "none") -> Tensor:
    return act_and_mul_fused_fwd(x, "gelu", approximate)


@_gelu_and_mul_fused_op.register_fake
def _(x, approximate="none"):
    act_code("gelu", approximate)
    check_act_and_mul_fused_args(x)
    return torch.empty(_half_shape(x), dtype=x.dtype, device=x.device)


@torch.library.custom_op("flag_gems::silu_and_mul_fused_backward", mutates_args=())
def _silu_and_mul_fused_backward_op(grad_out: Tensor, x: Tensor) -> Tensor:
    return act_and_mul_fused_bwd(grad_out, x, "silu")


@_silu_and_mul_fused_backward_op.register_fake
def _(grad_out, x):
    check_act_and_mul_fused_args(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("flag_gems::gelu_and_mul_fused_backward", mutates_args=())
def _gelu_and_mul_fused_backward_op(grad_out: Tensor, x: Tensor, approximate: str = "none") -> Tensor:
    return act_and_mul_fused_bwd(grad_out, x, "gelu", approximate)


@_gelu_and_mul_fused_backward_op.register_fake
def _(grad_out, x, approximate="none"):
    act_code("gelu", approximate)
    check_act_and_mul_fused_args(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _fused_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.approximate = inputs[1] if len(inputs) > 1 else None


def _silu_and_mul_fused_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return torch.ops.flag_gems.silu_and_mul_fused_backward(grad, x)


def _gelu_and_mul_fused_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return torch.ops.flag_gems.gelu_and_mul_fused_backward(grad, x, ctx.approximate), None


_silu_and_mul_fused_op.register_autograd(_silu_and_mul_fused_backward, setup_context=_fused_setup)
_gelu_and_mul_fused_op.register_autograd(_gelu_and_mul_fused_backward, setup_context=_fused_setup)


# ------------------------------------------------------------ out= op (vLLM)


@torch.library.custom_op("flag_gems::silu_and_mul_out", mutates_args=("out",))
def _silu_and_mul_out_op(out: Tensor, x: Tensor) -> None:
    act_and_mul_fused_fwd(x, "silu", out=out)


@_silu_and_mul_out_op.register_fake
def _(out, x):
    check_act_and_mul_fused_args(x)
    check_out(out, _half_shape(x), x.dtype, x.device)


# ------------------------------------------------------------ public API


def silu_and_mul(a: Tensor, b: Tensor) -> Tensor:
    """``silu(a) * b`` (upstream FlagGems signature), the SwiGLU gate.

    Args:
        a: gate, ``[*, d]`` fp16/bf16/fp32, any strides.
        b: up projection, ``a``'s shape and dtype, any strides.

    Returns:
        A new contiguous ``[*, d]`` tensor of ``a``'s dtype. Differentiable in ``a`` and ``b``.

    Raises:
        TypeError: unsupported or mismatched dtypes.
        ValueError: shapes differ (no broadcasting), or different devices.
        NotImplementedError: a CPU tensor outside Triton's interpreter mode.
    """
    if eager_fast_path(a, b):
        cpp = fast_ops(a.device.type)  # the C++ wrapper when the C++ runtime serves this device
        if cpp is not None:
            return cpp.silu_and_mul(a, b)
        return act_and_mul_fwd(a, b, "silu")
    return torch.ops.flag_gems.silu_and_mul(a, b)


def gelu_and_mul(a: Tensor, b: Tensor, approximate: str = "none") -> Tensor:
    """``gelu(a, approximate) * b`` (upstream FlagGems signature), the GeGLU gate.

    Args:
        a: gate, ``[*, d]`` fp16/bf16/fp32, any strides.
        b: ``a``'s shape and dtype, any strides.
        approximate: "none" (erf form) or "tanh", as ``torch.nn.functional.gelu``.

    Returns:
        A new contiguous ``[*, d]`` tensor of ``a``'s dtype. Differentiable in ``a`` and ``b``.

    Raises:
        TypeError / ValueError / NotImplementedError: as :func:`silu_and_mul`, and
            ValueError for an unknown ``approximate``.
    """
    if eager_fast_path(a, b):
        cpp = fast_ops(a.device.type)
        if cpp is not None:
            return cpp.gelu_and_mul(a, b, approximate)
        return act_and_mul_fwd(a, b, "gelu", approximate)
    return torch.ops.flag_gems.gelu_and_mul(a, b, approximate)


def silu_and_mul_fused(x: Tensor) -> Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x`` of shape ``[*, 2d]`` (vLLM's ``SiluAndMul``).

    Args:
        x: ``[*, 2d]`` fp16/bf16/fp32, any strides.

    Returns:
        A new contiguous ``[*, d]`` tensor of x's dtype. Differentiable in ``x``.

    Raises:
        TypeError: unsupported dtype.
        ValueError: an odd last dim.
        NotImplementedError: a CPU tensor outside Triton's interpreter mode.
    """
    if eager_fast_path(x):
        cpp = fast_ops(x.device.type)
        if cpp is not None:
            return cpp.silu_and_mul_fused(x)
        return act_and_mul_fused_fwd(x, "silu")
    return torch.ops.flag_gems.silu_and_mul_fused(x)


def gelu_and_mul_fused(x: Tensor, approximate: str = "none") -> Tensor:
    """``gelu(x[..., :d], approximate) * x[..., d:]`` for ``x`` of shape ``[*, 2d]``.

    Args:
        x: ``[*, 2d]`` fp16/bf16/fp32, any strides.
        approximate: "none" (erf form) or "tanh".

    Returns:
        A new contiguous ``[*, d]`` tensor of x's dtype. Differentiable in ``x``.

    Raises:
        TypeError / ValueError / NotImplementedError: as :func:`silu_and_mul_fused`, and
            ValueError for an unknown ``approximate``.
    """
    if eager_fast_path(x):
        cpp = fast_ops(x.device.type)
        if cpp is not None:
            return cpp.gelu_and_mul_fused(x, approximate)
        return act_and_mul_fused_fwd(x, "gelu", approximate)
    return torch.ops.flag_gems.gelu_and_mul_fused(x, approximate)


# The ops in the registry's table of flag_gems ops: (name, kernel, the fusion pass that emits it).
for _name, _kernel, _pass in (
    ("silu_and_mul", "flag_gems.act_and_mul.fwd", "act_and_mul"),
    ("gelu_and_mul", "flag_gems.act_and_mul.fwd", "act_and_mul"),
    ("silu_and_mul_fused", "flag_gems.act_and_mul.fused_fwd", "act_and_mul"),
    ("gelu_and_mul_fused", "flag_gems.act_and_mul.fused_fwd", "act_and_mul"),
    ("silu_and_mul_out", "flag_gems.act_and_mul.fused_fwd", None),
    ("silu_and_mul_backward", "flag_gems.act_and_mul.bwd", None),
    ("gelu_and_mul_backward", "flag_gems.act_and_mul.bwd", None),
    ("silu_and_mul_fused_backward", "flag_gems.act_and_mul.fused_bwd", None),
    ("gelu_and_mul_fused_backward", "flag_gems.act_and_mul.fused_bwd", None),
):
    register_fused(f"flag_gems::{_name}", kernel=_kernel, fused_by=_pass)
