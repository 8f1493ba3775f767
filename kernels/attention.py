"""Scaled-dot-product attention, forward only (inference): a Triton flash-attention kernel.

Per query row ``i`` of one (batch, head)::

    s_j = scale * q_i . k_j (+ mask_ij)       j over the keys the row may see
    o_i = sum_j softmax(s)_j * v_j

computed as flash attention does: one program per ``BLOCK_M`` query rows of one head walks
the keys in ``BLOCK_N`` blocks, keeping a running max ``m``, a running sum ``l`` and an fp32
accumulator that is rescaled whenever the max grows (online softmax); no ``[L, S]`` matrix is
ever stored. Exponentials are ``exp2`` with ``log2(e)`` folded into the scale; with an
additive float mask the scores stay in natural units and the ``log2(e)`` factor is applied
to ``s - m`` instead, because a mask of ``finfo(float32).min`` (HF's padding value) times
``log2(e)`` would overflow to ``-inf`` and turn a row torch averages uniformly into a
"fully masked" one.

Semantics follow ``torch.nn.functional.scaled_dot_product_attention``:

- ``is_causal``: top-left aligned, query ``i`` sees keys ``j <= i`` (for ``L > S`` the last
  rows see every key; for ``L < S`` the last keys are seen by nobody). Key blocks entirely
  above the diagonal are skipped.
- ``attn_mask``: bool (True = takes part) or additive float (q's dtype or fp32),
  broadcastable to ``[B, Hq, L, S]``; read through its (zero on broadcast dims) strides.
- GQA (``enable_gqa``): query head ``h`` reads kv head ``h // (Hq // Hkv)``.
- A row with no key to attend to (every key masked out, or ``S == 0``) gives zeros. That is
  what torch 2.13 returns on the CPU: its math kernel's "safe softmax" maps an all ``-inf``
  row to zeros, and its CPU flash kernel gives zeros too (checked for a fully False bool
  row and a fully ``-inf`` float row, fp32/fp16/bf16). Here ``l == 0`` for such a row, and
  the kernel guards both the ``-inf`` running max and the division, so no NaN comes from
  our own arithmetic (a NaN in the inputs or the mask still propagates).

Precision: fp16/bf16 tiles go to ``tl.dot`` as loaded (tensor cores, fp32 accumulation) and
the probabilities are rounded to v's dtype for the second product, as flash kernels do;
fp32 inputs use ``input_precision="ieee"`` (torch's fp32 attention is full fp32). Under
Triton's CPU interpreter ``tl.dot`` on bf16 tiles is wrong (numpy sees bf16 as uint16), so
there bf16 tiles are upcast to fp32 first (``UPCAST``).

Layouts: any strides for q/k/v (HF passes transposed views of ``[B, L, H, D]`` tensors and
expanded ``repeat_kv`` tensors), int64 batch/head/row offsets (tensors above 2**31
elements). The output is allocated ``[B, L, Hq, Dv]``-contiguous and returned as its
``[B, Hq, L, Dv]`` transpose, the layout torch's flash kernel returns (HF transposes back for free).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _autotune as at
from ._common import cdiv, check_same_device, check_tensor, device_guard, interpreter_mode, next_pow2
from ._launch import jit

__all__ = ["flash_attention", "attention_config", "check_attention_args", "MAX_HEAD_DIM", "MAX_GRID_DIM", "broadcasts"]

MAX_HEAD_DIM = 256  # head dims (q/k and v) above it would need a D loop; left to torch
MAX_GRID_DIM = 65535  # heads and batch sit on grid axes 1 and 2

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)

# Mask kinds (constexpr MASK_KIND).
_NO_MASK, _BOOL_MASK, _FLOAT_MASK = 0, 1, 2


@triton.jit
def _attn_block(
    acc, l_i, m_i, q,
    k_ptrs, v_ptrs, mask_ptrs,
    offs_m, offs_n0, offs_d, offs_dv,
    start_n,  # the key the pointer tiles point at (a multiple of BLOCK_N)
    end_n,  # one past the last key of this call
    seq_q, seq_k,
    stride_kn, stride_vn, stride_mn,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    MASK_KIND: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,  # apply j <= i (the diagonal blocks)
    CHECK_N: tl.constexpr,  # apply j < seq_k (the last, partial block)
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) over keys [start_n, end_n), BLOCK_N at a time.

    The pointer tiles come in pointing at key ``start_n`` and are returned advanced past the
    last block (so the next call continues there without an offset multiply that could
    overflow int32).

    Scores are in log2 units (``qk_scale`` holds ``scale * log2(e)``) except with a float
    mask, where they are in natural units and ``log2(e)`` multiplies ``s - m`` (see the module
    docstring). ``m_i`` is the running max in those units.
    """
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V
    row_ok = offs_m < seq_q
    for start in range(start_n, end_n, BLOCK_N):
        offs_n = start + offs_n0
        n_ok = offs_n < seq_k
        if CHECK_N:
            k = tl.load(k_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_D, BLOCK_N]
        else:
            k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N] fp32
        if MASK_KIND == 1:
            keep = tl.load(mask_ptrs, mask=row_ok[:, None] & n_ok[None, :], other=0)
            s = tl.where(keep != 0, s, float("-inf"))
        if MASK_KIND == 2:
            bias = tl.load(mask_ptrs, mask=row_ok[:, None] & n_ok[None, :], other=float("-inf"))
            s += bias.to(tl.float32)
        if CAUSAL_MASK:
            s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
        if CHECK_N:
            s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with every key so far masked keeps m = -inf: subtract 0 instead (p = 0, no NaN).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        if MASK_KIND == 2:
            p = tl.math.exp2((s - m_safe[:, None]) * LOG2E)
            alpha = tl.math.exp2((m_i - m_safe) * LOG2E)
        else:
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if CHECK_N:
            v = tl.load(v_ptrs, mask=n_ok[:, None] & dv_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_DV]
        else:
            v = tl.load(v_ptrs, mask=dv_ok[None, :], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        # P rounded to v's dtype: the second product runs on tensor cores like the first.
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
        if MASK_KIND != 0:
            mask_ptrs += BLOCK_N * stride_mn
    return acc, l_i, m_i, k_ptrs, v_ptrs, mask_ptrs


@jit
def _attn_fwd_kernel(
    q_ptr,  # [B, Hq, L, D]
    k_ptr,  # [B, Hkv, S, D]
    v_ptr,  # [B, Hkv, S, Dv]
    mask_ptr,  # [B, Hq, L, S] (broadcast strides) bool-as-uint8 or float; unused without a mask
    o_ptr,  # [B, Hq, L, Dv] (a [B, L, Hq, Dv]-contiguous buffer)
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    seq_q,  # L
    seq_k,  # S
    kv_group,  # Hq // Hkv
    qk_scale,  # scale * log2(e), or scale with a float mask
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    MASK_KIND: tl.constexpr,  # 0 none, 1 bool, 2 additive float
    IS_CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    # Float scalars to fp32 once: Triton's launcher passes Python floats as fp32, Inductor's wrapper
    # as fp64 (the math would turn fp64); so both launchers compile this kernel alike.
    qk_scale = tl.cast(qk_scale, tl.float32)
    n_m = tl.cdiv(seq_q, BLOCK_M)
    pid_m = tl.program_id(0)
    if IS_CAUSAL:
        pid_m = n_m - 1 - pid_m  # longest rows first: better tail balance
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    h_kv = h // kv_group

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < seq_q

    q_ptrs = q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)  # [BLOCK_M, BLOCK_D]
    if UPCAST:
        q = q.to(tl.float32)
    # K is read transposed ([BLOCK_D, BLOCK_N]) so that q @ k needs no in-register transpose.
    k_ptrs = k_ptr + b * stride_kb + h_kv * stride_kh + offs_n0[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = v_ptr + b * stride_vb + h_kv * stride_vh + offs_n0[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    mask_ptrs = mask_ptr + b * stride_mb + h * stride_mh + offs_m[:, None] * stride_mm + offs_n0[None, :] * stride_mn

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # Keys below `full_end` need no bounds or causal check: whole blocks, seen by every row
    # of this block. The rest (the diagonal blocks, the partial last block) are checked.
    if IS_CAUSAL:
        end = tl.minimum(seq_k, (pid_m + 1) * BLOCK_M)  # keys j <= i < (pid_m + 1) * BLOCK_M
        full_end = (tl.minimum(seq_k, pid_m * BLOCK_M) // BLOCK_N) * BLOCK_N
    else:
        end = seq_k
        full_end = (seq_k // BLOCK_N) * BLOCK_N
    acc, l_i, m_i, k_ptrs, v_ptrs, mask_ptrs = _attn_block(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptrs, offs_m, offs_n0, offs_d, offs_dv,
        0, full_end, seq_q, seq_k, stride_kn, stride_vn, stride_mn, qk_scale,
        HEAD_DIM, HEAD_DIM_V, MASK_KIND, False, False, UPCAST, PRECISION, BLOCK_N,
    )
    acc, l_i, m_i, k_ptrs, v_ptrs, mask_ptrs = _attn_block(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptrs, offs_m, offs_n0, offs_d, offs_dv,
        full_end, end, seq_q, seq_k, stride_kn, stride_vn, stride_mn, qk_scale,
        HEAD_DIM, HEAD_DIM_V, MASK_KIND, IS_CAUSAL, True, UPCAST, PRECISION, BLOCK_N,
    )

    # l == 0: no key was visible (fully masked row, S == 0); acc is 0 there, so the row is 0.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


def attention_config(seq_q: int, block_d: int, elem_bytes: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for ``seq_q`` query rows and head block ``block_d``: the
    heuristic, the autotuner's default (``TUNABLE`` below).

    Swept on the H100 (``benchmarks/sweep.py --only attention``; bf16, 32 heads of 128): for a
    causal 2048-token prefill no candidate (BLOCK_M 64/128 x BLOCK_N 64/128 x 4/8 warps x 2/3
    stages) beat 128 x 64, 8 warps, 3 stages (182 us, native flash 83 us); for decode (8 x 1
    query, 1024 keys) 16 x 64 with 8 warps, 3 stages was best (52 us). The rest is not swept: the usual flash-attention tiles, sized by shared
    memory and checked only for register spills (``ptxas -v`` on an offline sm_90a compile,
    unit last-dim strides). 16-bit: 128 x 64, 8 warps, 3 stages up to D = 128 (Q 32 KiB plus
    three K/V stages of 16 KiB each); 64 x 32, 4 warps, 2 stages for D = 256. Short queries
    take 64- or 16-row tiles with 4 warps, so decode (L = 1) wastes 15 rows of a tile, not 127.
    fp32 (IEEE, so FMA dots that hold their operands in registers): 32 x 32 up to D = 64,
    16 x 32 up to 128, 16 x 16 for 256; larger tiles spilled. In the interpreter 16 x 16 tiles
    keep the tests fast and still walk several key blocks (the rescaling path).
    """
    if interpreter_mode():
        return 16, 16, 1, 1
    if elem_bytes == 4:
        if block_d <= 64:
            return 32, 32, 4, 2
        return (16, 32, 4, 2) if block_d <= 128 else (16, 16, 4, 2)
    if seq_q <= 16:  # decode; 8 warps from the H100 sweep (52 us vs 4 warps' 64 us, native 48 us)
        bm, warps = 16, 8
    elif seq_q <= 64:
        bm, warps = 64, 4
    else:
        bm, warps = 128, 8
    if block_d > 128:
        return min(bm, 64), 32, 4, 2
    return bm, 64, warps, 3


def check_attention_args(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False) -> None:
    """Validate the arguments of :func:`flash_attention`.

    Raises:
        TypeError: not tensors, dtypes other than one shared fp16/bf16/fp32, a mask dtype other
            than bool, q's dtype or fp32.
        ValueError: ranks, mismatched batch/head/sequence/head-dim sizes, head counts GQA
            cannot pair, a mask that does not broadcast to ``[B, Hq, L, S]``, a mask with
            ``is_causal``, tensors on different devices.
        NotImplementedError: devices the kernel does not run on, nested tensors, head dims
            above 256, batch or head counts above 65535.
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("attn_mask", attn_mask)):
        if getattr(t, "is_nested", False):
            raise NotImplementedError(f"{name}: nested tensors are not supported")
    check_tensor("q", q)
    check_tensor("k", k)
    check_tensor("v", v)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (q's), got {t.dtype}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor [batch, heads, seq, head_dim], got shape {list(t.shape)}")
    check_same_device(q=q, k=k, v=v, attn_mask=attn_mask)
    bsz, hq, _, d = q.shape
    _, hkv, s, dk = k.shape
    if k.shape[0] != bsz or v.shape[0] != bsz:
        raise ValueError(f"k, v: expected batch {bsz} (q's), got {k.shape[0]} and {v.shape[0]}")
    if v.shape[1] != hkv or v.shape[2] != s:
        raise ValueError(f"v: expected {hkv} heads and {s} keys (k's), got shape {list(v.shape)}")
    if dk != d:
        raise ValueError(f"k: expected head dim {d} (q's), got shape {list(k.shape)}")
    if enable_gqa:
        if hkv == 0 or hq % hkv != 0:
            if not hq == hkv == 0:
                raise ValueError(f"k: {hkv} kv heads do not divide q's {hq} heads (enable_gqa=True)")
    elif hkv != hq:
        raise ValueError(f"k: expected {hq} heads (q's), got {hkv}; pass enable_gqa=True for grouped-query attention")
    if d == 0:
        raise ValueError("q: head dim 0 (the default scale 1/sqrt(D) is undefined)")
    if d > MAX_HEAD_DIM or v.shape[3] > MAX_HEAD_DIM:
        raise NotImplementedError(f"q, v: head dims {d} and {v.shape[3]}; the kernel takes up to {MAX_HEAD_DIM}")
    if bsz > MAX_GRID_DIM or hq > MAX_GRID_DIM:
        raise NotImplementedError(f"q: batch {bsz} and heads {hq}; the kernel takes up to {MAX_GRID_DIM} of each")
    if attn_mask is not None:
        check_tensor("attn_mask", attn_mask, (torch.bool, q.dtype, torch.float32))
        if is_causal:
            raise ValueError("attn_mask: must be None with is_causal=True (torch's math kernel raises too)")
        full = (bsz, hq, q.shape[2], s)
        if attn_mask.dim() > 4 or not broadcasts(attn_mask.shape, full):
            raise ValueError(f"attn_mask: shape {list(attn_mask.shape)} does not broadcast to {list(full)}")


def broadcasts(shape, full) -> bool:
    """Whether ``shape`` broadcasts to ``full`` (right-aligned, sizes equal or 1)."""
    if len(shape) > len(full):
        return False
    return all(have in (1, want) for have, want in zip(reversed(shape), reversed(full)))


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``softmax(q @ k^T * scale + mask) @ v`` per (batch, head), without dropout.

    Args:
        q: ``[B, Hq, L, D]`` fp16/bf16/fp32, any strides.
        k: ``[B, Hkv, S, D]``, q's dtype, any strides (expanded views included).
        v: ``[B, Hkv, S, Dv]``, q's dtype, any strides.
        attn_mask: None, bool (True = takes part) or an additive float mask of q's dtype or
            fp32, broadcastable to ``[B, Hq, L, S]`` (read through its strides, never copied).
        is_causal: query ``i`` sees keys ``j <= i`` (top-left aligned, as torch). Not with a mask.
        scale: score scale; ``1 / sqrt(D)`` when None.
        enable_gqa: allow ``Hq`` a multiple of ``Hkv`` (query head ``h`` reads kv head
            ``h // (Hq // Hkv)``); otherwise ``Hq == Hkv``.

    Returns:
        ``[B, Hq, L, Dv]`` in q's dtype: the transpose of a contiguous ``[B, L, Hq, Dv]``
        tensor. Rows with no visible key (all masked, or ``S == 0``) are zeros.

    Raises:
        TypeError / ValueError / NotImplementedError: see :func:`check_attention_args`.
    """
    check_attention_args(q, k, v, attn_mask, is_causal, enable_gqa)
    bsz, hq, seq_q, d = q.shape
    hkv, seq_k, dv = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty((bsz, seq_q, hq, dv), dtype=q.dtype, device=q.device).transpose(1, 2)
    if out.numel() == 0:
        return out
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    mask_kind = _NO_MASK
    mask = q  # a placeholder pointer when there is no mask
    mask_strides = (0, 0, 0, 0)
    if attn_mask is not None:
        mask = attn_mask.expand(bsz, hq, seq_q, seq_k)  # stride 0 on broadcast dims, no copy
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)  # same bytes; the kernel tests != 0
            mask_kind = _BOOL_MASK
        else:
            mask_kind = _FLOAT_MASK
        mask_strides = mask.stride()
    # Float masks keep natural units (see the module docstring); otherwise log2 units.
    qk_scale = float(scale) if mask_kind == _FLOAT_MASK else float(scale) * LOG2E.value
    block_d, block_dv = max(16, next_pow2(d)), max(16, next_pow2(dv))
    key = tune_key(seq_q, seq_k, bsz * hq, max(block_d, block_dv), q.dtype, is_causal, mask_kind)
    dev = q.get_device()
    cfg = TUNABLE.chosen.get((dev, key))
    if cfg is None:
        cfg = TUNABLE.resolve(key, dev, {"seq_q": seq_q, "seq_k": seq_k, "heads": bsz * hq, "head_dim": d})
    bm, bn, warps, stages = cfg
    upcast = interpreter_mode() and q.dtype == torch.bfloat16
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # the 16-bit dot ignores it
    grid = (cdiv(seq_q, bm), hq, bsz)
    with device_guard(q):
        _attn_fwd_kernel[grid](
            q, k, v, mask, out,
            *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
            seq_q, seq_k, hq // hkv, qk_scale,
            HEAD_DIM=d,
            HEAD_DIM_V=dv,
            MASK_KIND=mask_kind,
            IS_CAUSAL=bool(is_causal),
            UPCAST=upcast,
            PRECISION=precision,
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_D=block_d,
            BLOCK_DV=block_dv,
            num_warps=warps,
            num_stages=stages,
        )
    return out


# --------------------------------------------------------------------------- autotuning

_SEQ_CAP = 1 << 20


def tune_key(seq_q, seq_k, heads, block_d, dtype, is_causal, mask_kind) -> tuple:
    """The autotuning key: (query rows bucket, keys bucket, batch * heads bucket, head block, dtype, causal,
    mask kind: 0 none, 1 bool, 2 float)."""
    return (at.pow2_bucket(seq_q, _SEQ_CAP), at.pow2_bucket(seq_k, _SEQ_CAP), at.pow2_bucket(heads, _SEQ_CAP),
            block_d, dtype, bool(is_causal), mask_kind)


def smem_estimate(bm: int, bn: int, warps: int, stages: int, block_d: int, elem_bytes: int, mask_kind: int) -> int:
    """An upper bound of one program's shared memory, in bytes: per pipeline stage a K, a V and a mask
    tile (bool 1 byte, float masks counted at 4); Q twice; two more K/V tiles (three with 8 warps) and
    half a mask tile when the tiles take wgmma (64+ query rows), else 1.5 (2 with 8 warps) K/V tiles.
    Fitted to the compiled size of every candidate (Triton 3.6, sm_90, head blocks 64 and 128, each
    mask kind, causal or not: 288 compiles): never below it. Being an upper bound, it also leaves out
    a few configs that would just fit (128 x 128 with 2 stages at D = 128 takes 229376 of the 232448
    bytes of an H100 or H200)."""
    q = bm * block_d * elem_bytes
    kv = bn * block_d * elem_bytes
    mask = (0, 1, 4)[mask_kind] * bm * bn
    if bm >= 64:
        extra = (3 if warps >= 8 else 2) * kv + mask // 2
    else:
        extra = (4 if warps >= 8 else 3) * kv // 2
    return stages * (2 * kv + mask) + 2 * q + extra


def _fits(cfg: dict, key, dev) -> bool:
    """Whether ``cfg`` fits in device ``dev``'s shared memory (:func:`smem_estimate`; always under the interpreter)."""
    limit = at.max_shared_memory(dev)
    if limit is None:
        return True
    _, _, _, block_d, dtype, _, mask_kind = key
    need = smem_estimate(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"], block_d,
                         dtype.itemsize, mask_kind)
    return need <= limit


def _tune_default(key, dev) -> dict:
    """The heuristic (:func:`attention_config`), with fewer stages, then narrower key tiles, where its
    tiles do not fit in the device's shared memory (a float mask's tiles at D = 128 on H100)."""
    seq_q, _, _, block_d, dtype, _, _ = key
    bm, bn, warps, stages = attention_config(seq_q, block_d, dtype.itemsize)
    cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
    while not _fits(cfg, key, dev):
        if cfg["num_stages"] > 2:
            cfg["num_stages"] -= 1
        elif cfg["BLOCK_N"] > 16:
            cfg["BLOCK_N"] //= 2
        else:
            break
    return cfg


def _tune_candidates(key, dev) -> list:
    """16-bit inputs with head blocks up to 128: query tiles 16-128 (not above the bucket's rows but
    at least 16), key tiles 32-128, 4 or 8 warps, 2 or 3 stages (the H100 sweep's space, plus 32-row
    and 32-column tiles), less those whose shared memory does not fit the device (:func:`smem_estimate`:
    such a launch raises ``OutOfResources``). fp32 and wider heads keep the heuristic (larger tiles
    spilled)."""
    seq_q, seq_k, _, block_d, dtype, _, _ = key
    default = _tune_default(key, dev)
    if dev < 0:
        return [dict(default, BLOCK_N=32 if default["BLOCK_N"] == 16 else 16)]
    if dtype.itemsize != 2 or block_d > 128:
        return []
    top_m = max(16, seq_q)
    out = [{"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
           for bm in (16, 32, 64, 128) if bm <= top_m
           for bn in (32, 64, 128) if bn <= max(32, seq_k)
           for w in (4, 8) for st in (2, 3)]
    return at.near_first(default, [c for c in out if _fits(c, key, dev)])


def _tune_bench(key, dev, dims):
    """Attention of one batch of ``heads`` heads, the key's sequence lengths and head dim; a bool
    mask (all True below the diagonal) or an fp32 additive one when the key has a mask."""
    seq_q, seq_k, heads, block_d, dtype, causal, mask_kind = key
    dims = dims or {}
    seq_q, seq_k, heads = dims.get("seq_q", seq_q), dims.get("seq_k", seq_k), dims.get("heads", heads)
    d = dims.get("head_dim", block_d)
    device = at.torch_device(dev)
    q = torch.randn(1, seq_q, heads, d, device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(1, seq_k, heads, d, device=device, dtype=dtype).transpose(1, 2)
    v = torch.randn(1, seq_k, heads, d, device=device, dtype=dtype).transpose(1, 2)
    mask = None
    if mask_kind != _NO_MASK:
        mask = torch.ones(seq_q, seq_k, device=device, dtype=torch.bool).tril(seq_k - seq_q)
        if mask_kind == _FLOAT_MASK:
            mask = torch.zeros(seq_q, seq_k, device=device).masked_fill(~mask, float("-inf"))
    return lambda: flash_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)


TUNABLE = at.register(at.Tunable(
    "attention",
    fields=("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"),
    key_fields=("seq_q_bucket", "seq_k_bucket", "heads_bucket", "block_d", "dtype", "is_causal", "mask_kind"),
    default=_tune_default,
    candidates=_tune_candidates,
    make_bench=_tune_bench,
    sources=(_attn_fwd_kernel, _attn_block, smem_estimate, _fits),
))
