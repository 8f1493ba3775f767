"""Registry entry for ``scaled_dot_product_attention``, served by ``kernels/attention.py``.

Overload (``impl`` takes exactly its arguments)::

    scaled_dot_product_attention.default(query, key, value, attn_mask=None, dropout_p=0.0,
                                         is_causal=False, *, scale=None, enable_gqa=False)

Scope: forward only (inference). 4-D ``[B, H, L, D]`` fp16/bf16/fp32 q/k/v of one dtype,
any strides, head dims up to 256, GQA with ``enable_gqa``, a bool or additive float mask
(q's dtype or fp32) broadcastable to ``[B, Hq, L, S]``, or ``is_causal``; on CUDA (or the
CPU under Triton's interpreter). Everything else is a ``supports`` reason and the native
op runs: dropout, a call that needs gradients (the native composite is differentiable, this
kernel is not), other ranks (torch takes any number of batch dims), nested tensors,
symbolic sizes, a mask together with ``is_causal`` (torch's math kernel raises; its CPU
flash kernel combines the two), and whatever torch itself rejects.

Policies (``flag_gems.lowerings.registry``): on in the eager mode, as every entry (calls that
need gradients go to torch's differentiable attention through ``supports``). Below native
flash / cuDNN attention in the H100 rows (``lowerings/measurements.py``), so not in
``preset="fast"``; not rewritten in compiled graphs.

``scaled_dot_product_attention`` (re-exported as ``flag_gems.scaled_dot_product_attention``)
is the explicit API: it runs the kernel or raises; it never falls back silently.
"""

from __future__ import annotations

import logging

import torch

from ..kernels import attention as ka
from ._utils import row_tensor_reason
from .registry import register

logger = logging.getLogger(__name__)

__all__ = ["scaled_dot_product_attention"]

aten = torch.ops.aten

_MASK_DTYPES = (torch.bool, torch.float16, torch.bfloat16, torch.float32)


def _grad_reason(*tensors) -> str | None:
    if torch.is_grad_enabled() and any(t is not None and getattr(t, "requires_grad", False) for t in tensors):
        return "an input requires grad (forward-only kernel; the native composite is differentiable)"
    return None


def _supports(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    """Why the kernel cannot run this call (None when it can). Metadata only: safe on FakeTensors."""
    for name, t in (("query", query), ("key", key), ("value", value), ("attn_mask", attn_mask)):
        if getattr(t, "is_nested", False):
            return f"{name} is a nested tensor"
    for name, t in (("query", query), ("key", key), ("value", value)):
        why = row_tensor_reason(t, name, strided=True)
        if why is not None:
            return why
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            return f"mixed dtypes: {name} {t.dtype}, query {query.dtype}"
        if t.device != query.device:
            return f"{name} on {t.device}, query on {query.device}"
    if isinstance(dropout_p, torch.SymFloat) or dropout_p != 0.0:
        return f"dropout_p={dropout_p} (inference kernel: no dropout)"
    if isinstance(scale, torch.SymFloat | torch.SymInt):
        return "symbolic scale"
    if not isinstance(is_causal, bool):
        return f"is_causal of type {type(is_causal).__name__}"
    why = _grad_reason(query, key, value, attn_mask)
    if why is not None:
        return why
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return (f"ranks {query.dim()}/{key.dim()}/{value.dim()}: the kernel takes 4-D [B, H, L, D] "
                "query/key/value only")
    bsz, hq, seq_q, d = query.shape
    _, hkv, seq_k, _ = key.shape
    if key.shape[0] != bsz or value.shape[0] != bsz:
        return f"batch sizes {bsz}/{key.shape[0]}/{value.shape[0]} differ"
    if value.shape[1] != hkv or value.shape[2] != seq_k:
        return f"key {list(key.shape)} and value {list(value.shape)} differ in heads or length (torch raises)"
    if key.shape[3] != d:
        return f"query head dim {d}, key head dim {key.shape[3]} (torch raises)"
    if enable_gqa:
        if (hkv == 0 or hq % hkv != 0) and not hq == hkv == 0:
            return f"{hkv} kv heads do not divide {hq} query heads (torch raises)"
    elif hkv != hq:
        return f"{hq} query heads, {hkv} kv heads without enable_gqa (torch raises)"
    if d == 0:
        return "head dim 0"
    if d > ka.MAX_HEAD_DIM or value.shape[3] > ka.MAX_HEAD_DIM:
        return f"head dims {d}/{value.shape[3]} above {ka.MAX_HEAD_DIM}"
    if bsz > ka.MAX_GRID_DIM or hq > ka.MAX_GRID_DIM:
        return f"batch {bsz} or heads {hq} above {ka.MAX_GRID_DIM}"
    if attn_mask is not None:
        if is_causal:
            return "attn_mask with is_causal=True (torch's math kernel raises)"
        why = row_tensor_reason(attn_mask, "attn_mask", dtypes=_MASK_DTYPES, strided=True)
        if why is not None:
            return why
        if attn_mask.dtype not in (torch.bool, query.dtype, torch.float32):
            return f"attn_mask dtype {attn_mask.dtype} with query {query.dtype} (torch raises)"
        if attn_mask.device != query.device:
            return f"attn_mask on {attn_mask.device}, query on {query.device}"
        full = (bsz, hq, seq_q, seq_k)
        if attn_mask.dim() > 4 or not ka.broadcasts(attn_mask.shape, full):
            return f"attn_mask shape {list(attn_mask.shape)} does not broadcast to {list(full)} (torch raises)"
    return None


@register(aten.scaled_dot_product_attention.default, kernel="flag_gems.attention.flash", supports=_supports,
          checks_in_impl=True)
def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    """``aten::scaled_dot_product_attention`` (forward, no dropout) through the flash kernel."""
    why = _supports(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    if why is not None:
        raise NotImplementedError(f"flag_gems scaled_dot_product_attention: {why}")
    return ka.flash_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                              enable_gqa=enable_gqa)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """Attention ``softmax(query @ key^T * scale + mask) @ value`` through the Triton flash kernel.

    The arguments are ``torch.nn.functional.scaled_dot_product_attention``'s; the result is
    the same (up to rounding) for every call the kernel takes, and an error otherwise: there
    is no silent fallback to torch.

    Args:
        query: ``[B, Hq, L, D]`` fp16/bf16/fp32, any strides, D up to 256.
        key: ``[B, Hkv, S, D]``, query's dtype and device.
        value: ``[B, Hkv, S, Dv]``, query's dtype and device, Dv up to 256.
        attn_mask: None, a bool mask (True = takes part) or an additive float mask of query's
            dtype or fp32, broadcastable to ``[B, Hq, L, S]``.
        dropout_p: must be 0.0 (inference kernel).
        is_causal: query ``i`` attends to keys ``j <= i`` (top-left aligned, as torch). Not
            together with ``attn_mask``.
        scale: score scale, ``1 / sqrt(D)`` when None.
        enable_gqa: allow ``Hq`` a multiple of ``Hkv`` (grouped-query attention).

    Returns:
        ``[B, Hq, L, Dv]`` in query's dtype (a transposed view of a contiguous
        ``[B, L, Hq, Dv]`` tensor). Rows with no visible key are zeros, as torch's CPU kernels give.

    Raises:
        NotImplementedError: dropout, inputs requiring grad with grad mode on, nested tensors,
            unsupported devices, head dims above 256.
        TypeError / ValueError: bad arguments (dtypes, ranks, sizes, a mask that does not
            broadcast or comes with ``is_causal``), naming the argument.
    """
    if dropout_p != 0.0:
        raise NotImplementedError(f"flag_gems scaled_dot_product_attention: dropout_p={dropout_p} is not supported "
                                  "(inference kernel); use torch.nn.functional.scaled_dot_product_attention")
    why = _grad_reason(query, key, value, attn_mask)
    if why is not None:
        raise NotImplementedError(f"flag_gems scaled_dot_product_attention: {why}; run it under torch.no_grad() "
                                  "or use torch.nn.functional.scaled_dot_product_attention")
    return ka.flash_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                              enable_gqa=enable_gqa)
