"""Fuse gated-MLP activations, ``act(gate) * up``, into ``flag_gems`` ops.

Matches ``act(gate) * up`` (either operand order) in the pre-dispatch aten graph, with:

==============  ==============================================================  ===================
activation      model code (traced to)                                           flag_gems ops
==============  ==============================================================  ===================
``silu``        ``F.silu``, ``nn.SiLU``, HF ``ACT2FN["silu"]`` (``aten.silu``)    ``silu_and_mul*``
``gelu``        ``F.gelu``, ``nn.GELU()``, ``ACT2FN["gelu"]`` (``aten.gelu``)     ``gelu_and_mul*``
``gelu_tanh``   ``gelu(approximate="tanh")``, ``ACT2FN["gelu_pytorch_tanh"]``     ``gelu_and_mul*``
==============  ==============================================================  ===================

Spellings of the same activation (a suffix of the variant name):

* ``_sigmoid``: SiLU written out, ``g * torch.sigmoid(g)`` (either order);
* ``_fp32``: the activation computed on an upcast, ``act(g.float()).to(g.dtype)``.

Gate and up as two tensors (Llama, Qwen, Mistral, Gemma: ``gate_proj(x)``, ``up_proj(x)``)
become the two-tensor op. When they are the two halves of one tensor ``x[..., 2d]``, gate
first, the one-tensor ``*_fused`` op reads ``x`` directly instead of two strided views
(vLLM's ``SiluAndMul`` layout). The halves may come from (a suffix of the variant name):

=====================  ==========================================================  ============
layout                 model code                                                   seen in
=====================  ==========================================================  ============
``_chunk``             ``gate, up = x.chunk(2, dim=-1)``                            Phi-3, vLLM
``_split``             ``x.split(d, dim=-1)``
``_split_with_sizes``  ``x.split([d, d], dim=-1)``
``_slice``             ``x[..., :d]`` and ``x[..., d:]`` (or ``x[..., -d:]``)
``_narrow``            ``x.narrow(-1, 0, d)`` and ``x.narrow(-1, d, d)``
=====================  ==========================================================  ============

Variant names join the three: ``silu``, ``gelu_tanh``, ``silu_chunk``, ``silu_sigmoid_slice``.

Before / after::

    y = silu(gate_proj(h)) * up_proj(h)            ->  y = flag_gems.silu_and_mul(gate, up)
    g, u = x.chunk(2, -1); y = u * gelu(g, "tanh")  ->  y = flag_gems.gelu_and_mul_fused(x, "tanh")

Numerics: the model computes ``act(gate)`` in the activation dtype (a rounding, to bf16
say) and multiplies in that dtype (a second rounding); the fused kernels compute the
activation and the product in fp32 and round once. That is the accepted fused-kernel
contract (vLLM's and Megatron's kernels do the same): one rounding instead of two, so the
result is closer to the exact value and may differ from eager by one unit in the last place.

Left alone, with the reason in the report: the activation (or the ``sigmoid`` of the
written-out SiLU) has other users, since it must still be computed; gate, up and output
dtypes differ (type promotion); gate and up shapes differ (a broadcasting mul); a
non-contiguous output layout; a dtype other than fp16/bf16/fp32; gate and up split from
one tensor along a dim other than the last; inputs the op's fake implementation rejects
(a CPU tensor without Triton's interpreter). Halves of one tensor that are not
``[gate | up]`` (gate in the second half, a three-way split) use the two-tensor op.
Symbolic sizes are compared without adding guards.

Inductor's post-grad graphs hold SiLU and GELU already decomposed into elementwise math;
the Inductor-side passes (``flag_gems.inductor_pass``, ``flag_gems.vllm_pass``) respell them
first (:mod:`flag_gems.passes.canonicalize`), and the backend's ``options={"inductor": True}``
fuses before Inductor.
"""

from __future__ import annotations

import dataclasses
import logging
import operator

import torch
from torch import fx

from ..report import GraphReport
from .matching import (
    F32,
    FLOAT_DTYPES,
    aten,
    cast_target,
    dtype_of,
    known_equal,
    node_arg,
    other_operand,
    same_shape,
    set_fake_val,
    shape_of,
    single_user,
    strip_casts,
    val,
)

logger = logging.getLogger(__name__)

NAME = "act_and_mul"
PATTERN = "act_and_mul pattern"


@dataclasses.dataclass(frozen=True)
class _Act:
    """One activation: its report name and the flag_gems ops computing ``act(gate) * up``."""

    variant: str
    op: str  # two-tensor op: (gate, up[, approximate])
    fused_op: str  # one-tensor op: (x[, approximate])
    approximate: str | None  # the ops' ``approximate`` argument (None: they take none)


ACTIVATIONS = {
    ("silu", None): _Act("silu", "silu_and_mul", "silu_and_mul_fused", None),
    ("gelu", "none"): _Act("gelu", "gelu_and_mul", "gelu_and_mul_fused", "none"),
    ("gelu", "tanh"): _Act("gelu_tanh", "gelu_and_mul", "gelu_and_mul_fused", "tanh"),
}


# ----------------------------------------------------------------- activations
# Each reader starts at its root node and returns (activation, gate, activation output,
# spelling suffix), a reason string, or None when the node is not an activation here.


def _read_silu(node):
    return ACTIVATIONS["silu", None], node.args[0], node, ""


def _read_gelu(node):
    act = ACTIVATIONS.get(("gelu", node_arg(node, 1, "approximate", "none")))
    return None if act is None else (act, node.args[0], node, "")


def _read_sigmoid(node):
    gate = node.args[0]
    out = next((u for u in node.users if _same_view(other_operand(u, node, aten.mul), gate)), None)
    if out is None:
        return None
    if len(node.users) > 1:
        return "sigmoid(gate) has other users (it must still be computed)"
    return ACTIVATIONS["silu", None], gate, out, "_sigmoid"


ROOTS = {
    aten.silu.default: _read_silu,
    aten.gelu.default: _read_gelu,
    aten.sigmoid.default: _read_sigmoid,
}


def _unwrap_upcast(gate, out):
    """``act(g.float()).to(g.dtype)`` -> ``(g, the cast back, "_fp32")``; else the inputs unchanged."""
    src, casts = strip_casts(gate)
    d = dtype_of(src)
    if casts and dtype_of(gate) == F32 and d in (torch.float16, torch.bfloat16):
        back = single_user(out)
        if back is not None and cast_target(back) == d:
            return src, back, "_fp32"
    return gate, out, ""


# ----------------------------------------------------------------- halves of one tensor


def _chunk_start(split, i, n):  # aten.chunk(x, chunks, dim=0): pieces of ceil(n / chunks), as ATen writes it
    chunks = node_arg(split, 1, "chunks")
    return i * ((n + chunks - 1) // chunks)


def _split_start(split, i, n):  # aten.split.Tensor(x, split_size, dim=0)
    return i * node_arg(split, 1, "split_size")


def _split_with_sizes_start(split, i, n):  # aten.split_with_sizes(x, split_sizes, dim=0)
    return sum(node_arg(split, 1, "split_sizes")[:i])


# Multi-output view ops read through getitem: op -> (layout name, start of piece i along dim).
SPLITS = {
    aten.chunk.default: ("chunk", _chunk_start),
    aten.split.Tensor: ("split", _split_start),
    aten.split_with_sizes.default: ("split_with_sizes", _split_with_sizes_start),
}
# Single-output view ops: op -> (layout name, index of the start argument, its name).
SLICES = {
    aten.slice.Tensor: ("slice", 2, "start"),
    aten.narrow.default: ("narrow", 2, "start"),
}


@dataclasses.dataclass(frozen=True)
class _Piece:
    """A view of ``source`` along ``dim``, starting at ``start`` (its length is the view's size)."""

    source: fx.Node
    dim: int
    start: object  # int or SymInt
    layout: str


def _int(a):
    """An int / SymInt argument (a node holding a SymInt is read through its example value)."""
    v = val(a) if isinstance(a, fx.Node) else a
    return v if isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool) else None


def _piece(node) -> _Piece | None:
    """Read ``node`` as a contiguous-range view of another tensor along one dim, or None."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target is operator.getitem:
        split, i = node.args
        entry = SPLITS.get(getattr(split, "target", None))
        if entry is None or not isinstance(i, int):
            return None
        layout, start_of = entry
        x, dim = split.args[0], node_arg(split, 2, "dim", 0)
    elif node.target in SLICES:
        layout, index, name = SLICES[node.target]
        x, dim = node.args[0], node_arg(node, 1, "dim", 0)
        if _int(node_arg(node, 4, "step", 1)) != 1:
            return None
        start = node_arg(node, index, name, None)
        start = 0 if start is None else _int(start)
        if start is None:
            return None
    else:
        return None
    shape = shape_of(x)
    if shape is None or not isinstance(dim, int) or not -len(shape) <= dim < len(shape):
        return None
    dim %= len(shape)
    if node.target is operator.getitem:
        start = start_of(split, i, shape[dim])
    elif isinstance(start, int) and start < 0:
        start += shape[dim]
    return _Piece(x, dim, start, layout)


def _same_view(a, b) -> bool:
    """True if ``a`` and ``b`` are one node, or two identical views (``x[..., :d]`` spelled twice)."""
    if a is b:
        return True
    pa, pb = _piece(a), _piece(b)
    return (
        pa is not None
        and pb is not None
        and pa.source is pb.source
        and pa.dim == pb.dim
        and known_equal(pa.start, pb.start)
        and same_shape(a, b)
    )


def _halves(gate, up):
    """``(x, layout)`` when ``gate = x[..., :d]`` and ``up = x[..., d:2d]``; a reason string
    when both are split from one tensor along another dim; None otherwise."""
    pg, pu = _piece(gate), _piece(up)
    if pg is None or pu is None or pg.source is not pu.source or pg.dim != pu.dim:
        return None
    shape = shape_of(pg.source)
    if pg.dim != len(shape) - 1:
        return f"gate and up are split from one tensor along dim {pg.dim}, not the last dim"
    # gate = [0, d), up = [d, n) and n is the end of up: with up's size d (the mul's shapes
    # matched) that is exactly the two halves. Written this way, a symbolic n proves it too.
    d, d_up = shape_of(gate)[-1], shape_of(up)[-1]
    if known_equal(pg.start, 0) and known_equal(pu.start, d) and known_equal(shape[-1], pu.start + d_up):
        return pg.source, pg.layout
    return None


# ----------------------------------------------------------------- matching and rewrite


@dataclasses.dataclass
class _Match:
    mul: fx.Node  # the node whose value the fused op produces
    act: _Act
    gate: fx.Node
    up: fx.Node
    x: fx.Node | None  # the [*, 2d] tensor when gate and up are its halves
    variant: str


def _match(root: fx.Node) -> _Match | str | None:
    """Match the pattern around one activation root (None: not a gated activation)."""
    read = ROOTS[root.target](root)
    if not isinstance(read, tuple):
        return read
    act, gate, out, spelling = read
    gate, out, upcast = _unwrap_upcast(gate, out)
    muls = [u for u in out.users if isinstance(val(other_operand(u, out, aten.mul)), torch.Tensor)]
    if not muls:
        return None
    if len(out.users) > 1:
        return "activation output has other users (it must still be computed)"
    mul = muls[0]
    up = other_operand(mul, out, aten.mul)
    if up is out:
        return None  # act(g) ** 2: not a gated activation
    d = dtype_of(gate)
    if d not in FLOAT_DTYPES:
        return f"dtype {d} (the kernels take fp16, bf16, fp32)"
    if not dtype_of(out) == dtype_of(up) == dtype_of(mul) == d:
        return f"gate/up/output dtypes differ (act({d}) * {dtype_of(up)} -> {dtype_of(mul)})"
    if not (same_shape(gate, up) and same_shape(mul, gate)):
        return f"broadcasting mul (gate {shape_of(gate)} * up {shape_of(up)})"
    if not shape_of(gate):
        return "0-dim gate"
    if not val(mul).is_contiguous():
        return "non-contiguous output layout"
    halves = _halves(gate, up)
    if isinstance(halves, str):
        return halves
    x, layout = halves if halves is not None else (None, "")
    variant = act.variant + spelling + upcast + (f"_{layout}" if layout else "")
    return _Match(mul, act, gate, up, x, variant)


def _rewrite(gm: fx.GraphModule, m: _Match, report: GraphReport) -> bool:
    extra = () if m.act.approximate is None else (m.act.approximate,)
    if m.x is not None:
        op, args = getattr(torch.ops.flag_gems, m.act.fused_op).default, (m.x, *extra)
    else:
        op, args = getattr(torch.ops.flag_gems, m.act.op).default, (m.gate, m.up, *extra)
    with gm.graph.inserting_before(m.mul):
        fused = gm.graph.call_function(op, args)
    try:  # the op's fake implementation checks what its kernel takes (device, dtype, shape)
        set_fake_val(fused, op, *args)
    except (TypeError, ValueError, NotImplementedError) as e:
        gm.graph.erase_node(fused)
        report.keep(PATTERN, f"flag_gems.{op.name().split('::')[-1]} does not take these inputs ({e})")
        return False
    m.mul.replace_all_uses_with(fused)
    gm.graph.erase_node(m.mul)  # now unused; the rest of the pattern goes with the final dead-code pass
    report.fuse(NAME, m.variant)
    return True


def fuse_act_and_mul(gm: fx.GraphModule, report: GraphReport) -> int:
    """Rewrite every ``act(gate) * up`` in ``gm`` into a flag_gems op; returns the number of rewrites.

    Args:
        gm: a pre-dispatch aten graph (or an Inductor post-grad graph), rewritten in place.
        report: receives one ``fuse`` per rewrite and one ``keep`` per rejected candidate.

    Returns:
        The number of patterns rewritten.
    """
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in ROOTS or not node.users:
            continue
        m = _match(node)
        if isinstance(m, str):
            report.keep(PATTERN, m)
            continue
        if m is None:
            continue
        count += _rewrite(gm, m, report)
    if count:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return count
