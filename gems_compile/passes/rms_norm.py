"""Fuse RMSNorm, and residual-add + RMSNorm, into ``flag_gems`` ops.

Matches, with ``h`` the normalized value of dtype ``d`` and ``nrm(v) = v * rsqrt(mean(v*v, -1) + eps)``:

==================  =================================================  ===========================
variant             model code                                          numerics kept
==================  =================================================  ===========================
``llama``           ``w * nrm(h.float()).to(d)`` (Llama, Qwen2, Mistral) round before the weight
``fp32_weight``     ``(nrm(h.float()) * w).to(d)`` (``nn.RMSNorm``      weight multiply in fp32
                    decomposed; ``w`` or ``w.float()``)
``gemma``           ``(nrm(h.float()) * (1.0 + w.float())).to(d)``      ``weight_offset=1``
``no_weight``       ``nrm(h.float()).to(d)``
``aten``            ``aten.rms_norm`` / ``aten._fused_rms_norm``         (``F.rms_norm``, ``nn.RMSNorm``)
==================  =================================================  ===========================

``pow(v, 2)`` and ``v * v`` are both accepted; casts may be ``aten.to``, ``_to_copy`` or
``prims.convert_element_type``. When ``h = a + b`` (same shape and dtype), the add is
fused too, and the other users of ``h`` (the residual stream) read the fused op's second
output::

    h = a + b; y = w * nrm(h.float()).to(bf16)        ->  y, h = flag_gems.add_rms_norm(a, b, w, eps, 0.0, True)

A candidate whose output dtype, shape or layout would differ from the original is left
alone, with the reason recorded in the report.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import fx

from ..report import GraphReport
from .matching import (
    F32,
    FLOAT_DTYPES,
    aten,
    binary_operands,
    cast_target,
    dtype_of,
    float_scalar,
    getitem,
    is_last_dim,
    is_op,
    other_operand,
    set_fake_val,
    shape_of,
    single_user,
    strip_casts,
    val,
)

logger = logging.getLogger(__name__)

NAME = "rms_norm"


@dataclasses.dataclass
class _Match:
    out: fx.Node  # node whose value the fused op produces
    h: fx.Node  # the value normalized (dtype d)
    weight: fx.Node | None
    eps: float
    offset: float
    round_before: bool
    variant: str


def _weight_ok(w, n) -> bool:
    v = val(w)
    return isinstance(v, torch.Tensor) and tuple(v.shape) == (n,) and v.dtype in FLOAT_DTYPES


def _match_decomposed(rsqrt: fx.Node) -> _Match | str | None:
    """Match the decomposed forms around one ``rsqrt`` node (None: not an RMSNorm at all)."""
    ops = binary_operands(rsqrt.args[0], aten.add)
    if ops is None:
        return None
    mean, eps = (ops[0], float_scalar(ops[1])) if float_scalar(ops[1]) is not None else (ops[1], float_scalar(ops[0]))
    if eps is None or not is_op(mean, aten.mean.dim):
        return None
    x = None
    sq = mean.args[0]
    if is_op(sq, aten.pow.Tensor_Scalar) and sq.args[1] == 2:
        x = sq.args[0]
    elif binary_operands(sq, aten.mul) and sq.args[0] is sq.args[1]:
        x = sq.args[0]
    if x is None or shape_of(x) is None:
        return None
    ndim = len(shape_of(x))
    keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    if not keepdim or not is_last_dim(mean.args[1], ndim) or mean.kwargs.get("dtype") is not None:
        return None
    norm = next((u for u in rsqrt.users if other_operand(u, rsqrt, aten.mul) is x), None)
    if norm is None:
        return None
    if dtype_of(x) != F32:
        return "normalization computed below fp32 (fusing would change numerics)"
    h, casts = strip_casts(x)
    d = dtype_of(h)
    if d not in FLOAT_DTYPES or shape_of(h) != shape_of(x):
        return f"input dtype {d}"
    n = shape_of(x)[-1]

    u = single_user(norm)
    if u is None:
        return "normalized value has several users"
    # Llama: w * nrm(...).to(d)
    if cast_target(u) == d:
        w_mul = single_user(u)
        w = other_operand(w_mul, u, aten.mul) if w_mul is not None else None
        if w is not None and _weight_ok(w, n) and torch.promote_types(dtype_of(w), d) == d:
            return _Match(w_mul, h, w, eps, 0.0, d != F32, "llama" if d != F32 else "fp32")
        return _Match(u, h, None, eps, 0.0, False, "no_weight")
    # nrm(...) * w_expr, then (for d != fp32) a cast back to d
    w_expr = other_operand(u, norm, aten.mul)
    if w_expr is None:
        return _Match(norm, h, None, eps, 0.0, False, "no_weight") if d == F32 else "no cast back after the norm"
    offset, variant = 0.0, "fp32_weight"
    ops = binary_operands(w_expr, aten.add)
    if ops is not None:
        one = [float_scalar(a) for a in ops]
        if 1.0 in one:
            offset, variant = 1.0, "gemma"
            w_expr = ops[1] if one[0] == 1.0 else ops[0]
    w, _ = strip_casts(w_expr)
    # The weight enters the multiply in fp32: cast (``w.float()``), or promoted by the multiply
    # itself (``nn.RMSNorm`` / ``F.rms_norm`` decomposed: fp32 norm * half weight), which is the
    # same value. Gemma's ``1 + w`` must be computed in fp32 too: a half ``1 + w`` rounds.
    wd = dtype_of(w_expr)
    promoted = offset == 0.0 and wd in FLOAT_DTYPES and torch.promote_types(wd, F32) == F32
    if not _weight_ok(w, n) or not (wd == F32 or promoted):
        return "weight is not a [hidden] tensor"
    if d == F32:
        return _Match(u, h, w, eps, offset, False, variant if offset else "fp32")
    out = single_user(u)
    if out is None or cast_target(out) != d:
        return "output stays in fp32 (no cast back to the input dtype)"
    return _Match(out, h, w, eps, offset, False, variant)


def _match_aten(node: fx.Node) -> _Match | str | None:
    """``aten.rms_norm(x, [n], w, eps)`` / ``aten._fused_rms_norm`` (output 0 only)."""
    if is_op(node, aten._fused_rms_norm):
        users = list(node.users)
        if any(u.args[1] != 0 for u in users):
            return "rstd output is used"
        if len(users) != 1:
            return None
        out = users[0]
    elif is_op(node, aten.rms_norm):
        out = node
    else:
        return None
    args = list(node.args) + [None] * (4 - len(node.args))
    x, shape, w, eps = args[:4]
    w = node.kwargs.get("weight", w)
    eps = node.kwargs.get("eps", eps)
    if not isinstance(shape, (list, tuple)) or len(shape) != 1:
        return "normalized_shape spans several dims"
    d = dtype_of(x)
    if d not in FLOAT_DTYPES or dtype_of(out) != d:
        return f"input/output dtype {d} -> {dtype_of(out)}"
    if w is not None and not _weight_ok(w, shape_of(x)[-1]):
        return "weight is not a [hidden] tensor"
    eps = torch.finfo(F32).eps if eps is None else float(eps)
    return _Match(out, x, w, eps, 0.0, False, "aten")


def _residual_operands(h: fx.Node):
    """``(a, b)`` when ``h = a + b`` with both of h's shape and dtype (no broadcast, no promotion)."""
    ops = binary_operands(h, aten.add)
    if ops is None:
        return None
    a, b = ops
    if not all(isinstance(t, fx.Node) and shape_of(t) == shape_of(h) and dtype_of(t) == dtype_of(h) for t in (a, b)):
        return None
    return a, b


def _position(graph: fx.Graph):
    return {n: i for i, n in enumerate(graph.nodes)}


def _rewrite(gm: fx.GraphModule, m: _Match, report: GraphReport) -> None:
    graph = gm.graph
    pos = _position(graph)
    residual = _residual_operands(m.h)
    if residual is not None and m.weight is not None and pos[m.weight] > pos[m.h]:
        residual = None  # the weight is computed after h: keep the add separate
    extra = (m.eps, m.offset, m.round_before)
    if residual is not None:
        with graph.inserting_after(m.h):
            fused = graph.call_function(torch.ops.flag_gems.add_rms_norm.default, (*residual, m.weight, *extra))
        set_fake_val(fused, torch.ops.flag_gems.add_rms_norm.default, *residual, m.weight, *extra)
        with graph.inserting_after(fused):
            y = getitem(graph, fused, 0)
        with graph.inserting_after(y):
            h = getitem(graph, fused, 1)
        y.meta["val"], h.meta["val"] = fused.meta["val"]
        m.out.replace_all_uses_with(y)
        m.h.replace_all_uses_with(h)
        report.fuse("add_rms_norm", m.variant)
    else:
        with graph.inserting_before(m.out):
            fused = graph.call_function(torch.ops.flag_gems.rms_norm.default, (m.h, m.weight, *extra))
        set_fake_val(fused, torch.ops.flag_gems.rms_norm.default, m.h, m.weight, *extra)
        m.out.replace_all_uses_with(fused)
        report.fuse(NAME, m.variant)


def fuse_rms_norm(gm: fx.GraphModule, report: GraphReport) -> int:
    """Rewrite every RMSNorm (and its residual add) in ``gm``; returns the number of rewrites."""
    count = 0
    for node in list(gm.graph.nodes):
        if not node.users:
            continue
        if is_op(node, aten.rsqrt):
            m = _match_decomposed(node)
        elif is_op(node, aten.rms_norm, aten._fused_rms_norm):
            m = _match_aten(node)
        else:
            continue
        if isinstance(m, str):
            report.keep("rms_norm pattern", m)
            continue
        if m is None:
            continue
        y = val(m.out)
        if not isinstance(y, torch.Tensor) or y.dtype != dtype_of(m.h) or tuple(y.shape) != shape_of(m.h):
            report.keep("rms_norm pattern", "output dtype/shape differs from the fused op's")
            continue
        if not y.is_contiguous():
            report.keep("rms_norm pattern", "non-contiguous output layout")
            continue
        try:
            _rewrite(gm, m, report)
        except (TypeError, ValueError, NotImplementedError) as e:
            # The fused op's fake implementation refused these inputs (device, dtype): keep
            # the pattern; the unused inserted node is removed with the dead code below.
            report.keep("rms_norm pattern", f"fused op refuses the inputs: {e}")
            continue
        count += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return count
