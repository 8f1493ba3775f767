"""``nonzero``: the indices of the non-zero elements, row-major, as ``[count, ndim]`` int64.

Two launches around one device sync, as torch's own (the output size is data-dependent):

1. ``_nonzero_count_kernel``: each program counts the non-zeros of its ``BLOCK`` elements;
2. the host takes the inclusive prefix sum of the counts (``torch.cumsum``) and reads its last
   value (the sync) to allocate the output;
3. ``_nonzero_write_kernel``: each program ranks its non-zeros (a prefix sum within the block),
   places them after the earlier blocks' (``end - count`` of its block) and writes each one's
   index, unravelled over up to ``MAX_DIMS`` dims, one column per dim.

The input is read contiguous (a non-contiguous one is copied first). Any dtype with a zero:
float, integer, bool. Offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, check_tensor, device_guard, interpreter_mode, next_pow2
from ._launch import jit

__all__ = ["DTYPES", "MAX_DIMS", "block_size", "nonzero"]

MAX_DIMS = 8  # size arguments of the write kernel
DTYPES = (
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
)


@jit
def _nonzero_count_kernel(
    x_ptr,  # [n] contiguous input
    counts_ptr,  # [n_blocks] int64: non-zeros per block
    n,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0)
    tl.store(counts_ptr + pid, tl.sum((x != 0).to(tl.int64), axis=0))


@triton.jit
def _put(out_ptr, row, flag, rest, size, D: tl.constexpr, NDIM: tl.constexpr):
    # Column D of the flagged rows: the index along dim D; returns the index over dims < D.
    tl.store(out_ptr + row * NDIM + D, rest % size, mask=flag)
    return rest // size


@jit
def _nonzero_write_kernel(
    x_ptr,  # [n] contiguous input
    counts_ptr,  # [n_blocks] int64 non-zeros per block
    ends_ptr,  # [n_blocks] int64 inclusive prefix sum of counts
    out_ptr,  # [total, NDIM] int64 indices
    n,
    size0, size1, size2, size3, size4, size5, size6, size7,  # dims of x (1 past NDIM)
    NDIM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0)
    flag = (x != 0) & mask
    # Row of each non-zero: the earlier blocks' count, then its rank within this block.
    start = tl.load(ends_ptr + pid) - tl.load(counts_ptr + pid)
    row = start + tl.cumsum(flag.to(tl.int64), axis=0) - 1
    rest = offs
    # Unravel, innermost dim first (dims past NDIM are not there).
    if NDIM > 7:
        rest = _put(out_ptr, row, flag, rest, size7, 7, NDIM)
    if NDIM > 6:
        rest = _put(out_ptr, row, flag, rest, size6, 6, NDIM)
    if NDIM > 5:
        rest = _put(out_ptr, row, flag, rest, size5, 5, NDIM)
    if NDIM > 4:
        rest = _put(out_ptr, row, flag, rest, size4, 4, NDIM)
    if NDIM > 3:
        rest = _put(out_ptr, row, flag, rest, size3, 3, NDIM)
    if NDIM > 2:
        rest = _put(out_ptr, row, flag, rest, size2, 2, NDIM)
    if NDIM > 1:
        rest = _put(out_ptr, row, flag, rest, size1, 1, NDIM)
    tl.store(out_ptr + row * NDIM, rest, mask=flag)


def block_size(n: int, on_gpu: bool) -> int:
    """Elements per program: 1024 on a GPU (the pointwise generator's block, one compile for
    every size); under the interpreter up to 4096 (each program is a Python round trip).
    The C++ wrapper (csrc/ops.cpp) uses the same rule."""
    if on_gpu:
        return 1024
    return max(16, min(4096, next_pow2(n)))


def nonzero(x: torch.Tensor) -> torch.Tensor:
    """``torch.nonzero(x)``: ``[count, x.dim()]`` int64 indices of the non-zero elements, row-major.

    Args:
        x: a tensor of at most ``MAX_DIMS`` dims and fewer than 2**31 elements, any strides.

    Returns:
        A new contiguous int64 tensor on x's device.

    Raises:
        TypeError: not a tensor, or an unsupported dtype.
        ValueError: more than ``MAX_DIMS`` dims or too many elements.
        NotImplementedError: a device the kernels cannot run on.
    """
    check_tensor("x", x, DTYPES)
    if x.dim() > MAX_DIMS:
        raise ValueError(f"x: at most {MAX_DIMS} dims, got {x.dim()}")
    if x.numel() >= 2**31:
        raise ValueError(f"x: fewer than 2**31 elements expected, got {x.numel()}")
    n, nd = x.numel(), x.dim()
    if n == 0:
        return torch.empty((0, nd), dtype=torch.int64, device=x.device)
    x = x.contiguous()
    block = block_size(n, x.device.type == "cuda" and not interpreter_mode())
    n_blocks = cdiv(n, block)
    counts = torch.empty(n_blocks, dtype=torch.int64, device=x.device)
    with device_guard(x):
        _nonzero_count_kernel[(n_blocks,)](x, counts, n, BLOCK=block, num_warps=4)
    ends = torch.cumsum(counts, 0)
    total = int(ends[-1].item())  # the device sync
    out = torch.empty((total, nd), dtype=torch.int64, device=x.device)
    if total == 0 or nd == 0:
        return out
    sizes = list(x.shape) + [1] * (MAX_DIMS - nd)
    with device_guard(x):
        _nonzero_write_kernel[(n_blocks,)](x, counts, ends, out, n, *sizes, NDIM=nd, BLOCK=block, num_warps=4)
    return out
