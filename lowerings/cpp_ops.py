"""``torch.ops.flag_gems`` ops of FlagGems' C++-runtime list that had no op of their own here:
``mm``, ``bmm``, ``cat``, ``sum`` (``nonzero`` is in ``nonzero.py``, ``add_tensor`` in ``add.py``).

Schemas (aten's, under the flag_gems namespace)::

    mm(Tensor self, Tensor mat2) -> Tensor
    bmm(Tensor self, Tensor mat2) -> Tensor
    cat(Tensor[] tensors, int dim=0) -> Tensor
    sum(Tensor self, int[]? dim=None, bool keepdim=False, *, ScalarType? dtype=None) -> Tensor

Each runs our kernel (``kernels/matmul.py``, ``kernels/indexing.py:cat``,
``kernels/reduction.py:row_sum``) for the inputs the matching registry entry supports and
the torch op otherwise, so it is correct on every input torch takes (and raises torch's
errors). Fake implementations are the aten ops' own shape logic; autograd formulas are the
usual ones, written with these ops, so the backward of a flag_gems ``mm`` is flag_gems ``mm``s.

With the C++ runtime (``flag_gems.c_operators``), the CUDA kernel of each op is a C++ wrapper
that launches the same kernels; these Python implementations remain the CPU path and the
fallback for what the wrappers refuse.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import indexing as ki
from ..kernels import matmul as km
from . import indexing, matmul, reduction
from .registry import register_fused

__all__ = ["bmm", "cat", "mm", "sum"]

aten = torch.ops.aten


# --------------------------------------------------------------------------- mm / bmm


@torch.library.custom_op("flag_gems::mm", mutates_args=())
def mm(self: Tensor, mat2: Tensor) -> Tensor:
    """``self [M, K] @ mat2 [K, N]`` (``torch.mm``).

    Args:
        self, mat2: 2-D tensors of one dtype; fp16/bf16/fp32 run our kernel, others ``torch.mm``.

    Returns:
        A new ``[M, N]`` tensor.
    """
    if matmul._supports_mm(self, mat2) is not None:
        return torch.mm(self, mat2)
    return km.matmul(self, mat2)


@mm.register_fake
def _(self, mat2):
    return aten.mm.default(self, mat2)


@torch.library.custom_op("flag_gems::bmm", mutates_args=())
def bmm(self: Tensor, mat2: Tensor) -> Tensor:
    """``self [B, M, K] @ mat2 [B, K, N]`` (``torch.bmm``).

    Args:
        self, mat2: 3-D tensors of one dtype; fp16/bf16/fp32 run our kernel, others ``torch.bmm``.

    Returns:
        A new ``[B, M, N]`` tensor.
    """
    if matmul._supports_bmm(self, mat2) is not None:
        return torch.bmm(self, mat2)
    return km.matmul(self, mat2)


@bmm.register_fake
def _(self, mat2):
    return aten.bmm.default(self, mat2)


def _mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _mm_backward(ctx, grad):
    self, mat2 = ctx.saved_tensors
    d_self = torch.ops.flag_gems.mm(grad, mat2.mT) if ctx.needs_input_grad[0] else None
    d_mat2 = torch.ops.flag_gems.mm(self.mT, grad) if ctx.needs_input_grad[1] else None
    return d_self, d_mat2


def _bmm_backward(ctx, grad):
    self, mat2 = ctx.saved_tensors
    d_self = torch.ops.flag_gems.bmm(grad, mat2.mT) if ctx.needs_input_grad[0] else None
    d_mat2 = torch.ops.flag_gems.bmm(self.mT, grad) if ctx.needs_input_grad[1] else None
    return d_self, d_mat2


mm.register_autograd(_mm_backward, setup_context=_mm_setup)
bmm.register_autograd(_bmm_backward, setup_context=_mm_setup)


# --------------------------------------------------------------------------- cat


@torch.library.custom_op("flag_gems::cat", mutates_args=())
def cat(tensors: list[Tensor], dim: int = 0) -> Tensor:
    """``torch.cat(tensors, dim)``.

    Args:
        tensors: tensors of one dtype and rank, equal sizes outside ``dim`` (other inputs,
            e.g. mixed dtypes that torch promotes, go to ``torch.cat``).
        dim: the dim to concatenate along (negative counts from the end).

    Returns:
        A new contiguous tensor.
    """
    if indexing._cat_supports(tensors, dim) is not None:
        return torch.cat(tensors, dim)
    return ki.cat(tensors, dim % tensors[0].dim())


@cat.register_fake
def _(tensors, dim=0):
    return aten.cat.default(tensors, dim)


def _cat_setup(ctx, inputs, output):
    tensors, dim = inputs
    ctx.dim = dim
    ctx.sizes = [t.shape[dim] if t.dim() == output.dim() else 0 for t in tensors]
    ctx.shapes = [t.shape for t in tensors]


def _cat_backward(ctx, grad):
    grads, start = [], 0
    for size, shape in zip(ctx.sizes, ctx.shapes):
        if len(shape) == grad.dim():
            grads.append(grad.narrow(ctx.dim, start, size))
        else:  # a legacy 1-D empty input torch skips
            grads.append(grad.new_zeros(shape))
        start += size
    # The tensors' gradients only: torch's custom_op autograd (2.13) adds dim's None itself when the
    # first input is a Tensor[] (returning (grads, None) fails its structure check).
    return grads


cat.register_autograd(_cat_backward, setup_context=_cat_setup)


# --------------------------------------------------------------------------- sum


@torch.library.custom_op("flag_gems::sum", mutates_args=())
def sum(self: Tensor, dim: list[int] | None = None, keepdim: bool = False, *,  # noqa: A001  (upstream's name)
        dtype: torch.dtype | None = None) -> Tensor:
    """``torch.sum(self, dim, keepdim, dtype=dtype)``; ``dim`` None or ``[]`` sums every element.

    Args:
        self: the input; contiguous fp16/bf16/fp32 reduced over trailing dims run our kernel
            (fp32 accumulation), everything else ``torch.sum``.
        dim: dims to reduce.
        keepdim: keep the reduced dims as size 1.
        dtype: the result's dtype (default: self's).

    Returns:
        A new tensor.
    """
    if reduction._sum_reason(self, dim, keepdim, dtype) is not None:
        return torch.sum(self, dim=dim or None, keepdim=keepdim, dtype=dtype)
    if dim:
        return reduction.sum_dim_IntList(self, dim, keepdim, dtype=dtype)
    out = reduction.sum_default(self, dtype=dtype)
    return out.view([1] * self.dim()) if keepdim else out


@sum.register_fake
def _(self, dim=None, keepdim=False, *, dtype=None):
    if dim:
        return aten.sum.dim_IntList(self, dim, keepdim, dtype=dtype)
    out = aten.sum.default(self, dtype=dtype)
    return out.view([1] * self.dim()) if keepdim else out


def _sum_setup(ctx, inputs, keyword_only_inputs, output):
    self, dim, keepdim = inputs[0], inputs[1], inputs[2]
    ctx.shape, ctx.dtype = self.shape, self.dtype
    nd = self.dim()
    ctx.dims = sorted(d % nd for d in dim) if dim and nd else list(range(nd))
    ctx.keepdim = keepdim


def _sum_backward(ctx, grad):
    if not ctx.keepdim:
        for d in ctx.dims:
            grad = grad.unsqueeze(d)
    return grad.expand(ctx.shape).to(ctx.dtype), None, None


sum.register_autograd(_sum_backward, setup_context=_sum_setup)


# The ops in the registry's table of flag_gems ops (no pass emits them: called directly).
for _name, _kernel in (("mm", "flag_gems.matmul"), ("bmm", "flag_gems.matmul"), ("cat", "flag_gems.indexing.cat"),
                       ("sum", "flag_gems.reduction.sum")):
    register_fused(f"flag_gems::{_name}", kernel=_kernel)
