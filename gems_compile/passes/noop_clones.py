"""Drop clones that copy an intermediate into the layout it already has.

HF attention ends with ``attn_output.transpose(1, 2).contiguous()``: AOT autograd records
``clone(transpose(sdpa_out), memory_format=torch.contiguous_format)``. When the attention
kernel already wrote its output in ``[B, S, H, D]`` memory order (flash, memory-efficient,
and cuDNN attention when q is laid out so, as our HF rope keeps it), the transposed view is
contiguous and the clone is a full copy of the tensor into the same layout: one kernel and
2 x the attention output's bytes per layer, for nothing. Inductor removes such copies too.

A clone is dropped (its users read its input instead) only when all of these hold, so the
program cannot tell:

- it keeps the layout: the input's shape, strides and dtype equal the clone's (static ints);
- its input is an intermediate: the chain of views it reads (``_unsafe_view`` included) starts
  at an op's output, not at a graph input (whose storage the caller owns);
- no node of the graph mutates anything (post-autograd graphs are functional apart from
  ``copy_`` into inputs, whose sources are only read);
- neither the clone nor a view of it is a graph output (a returned tensor would alias an
  internal buffer, which AOT autograd's output handling did not plan for).
"""

from __future__ import annotations

import torch
from torch import fx

from .matching import is_view, symbolic_layout

__all__ = ["drop_noop_clones"]

aten = torch.ops.aten
_FORMATS = (None, torch.preserve_format, torch.contiguous_format)


def _static_layout(v) -> tuple | None:
    if not isinstance(v, torch.Tensor) or symbolic_layout(v):
        return None
    return tuple(v.shape), tuple(v.stride()), v.dtype, v.device


def _root(n: fx.Node) -> fx.Node:
    while is_view(n) and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    return n


def _returned(n: fx.Node, output: fx.Node) -> bool:
    """Whether ``n`` or a view of it (through any chain of views) is read by the graph's output."""
    todo = [n]
    while todo:
        m = todo.pop()
        if output in m.users:
            return True
        todo += [u for u in m.users if is_view(u)]
    return False


def _mutates(n: fx.Node) -> bool:
    t = n.target
    if n.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
        return False
    if t is aten.copy_.default:
        return isinstance(n.args[0], fx.Node) and n.args[0].op != "placeholder"
    return t._schema.is_mutable


def drop_noop_clones(gm: fx.GraphModule) -> int:
    """Remove every clone of ``gm`` that copies an intermediate into the layout it already has.

    Args:
        gm: a post-autograd graph (inference, forward or backward) with ``val`` metadata.

    Returns:
        The number of clones removed (``gm`` is recompiled when > 0).
    """
    nodes = list(gm.graph.nodes)
    if any(_mutates(n) for n in nodes):
        return 0
    output = next(n for n in reversed(nodes) if n.op == "output")
    dropped = 0
    for n in nodes:
        if n.op != "call_function" or n.target is not aten.clone.default:
            continue
        src = n.args[0] if n.args else None
        if not isinstance(src, fx.Node) or n.kwargs.get("memory_format") not in _FORMATS or _returned(n, output):
            continue
        if _root(src).op != "call_function":
            continue
        layout = _static_layout(n.meta.get("val"))
        if layout is None or layout != _static_layout(src.meta.get("val")):
            continue
        n.replace_all_uses_with(src)
        gm.graph.erase_node(n)
        dropped += 1
    if dropped:
        gm.recompile()
    return dropped
