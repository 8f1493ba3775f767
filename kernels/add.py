"""Broadcasting elementwise add, ``out = a + b``, for the ``add_tensor`` op.

Inputs are broadcast to the output shape by strides (stride 0 on broadcast dims), the
dims are coalesced, and the kernel walks the contiguous output with up to 4 strided
input dims. Same-shape contiguous inputs take a flat path with no index arithmetic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check_same_device, check_tensor, device_guard

__all__ = ["add", "add_unsupported_reason"]

MAX_DIMS = 4
BLOCK = 1024


@triton.jit
def _add_kernel(
    a_ptr,  # strided [s0, s1, s2, s3] view of a
    b_ptr,  # strided [s0, s1, s2, s3] view of b
    out_ptr,  # contiguous output, n elements
    n,
    s1, s2, s3,  # sizes of dims 1..3 (dim 0 is implied by n)
    stride_a0, stride_a1, stride_a2, stride_a3,
    stride_b0, stride_b1, stride_b2, stride_b3,
    FLAT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if FLAT:
        a_off = offs
        b_off = offs
    else:
        i3 = offs % s3
        rest = offs // s3
        i2 = rest % s2
        rest = rest // s2
        i1 = rest % s1
        i0 = rest // s1
        a_off = i0 * stride_a0 + i1 * stride_a1 + i2 * stride_a2 + i3 * stride_a3
        b_off = i0 * stride_b0 + i1 * stride_b1 + i2 * stride_b2 + i3 * stride_b3
    a = tl.load(a_ptr + a_off, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + b_off, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (a + b).to(out_ptr.dtype.element_ty), mask=mask)


def _coalesce(shape, *strides):
    """Merge adjacent dims that are contiguous with each other in every stride list."""
    dims = [(s, [st[i] for st in strides]) for i, s in enumerate(shape) if s != 1]
    if not dims:
        return [1], [[0] for _ in strides]
    out = [dims[-1]]
    for size, st in reversed(dims[:-1]):
        osize, ost = out[-1]
        if all(st[k] == ost[k] * osize for k in range(len(strides))):
            out[-1] = (size * osize, ost)
        else:
            out.append((size, st))
    out.reverse()
    return [s for s, _ in out], [[st[k] for _, st in out] for k in range(len(strides))]


def add_unsupported_reason(a, b) -> str | None:
    """Why :func:`add` cannot take these inputs (None when it can). Callers fall back to torch."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return "both operands must be tensors"
    dtype = torch.result_type(a, b)
    if dtype not in FLOAT_DTYPES or a.dtype not in FLOAT_DTYPES or b.dtype not in FLOAT_DTYPES:
        return f"dtypes {a.dtype}, {b.dtype} (kernels take fp16/bf16/fp32)"
    if a.device != b.device:
        return f"operands on {a.device} and {b.device}"
    try:
        check_tensor("a", a)
    except NotImplementedError as e:
        return str(e)
    try:
        shape = torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        return None  # the launcher raises the shape error
    sizes, _ = _coalesce(shape, a.expand(shape).stride(), b.expand(shape).stride())
    if len(sizes) > MAX_DIMS:
        return f"{len(sizes)} non-coalescable dims (at most {MAX_DIMS})"
    return None


def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b`` with broadcasting and type promotion among fp16/bf16/fp32.

    Args:
        a, b: float tensors on one device, broadcastable.

    Returns:
        A new contiguous tensor of the broadcast shape and promoted dtype.

    Raises:
        TypeError: non-float dtypes. ValueError: shapes that do not broadcast, or tensors
        on different devices. NotImplementedError: an unsupported device or layout.
    """
    check_tensor("self", a)
    check_tensor("other", b)
    check_same_device(self=a, other=b)
    try:
        shape = torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError as e:
        raise ValueError(f"other: shape {list(b.shape)} does not broadcast with self {list(a.shape)}") from e
    out = torch.empty(shape, dtype=torch.result_type(a, b), device=a.device)
    n = out.numel()
    if n == 0:
        return out
    flat = a.shape == b.shape and a.is_contiguous() and b.is_contiguous()
    if flat:
        sizes, (sa, sb) = [n], ([1], [1])
    else:
        sizes, (sa, sb) = _coalesce(shape, a.expand(shape).stride(), b.expand(shape).stride())
        if len(sizes) > MAX_DIMS:
            raise NotImplementedError(f"add: {len(sizes)} non-coalescable dims; at most {MAX_DIMS} are supported")
    pad = MAX_DIMS - len(sizes)
    sizes = [1] * pad + sizes
    sa = [0] * pad + sa
    sb = [0] * pad + sb
    with device_guard(out):
        _add_kernel[((n + BLOCK - 1) // BLOCK,)](
            a, b, out, n, sizes[1], sizes[2], sizes[3], *sa, *sb, FLAT=flat, BLOCK=BLOCK, num_warps=4
        )
    return out
