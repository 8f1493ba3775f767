"""Triton GEMM for ``mm``, ``bmm`` and ``addmm``: ``out[b] = beta * bias + alpha * (a[b] @ b[b])``.

One kernel: a 2-D tile of the output per program (programs grouped along M so that
neighbours share ``b``'s column panel in L2), the batch on grid axis 1, fp32 accumulation,
one rounding at the store, any strides (int64 offsets), masks on every edge so any M, N, K
works (K = 0 gives ``beta * bias``, or zeros). fp32 inputs follow
``torch.get_float32_matmul_precision()`` as cuBLAS does: "highest" is IEEE fp32 (torch's
default), anything else TF32.

Tiles are a fixed table by M (no autotuning: the first call on a new shape only compiles
when the dtype or tile changes, never tries configurations). Under Triton's interpreter the
operands are upcast to fp32 before ``tl.dot`` (its numpy path has no bf16 arithmetic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, cdiv, check_same_device, check_tensor, device_guard, interpreter_mode
from ._launch import jit

__all__ = ["matmul", "tile_config"]

MAX_BATCH = 65535  # grid axis 1


@jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr,
    M, N, K,
    stride_ab, stride_am, stride_ak,
    stride_bb, stride_bk, stride_bn,
    stride_cb, stride_cm, stride_cn,
    stride_xb, stride_xm, stride_xn,  # bias strides (0 where it broadcasts)
    alpha, beta,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row tiles walk the column tiles together.
    per_group = GROUP_M * n_n
    group = pid // per_group
    first_m = group * GROUP_M
    rows_in_group = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group

    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + batch * stride_ab + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + batch * stride_bb + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_left = K - k0
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & (rn[None, :] < N), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    mask = (rm[:, None] < M) & (rn[None, :] < N)
    acc = acc * alpha
    if HAS_BIAS:
        x = tl.load(bias_ptr + batch * stride_xb + rm[:, None] * stride_xm + rn[None, :] * stride_xn,
                    mask=mask, other=0.0).to(tl.float32)
        acc += beta * x
    c_ptrs = c_ptr + batch * stride_cb + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


def tile_config(m: int, elem_bytes: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for ``m`` output rows.

    Decode-sized M gets short, wide tiles with a long K step; large M the usual 128x128
    tensor-core tile. fp32 halves BLOCK_K (shared memory per stage). The interpreter takes
    32x32x32 tiles: numpy handles a block at once, each program is a Python round trip.
    """
    if interpreter_mode():
        return 32, 32, 32, 1, 1
    if m <= 16:
        bm, bn, bk, warps, stages = 16, 64, 128, 4, 4
    elif m <= 64:
        bm, bn, bk, warps, stages = 64, 64, 64, 4, 4
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    if elem_bytes == 4:
        bk //= 2
    return bm, bn, bk, warps, stages


def check_matmul_args(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Validate ``a [.., M, K] @ b [.., K, N] (+ bias)`` for :func:`matmul`.

    Raises:
        TypeError: not tensors, or dtypes other than one shared fp16/bf16/fp32.
        ValueError: ranks, inner sizes, batch sizes or a bias that does not broadcast.
        NotImplementedError: devices the kernel does not run on, batch above 65535.
    """
    check_tensor("a", a, FLOAT_DTYPES)
    check_tensor("b", b, FLOAT_DTYPES)
    if a.dtype != b.dtype:
        raise TypeError(f"b: expected dtype {a.dtype} (a's), got {b.dtype}")
    if a.dim() not in (2, 3) or b.dim() != a.dim():
        raise ValueError(f"a, b: expected two 2-D or two 3-D tensors, got {a.dim()}-D and {b.dim()}-D")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"b: expected {a.shape[-1]} rows (a's columns), got shape {list(b.shape)}")
    if a.dim() == 3:
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"b: expected batch {a.shape[0]} (a's), got {b.shape[0]}")
        if a.shape[0] > MAX_BATCH:
            raise NotImplementedError(f"a: batch {a.shape[0]} above {MAX_BATCH}")
    check_same_device(a=a, b=b, bias=bias)
    if bias is not None:
        check_tensor("bias", bias, FLOAT_DTYPES)
        if bias.dtype != a.dtype:
            raise TypeError(f"bias: expected dtype {a.dtype} (a's), got {bias.dtype}")
        out_shape = (a.shape[-2], b.shape[-1])
        try:
            torch.broadcast_shapes(bias.shape, out_shape)
        except RuntimeError:
            raise ValueError(f"bias: shape {list(bias.shape)} does not broadcast to {list(out_shape)}") from None
        if bias.dim() > 2:
            raise ValueError(f"bias: expected at most 2 dims, got {bias.dim()}")


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, *, beta=1, alpha=1,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """``beta * bias + alpha * (a @ b)`` for 2-D (mm/addmm) or 3-D (bmm) operands.

    Args:
        a: ``[M, K]`` or ``[B, M, K]``, fp16/bf16/fp32, any strides.
        b: ``[K, N]`` or ``[B, K, N]``, a's dtype.
        bias: None, or broadcastable to ``[M, N]`` (2-D case), a's dtype. Ignored when
            ``beta == 0`` (as torch: NaN in it does not propagate).
        beta, alpha: scalars.
        out: where to write (a's dtype, ``[.., M, N]``); a new contiguous tensor when None.

    Returns:
        The product, a's dtype.

    Raises:
        TypeError / ValueError / NotImplementedError: see :func:`check_matmul_args`.
    """
    check_matmul_args(a, b, bias)
    batched = a.dim() == 3
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    shape = (a.shape[0], m, n) if batched else (m, n)
    if out is None:
        out = torch.empty(shape, dtype=a.dtype, device=a.device)
    elif tuple(out.shape) != shape or out.dtype != a.dtype:
        raise ValueError(f"out: expected shape {list(shape)} and dtype {a.dtype}, got {list(out.shape)} {out.dtype}")
    if out.numel() == 0:
        return out
    has_bias = bias is not None and beta != 0
    if has_bias:
        bias_v = bias.expand(m, n)
        xs = (0, bias_v.stride(0), bias_v.stride(1))
    else:
        bias_v, xs = out, (0, 0, 0)
    a3 = a if batched else a.unsqueeze(0)
    b3 = b if batched else b.unsqueeze(0)
    c3 = out if batched else out.unsqueeze(0)
    bm, bn, bk, warps, stages = tile_config(m, a.element_size())
    precision = "tf32"
    if a.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        precision = "ieee"
    interp = interpreter_mode()
    if interp:
        precision = "ieee"
    grid = (cdiv(m, bm) * cdiv(n, bn), a3.shape[0])
    with device_guard(a):
        _matmul_kernel[grid](
            a3, b3, c3, bias_v,
            m, n, k,
            *a3.stride(), *b3.stride(), *c3.stride(), *xs,
            float(alpha), float(beta),
            HAS_BIAS=has_bias,
            UPCAST=interp,
            PRECISION=precision,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
            num_warps=warps, num_stages=stages,
        )
    return out
