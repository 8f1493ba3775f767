"""``torch.ops.flag_gems.linear_group``: several linears of one input as one GEMM.

``linear_group(x, [w_0 .. w_n], [b_0 .. b_n])`` is ``cat([linear(x, w_i, b_i)], dim=-1)``:
the q/k/v projections of an attention block, or the gate/up projections of a gated MLP, all
reading the same ``x``. When the weights lie back to back in one buffer (row blocks of one
``[sum N_i, K]`` matrix, as ``passes.linear_group`` puts them with ``options={"fuse_linear":
True}``), the op is one ``F.linear`` over that matrix: one cuBLAS GEMM instead of ``n``, which
at decode sizes (a few rows, weight-read bound) replaces the small, badly-occupied k/v GEMMs
and their split-K reductions. Otherwise it runs the ``n`` GEMMs, each writing its column block
of the output, so the op is correct for any weights (ones a user re-assigned after compiling,
say), at the unfused speed.

Numerics are those of ``F.linear``: each output column is the same dot product either way
(cuBLAS may pick another kernel for the larger ``N``; fp32 accumulation in both).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import register_fused

__all__ = ["check_linear_group_args", "linear_group", "stacked_rows"]


def check_linear_group_args(x: Tensor, weights: list[Tensor], biases: list[Tensor]) -> int:
    """Validate the operands; returns the total output features ``sum N_i``.

    Raises:
        ValueError: no weights, a weight that is not ``[N_i, K]`` with ``K = x.shape[-1]``, or
            biases that are neither empty nor one ``[N_i]`` per weight.
        TypeError: operands of different dtypes.
    """
    if not weights:
        raise ValueError("weights: expected at least one [N, K] weight, got none")
    k = x.shape[-1]
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != k:
            raise ValueError(f"weights[{i}]: expected [N, {k}] (K = x.shape[-1]), got {list(w.shape)}")
        if w.dtype != x.dtype:
            raise TypeError(f"weights[{i}]: expected x's dtype {x.dtype}, got {w.dtype}")
    if biases:
        if len(biases) != len(weights):
            raise ValueError(f"biases: expected none or one per weight ({len(weights)}), got {len(biases)}")
        for i, (b, w) in enumerate(zip(biases, weights)):
            if b.shape != (w.shape[0],):
                raise ValueError(f"biases[{i}]: expected [{w.shape[0]}], got {list(b.shape)}")
            if b.dtype != x.dtype:
                raise TypeError(f"biases[{i}]: expected x's dtype {x.dtype}, got {b.dtype}")
    return sum(w.shape[0] for w in weights)


def stacked_rows(parts: list[Tensor]) -> Tensor | None:
    """``cat(parts)`` as a view when the parts already lie back to back in one storage, else None.

    Each part must be contiguous, of one dtype and device, with the same trailing shape, and
    start where the previous one ends (same storage). The view covers exactly the parts'
    memory, so it is ``cat(parts)`` without a copy.
    """
    first = parts[0]
    if not first.is_contiguous():
        return None
    storage = first.untyped_storage().data_ptr()
    tail = first.shape[1:]
    nbytes = first.element_size()
    end = first.data_ptr() + first.numel() * nbytes
    rows = first.shape[0]
    for p in parts[1:]:
        if (p.shape[1:] != tail or p.dtype != first.dtype or p.device != first.device or not p.is_contiguous()
                or p.data_ptr() != end or p.untyped_storage().data_ptr() != storage):
            return None
        end += p.numel() * nbytes
        rows += p.shape[0]
    size = (rows, *tail)
    strides, step = [], 1
    for d in reversed(size):
        strides.append(step)
        step *= d
    return first.as_strided(size, strides[::-1])


# The stacked view of a weight group, by the group's first weight (dies with it): each call
# checks only that every weight still has the data pointer and shape it had when the view was
# made (``param.data = ...`` changes them), instead of re-checking the storage layout, which
# cost tens of µs a call on the H200's host (benchmarks/NOTES.md, session 8).
_STACKED: dict[int, tuple] = {}  # id(first weight) -> (weakref to it, layout, view)


def _layout(weights: list[Tensor]) -> tuple:
    return tuple((w.data_ptr(), w.shape) for w in weights)


def _stacked_weight(x: Tensor, weights: list[Tensor]) -> Tensor | None:
    """The ``[sum N_i, K]`` view of stacked ``weights`` (checked for ``x``), or None."""
    first = weights[0]
    entry = _STACKED.get(id(first))
    if entry is not None and entry[0]() is first:
        _, layout, view = entry
        if view.dtype == x.dtype and view.shape[1] == x.shape[-1] and layout == _layout(weights):
            return view
    check_linear_group_args(x, weights, [])
    view = stacked_rows(weights)
    if view is not None:
        # Kept as a tensor on the storage, not as a view of the first weight: a view holds its
        # base (``_base``), which would keep the parameter, and this entry, alive for ever.
        view = torch.empty((0,), dtype=view.dtype, device=view.device).set_(
            view.untyped_storage(), view.storage_offset(), view.shape, view.stride())
        key = id(first)
        _STACKED[key] = (weakref.ref(first, lambda _, key=key: _STACKED.pop(key, None)), _layout(weights), view)
    return view


@torch.library.custom_op("flag_gems::linear_group", mutates_args=())
def linear_group(x: Tensor, weights: list[Tensor], biases: list[Tensor]) -> Tensor:
    """``cat([F.linear(x, w_i, b_i) for i], dim=-1)`` in one GEMM when the weights are stacked.

    Args:
        x: ``[*, K]`` input.
        weights: ``[N_i, K]`` weights, x's dtype.
        biases: empty, or one ``[N_i]`` bias per weight.

    Returns:
        ``[*, sum N_i]``: output ``i`` in columns ``sum N_<i .. sum N_<=i``.

    Raises:
        ValueError / TypeError: see :func:`check_linear_group_args`.
    """
    if any(isinstance(t, torch._subclasses.FakeTensor) for t in (x, *weights)):
        # A fake run (precompile's recording, a trace): shapes only; fake tensors have no data
        # pointers to compare (reading them warns).
        return x.new_empty((*x.shape[:-1], check_linear_group_args(x, weights, biases)))
    if not biases and weights:
        w = _stacked_weight(x, weights)  # checks the arguments unless its cache answers
        if w is not None:
            return F.linear(x, w)
        n_total = sum(wi.shape[0] for wi in weights)
    else:
        n_total = check_linear_group_args(x, weights, biases)
        w, b = stacked_rows(weights), stacked_rows(biases)
        if w is not None and b is not None:
            return F.linear(x, w, b)
    # Not stacked: one GEMM per weight, each into its column block (cuBLAS writes a block
    # with the row stride of the whole output: no copies).
    out = x.new_empty((*x.shape[:-1], n_total))
    out2, x2 = out.view(-1, n_total), x.reshape(-1, x.shape[-1])
    col = 0
    for i, wi in enumerate(weights):
        block = out2[:, col:col + wi.shape[0]]
        if biases:
            torch.addmm(biases[i], x2, wi.t(), out=block)
        else:
            torch.mm(x2, wi.t(), out=block)
        col += wi.shape[0]
    return out


@linear_group.register_fake
def _(x, weights, biases):
    n_total = check_linear_group_args(x, weights, biases)
    return x.new_empty((*x.shape[:-1], n_total))


def _setup(ctx, inputs, output):
    x, weights, biases = inputs
    ctx.save_for_backward(x, *weights)
    ctx.n_biases = len(biases)


def _backward(ctx, grad):
    x, *weights = ctx.saved_tensors
    grads = grad.split([w.shape[0] for w in weights], dim=-1)
    gx = gws = None
    gbs = [] if not ctx.n_biases else None  # the same structure as the biases argument
    if ctx.needs_input_grad[0]:
        gx = sum(g @ w for g, w in zip(grads, weights))
    if ctx.needs_input_grad[1]:
        x2 = x.reshape(-1, x.shape[-1])
        gws = [g.reshape(-1, g.shape[-1]).t() @ x2 for g in grads]
    if ctx.needs_input_grad[2] and ctx.n_biases:
        gbs = [g.reshape(-1, g.shape[-1]).sum(0) for g in grads]
    return gx, gws, gbs


linear_group.register_autograd(_backward, setup_context=_setup)

register_fused("flag_gems::linear_group", kernel="flag_gems.linear_group", fused_by="fuse_linear")
