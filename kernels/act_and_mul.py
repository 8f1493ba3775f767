"""Gated-MLP activations: ``act(a) * b``, forward and backward.

Forward, per element (fp32 arithmetic, one rounding at the store)::

    out = act(a) * b

with ``act`` one of

* ``silu``:            ``a * sigmoid(a)``
* ``gelu`` (``none``): ``0.5 * a * (1 + erf(a / sqrt(2)))``
* ``gelu`` (``tanh``): ``0.5 * a * (1 + tanh(sqrt(2 / pi) * (a + 0.044715 * a**3)))``

matching ``torch.nn.functional.silu`` / ``gelu(approximate=...)``.

Backward, recomputing ``act`` from ``a`` (nothing is saved but the inputs)::

    da = dout * b * act'(a)
    db = dout * act(a)

Two layouts share one pair of kernels:

* two-tensor: ``a`` and ``b`` are separate ``[*, d]`` tensors (any strides on the
  token dims, each its own);
* one-tensor (vLLM's ``SiluAndMul``): ``x[..., 2d]`` holds ``a`` in its first half and
  ``b`` in its second; the kernel reads both halves of the same row, ``b`` at a
  column offset ``d`` (``b_off``), and the backward writes ``dx[..., 2d]`` the same way.

Rows: token dims are seen as ``[n_outer, n_inner]`` (dims whose strides merge are
collapsed; a tensor whose token dims do not fold into two is copied). The grid is 2-D:
axis 0 walks tiles of ``BLOCK_M`` rows, axis 1 walks ``BLOCK_N``-column blocks of the
row, so a long row is spread over several programs and short rows are batched
``BLOCK_M`` to a program. Offsets are int64.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _autotune as at
from ._common import cdiv, check_same_device, check_tensor, device_guard, next_pow2, num_sms
from ._launch import jit

__all__ = [
    "act_and_mul_fwd",
    "act_and_mul_bwd",
    "act_and_mul_fused_fwd",
    "act_and_mul_fused_bwd",
    "act_code",
    "check_act_and_mul_args",
    "check_act_and_mul_fused_args",
    "check_out",
]

# Activation codes (the kernels' ACT constexpr), keyed by (activation, approximate).
_ACT_SILU = 0
_ACT_GELU = 1
_ACT_GELU_TANH = 2
_ACT_CODES = {
    ("silu", "none"): _ACT_SILU,
    ("gelu", "none"): _ACT_GELU,
    ("gelu", "tanh"): _ACT_GELU_TANH,
}

# Literals in the kernels: 0.7071067811865476 = 1/sqrt(2), 0.3989422804014327 =
# 1/sqrt(2*pi), 0.7978845608028654 = sqrt(2/pi), 1.5957691216057308 = 2*sqrt(2/pi),
# 0.044715 = the tanh-GELU cubic term (0.134145 = 3 * 0.044715). The tanh form is
# computed as a * sigmoid(2u), u = sqrt(2/pi) (a + 0.044715 a^3), equal to
# 0.5 a (1 + tanh(u)) without its cancellation for large negative a.


@triton.jit
def _act(a, ACT: tl.constexpr):
    """act(a) for fp32 ``a``."""
    if ACT == 0:
        y = a * tl.sigmoid(a)
    elif ACT == 1:
        y = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))
    else:
        # 0.5 * (1 + tanh(u)) == sigmoid(2u): no cancellation for large negative a.
        y = a * tl.sigmoid(1.5957691216057308 * a * (1.0 + 0.044715 * a * a))
    return y


@triton.jit
def _act_and_grad(a, ACT: tl.constexpr):
    """(act(a), act'(a)) for fp32 ``a``."""
    if ACT == 0:
        s = tl.sigmoid(a)
        y = a * s
        dy = s * (1.0 + a * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
        pdf = tl.exp(-0.5 * a * a) * 0.3989422804014327  # 1/sqrt(2*pi)
        y = a * cdf
        dy = cdf + a * pdf
    else:
        # With s = sigmoid(2u) = 0.5 * (1 + tanh(u)): 1 - tanh(u)^2 = 4 s (1 - s), so
        # act' = s + 0.5 a * 4 s (1 - s) * du/da, du/da = sqrt(2/pi) (1 + 3 * 0.044715 a^2).
        a2 = a * a
        s = tl.sigmoid(1.5957691216057308 * a * (1.0 + 0.044715 * a2))
        y = a * s
        dy = s + 2.0 * a * s * (1.0 - s) * 0.7978845608028654 * (1.0 + 0.134145 * a2)
    return y, dy


@triton.jit
def _row_offsets(rows, n_inner, stride_o, stride_i, HAS_OUTER: tl.constexpr):
    # rows: [BLOCK_M] int64 flat row indices -> element offsets of each row start.
    if HAS_OUTER:
        o = rows // n_inner
        return o * stride_o + (rows - o * n_inner) * stride_i
    else:
        return rows * stride_i


@jit
def _act_and_mul_fwd_kernel(
    a_ptr,  # [n_outer, n_inner, n_cols] activation input
    b_ptr,  # [n_outer, n_inner, n_cols] multiplier, at column offset b_off of its rows
    out_ptr,  # [n_outer, n_inner, n_cols] output
    stride_a_o, stride_a_i,
    stride_b_o, stride_b_i,
    stride_out_o, stride_out_i,
    b_off,  # 0 (two-tensor form) or n_cols (one-tensor form: b is x's second half)
    n_rows,
    n_inner,
    n_cols,
    ACT: tl.constexpr,
    HAS_OUTER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # int64
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    a_off = _row_offsets(rows, n_inner, stride_a_o, stride_a_i, HAS_OUTER)[:, None] + cols[None, :]
    b_off_ = _row_offsets(rows, n_inner, stride_b_o, stride_b_i, HAS_OUTER)[:, None] + (cols + b_off)[None, :]
    o_off = _row_offsets(rows, n_inner, stride_out_o, stride_out_i, HAS_OUTER)[:, None] + cols[None, :]
    # Upcast right after the loads: all arithmetic in fp32, one rounding at the store.
    a = tl.load(a_ptr + a_off, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + b_off_, mask=mask, other=0.0).to(tl.float32)
    y = _act(a, ACT) * b
    tl.store(out_ptr + o_off, y.to(out_ptr.dtype.element_ty), mask=mask)


@jit
def _act_and_mul_bwd_kernel(
    dout_ptr,  # [n_outer, n_inner, n_cols] gradient of out
    a_ptr,  # [n_outer, n_inner, n_cols] forward activation input
    b_ptr,  # [n_outer, n_inner, n_cols] forward multiplier, at column offset b_off
    da_ptr,  # [n_outer, n_inner, n_cols] gradient of a
    db_ptr,  # [n_outer, n_inner, n_cols] gradient of b, at column offset b_off
    stride_dout_o, stride_dout_i,
    stride_a_o, stride_a_i,
    stride_b_o, stride_b_i,
    stride_da_o, stride_da_i,
    stride_db_o, stride_db_i,
    b_off,  # 0 (two-tensor form) or n_cols (one-tensor form), for both b and db
    n_rows,
    n_inner,
    n_cols,
    ACT: tl.constexpr,
    HAS_OUTER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # int64
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_b = cols + b_off
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    g_off = _row_offsets(rows, n_inner, stride_dout_o, stride_dout_i, HAS_OUTER)[:, None] + cols[None, :]
    a_off = _row_offsets(rows, n_inner, stride_a_o, stride_a_i, HAS_OUTER)[:, None] + cols[None, :]
    b_off_ = _row_offsets(rows, n_inner, stride_b_o, stride_b_i, HAS_OUTER)[:, None] + cols_b[None, :]
    g = tl.load(dout_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + a_off, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + b_off_, mask=mask, other=0.0).to(tl.float32)
    y, dy = _act_and_grad(a, ACT)
    da = g * b * dy
    db = g * y
    da_off = _row_offsets(rows, n_inner, stride_da_o, stride_da_i, HAS_OUTER)[:, None] + cols[None, :]
    db_off = _row_offsets(rows, n_inner, stride_db_o, stride_db_i, HAS_OUTER)[:, None] + cols_b[None, :]
    tl.store(da_ptr + da_off, da.to(da_ptr.dtype.element_ty), mask=mask)
    tl.store(db_ptr + db_off, db.to(db_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------
# Launch heuristics
# ---------------------------------------------------------------------------

# Output elements one program covers at most: 4 KiB of fp16/bf16 output (8 KiB read) at
# 4 warps, 8 KiB of fp32 output at 8 warps; either way two 16-byte vectors per thread
# per tensor.
_TILE = 2048
# From this many rows (bucketed) full tiles run on 16 warps (measured, see _launch_config).
_MANY_ROWS = 4096
# Fewest elements per program when the launch is shrunk to fill the GPU.
_MIN_TILE = 512


@functools.lru_cache(maxsize=None)
def _launch_config(rows_bucket: int, n_cols: int, elem_bytes: int, sms: int) -> tuple[int, int, int]:
    """Tile shape and warp count for the 2-D grid: the heuristic, the autotuner's default (the forward's
    config is tuned per device kind: ``TUNABLE`` below; the backward uses this).

    * ``BLOCK_N``: the row (next power of two), capped at one tile: a long row is cut
      into column blocks so that large ``d`` gives many programs and contiguous,
      16-byte-vectorizable loads along ``d``.
    * ``BLOCK_M``: rows batched per program until the tile is full (short rows).
    * Few rows (decode): the tile is halved, rows first, down to ``_MIN_TILE``
      elements, until there are about two programs per SM.
    * warps: one thread per two 16-byte vectors of the tile (1 to 8 warps), except 16
      warps on full tiles from ``_MANY_ROWS`` rows. H100 sweep (bf16, d=14336,
      benchmarks/NOTES.md): 16 warps beat 4 by 1.3-1.6 % at M >= 4096 and lose 6 % at
      M = 512; a flat column-fastest grid measured no better at large M and 15 %
      slower at M = 64, so the grid stays (row blocks, column blocks).

    Tile sizes are the usual bandwidth-bound elementwise choices; no other tile beat
    them by more than the run-to-run spread in the H100 sweep. What is checked (sm_90 PTX, compiled ahead
    of time): at d=14336 every thread issues 128-bit ``ld/st.global.v4`` accesses,
    two per tensor, for all three dtypes and both layouts. Triton proves that
    alignment from its multiple-of-16 specialization of the strides and of ``b_off``,
    so a ``d`` that is not a multiple of 16 gets narrower accesses.

    Args:
        rows_bucket: number of rows rounded up to a power of two (bounded cache key).
        n_cols: ``d``.
        elem_bytes: element size of the tensors.
        sms: streaming multiprocessors of the device.

    Returns:
        (BLOCK_M, BLOCK_N, num_warps)
    """
    block_n = min(next_pow2(n_cols), _TILE)
    block_m = max(1, min(_TILE // block_n, rows_bucket))

    def n_programs(bm, bn):
        return cdiv(rows_bucket, bm) * cdiv(n_cols, bn)

    while n_programs(block_m, block_n) < 2 * sms and block_m * block_n > _MIN_TILE:
        if block_m > 1:
            block_m //= 2
        else:
            block_n //= 2
    vec = max(1, 16 // elem_bytes)
    warps = max(1, min(8, (block_m * block_n) // (2 * vec * 32)))
    if rows_bucket >= _MANY_ROWS and block_m * block_n == _TILE:
        warps = 16
    return block_m, block_n, warps


_ROWS_BUCKET_CAP = 1 << 16  # beyond this the heuristic no longer changes


def _config(n_rows: int, n_cols: int, t: torch.Tensor) -> tuple[int, int, int]:
    """The backward's config: the heuristic (the autotuner tunes the forward)."""
    bucket = min(next_pow2(n_rows), _ROWS_BUCKET_CAP)
    return _launch_config(bucket, n_cols, t.element_size(), num_sms(t.device))


def _fwd_config(n_rows: int, n_cols: int, t: torch.Tensor) -> tuple[int, int, int]:
    """The forward's config: tuned per (rows bucket, d, dtype) and device (``_autotune``)."""
    key = tune_key(n_rows, n_cols, t.dtype)
    dev = t.get_device()
    cfg = TUNABLE.chosen.get((dev, key))
    if cfg is None:
        cfg = TUNABLE.resolve(key, dev, {"n_rows": n_rows})
    return cfg


# ---------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------


def act_code(activation: str, approximate: str = "none") -> int:
    """The kernels' activation code for ``(activation, approximate)``.

    Raises:
        ValueError: unknown activation, or an ``approximate`` other than "none"/"tanh"
            (only "none" for silu).
    """
    code = _ACT_CODES.get((activation, approximate))
    if code is None:
        if activation not in ("silu", "gelu"):
            raise ValueError(f"activation: expected 'silu' or 'gelu', got {activation!r}")
        if activation == "silu":
            raise ValueError(f"approximate: silu takes only 'none', got {approximate!r}")
        raise ValueError(f"approximate: expected 'none' or 'tanh' (as torch.nn.functional.gelu), got {approximate!r}")
    return code


def _layout(lead, tensors):
    """Fold the token dims ``lead`` of every tensor into one common ``[n_outer, n_inner]``.

    Dims of size 1 are dropped; adjacent dims merge when every tensor's strides allow
    it. Returns ``(n_outer, n_inner, [(stride_o, stride_i), ...])``, or None when more
    than two groups remain.
    """
    k = len(lead)
    if k == 1:
        return 1, lead[0], [(0, t.stride(0)) for t in tensors]
    dims = [i for i in range(k) if lead[i] != 1]
    if not dims:
        return 1, 1, [(0, 0)] * len(tensors)
    strides = [t.stride() for t in tensors]
    groups = [[dims[0]]]
    for prev, cur in zip(dims, dims[1:]):
        if all(s[prev] == s[cur] * lead[cur] for s in strides):
            groups[-1].append(cur)
        else:
            groups.append([cur])
    if len(groups) > 2:
        return None
    if len(groups) == 1:
        n = 1
        for i in groups[0]:
            n *= lead[i]
        last = groups[0][-1]
        return 1, n, [(0, s[last]) for s in strides]
    n_outer = n_inner = 1
    for i in groups[0]:
        n_outer *= lead[i]
    for i in groups[1]:
        n_inner *= lead[i]
    lo, li = groups[0][-1], groups[1][-1]
    return n_outer, n_inner, [(s[lo], s[li]) for s in strides]


def _unit_last(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 or t.shape[-1] <= 1


def _contiguous_inputs(inputs, needs_copy):
    # The one-tensor form passes x twice (as a and as b): copy it once.
    copies = {}
    res = []
    for t in inputs:
        if needs_copy(t):
            if id(t) not in copies:
                copies[id(t)] = t.contiguous()
            t = copies[id(t)]
        res.append(t)
    return res


def _prepare(lead, inputs, outputs):
    """Choose the layout for one launch; copy what does not fit.

    Inputs whose last dim is not unit-stride, or whose token dims do not fold into
    two together with the others, are made contiguous. An output that still does
    not fit is replaced by a contiguous temporary (returned in ``writeback`` as
    ``(index, original)`` pairs, to copy into after the launch).

    Returns:
        (inputs, outputs, n_outer, n_inner, strides, writeback)
    """
    # Common cases first, without copies: 2-D tensors, then any foldable layout.
    strides = [t.stride() for t in inputs + outputs]
    if all(st[-1] == 1 for st in strides):
        if len(lead) == 1:
            return inputs, outputs, 1, lead[0], [(0, st[0]) for st in strides], ()
        lay = _layout(lead, inputs + outputs)
        if lay is not None:
            return inputs, outputs, lay[0], lay[1], lay[2], ()
    inputs = _contiguous_inputs(inputs, lambda t: not _unit_last(t))
    writeback = []
    outputs = list(outputs)
    for j, t in enumerate(outputs):
        if not _unit_last(t):
            writeback.append((j, t))
            outputs[j] = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    lay = _layout(lead, inputs + outputs)
    if lay is None:
        inputs = _contiguous_inputs(inputs, lambda t: True)
        lay = _layout(lead, inputs + outputs)
    if lay is None:
        for j, t in enumerate(outputs):
            if not t.is_contiguous():
                writeback.append((j, t))
                outputs[j] = torch.empty(t.shape, dtype=t.dtype, device=t.device)
        lay = _layout(lead, inputs + outputs)
    n_outer, n_inner, strides = lay
    return inputs, outputs, n_outer, n_inner, strides, writeback


def check_act_and_mul_args(a, b, a_name="a", b_name="b") -> None:
    """Validate the two-tensor form's inputs (shared with the ops' fake implementations).

    Raises:
        TypeError: not tensors, unsupported or mismatched dtypes.
        ValueError: a 0-d ``a``, different shapes (no broadcasting) or devices.
        NotImplementedError: a device the kernels cannot run on.
    """
    check_tensor(a_name, a)
    check_tensor(b_name, b)
    if a.dim() < 1:
        raise ValueError(f"{a_name}: expected at least 1 dimension ([*, d]), got a 0-d tensor")
    if a.shape != b.shape:
        raise ValueError(
            f"{b_name}: expected shape {list(a.shape)} ({a_name}'s shape; broadcasting is not supported), "
            f"got {list(b.shape)}"
        )
    if a.dtype != b.dtype:
        raise TypeError(f"{b_name}: expected dtype {a.dtype} ({a_name}'s dtype), got {b.dtype}")
    if a.device != b.device:
        check_same_device(**{a_name: a, b_name: b})


def check_act_and_mul_fused_args(x) -> None:
    """Validate the one-tensor form's input ``x[..., 2d]`` (shared with the fakes).

    Raises:
        TypeError: not a tensor or an unsupported dtype.
        ValueError: a 0-d ``x`` or an odd last dim.
        NotImplementedError: a device the kernels cannot run on.
    """
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x: expected at least 1 dimension ([*, 2d]), got a 0-d tensor")
    if x.shape[-1] % 2:
        raise ValueError(
            f"x: the last dim holds [a, b] halves and must be even, got shape {list(x.shape)}"
        )


def check_out(out, shape, dtype, device, name="out") -> None:
    """Raise TypeError/ValueError unless ``out`` has the expected shape, dtype and device."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(out.shape)}")
    if out.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (the input's), got {out.dtype}")
    if out.device != device:
        raise ValueError(f"{name}: expected device {device} (the input's), got {out.device}")


def _launch_fwd(a, b, out, b_off, n_cols, code):
    lead = out.shape[:-1]
    n_rows = out.numel() // n_cols
    (a, b), (o,), n_outer, n_inner, st, wb = _prepare(lead, [a, b], [out])
    block_m, block_n, warps = _fwd_config(n_rows, n_cols, out)
    grid = (cdiv(n_rows, block_m), cdiv(n_cols, block_n))
    with device_guard(out):
        _act_and_mul_fwd_kernel[grid](
            a, b, o,
            *st[0], *st[1], *st[2],
            b_off, n_rows, n_inner, n_cols,
            ACT=code,
            HAS_OUTER=n_outer > 1,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=warps,
        )
    if wb:
        out.copy_(o)


def act_and_mul_fwd(
    a: torch.Tensor,
    b: torch.Tensor,
    activation: str = "silu",
    approximate: str = "none",
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(a) * b`` for two tensors of one shape.

    Args:
        a: ``[*, d]`` fp16/bf16/fp32, any strides.
        b: ``a``'s shape and dtype, any strides.
        activation: "silu" or "gelu".
        approximate: "none" or "tanh" (gelu only), as ``torch.nn.functional.gelu``.
        out: where to write (``a``'s shape and dtype); a new contiguous tensor when None.

    Returns:
        ``out``: ``[*, d]``, ``a``'s dtype.

    Raises:
        TypeError: not a tensor, or an unsupported / mismatched dtype.
        ValueError: mismatched shapes or devices, a 0-d input, an unknown activation.
        NotImplementedError: a device the kernels cannot run on.
    """
    code = act_code(activation, approximate)
    check_act_and_mul_args(a, b)
    if out is None:
        out = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    else:
        check_out(out, a.shape, a.dtype, a.device)
    n_cols = a.shape[-1]
    if a.numel() == 0:
        return out
    _launch_fwd(a, b, out, 0, n_cols, code)
    return out


def act_and_mul_fused_fwd(
    x: torch.Tensor,
    activation: str = "silu",
    approximate: str = "none",
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(x[..., :d]) * x[..., d:]`` (vLLM's ``SiluAndMul`` layout).

    Args:
        x: ``[*, 2d]`` fp16/bf16/fp32, any strides.
        activation: "silu" or "gelu".
        approximate: "none" or "tanh" (gelu only).
        out: where to write, ``[*, d]`` of x's dtype; a new contiguous tensor when None.

    Returns:
        ``out``: ``[*, d]``, x's dtype.

    Raises:
        TypeError: not a tensor, or an unsupported dtype.
        ValueError: an odd last dim, a 0-d input, a wrong ``out`` shape, an unknown activation.
        NotImplementedError: a device the kernels cannot run on.
    """
    code = act_code(activation, approximate)
    check_act_and_mul_fused_args(x)
    n_cols = x.shape[-1] // 2
    shape = (*x.shape[:-1], n_cols)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    else:
        check_out(out, shape, x.dtype, x.device)
    if out.numel() == 0:
        return out
    if not _unit_last(x):
        x = x.contiguous()
    _launch_fwd(x, x, out, n_cols, n_cols, code)
    return out


def _launch_bwd(dout, a, b, da, db, b_off, n_cols, code):
    lead = dout.shape[:-1]
    n_rows = dout.numel() // n_cols
    (dout, a, b), (da, db), n_outer, n_inner, st, _ = _prepare(lead, [dout, a, b], [da, db])
    block_m, block_n, warps = _config(n_rows, n_cols, a)
    grid = (cdiv(n_rows, block_m), cdiv(n_cols, block_n))
    with device_guard(a):
        _act_and_mul_bwd_kernel[grid](
            dout, a, b, da, db,
            *st[0], *st[1], *st[2], *st[3], *st[4],
            b_off, n_rows, n_inner, n_cols,
            ACT=code,
            HAS_OUTER=n_outer > 1,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=warps,
        )


def _check_dout(dout, shape, dtype, device):
    check_tensor("grad_out", dout)
    if tuple(dout.shape) != tuple(shape):
        raise ValueError(f"grad_out: expected shape {list(shape)} (the forward output's), got {list(dout.shape)}")
    if dout.device != device:
        raise ValueError(f"grad_out: expected device {device} (the input's), got {dout.device}")


def act_and_mul_bwd(
    dout: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    activation: str = "silu",
    approximate: str = "none",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`act_and_mul_fwd`, recomputing ``act(a)``.

    Args:
        dout: gradient of the output, ``a``'s shape (any float dtype of ours, any strides).
        a, b, activation, approximate: the forward's arguments.

    Returns:
        ``(da, db)``: contiguous, ``a``'s shape and dtype.

    Raises:
        TypeError / ValueError / NotImplementedError: as the forward, and a ``dout`` of the wrong shape.
    """
    code = act_code(activation, approximate)
    check_act_and_mul_args(a, b)
    _check_dout(dout, a.shape, a.dtype, a.device)
    da = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    db = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    if a.numel() == 0:
        return da, db
    _launch_bwd(dout, a, b, da, db, 0, a.shape[-1], code)
    return da, db


def act_and_mul_fused_bwd(
    dout: torch.Tensor,
    x: torch.Tensor,
    activation: str = "silu",
    approximate: str = "none",
) -> torch.Tensor:
    """Gradient of :func:`act_and_mul_fused_fwd` with respect to ``x``.

    Args:
        dout: gradient of the output, ``[*, d]``.
        x, activation, approximate: the forward's arguments (``x`` is ``[*, 2d]``).

    Returns:
        ``dx``: contiguous ``[*, 2d]`` of x's dtype (``da`` in the first half, ``db`` in the second).

    Raises:
        TypeError / ValueError / NotImplementedError: as the forward, and a ``dout`` of the wrong shape.
    """
    code = act_code(activation, approximate)
    check_act_and_mul_fused_args(x)
    n_cols = x.shape[-1] // 2
    _check_dout(dout, (*x.shape[:-1], n_cols), x.dtype, x.device)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if dx.numel() == 0:
        return dx
    if not _unit_last(x):
        x = x.contiguous()
    _launch_bwd(dout, x, x, dx, dx, n_cols, n_cols, code)
    return dx


# ---------------------------------------------------------------------------
# Autotuning (kernels/_autotune.py): the forward's tile and warps per device kind
# ---------------------------------------------------------------------------


def _tune_default(key, dev) -> dict:
    rows, n_cols, dtype = key
    bm, bn, warps = _launch_config(rows, n_cols, dtype.itemsize, num_sms(at.torch_device(dev)))
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps}


def _tune_candidates(key, dev) -> list:
    """Tiles of 256-16384 elements (row-contiguous blocks of 128-8192 columns, up to 8 rows) on
    1-16 warps, 4-64 elements per thread; nearest the heuristic first. The interpreter gets two."""
    rows, n_cols, dtype = key
    default = _tune_default(key, dev)
    if dev < 0:  # the interpreter: two cheap variants, enough to exercise tuning
        return [dict(default, num_warps=2 if default["num_warps"] == 1 else 1),
                dict(default, BLOCK_N=max(16, default["BLOCK_N"] // 2))]
    top = next_pow2(n_cols)
    block_ns = [bn for bn in (128, 256, 512, 1024, 2048, 4096, 8192) if bn <= top]
    return at.tile_candidates(default, block_ns, (1, 2, 4, 8), rows, (256, 16384))


def _tune_bench(key, dev, dims):
    """SiLU·mul in vLLM's one-tensor layout, ``[rows, 2d] -> [rows, d]`` (the real call's rows when known)."""
    rows, n_cols, dtype = key
    rows = (dims or {}).get("n_rows", rows)
    device = at.torch_device(dev)
    x = torch.randn(rows, 2 * n_cols, device=device, dtype=dtype)
    out = torch.empty(rows, n_cols, device=device, dtype=dtype)
    return lambda: act_and_mul_fused_fwd(x, "silu", out=out)


TUNABLE = at.register(at.Tunable(
    "act_and_mul",
    fields=("BLOCK_M", "BLOCK_N", "num_warps"),
    key_fields=("rows_bucket", "n_cols", "dtype"),
    default=_tune_default,
    candidates=_tune_candidates,
    make_bench=_tune_bench,
    sources=(_act_and_mul_fwd_kernel, _act, _row_offsets, _launch_fwd),
    nearest_bucket=True,
))


def tune_key(n_rows: int, n_cols: int, dtype: torch.dtype) -> tuple:
    """The forward's autotuning key for ``n_rows`` rows of ``d = n_cols`` (what :func:`_fwd_config` looks up)."""
    return (min(next_pow2(n_rows), _ROWS_BUCKET_CAP), n_cols, dtype)
