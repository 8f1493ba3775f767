"""Rotary position embedding (RoPE) of q and k in one launch, forward and inverse.

For each token, with ``r`` the rotary dim (even, ``r <= head_dim``) and pair ``j < r/2``::

    rotate-half (NeoX / Llama):  x1 = x[j],    x2 = x[j + r/2]
    interleaved (GPT-J):         x1 = x[2j],   x2 = x[2j + 1]
    y1 = x1 * c1 - x2 * s1
    y2 = x2 * c2 + x1 * s2

``c1, s1, c2, s2`` come from the token's row of the cos / sin tables:

- half tables ``[max_pos, r/2]`` (upstream FlagGems, vLLM's cos_sin_cache halves):
  ``c1 = c2 = cos[pos, j]``;
- full tables ``[.., r]`` (HF transformers' ``q * cos + rotate_half(q) * sin``): ``c1`` and ``c2``
  are the table entries of the two output positions (``cos[j]`` / ``cos[j + r/2]``, or
  ``cos[2j]`` / ``cos[2j + 1]`` interleaved), so the op is exact for any table.

Dims ``r..head_dim`` are copied unchanged (out of place) or left alone (in place).
The inverse rotation (the backward: the transpose of the map above) is the same kernel
with ``s1, s2 <- -s2, -s1`` (``INVERSE``); with half tables that is just ``sin`` negated.

Layout: q and k are seen as ``[n_outer, n_inner, heads, head_dim]`` (any strides, unit
stride on head_dim; a tensor without such a view is copied). The grid is
``(tokens, q head blocks + k head blocks)``: each program loads its token's table row once
(fp32, whatever the table dtype) and rotates a ``[BLOCK_H, r/2]`` block of heads of q or
of k, so q and k (different head counts, GQA) share one launch. The table row of a token
is ``o * stride_o + i * stride_i`` (+ ``pos * stride_p`` with positions), which covers
``cos[position_ids]``, ``cos[s]`` and HF's ``cos[b, s]`` (``stride_o = 0`` when broadcast).

Positions out of ``[0, max_pos)``: a host check raises ValueError when the positions are
on the CPU (cheap); on a GPU the check would cost a device sync, so the kernel instead
writes NaN into the rotated dims of such tokens (never a read out of bounds).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _autotune as at
from ._common import cdiv, check_same_device, check_tensor, device_guard, next_pow2
from ._launch import jit

__all__ = [
    "rope_fwd",
    "rope_hf_fwd",
    "rope_cache_fwd",
    "check_rope_args",
    "check_rope_hf_args",
    "check_rope_cache_args",
    "rope_config",
]

INDEX_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _rope_heads(
    x_row,  # pointer to head 0 of this token in the input
    o_row,  # pointer to head 0 of this token in the output (may equal x_row)
    stride_x_h,
    stride_o_h,
    n_heads,
    hb,  # head block index
    c1, s1, c2, s2,  # [BLOCK_R2] fp32 table values of this token
    HALF_ROT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    COPY_PASS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R2: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = h < n_heads
    h = h.to(tl.int64)
    x_rows = x_row + h[:, None] * stride_x_h
    o_rows = o_row + h[:, None] * stride_o_h
    if INTERLEAVED:
        # One contiguous load of the pairs, split in registers (coalesced, unlike
        # two stride-2 loads), joined back for one contiguous store.
        d = tl.arange(0, 2 * BLOCK_R2)
        mask = hmask[:, None] & (d < 2 * HALF_ROT)[None, :]
        x = tl.load(x_rows + d[None, :], mask=mask, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, [BLOCK_H, BLOCK_R2, 2]))
        y1 = x1 * c1[None, :] - x2 * s1[None, :]
        y2 = x2 * c2[None, :] + x1 * s2[None, :]
        y = tl.reshape(tl.join(y1, y2), [BLOCK_H, 2 * BLOCK_R2])
        tl.store(o_rows + d[None, :], y.to(o_row.dtype.element_ty), mask=mask)
    else:
        j = tl.arange(0, BLOCK_R2)
        mask = hmask[:, None] & (j < HALF_ROT)[None, :]
        x1 = tl.load(x_rows + j[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_rows + HALF_ROT + j[None, :], mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * c1[None, :] - x2 * s1[None, :]
        y2 = x2 * c2[None, :] + x1 * s2[None, :]
        tl.store(o_rows + j[None, :], y1.to(o_row.dtype.element_ty), mask=mask)
        tl.store(o_rows + HALF_ROT + j[None, :], y2.to(o_row.dtype.element_ty), mask=mask)
    if COPY_PASS:
        # Partial rotary, out of place: dims past the rotary dim are copied as they are.
        p = 2 * HALF_ROT + tl.arange(0, BLOCK_P)
        pmask = hmask[:, None] & (p < HEAD_DIM)[None, :]
        v = tl.load(x_rows + p[None, :], mask=pmask, other=0.0)
        tl.store(o_rows + p[None, :], v, mask=pmask)


@jit
def _rope_kernel(
    q_ptr,  # [n_outer, n_inner, n_q_heads, HEAD_DIM]
    k_ptr,  # [n_outer, n_inner, n_k_heads, HEAD_DIM] (unused when n_k_heads == 0)
    q_out_ptr,  # q's shape; may be q_ptr (in place)
    k_out_ptr,  # k's shape; may be k_ptr
    cos_ptr,  # table rows of HALF_ROT (half) or 2 * HALF_ROT (full) entries, unit stride
    sin_ptr,  # as cos
    pos_ptr,  # [n_outer, n_inner] int32/int64 table rows (unused without HAS_POS)
    stride_q_o, stride_q_i, stride_q_h,
    stride_k_o, stride_k_i, stride_k_h,
    stride_qo_o, stride_qo_i, stride_qo_h,
    stride_ko_o, stride_ko_i, stride_ko_h,
    stride_cos_o, stride_cos_i, stride_cos_p,
    stride_sin_o, stride_sin_i, stride_sin_p,
    stride_pos_o, stride_pos_i,
    n_inner,
    n_q_heads,
    n_k_heads,
    n_q_blocks,  # cdiv(n_q_heads, BLOCK_HQ): program_id(1) below this is a q block
    n_pos,  # table rows (positions must lie in [0, n_pos))
    HALF_ROT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HAS_POS: tl.constexpr,
    FULL_TABLE: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    INVERSE: tl.constexpr,
    COPY_PASS: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_R2: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    o = pid // n_inner
    i = pid - o * n_inner
    cos_row = cos_ptr + o * stride_cos_o + i * stride_cos_i
    sin_row = sin_ptr + o * stride_sin_o + i * stride_sin_i
    # n_rot: pairs this token rotates (0 for an out-of-range position, whose table
    # entries then read as NaN: see the module doc).
    n_rot = HALF_ROT
    if HAS_POS:
        pos = tl.load(pos_ptr + o * stride_pos_o + i * stride_pos_i).to(tl.int64)
        in_range = (pos >= 0) & (pos < n_pos)
        pos = tl.where(in_range, pos, 0)
        cos_row += pos * stride_cos_p
        sin_row += pos * stride_sin_p
        n_rot = tl.where(in_range, HALF_ROT, 0)

    # Table values in fp32, loaded once per program and broadcast over its heads.
    j = tl.arange(0, BLOCK_R2)
    jmask = j < n_rot
    if FULL_TABLE:
        if INTERLEAVED:
            d = tl.arange(0, 2 * BLOCK_R2)
            dmask = d < 2 * n_rot
            c = tl.load(cos_row + d, mask=dmask, other=float("nan")).to(tl.float32)
            s = tl.load(sin_row + d, mask=dmask, other=float("nan")).to(tl.float32)
            c1, c2 = tl.split(tl.reshape(c, [BLOCK_R2, 2]))
            s1, s2 = tl.split(tl.reshape(s, [BLOCK_R2, 2]))
        else:
            c1 = tl.load(cos_row + j, mask=jmask, other=float("nan")).to(tl.float32)
            s1 = tl.load(sin_row + j, mask=jmask, other=float("nan")).to(tl.float32)
            c2 = tl.load(cos_row + HALF_ROT + j, mask=jmask, other=float("nan")).to(tl.float32)
            s2 = tl.load(sin_row + HALF_ROT + j, mask=jmask, other=float("nan")).to(tl.float32)
    else:
        c1 = tl.load(cos_row + j, mask=jmask, other=float("nan")).to(tl.float32)
        s1 = tl.load(sin_row + j, mask=jmask, other=float("nan")).to(tl.float32)
        c2 = c1
        s2 = s1
    if INVERSE:
        # Transpose of [[c1, -s1], [s2, c2]] is [[c1, s2], [-s1, c2]].
        s1, s2 = -s2, -s1

    if hb < n_q_blocks:
        _rope_heads(
            q_ptr + o * stride_q_o + i * stride_q_i,
            q_out_ptr + o * stride_qo_o + i * stride_qo_i,
            stride_q_h, stride_qo_h, n_q_heads, hb,
            c1, s1, c2, s2,
            HALF_ROT, HEAD_DIM, INTERLEAVED, COPY_PASS, BLOCK_HQ, BLOCK_R2, BLOCK_P,
        )
    else:
        _rope_heads(
            k_ptr + o * stride_k_o + i * stride_k_i,
            k_out_ptr + o * stride_ko_o + i * stride_ko_i,
            stride_k_h, stride_ko_h, n_k_heads, hb - n_q_blocks,
            c1, s1, c2, s2,
            HALF_ROT, HEAD_DIM, INTERLEAVED, COPY_PASS, BLOCK_HK, BLOCK_R2, BLOCK_P,
        )


@functools.lru_cache(maxsize=None)
def rope_config(n_q_heads: int, n_k_heads: int, half_rot: int, head_dim: int, elem_bytes: int, copy_pass: bool):
    """Block sizes and warps of the RoPE kernel: the heuristic, the autotuner's default (``TUNABLE`` below).

    A program rotates up to 1024 pairs (``BLOCK_H * BLOCK_R2``; 4 KiB read + 4 KiB written
    in bf16), enough to hide latency while keeping several programs per token for
    parallelism at small token counts (Llama-3-8B, 32 q / 8 kv heads, D=128: blocks of 16
    q heads and 8 k heads, 3 programs per token). Warps are sized so that a thread moves
    two 16-byte vectors per half of a pair tile: the H100 sweep (benchmarks/NOTES.md) put
    2 warps ahead of 4 at every token count, by 3-12 %.

    Returns:
        (BLOCK_HQ, BLOCK_HK, BLOCK_R2, BLOCK_P, num_warps)
    """
    block_r2 = next_pow2(half_rot)
    cap = max(1, 1024 // block_r2)
    block_hq = min(next_pow2(n_q_heads), cap)
    block_hk = min(next_pow2(n_k_heads), cap)
    block_p = next_pow2(head_dim - 2 * half_rot) if copy_pass else 1
    vec = max(1, 16 // elem_bytes)
    warps = max(1, min(8, (block_hq * block_r2) // (2 * vec * 32)))
    return block_hq, block_hk, block_r2, block_p, warps


# ----------------------------------------------------------------------- checks


def _check_index(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name}: expected an int32 or int64 tensor of table rows, got dtype {t.dtype}")


def _check_qk(q, k):
    check_tensor("q", q)
    if k is not None:
        check_tensor("k", k)
        if k.dtype != q.dtype:
            raise TypeError(f"k: expected q's dtype {q.dtype}, got {k.dtype}")
        if k.dim() != q.dim():
            raise ValueError(f"k: expected {q.dim()} dims like q {list(q.shape)}, got {list(k.shape)}")
    head_dim = q.shape[-1]
    if head_dim % 2:
        raise ValueError(f"q: head_dim (last dim) must be even, got {head_dim}")
    if k is not None and k.shape[-1] != head_dim:
        raise ValueError(f"k: expected head_dim {head_dim} (q's last dim), got {k.shape[-1]}")


def _check_table_pair(cos, sin):
    check_tensor("cos", cos)
    check_tensor("sin", sin)
    if sin.shape != cos.shape:
        raise ValueError(f"sin: expected cos's shape {list(cos.shape)}, got {list(sin.shape)}")


def _check_rot(rot, head_dim, what):
    if rot < 2 or rot % 2 or rot > head_dim:
        raise ValueError(f"{what}: rotary dim {rot} must be even and in [2, head_dim={head_dim}]")


def check_rope_args(q, k, cos, sin, position_ids):
    """Validate the upstream layout: q ``(*, Hq, D)``, k ``(*, Hk, D)``, half tables ``[max_pos, r/2]``.

    Returns:
        (half_rot, n_pos)

    Raises:
        TypeError / ValueError / NotImplementedError: what is wrong, naming the argument.
    """
    _check_qk(q, k)
    if q.dim() < 3:
        raise ValueError(f"q: expected (*, heads, head_dim) with at least one token dim, got {list(q.shape)}")
    if k is not None and k.shape[:-2] != q.shape[:-2]:
        raise ValueError(f"k: token dims {list(k.shape[:-2])} do not match q's {list(q.shape[:-2])}")
    _check_table_pair(cos, sin)
    if cos.dim() != 2:
        raise ValueError(f"cos: expected a half table [max_pos, rotary_dim // 2], got {list(cos.shape)}")
    head_dim = q.shape[-1]
    if 2 * cos.shape[1] > head_dim:
        raise ValueError(
            f"cos: expected a half table [max_pos, rotary_dim // 2] with rotary_dim <= head_dim={head_dim}, "
            f"got {list(cos.shape)} (for full [.., rotary_dim] tables use apply_rotary_pos_emb_hf)"
        )
    _check_rot(2 * cos.shape[1], head_dim, "cos")
    n_pos = cos.shape[0]
    if position_ids is None:
        if q.dim() != 4:
            raise ValueError(f"q: without position_ids q must be [batch, seq, heads, head_dim], got {list(q.shape)}")
        if q.shape[1] > n_pos:
            raise ValueError(f"q: sequence length {q.shape[1]} exceeds the table's {n_pos} rows (cos.shape[0])")
    else:
        _check_index("position_ids", position_ids)
        if position_ids.shape != q.shape[:-2]:
            raise ValueError(
                f"position_ids: expected q's token dims {list(q.shape[:-2])}, got {list(position_ids.shape)}"
            )
    check_same_device(q=q, k=k, cos=cos, sin=sin, position_ids=position_ids)
    return cos.shape[1], n_pos


def _hf_table_3d(t, batch, seq):
    """An HF table ``[S, r]``, ``[B or 1, S, r]`` or ``[B or 1, 1, S, r]`` as ``[B or 1, S, r]``."""
    if t.dim() == 2:
        t = t.unsqueeze(0)
    elif t.dim() == 4 and t.shape[1] == 1:
        t = t.squeeze(1)
    if t.dim() != 3 or t.shape[0] not in (1, batch) or t.shape[1] != seq:
        return None
    return t


def check_rope_hf_args(q, k, cos, sin):
    """Validate the HF layout: q ``[B, Hq, S, D]``, k ``[B, Hk, S, D]``, full tables ``[B or 1, S, r]``.

    Returns:
        (half_rot, cos3, sin3): tables seen as ``[B or 1, S, r]``.

    Raises:
        TypeError / ValueError / NotImplementedError: what is wrong, naming the argument.
    """
    _check_qk(q, k)
    if q.dim() != 4:
        raise ValueError(f"q: expected [batch, heads, seq, head_dim], got {list(q.shape)}")
    if k is not None and (k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]):
        raise ValueError(f"k: batch and seq of {list(k.shape)} do not match q's {list(q.shape)}")
    _check_table_pair(cos, sin)
    batch, seq = q.shape[0], q.shape[2]
    cos3, sin3 = _hf_table_3d(cos, batch, seq), _hf_table_3d(sin, batch, seq)
    if cos3 is None or sin3 is None:
        raise ValueError(
            f"cos: expected a full table [{batch} or 1, {seq}, rotary_dim] (or [{seq}, rotary_dim]), "
            f"got {list(cos.shape)}"
        )
    _check_rot(cos.shape[-1], q.shape[-1], "cos")
    check_same_device(q=q, k=k, cos=cos, sin=sin)
    return cos.shape[-1] // 2, cos3, sin3


def check_rope_cache_args(positions, query, key, head_size, cos_sin_cache):
    """Validate vLLM's layout: ``positions (*)``, query ``(*, Hq * D)`` or ``(*, Hq, D)``, cache ``[max_pos, r]``.

    Returns:
        (n_q_heads, n_k_heads): head counts (0 without a key).

    Raises:
        TypeError / ValueError / NotImplementedError: what is wrong, naming the argument.
    """
    _check_index("positions", positions)
    if positions.dim() < 1:
        raise ValueError("positions: expected at least one dim of tokens, got a 0-d tensor")
    check_tensor("query", query)
    if not isinstance(head_size, int) or head_size <= 0 or head_size % 2:
        raise ValueError(f"head_size: expected a positive even int, got {head_size!r}")
    heads = []
    for name, t in (("query", query), ("key", key)):
        if t is None:
            heads.append(0)
            continue
        check_tensor(name, t)
        if t.dtype != query.dtype:
            raise TypeError(f"{name}: expected query's dtype {query.dtype}, got {t.dtype}")
        nd = positions.dim()
        lead, tail = t.shape[:nd], t.shape[nd:]
        ok = lead == positions.shape and (
            (len(tail) == 1 and tail[0] % head_size == 0) or (len(tail) == 2 and tail[1] == head_size)
        )
        if not ok:
            raise ValueError(
                f"{name}: expected positions' shape {list(positions.shape)} followed by [heads * {head_size}] "
                f"or [heads, {head_size}], got {list(t.shape)}"
            )
        heads.append(tail[0] // head_size if len(tail) == 1 else tail[0])
    check_tensor("cos_sin_cache", cos_sin_cache)
    if cos_sin_cache.dim() != 2:
        raise ValueError(f"cos_sin_cache: expected [max_pos, rotary_dim], got {list(cos_sin_cache.shape)}")
    _check_rot(cos_sin_cache.shape[1], head_size, "cos_sin_cache")
    check_same_device(positions=positions, query=query, key=key, cos_sin_cache=cos_sin_cache)
    return heads[0], heads[1]


# --------------------------------------------------------------------- launchers


def _token_split(lead):
    """Candidate ``(n_outer, n_inner)`` splits of the token dims, most likely to fit first."""
    n = 1
    for s in lead:
        n *= s
    if len(lead) >= 2 and lead[-1] > 0:
        return ((n // lead[-1], lead[-1]), (1, n))
    return ((1, n),)


def _layout(t, splits):
    """How the kernel sees ``t (*tokens, heads, D)``: as ``[n_outer, n_inner, heads, D]``.

    Returns:
        (tensor, (stride_o, stride_i, stride_h), split, copied): ``t`` itself with its strides
        when a split fits (read straight off the strides for 1 or 2 token dims: no view is made
        on the common path), else a contiguous copy (``copied``).
    """
    st = t.stride()
    if st[-1] == 1 or t.shape[-1] <= 1:
        nd = len(st)
        if nd == 3 and splits[0][0] == 1:
            return t, (0, st[0], st[1]), splits[0], False
        if nd == 4 and splits[0] == (t.shape[0], t.shape[1]):
            return t, st[:3], splits[0], False
        for n_outer, n_inner in splits:
            try:
                v = t.view(n_outer, n_inner, t.shape[-2], t.shape[-1])
            except RuntimeError:
                continue
            return t, v.stride()[:3], (n_outer, n_inner), False
    n_outer, n_inner = splits[-1]
    v = t.contiguous().view(n_outer, n_inner, t.shape[-2], t.shape[-1])
    return v, v.stride()[:3], splits[-1], True


def _new_like(t):
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _unit_last(t):
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _run_tokens(q, k, q_out, k_out, splits, cos, sin, table_strides, pos, n_pos, half_rot, full_table,
                interleaved, inverse):
    """Rotate q/k (``(*tokens, heads, D)``) into q_out/k_out (either may be the input: in place).

    ``splits``: candidate ``(n_outer, n_inner)`` views of the token dims; ``table_strides``:
    ``(cos o, i, p, sin o, i, p)`` element strides of a token's table row.
    """
    qt, qs, split, q_copied = _layout(q, splits)
    splits = (split,)
    # Outputs: the input itself when in place (a copied input is rotated in its copy, then
    # written back); fresh outputs are contiguous and always fit.
    qo_copied = ko_copied = False
    if q_out is q:
        qot, qos = qt, qs
    else:
        qot, qos, _, qo_copied = _layout(q_out, splits)
    n_k_heads = 0
    if k is None:
        kt, ks, kot, kos = qt, qs, qot, qos
    else:
        n_k_heads = k.shape[-2]
        kt, ks, _, k_copied = _layout(k, splits)
        if k_out is k:
            kot, kos = kt, ks
        else:
            kot, kos, _, ko_copied = _layout(k_out, splits)
    has_pos = pos is not None
    pos_strides = (0, 0)
    if has_pos:
        if pos.dim() == 1 and split[0] == 1:
            pos_strides = (0, pos.stride(0))
        elif tuple(pos.shape) == split:
            pos_strides = pos.stride()
        else:
            pos = pos.reshape(split)
            pos_strides = pos.stride()
    n_outer, n_inner = split
    n_q_heads, head_dim = q.shape[-2], q.shape[-1]
    out_of_place = qot is not qt or kot is not kt
    copy_pass = out_of_place and 2 * half_rot < head_dim
    n_tokens = n_outer * n_inner
    key = tune_key(n_tokens, n_q_heads, n_k_heads, half_rot, head_dim, q.dtype, copy_pass, interleaved, full_table)
    dev = q.get_device()
    cfg = TUNABLE.chosen.get((dev, key))
    bhq, bhk, br2, bp, warps = cfg if cfg is not None else TUNABLE.resolve(key, dev, {"n_tokens": n_tokens})
    n_q_blocks = cdiv(n_q_heads, bhq)
    n_k_blocks = cdiv(n_k_heads, bhk)
    with device_guard(q):
        _rope_kernel[(n_outer * n_inner, n_q_blocks + n_k_blocks)](
            qt, kt, qot, kot, cos, sin, pos if has_pos else cos,
            *qs, *ks, *qos, *kos,
            *table_strides,
            *pos_strides,
            n_inner, n_q_heads, n_k_heads, n_q_blocks, n_pos,
            HALF_ROT=half_rot,
            HEAD_DIM=head_dim,
            HAS_POS=has_pos,
            FULL_TABLE=full_table,
            INTERLEAVED=interleaved,
            INVERSE=inverse,
            COPY_PASS=copy_pass,
            BLOCK_HQ=bhq,
            BLOCK_HK=bhk,
            BLOCK_R2=br2,
            BLOCK_P=bp,
            num_warps=warps,
        )
    # Results computed in a copy go back to where they belong.
    if (q_out is q and q_copied) or qo_copied:
        q_out.copy_(qot.view(q_out.shape))
    if k is not None and ((k_out is k and k_copied) or ko_copied):
        k_out.copy_(kot.view(k_out.shape))


def _check_positions_range(pos, n_pos, name):
    # Cheap only when the positions are host memory; on a GPU the kernel writes NaN instead.
    if pos.device.type == "cpu" and pos.numel():
        lo, hi = int(pos.min()), int(pos.max())
        if lo < 0 or hi >= n_pos:
            raise ValueError(f"{name}: values must lie in [0, {n_pos}) (table rows), got min {lo}, max {hi}")


def rope_fwd(q, k, cos, sin, position_ids=None, *, interleaved=False, inverse=False, q_out=None, k_out=None):
    """RoPE of q and k with half tables, upstream FlagGems layout, one launch.

    Args:
        q: ``(*, Hq, D)`` fp16/bf16/fp32, any strides (unit stride on D avoids a copy).
        k: ``(*, Hk, D)``, q's dtype and token dims, or None.
        cos, sin: ``[max_pos, r/2]`` half tables (any float dtype), ``r <= D``.
        position_ids: ``(*)`` int32/int64 table rows; None when q is ``[B, S, H, D]`` (row = s).
        interleaved: GPT-J pairs ``(x[2j], x[2j+1])`` instead of rotate-half.
        inverse: apply the inverse rotation (the backward).
        q_out, k_out: where to write (q / k themselves for in place); new contiguous tensors when None.

    Returns:
        ``(q_out, k_out)``; ``k_out`` is None without k.

    Raises:
        TypeError / ValueError / NotImplementedError: unsupported dtype, shape, device, or
        (positions on the CPU) a position out of range.
    """
    half_rot, n_pos = check_rope_args(q, k, cos, sin, position_ids)
    q_out = _new_like(q) if q_out is None else q_out
    if k is not None and k_out is None:
        k_out = _new_like(k)
    if q.numel() == 0 and (k is None or k.numel() == 0):
        return q_out, k_out
    cos, sin = _unit_last(cos), _unit_last(sin)
    if position_ids is None:
        splits = ((q.shape[0], q.shape[1]),)
        strides = (0, cos.stride(0), 0, 0, sin.stride(0), 0)
    else:
        _check_positions_range(position_ids, n_pos, "position_ids")
        splits = _token_split(q.shape[:-2])
        strides = (0, 0, cos.stride(0), 0, 0, sin.stride(0))
    _run_tokens(q, k, q_out, k_out, splits, cos, sin, strides, position_ids, n_pos, half_rot, False,
                interleaved, inverse)
    return q_out, k_out


def rope_hf_fwd(q, k, cos, sin, *, interleaved=False, inverse=False, q_out=None, k_out=None):
    """RoPE of q and k in HF transformers' layout with full tables, one launch.

    Computes ``q * cos + rotate_half(q) * sin`` (``rotate_half`` interleaved with ``interleaved``)
    on the first ``r`` dims, reading both halves of the tables.

    Args:
        q: ``[B, Hq, S, D]`` fp16/bf16/fp32, any strides.
        k: ``[B, Hk, S, D]``, q's dtype, or None.
        cos, sin: ``[B or 1, S, r]`` (also ``[S, r]`` or ``[B or 1, 1, S, r]``), ``r <= D`` even.
        interleaved, inverse: as in :func:`rope_fwd`.
        q_out, k_out: where to write (q / k themselves for in place); when None, new tensors laid
            out like the inputs (``torch.empty_like``, as eager ``q * cos + rotate_half(q) * sin``
            lays its result out): HF's q and k are ``transpose(1, 2)`` views of a projection, so
            the rotated q keeps the ``[B, S, H, D]`` memory order attention kernels read best and
            produce their output in.

    Returns:
        ``(q_out, k_out)``; ``k_out`` is None without k.

    Raises:
        TypeError / ValueError / NotImplementedError: unsupported dtype, shape or device.
    """
    half_rot, cos3, sin3 = check_rope_hf_args(q, k, cos, sin)
    q_out = torch.empty_like(q) if q_out is None else q_out
    if k is not None and k_out is None:
        k_out = torch.empty_like(k)
    if q.numel() == 0 and (k is None or k.numel() == 0):
        return q_out, k_out
    cos3, sin3 = _unit_last(cos3), _unit_last(sin3)
    strides = (
        cos3.stride(0) if cos3.shape[0] > 1 else 0, cos3.stride(1), 0,
        sin3.stride(0) if sin3.shape[0] > 1 else 0, sin3.stride(1), 0,
    )
    # [B, H, S, D] -> [B, S, H, D]: tokens (b, s) become (outer, inner) with no copy.
    t = lambda x: x.transpose(1, 2) if x is not None else None  # noqa: E731
    splits = ((q.shape[0], q.shape[2]),)
    qt, kt = t(q), t(k)
    _run_tokens(qt, kt, qt if q_out is q else t(q_out), kt if (k is not None and k_out is k) else t(k_out),
                splits, cos3, sin3, strides, None, 0, half_rot, True, interleaved, inverse)
    return q_out, k_out


def _heads3(t, nd, head_size):
    """vLLM's ``(*, H * D)`` or ``(*, H, D)`` as a ``(*, H, D)`` view (splitting one dim always views)."""
    if t.dim() == nd + 2:
        return t
    return t.view(*t.shape[:nd], t.shape[-1] // head_size, head_size)


def rope_cache_fwd(positions, query, key, head_size, cos_sin_cache, is_neox, *, inverse=False,
                   query_out=None, key_out=None):
    """RoPE in vLLM's token layout with a ``[max_pos, r]`` cos|sin cache, one launch.

    Args:
        positions: ``(*)`` int32/int64 cache rows.
        query: ``(*, Hq * head_size)`` or ``(*, Hq, head_size)`` fp16/bf16/fp32.
        key: same form with Hk heads, query's dtype, or None.
        head_size: D.
        cos_sin_cache: ``[max_pos, r]``: cos in the first ``r/2`` columns, sin in the rest; ``r <= D``.
        is_neox: rotate-half when True, interleaved (GPT-J) when False.
        inverse: apply the inverse rotation (the backward).
        query_out, key_out: where to write (query / key themselves for in place); new contiguous
            tensors when None.

    Returns:
        ``(query_out, key_out)``; ``key_out`` is None without a key.

    Raises:
        TypeError / ValueError / NotImplementedError: unsupported dtype, shape, device, or
        (positions on the CPU) a position out of range.
    """
    check_rope_cache_args(positions, query, key, head_size, cos_sin_cache)
    query_out = _new_like(query) if query_out is None else query_out
    if key is not None and key_out is None:
        key_out = _new_like(key)
    if query.numel() == 0 and (key is None or key.numel() == 0):
        return query_out, key_out
    n_pos, rot = cos_sin_cache.shape
    _check_positions_range(positions, n_pos, "positions")
    cache = _unit_last(cos_sin_cache)
    nd = positions.dim()
    q3 = _heads3(query, nd, head_size)
    k3 = _heads3(key, nd, head_size) if key is not None else None
    qo3 = q3 if query_out is query else _heads3(query_out, nd, head_size)
    ko3 = None
    if key is not None:
        ko3 = k3 if key_out is key else _heads3(key_out, nd, head_size)
    half = rot // 2
    cos, sin = cache[:, :half], cache[:, half:]
    strides = (0, 0, cache.stride(0), 0, 0, cache.stride(0))
    _run_tokens(q3, k3, qo3, ko3, _token_split(positions.shape), cos, sin, strides, positions, n_pos, half, False,
                not is_neox, inverse)
    return query_out, key_out


# ---------------------------------------------------------------------------
# Autotuning (kernels/_autotune.py): head blocks and warps per device kind
# ---------------------------------------------------------------------------

_TOKENS_BUCKET_CAP = 1 << 16


def tune_key(n_tokens, n_q_heads, n_k_heads, half_rot, head_dim, dtype, copy_pass, interleaved, full_table) -> tuple:
    """The autotuning key: (tokens bucket, q heads, k heads, r/2, head_dim, dtype, copy pass, interleaved, full table)."""
    return (at.pow2_bucket(n_tokens, _TOKENS_BUCKET_CAP), n_q_heads, n_k_heads, half_rot, head_dim, dtype,
            bool(copy_pass), bool(interleaved), bool(full_table))


def _tune_default(key, dev) -> dict:
    _, nq, nk, half_rot, head_dim, dtype, copy_pass, _, _ = key
    bhq, bhk, br2, bp, warps = rope_config(nq, nk, half_rot, head_dim, dtype.itemsize, copy_pass)
    return {"BLOCK_HQ": bhq, "BLOCK_HK": bhk, "BLOCK_R2": br2, "BLOCK_P": bp, "num_warps": warps}


def _tune_candidates(key, dev) -> list:
    """Head blocks of 1 to all heads for q (k's block in proportion, or as large as q's), 1-8 warps at
    2-32 pairs per thread: small blocks give decode more programs, large ones fewer table
    loads per token. The interpreter gets one variant."""
    _, nq, nk, half_rot, head_dim, dtype, copy_pass, _, _ = key
    default = _tune_default(key, dev)
    if dev < 0:
        return [dict(default, BLOCK_HQ=max(1, default["BLOCK_HQ"] // 2), BLOCK_HK=max(1, default["BLOCK_HK"] // 2))]
    br2 = default["BLOCK_R2"]
    nq2, nk2 = next_pow2(max(nq, 1)), next_pow2(max(nk, 1))
    out = []
    bhq = 1
    while bhq <= nq2 and bhq * br2 <= 4096:
        for bhk in sorted({max(1, min(nk2, bhq * nk2 // nq2)), min(nk2, bhq)}):
            for w in (1, 2, 4, 8):
                if 2 <= bhq * br2 // (32 * w) <= 32:
                    out.append(dict(default, BLOCK_HQ=bhq, BLOCK_HK=bhk, num_warps=w))
        bhq *= 2
    return at.near_first(default, out)


def _tune_bench(key, dev, dims):
    """RoPE of the key's q and k: full tables -> HF layout (``rope_hf_fwd``), half tables -> vLLM's
    token layout with positions (``rope_cache_fwd``); out of place unless the copy pass is off
    while the rotary dim is partial (then in place, as such calls are)."""
    tokens, nq, nk, half_rot, head_dim, dtype, copy_pass, interleaved, full_table = key
    tokens = (dims or {}).get("n_tokens", tokens)
    device = at.torch_device(dev)
    rot = 2 * half_rot
    in_place = rot < head_dim and not copy_pass
    if full_table:
        q = torch.randn(1, tokens, nq, head_dim, device=device, dtype=dtype).transpose(1, 2)
        k = torch.randn(1, tokens, nk, head_dim, device=device, dtype=dtype).transpose(1, 2) if nk else None
        cos = torch.randn(1, tokens, rot, device=device, dtype=dtype)
        sin = torch.randn(1, tokens, rot, device=device, dtype=dtype)
        qo = q if in_place else torch.empty_like(q)
        ko = k if (in_place or k is None) else torch.empty_like(k)
        return lambda: rope_hf_fwd(q, k, cos, sin, interleaved=interleaved, q_out=qo, k_out=ko)
    max_pos = max(4096, tokens)
    pos = torch.randint(0, max_pos, (tokens,), device=device)
    q = torch.randn(tokens, nq * head_dim, device=device, dtype=dtype)
    k = torch.randn(tokens, nk * head_dim, device=device, dtype=dtype) if nk else None
    cache = torch.randn(max_pos, rot, device=device, dtype=torch.float32)
    qo = q if in_place else torch.empty_like(q)
    ko = k if (in_place or k is None) else torch.empty_like(k)
    return lambda: rope_cache_fwd(pos, q, k, head_dim, cache, not interleaved, query_out=qo, key_out=ko)


TUNABLE = at.register(at.Tunable(
    "rope",
    fields=("BLOCK_HQ", "BLOCK_HK", "BLOCK_R2", "BLOCK_P", "num_warps"),
    key_fields=("tokens_bucket", "n_q_heads", "n_k_heads", "half_rot", "head_dim", "dtype", "copy_pass",
                "interleaved", "full_table"),
    default=_tune_default,
    candidates=_tune_candidates,
    make_bench=_tune_bench,
    sources=(_rope_kernel, _rope_heads),
    nearest_bucket=True,
))
