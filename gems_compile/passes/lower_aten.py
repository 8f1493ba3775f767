"""Aten node lowering: rewrite aten nodes to registered implementations, record every decision.

For each aten node of a (post-AOT) graph, the ``flag_gems.lowerings`` registry decides: an
entry whose ``graph`` policy is on and whose ``supports(...)`` passes on the node's fake
values is rewritten to call its implementation directly (no dispatcher, no eager wrapper);
anything else stays aten, and the report says why (the graph policy with its evidence, an
unsupported input, a declared fallback, or no lowering). The graph policy is separate from
the eager one: an entry on in ``enable()`` is lowered here only where measurements say it
is faster in a graph (``flag_gems.lowerings.registry``). Views and other data-movement-free
ops are counted under one reason so the report stays readable.

Before / after (``_softmax``'s graph policy on)::

    %s = aten._softmax.default(%x, -1, False)   ->   %s = _softmax_default(%x, -1, False)
"""

from __future__ import annotations

import torch
from torch import fx

from ..lowerings.registry import FALLBACKS, lookup
from ..report import GraphReport
from .matching import val

_VIEWS = {"view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "slice", "select", "unsqueeze",
          "squeeze", "split", "chunk", "alias", "detach", "as_strided", "unbind", "split_with_sizes"}


def _val(a):
    """A node argument as ``supports`` sees it: fake values for nodes, inside lists too (``cat``)."""
    if isinstance(a, fx.Node):
        return val(a)
    if isinstance(a, (list, tuple)):
        return type(a)(_val(x) for x in a)
    return a


def _vals(args):
    return [_val(a) for a in args]


def lower_aten(gm: fx.GraphModule, report: GraphReport, everything: bool = False) -> int:
    """Rewrite the aten nodes of ``gm`` whose entry is on for graphs; returns how many.

    Args:
        gm: a post-AOT aten graph.
        report: where each decision is recorded.
        everything: rewrite every registered entry whose ``supports`` passes, whatever its
            graph policy (``options={"lower_aten": "all"}``, for measuring them in graphs).
    """
    count = 0
    for node in gm.graph.nodes:
        t = node.target
        if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload) or t.namespace != "aten":
            continue
        name = str(t).removeprefix("aten.")
        entry = lookup(t)
        if entry is None:
            if t in FALLBACKS:
                report.keep(name, FALLBACKS[t])
            elif t.__name__.split(".")[0] in _VIEWS or torch.Tag.view_copy in t.tags or t.is_view:
                report.keep("views", "no data movement")
            else:
                report.keep(name, "no lowering registered")
            continue
        if not (entry.graph.on or everything):
            report.keep(name, f"graph policy off: {entry.graph.reason}")
            continue
        reason = entry.supports(*_vals(node.args), **dict(zip(node.kwargs, _vals(node.kwargs.values()))))
        if reason is not None:
            report.keep(name, reason)
            continue
        node.target = entry.impl
        report.lower(name, entry.kernel)
        count += 1
    if count:
        gm.recompile()
    return count
