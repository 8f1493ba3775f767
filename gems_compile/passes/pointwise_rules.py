"""Which aten ops the pointwise fusion pass can put in a generated kernel, and as what IR.

One rule per aten overload: ``rule(ctx, node) -> Expr | reason``, building the node's
:mod:`~flag_gems.kernels.pointwise_fused` IR from its operands' IR (``ctx.ir(arg)``). Families:

- **pointwise**: every functional overload of the registry's pointwise families
  (``lowerings/pointwise.py``: add ... masked_fill, the activation backwards, ``_to_copy``,
  ``clone``), through the same resolvers, so a fused op computes what the single-op kernel
  computes; plus a few the registry has no entry for (``pow.Scalar``, logical and bitwise
  or/xor/not, ``clamp``, ``relu``, ``threshold_backward``, ``isnan``, ``rsub``, ``remainder``);
- **constants**: ``scalar_tensor``, ``full``, ``ones``/``zeros`` and their ``new_``/``_like`` forms;
- **index**: ``arange``, ``cat``, ``constant_pad_nd``, ``index.Tensor`` (integer indices);
- **small reductions**: ``sum``, ``mean``, ``amax``, ``amin`` and ``cumsum`` over at most
  ``MAX_UNROLL`` elements of static size, unrolled (GQA's backward sum over the repeated heads,
  a decode step's cumsum over one position);
- **views** of an intermediate: expand, (un)squeeze, permute, transpose, t, slice, select,
  alias, view / ``_unsafe_view``. A view of a tensor the kernel reads is no index math at all:
  the load takes the view's own strides (its FX value's), so no view op runs.

:func:`native_kernels` is the other table: how many CUDA kernels an aten node launches when
it runs as is (0 for views and allocations), behind the backend's kernel counts.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import fx

from ..kernels.pointwise import OPS, PointwiseOp, op_dtypes
from ..kernels.pointwise_fused import Affine, Cast, Cat, Const, Expr, Gather, Iota, Op, Pad, Reduce, Reshape, Scan, reg_dtype
from ..lowerings.pointwise import OVERLOADS

aten = torch.ops.aten

__all__ = ["RULES", "VIEWS", "native_kernels"]


def _val(a):
    return a.meta.get("val") if isinstance(a, fx.Node) else a


def node_args(node: fx.Node) -> dict:
    """The node's arguments by schema name, defaults filled in."""
    out = {}
    for i, a in enumerate(node.target._schema.arguments):
        if i < len(node.args) and not a.kwarg_only:
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def _is_one(size) -> bool:
    """A size known to be 1 (a symbolic size never is: Dynamo specializes 0 and 1), without a guard."""
    return isinstance(size, int) and size == 1


def _same_sizes(a, b) -> bool:
    """Equal shapes, compared as expressions (no guard on symbolic sizes)."""
    ex = lambda s: s.node.expr if isinstance(s, torch.SymInt) else s  # noqa: E731
    return len(a) == len(b) and all(ex(x) == ex(y) for x, y in zip(a, b))


def _round(value, dtype: torch.dtype):
    """A Python number as a tensor of ``dtype`` holds it (a tensor constant's value)."""
    if isinstance(value, bool) or dtype is torch.bool:
        return bool(value)
    if dtype.is_floating_point:
        return torch.tensor(float(value), dtype=dtype).item()
    return int(value)


def _shape(ctx, node) -> tuple:
    return tuple(ctx.int(s) for s in _val(node).shape)


# --------------------------------------------------------------------------- pointwise


def _scalar(ctx, x):
    """A Python / symbolic scalar operand as a weak Const, or a reason."""
    if isinstance(x, bool):
        return Const((), torch.bool, x, weak=True)
    if isinstance(x, int):
        return Const((), torch.int64, x, weak=True)
    if isinstance(x, float):
        return Const((), torch.float64, x, weak=True)
    if isinstance(x, torch.SymInt):
        return Const((), torch.int64, ctx.int(x), weak=True)
    return f"a scalar operand of type {type(x).__name__}"


def _apply(ctx, node, op: PointwiseOp, operands) -> Expr | str:
    """``op`` of ``operands`` (FX nodes or scalars) as an Op IR typed like torch types it."""
    out = _val(node)
    vals = [_val(o) for o in operands]
    dtypes = op_dtypes(op, *vals)
    if isinstance(dtypes, str):
        return dtypes
    result, compute = dtypes
    if result is not out.dtype:
        return f"{op.name}: result dtype {result}, the graph says {out.dtype}"
    irs = []
    for k, (o, v) in enumerate(zip(operands, vals)):
        if isinstance(v, torch.Tensor):
            if v.device != out.device:
                return f"operand {k} on {v.device}, the result on {out.device}"
            irs.append(ctx.ir(o))
            continue
        why = _scalar_reason(v, k, op, compute, result)
        if why:
            return why
        c = _scalar(ctx, v)
        if isinstance(c, str):
            return c
        irs.append(c)
    return Op(_shape(ctx, node), out.dtype, op, tuple(irs), compute)


def _scalar_reason(v, k, op, compute, result) -> str | None:
    """torch raises when a scalar overflows the computation dtype (and, for fill values, the result)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return None
    for dtype in (compute,) + ((result,) if k in op.checked_scalars else ()):
        if dtype is torch.bool:
            continue
        if not dtype.is_floating_point:
            info = torch.iinfo(dtype)
            if isinstance(v, float) or not info.min <= v <= info.max:
                return f"scalar {v} does not fit {dtype}"
        elif math.isfinite(v) and abs(v) > torch.finfo(dtype).max:
            return f"scalar {v} overflows {dtype}"
    return None


def _registry_rule(resolve):
    """A rule from a registry family's resolver: ``(aten args) -> (PointwiseOp, operands) | reason``."""

    def rule(ctx, node):
        args = [_val(a) for a in node.args]
        kwargs = {k: _val(v) for k, v in node.kwargs.items()}
        r = resolve(*args, **kwargs)
        if isinstance(r, str):
            return r
        op, operands = r
        by_id = {id(_val(a)): a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)}
        nodes = [by_id.get(id(o), o) if isinstance(o, torch.Tensor) else o for o in operands]
        if op.promotion == "cast":  # _to_copy / clone: torch's cast, the one op that rounds
            src = nodes[0]
            if not isinstance(src, fx.Node):
                return "a cast of a non-tensor"
            if _val(src).device != _val(node).device:
                return "a copy across devices"
            return Cast(_shape(ctx, node), _val(node).dtype, ctx.ir(src))
        if op.promotion == "out":
            return f"{op.name}: an op that writes its output argument"
        return _apply(ctx, node, op, nodes)

    return rule


def _op(name, arity, expr, **kw):
    return PointwiseOp(name, arity, expr, **kw)


_BOOL = dict(promotion="bool")
_EXTRA_OPS = {
    "pow_scalar_base": _op("pow", 2, "{pow}(x0, x1)", accepts=frozenset({"float"})),
    "bitwise_or": _op("bitwise_or", 2, "x0 | x1", accepts=frozenset({"int", "bool"})),
    "bitwise_xor": _op("bitwise_xor", 2, "x0 ^ x1", accepts=frozenset({"int", "bool"})),
    "bitwise_not": _op("bitwise_not", 1, "~x0", accepts=frozenset({"int"})),
    "logical_not": _op("logical_not", 1, "x0 == 0", **_BOOL),
    "logical_and": _op("logical_and", 2, "(x0 != 0) & (x1 != 0)", **_BOOL),
    "logical_or": _op("logical_or", 2, "(x0 != 0) | (x1 != 0)", **_BOOL),
    "isnan": _op("isnan", 1, "x0 != x0", **_BOOL),
    "relu": _op("relu", 1, "tl.where(x0 < 0, 0, x0)", accepts=frozenset({"float", "int"})),
    "clamp_min": _op("clamp_min", 2, "_maximum(x0, x1)", accepts=frozenset({"float", "int"})),
    "clamp_max": _op("clamp_max", 2, "_minimum(x0, x1)", accepts=frozenset({"float", "int"})),
    "clamp": _op("clamp", 3, "_minimum(_maximum(x0, x1), x2)", accepts=frozenset({"float", "int"})),
    # torch's remainder: the sign of the divisor (C's fmod / %, corrected as torch's CUDA kernel does).
    "remainder": _op("remainder", 2, "tl.where(((x0 % x1) != 0) & (((x0 % x1) < 0) != (x1 < 0)), (x0 % x1) + x1, x0 % x1)",
                     accepts=frozenset({"float", "int"})),
    # threshold_backward(grad, self, threshold): grad where self > threshold, else 0 (ReLU's backward).
    "threshold_backward": _op("threshold_backward", 3, "tl.where(x1 <= x2, 0, x0)", promote=(0, 1),
                              accepts=frozenset({"float", "int"})),
}


def _fixed(op: PointwiseOp, *names):
    """A rule applying ``op`` to the named schema arguments, in this order."""

    def rule(ctx, node):
        a = node_args(node)
        return _apply(ctx, node, op, [a[n] for n in names])

    return rule


def _bitwise_not(ctx, node):
    x = node_args(node)["self"]
    op = _EXTRA_OPS["logical_not"] if _val(x).dtype is torch.bool else _EXTRA_OPS["bitwise_not"]
    return _apply(ctx, node, op, [x])


def _clamp(ctx, node):
    a = node_args(node)
    lo, hi = a.get("min"), a.get("max")
    if lo is None and hi is None:
        return "clamp without bounds"
    if lo is None:
        return _apply(ctx, node, _EXTRA_OPS["clamp_max"], [a["self"], hi])
    if hi is None:
        return _apply(ctx, node, _EXTRA_OPS["clamp_min"], [a["self"], lo])
    return _apply(ctx, node, _EXTRA_OPS["clamp"], [a["self"], lo, hi])


def _rsub(ctx, node):
    a = node_args(node)
    if a.get("alpha", 1) != 1:
        return "rsub with alpha"
    return _apply(ctx, node, OPS["sub"], [a["other"], a["self"]])


def _masked_fill_tensor(ctx, node):
    a = node_args(node)
    return _apply(ctx, node, OPS["masked_fill"], [a["self"], a["mask"], a["value"]])


# --------------------------------------------------------------------------- constants


def _constant(value_arg=None, value=None):
    def rule(ctx, node):
        out = _val(node)
        v = value if value_arg is None else _val(node_args(node)[value_arg])
        if isinstance(v, torch.SymInt):
            return Const(_shape(ctx, node), out.dtype, ctx.int(v))
        if not isinstance(v, (int, float, bool)):
            return f"fill value of type {type(v).__name__}"
        return Const(_shape(ctx, node), out.dtype, _round(v, out.dtype))

    return rule


def _arange(ctx, node):
    a = node_args(node)
    start, step = _val(a.get("start", 0)), _val(a.get("step", 1))
    for v in (start, step):
        if isinstance(v, float) and not v.is_integer():
            return "arange with a fractional start or step"
        if not isinstance(v, (int, float, torch.SymInt)):
            return f"arange bound of type {type(v).__name__}"
    start = int(start) if isinstance(start, float) else start
    step = int(step) if isinstance(step, float) else step
    return Iota(_shape(ctx, node), _val(node).dtype, ctx.int(start), ctx.int(step))


# --------------------------------------------------------------------------- index ops


def _cat(ctx, node):
    a = node_args(node)
    tensors = list(a["tensors"])
    out = _val(node)
    dim = a.get("dim", 0) % out.dim()
    if any(_val(t).dim() != out.dim() for t in tensors):
        return "cat of tensors of different ranks (empty 1-d inputs)"
    offsets, at = [], 0
    for t in tensors:
        offsets.append(ctx.int(at))
        at = at + _val(t).shape[dim]
    return Cat(_shape(ctx, node), out.dtype, tuple(ctx.ir(t) for t in tensors), dim, tuple(offsets))


def _pad(ctx, node):
    a = node_args(node)
    x, pad, value = a["self"], list(a["pad"]), _val(a.get("value", 0))
    nd = _val(x).dim()
    if len(pad) % 2 or len(pad) // 2 > nd:
        return f"pad {pad} for a {nd}-d tensor"
    if not isinstance(value, (int, float, bool)):
        return f"pad value of type {type(value).__name__}"
    lo = [0] * nd
    for k in range(len(pad) // 2):
        lo[nd - 1 - k] = ctx.int(_val(pad[2 * k]))
    out = _val(node)
    return Pad(_shape(ctx, node), out.dtype, ctx.ir(x), tuple(lo), _round(value, out.dtype))


def _index(ctx, node):
    a = node_args(node)
    src, indices = a["self"], list(a["indices"])
    pos = [j for j, t in enumerate(indices) if t is not None]
    if not pos or pos != list(range(pos[0], pos[-1] + 1)):
        return "index with non-adjacent index tensors (torch moves their dims first)"
    for j in pos:
        if _val(indices[j]).dtype not in (torch.int64, torch.int32):
            return f"index tensor {j} of dtype {_val(indices[j]).dtype} (integer indices only)"
        if _val(indices[j]).device != _val(node).device:
            return f"index tensor {j} on another device"
    irs = tuple(ctx.ir(t) if t is not None else None for t in indices)
    return Gather(_shape(ctx, node), _val(node).dtype, ctx.ir(src), irs)


# --------------------------------------------------------------------------- small reductions

# Reductions and scans over at most this many elements (static sizes) are unrolled in the
# kernel: the grouped-query-attention backward's sum over the repeated heads, a decode step's
# cumsum over one position. Longer ones stay aten (a row reduction is another kernel shape).
MAX_UNROLL = 16


def _reduced_dims(x, dims) -> list | str:
    nd = x.dim()
    dims = list(range(nd)) if dims is None or len(dims) == 0 else [d % max(nd, 1) for d in dims]
    sizes = [x.shape[d] for d in dims]
    if any(isinstance(s, torch.SymInt) for s in sizes):
        return "a reduction over a symbolic size"
    if math.prod(sizes) > MAX_UNROLL:
        return f"a reduction over {math.prod(sizes)} elements (unrolled up to {MAX_UNROLL})"
    return sorted(set(dims))


def _reduction(op: str, mean: bool = False):
    def rule(ctx, node):
        a = node_args(node)
        x, out = _val(a["self"]), _val(node)
        if x.dtype is torch.bool and op != "sum" or (mean and not x.dtype.is_floating_point):
            return f"{node.target} of {x.dtype}"
        dims = _reduced_dims(x, a.get("dim"))
        if isinstance(dims, str):
            return dims
        acc = reg_dtype(out.dtype) if out.dtype.is_floating_point or out.dtype is torch.bool else torch.int64
        scale = 1.0 / math.prod(x.shape[d] for d in dims) if mean else None
        keepdim = bool(a.get("keepdim", False)) and len(out.shape) == x.dim()
        return Reduce(_shape(ctx, node), out.dtype, ctx.ir(a["self"]), tuple(dims), op, keepdim,
                      acc if out.dtype is not torch.bool else torch.int64, scale)

    return rule


def _cumsum(ctx, node):
    a = node_args(node)
    x, out = _val(a["self"]), _val(node)
    dims = _reduced_dims(x, [a["dim"]]) if x.dim() else [0]
    if isinstance(dims, str):
        return dims
    if x.dim() == 0:
        return "cumsum of a 0-d tensor"
    acc = reg_dtype(out.dtype) if out.dtype.is_floating_point else torch.int64
    return Scan(_shape(ctx, node), out.dtype, ctx.ir(a["self"]), dims[0], acc)


# --------------------------------------------------------------------------- views of intermediates


def _affine(ctx, node, x, index):
    return Affine(_shape(ctx, node), _val(node).dtype, x, tuple(index))


def _same(d):
    return (0, ((d, 1),))


def _expand(ctx, node, x):
    out_nd, nd = _val(node).dim(), len(x.shape)
    index = []
    for j, size in enumerate(x.shape):
        d = out_nd - nd + j
        index.append((0, ()) if size == 1 and not _is_one(_val(node).shape[d]) else _same(d))
    return _affine(ctx, node, x, index)


def _unsqueeze(ctx, node, x):
    d = node.args[1] % _val(node).dim()
    return _affine(ctx, node, x, [_same(j if j < d else j + 1) for j in range(len(x.shape))])


def _squeeze(ctx, node, x):
    in_shape = _val(node.args[0]).shape
    out_d, index = 0, []
    kept = set(range(_val(node).dim()))
    removed = _squeezed_dims(node, in_shape)
    for j in range(len(in_shape)):
        if j in removed:
            index.append((0, ()))
        else:
            index.append(_same(out_d))
            out_d += 1
    assert out_d == len(kept)
    return _affine(ctx, node, x, index)


def _squeezed_dims(node, shape) -> set:
    nd = len(shape)
    if node.target is aten.squeeze.default:
        dims = range(nd)
    elif node.target is aten.squeeze.dim:
        dims = [node.args[1] % max(nd, 1)]
    else:
        dims = [d % max(nd, 1) for d in node.args[1]]
    return {d for d in dims if nd and _is_one(shape[d])}


def _permute(ctx, node, x):
    dims = [d % len(x.shape) for d in node.args[1]]
    where = {j: d for d, j in enumerate(dims)}
    return _affine(ctx, node, x, [_same(where[j]) for j in range(len(x.shape))])


def _transpose(ctx, node, x):
    nd = len(x.shape)
    if node.target is aten.t.default:
        d0, d1 = 0, nd - 1
    else:
        d0, d1 = node.args[1] % nd, node.args[2] % nd
    perm = list(range(nd))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return _affine(ctx, node, x, [_same(perm[j]) for j in range(nd)])


def _slice(ctx, node, x):
    a = node_args(node)
    nd = len(x.shape)
    dim = a.get("dim", 0) % nd
    size = _val(a["self"]).shape[dim]
    start, step = _val(a.get("start")), _val(a.get("step", 1))
    if start is None:
        start = 0
    if isinstance(start, torch.SymInt) or isinstance(size, torch.SymInt):
        expr = start.node.expr if isinstance(start, torch.SymInt) else start
        if not (isinstance(start, int) and start >= 0) and not getattr(expr, "is_nonnegative", False):
            return "a slice of an intermediate with a symbolic start that may be negative"
    else:
        start = min(max(start + size if start < 0 else start, 0), size)
    if not isinstance(step, int):
        return "a slice with a symbolic step"
    index = [_same(j) for j in range(nd)]
    index[dim] = (ctx.int(start), ((dim, step),))
    return _affine(ctx, node, x, index)


def _select(ctx, node, x):
    a = node_args(node)
    nd = len(x.shape)
    dim = a["dim"] % nd
    i = _val(a["index"])
    if isinstance(i, torch.SymInt):
        return "a select at a symbolic index"
    size = _val(a["self"]).shape[dim]
    if i < 0:
        i = i + size
    index = []
    for j in range(nd):
        if j == dim:
            index.append((ctx.int(i), ()))
        else:
            index.append(_same(j if j < dim else j - 1))
    return _affine(ctx, node, x, index)


def _alias(ctx, node, x):
    return x


def _reshape(ctx, node, x):
    out = _val(node)
    if _same_sizes(_val(node.args[0]).shape, out.shape):
        return x
    return Reshape(_shape(ctx, node), out.dtype, x, ctx.contiguous_strides(_val(node.args[0]).shape),
                   ctx.contiguous_strides(out.shape))


def _view_rule(fn):
    """A view: of a tensor the kernel loads, that load with the view's strides; of an
    intermediate, ``fn``'s index map."""

    def rule(ctx, node):
        x = ctx.ir(node.args[0])
        folded = ctx.fold_view(x, node)
        return folded if folded is not None else fn(ctx, node, x)

    rule.is_view = True
    return rule


VIEWS = {
    aten.expand.default: _expand,
    aten.unsqueeze.default: _unsqueeze,
    aten.squeeze.default: _squeeze,
    aten.squeeze.dim: _squeeze,
    aten.squeeze.dims: _squeeze,
    aten.permute.default: _permute,
    aten.transpose.int: _transpose,
    aten.t.default: _transpose,
    aten.slice.Tensor: _slice,
    aten.select.int: _select,
    aten.alias.default: _alias,
    aten.detach.default: _alias,
    aten.view.default: _reshape,
    aten._unsafe_view.default: _reshape,
    aten.reshape.default: _reshape,
}


def _rules() -> dict:
    rules = {}
    for family, entry in OVERLOADS.items():
        for resolve, targets in entry if isinstance(entry, list) else [entry]:
            for t in targets:
                name = t._overloadname
                if t.__name__.split(".")[0].endswith("_") or "out" in name or t._schema.is_mutable:
                    continue  # in-place and out= forms: the pass keeps mutations where they are
                if t is aten.fill.Scalar:
                    continue
                rules[t] = _registry_rule(resolve)
    ex = _EXTRA_OPS
    rules.update({
        aten.pow.Scalar: _fixed(ex["pow_scalar_base"], "self", "exponent"),
        aten.bitwise_or.Tensor: _fixed(ex["bitwise_or"], "self", "other"),
        aten.bitwise_or.Scalar: _fixed(ex["bitwise_or"], "self", "other"),
        aten.bitwise_xor.Tensor: _fixed(ex["bitwise_xor"], "self", "other"),
        aten.bitwise_not.default: _bitwise_not,
        aten.logical_not.default: _fixed(ex["logical_not"], "self"),
        aten.logical_and.default: _fixed(ex["logical_and"], "self", "other"),
        aten.logical_or.default: _fixed(ex["logical_or"], "self", "other"),
        aten.isnan.default: _fixed(ex["isnan"], "self"),
        aten.relu.default: _fixed(ex["relu"], "self"),
        aten.clamp.default: _clamp,
        aten.clamp_min.default: _fixed(ex["clamp_min"], "self", "min"),
        aten.clamp_max.default: _fixed(ex["clamp_max"], "self", "max"),
        aten.threshold_backward.default: _fixed(ex["threshold_backward"], "grad_output", "self", "threshold"),
        aten.rsub.Scalar: _rsub,
        aten.remainder.Scalar: _fixed(ex["remainder"], "self", "other"),
        aten.remainder.Tensor: _fixed(ex["remainder"], "self", "other"),
        aten.masked_fill.Tensor: _masked_fill_tensor,
        aten.lift_fresh_copy.default: _registry_rule(lambda self: (OPS["to_copy"], (self,))),
        aten.scalar_tensor.default: _constant("s"),
        aten.full.default: _constant("fill_value"),
        aten.new_full.default: _constant("fill_value"),
        aten.full_like.default: _constant("fill_value"),
        aten.ones.default: _constant(value=1),
        aten.new_ones.default: _constant(value=1),
        aten.ones_like.default: _constant(value=1),
        aten.zeros.default: _constant(value=0),
        aten.new_zeros.default: _constant(value=0),
        aten.zeros_like.default: _constant(value=0),
        aten.arange.default: _arange,
        aten.arange.start: _arange,
        aten.arange.start_step: _arange,
        aten.cat.default: _cat,
        aten.constant_pad_nd.default: _pad,
        aten.index.Tensor: _index,
        aten.sum.dim_IntList: _reduction("sum"),
        aten.sum.default: _reduction("sum"),
        aten.mean.dim: _reduction("sum", mean=True),
        aten.amax.default: _reduction("amax"),
        aten.amin.default: _reduction("amin"),
        aten.cumsum.default: _cumsum,
    })
    for target, fn in VIEWS.items():
        rules[target] = _view_rule(fn)
    return rules


RULES = _rules()


# --------------------------------------------------------------------------- kernel counts

_NO_KERNEL_NAMES = {
    "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "slice", "select", "unsqueeze",
    "squeeze", "split", "split_with_sizes", "chunk", "unbind", "alias", "detach", "as_strided", "empty",
    "empty_like", "empty_strided", "new_empty", "new_empty_strided", "sym_size", "sym_stride", "sym_numel",
    "sym_storage_offset", "lift_fresh", "_assert_scalar", "_assert_tensor_metadata", "unfold", "diagonal",
    "narrow", "view_as", "expand_as", "_reshape_alias", "squeeze_copy",
}
# aten ops whose native implementation launches more than one kernel (in a functional graph).
_SEVERAL = {
    aten.constant_pad_nd.default: 2,  # fill the output, copy the input in
    aten.masked_fill.Scalar: 2,  # clone, then fill in place
    aten.masked_fill.Tensor: 2,
}


def native_kernels(node: fx.Node) -> int:
    """CUDA kernels ``node`` launches when it runs as it is in the graph (a static count).

    Views, allocations, shape arithmetic and tuple indexing launch none; a handful of aten
    ops launch two; every other op (aten, flag_gems, a fused group) one. cuBLAS split-K
    reductions and library-internal extra launches are not counted.
    """
    if node.op != "call_function":
        return 0
    t = node.target
    if t is operator.getitem or getattr(t, "__module__", None) in ("_operator", "math", "builtins"):
        return 0
    if isinstance(t, torch._ops.OpOverload):
        if t in _SEVERAL:
            return _SEVERAL[t]
        if t.__name__.split(".")[0] in _NO_KERNEL_NAMES or t.is_view:
            return 0
    if getattr(t, "__name__", "").startswith("sym_") or t in (torch.sym_float, torch.sym_int, torch.sym_max, torch.sym_min):
        return 0
    return 1
