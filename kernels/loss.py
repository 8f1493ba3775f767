"""Negative log-likelihood loss, the last step of cross-entropy: forward and backward.

For ``x`` of shape ``[n_rows, n_classes]`` (log-probabilities, ``log_softmax``'s output in
``cross_entropy``) and int64 class indices ``target`` of shape ``[n_rows]``::

    loss[i] = -x[i, target[i]]        (0 where target[i] == ignore_index)
    none:  out = loss                  [n_rows]
    sum:   out = sum(loss)             []
    mean:  out = sum(loss) / total_weight,   total_weight = rows not ignored
    backward: grad_input[i, target[i]] = -g_i, every other element 0, with
              g_i = grad_output[i] (none), grad_output (sum), grad_output / total_weight (mean)

``total_weight`` is returned in ``x``'s dtype (0 for ``none``), as torch returns it; the
backward divides by the tensor it is given, so forward and backward agree with torch's
pair even where the count rounds (bf16 above 256 rows). Sums are fp32 whatever ``x``'s
dtype; the result is rounded once at the store. A mean over no rows is ``0 / 0 = NaN``
and an empty sum 0, as torch.

Out-of-range targets (neither ``ignore_index`` nor in ``[0, n_classes)``): torch raises
(CPU ``IndexError``, CUDA a device-side assert). The launchers do not read target values
(that would be a device sync per call). The kernels never address memory outside ``x``:
such a row's loss is NaN, so a reduced loss is NaN (visible rather than silently wrong),
the row counts in ``total_weight`` as a row torch does not ignore, and the backward
leaves its gradient row zero.

Grids: the reductions run in one program that walks the rows ``BLOCK`` at a time, as torch's
CUDA kernel runs one thread block (one random read per row, a few thousand rows per
training step: latency, not bandwidth); the sum is fp32 in a fixed order, so it is
deterministic. ``none`` runs one program per ``BLOCK`` rows. The backward writes the whole
``[n_rows, n_classes]`` gradient (zeros and the one value per row) in one pass, one program
per row and column chunk: the same bytes as torch's ``zero_`` before its scatter, one
launch instead of two.
"""

from __future__ import annotations

import torch
import triton.language as tl

from ._common import FLOAT_DTYPES, cdiv, check_same_device, check_tensor, device_guard, next_pow2
from ._launch import jit

__all__ = ["REDUCTIONS", "nll_loss_backward", "nll_loss_forward"]

# torch's reduction enum (at::Reduction): none, mean, sum.
REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}
_NONE, _MEAN, _SUM = 0, 1, 2

_ROW_BLOCK = 1024  # rows per step of the forward (one int64 target and one gathered element each)
_MAX_COL_BLOCK = 4096  # columns per backward program (a vocabulary row is walked in chunks)


@jit
def _nll_fwd_kernel(
    x_ptr,  # [n_rows, n_classes] any strides
    target_ptr,  # [n_rows] int64, stride stride_t
    out_ptr,  # [n_rows] (none) or [] (mean, sum)
    total_weight_ptr,  # []: rows not ignored (0 for none)
    n_rows,
    n_classes,
    stride_x_row,
    stride_x_col,
    stride_t,
    ignore_index,
    REDUCTION: tl.constexpr,  # 0 none, 1 mean, 2 sum
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # int64 before any offset: rows * stride may pass 2^31
    offs = tl.arange(0, BLOCK)
    if REDUCTION == 0:
        rows = pid * BLOCK + offs
        in_rows = rows < n_rows
        t = tl.load(target_ptr + rows * stride_t, mask=in_rows, other=0)
        ignored = t == ignore_index
        valid = (t >= 0) & (t < n_classes) & ~ignored
        # masked: an out-of-range target is never used as an address
        x = tl.load(x_ptr + rows * stride_x_row + t * stride_x_col, mask=in_rows & valid, other=0).to(tl.float32)
        loss = tl.where(ignored, 0.0, tl.where(valid, -x, float("nan")))
        tl.store(out_ptr + rows, loss.to(out_ptr.dtype.element_ty), mask=in_rows)
        if pid == 0:
            tl.store(total_weight_ptr, tl.zeros([], dtype=tl.float32).to(total_weight_ptr.dtype.element_ty))
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        count = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_rows, BLOCK):
            rows = start + offs.to(tl.int64)
            in_rows = rows < n_rows
            t = tl.load(target_ptr + rows * stride_t, mask=in_rows, other=0)
            ignored = t == ignore_index
            valid = (t >= 0) & (t < n_classes) & ~ignored
            x = tl.load(x_ptr + rows * stride_x_row + t * stride_x_col, mask=in_rows & valid, other=0).to(tl.float32)
            counted = in_rows & ~ignored
            acc += tl.where(counted, tl.where(valid, -x, float("nan")), 0.0)
            count += tl.where(counted, 1.0, 0.0)
        total = tl.sum(acc, axis=0)
        weight = tl.sum(count, axis=0)  # exact in fp32 below 2^24 rows
        if REDUCTION == 1:
            total = total / weight  # no row counted: 0 / 0 = NaN, as torch
        tl.store(out_ptr, total.to(out_ptr.dtype.element_ty))
        tl.store(total_weight_ptr, weight.to(total_weight_ptr.dtype.element_ty))


@jit
def _nll_bwd_kernel(
    grad_out_ptr,  # [n_rows] (none, stride stride_g) or [] (mean, sum: stride_g = 0)
    target_ptr,  # [n_rows] int64, stride stride_t
    total_weight_ptr,  # [] read for mean only
    grad_in_ptr,  # [n_rows, n_classes] contiguous, every element written
    n_classes,
    stride_g,
    stride_t,
    ignore_index,
    MEAN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    t = tl.load(target_ptr + row * stride_t)
    g = tl.load(grad_out_ptr + row * stride_g).to(tl.float32)
    if MEAN:
        g = g / tl.load(total_weight_ptr).to(tl.float32)
    # ignored and out-of-range targets match no column: a zero row
    hit = (cols == t) & (t != ignore_index)
    value = tl.where(hit, -g, 0.0)
    tl.store(grad_in_ptr + row * n_classes + cols, value.to(grad_in_ptr.dtype.element_ty), mask=cols < n_classes)


def _check_target(x: torch.Tensor, target: torch.Tensor) -> None:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target: expected a torch.Tensor, got {type(target).__name__}")
    if target.dtype != torch.int64:
        raise TypeError(f"target: dtype {target.dtype} is not supported; expected int64 class indices")
    if x.dim() != 2:
        raise ValueError(f"self: expected a 2-d [n_rows, n_classes] tensor, got shape {list(x.shape)}")
    if target.dim() != 1 or target.shape[0] != x.shape[0]:
        raise ValueError(f"target: expected shape [{x.shape[0]}] (one class index per row), got {list(target.shape)}")
    check_same_device(self=x, target=target)


def _check_reduction(reduction: int) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected 0 (none), 1 (mean) or 2 (sum), got {reduction!r}")


def nll_loss_forward(x: torch.Tensor, target: torch.Tensor, reduction: int,
                     ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``aten.nll_loss_forward`` without class weights.

    Args:
        x: ``[n_rows, n_classes]`` fp16/bf16/fp32 log-probabilities, any strides.
        target: ``[n_rows]`` int64 class indices.
        reduction: 0 none, 1 mean, 2 sum (torch's enum).
        ignore_index: rows with this target contribute nothing (and do not count for the mean).

    Returns:
        ``(output, total_weight)`` in ``x``'s dtype: output ``[n_rows]`` for none, else ``[]``;
        total_weight ``[]`` (the rows not ignored; 0 for none).

    Raises:
        TypeError: a non-tensor, an unsupported dtype (x float, target int64).
        ValueError: shapes other than ``[n_rows, n_classes]`` / ``[n_rows]``, tensors on
            several devices, or a reduction outside 0..2.
        NotImplementedError: a device the kernels do not run on.
    """
    check_tensor("self", x, FLOAT_DTYPES)
    _check_target(x, target)
    _check_reduction(reduction)
    n_rows, n_classes = x.shape
    out = torch.empty((n_rows,) if reduction == _NONE else (), dtype=x.dtype, device=x.device)
    total_weight = torch.empty((), dtype=x.dtype, device=x.device)
    if reduction == _NONE:
        block = min(_ROW_BLOCK, max(16, next_pow2(n_rows)))
        grid = (max(1, cdiv(n_rows, block)),)
    else:
        block = min(_ROW_BLOCK, max(16, next_pow2(n_rows)))
        grid = (1,)
    with device_guard(x):
        _nll_fwd_kernel[grid](
            x, target, out, total_weight, n_rows, n_classes, x.stride(0), x.stride(1), target.stride(0),
            ignore_index, REDUCTION=reduction, BLOCK=block,
        )
    return out, total_weight


def nll_loss_backward(grad_output: torch.Tensor, x: torch.Tensor, target: torch.Tensor, reduction: int,
                      ignore_index: int, total_weight: torch.Tensor) -> torch.Tensor:
    """``aten.nll_loss_backward`` without class weights: the gradient with respect to ``x``.

    Args:
        grad_output: ``[n_rows]`` for none, else one element (``[]`` or ``[1]``), ``x``'s dtype.
        x: the forward's input (its shape, dtype and device only).
        target: ``[n_rows]`` int64 class indices.
        reduction: 0 none, 1 mean, 2 sum.
        ignore_index: rows with this target get a zero gradient.
        total_weight: the forward's ``total_weight`` (one element; divides for mean).

    Returns:
        ``[n_rows, n_classes]`` contiguous, ``x``'s dtype.

    Raises:
        TypeError: a non-tensor or an unsupported dtype (grad_output / total_weight must have x's).
        ValueError: mismatched shapes or devices, or a reduction outside 0..2.
        NotImplementedError: a device the kernels do not run on.
    """
    check_tensor("self", x, FLOAT_DTYPES)
    _check_target(x, target)
    _check_reduction(reduction)
    for name, t in (("grad_output", grad_output), ("total_weight", total_weight)):
        check_tensor(name, t, (x.dtype,))
    check_same_device(self=x, grad_output=grad_output, total_weight=total_weight)
    n_rows, n_classes = x.shape
    if reduction == _NONE:
        if grad_output.dim() != 1 or grad_output.shape[0] != n_rows:
            raise ValueError(f"grad_output: expected shape [{n_rows}] for reduction none, got {list(grad_output.shape)}")
        stride_g = grad_output.stride(0)
    else:
        if grad_output.dim() > 1 or grad_output.numel() != 1:
            raise ValueError(f"grad_output: expected one element for reduction {REDUCTIONS[reduction]}, "
                             f"got shape {list(grad_output.shape)}")
        stride_g = 0
    if total_weight.numel() != 1:
        raise ValueError(f"total_weight: expected one element, got shape {list(total_weight.shape)}")
    grad_input = torch.empty((n_rows, n_classes), dtype=x.dtype, device=x.device)
    if grad_input.numel() == 0:
        return grad_input
    block = min(_MAX_COL_BLOCK, max(16, next_pow2(n_classes)))
    with device_guard(x):
        _nll_bwd_kernel[(n_rows, cdiv(n_classes, block))](
            grad_output, target, total_weight, grad_input, n_classes, stride_g, target.stride(0), ignore_index,
            MEAN=reduction == _MEAN, BLOCK=block,
        )
    return grad_input
