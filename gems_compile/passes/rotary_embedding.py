"""Fuse rotary position embedding (RoPE) of q and k into one ``flag_gems`` launch.

The rotation of one tensor ``x`` (q or k, ``[.., heads, D]``, its first ``r`` dims rotating)
is matched in two forms and two pair styles; the q and k rotations that share their
tables are then rewritten together, into one op. Forms:

======  =============================================  ======================  ========
form    model code, per tensor                         tables                  seen in
======  =============================================  ======================  ========
full    ``x * cos + rot(x) * sin``                     ``cos, sin [.., r]``    HF
halves  ``join(x1 * c - x2 * s, x2 * c + x1 * s)``     ``c, s [.., r/2]``      vLLM
======  =============================================  ======================  ========

Pair styles (``STYLES``; ``rot(x) = join(-x2, x1)``):

=====  ========================================  ======================================  ==============
style  halves ``x1, x2`` of ``x``                 ``join(a, b)``                          seen in
=====  ========================================  ======================================  ==============
neox   ``x[..., :r/2], x[..., r/2:]``, ``chunk``  ``cat((a, b), -1)``                     Llama, NeoX
gptj   ``x[..., ::2], x[..., 1::2]``              ``stack((a, b), -1).flatten(-2)``       GPT-J
=====  ========================================  ======================================  ==============

Around the rotation, ``x`` may be an fp32 upcast (``x.float()``, the result cast back), the
tables may be fp32 on a half-precision ``x`` when the result is cast back (OLMo-2), and
``x`` may be the first ``r`` dims of the tensor, the rest concatenated back unchanged:
``cat((rotated(q[..., :r]), q[..., r:]), -1)`` (partial rotary: Phi, NeoX, GPT-J, vLLM).
Variants (``VARIANTS``, the name in the report; suffix ``_partial`` when ``r < D``,
``_q_only`` when no k shares the tables):

===============  ============================================  ======================================================
variant          matched                                       rewritten to
===============  ============================================  ======================================================
``hf``           full, neox                                    ``rotary_embedding_hf(q, k, cos, sin, False)``
``gptj``         full, gptj                                    ``rotary_embedding_hf(q, k, cos, sin, True)``
``vllm``         halves, neox, ``c, s`` rows of a cache        ``rotary_embedding_cache(pos, q, k, D, cache, True)``
``vllm_gptj``    halves, gptj, rows of a cache                 ``rotary_embedding_cache(pos, q, k, D, cache, False)``
``halves``       halves, neox, other tables (3-D cache)        ``rotary_embedding_hf`` on ``cat((c, c), -1)``
``halves_gptj``  halves, gptj, other tables                    ``rotary_embedding_hf`` on ``c.repeat_interleave(2, -1)``
===============  ============================================  ======================================================

"Rows of a cache": ``c, s = cache.index_select(0, pos).chunk(2, -1)`` (or ``cache[pos]``,
``split``, slices; then ``unsqueeze(-2)`` and casts), ``cache [max_pos, r]``, as vLLM's
``forward_native``. The HF op takes q ``[B, H, S, D]`` with tables ``[B or 1, 1, S, r]``
(``[1, S, r]``, ``[S, r]``) as they are; q ``[*tokens, H, D]`` with tables ``[*tokens, 1, r]``
(GPT-J and vLLM layouts; tables may broadcast over token dims) goes in as ``[N, H, 1, D]``
with tables ``[N, 1, r]`` (views when the layout allows). A lone q runs the HF op with a
k of 0 heads (no programs launched for it) or ``rotary_embedding_cache_q``. Before / after::

    q_embed = q * cos + rotate_half(q) * sin
    k_embed = k * cos + rotate_half(k) * sin
        ->  q_embed, k_embed = flag_gems.rotary_embedding_hf(q, k, cos, sin, False)

    cos, sin = cache.index_select(0, pos).chunk(2, -1)
    q = cat((rope(q[..., :r], cos, sin), q[..., r:]), -1); k = (same)
        ->  q, k = flag_gems.rotary_embedding_cache(pos, q, k, D, cache, True)

KV caches: the rotated k is usually first used by the cache update, which is where the
fused op goes, so the cache receives the op's k. Cache writes in between (HF's
``StaticCache`` ``index_copy_``, vLLM-style ``cache[slots] = k`` / ``index_copy_`` /
slice assignment, ``DynamicCache``'s ``detach_`` of a fresh tensor, a position counter's
``add_``) write other storages than q, k and the tables, so they stay where they are,
in order; only an op that may write what the fused op reads keeps the pattern::

    q_embed, k_embed = rope(q, cos, sin), rope(k, cos, sin)
    k_cache.index_copy_(2, cache_position, k_embed); v_cache.index_copy_(2, cache_position, v)
    attn(q_embed, k_cache, v_cache)
        ->  q_embed, k_embed = flag_gems.rotary_embedding_hf(q, k, cos, sin, False)
            k_cache.index_copy_(2, cache_position, k_embed); ...

Numerics: the model computes ``x * cos + rot(x) * sin`` in x's dtype, every op rounded to
it; the kernel computes in fp32 and rounds once, the accepted fused-kernel contract (it
matches the ``x.float()`` spelling up to fp32 rounding). A table the model rounds to x's
dtype (vLLM's ``cos.to(x.dtype)`` on an fp32 cache) is read at its own precision.
Outputs are contiguous (the model's may be strided tensors of the same shape).

Left alone, with the reason in the report (``rotary pattern``): an intermediate value
(``rotate_half(q)``, a half, a product) with other users; tables whose dtype promotes the
rotation with no cast back (bf16 q, fp32 tables: the model's output is fp32, the op's
would be bf16); a rotation computed in a dtype other than q's or fp32;
cos / sin that do not broadcast over exactly the heads dim, or differ in shape; an odd
head_dim or rotary dim; a head_dim that is not static; an in-place op that writes q, k
or the tables between the rotation and its use (the op runs at the first use). A rotation of other dims than the
first ``r`` (``q[..., nope:]``) is fused as the rotation of that slice, the ``cat`` around
it left as is; tables are taken as computed, so multimodal RoPE (Qwen2-VL's sections of
tables) is the ``hf`` variant. Not recognized at all: rotations that permute the dims
(DeepSeek-V3's ``rope_interleave`` reads pairs interleaved and writes them as halves).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import operator
from typing import Callable

import torch
from torch import fx

from ..report import GraphReport
from ..signals import is_dynamo_signal
from .matching import (
    F32,
    FLOAT_DTYPES,
    aten,
    binary_operands,
    cast_target,
    dtype_of,
    getitem,
    is_op,
    is_full_slice,
    known_equal,
    last_dim_part,
    may_write,
    other_operand,
    same_shape,
    set_fake_val,
    shape_of,
    single_user,
    size_arg,
    static_int,
    storages,
    strip_casts,
    val,
    written_args,
)

logger = logging.getLogger(__name__)

NAME = "rotary_embedding"
PATTERN = "rotary pattern"
_OPS = torch.ops.flag_gems


# ------------------------------------------------------------------ pair styles (data)


def _cat_join(node):
    """``(a, b)`` for ``cat((a, b), -1)``."""
    if not is_op(node, aten.cat.default):
        return None
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    shape = shape_of(node)
    if len(tensors) != 2 or not shape or dim not in (-1, len(shape) - 1):
        return None
    return tuple(tensors)


def _stack_join(node):
    """``(a, b)`` for ``stack((a, b), -1).flatten(-2)`` (or a view / reshape to that shape)."""
    if is_op(node, aten.flatten.using_ints):
        stack = node.args[0]
        nd = len(shape_of(stack) or ())
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        if start not in (-2, nd - 2) or end not in (-1, nd - 1):
            return None
    elif is_op(node, aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        stack = node.args[0]
        s, o = shape_of(stack), shape_of(node)
        if not s or not o or len(o) != len(s) - 1 or not all(known_equal(a, b) for a, b in zip(s[:-2], o[:-1])):
            return None
    else:
        return None
    if not is_op(stack, aten.stack.default):
        return None
    tensors = stack.args[0]
    dim = stack.args[1] if len(stack.args) > 1 else stack.kwargs.get("dim", 0)
    if len(tensors) != 2 or dim not in (-1, len(shape_of(stack)) - 1):
        return None
    return tuple(tensors)


@dataclasses.dataclass(frozen=True)
class _Style:
    """How a pair style takes the halves of ``x`` and joins two halves back."""

    name: str
    interleaved: bool  # the ops' rotary_interleaved / not is_neox
    step: int  # slice step of the halves: 1 (first / second half) or 2 (even / odd elements)
    join: Callable  # node -> (a, b) or None


STYLES = (_Style("neox", False, 1, _cat_join), _Style("gptj", True, 2, _stack_join))

# (form, style, table source) -> variant name in the report
VARIANTS = {
    ("full", "neox", "tables"): "hf",
    ("full", "gptj", "tables"): "gptj",
    ("halves", "neox", "cache"): "vllm",
    ("halves", "gptj", "cache"): "vllm_gptj",
    ("halves", "neox", "tables"): "halves",
    ("halves", "gptj", "tables"): "halves_gptj",
}


# ------------------------------------------------------------------ matching


@dataclasses.dataclass
class _Rope:
    out: fx.Node  # node whose value the fused op produces (q_embed)
    q: fx.Node  # the tensor the op rotates ([.., heads, D])
    rot: int  # rotary dims (the first `rot` of D)
    head_dim: int
    style: _Style
    form: str  # "full" | "halves"
    cos: fx.Node  # tables as the model multiplies them ([.., rot] full, [.., rot/2] halves)
    sin: fx.Node
    cache: tuple | None  # (cos_sin_cache, positions) when halves are rows of a cache
    layout: str  # "bhsd" | "tokens" | "cache"
    expand: bool  # tokens layout: the tables broadcast over token dims
    key: tuple = ()

    @property
    def variant(self) -> str:
        v = VARIANTS[(self.form, self.style.name, "cache" if self.cache else "tables")]
        return v + ("_partial" if self.rot < self.head_dim else "")


def _strip(node, casts: bool = True):
    """Follow dtype casts (unless ``casts`` is False) and whole-dim slices of dims other than
    the last back to their source.

    Returns (source, cast dtypes seen)."""
    seen = []
    while True:
        if casts:
            node, more = strip_casts(node)
            seen += more
        if not is_full_slice(node):
            return node, seen
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if dim in (-1, len(shape_of(node)) - 1):
            return node, seen
        node = node.args[0]


def _half(node, step: int):
    """``(x, i)`` when ``node`` is half ``i`` (0 or 1) of ``x``'s last dim in a style with ``step``.

    An odd size is accepted for step 1 (``x[..., :n//2]``, ``x[..., n//2:]``) so that the
    caller can report it.
    """
    p = last_dim_part(node)
    if p is None or p[3] != step:
        return None
    x, start, stop, _ = p
    n = static_int(shape_of(x)[-1])
    x = _strip(x, casts=False)[0]
    h = n // 2
    if step == 1:
        if (start, stop) == (0, h):
            return x, 0
        if (start, stop) == (h, n) and h > 0:
            return x, 1
        return None
    if start in (0, 1) and (stop - start + 1) // 2 == h and n % 2 == 0:
        return x, start
    return None


def _rotated(node, style: _Style):
    """``x`` when ``node`` is ``rot(x)`` = ``join(-x2, x1)`` in ``style``."""
    ab = style.join(node)
    if ab is None or not is_op(ab[0], aten.neg):
        return None
    h1, h2 = _half(ab[1], style.step), _half(ab[0].args[0], style.step)
    if h1 is None or h2 is None or h1[1] != 0 or h2 != (h1[0], 1):
        return None
    return h1[0]


def _orders(node):
    ops = binary_operands(node, aten.mul)
    return [] if ops is None else [ops, ops[::-1]]


def _is_sum_of(node, pair1, pair2) -> bool:
    """True when ``node`` is ``a * b + c * d`` with ``{a, b} = pair1`` and ``{c, d} = pair2`` (any order)."""
    ops = binary_operands(node, aten.add)
    if ops is None or not all(is_op(m, aten.mul) for m in ops):
        return False
    sets = [set(binary_operands(m, aten.mul) or ()) for m in ops]
    want = [set(pair1), set(pair2)]
    return sets == want or sets == want[::-1]


def _match_full(add: fx.Node):
    """``x * cos + rot(x) * sin`` (any operand order)."""
    ops = binary_operands(add, aten.add)
    if ops is None:
        return None
    for m_rot, m_x in (ops, ops[::-1]):
        for r, sin in _orders(m_rot):
            for style in STYLES:
                x = _rotated(r, style)
                if x is None:
                    continue
                cos = other_operand(m_x, x, aten.mul)
                if cos is None:
                    return None
                return _complete(add, x, style, "full", cos, sin)
    return None


def _match_halves(node: fx.Node):
    """``join(x1 * c - x2 * s, x2 * c + x1 * s)``."""
    for style in STYLES:
        ab = style.join(node)
        if ab is None:
            continue
        o1, o2 = ab
        sub = binary_operands(o1, aten.sub)
        if sub is None or not all(is_op(m, aten.mul) for m in sub):
            continue
        found = []
        for x1, c in _orders(sub[0]):
            for x2, s in _orders(sub[1]):
                h1, h2 = _half(x1, style.step), _half(x2, style.step)
                if h1 is None or h1[1] != 0 or h2 != (h1[0], 1) or not _is_sum_of(o2, (x2, c), (x1, s)):
                    continue
                # x * table is symmetric: x is the operand with the product's shape (tables
                # broadcast over heads); with one head, the tables are the ones from a cache.
                found.append((not same_shape(x1, sub[0]), _cache_rows(c, s) is None, h1[0], c, s))
        if found:
            _, _, x, c, s = min(found, key=lambda f: f[:2])
            return _complete(node, x, style, "halves", c, s)
    return None


def _cache_rows(c, s):
    """``(cos_sin_cache, positions)`` when ``c`` / ``s`` are the two halves of ``cache[positions]``
    (after ``unsqueeze`` and casts), else None."""

    def source(t):
        while True:
            t, _ = strip_casts(t)
            if is_op(t, aten.unsqueeze.default):
                t = t.args[0]
                continue
            return t

    hc, hs = _half(source(c), 1), _half(source(s), 1)
    if hc is None or hs is None or hc[1] != 0 or hs != (hc[0], 1):
        return None
    rows = hc[0]
    if is_op(rows, aten.index_select.default) and rows.args[1] == 0:
        cache, pos = rows.args[0], rows.args[2]
    elif is_op(rows, aten.index.Tensor) and len(rows.args[1]) == 1:
        cache, pos = rows.args[0], rows.args[1][0]
    else:
        return None
    if not isinstance(pos, fx.Node) or len(shape_of(cache) or ()) != 2:
        return None
    return cache, pos


def _token_table(table, q):
    """For ``q [*tokens, H, D]``: whether ``table`` is ``[*tokens, 1, w]`` up to broadcasting over
    token dims (then ``True``: it must be expanded), ``False`` if exactly, None if neither."""
    t, s = shape_of(table), shape_of(q)
    if t is None or s is None or len(t) > len(s) or len(t) < 2 or len(s) < 3:
        return None
    n = len(s)
    p = (1,) * (n - len(t)) + tuple(t)
    if not known_equal(p[-2], 1) or not all(known_equal(p[i], s[i]) or known_equal(p[i], 1) for i in range(n - 2)):
        return None
    return not all(known_equal(p[i], s[i]) for i in range(n - 2))


def _hf_layout(table, q):
    """How the HF op can take ``table`` (broadcast against ``q``): ``("bhsd" | "tokens", expand)`` or None."""
    t, s = shape_of(table), shape_of(q)
    if t is not None and s is not None and len(s) == 4 and 2 <= len(t) <= 4:
        p = (1,) * (4 - len(t)) + tuple(t)
        if known_equal(p[1], 1) and known_equal(p[2], s[2]) and (known_equal(p[0], 1) or known_equal(p[0], s[0])):
            return "bhsd", False
    expand = _token_table(table, q)
    return None if expand is None else ("tokens", expand)


def _pass_source(p, rot: int):
    """The tensor whose dims ``[rot:]`` ``p`` is (through casts), else None."""
    part = last_dim_part(_strip(p)[0])
    if part is None or part[1] != rot or part[3] != 1 or part[2] != static_int(shape_of(part[0])[-1]):
        return None
    return _strip(part[0])[0]


def _complete(y: fx.Node, x: fx.Node, style: _Style, form: str, cos, sin):
    """Everything around the rotation ``y`` of ``x``: upcasts, partial rotary, dtypes, tables."""
    e = dtype_of(x)
    width = static_int(shape_of(x)[-1])
    if width is None:
        return "rotary dim is not static"
    if width % 2:
        return f"odd rotary dim {width}"
    c = dtype_of(y)  # the rotation's dtype: x's, or fp32 when fp32 tables promote it
    if c not in (e, F32):
        return f"rotation of a {e} tensor computed in {c}"
    base, in_casts = _strip(x)
    head = last_dim_part(base)
    whole = _strip(head[0])[0] if head is not None and head[1] == 0 and head[3] == 1 else None

    # Output side: casts, and the pass-through dims concatenated back. The op's output
    # replaces the furthest node of that chain that has q's dtype.
    chain, node, passed = [(y, False, ())], y, False
    while True:
        u = single_user(node)
        if u is None:
            break
        ab = _cat_join(u)
        if cast_target(u) is not None:
            node = u
        elif not passed and whole is not None and ab is not None and ab[0] is node and _pass_source(ab[1], width) is whole:
            node, passed = u, True
        else:
            break
        chain.append((node, passed, chain[-1][2] + ((cast_target(u),) if cast_target(u) is not None else ())))
    for out, passed, out_casts in reversed(chain):
        q = whole if passed else base
        d = dtype_of(q)
        if dtype_of(out) == d:
            break
    else:
        if c != e:
            return f"tables of dtype {dtype_of(cos)} promote the {e} rotation to {c} (output dtype would change)"
        return f"output dtype {dtype_of(chain[-1][0])} differs from the input's {dtype_of(base)}"
    head_dim = static_int(shape_of(q)[-1])
    if head_dim is None:
        return "head_dim is not static"
    if head_dim % 2:
        return f"odd head_dim {head_dim}"
    if d not in FLOAT_DTYPES or e not in (d, F32) or c not in (d, F32):
        return f"rotation computed in {c} on a {d} tensor"
    if any(t not in (d, F32) for t in (*in_casts, *out_casts)):
        return f"rounded to another dtype than the input's {d} or fp32 on the way"
    if not same_shape(out, q):
        return "output shape differs from the rotated tensor's"
    tw = width if form == "full" else width // 2
    for t in (cos, sin):
        if dtype_of(t) not in FLOAT_DTYPES or shape_of(t) is None or static_int(shape_of(t)[-1]) != tw:
            return f"cos / sin {shape_of(t)} ({dtype_of(t)}) are not [.., {tw}] float tables"
    if not same_shape(cos, sin):
        return f"cos {shape_of(cos)} and sin {shape_of(sin)} differ in shape"

    m = _Rope(out, q, width, head_dim, style, form, cos, sin, None, "", False)
    rows = _cache_rows(cos, sin) if form == "halves" else None
    if rows is not None:
        cache, pos = rows
        lead = shape_of(q)[:-2]
        ps = shape_of(pos)
        if (
            dtype_of(pos) in (torch.int32, torch.int64)
            and ps is not None
            and len(ps) == len(lead)
            and all(known_equal(a, b) for a, b in zip(ps, lead))
            and static_int(shape_of(cache)[1]) == width
            and _token_table(cos, q) is False
        ):
            m.cache, m.layout = rows, "cache"
    if m.cache is None:
        layout = _hf_layout(cos, q)
        if layout is None:
            return f"cos / sin {shape_of(cos)} do not broadcast over the heads of {shape_of(q)} as the ops need"
        m.layout, m.expand = layout
    reason = _other_users(m)
    if reason:
        return reason
    if m.cache is not None:
        m.key = ("cache", m.cache[0], _expr_key(m.cache[1]), style.interleaved, width, head_dim, d)
    else:
        m.key = ("hf", form, _expr_key(cos), _expr_key(sin), style.interleaved, m.layout, width, head_dim, d)
    return m


def _other_users(m: _Rope) -> str | None:
    """A reason when a node strictly between ``m.q`` and ``m.out`` is used outside the pattern."""
    order = {n: i for i, n in enumerate(m.out.graph.nodes)}
    limit = order[m.out]
    below, todo = set(), [m.q]
    while todo:
        for u in todo.pop().users:
            if u not in below and order[u] <= limit:
                below.add(u)
                todo.append(u)
    inside, todo = set(), [m.out]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a in below and a not in inside:
                inside.add(a)
                todo.append(a)
    for n in sorted(inside, key=order.get):
        if any(u not in inside and u is not m.out for u in n.users):
            return f"an intermediate value ({getattr(n.target, '__name__', n.target)}) has other users"
    return None


_KEY_DEPTH = 16


def _expr_key(node, depth: int = 0, memo: dict | None = None):
    """A key equal for nodes computing the same value by the same pure ops from the same
    inputs (q's and k's separately built but identical tables), else the node itself."""
    memo = {} if memo is None else memo
    if not isinstance(node, fx.Node):
        if isinstance(node, (list, tuple)):
            return tuple(_expr_key(a, depth, memo) for a in node)
        return node
    if node in memo:
        return memo[node]
    t = node.target
    pure = node.op == "call_function" and (
        t is operator.getitem
        or (
            isinstance(t, torch._ops.OpOverload)
            and not t._schema.is_mutable
            and torch.Tag.nondeterministic_seeded not in t.tags
        )
    )
    if not pure or depth >= _KEY_DEPTH:
        key = node
    else:
        args = tuple(_expr_key(a, depth + 1, memo) for a in node.args)
        kwargs = tuple(sorted((k, _expr_key(v, depth + 1, memo)) for k, v in node.kwargs.items()))
        key = (t, args, kwargs)
    memo[node] = key
    return key


# ------------------------------------------------------------------ rewriting


def _hoist(point: fx.Node, inputs, forbidden: set, since: int) -> str | None:
    """Move the ancestors of ``inputs`` that sit at or after ``point`` to just before it.

    The fused op then reads q and k at ``point``, later than the rotations it replaces
    (which read them after node ``since``), and hoisted nodes run earlier than in the
    model: both are only safe when no op in between writes what they read. In-place ops
    on other tensors are fine there: a KV-cache update (``index_copy_`` into a static
    cache, ``cache[slots] = k``), a position counter's ``add_``, ``detach_`` of a fresh
    tensor. What an op writes is told by its schema and the storages of the example
    values (views share their base's); an op whose writes are unknown counts as writing
    everything. Returns a reason, moving nothing, when that is not so, or when an
    ancestor is impure or in ``forbidden`` (it depends on the outputs being replaced);
    None when done.
    """
    nodes = list(point.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    at = order[point]
    todo = [n for n in inputs if isinstance(n, fx.Node) and order[n] >= at]
    move = set()
    while todo:
        n = todo.pop()
        if n in move:
            continue
        if n in forbidden:
            return "k is computed from q's rotated value"
        if n.op not in ("call_function", "get_attr") or n.is_impure():
            return f"k's input comes after q's rotation is used, through {getattr(n.target, '__name__', n.op)}"
        move.add(n)
        todo.extend(a for a in n.all_input_nodes if order[a] >= at)
    last = max(order[n] for n in move) if move else at - 1  # the point itself runs after the op
    read = set()
    for n in itertools.chain(inputs, move, *(m.all_input_nodes for m in move)):
        s = storages(n)
        if s is None:
            read = None
            break
        read |= s
    for n in nodes[since : last + 1]:
        w = written_args(n)
        if n not in move and (w is None or w) and (read is None or may_write(n, read)):
            what = getattr(n.target, "__name__", n.target)
            return f"an in-place op ({what}) writes q, k or the tables between the rotation and its use"
    for n in sorted(move, key=order.get):
        point.prepend(n)
    return None


class _Builder:
    """Creates nodes before a point, with fake values; can take them all back."""

    def __init__(self, graph: fx.Graph, point: fx.Node):
        self.graph, self.point, self.nodes = graph, point, []

    def call(self, target, *args):
        with self.graph.inserting_before(self.point):
            n = self.graph.call_function(target, args)
        self.nodes.append(n)
        set_fake_val(n, target, *args)
        return n

    def item(self, node, i):
        with self.graph.inserting_before(self.point):
            n = getitem(self.graph, node, i)
        self.nodes.append(n)
        n.meta["val"] = val(node)[i]
        return n

    def size(self, node, dim):
        with self.graph.inserting_before(self.point):
            s = size_arg(self.graph, node, dim)
        if isinstance(s, fx.Node):
            self.nodes.append(s)
        return s

    def undo(self):
        for n in reversed(self.nodes):
            self.graph.erase_node(n)
        self.nodes = []


def _build(b: _Builder, ms: list) -> list:
    """The fused op's nodes for the rotations ``ms`` (one or two); returns their new values."""
    a = ms[0]
    D, rot = a.head_dim, a.rot
    if a.layout == "cache":
        cache, pos = a.cache
        is_neox = not a.style.interleaved
        if len(ms) == 2:
            fused = b.call(_OPS.rotary_embedding_cache.default, pos, a.q, ms[1].q, D, cache, is_neox)
            return [b.item(fused, 0), b.item(fused, 1)]
        return [b.call(_OPS.rotary_embedding_cache_q.default, pos, a.q, D, cache, is_neox)]
    cos, sin = a.cos, a.sin
    if a.form == "halves":  # full tables from the halves: [c, c] (neox) or c repeated per pair (gptj)
        if a.style.interleaved:
            cos, sin = (b.call(aten.repeat_interleave.self_int, t, 2, -1) for t in (cos, sin))
        else:
            cos, sin = (b.call(aten.cat.default, [t, t], -1) for t in (cos, sin))
    qs = [m.q for m in ms]
    if a.layout == "tokens":  # [*tokens, H, D] -> [N, H, 1, D]; tables [*tokens, 1, r] -> [N, 1, r]
        nd = len(shape_of(a.q))
        qs = [b.call(aten.reshape.default, q, [-1, b.size(q, nd - 2), 1, D]) for q in qs]
        tables = []
        for t in (cos, sin):
            if a.expand:
                t = b.call(aten.expand.default, t, [*(b.size(a.q, i) for i in range(nd - 2)), 1, rot])
            tables.append(b.call(aten.reshape.default, t, [-1, 1, rot]))
        cos, sin = tables
    if len(qs) == 1:  # a k of no heads: the launch has no k programs
        q = qs[0]
        qs.append(b.call(aten.new_empty.default, q, [b.size(q, 0), 0, b.size(q, 2), D]))
    fused = b.call(_OPS.rotary_embedding_hf.default, qs[0], qs[1], cos, sin, a.style.interleaved)
    outs = [b.item(fused, i) for i in range(len(ms))]
    if a.layout == "tokens":
        outs = [
            b.call(aten.reshape.default, o, [b.size(m.q, i) for i in range(len(shape_of(m.q)))])
            for o, m in zip(outs, ms)
        ]
    return outs


def _pairable(a: _Rope, b: _Rope) -> bool:
    """q and k token dims agree as the op needs (batch and seq for [B, H, S, D])."""
    sa, sb = shape_of(a.q), shape_of(b.q)
    dims = (0, 2) if a.layout == "bhsd" else range(len(sa) - 2)
    return len(sa) == len(sb) and all(known_equal(sa[i], sb[i]) for i in dims)


def _rewrite(gm: fx.GraphModule, ms: list, report: GraphReport) -> str | None:
    """Replace the rotations ``ms`` (one, or q and k) by one fused op; a reason when not possible."""
    graph = gm.graph
    if len(ms) == 2 and not _pairable(*ms):
        return "q and k token dims differ"
    order = {n: i for i, n in enumerate(graph.nodes)}
    users = {u for m in ms for u in m.out.users}
    point = min(users, key=order.get)
    inputs = [m.q for m in ms] + ([*ms[0].cache] if ms[0].cache else [ms[0].cos, ms[0].sin])
    reason = _hoist(point, inputs, users, min(order[m.q] for m in ms) + 1)
    if reason:
        return reason
    b = _Builder(graph, point)
    try:
        outs = _build(b, ms)
    except Exception as e:  # the op's fake rejects these inputs: leave the pattern
        b.undo()
        if is_dynamo_signal(e):
            raise
        return f"flag_gems op does not take these inputs ({type(e).__name__}: {e})"
    for m, o in zip(ms, outs):
        m.out.replace_all_uses_with(o)
    report.fuse(NAME, ms[0].variant + ("_q_only" if len(ms) == 1 else ""))
    return None


def fuse_rotary_embedding(gm: fx.GraphModule, report: GraphReport) -> int:
    """Rewrite the RoPE of q and k in ``gm`` into fused ops; returns the number of fused ops."""
    groups = collections.defaultdict(list)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not node.users:
            continue
        m = _match_full(node) if is_op(node, aten.add) else None
        if m is None:
            m = _match_halves(node)
        if isinstance(m, str):
            report.keep(PATTERN, m)
        elif m is not None:
            groups[m.key].append(m)
    count = 0
    for ms in groups.values():
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        ms.sort(key=lambda m: order[m.out])
        i = 0
        while i < len(ms):
            if i + 1 < len(ms) and _rewrite(gm, ms[i : i + 2], report) is None:
                count, i = count + 1, i + 2
                continue
            reason = _rewrite(gm, ms[i : i + 1], report)
            if reason:
                report.keep(PATTERN, reason)
            else:
                count += 1
            i += 1
    if count:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    logger.debug("graph %d: %d rotary embedding ops", report.graph_id, count)
    return count
