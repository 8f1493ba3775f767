"""The aten-op cases of the eager-mode benchmark (``bench_ops.py``), shared with
``make_measurements.py``: case name -> (overload, builder). Plain torch only (no flag_gems
import), so the measurements can be regenerated whatever state the package is in.

A builder ``(rows, cols, device) -> args`` (or ``Call((args, kwargs))``) makes fresh random
inputs at the decode-like ``[8, 4096]`` or prefill-like ``[4096, 4096]`` size (bf16 unless the
case says otherwise); on the ``meta`` device it gives the case's dtypes without data.
"""

from __future__ import annotations

import torch

__all__ = ["CASES", "Call", "case_dtype", "nbytes"]

aten = torch.ops.aten


def _t(shape, dtype=torch.bfloat16, device="cuda"):
    return torch.randn(shape, dtype=dtype, device=device)


class Call(tuple):
    """A builder's result when the call takes keyword arguments: ``Call((args, kwargs))``."""


def _sdpa(m, device, causal):
    # Llama-3-8B's shapes (32 heads of 128, kv heads already repeated as HF does): "decode" rows:
    # 8 sequences, 1 query against 1024 keys; "prefill": 1 x 2048, causal, or with HF's
    # materialized additive causal mask [1, 1, L, L]. Tiny sizes for smoke runs.
    heads, dim = (32, 128) if m >= 8 else (2, 16)
    b, lq, lk = (1, 2048, 2048) if m > 8 else (8, 1, 1024) if m == 8 else (1, m, m + 5)
    q = _t((b, lq, heads, dim), device=device).transpose(1, 2)  # HF's layout: [B, L, H, D] viewed as [B, H, L, D]
    k = _t((b, lk, heads, dim), device=device).transpose(1, 2)
    v = _t((b, lk, heads, dim), device=device).transpose(1, 2)
    if causal and lq > 1:
        return Call(((q, k, v), {"is_causal": True}))
    allowed = torch.ones(lq, lk, dtype=torch.bool, device=device).tril(lk - lq)
    mask = torch.zeros(lq, lk, dtype=q.dtype, device=device).masked_fill(~allowed, torch.finfo(q.dtype).min)
    return Call(((q, k, v), {"attn_mask": mask[None, None]}))


# name -> (overload, builder(rows, cols, device) -> args or Call). Bytes are counted from the tensors.
CASES = {
    "add.Tensor": (aten.add.Tensor, lambda m, n, d: (_t((m, n), device=d), _t((m, n), device=d))),
    "add.Tensor[bcast]": (aten.add.Tensor, lambda m, n, d: (_t((m, n), device=d), _t((n,), device=d))),
    "mul.Tensor": (aten.mul.Tensor, lambda m, n, d: (_t((m, n), device=d), _t((m, n), device=d))),
    "mul.Scalar": (aten.mul.Scalar, lambda m, n, d: (_t((m, n), device=d), 0.5)),
    "sub.Tensor": (aten.sub.Tensor, lambda m, n, d: (_t((m, n), device=d), _t((m, n), device=d))),
    "div.Tensor": (aten.div.Tensor, lambda m, n, d: (_t((m, n), device=d), _t((m, n), device=d).abs() + 1)),
    "neg.default": (aten.neg.default, lambda m, n, d: (_t((m, n), device=d),)),
    "exp.default": (aten.exp.default, lambda m, n, d: (_t((m, n), device=d),)),
    "rsqrt.default": (aten.rsqrt.default, lambda m, n, d: (_t((m, n), device=d).abs() + 1,)),
    "silu.default": (aten.silu.default, lambda m, n, d: (_t((m, n), device=d),)),
    "gelu.default": (aten.gelu.default, lambda m, n, d: (_t((m, n), device=d),)),
    "tanh.default": (aten.tanh.default, lambda m, n, d: (_t((m, n), device=d),)),
    "sigmoid.default": (aten.sigmoid.default, lambda m, n, d: (_t((m, n), device=d),)),
    "pow.Tensor_Scalar": (aten.pow.Tensor_Scalar, lambda m, n, d: (_t((m, n), device=d, dtype=torch.float32), 2)),
    "_to_copy[bf16->fp32]": (aten._to_copy.default, lambda m, n, d: Call(((_t((m, n), device=d),), {"dtype": torch.float32}))),
    "where.self": (aten.where.self, lambda m, n, d: (_t((m, n), device=d) > 0, _t((m, n), device=d), _t((m, n), device=d))),
    "masked_fill.Scalar": (aten.masked_fill.Scalar, lambda m, n, d: (_t((m, n), device=d), _t((m, n), device=d) > 0, -1e4)),
    "eq.Scalar": (aten.eq.Scalar, lambda m, n, d: (torch.randint(0, 4, (m, n), device=d), 1)),
    "sum.dim_IntList": (aten.sum.dim_IntList, lambda m, n, d: (_t((m, n), device=d), [-1], False)),
    "mean.dim": (aten.mean.dim, lambda m, n, d: (_t((m, n), device=d, dtype=torch.float32), [-1], True)),
    "amax.default": (aten.amax.default, lambda m, n, d: (_t((m, n), device=d), [-1], False)),
    "_softmax.default": (aten._softmax.default, lambda m, n, d: (_t((m, n), device=d), -1, False)),
    "_log_softmax.default": (aten._log_softmax.default, lambda m, n, d: (_t((m, n), device=d, dtype=torch.float32), -1, False)),
    "embedding.default": (aten.embedding.default, lambda m, n, d: (_t((32000, n), device=d), torch.randint(0, 32000, (m,), device=d))),
    "index_select.default": (aten.index_select.default, lambda m, n, d: (_t((8192, n), device=d), 0, torch.randint(0, 8192, (m,), device=d))),
    "cat.default": (aten.cat.default, lambda m, n, d: ([_t((m, n // 2), device=d), _t((m, n // 2), device=d)], -1)),
    "cumsum.default": (aten.cumsum.default, lambda m, n, d: (torch.randint(0, 2, (m, n), device=d), -1)),
    # GEMMs at Llama projection shapes: [M, 4096] @ [4096, 4096]; bmm as attention scores.
    "mm.default": (aten.mm.default, lambda m, n, d: (_t((m, n), device=d), _t((n, n), device=d))),
    "addmm.default": (aten.addmm.default, lambda m, n, d: (_t((n,), device=d), _t((m, n), device=d), _t((n, n), device=d))),
    "bmm.default": (aten.bmm.default, lambda m, n, d: (_t((32, min(m, 2048), 128), device=d), _t((32, 128, min(m, 2048)), device=d))),
    "_fused_rms_norm.default": (aten._fused_rms_norm.default, lambda m, n, d: (_t((m, n), device=d), [n], _t((n,), device=d), 1e-6)),
    "sdpa[causal]": (aten.scaled_dot_product_attention.default, lambda m, n, d: _sdpa(m, d, causal=True)),
    "sdpa[mask]": (aten.scaled_dot_product_attention.default, lambda m, n, d: _sdpa(m, d, causal=False)),
}


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for y in x for t in _tensors(y)]
    return []


def case_dtype(args) -> str:
    """The dtype a case is labelled with: its first floating-point tensor's, else its first
    tensor's (``"bfloat16"``; ``where``'s bool condition does not name the case)."""
    tensors = _tensors(args)
    floating = [t for t in tensors if t.is_floating_point()]
    return str((floating or tensors)[0].dtype).removeprefix("torch.") if tensors else "-"


def nbytes(args, out) -> int:
    """Bytes of every tensor in ``args`` and ``out`` (each read or written once)."""
    return sum(t.numel() * t.element_size() for t in _tensors(args) + _tensors(out))
