"""Respell Inductor's decompositions back into the forms the generic matchers read, and undo it
where nothing was fused.

Before post-grad passes Inductor has decomposed a few ops that models (vLLM's native layers,
HF's MLPs) use into spellings :mod:`flag_gems.passes` does not read. Both Inductor-side passes
respell before matching and restore after: ``flag_gems.vllm_pass`` and ``flag_gems.inductor_pass``.

==============  ===========================================  ===================================
respelling      Inductor's post-grad graph                   what the generic matchers read
==============  ===========================================  ===================================
``silu``        ``x / (1 + exp(-x))`` (fp32 for half x)      ``x * sigmoid(x)`` (act·mul)
``gelu``        ``x * 0.5 * (1 + erf(x / sqrt(2)))`` and     ``gelu(x, approximate)`` (act·mul)
                the tanh form (torch's reference)
``stack``       ``cat([a.unsqueeze(-1), b.unsqueeze(-1)],    ``stack([a, b], -1)`` (GPT-J rope:
                -1)`` then a view merging the last dims      ``rotate_gptj``, DeepSeek's rope)
==============  ===========================================  ===================================

Before / after (vLLM's ``SiluAndMul.forward_native``, custom ops off: the default with Inductor)::

    g32 = convert_element_type(x[..., :d], f32)
    s = div(g32, add(exp(neg(g32)), 1))               ->  s = mul(g32, sigmoid(g32))
    y = convert_element_type(s, bf16) * x[..., d:]

Only candidates shaped like the pattern they serve are respelled (a SiLU feeding a multiply,
a stack of two equal halves viewed back to one last dim). :meth:`Respelled.restore` puts the
original spelling back for every respelled node that is still used after the fusion passes,
so a graph where nothing matched reaches Inductor as it was.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from torch import fx

from .matching import (
    aten,
    binary_operands,
    cast_target,
    float_scalar,
    is_op,
    same_shape,
    set_fake_val,
    shape_of,
    single_user,
)


@dataclasses.dataclass
class Respelled:
    """The nodes a respelling created, each with the function that rebuilds the original spelling."""

    graph: fx.Graph
    made: list = dataclasses.field(default_factory=list)  # (node, rebuild() -> node)

    @property
    def count(self) -> int:
        return len(self.made)

    def restore(self) -> int:
        """Rebuild the original spelling for respelled nodes still in use; returns how many."""
        restored = 0
        for node, rebuild in self.made:
            if getattr(node, "_erased", False) or not node.users:
                continue
            with self.graph.inserting_before(node):
                original = rebuild()
            node.replace_all_uses_with(original)
            restored += 1
        if restored:
            self.graph.eliminate_dead_code()
        return restored


def _call(graph, target, *args):
    node = graph.call_function(target, args)
    set_fake_val(node, target, *args)
    return node


# ------------------------------------------------------------------ silu


def _silu_input(div: fx.Node):
    """``x`` when ``div`` is ``x / (1 + exp(-x))`` (either operand order of the add), else None."""
    ops = binary_operands(div, aten.div.Tensor)
    if ops is None:
        return None
    x, denom = ops
    add = binary_operands(denom, aten.add.Tensor)
    if add is None:
        return None
    a, b = add
    exp = b if float_scalar(a) == 1.0 else a if float_scalar(b) == 1.0 else None
    if not is_op(exp, aten.exp) or not is_op(exp.args[0], aten.neg) or exp.args[0].args[0] is not x:
        return None
    return x


def _feeds_mul(node: fx.Node) -> bool:
    u = single_user(node)
    if u is not None and cast_target(u) is not None:
        u = single_user(u)
    return u is not None and is_op(u, aten.mul)


def _respell_silu(graph: fx.Graph, out: Respelled) -> None:
    for node in list(graph.nodes):
        if not is_op(node, aten.div.Tensor) or not _feeds_mul(node):
            continue
        x = _silu_input(node)
        if x is None:
            continue
        with graph.inserting_before(node):
            new = _call(graph, aten.mul.Tensor, x, _call(graph, aten.sigmoid.default, x))

        def rebuild(x=x):
            return _call(graph, aten.div.Tensor, x,
                         _call(graph, aten.add.Tensor, _call(graph, aten.exp.default, _call(graph, aten.neg.default, x)), 1))

        node.replace_all_uses_with(new)
        out.made.append((new, rebuild))


# ------------------------------------------------------------------ gelu

_SQRT1_2 = 0.7071067811865476
_TANH_BETA = 0.7978845608028654  # sqrt(2 / pi)
_TANH_KAPPA = 0.044715


def _scaled(node, value: float):
    """``x`` when ``node`` is ``x * value`` (either order), else None."""
    ops = binary_operands(node, aten.mul.Tensor)
    if ops is None:
        return None
    for x, c in (ops, ops[::-1]):
        f = float_scalar(c)
        if f is not None and abs(f - value) <= 1e-6 * abs(value) and isinstance(x, fx.Node):
            return x
    return None


def _cube_of(node):
    """``x`` when ``node`` is ``x * x * x`` (any grouping of the two muls), else None."""
    ops = binary_operands(node, aten.mul.Tensor)
    if ops is None:
        return None
    for sq, x in (ops, ops[::-1]):
        inner = binary_operands(sq, aten.mul.Tensor)
        if inner is not None and inner[0] is x and inner[1] is x:
            return x
    return None


def _gelu_inner(f: fx.Node):
    """``(x, approximate)`` when ``f`` is ``erf(x / sqrt(2))`` or ``tanh(beta * (x + kappa * x**3))``."""
    if is_op(f, aten.erf):
        x = _scaled(f.args[0], _SQRT1_2)
        return (x, "none") if x is not None else None
    if is_op(f, aten.tanh):
        inner = _scaled(f.args[0], _TANH_BETA)
        ops = binary_operands(inner, aten.add.Tensor)
        if ops is None:
            return None
        for x, k in (ops, ops[::-1]):
            cube = _scaled(k, _TANH_KAPPA)
            if cube is not None and _cube_of(cube) is x:
                return x, "tanh"
    return None


def _gelu_input(out: fx.Node):
    """``(x, approximate)`` when ``out`` is ``(x * 0.5) * (1 + f(x))`` as torch's GELU decomposes."""
    ops = binary_operands(out, aten.mul.Tensor)
    if ops is None:
        return None
    for half, one_plus in (ops, ops[::-1]):
        x = _scaled(half, 0.5)
        add = binary_operands(one_plus, aten.add.Tensor)
        if x is None or add is None:
            continue
        a, b = add
        f = b if float_scalar(a) == 1.0 else a if float_scalar(b) == 1.0 else None
        inner = _gelu_inner(f) if isinstance(f, fx.Node) else None
        if inner is not None and inner[0] is x:
            return inner
    return None


def _respell_gelu(graph: fx.Graph, out: Respelled) -> None:
    for node in list(graph.nodes):
        if not is_op(node, aten.mul.Tensor) or not _feeds_mul(node):
            continue
        found = _gelu_input(node)
        if found is None:
            continue
        x, approximate = found
        with graph.inserting_before(node):
            new = graph.call_function(aten.gelu.default, (x,), {"approximate": approximate})
        set_fake_val(new, aten.gelu.default, x, approximate=approximate)
        node.replace_all_uses_with(new)
        out.made.append((new, lambda x=x, a=approximate: _gelu_math(graph, x, a)))


def _gelu_math(graph, x, approximate):
    half = _call(graph, aten.mul.Tensor, x, 0.5)
    if approximate == "none":
        f = _call(graph, aten.erf.default, _call(graph, aten.mul.Tensor, x, _SQRT1_2))
    else:
        cube = _call(graph, aten.mul.Tensor, _call(graph, aten.mul.Tensor, x, x), x)
        inner = _call(graph, aten.add.Tensor, x, _call(graph, aten.mul.Tensor, cube, _TANH_KAPPA))
        f = _call(graph, aten.tanh.default, _call(graph, aten.mul.Tensor, inner, _TANH_BETA))
    return _call(graph, aten.mul.Tensor, half, _call(graph, aten.add.Tensor, f, 1))


# ------------------------------------------------------------------ stack


def _last_dim(dim, ndim) -> bool:
    return dim in (-1, ndim - 1)


def _stack_halves(cat: fx.Node):
    """``(a, b)`` when ``cat`` is ``cat([a.unsqueeze(-1), b.unsqueeze(-1)], -1)`` with a, b of one shape."""
    if not is_op(cat, aten.cat.default) or len(cat.args[0]) != 2:
        return None
    shape = shape_of(cat)
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if not shape or not _last_dim(dim, len(shape)):
        return None
    parts = []
    for u in cat.args[0]:
        if not is_op(u, aten.unsqueeze.default) or not _last_dim(u.args[1], len(shape)):
            return None
        parts.append(u.args[0])
    a, b = parts
    return (a, b) if same_shape(a, b) else None


def _merges_last_dims(node: fx.Node) -> bool:
    u = single_user(node)
    if u is None or not is_op(u, aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        return False
    s, o = shape_of(node), shape_of(u)
    return s is not None and o is not None and len(o) == len(s) - 1


def _respell_stack(graph: fx.Graph, out: Respelled) -> None:
    for node in list(graph.nodes):
        halves = _stack_halves(node)
        if halves is None or not _merges_last_dims(node):
            continue
        with graph.inserting_before(node):
            new = _call(graph, aten.stack.default, list(halves), -1)

        def rebuild(a=halves[0], b=halves[1]):
            parts = [_call(graph, aten.unsqueeze.default, t, -1) for t in (a, b)]
            return _call(graph, aten.cat.default, parts, -1)

        node.replace_all_uses_with(new)
        out.made.append((new, rebuild))


RESPELLINGS: dict[str, Callable] = {"silu": _respell_silu, "gelu": _respell_gelu, "stack": _respell_stack}


def respell(gm: fx.GraphModule, names=tuple(RESPELLINGS)) -> Respelled:
    """Apply the respellings ``names`` to ``gm``.

    Returns:
        A :class:`Respelled`; call its ``restore()`` after the fusion passes.
    """
    out = Respelled(gm.graph)
    for name in names:
        RESPELLINGS[name](gm.graph, out)
    if out.count:
        gm.graph.eliminate_dead_code()
    return out
