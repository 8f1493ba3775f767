"""Small helpers the fusion passes share to read FX graphs semantically.

The passes see three spellings of the same math: the pre-dispatch aten graph this
backend traces (``aten.to.dtype``, ``aten.mean.dim``), the post-grad graphs Inductor
hands to custom passes (``prims.convert_element_type``, ``aten._to_copy``), and the
odd user spelling (``x * x`` for ``x.pow(2)``). These helpers fold the spellings, so that
each matcher is written once.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

aten = torch.ops.aten
prims = torch.ops.prims

F32 = torch.float32
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the fused kernels take

CAST_OPS = {
    aten.to.dtype,
    aten._to_copy.default,
    prims.convert_element_type.default,
    aten.to.dtype_layout,
    aten.type_as.default,
}


def is_op(node, *targets) -> bool:
    """True if ``node`` is a call_function of one of ``targets`` (OpOverloads or packets)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    t = node.target
    return t in targets or getattr(t, "overloadpacket", None) in targets


def is_view(n: fx.Node) -> bool:
    """A call of an aten view op, ``_unsafe_view`` included (a view of its input's storage that
    autograd does not track), the size/stride queries excluded."""
    t = n.target
    return (n.op == "call_function" and isinstance(t, torch._ops.OpOverload)
            and (t.is_view or t is aten._unsafe_view.default)
            and t not in (aten.sym_size.int, aten.sym_stride.int))


def symbolic_layout(t: torch.Tensor) -> bool:
    """Whether a tensor value's sizes, strides or offset hold symbols (a dynamic-shape graph)."""
    return any(isinstance(d, torch.SymInt) for d in (*t.shape, *t.stride(), t.storage_offset()))


def val(node):
    """The node's example value (a FakeTensor, SymInt, ...) or None."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def dtype_of(node):
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def shape_of(node):
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def cast_target(node) -> torch.dtype | None:
    """The dtype a cast node converts to, or None if ``node`` is not a plain dtype cast."""
    if not is_op(node, *CAST_OPS):
        return None
    if node.target is aten.type_as.default:
        return dtype_of(node.args[1])
    if node.target is aten.to.dtype:
        return node.args[1] if len(node.args) > 1 else node.kwargs.get("dtype")
    if node.target is prims.convert_element_type.default:
        return node.args[1]
    # _to_copy / to.dtype_layout: a pure dtype cast only when no device/layout change
    kw = node.kwargs
    if any(kw.get(k) not in (None, torch.strided) for k in ("layout",)) or kw.get("device") not in (None, val(node).device if val(node) is not None else None):
        return None
    return kw.get("dtype")


def strip_casts(node):
    """Follow dtype casts back to the value they convert. Returns (source, casts seen)."""
    casts = []
    while cast_target(node) is not None:
        casts.append(cast_target(node))
        node = node.args[0]
    return node, casts


def float_scalar(x) -> float | None:
    """A Python number argument as float (None for nodes / other types)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    return None


def binary_operands(node, *targets):
    """``(a, b)`` if ``node`` is a ``targets`` op with two operands (alpha must be 1), else None."""
    if not is_op(node, *targets) or len(node.args) < 2:
        return None
    if node.kwargs.get("alpha", 1) != 1 or (len(node.args) > 2 and node.args[2] != 1):
        return None
    return node.args[0], node.args[1]


def other_operand(node, known, *targets):
    """For a commutative binary ``node`` with ``known`` as one operand, return the other one."""
    ops = binary_operands(node, *targets)
    if ops is None:
        return None
    a, b = ops
    if a is known:
        return b
    if b is known:
        return a
    return None


def single_user(node):
    """The only user of ``node``, or None."""
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def is_last_dim(dims, ndim) -> bool:
    """True if ``dims`` (a list of one dim) names the last of ``ndim`` dims."""
    if not isinstance(dims, (list, tuple)) or len(dims) != 1:
        return False
    d = dims[0]
    return d == -1 or d == ndim - 1


def getitem(graph: fx.Graph, node, index: int):
    return graph.call_function(operator.getitem, (node, index))


def set_fake_val(node, fn, *args, **kwargs):
    """Compute ``node.meta['val']`` by running ``fn`` on the example values of ``args``."""
    from torch._guards import detect_fake_mode

    def v(a):
        if isinstance(a, fx.Node):
            return val(a)
        if isinstance(a, (list, tuple)):
            return type(a)(v(x) for x in a)
        return a

    vargs = [v(a) for a in args]
    vkwargs = {k: v(a) for k, a in kwargs.items()}
    fake_mode = detect_fake_mode([x for x in vargs if isinstance(x, torch.Tensor)])
    if fake_mode is None:
        return
    with fake_mode:
        node.meta["val"] = fn(*vargs, **vkwargs)


def node_arg(node, index: int, name: str, default=None):
    """Argument ``name`` of a call node, passed at position ``index`` or by keyword (else ``default``)."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def known_equal(a, b) -> bool:
    """True if ints / SymInts ``a`` and ``b`` are equal for every shape the graph is valid for.

    Never adds a guard: an equality that holds only for some values of the symbols is False.
    """
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if isinstance(a, bool) or isinstance(b, bool) or not all(isinstance(v, (int, torch.SymInt)) for v in (a, b)):
        return False
    return bool(statically_known_true(a == b))


def same_shape(a, b) -> bool:
    """True if nodes ``a`` and ``b`` hold tensors whose shapes are known to be equal (no guard added)."""
    sa, sb = shape_of(a), shape_of(b)
    return sa is not None and sb is not None and len(sa) == len(sb) and all(known_equal(x, y) for x, y in zip(sa, sb))


def static_int(x) -> int | None:
    """``x`` as a Python int when it is one, or a SymInt with a constant value; else None (no guard)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        return x.node.maybe_as_int()
    return None


def _part_bounds(start, stop, n):
    # Python slice semantics on a dim of static size n; None when a bound is symbolic.
    start, stop = (0 if start is None else static_int(start)), (n if stop is None else static_int(stop))
    if start is None or stop is None:
        return None
    start, stop = (start + n if start < 0 else start), (stop + n if stop < 0 else stop)
    return min(max(start, 0), n), min(max(stop, 0), n)


def last_dim_part(node):
    """``(x, start, stop, step)`` when ``node`` selects a range of ``x``'s last dim, else None.

    Covers ``x[..., a:b:s]`` (``aten.slice``), ``x.narrow(-1, a, n)`` and the pieces of
    ``x.chunk`` / ``x.split`` / ``x.split_with_sizes`` along the last dim (``getitem`` of
    them). Bounds are normalized to ``0 <= start <= stop <= n``; the last dim's size ``n``
    must be static.
    """
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    src, index = node, None
    if node.target is operator.getitem:
        src, index = node.args
        if not is_op(src, aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default):
            return None
    elif not is_op(node, aten.slice.Tensor, aten.narrow.default):
        return None
    x = src.args[0]
    shape = shape_of(x)
    n = static_int(shape[-1]) if shape else None
    if n is None:
        return None

    def arg(i, name, default):
        return src.args[i] if len(src.args) > i else src.kwargs.get(name, default)

    on_dim1 = src.target in (aten.slice.Tensor, aten.narrow.default)  # dim is argument 1, else 2
    if arg(1 if on_dim1 else 2, "dim", 0) not in (-1, len(shape) - 1):
        return None
    if src.target is aten.slice.Tensor:
        step = static_int(arg(4, "step", 1))
        bounds = _part_bounds(arg(2, "start", None), arg(3, "end", None), n)
        return None if bounds is None or step is None else (x, *bounds, step)
    if src.target is aten.narrow.default:
        start, length = static_int(arg(2, "start", None)), static_int(arg(3, "length", None))
        if start is None or length is None:
            return None
        start = start + n if start < 0 else start
        return x, start, start + length, 1
    if src.target is aten.split_with_sizes.default:
        sizes = [static_int(s) for s in arg(1, "split_sizes", ())]
        if None in sizes or index >= len(sizes):
            return None
        return x, sum(sizes[:index]), sum(sizes[: index + 1]), 1
    if src.target is aten.chunk.default:
        chunks = static_int(arg(1, "chunks", None))
        size = -(-n // chunks) if chunks else None
    else:
        size = static_int(arg(1, "split_size", None))
    if not size:
        return None
    return x, min(index * size, n), min((index + 1) * size, n), 1


def size_arg(graph: fx.Graph, node, dim: int):
    """Dim ``dim`` of ``node``'s tensor as a graph argument: an int when static, else a new
    ``aten.sym_size.int`` node (created at the graph's current insertion point)."""
    v = shape_of(node)[dim]
    i = static_int(v)
    if i is not None:
        return i
    s = graph.call_function(aten.sym_size.int, (node, dim))
    s.meta["val"] = v
    return s


def is_full_slice(node) -> bool:
    """True for an ``aten.slice`` that selects a whole dim with step 1 (``x[:, :]``; the
    pre-dispatch trace keeps these no-op slices when sizes are symbolic)."""
    if not is_op(node, aten.slice.Tensor):
        return False
    shape = shape_of(node.args[0])
    if not shape:
        return False
    args = list(node.args) + [None] * (5 - len(node.args))
    dim, start, end, step = (node.kwargs.get(k, a) for k, a in zip(("dim", "start", "end", "step"), args[1:]))
    dim, step = 0 if dim is None else dim, 1 if step is None else step
    if static_int(step) != 1 or static_int(start or 0) != 0:
        return False
    size = shape[dim]
    return end is None or (static_int(end) is not None and static_int(end) >= 2**62) or known_equal(end, size)


# ------------------------------------------------------------------ aliasing and mutation


def written_args(node) -> list | None:
    """The argument nodes an in-place or ``out=`` op writes (its schema's ``Tensor(a!)``).

    Returns ``[]`` for a node that writes nothing (functional ops, getitem, placeholders),
    and None when ``node`` is a call whose writes cannot be read from a schema (a Python
    callable or higher-order op that may mutate): callers treat None as "may write anything".
    Calls known not to touch tensor data (grad-mode switches, ``sym_size``) are ``[]``.
    """
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return [] if not isinstance(node, fx.Node) or node.op != "call_module" else None
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        if not t._schema.is_mutable:
            return []
        out = []
        for i, a in enumerate(t._schema.arguments):
            if a.alias_info is None or not a.alias_info.is_write:
                continue
            v = node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
            out += [x for x in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(x, fx.Node)]
        return out
    if t in _NO_DATA_WRITES or (getattr(t, "__module__", None) in ("_operator", "math") and t is not operator.setitem):
        return []  # getitem, and SymInt arithmetic of dynamic shapes
    return None


# Non-aten callables that pre-dispatch / Dynamo graphs hold and that write no tensor data.
_NO_DATA_WRITES = {torch._C._set_grad_enabled, torch.sym_int, torch.sym_float, torch.sym_max, torch.sym_min}
try:  # autocast switches in pre-dispatch graphs
    _NO_DATA_WRITES |= {torch.amp.autocast_mode._enter_autocast, torch.amp.autocast_mode._exit_autocast}
except AttributeError:  # pragma: no cover - older torch
    pass


def storages(node) -> set | None:
    """The storages the tensors of ``node``'s example value live in (views share their base's).

    Returns a set of ``StorageWeakRef`` (empty for non-tensor values), or None when the
    node has no example value (then nothing can be said about what it aliases).
    """
    from torch.multiprocessing.reductions import StorageWeakRef

    if not isinstance(node, fx.Node):
        return set()
    v = node.meta.get("val", node.meta.get("example_value"))
    if v is None:
        return None if node.op != "call_function" or node.target is not operator.getitem else set()
    out = set()
    for t in v if isinstance(v, (list, tuple)) else [v]:
        if isinstance(t, torch.Tensor):
            try:
                out.add(StorageWeakRef(t.untyped_storage()))
            except (NotImplementedError, RuntimeError):  # a tensor subclass without a storage
                return None
    return out


def may_write(node, read) -> bool:
    """True when ``node`` may write the data of any storage in ``read`` (a set of ``StorageWeakRef``).

    An op whose writes are unknown, or writes a tensor whose storage is unknown, may write anything.
    """
    written = written_args(node)
    if written is None:
        return True
    for a in written:
        s = storages(a)
        if s is None or s & read:
            return True
    return False
