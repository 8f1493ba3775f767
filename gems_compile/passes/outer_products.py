"""GEMMs over a contraction of one element are products: rewrite them as broadcast multiplies.

HF's rotary embedding computes its angles as ``inv_freq[:, None] @ positions[None, :]``
(``[B, D/2, 1] @ [B, 1, S]``): a batched GEMM with K = 1, one cuBLAS launch per step for a
table of a few hundred products, whose result only feeds the pointwise cos / sin chain.
As ``mul(a, b)`` with broadcasting it is the same products (one multiply each, rounded once
to the output dtype, as the GEMM's single multiply-add into zero is), and the pointwise fusion
pass that runs next folds it into the kernel that computes cos and sin: one launch less per
step, and no GEMM's host cost (the H200 line timer: 38-47 µs for that ``bmm`` line against
Inductor's 24 µs ``mm``, benchmarks/NOTES.md session 8). Inductor makes the same rewrite.

With TF32 allowed for fp32 matmuls, cuBLAS would round the operands to TF32 first; the
product here is the exact fp32 one (positions above 2048 are not rounded to a multiple of 2).

The rewrite is made only where the product comes out in the GEMM's layout (shape and strides
of the traced values), since the graph's views of the result were traced on that layout.

Before / after::

    freqs = aten.bmm(inv_freq_expanded, position_ids_expanded)   # [1, 64, 1] @ [1, 1, S]
    ->
    freqs = aten.mul.Tensor(inv_freq_expanded, position_ids_expanded)
"""

from __future__ import annotations

import torch
from torch import fx

from .matching import FLOAT_DTYPES, set_fake_val, val

__all__ = ["rewrite_outer_products"]

aten = torch.ops.aten
_RANK = {aten.mm.default: 2, aten.bmm.default: 3}


def _outer(n: fx.Node) -> bool:
    """``mm`` / ``bmm`` of float operands whose contraction dim is statically 1."""
    rank = _RANK.get(n.target) if n.op == "call_function" else None
    if rank is None or len(n.args) != 2 or n.kwargs:
        return False
    a, b = (val(x) if isinstance(x, fx.Node) else None for x in n.args)
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if a.dim() != rank or b.dim() != rank or a.dtype not in FLOAT_DTYPES or b.dtype != a.dtype:
        return False
    k_a, k_b = a.shape[-1], b.shape[-2]
    return type(k_a) is int and type(k_b) is int and k_a == k_b == 1


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, and the same stride on every dim that has more than one element."""
    return a.shape == b.shape and all(sa == sb for sa, sb, size in zip(a.stride(), b.stride(), a.shape) if size != 1)


def rewrite_outer_products(gm: fx.GraphModule) -> int:
    """Replace every ``mm`` / ``bmm`` of ``gm`` with K = 1 by the broadcast ``mul`` of its operands.

    Args:
        gm: a post-autograd aten graph.

    Returns:
        The number of GEMMs rewritten (``gm`` is recompiled when > 0).
    """
    n_rewritten = 0
    for n in list(gm.graph.nodes):
        if not _outer(n):
            continue
        a, b = n.args
        with gm.graph.inserting_before(n):
            mul = gm.graph.call_function(aten.mul.Tensor, (a, b))
        set_fake_val(mul, aten.mul.Tensor, a, b)
        before, after = val(n), val(mul)
        if not isinstance(after, torch.Tensor) or not _same_layout(before, after):
            gm.graph.erase_node(mul)  # views downstream were traced on the GEMM's layout: keep it
            continue
        mul.meta.update({k: v for k, v in n.meta.items() if k != "val"})
        n.replace_all_uses_with(mul)
        gm.graph.erase_node(n)
        n_rewritten += 1
    if n_rewritten:
        gm.graph.lint()
        gm.recompile()
    return n_rewritten
