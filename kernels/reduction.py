"""Reductions over the last dim of contiguous rows: sum/mean, max (with or without the
index), all, and softmax / log-softmax forward and backward.

Every launcher sees its input as ``[n_rows, n_cols]`` contiguous (a reduction over the
trailing dims ``k..ndim-1`` of a contiguous tensor is one of these with ``n_cols`` their
product). Arithmetic is fp32 whatever the input dtype; the result is rounded once at the
store, so ``sum`` of bf16 rows is an fp32 sum rounded to bf16, as torch does.

Tiles: a program takes ``BLOCK_M`` rows of ``BLOCK_N`` columns (several short rows per
program, one long row per program), walking rows longer than ``MAX_FUSED_BLOCK`` in
chunks (:func:`tile_config`). A few long rows (fewer row programs than twice the SM
count) are also split across programs along the row: each program writes an fp32 partial
and a second launch of the same kernel reduces the partials (``sum``/``mean``/``amax``/
``all`` only; ``max`` with its index and softmax keep one program per row).

NaN and Inf follow torch: ``amax``/``max`` return NaN for a row holding a NaN, and ``max``
the index of the first NaN, else of the first maximum; softmax subtracts the row max
first, so a row of all ``-inf`` (or with a ``+inf``) gives NaN as in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _autotune as at
from ._common import FLOAT_DTYPES, MAX_FUSED_BLOCK, cdiv, check_tensor, device_guard, next_pow2, num_sms, row_config
from ._launch import jit

__all__ = [
    "OP_ALL",
    "OP_MAX",
    "OP_SUM",
    "row_all",
    "row_max",
    "row_max_index",
    "row_sum",
    "softmax_bwd",
    "softmax_fwd",
    "tile_config",
]

OP_SUM, OP_MAX, OP_ALL = 0, 1, 2

# Rows per tile: short rows are packed up to this many elements per program (at most
# _MAX_TILE_ROWS rows); it keeps a tile's register footprint near that of one 4096-element
# row. Measured on the H100 (benchmarks/results/ops_*): 2.2-2.9x native at [8, 4096], but
# 0.86x (sum) and 0.83x (amax) at [4096, 4096], where native's row kernel is faster; those
# entries stay out of preset "fast" until this tile is swept (benchmarks/NOTES.md).
_TILE_ELEMS = 4096
_MAX_TILE_ROWS = 64
# Largest number of partials per row a split reduction writes (reduced by one more tile).
_MAX_SPLITS = 1024
# max.dim keeps a value and an int64 index per lane: chunks of at most this many columns,
# so the per-lane state of a long row stays in registers (not measured yet).
_MAX_INDEX_BLOCK = 4096
_BIG_INDEX = tl.constexpr(2**62)  # "no column yet" in max_index (a jit global must be constexpr)


def tile_config(n_rows: int, n_cols: int, elem_bytes: int, max_block: int = MAX_FUSED_BLOCK) -> tuple[int, int, int]:
    """Tile shape and warp count for the row kernels of this file (the sum/mean/amax/all kernel's is
    tuned per device kind, with this as the default: ``TUNABLE`` below).

    ``BLOCK_N`` is :func:`~flag_gems.kernels._common.row_config`'s (the whole row up to
    MAX_FUSED_BLOCK, else MAX_FUSED_BLOCK chunks); short rows are stacked ``BLOCK_M`` to a
    program, and warps follow row_config's one warp per KiB moved by the tile (1 to 16).
    ``max_block`` caps ``BLOCK_N`` for kernels that keep more per-lane state.

    Returns:
        (BLOCK_M, BLOCK_N, num_warps)
    """
    block_n = min(row_config(n_cols, elem_bytes)[0], max_block)
    block_m = max(1, min(_MAX_TILE_ROWS, _TILE_ELEMS // block_n, next_pow2(n_rows)))
    warps = max(1, min(16, block_m * block_n * elem_bytes // 1024))
    return block_m, block_n, warps


# --------------------------------------------------------------------------- kernels


@jit
def _reduce_kernel(
    x_ptr,  # [n_rows, n_cols] contiguous input
    out_ptr,  # [n_rows] result (FINAL) or [n_rows, n_splits] fp32 partials
    n_rows,
    n_cols,
    span,  # columns per split, a multiple of BLOCK_N (n_cols rounded up when not split)
    scale,  # multiplies a FINAL sum (1 / count for mean)
    OP: tl.constexpr,  # OP_SUM, OP_MAX or OP_ALL
    FINAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Float scalars to fp32 once: Triton's launcher passes Python floats as fp32, Inductor's wrapper
    # as fp64 (the math would turn fp64); so both launchers compile this kernel alike.
    scale = tl.cast(scale, tl.float32)
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    n_splits = tl.num_programs(1).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: rows * n_cols may pass 2^31
    row_mask = rows < n_rows
    begin = split * span
    end = tl.minimum(begin + span, n_cols)
    cols = tl.arange(0, BLOCK_N)
    if OP == 0:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    elif OP == 1:
        acc = tl.full([BLOCK_M, BLOCK_N], float("-inf"), dtype=tl.float32)
    else:
        acc = tl.full([BLOCK_M, BLOCK_N], 1.0, dtype=tl.float32)
    for k in range(0, span, BLOCK_N):
        c = begin + k + cols
        mask = row_mask[:, None] & (c < end)[None, :]
        # fp32 right after the load (also bool / integer inputs of all): every op below is fp32.
        x = tl.load(x_ptr + rows[:, None] * n_cols + c[None, :], mask=mask, other=0).to(tl.float32)
        if OP == 0:
            acc += x
        elif OP == 1:
            x = tl.where(mask, x, float("-inf"))
            acc = tl.where((x > acc) | (x != x), x, acc)  # NaN sticks: NaN > v and v > NaN are false
        else:
            acc = tl.minimum(acc, tl.where(mask & (x == 0.0), 0.0, 1.0))  # NaN != 0: true, as torch
    if OP == 0:
        r = tl.sum(acc, axis=1)
    elif OP == 1:
        has_nan = tl.max((acc != acc).to(tl.int32), axis=1) > 0
        r = tl.where(has_nan, float("nan"), tl.max(tl.where(acc != acc, float("-inf"), acc), axis=1))
    else:
        r = tl.min(acc, axis=1)
    if FINAL:
        if OP == 0:
            r = r * scale
        if OP == 2:
            tl.store(out_ptr + rows, r != 0.0, mask=row_mask)
        else:
            tl.store(out_ptr + rows, r.to(out_ptr.dtype.element_ty), mask=row_mask)
    else:
        tl.store(out_ptr + rows * n_splits + split, r, mask=row_mask)


@jit
def _max_index_kernel(
    x_ptr,  # [n_rows, n_cols] contiguous input
    values_ptr,  # [n_rows] max per row (x's dtype)
    indices_ptr,  # [n_rows] int64 index of the first NaN, else of the first maximum
    n_rows,
    n_cols,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK_N)
    # Per lane: the best value seen and its column. A lane takes a later column only when it
    # is strictly greater (ties keep the earlier index) or the first NaN.
    best = tl.full([BLOCK_M, BLOCK_N], float("-inf"), dtype=tl.float32)
    best_i = tl.full([BLOCK_M, BLOCK_N], _BIG_INDEX, dtype=tl.int64)
    for start in range(0, n_cols, BLOCK_N):
        c = start + cols
        mask = row_mask[:, None] & (c < n_cols)[None, :]
        x = tl.load(x_ptr + rows[:, None] * n_cols + c[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        take = mask & ((best_i == _BIG_INDEX) | (x > best) | ((x != x) & (best == best)))
        best = tl.where(take, x, best)
        best_i = tl.where(take, c[None, :].to(tl.int64) + tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int64), best_i)
    is_nan = best != best
    has_nan = tl.max(is_nan.to(tl.int32), axis=1) > 0
    top = tl.max(tl.where(is_nan, float("-inf"), best), axis=1)
    hit = tl.where(has_nan[:, None], is_nan, best == top[:, None]) & (best_i != _BIG_INDEX)
    idx = tl.min(tl.where(hit, best_i, _BIG_INDEX), axis=1)
    value = tl.where(has_nan, float("nan"), top)
    tl.store(values_ptr + rows, value.to(values_ptr.dtype.element_ty), mask=row_mask)
    tl.store(indices_ptr + rows, idx, mask=row_mask)


@jit
def _softmax_fwd_kernel(
    x_ptr,  # [n_rows, n_cols] contiguous input
    y_ptr,  # [n_rows, n_cols] contiguous output
    n_rows,
    n_cols,
    LOG: tl.constexpr,
    ONE_PASS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK_N)
    if ONE_PASS:
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        offs = rows[:, None] * n_cols + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=1)
        z = x - m[:, None]  # all -inf row: -inf - -inf = NaN, as torch
        e = tl.where(mask, tl.exp(z), 0.0)
        s = tl.sum(e, axis=1)
        if LOG:
            y = z - tl.log(s)[:, None]
        else:
            y = e / s[:, None]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # Pass 1: running max and sum of exp(x - max), rescaled when the max grows.
        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        s = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c < n_cols)[None, :]
            x = tl.load(x_ptr + rows[:, None] * n_cols + c[None, :], mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=1))
            e = tl.where(mask, tl.exp(x - m_new[:, None]), 0.0)
            s_new = s * tl.exp(m - m_new) + tl.sum(e, axis=1)
            # While the max is still -inf every element so far is -inf: the sum stays 0 (not
            # the NaN of -inf - -inf), so a finite value in a later chunk still counts alone.
            s = tl.where(m_new == float("-inf"), 0.0, s_new)
            m = m_new
        for start in range(0, n_cols, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c < n_cols)[None, :]
            offs = rows[:, None] * n_cols + c[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
            z = x - m[:, None]
            if LOG:
                y = z - tl.log(s)[:, None]
            else:
                y = tl.exp(z) / s[:, None]
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@jit
def _softmax_bwd_kernel(
    g_ptr,  # [n_rows, n_cols] contiguous gradient of the output
    y_ptr,  # [n_rows, n_cols] contiguous forward output (log-softmax output when LOG)
    dx_ptr,  # [n_rows, n_cols] contiguous input gradient
    n_rows,
    n_cols,
    LOG: tl.constexpr,
    ONE_PASS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # softmax:     dx = y * (g - sum(g * y))
    # log_softmax: dx = g - exp(y) * sum(g)
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK_N)
    if ONE_PASS:
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        offs = rows[:, None] * n_cols + cols[None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if LOG:
            dx = g - tl.exp(y) * tl.sum(g, axis=1)[:, None]
        else:
            dx = y * (g - tl.sum(g * y, axis=1)[:, None])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c < n_cols)[None, :]
            offs = rows[:, None] * n_cols + c[None, :]
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if LOG:
                acc += g
            else:
                acc += g * tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dot = tl.sum(acc, axis=1)
        for start in range(0, n_cols, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c < n_cols)[None, :]
            offs = rows[:, None] * n_cols + c[None, :]
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if LOG:
                dx = g - tl.exp(y) * dot[:, None]
            else:
                dx = y * (g - dot[:, None])
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers


def _rows(name: str, x: torch.Tensor, n_cols: int, dtypes=FLOAT_DTYPES) -> int:
    """Validate a ``[n_rows, n_cols]``-viewable input; returns n_rows."""
    check_tensor(name, x, dtypes)
    if not x.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (rows of unit stride), got strides {x.stride()}")
    if n_cols < 0 or (n_cols == 0 and x.numel() != 0) or (n_cols and x.numel() % n_cols):
        raise ValueError(f"{name}: {x.numel()} elements do not form rows of {n_cols}")
    return x.numel() // n_cols if n_cols else 0


def _splits(n_rows: int, n_cols: int, block_m: int, block_n: int, device) -> int:
    """How many programs share each row: >1 only for a few long rows."""
    row_programs = cdiv(n_rows, block_m)
    chunks = cdiv(n_cols, block_n)
    if n_cols <= MAX_FUSED_BLOCK or row_programs >= 2 * num_sms(device):
        return 1
    return max(1, min(chunks, _MAX_SPLITS, (2 * num_sms(device)) // row_programs))


def _reduce(x: torch.Tensor, n_cols: int, op: int, out: torch.Tensor, scale: float) -> torch.Tensor:
    n_rows = x.numel() // n_cols
    key = tune_key(n_rows, n_cols, x.dtype)
    dev = x.get_device()
    cfg = TUNABLE.chosen.get((dev, key))
    block_m, block_n, warps = cfg if cfg is not None else TUNABLE.resolve(key, dev, {"n_rows": n_rows, "n_cols": n_cols})
    n_splits = _splits(n_rows, n_cols, block_m, block_n, x.device)
    span = cdiv(cdiv(n_cols, n_splits), block_n) * block_n
    n_splits = cdiv(n_cols, span)
    grid = (cdiv(n_rows, block_m), n_splits)
    with device_guard(x):
        if n_splits == 1:
            _reduce_kernel[grid](x, out, n_rows, n_cols, span, scale,
                                 OP=op, FINAL=True, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
            return out
        partial = torch.empty((n_rows, n_splits), dtype=torch.float32, device=x.device)
        _reduce_kernel[grid](x, partial, n_rows, n_cols, span, 1.0,
                             OP=op, FINAL=False, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
        block_m, block_n, warps = tile_config(n_rows, n_splits, 4)
        grid = (cdiv(n_rows, block_m), 1)
        _reduce_kernel[grid](partial, out, n_rows, n_splits, cdiv(n_splits, block_n) * block_n, scale,
                             OP=op, FINAL=True, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return out


def row_sum(x: torch.Tensor, n_cols: int, *, out_dtype: torch.dtype | None = None, mean: bool = False) -> torch.Tensor:
    """Sum (or mean) of each row of ``n_cols`` consecutive elements.

    Args:
        x: contiguous fp16/bf16/fp32 tensor of ``n_rows * n_cols`` elements.
        n_cols: the row length (the product of the reduced trailing dims).
        out_dtype: the result's dtype (x's by default); fp32 accumulation either way.
        mean: divide by ``n_cols`` (an empty row gives NaN, as torch's mean).

    Returns:
        ``[n_rows]`` tensor of ``out_dtype``.

    Raises:
        TypeError / ValueError / NotImplementedError: unsupported dtype, layout or device.
    """
    n_rows = _rows("x", x, n_cols)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype: expected one of float16, bfloat16, float32, got {out_dtype}")
    out = torch.empty((n_rows,), dtype=out_dtype, device=x.device)
    if n_rows == 0:
        return out
    if n_cols == 0:
        return out.fill_(float("nan") if mean else 0.0)
    return _reduce(x, n_cols, OP_SUM, out, 1.0 / n_cols if mean else 1.0)


def row_max(x: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Maximum of each row (NaN when the row holds one), in x's dtype.

    Args:
        x: contiguous fp16/bf16/fp32 tensor of ``n_rows * n_cols`` elements, ``n_cols > 0``.
        n_cols: the row length.

    Returns:
        ``[n_rows]`` tensor of x's dtype.

    Raises:
        ValueError: ``n_cols == 0`` (no maximum of an empty row), or a bad layout.
        TypeError / NotImplementedError: unsupported dtype or device.
    """
    if n_cols <= 0:
        raise ValueError(f"n_cols: expected a positive row length for a maximum, got {n_cols}")
    n_rows = _rows("x", x, n_cols)
    out = torch.empty((n_rows,), dtype=x.dtype, device=x.device)
    return _reduce(x, n_cols, OP_MAX, out, 1.0) if n_rows else out


def row_all(x: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Whether every element of each row is nonzero (NaN counts as nonzero), as bool.

    Args:
        x: contiguous bool, integer (not uint8) or fp16/bf16/fp32 tensor.
        n_cols: the row length (an empty row gives True).

    Returns:
        ``[n_rows]`` bool tensor.

    Raises:
        TypeError / ValueError / NotImplementedError: unsupported dtype, layout or device.
    """
    n_rows = _rows("x", x, n_cols, dtypes=ALL_DTYPES)
    out = torch.empty((n_rows,), dtype=torch.bool, device=x.device)
    if n_rows == 0:
        return out
    if n_cols == 0:
        return out.fill_(True)
    return _reduce(x, n_cols, OP_ALL, out, 1.0)


# Inputs row_all takes. uint8 is left out: torch's all() of uint8 returns uint8.
ALL_DTYPES = (torch.bool, torch.int8, torch.int16, torch.int32, torch.int64) + FLOAT_DTYPES


def row_max_index(x: torch.Tensor, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximum of each row and its index, with torch's rules: the first NaN wins, else the
    first occurrence of the maximum.

    Args:
        x: contiguous fp16/bf16/fp32 tensor of ``n_rows * n_cols`` elements, ``n_cols > 0``.
        n_cols: the row length.

    Returns:
        ``(values, indices)``: ``[n_rows]`` of x's dtype and ``[n_rows]`` int64.

    Raises:
        ValueError: ``n_cols == 0``, or a bad layout.
        TypeError / NotImplementedError: unsupported dtype or device.
    """
    if n_cols <= 0:
        raise ValueError(f"n_cols: expected a positive row length for a maximum, got {n_cols}")
    n_rows = _rows("x", x, n_cols)
    values = torch.empty((n_rows,), dtype=x.dtype, device=x.device)
    indices = torch.empty((n_rows,), dtype=torch.int64, device=x.device)
    if n_rows == 0:
        return values, indices
    block_m, block_n, warps = tile_config(n_rows, n_cols, x.element_size(), max_block=_MAX_INDEX_BLOCK)
    with device_guard(x):
        _max_index_kernel[(cdiv(n_rows, block_m),)](
            x, values, indices, n_rows, n_cols, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps
        )
    return values, indices


def softmax_fwd(x: torch.Tensor, *, log: bool = False, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Softmax (or log-softmax) over the last dim, max-subtracted, in fp32.

    Args:
        x: contiguous fp16/bf16/fp32 tensor with at least one dim.
        log: log-softmax.
        out_dtype: the output dtype (x's by default; fp32 for torch's ``half_to_float``).

    Returns:
        A contiguous tensor of x's shape and ``out_dtype``.

    Raises:
        TypeError / ValueError / NotImplementedError: unsupported dtype, layout or device.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("x: expected a tensor with at least one dim (the softmax dim)")
    n_cols = x.shape[-1]
    n_rows = _rows("x", x, n_cols)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype: expected one of float16, bfloat16, float32, got {out_dtype}")
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if x.numel() == 0:
        return y
    block_m, block_n, warps = tile_config(n_rows, n_cols, x.element_size())
    with device_guard(x):
        _softmax_fwd_kernel[(cdiv(n_rows, block_m),)](
            x, y, n_rows, n_cols, LOG=log, ONE_PASS=n_cols <= MAX_FUSED_BLOCK,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        )
    return y


def softmax_bwd(
    grad: torch.Tensor, y: torch.Tensor, *, log: bool = False, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Gradient of :func:`softmax_fwd` from its output.

    Args:
        grad: gradient of the output, contiguous, y's shape and dtype.
        y: the forward's output (the log-softmax output when ``log``), contiguous.
        log: the forward was a log-softmax.
        out_dtype: the input gradient's dtype (y's by default; the forward input's dtype).

    Returns:
        A contiguous tensor of y's shape and ``out_dtype``.

    Raises:
        TypeError / ValueError / NotImplementedError: unsupported dtype, shape, layout or device.
    """
    if not isinstance(y, torch.Tensor) or y.dim() < 1:
        raise ValueError("y: expected a tensor with at least one dim (the softmax dim)")
    n_cols = y.shape[-1]
    n_rows = _rows("y", y, n_cols)
    _rows("grad", grad, n_cols)
    if grad.shape != y.shape or grad.dtype != y.dtype:
        raise ValueError(f"grad: expected shape {list(y.shape)} and dtype {y.dtype} (y's), "
                         f"got {list(grad.shape)} {grad.dtype}")
    if grad.device != y.device:
        raise ValueError(f"grad and y must be on one device; got {grad.device} and {y.device}")
    out_dtype = y.dtype if out_dtype is None else out_dtype
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype: expected one of float16, bfloat16, float32, got {out_dtype}")
    dx = torch.empty(y.shape, dtype=out_dtype, device=y.device)
    if y.numel() == 0:
        return dx
    block_m, block_n, warps = tile_config(n_rows, n_cols, y.element_size())
    with device_guard(y):
        _softmax_bwd_kernel[(cdiv(n_rows, block_m),)](
            grad, y, dx, n_rows, n_cols, LOG=log, ONE_PASS=n_cols <= MAX_FUSED_BLOCK,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        )
    return dx


# --------------------------------------------------------------------------- autotuning

_BUCKET_CAP = 1 << 24


def tune_key(n_rows: int, n_cols: int, dtype: torch.dtype) -> tuple:
    """The sum/mean/amax/all kernel's autotuning key: (rows bucket, columns bucket, dtype)."""
    return (at.pow2_bucket(n_rows, _BUCKET_CAP), at.pow2_bucket(n_cols, _BUCKET_CAP), dtype)


def _tune_default(key, dev) -> dict:
    bm, bn, warps = tile_config(key[0], key[1], key[2].itemsize)
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps}


def _tune_candidates(key, dev) -> list:
    """Tiles of 1-64 rows by 256-16384 columns (at most 32768 elements, 4-64 per thread) on 1-16 warps,
    for the sum/mean/amax/all kernel (its column loop takes any block); one variant in the interpreter."""
    rows, cols, dtype = key
    default = _tune_default(key, dev)
    if dev < 0:
        return [dict(default, num_warps=2 if default["num_warps"] == 1 else 1)]
    top = max(256, next_pow2(cols))
    block_ns = [bn for bn in (256, 512, 1024, 2048, 4096, 8192, 16384) if bn <= top]
    return at.tile_candidates(default, block_ns, (1, 2, 4, 8, 16, 32, 64), rows, (0, 32768))


def _tune_bench(key, dev, dims):
    """A row sum of ``[rows, cols]`` (``all`` for bool / integer keys)."""
    rows, cols, dtype = key
    rows, cols = (dims or {}).get("n_rows", rows), (dims or {}).get("n_cols", cols)
    device = at.torch_device(dev)
    if not dtype.is_floating_point:
        x = (torch.rand(rows, cols, device=device) > 0.01).to(dtype)
        return lambda: row_all(x, cols)
    x = torch.randn(rows, cols, device=device, dtype=dtype)
    return lambda: row_sum(x, cols)


TUNABLE = at.register(at.Tunable(
    "reduction",
    fields=("BLOCK_M", "BLOCK_N", "num_warps"),
    key_fields=("rows_bucket", "cols_bucket", "dtype"),
    default=_tune_default,
    candidates=_tune_candidates,
    make_bench=_tune_bench,
    sources=(_reduce_kernel, _reduce),
))
