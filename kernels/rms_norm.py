"""RMSNorm and residual-add + RMSNorm, forward and backward.

Forward, per row ``x`` of ``n_cols`` elements (fp32 arithmetic)::

    h = x + residual                       (only with a residual; h is stored, rounded)
    y = h * rsqrt(mean(h * h) + eps) * (weight_offset + w)

The norm is taken of the *rounded* ``h``, as HF transformers and vLLM's CUDA kernel
do, so the backward can recompute everything from the stored ``h``.
``weight_offset=1`` gives Gemma's ``(1 + w)`` form. ``round_before_weight`` rounds the
normalized row to the output dtype before the weight multiply, as HF Llama's
``weight * hidden.to(input_dtype)`` does.

Backward, with ``xn = h * rstd`` and ``g = dy * (weight_offset + w)``::

    dh = rstd * (g - xn * mean(xn * g)) (+ the incoming gradient of h)
    dw = sum over rows of dy * xn

Optionally (``rstd_out=``) the forward also stores each row's fp32 ``rstd``, as aten's
``_fused_rms_norm`` returns it, and the backward (``rstd=``) reads it instead of recomputing
it (aten's ``_fused_rms_norm_backward`` has no eps). Both are constexpr-gated: the other
calls compile as before.

Rows: a row of up to MAX_FUSED_BLOCK elements is held in registers (one read of each
input); a longer row is walked in chunks, twice. Token (row) dims may have any strides:
tensors are seen as ``[n_outer, n_inner, n_cols]`` with unit stride on the last dim.
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

__all__ = ["rms_norm_fwd", "rms_norm_bwd", "check_rms_norm_args"]


@jit
def _rms_norm_fwd_kernel(
    x_ptr,  # [n_outer, n_inner, n_cols] input
    r_ptr,  # [n_outer, n_inner, n_cols] residual (unused without HAS_RESIDUAL)
    w_ptr,  # [n_cols] weight (unused without HAS_WEIGHT)
    y_ptr,  # [n_outer, n_inner, n_cols] normalized output
    h_ptr,  # [n_outer, n_inner, n_cols] x + residual (unused without HAS_RESIDUAL)
    rstd_ptr,  # [n_outer * n_inner] fp32 per-row rstd (unused without HAS_RSTD)
    stride_x_o, stride_x_i,
    stride_r_o, stride_r_i,
    stride_y_o, stride_y_i,
    stride_h_o, stride_h_i,
    n_inner,
    n_cols,
    eps,
    weight_offset,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    ROUND_BEFORE_WEIGHT: tl.constexpr,
    HAS_RSTD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_PASS: tl.constexpr,
):
    # Float scalars to fp32 once: Triton's launcher passes Python floats as fp32, Inductor's wrapper
    # as fp64 (the math would turn fp64); so both launchers compile this kernel alike.
    eps = tl.cast(eps, tl.float32)
    weight_offset = tl.cast(weight_offset, tl.float32)
    pid = tl.program_id(0).to(tl.int64)
    o = pid // n_inner
    i = pid % n_inner
    x_row = x_ptr + o * stride_x_o + i * stride_x_i
    r_row = r_ptr + o * stride_r_o + i * stride_r_i
    y_row = y_ptr + o * stride_y_o + i * stride_y_i
    h_row = h_ptr + o * stride_h_o + i * stride_h_i
    cols = tl.arange(0, BLOCK_N)

    if ONE_PASS:
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(r_row + cols, mask=mask, other=0.0).to(tl.float32)
            h = (x + r).to(h_ptr.dtype.element_ty)
            tl.store(h_row + cols, h, mask=mask)
            x = h.to(tl.float32)  # normalize the rounded sum (what the backward sees)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        if HAS_RSTD:
            tl.store(rstd_ptr + pid, rstd)  # row pid = o * n_inner + i: row-major over the token dims
        xn = x * rstd
        if HAS_WEIGHT:
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if ROUND_BEFORE_WEIGHT:
                xn = xn.to(y_ptr.dtype.element_ty).to(tl.float32)
            xn = xn * (w + weight_offset)
        tl.store(y_row + cols, xn.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # Pass 1: sum of squares (and h, stored). Pass 2 reads h back, so the
        # in-place form (h written over the residual, y over x) stays correct.
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            c = start + cols
            mask = c < n_cols
            x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                r = tl.load(r_row + c, mask=mask, other=0.0).to(tl.float32)
                h = (x + r).to(h_ptr.dtype.element_ty)
                tl.store(h_row + c, h, mask=mask)
                x = h.to(tl.float32)
            acc += x * x
        rstd = tl.math.rsqrt(tl.sum(acc, axis=0) / n_cols + eps)
        if HAS_RSTD:
            tl.store(rstd_ptr + pid, rstd)
        tl.debug_barrier()
        for start in range(0, n_cols, BLOCK_N):
            c = start + cols
            mask = c < n_cols
            if HAS_RESIDUAL:
                x = tl.load(h_row + c, mask=mask, other=0.0).to(tl.float32)
            else:
                x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
            xn = x * rstd
            if HAS_WEIGHT:
                w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
                if ROUND_BEFORE_WEIGHT:
                    xn = xn.to(y_ptr.dtype.element_ty).to(tl.float32)
                xn = xn * (w + weight_offset)
            tl.store(y_row + c, xn.to(y_ptr.dtype.element_ty), mask=mask)


@jit
def _rms_norm_bwd_kernel(
    dy_ptr,  # [n_outer, n_inner, n_cols] gradient of y
    x_ptr,  # [n_outer, n_inner, n_cols] normalized input (h when there was a residual)
    w_ptr,  # [n_cols] weight (unused without HAS_WEIGHT)
    dh_ptr,  # [n_outer, n_inner, n_cols] incoming gradient of h (unused without HAS_DH)
    dx_ptr,  # [n_rows, n_cols] output gradient, contiguous
    dw_ptr,  # [n_programs, n_cols] fp32 partial weight gradients (unused without HAS_WEIGHT)
    rstd_ptr,  # [n_rows] fp32 per-row rstd of the forward (unused without HAS_RSTD: recomputed)
    stride_dy_o, stride_dy_i,
    stride_x_o, stride_x_i,
    stride_dh_o, stride_dh_i,
    n_rows,
    n_inner,
    n_cols,
    eps,
    weight_offset,
    HAS_WEIGHT: tl.constexpr,
    HAS_DH: tl.constexpr,
    ROUND_BEFORE_WEIGHT: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    HAS_RSTD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_PASS: tl.constexpr,
):
    # Float scalars to fp32 once: Triton's launcher passes Python floats as fp32, Inductor's wrapper
    # as fp64 (the math would turn fp64); so both launchers compile this kernel alike.
    eps = tl.cast(eps, tl.float32)
    weight_offset = tl.cast(weight_offset, tl.float32)
    # Grid-stride over rows: each program keeps one fp32 partial of dw.
    pid = tl.program_id(0).to(tl.int64)
    n_progs = tl.num_programs(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    dw_row = dw_ptr + pid * n_cols
    if ONE_PASS:
        mask = cols < n_cols
        if HAS_WEIGHT:
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + weight_offset
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for row in range(pid, n_rows, n_progs):
            o = row // n_inner
            i = row % n_inner
            x = tl.load(x_ptr + o * stride_x_o + i * stride_x_i + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + o * stride_dy_o + i * stride_dy_i + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_RSTD:
                rstd = tl.load(rstd_ptr + row).to(tl.float32)  # the forward's (aten's backward has no eps)
            else:
                rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
            xn = x * rstd
            g = dy
            if HAS_WEIGHT:
                g = dy * w
            if COMPUTE_DW:
                if ROUND_BEFORE_WEIGHT:
                    dw_acc += dy * xn.to(dx_ptr.dtype.element_ty).to(tl.float32)
                else:
                    dw_acc += dy * xn
            dx = rstd * (g - xn * (tl.sum(xn * g, axis=0) / n_cols))
            if HAS_DH:
                dx += tl.load(dh_ptr + o * stride_dh_o + i * stride_dh_i + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + row * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            tl.store(dw_row + cols, dw_acc, mask=mask)
    else:
        # Long rows: two passes over the row; dw partials accumulate in global memory
        # (each program owns its partial row, so there is no race).
        if COMPUTE_DW:
            for start in range(0, n_cols, BLOCK_N):
                c = start + cols
                tl.store(dw_row + c, tl.zeros([BLOCK_N], dtype=tl.float32), mask=c < n_cols)
        for row in range(pid, n_rows, n_progs):
            o = row // n_inner
            i = row % n_inner
            x_row = x_ptr + o * stride_x_o + i * stride_x_i
            dy_row = dy_ptr + o * stride_dy_o + i * stride_dy_i
            ss = tl.zeros([BLOCK_N], dtype=tl.float32)
            dot = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK_N):
                c = start + cols
                mask = c < n_cols
                x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
                g = tl.load(dy_row + c, mask=mask, other=0.0).to(tl.float32)
                if HAS_WEIGHT:
                    g = g * (tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32) + weight_offset)
                if not HAS_RSTD:
                    ss += x * x
                dot += x * g
            if HAS_RSTD:
                rstd = tl.load(rstd_ptr + row).to(tl.float32)
            else:
                rstd = tl.math.rsqrt(tl.sum(ss, axis=0) / n_cols + eps)
            mean_dot = tl.sum(dot, axis=0) * rstd / n_cols  # mean(xn * g)
            for start in range(0, n_cols, BLOCK_N):
                c = start + cols
                mask = c < n_cols
                x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_row + c, mask=mask, other=0.0).to(tl.float32)
                xn = x * rstd
                g = dy
                if HAS_WEIGHT:
                    g = dy * (tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32) + weight_offset)
                if COMPUTE_DW:
                    if ROUND_BEFORE_WEIGHT:
                        xr = xn.to(dx_ptr.dtype.element_ty).to(tl.float32)
                    else:
                        xr = xn
                    part = tl.load(dw_row + c, mask=mask, other=0.0)
                    tl.store(dw_row + c, part + dy * xr, mask=mask)
                dx = rstd * (g - xn * mean_dot)
                if HAS_DH:
                    dx += tl.load(dh_ptr + o * stride_dh_o + i * stride_dh_i + c, mask=mask, other=0.0).to(tl.float32)
                tl.store(dx_ptr + row * n_cols + c, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _rows3(tensors, shape):
    """See each tensor as ``[n_outer, n_inner, n_cols]`` without copying where possible.

    Args:
        tensors: tensors of shape ``shape`` (None entries pass through).
        shape: the common shape ``[*, n_cols]``.

    Returns:
        (views, n_inner, copied): 3-D views (a contiguous copy for a tensor that no
        candidate view fits, flagged in ``copied``) and the inner row count.
    """
    n_cols = shape[-1]
    n_rows = 1
    for s in shape[:-1]:
        n_rows *= s
    candidates = [(1, n_rows)]
    if len(shape) >= 3 and shape[-2] > 0:
        candidates.append((n_rows // shape[-2], shape[-2]))

    def view(t, lead):
        if t is None:
            return None
        if t.stride(-1) != 1 and n_cols > 1:
            raise RuntimeError("last dim not unit-stride")
        return t.view(*lead, n_cols)

    for lead in candidates:
        try:
            return [view(t, lead) for t in tensors], lead[1], [False] * len(tensors)
        except RuntimeError:
            continue
    lead = candidates[0]
    views, copied = [], []
    for t in tensors:
        try:
            views.append(view(t, lead))
            copied.append(False)
        except RuntimeError:
            views.append(t.contiguous().view(*lead, n_cols))
            copied.append(True)
    return views, lead[1], copied


def check_rms_norm_args(x, weight, residual):
    """Validate RMSNorm arguments (also used by the ops' fake implementations)."""
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x: expected at least 1 dimension (the normalized one), got a 0-d tensor")
    n_cols = x.shape[-1]
    if weight is not None:
        check_tensor("weight", weight)
        if weight.dim() != 1 or weight.shape[0] != n_cols:
            raise ValueError(f"weight: expected shape [{n_cols}] (x's last dim), got {list(weight.shape)}")
    if residual is not None:
        check_tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual: expected shape {list(x.shape)} (x's shape), got {list(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual: expected dtype {x.dtype} (x's dtype), got {residual.dtype}")
    check_same_device(x=x, weight=weight, residual=residual)


def _check_rstd(name: str, rstd: torch.Tensor, x: torch.Tensor) -> None:
    """Validate a per-row rstd tensor: fp32, contiguous, one value per row of ``x``, x's device."""
    n_cols = x.shape[-1]
    n_rows = x.numel() // n_cols if n_cols else 0
    if not isinstance(rstd, torch.Tensor) or rstd.dtype != torch.float32:
        raise TypeError(f"{name}: expected a float32 tensor, got {getattr(rstd, 'dtype', type(rstd).__name__)}")
    if rstd.numel() != n_rows or not rstd.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor of {n_rows} elements (one per row of x), "
                         f"got shape {list(rstd.shape)} with strides {list(rstd.stride())}")
    check_same_device(x=x, **{name: rstd})


def rms_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    *,
    residual: torch.Tensor | None = None,
    weight_offset: float = 0.0,
    round_before_weight: bool = False,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    rstd_out: torch.Tensor | None = None,
):
    """RMSNorm over the last dim, optionally of ``x + residual``.

    Args:
        x: ``[*, n_cols]`` fp16/bf16/fp32, unit stride on the last dim preferred (copied otherwise).
        weight: ``[n_cols]`` or None.
        eps: added to the mean square.
        residual: ``x``-shaped, same dtype, or None.
        weight_offset: the normalized row is multiplied by ``weight_offset + weight`` (1.0 for Gemma).
        round_before_weight: round the normalized row to x's dtype before the weight multiply.
        out: where to write y (x's shape and dtype); a new tensor when None. May be ``x``.
        residual_out: where to write ``h`` (with a residual); a new tensor when None. May be ``residual``.
        rstd_out: where to write each row's fp32 ``rsqrt(mean(h * h) + eps)`` (what aten's
            ``_fused_rms_norm`` returns): a contiguous fp32 tensor of ``x.numel() // n_cols``
            elements on x's device, rows in row-major order of x's leading dims; or None.

    Returns:
        ``(y, h)``; ``h`` is None without a residual.

    Raises:
        TypeError / ValueError / NotImplementedError: unsupported dtype, shape or device.
    """
    check_rms_norm_args(x, weight, residual)
    if rstd_out is not None:
        _check_rstd("rstd_out", rstd_out, x)
    if weight is None and round_before_weight:
        round_before_weight = False
    y = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    h = None
    if residual is not None:
        h = torch.empty_like(x, memory_format=torch.contiguous_format) if residual_out is None else residual_out
    if x.numel() == 0:
        return y, h
    n_cols = x.shape[-1]
    (xv, rv, yv, hv), n_inner, copied = _rows3([x, residual, y, h], x.shape)
    n_rows = x.numel() // n_cols
    key = tune_key(n_rows, n_cols, x.dtype, residual is not None)
    dev = x.get_device()
    cfg = TUNABLE.chosen.get((dev, key))
    block, warps = cfg if cfg is not None else TUNABLE.resolve(key, dev, {"n_rows": n_rows})
    with device_guard(x):
        _rms_norm_fwd_kernel[(n_rows,)](
            xv, rv if rv is not None else xv, weight if weight is not None else xv, yv, hv if hv is not None else yv,
            rstd_out if rstd_out is not None else yv,
            xv.stride(0), xv.stride(1),
            *(rv.stride()[:2] if rv is not None else (0, 0)),
            yv.stride(0), yv.stride(1),
            *(hv.stride()[:2] if hv is not None else (0, 0)),
            n_inner, n_cols, eps, weight_offset,
            HAS_RESIDUAL=residual is not None,
            HAS_WEIGHT=weight is not None,
            ROUND_BEFORE_WEIGHT=round_before_weight,
            HAS_RSTD=rstd_out is not None,
            BLOCK_N=block,
            ONE_PASS=n_cols <= MAX_FUSED_BLOCK,
            num_warps=warps,
        )
    # Outputs that had no strided view were computed into copies: write them back.
    if copied[2]:
        y.copy_(yv.view(y.shape))
    if h is not None and copied[3]:
        h.copy_(hv.view(h.shape))
    return y, h


def rms_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    *,
    dh: torch.Tensor | None = None,
    weight_offset: float = 0.0,
    round_before_weight: bool = False,
    compute_dw: bool = True,
    rstd: torch.Tensor | None = None,
):
    """Gradients of :func:`rms_norm_fwd` (recomputing rstd from the saved input unless given).

    Args:
        dy: gradient of y, x's shape.
        x: the normalized input of the forward (``h`` when there was a residual).
        weight, eps, weight_offset, round_before_weight: as in the forward.
        dh: gradient of the forward's ``h`` output, or None.
        compute_dw: whether to compute the weight's gradient (it still scales dx).
        rstd: the forward's per-row fp32 rstd (as ``rms_norm_fwd(..., rstd_out=)`` writes it),
            used instead of recomputing it (``eps`` is then unused); or None.

    Returns:
        ``(dx, dw)``: dx has x's shape and dtype (contiguous); dw is None without a weight
        or with ``compute_dw=False``.

    Raises:
        TypeError / ValueError / NotImplementedError: unsupported dtype, shape or device.
    """
    check_rms_norm_args(x, weight, None)
    if dy.shape != x.shape:
        raise ValueError(f"dy: expected shape {list(x.shape)}, got {list(dy.shape)}")
    if rstd is not None:
        _check_rstd("rstd", rstd, x)
    n_cols = x.shape[-1]
    n_rows = x.numel() // n_cols if n_cols else 0
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    compute_dw = compute_dw and weight is not None
    if x.numel() == 0:
        return dx, (torch.zeros_like(weight) if compute_dw else None)
    (dyv, xv, dhv), n_inner, _ = _rows3([dy, x, dh], x.shape)
    block, warps = row_config(n_cols, x.element_size())
    n_progs = max(1, min(n_rows, num_sms(x.device) * 2))
    partial = torch.empty((n_progs, n_cols), dtype=torch.float32, device=x.device) if compute_dw else dx
    with device_guard(x):
        _rms_norm_bwd_kernel[(n_progs,)](
            dyv, xv, weight if weight is not None else xv, dhv if dhv is not None else dyv, dx, partial,
            rstd if rstd is not None else dx,
            dyv.stride(0), dyv.stride(1),
            xv.stride(0), xv.stride(1),
            *(dhv.stride()[:2] if dhv is not None else (0, 0)),
            n_rows, n_inner, n_cols, eps, weight_offset,
            HAS_WEIGHT=weight is not None,
            HAS_DH=dh is not None,
            ROUND_BEFORE_WEIGHT=round_before_weight,
            COMPUTE_DW=compute_dw,
            HAS_RSTD=rstd is not None,
            BLOCK_N=block,
            ONE_PASS=n_cols <= MAX_FUSED_BLOCK,
            num_warps=warps,
        )
    dw = partial.sum(0).to(weight.dtype) if compute_dw else None
    return dx, dw


# ---------------------------------------------------------------------------
# Autotuning (kernels/_autotune.py): the forward's warps (and chunk) per device kind
# ---------------------------------------------------------------------------

_ROWS_BUCKET_CAP = 1 << 16


def tune_key(n_rows: int, n_cols: int, dtype: torch.dtype, has_residual: bool) -> tuple:
    """The forward's autotuning key: (rows bucket, n_cols, dtype, has_residual)."""
    return (at.pow2_bucket(n_rows, _ROWS_BUCKET_CAP), n_cols, dtype, has_residual)


def _tune_default(key, dev) -> dict:
    block, warps = row_config(key[1], key[2].itemsize)
    return {"BLOCK_N": block, "num_warps": warps}


def _tune_candidates(key, dev) -> list:
    return at.row_candidates(_tune_default(key, dev), key[1], MAX_FUSED_BLOCK, dev)


def _tune_bench(key, dev, dims):
    """(add +) RMSNorm of ``[rows, n_cols]`` with a weight, into preallocated outputs."""
    rows, n_cols, dtype, has_residual = key
    rows = (dims or {}).get("n_rows", rows)
    device = at.torch_device(dev)
    x = torch.randn(rows, n_cols, device=device, dtype=dtype)
    w = torch.randn(n_cols, device=device, dtype=dtype)
    r = torch.randn_like(x) if has_residual else None
    y, h = torch.empty_like(x), (torch.empty_like(x) if has_residual else None)
    return lambda: rms_norm_fwd(x, w, 1e-6, residual=r, out=y, residual_out=h)


TUNABLE = at.register(at.Tunable(
    "rms_norm",
    fields=("BLOCK_N", "num_warps"),
    key_fields=("rows_bucket", "n_cols", "dtype", "has_residual"),
    default=_tune_default,
    candidates=_tune_candidates,
    make_bench=_tune_bench,
    sources=(_rms_norm_fwd_kernel,),
    nearest_bucket=True,
))
