"""Post-autograd graphs call flag_gems' functional ops' Python implementations directly.

A ``torch.ops.flag_gems.*`` call goes through the dispatcher, the custom-op autograd
wrapper, a redispatch, the aliasing check and a Dynamo-disable frame before it reaches the
Python function that launches the kernel. Inside an AOT-compiled inference, forward or
backward graph all of that is settled (autograd was traced, every output is a fresh
tensor), so the graph can call the function itself. Measured on the H100 (4-layer
Llama-3-8B shape, benchmarks/results/profile_host_*): the dispatch path was the largest
host cost of the graph's 17 fused-op calls.

Only functional ops (no mutated arguments) of the ``flag_gems`` namespace are rewritten;
the graph dumps are written before this pass, so they still name the ops.
"""

from __future__ import annotations

import functools

import torch
from torch import fx

__all__ = ["direct_calls", "direct_impl"]


@functools.lru_cache(maxsize=None)
def direct_impl(op) -> object | None:
    """The Python implementation behind the functional flag_gems op ``op``, or None.

    Args:
        op: an ``OpOverload``.

    Returns:
        The function ``torch.library.custom_op`` wrapped, when ``op`` is a ``flag_gems``
        op's default overload that mutates nothing; otherwise None (the call stays).
    """
    if not isinstance(op, torch._ops.OpOverload) or op.namespace != "flag_gems" or op._overloadname != "default":
        return None
    if op._schema.is_mutable:
        return None
    from torch._library import custom_ops

    opdef = getattr(custom_ops, "OPDEFS", {}).get(f"flag_gems::{op._opname}")
    return getattr(opdef, "_init_fn", None)  # private in torch: absent -> keep the dispatcher call


def direct_calls(gm: fx.GraphModule) -> int:
    """Point every functional flag_gems op node of ``gm`` at its Python implementation.

    Args:
        gm: a post-autograd graph (AOT autograd's inference, forward or backward graph).

    Returns:
        The number of nodes rewritten (``gm`` is recompiled when > 0).
    """
    n = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        fn = direct_impl(node.target)
        if fn is not None:
            node.target = fn
            n += 1
    if n:
        gm.recompile()
    return n
