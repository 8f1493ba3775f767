"""LayerNorm over the last dim of ``[n_rows, n_cols]`` rows, forward and backward.

Forward, per row ``x`` of ``n_cols`` elements (fp32 arithmetic)::

    mean = sum(x) / n_cols
    rstd = rsqrt(sum((x - mean)^2) / n_cols + eps)
    y = (x - mean) * rstd * w + b          (w, b optional)

``mean`` and ``rstd`` are stored (one per row, in the stats dtype the caller picks) for
the backward. Backward, with ``xhat = (x - mean) * rstd`` and ``g = dy * w``::

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
    dw = sum over rows of dy * xhat
    db = sum over rows of dy

Rows: a row of up to MAX_FUSED_BLOCK elements is held in registers (one read of each
input); a longer row is walked in chunks (forward: three passes, the variance taken
about the mean for accuracy; backward: two). dw/db are per-program fp32 partials
(grid-stride over rows) summed on the host side, as in ``kernels/rms_norm.py``.
Inputs are contiguous ``[n_rows, n_cols]`` (the caller flattens the normalized dims).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _autotune as at
from ._common import (
    MAX_FUSED_BLOCK,
    check_same_device,
    check_tensor,
    device_guard,
    num_sms,
    row_config,
)
from ._launch import jit

__all__ = ["layer_norm_fwd", "layer_norm_bwd", "check_layer_norm_args"]


@jit
def _layer_norm_fwd_kernel(
    x_ptr,  # [n_rows, n_cols] input, contiguous
    w_ptr,  # [n_cols] weight (unused without HAS_WEIGHT)
    b_ptr,  # [n_cols] bias (unused without HAS_BIAS)
    y_ptr,  # [n_rows, n_cols] output, contiguous
    mean_ptr,  # [n_rows] row means (stats dtype)
    rstd_ptr,  # [n_rows] row reciprocal standard deviations (stats dtype)
    n_cols,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_PASS: tl.constexpr,
):
    # Float scalars to fp32 once: Triton's launcher passes Python floats as fp32, Inductor's wrapper
    # as fp64 (the math would turn fp64); so both launchers compile this kernel alike.
    eps = tl.cast(eps, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * n_cols
    y_row = y_ptr + row * n_cols
    cols = tl.arange(0, BLOCK_N)

    if ONE_PASS:
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / n_cols
        xc = tl.where(mask, x - mean, 0.0)
        rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
        y = xc * rstd
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            c = start + cols
            acc += tl.load(x_row + c, mask=c < n_cols, other=0.0).to(tl.float32)
        mean = tl.sum(acc, axis=0) / n_cols
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            c = start + cols
            mask = c < n_cols
            x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
            xc = tl.where(mask, x - mean, 0.0)
            acc += xc * xc
        rstd = tl.math.rsqrt(tl.sum(acc, axis=0) / n_cols + eps)
        for start in range(0, n_cols, BLOCK_N):
            c = start + cols
            mask = c < n_cols
            x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean) * rstd
            if HAS_WEIGHT:
                y = y * tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y = y + tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + c, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean.to(mean_ptr.dtype.element_ty))
    tl.store(rstd_ptr + row, rstd.to(rstd_ptr.dtype.element_ty))


@jit
def _layer_norm_bwd_kernel(
    dy_ptr,  # [n_rows, n_cols] gradient of y, contiguous
    x_ptr,  # [n_rows, n_cols] forward input, contiguous
    mean_ptr,  # [n_rows] saved means
    rstd_ptr,  # [n_rows] saved reciprocal standard deviations
    w_ptr,  # [n_cols] weight (unused without HAS_WEIGHT)
    dx_ptr,  # [n_rows, n_cols] input gradient (unused without COMPUTE_DX)
    dw_ptr,  # [n_programs, n_cols] fp32 partial weight gradients (unused without COMPUTE_DW)
    db_ptr,  # [n_programs, n_cols] fp32 partial bias gradients (unused without COMPUTE_DB)
    n_rows,
    n_cols,
    HAS_WEIGHT: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_PASS: tl.constexpr,
):
    # Grid-stride over rows: each program keeps one fp32 partial of dw and db.
    pid = tl.program_id(0).to(tl.int64)
    n_progs = tl.num_programs(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    dw_row = dw_ptr + pid * n_cols
    db_row = db_ptr + pid * n_cols
    if ONE_PASS:
        mask = cols < n_cols
        if HAS_WEIGHT:
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for row in range(pid, n_rows, n_progs):
            x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + row).to(tl.float32)
            rstd = tl.load(rstd_ptr + row).to(tl.float32)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            if COMPUTE_DW:
                dw_acc += dy * xhat
            if COMPUTE_DB:
                db_acc += dy
            if COMPUTE_DX:
                g = dy
                if HAS_WEIGHT:
                    g = dy * w
                mean_g = tl.sum(g, axis=0) / n_cols
                mean_gx = tl.sum(g * xhat, axis=0) / n_cols
                dx = rstd * (g - mean_g - xhat * mean_gx)
                tl.store(dx_ptr + row * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            tl.store(dw_row + cols, dw_acc, mask=mask)
        if COMPUTE_DB:
            tl.store(db_row + cols, db_acc, mask=mask)
    else:
        # Long rows: the partials accumulate in global memory (each program owns its
        # partial rows, so there is no race).
        for start in range(0, n_cols, BLOCK_N):
            c = start + cols
            if COMPUTE_DW:
                tl.store(dw_row + c, tl.zeros([BLOCK_N], dtype=tl.float32), mask=c < n_cols)
            if COMPUTE_DB:
                tl.store(db_row + c, tl.zeros([BLOCK_N], dtype=tl.float32), mask=c < n_cols)
        for row in range(pid, n_rows, n_progs):
            x_row = x_ptr + row * n_cols
            dy_row = dy_ptr + row * n_cols
            mean = tl.load(mean_ptr + row).to(tl.float32)
            rstd = tl.load(rstd_ptr + row).to(tl.float32)
            sum_g = tl.zeros([BLOCK_N], dtype=tl.float32)
            sum_gx = tl.zeros([BLOCK_N], dtype=tl.float32)
            if COMPUTE_DX:
                for start in range(0, n_cols, BLOCK_N):
                    c = start + cols
                    mask = c < n_cols
                    x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
                    g = tl.load(dy_row + c, mask=mask, other=0.0).to(tl.float32)
                    if HAS_WEIGHT:
                        g = g * tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
                    sum_g += g
                    sum_gx += g * tl.where(mask, (x - mean) * rstd, 0.0)
            mean_g = tl.sum(sum_g, axis=0) / n_cols
            mean_gx = tl.sum(sum_gx, axis=0) / n_cols
            for start in range(0, n_cols, BLOCK_N):
                c = start + cols
                mask = c < n_cols
                x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_row + c, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                if COMPUTE_DW:
                    part = tl.load(dw_row + c, mask=mask, other=0.0)
                    tl.store(dw_row + c, part + dy * xhat, mask=mask)
                if COMPUTE_DB:
                    part = tl.load(db_row + c, mask=mask, other=0.0)
                    tl.store(db_row + c, part + dy, mask=mask)
                if COMPUTE_DX:
                    g = dy
                    if HAS_WEIGHT:
                        g = dy * tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
                    dx = rstd * (g - mean_g - xhat * mean_gx)
                    tl.store(dx_ptr + row * n_cols + c, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def check_layer_norm_args(x, weight, bias):
    """Validate LayerNorm row arguments.

    Args:
        x: ``[n_rows, n_cols]`` contiguous fp16/bf16/fp32 tensor with ``n_cols > 0``.
        weight, bias: ``[n_cols]`` contiguous fp16/bf16/fp32 tensors, or None.

    Raises:
        TypeError: a dtype the kernels do not take.
        ValueError: wrong rank, shape, layout, or devices that differ.
    """
    check_tensor("x", x)
    if x.dim() != 2:
        raise ValueError(f"x: expected 2 dims [n_rows, n_cols], got {x.dim()}")
    if not x.is_contiguous():
        raise ValueError("x: expected a contiguous tensor")
    n_cols = x.shape[1]
    if n_cols == 0:
        raise ValueError("x: expected a positive row length (n_cols > 0)")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        check_tensor(name, p)
        if p.dim() != 1 or p.shape[0] != n_cols:
            raise ValueError(f"{name}: expected shape [{n_cols}] (x's row length), got {list(p.shape)}")
        if not p.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor")
    check_same_device(x=x, weight=weight, bias=bias)


def layer_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    stats_dtype: torch.dtype = torch.float32,
):
    """LayerNorm of each row of ``x``.

    Args:
        x: ``[n_rows, n_cols]`` contiguous fp16/bf16/fp32 (``n_rows`` may be 0).
        weight: ``[n_cols]`` or None (any of the float dtypes; read in fp32).
        bias: ``[n_cols]`` or None.
        eps: added to the variance.
        stats_dtype: dtype of the returned mean and rstd.

    Returns:
        ``(y, mean, rstd)``: y ``[n_rows, n_cols]`` in x's dtype; mean and rstd ``[n_rows]``.

    Raises:
        TypeError / ValueError: see :func:`check_layer_norm_args`.
    """
    check_layer_norm_args(x, weight, bias)
    n_rows, n_cols = x.shape
    y = torch.empty_like(x)
    mean = torch.empty((n_rows,), dtype=stats_dtype, device=x.device)
    rstd = torch.empty((n_rows,), dtype=stats_dtype, device=x.device)
    if n_rows == 0:
        return y, mean, rstd
    key = tune_key(n_rows, n_cols, x.dtype)
    dev = x.get_device()
    cfg = TUNABLE.chosen.get((dev, key))
    block, warps = cfg if cfg is not None else TUNABLE.resolve(key, dev, {"n_rows": n_rows})
    with device_guard(x):
        _layer_norm_fwd_kernel[(n_rows,)](
            x, weight if weight is not None else x, bias if bias is not None else x, y, mean, rstd,
            n_cols, eps,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            BLOCK_N=block,
            ONE_PASS=n_cols <= MAX_FUSED_BLOCK,
            num_warps=warps,
        )
    return y, mean, rstd


def layer_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    *,
    compute_dx: bool = True,
    compute_dw: bool = True,
    compute_db: bool = True,
    param_dtype: torch.dtype | None = None,
):
    """Gradients of :func:`layer_norm_fwd` from the saved mean and rstd.

    Args:
        dy: gradient of y, x's shape, contiguous (any float dtype).
        x: the forward's ``[n_rows, n_cols]`` contiguous input.
        mean, rstd: the forward's ``[n_rows]`` statistics (contiguous).
        weight: the forward's weight, or None (then ``g = dy``).
        compute_dx, compute_dw, compute_db: which gradients to produce.
        param_dtype: dtype of dw and db (default: weight's dtype, else x's).

    Returns:
        ``(dx, dw, db)``, each None when not asked for; dx in x's dtype, dw/db ``[n_cols]``.

    Raises:
        TypeError / ValueError: bad dtypes, shapes or layouts.
    """
    check_layer_norm_args(x, weight, None)
    check_tensor("dy", dy)
    n_rows, n_cols = x.shape
    if dy.shape != x.shape or not dy.is_contiguous():
        raise ValueError(f"dy: expected a contiguous tensor of shape {list(x.shape)}, got {list(dy.shape)}")
    for name, s in (("mean", mean), ("rstd", rstd)):
        check_tensor(name, s)
        if s.numel() != n_rows or not s.is_contiguous():
            raise ValueError(f"{name}: expected {n_rows} contiguous values (one per row), got shape {list(s.shape)}")
    check_same_device(dy=dy, x=x, mean=mean, rstd=rstd)
    if param_dtype is None:
        param_dtype = weight.dtype if weight is not None else x.dtype
    dx = torch.empty_like(x) if compute_dx else None
    if n_rows == 0 or not (compute_dx or compute_dw or compute_db):
        zeros = torch.zeros((n_cols,), dtype=param_dtype, device=x.device)
        return dx, (zeros if compute_dw else None), (zeros.clone() if compute_db else None)
    block, warps = row_config(n_cols, x.element_size())
    n_progs = max(1, min(n_rows, num_sms(x.device) * 2))
    dw_part = torch.empty((n_progs, n_cols), dtype=torch.float32, device=x.device) if compute_dw else x
    db_part = torch.empty((n_progs, n_cols), dtype=torch.float32, device=x.device) if compute_db else x
    with device_guard(x):
        _layer_norm_bwd_kernel[(n_progs,)](
            dy, x, mean, rstd, weight if weight is not None else x, dx if dx is not None else x, dw_part, db_part,
            n_rows, n_cols,
            HAS_WEIGHT=weight is not None,
            COMPUTE_DX=compute_dx,
            COMPUTE_DW=compute_dw,
            COMPUTE_DB=compute_db,
            BLOCK_N=block,
            ONE_PASS=n_cols <= MAX_FUSED_BLOCK,
            num_warps=warps,
        )
    dw = dw_part.sum(0).to(param_dtype) if compute_dw else None
    db = db_part.sum(0).to(param_dtype) if compute_db else None
    return dx, dw, db


# ---------------------------------------------------------------------------
# Autotuning (kernels/_autotune.py): the forward's warps (and chunk) per device kind
# ---------------------------------------------------------------------------

_ROWS_BUCKET_CAP = 1 << 16


def tune_key(n_rows: int, n_cols: int, dtype: torch.dtype) -> tuple:
    """The forward's autotuning key: (rows bucket, n_cols, dtype)."""
    return (at.pow2_bucket(n_rows, _ROWS_BUCKET_CAP), n_cols, dtype)


def _tune_default(key, dev) -> dict:
    block, warps = row_config(key[1], key[2].itemsize)
    return {"BLOCK_N": block, "num_warps": warps}


def _tune_candidates(key, dev) -> list:
    return at.row_candidates(_tune_default(key, dev), key[1], MAX_FUSED_BLOCK, dev)


def _tune_bench(key, dev, dims):
    """LayerNorm of ``[rows, n_cols]`` with weight and bias."""
    rows, n_cols, dtype = key
    rows = (dims or {}).get("n_rows", rows)
    device = at.torch_device(dev)
    x = torch.randn(rows, n_cols, device=device, dtype=dtype)
    w, b = torch.randn(n_cols, device=device, dtype=dtype), torch.randn(n_cols, device=device, dtype=dtype)
    return lambda: layer_norm_fwd(x, w, b, 1e-5)


TUNABLE = at.register(at.Tunable(
    "layer_norm",
    fields=("BLOCK_N", "num_warps"),
    key_fields=("rows_bucket", "n_cols", "dtype"),
    default=_tune_default,
    candidates=_tune_candidates,
    make_bench=_tune_bench,
    sources=(_layer_norm_fwd_kernel,),
    nearest_bucket=True,
))
