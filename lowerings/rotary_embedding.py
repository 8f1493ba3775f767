"""Rotary position embedding (RoPE) as ``torch.ops.flag_gems`` ops, with the public functions.

Three layouts, one Triton kernel (``kernels/rotary_embedding.py``), q and k in one launch:

1. Upstream FlagGems: q ``(*, Hq, D)``, k ``(*, Hk, D)``, half tables ``cos/sin [max_pos, r/2]``,
   ``position_ids (*)`` (or none: q ``[B, S, H, D]``, row = s).

   - ``rotary_embedding(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? position_ids=None,
     bool rotary_interleaved=False) -> (Tensor, Tensor)``
   - ``rotary_embedding_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, Tensor? position_ids=None,
     bool rotary_interleaved=False) -> ()`` (in place)
   - ``rotary_embedding_backward(Tensor grad_q, Tensor grad_k, Tensor cos, Tensor sin,
     Tensor? position_ids, bool rotary_interleaved) -> (Tensor, Tensor)``

2. HF transformers: q ``[B, Hq, S, D]``, k ``[B, Hk, S, D]``, full tables ``[B or 1, S, r]``
   (``q * cos + rotate_half(q) * sin``, both table halves read).

   - ``rotary_embedding_hf(Tensor q, Tensor k, Tensor cos, Tensor sin, bool rotary_interleaved=False)
     -> (Tensor, Tensor)`` and ``rotary_embedding_hf_backward`` (same arguments, grads first).

3. vLLM: ``positions (*)``, query ``(*, Hq * D)``, key likewise or None, ``cos_sin_cache [max_pos, r]``.
   A ``Tensor?`` output is not expressible in ``custom_op``, so the functional op has a required
   key and a q-only twin:

   - ``rotary_embedding_cache(Tensor positions, Tensor query, Tensor key, int head_size,
     Tensor cos_sin_cache, bool is_neox) -> (Tensor, Tensor)``
   - ``rotary_embedding_cache_q(Tensor positions, Tensor query, int head_size, Tensor cos_sin_cache,
     bool is_neox) -> Tensor``
   - ``rotary_embedding_cache_(Tensor positions, Tensor(a!) query, Tensor(b!)? key, int head_size,
     Tensor cos_sin_cache, bool is_neox) -> ()`` (in place, vLLM's convention)
   - ``rotary_embedding_cache_backward(Tensor positions, Tensor grad_query, Tensor? grad_key,
     int head_size, Tensor cos_sin_cache, bool is_neox) -> Tensor[]``

Backward: the gradient of q / k is the inverse rotation, the same kernel (``inverse=True``)
behind the ``*_backward`` ops, so AOT autograd traces it. Tables normally need no gradient;
when cos / sin / the cache do require one, the backward computes it in plain torch from the
saved q and k (an index_add over positions), so it is never silently dropped. (The in-place
public functions then rotate clones of q and k and write the result back, so that the saved
inputs survive.)
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from ..kernels.rotary_embedding import (
    check_rope_args,
    check_rope_cache_args,
    check_rope_hf_args,
    rope_cache_fwd,
    rope_fwd,
    rope_hf_fwd,
)
from ..c_runtime import fast_ops
from ._utils import eager_fast_path
from .registry import register_fused

logger = logging.getLogger(__name__)

__all__ = ["apply_rotary_pos_emb", "apply_rotary_pos_emb_hf", "rotary_embedding_cache"]


def _empty(t: Tensor) -> Tensor:
    # The launchers' fresh outputs: the input's shape and dtype, contiguous.
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


# ------------------------------------------------------- table gradients (plain torch)


def _pair_halves(t: Tensor, rot: int, interleaved: bool):
    if interleaved:
        return t[..., 0:rot:2], t[..., 1:rot:2]
    return t[..., : rot // 2], t[..., rot // 2 : rot]


def _token_table_grads(pairs, rot: int, interleaved: bool, head_dim: int):
    """Per-token gradients of the four table values ``c1, s1, c2, s2`` (fp32, heads summed).

    With ``y1 = x1 c1 - x2 s1`` and ``y2 = x2 c2 + x1 s2``:
    ``dc1 = sum dy1 x1``, ``ds1 = -sum dy1 x2``, ``dc2 = sum dy2 x2``, ``ds2 = sum dy2 x1``.

    Args:
        pairs: ``(x, dy)`` tensors of q and of k; heads on dim ``head_dim``.
    """
    dc1 = ds1 = dc2 = ds2 = None
    for x, dy in pairs:
        x1, x2 = _pair_halves(x.float(), rot, interleaved)
        g1, g2 = _pair_halves(dy.float(), rot, interleaved)
        parts = ((g1 * x1).sum(head_dim), -(g1 * x2).sum(head_dim), (g2 * x2).sum(head_dim), (g2 * x1).sum(head_dim))
        if dc1 is None:
            dc1, ds1, dc2, ds2 = parts
        else:
            dc1, ds1, dc2, ds2 = (a + b for a, b in zip((dc1, ds1, dc2, ds2), parts))
    return dc1, ds1, dc2, ds2


def _scatter_rows(per_token: Tensor, rows: Tensor, n_rows: int) -> Tensor:
    """Sum ``per_token (*tok, w)`` into a ``[n_rows, w]`` fp32 table at ``rows (*tok)``."""
    w = per_token.shape[-1]
    out = per_token.new_zeros((n_rows, w))
    return out.index_add_(0, rows.reshape(-1).long(), per_token.reshape(-1, w))


def _half_table_grads(q, k, gq, gk, cos, sin, position_ids, interleaved):
    rot = 2 * cos.shape[-1]
    dc1, ds1, dc2, ds2 = _token_table_grads(((q, gq), (k, gk)), rot, interleaved, -2)
    if position_ids is None:  # q [B, S, H, D]: row = s
        rows = torch.arange(q.shape[1], device=q.device).expand(q.shape[0], q.shape[1])
    else:
        rows = position_ids
    dcos = _scatter_rows(dc1 + dc2, rows, cos.shape[0]).to(cos.dtype)
    dsin = _scatter_rows(ds1 + ds2, rows, sin.shape[0]).to(sin.dtype)
    return dcos, dsin


def _full_table_grads(q, k, gq, gk, cos, sin, interleaved):
    rot = cos.shape[-1]
    dc1, ds1, dc2, ds2 = _token_table_grads(((q, gq), (k, gk)), rot, interleaved, 1)  # [B, S, r/2]

    def full(a, b, like):
        g = torch.stack((a, b), -1).flatten(-2) if interleaved else torch.cat((a, b), -1)  # [B, S, r]
        # Tables broadcast over the batch ([S, r] or [1, .., S, r]) sum over it.
        if like.dim() == 2 or like.shape[0] == 1:
            g = g.sum(0, keepdim=True)
        return g.reshape(like.shape).to(like.dtype)

    return full(dc1, dc2, cos), full(ds1, ds2, sin)


def _cache_grads(positions, query, key, gquery, gkey, head_size, cache, is_neox):
    rot = cache.shape[-1]
    nd = positions.dim()
    heads = lambda t: t.reshape(*t.shape[:nd], -1, head_size)  # noqa: E731
    pairs = [(heads(query), heads(gquery))]
    if key is not None:
        pairs.append((heads(key), heads(gkey)))
    dc1, ds1, dc2, ds2 = _token_table_grads(pairs, rot, not is_neox, -2)
    per_token = torch.cat((dc1 + dc2, ds1 + ds2), -1)
    return _scatter_rows(per_token, positions, cache.shape[0]).to(cache.dtype)


# ----------------------------------------------------------- layout 1: upstream FlagGems


@torch.library.custom_op("flag_gems::rotary_embedding", mutates_args=())
def _rotary_embedding_op(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    position_ids: Tensor | None = None,
    rotary_interleaved: bool = False,
) -> tuple[Tensor, Tensor]:
    return rope_fwd(q, k, cos, sin, position_ids, interleaved=rotary_interleaved)


@_rotary_embedding_op.register_fake
def _(q, k, cos, sin, position_ids=None, rotary_interleaved=False):
    check_rope_args(q, k, cos, sin, position_ids)
    return _empty(q), _empty(k)


@torch.library.custom_op("flag_gems::rotary_embedding_", mutates_args=("q", "k"))
def _rotary_embedding_inplace_op(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    position_ids: Tensor | None = None,
    rotary_interleaved: bool = False,
) -> None:
    rope_fwd(q, k, cos, sin, position_ids, interleaved=rotary_interleaved, q_out=q, k_out=k)


@_rotary_embedding_inplace_op.register_fake
def _(q, k, cos, sin, position_ids=None, rotary_interleaved=False):
    check_rope_args(q, k, cos, sin, position_ids)


@torch.library.custom_op("flag_gems::rotary_embedding_backward", mutates_args=())
def _rotary_embedding_backward_op(
    grad_q: Tensor,
    grad_k: Tensor,
    cos: Tensor,
    sin: Tensor,
    position_ids: Tensor | None,
    rotary_interleaved: bool,
) -> tuple[Tensor, Tensor]:
    return rope_fwd(grad_q, grad_k, cos, sin, position_ids, interleaved=rotary_interleaved, inverse=True)


@_rotary_embedding_backward_op.register_fake
def _(grad_q, grad_k, cos, sin, position_ids, rotary_interleaved):
    check_rope_args(grad_q, grad_k, cos, sin, position_ids)
    return _empty(grad_q), _empty(grad_k)


def _rope_setup(ctx, inputs, output):
    q, k, cos, sin, position_ids, rotary_interleaved = inputs
    ctx.tables_grad = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    ctx.interleaved = rotary_interleaved
    # q and k are needed only for the tables' gradient.
    saved = (q, k) if ctx.tables_grad else (None, None)
    ctx.save_for_backward(cos, sin, position_ids, *saved)


def _rope_backward(ctx, grad_q, grad_k):
    cos, sin, position_ids, q, k = ctx.saved_tensors
    dq, dk = torch.ops.flag_gems.rotary_embedding_backward(grad_q, grad_k, cos, sin, position_ids, ctx.interleaved)
    dcos = dsin = None
    if ctx.tables_grad:
        dcos, dsin = _half_table_grads(q, k, grad_q, grad_k, cos, sin, position_ids, ctx.interleaved)
    return dq, dk, dcos, dsin, None, None


_rotary_embedding_op.register_autograd(_rope_backward, setup_context=_rope_setup)


# ------------------------------------------------------------------ layout 2: HF


@torch.library.custom_op("flag_gems::rotary_embedding_hf", mutates_args=())
def _rotary_embedding_hf_op(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    rotary_interleaved: bool = False,
) -> tuple[Tensor, Tensor]:
    return rope_hf_fwd(q, k, cos, sin, interleaved=rotary_interleaved)


@_rotary_embedding_hf_op.register_fake
def _(q, k, cos, sin, rotary_interleaved=False):
    check_rope_hf_args(q, k, cos, sin)
    return torch.empty_like(q), torch.empty_like(k)  # rope_hf_fwd's outputs keep the inputs' layout


@torch.library.custom_op("flag_gems::rotary_embedding_hf_backward", mutates_args=())
def _rotary_embedding_hf_backward_op(
    grad_q: Tensor,
    grad_k: Tensor,
    cos: Tensor,
    sin: Tensor,
    rotary_interleaved: bool,
) -> tuple[Tensor, Tensor]:
    return rope_hf_fwd(grad_q, grad_k, cos, sin, interleaved=rotary_interleaved, inverse=True)


@_rotary_embedding_hf_backward_op.register_fake
def _(grad_q, grad_k, cos, sin, rotary_interleaved):
    check_rope_hf_args(grad_q, grad_k, cos, sin)
    return torch.empty_like(grad_q), torch.empty_like(grad_k)


def _rope_hf_setup(ctx, inputs, output):
    q, k, cos, sin, rotary_interleaved = inputs
    ctx.tables_grad = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    ctx.interleaved = rotary_interleaved
    saved = (q, k) if ctx.tables_grad else (None, None)
    ctx.save_for_backward(cos, sin, *saved)


def _rope_hf_backward(ctx, grad_q, grad_k):
    cos, sin, q, k = ctx.saved_tensors
    dq, dk = torch.ops.flag_gems.rotary_embedding_hf_backward(grad_q, grad_k, cos, sin, ctx.interleaved)
    dcos = dsin = None
    if ctx.tables_grad:
        dcos, dsin = _full_table_grads(q, k, grad_q, grad_k, cos, sin, ctx.interleaved)
    return dq, dk, dcos, dsin, None


_rotary_embedding_hf_op.register_autograd(_rope_hf_backward, setup_context=_rope_hf_setup)


# ---------------------------------------------------------------- layout 3: vLLM


@torch.library.custom_op("flag_gems::rotary_embedding_cache", mutates_args=())
def _rotary_embedding_cache_op(
    positions: Tensor,
    query: Tensor,
    key: Tensor,
    head_size: int,
    cos_sin_cache: Tensor,
    is_neox: bool,
) -> tuple[Tensor, Tensor]:
    return rope_cache_fwd(positions, query, key, head_size, cos_sin_cache, is_neox)


@_rotary_embedding_cache_op.register_fake
def _(positions, query, key, head_size, cos_sin_cache, is_neox):
    check_rope_cache_args(positions, query, key, head_size, cos_sin_cache)
    return _empty(query), _empty(key)


@torch.library.custom_op("flag_gems::rotary_embedding_cache_q", mutates_args=())
def _rotary_embedding_cache_q_op(
    positions: Tensor,
    query: Tensor,
    head_size: int,
    cos_sin_cache: Tensor,
    is_neox: bool,
) -> Tensor:
    return rope_cache_fwd(positions, query, None, head_size, cos_sin_cache, is_neox)[0]


@_rotary_embedding_cache_q_op.register_fake
def _(positions, query, head_size, cos_sin_cache, is_neox):
    check_rope_cache_args(positions, query, None, head_size, cos_sin_cache)
    return _empty(query)


@torch.library.custom_op("flag_gems::rotary_embedding_cache_", mutates_args=("query", "key"))
def _rotary_embedding_cache_inplace_op(
    positions: Tensor,
    query: Tensor,
    key: Tensor | None,
    head_size: int,
    cos_sin_cache: Tensor,
    is_neox: bool,
) -> None:
    rope_cache_fwd(positions, query, key, head_size, cos_sin_cache, is_neox, query_out=query, key_out=key)


@_rotary_embedding_cache_inplace_op.register_fake
def _(positions, query, key, head_size, cos_sin_cache, is_neox):
    check_rope_cache_args(positions, query, key, head_size, cos_sin_cache)


@torch.library.custom_op("flag_gems::rotary_embedding_cache_backward", mutates_args=())
def _rotary_embedding_cache_backward_op(
    positions: Tensor,
    grad_query: Tensor,
    grad_key: Tensor | None,
    head_size: int,
    cos_sin_cache: Tensor,
    is_neox: bool,
) -> list[Tensor]:
    gq, gk = rope_cache_fwd(positions, grad_query, grad_key, head_size, cos_sin_cache, is_neox, inverse=True)
    return [gq] if gk is None else [gq, gk]


@_rotary_embedding_cache_backward_op.register_fake
def _(positions, grad_query, grad_key, head_size, cos_sin_cache, is_neox):
    check_rope_cache_args(positions, grad_query, grad_key, head_size, cos_sin_cache)
    return [_empty(grad_query)] if grad_key is None else [_empty(grad_query), _empty(grad_key)]


def _cache_setup(ctx, inputs, output):
    positions, query, key, head_size, cos_sin_cache, is_neox = inputs
    ctx.cache_grad = ctx.needs_input_grad[4]
    ctx.args = (head_size, is_neox)
    saved = (query, key) if ctx.cache_grad else (None, None)
    ctx.save_for_backward(positions, cos_sin_cache, *saved)


def _cache_backward(ctx, grad_query, grad_key):
    positions, cache, query, key = ctx.saved_tensors
    head_size, is_neox = ctx.args
    dq, dk = torch.ops.flag_gems.rotary_embedding_cache_backward(positions, grad_query, grad_key, head_size, cache,
                                                                 is_neox)
    dcache = None
    if ctx.cache_grad:
        dcache = _cache_grads(positions, query, key, grad_query, grad_key, head_size, cache, is_neox)
    return None, dq, dk, None, dcache, None


_rotary_embedding_cache_op.register_autograd(_cache_backward, setup_context=_cache_setup)


def _cache_q_setup(ctx, inputs, output):
    positions, query, head_size, cos_sin_cache, is_neox = inputs
    ctx.cache_grad = ctx.needs_input_grad[3]
    ctx.args = (head_size, is_neox)
    ctx.save_for_backward(positions, cos_sin_cache, query if ctx.cache_grad else None)


def _cache_q_backward(ctx, grad_query):
    positions, cache, query = ctx.saved_tensors
    head_size, is_neox = ctx.args
    (dq,) = torch.ops.flag_gems.rotary_embedding_cache_backward(positions, grad_query, None, head_size, cache, is_neox)
    dcache = None
    if ctx.cache_grad:
        dcache = _cache_grads(positions, query, None, grad_query, None, head_size, cache, is_neox)
    return None, dq, None, dcache, None


_rotary_embedding_cache_q_op.register_autograd(_cache_q_backward, setup_context=_cache_q_setup)


# ------------------------------------------------------------------ public API


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _require_tensor(name, t):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def apply_rotary_pos_emb(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    position_ids: Tensor | None = None,
    rotary_interleaved: bool = False,
    inplace: bool = False,
) -> tuple[Tensor, Tensor]:
    """Rotary position embedding of q and k (upstream FlagGems signature), one kernel launch.

    Rotate-half (NeoX / Llama) by default: with ``r = 2 * cos.shape[-1]``, ``x1 = x[..., :r/2]``,
    ``x2 = x[..., r/2:r]``, ``out = (x1 cos - x2 sin, x2 cos + x1 sin)``; dims past ``r`` are
    copied unchanged (partial rotary). ``rotary_interleaved`` rotates pairs ``(x[2i], x[2i+1])``.

    Args:
        q: ``(*, Hq, D)`` fp16/bf16/fp32, any strides.
        k: ``(*, Hk, D)``, q's dtype and token dims ``*`` (GQA head counts may differ).
        cos, sin: half tables ``[max_pos, r/2]``, ``r <= D``; any float dtype (fp32 with bf16 q is fine).
        position_ids: ``(*)`` int32/int64 table rows per token; None when q is ``[B, S, H, D]``
            (row = s).
        rotary_interleaved: GPT-J pairs instead of rotate-half.
        inplace: write into q and k and return them.

    Returns:
        ``(q_embed, k_embed)``: new contiguous tensors, or q and k when ``inplace``.
        Differentiable in q and k (and in cos / sin, in plain torch, if they require grad).

    Raises:
        TypeError / ValueError / NotImplementedError: unsupported dtype, shape or device; a position
        out of range when the positions are on the CPU (on a GPU such tokens come out NaN).
    """
    _require_tensor("k", k)
    if eager_fast_path(q, k, cos, sin, position_ids):
        cpp = fast_ops(q.device.type)  # the C++ wrapper when the C++ runtime serves this device
        if cpp is not None:
            if inplace:
                cpp.rotary_embedding_(q, k, cos, sin, position_ids, rotary_interleaved)
                return q, k
            return cpp.rotary_embedding(q, k, cos, sin, position_ids, rotary_interleaved)
        if inplace:
            rope_fwd(q, k, cos, sin, position_ids, interleaved=rotary_interleaved, q_out=q, k_out=k)
            return q, k
        return rope_fwd(q, k, cos, sin, position_ids, interleaved=rotary_interleaved)
    if not inplace:
        return torch.ops.flag_gems.rotary_embedding(q, k, cos, sin, position_ids, rotary_interleaved)
    if not _needs_grad(q, k, cos, sin):
        torch.ops.flag_gems.rotary_embedding_(q, k, cos, sin, position_ids, rotary_interleaved)
        return q, k
    # Autograd: compute functionally, then write back, so autograd records the update as torch would.
    # Tables' gradients need the inputs, which the write-back overwrites: rotate clones then.
    src_q, src_k = (q.clone(), k.clone()) if _needs_grad(cos, sin) else (q, k)
    q_embed, k_embed = torch.ops.flag_gems.rotary_embedding(src_q, src_k, cos, sin, position_ids, rotary_interleaved)
    q.copy_(q_embed)
    k.copy_(k_embed)
    return q, k


def apply_rotary_pos_emb_hf(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    rotary_interleaved: bool = False,
) -> tuple[Tensor, Tensor]:
    """HF transformers' ``(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)``, one launch.

    Both halves of the full tables are read, so the result is exact for any cos / sin.
    With ``rotary_interleaved``, ``rotate_half`` is the interleaved one
    (``out[2i] = x[2i] cos[2i] - x[2i+1] sin[2i]``, ``out[2i+1] = x[2i+1] cos[2i+1] + x[2i] sin[2i+1]``).

    Args:
        q: ``[B, Hq, S, D]`` fp16/bf16/fp32, any strides.
        k: ``[B, Hk, S, D]``, q's dtype.
        cos, sin: ``[B or 1, S, r]`` as transformers computes them (also ``[S, r]`` or
            ``[B or 1, 1, S, r]``), ``r <= D`` even; dims past ``r`` are copied unchanged.
        rotary_interleaved: GPT-J pairs instead of rotate-half.

    Returns:
        ``(q_embed, k_embed)``, new contiguous tensors of q's / k's shape. Differentiable.

    Raises:
        TypeError / ValueError / NotImplementedError: unsupported dtype, shape or device.
    """
    _require_tensor("k", k)
    if eager_fast_path(q, k, cos, sin):
        cpp = fast_ops(q.device.type)  # the C++ wrapper when the C++ runtime serves this device
        if cpp is not None:
            return cpp.rotary_embedding_hf(q, k, cos, sin, rotary_interleaved)
        return rope_hf_fwd(q, k, cos, sin, interleaved=rotary_interleaved)
    return torch.ops.flag_gems.rotary_embedding_hf(q, k, cos, sin, rotary_interleaved)


def rotary_embedding_cache(
    positions: Tensor,
    query: Tensor,
    key: Tensor | None,
    head_size: int,
    cos_sin_cache: Tensor,
    is_neox: bool = True,
    inplace: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """vLLM-style RoPE with a ``[max_pos, r]`` cos|sin cache, query and key in one launch.

    Args:
        positions: ``(*)`` int32/int64 cache rows (``[T]`` for vLLM).
        query: ``(*, Hq * head_size)`` or ``(*, Hq, head_size)`` fp16/bf16/fp32.
        key: same form with Hk heads, query's dtype, or None.
        head_size: D; only the first ``r`` dims of each head rotate.
        cos_sin_cache: ``[max_pos, r]``: cos in columns ``[0, r/2)``, sin in ``[r/2, r)``, any float dtype.
        is_neox: rotate-half when True, interleaved (GPT-J) when False.
        inplace: write into query and key and return them (vLLM's in-place op).

    Returns:
        ``(query_out, key_out)``; ``key_out`` is None without a key. Differentiable out of place.

    Raises:
        TypeError / ValueError / NotImplementedError: unsupported dtype, shape or device; a position
        out of range when the positions are on the CPU (on a GPU such tokens come out NaN).
    """
    if eager_fast_path(positions, query, key, cos_sin_cache):
        cpp = fast_ops(query.device.type) if key is not None else None  # the C++ wrappers take query and key
        if inplace:
            if cpp is not None:
                cpp.rotary_embedding_cache_(positions, query, key, head_size, cos_sin_cache, is_neox)
            else:
                rope_cache_fwd(positions, query, key, head_size, cos_sin_cache, is_neox, query_out=query, key_out=key)
            return query, key
        if cpp is not None:
            return cpp.rotary_embedding_cache(positions, query, key, head_size, cos_sin_cache, is_neox)
        return rope_cache_fwd(positions, query, key, head_size, cos_sin_cache, is_neox)
    if inplace and not _needs_grad(query, key, cos_sin_cache):
        torch.ops.flag_gems.rotary_embedding_cache_(positions, query, key, head_size, cos_sin_cache, is_neox)
        return query, key
    src_q, src_k = query, key
    if inplace and _needs_grad(cos_sin_cache):  # the cache's gradient needs the inputs the write-back overwrites
        src_q, src_k = query.clone(), (key.clone() if key is not None else None)
    if key is None:
        q_out, k_out = torch.ops.flag_gems.rotary_embedding_cache_q(positions, src_q, head_size, cos_sin_cache,
                                                                    is_neox), None
    else:
        q_out, k_out = torch.ops.flag_gems.rotary_embedding_cache(positions, src_q, src_k, head_size, cos_sin_cache,
                                                                  is_neox)
    if not inplace:
        return q_out, k_out
    query.copy_(q_out)
    if key is not None:
        key.copy_(k_out)
    return query, key


# The ops in the registry's table of flag_gems ops: (name, kernel, the fusion pass that emits it).
for _name, _kernel, _pass in (
    ("rotary_embedding", "flag_gems.rotary_embedding.fwd", None),
    ("rotary_embedding_", "flag_gems.rotary_embedding.fwd", None),
    ("rotary_embedding_backward", "flag_gems.rotary_embedding.fwd", None),
    ("rotary_embedding_hf", "flag_gems.rotary_embedding.hf_fwd", "rotary_embedding"),
    ("rotary_embedding_hf_backward", "flag_gems.rotary_embedding.hf_fwd", None),
    ("rotary_embedding_cache", "flag_gems.rotary_embedding.cache_fwd", "rotary_embedding"),
    ("rotary_embedding_cache_q", "flag_gems.rotary_embedding.cache_fwd", "rotary_embedding"),
    ("rotary_embedding_cache_", "flag_gems.rotary_embedding.cache_fwd", None),
    ("rotary_embedding_cache_backward", "flag_gems.rotary_embedding.cache_fwd", None),
):
    register_fused(f"flag_gems::{_name}", kernel=_kernel, fused_by=_pass)
