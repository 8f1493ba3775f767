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
- its input is an intermediate: the chain of views it reads starts at an op's output, not at
  a graph input (whose storage the caller owns and may change later);
- no node of the graph mutates anything (post-autograd graphs are functional apart from
  ``copy_`` into inputs, whose sources are only read);
- no user of the clone is the graph's output (a returned tensor would alias an internal
  buffer, which AOT autograd's output handling did not plan for).
"""

from __future__ import annotations

import torch
from torch import fx

__all__ = ["drop_noop_clones"]

aten = torch.ops.aten
_FORMATS = (None, torch.preserve_format, torch.contiguous_format)


def _static_layout(v) -> tuple | None:
    if not isinstance(v, torch.Tensor):
        return None
    dims = (*v.shape, *v.stride())
    if not all(isinstance(d, int) for d in dims):
        return None
    return tuple(v.shape), tuple(v.stride()), v.dtype, v.device


def _is_view(n: fx.Node) -> bool:
    t = n.target
    return n.op == "call_function" and isinstance(t, torch._ops.OpOverload) and t.is_view


def _root(n: fx.Node) -> fx.Node:
    while _is_view(n) and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    return n


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
    output = nodes[-1] if nodes and nodes[-1].op == "output" else next(n for n in nodes if n.op == "output")
    dropped = 0
    for n in nodes:
        if n.op != "call_function" or n.target is not aten.clone.default:
            continue
        src = n.args[0] if n.args else None
        if not isinstance(src, fx.Node) or n.kwargs.get("memory_format") not in _FORMATS or output in n.users:
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
