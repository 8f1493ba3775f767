"""Rewrite vLLM's own kernel calls in post-grad graphs into ``torch.ops.flag_gems`` ops.

What vLLM puts in the graphs Inductor hands to post-grad passes (mode 3), besides the
decomposed native math the generic passes (:mod:`flag_gems.passes`) match:

* **IR ops** (vLLM >= 0.33, torch wrap on): ``vllm_ir.rms_norm.default(x, w, eps, variance_size)``
  and ``vllm_ir.fused_add_rms_norm.default(x, residual, w, eps, variance_size) -> (y, h)``
  (``maybe_inplace`` reaches post-grad only under ``auto_functionalized``).
* **``_C`` ops** of enabled CustomOps, functionalized: ``auto_functionalized(_C.silu_and_mul.default,
  result=empty, input=x)[1]`` is the result (``auto_functionalized_v2`` names the mutated
  arguments through ``_<arg>_base_index`` into ``_all_bases`` instead; vLLM configures v1).

Before / after::

    at = auto_functionalized(_C.fused_add_rms_norm.default, input=x, residual=r, weight=w, epsilon=1e-6)
    y, h = at[1], at[2]
        ->  fused = flag_gems.add_rms_norm(x, r, w, 1e-6, 0.0, True); y, h = fused[0], fused[1]

    y = vllm_ir.rms_norm.default(x, w, 1e-6)     ->  y = flag_gems.rms_norm(x, w, 1e-6, 0.0, True)

The table :data:`FORMS` is the data: per vLLM op, the flag_gems op it becomes, how the
arguments map, and which of its outputs replace which value (a return, or the new value of
a mutated argument). A call is left alone, with the reason in the report, when its
arguments are outside what the kernel does (``variance_size``, a weight dtype whose
rounding the kernel cannot reproduce, rope with ``rope_dim_offset`` or ``inverse``, a mutated
argument that is a view under ``auto_functionalized_v2``), when a value it produces is used
that the replacement does not produce, or when the flag_gems op's fake refuses the inputs.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from typing import Callable

import torch
from torch import fx

from ..passes.matching import dtype_of, set_fake_val, shape_of, val
from ..report import GraphReport
from .impls import weight_rounding

logger = logging.getLogger(__name__)

NAME = "vllm_op"
PATTERN = "vllm op"
_HOPS = torch.ops.higher_order
_GEMS = torch.ops.flag_gems


@dataclasses.dataclass
class _Call:
    """One vLLM op call, read the same way whether it is direct or functionalized."""

    node: fx.Node  # the call (the op, or the auto_functionalized node)
    op: torch._ops.OpOverload
    args: dict  # schema argument name -> value
    outputs: dict  # ("return", i) or ("mutated", name) -> nodes holding that value
    form: str  # "ir" | "af" | "af2"


@dataclasses.dataclass(frozen=True)
class _Form:
    """How one vLLM op becomes a flag_gems op.

    ``build(args)`` returns ``(op, op_args, outputs)`` with ``outputs`` naming, per output of
    the flag_gems op (None for a single tensor), the value of the vLLM call it replaces; or
    a reason string.
    """

    variant: str
    build: Callable


def _meta(x):
    v = val(x)
    return v if isinstance(v, torch.Tensor) else None


def _rms(args, residual: bool, out_keys):
    x, w = args.get("x", args.get("input")), args.get("weight")
    if args.get("variance_size") is not None:
        return "variance_size is set (the kernel normalizes over the whole row)"
    xv, wv = _meta(x), _meta(w) if w is not None else None
    if xv is None or (w is not None and wv is None):
        return "input without a tensor value"
    # vLLM's CUDA kernels round before the weight; the IR native rounds to the weight's dtype.
    rb = True if "input" in args else weight_rounding(xv, wv)
    if rb is None:
        return f"weight dtype {wv.dtype} on a {xv.dtype} input (vLLM rounds to the weight's dtype first)"
    eps = float(args["epsilon"])
    if residual:
        r = args.get("x_residual", args.get("residual"))
        return _GEMS.add_rms_norm.default, (x, r, w, eps, 0.0, rb), dict(zip((0, 1), out_keys))
    return _GEMS.rms_norm.default, (x, w, eps, 0.0, rb), {None: out_keys[0]}


def _act(fused_op, approximate):
    def build(args):
        extra = () if approximate is None else (approximate,)
        return getattr(_GEMS, fused_op).default, (args["input"], *extra), {None: ("mutated", "result")}

    return build


def _rope(args):
    if args.get("rope_dim_offset", 0) or args.get("inverse", False):
        return "rope_dim_offset / inverse rotation (DeepSeek-V4's form)"
    pos, q, k = args["positions"], args["query"], args["key"]
    rest = (args["head_size"], args["cos_sin_cache"], bool(args["is_neox"]))
    if k is None:
        return _GEMS.rotary_embedding_cache_q.default, (pos, q, *rest), {None: ("mutated", "query")}
    return (_GEMS.rotary_embedding_cache.default, (pos, q, k, *rest),
            {0: ("mutated", "query"), 1: ("mutated", "key")})


FORMS = {
    "vllm_ir::rms_norm": _Form("ir", lambda a: _rms(a, False, [("return", 0)])),
    "vllm_ir::fused_add_rms_norm": _Form("ir", lambda a: _rms(a, True, [("return", 0), ("return", 1)])),
    "_C::rms_norm": _Form("c", lambda a: _rms(a, False, [("mutated", "result")])),
    "_C::fused_add_rms_norm": _Form("c", lambda a: _rms(a, True, [("mutated", "input"), ("mutated", "residual")])),
    "_C::silu_and_mul": _Form("c", _act("silu_and_mul_fused", None)),
    "_C::gelu_and_mul": _Form("c", _act("gelu_and_mul_fused", "none")),
    "_C::gelu_tanh_and_mul": _Form("c", _act("gelu_and_mul_fused", "tanh")),
    "_C::rotary_embedding": _Form("c", _rope),
}
# Which family of flag_gems' report each vLLM op counts in.
FAMILY = {
    "rms_norm": "rms_norm", "fused_add_rms_norm": "add_rms_norm", "silu_and_mul": "act_and_mul",
    "gelu_and_mul": "act_and_mul", "gelu_tanh_and_mul": "act_and_mul", "rotary_embedding": "rotary_embedding",
}


# ------------------------------------------------------------------ reading calls


def _bind(schema, args, kwargs) -> dict:
    out = {}
    for i, a in enumerate(schema.arguments):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
        else:
            out[a.name] = None
    return out


def _getitems(node) -> dict:
    """index -> getitem users of a tuple-valued node; None when another user reads the tuple."""
    items = {}
    for u in node.users:
        if u.op != "call_function" or u.target is not operator.getitem or not isinstance(u.args[1], int):
            return None
        items.setdefault(u.args[1], []).append(u)
    return items


def _read(node: fx.Node) -> _Call | str | None:
    """The vLLM op call ``node`` makes (None: not one of :data:`FORMS`)."""
    if node.op != "call_function":
        return None
    if node.target in (getattr(_HOPS, "auto_functionalized", None), getattr(_HOPS, "auto_functionalized_v2", None)):
        op = node.args[0]
        if not isinstance(op, torch._ops.OpOverload) or op._schema.name not in FORMS:
            return None
        v2 = node.target is getattr(_HOPS, "auto_functionalized_v2", None)
        schema = op._schema
        kwargs = dict(node.kwargs)
        items = _getitems(node)
        if items is None:
            return "the functionalized call's tuple is read whole"
        n_ret = max(len(schema.returns), 1)  # no return still takes slot 0 (None)
        args, outputs = {}, {}
        bases = kwargs.get("_all_bases", [])
        mutable = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        for a in schema.arguments:
            if not v2 or a not in mutable:
                args[a.name] = kwargs.get(a.name, a.default_value if a.has_default_value() else None)
        for j, a in enumerate(mutable):
            if v2:
                if any(f"_{a.name}_{s}" in kwargs for s in ("size", "stride", "storage_offset")):
                    return f"{a.name} is a view of its base (auto_functionalized_v2)"
                base = kwargs.get(f"_{a.name}_base_index")
                args[a.name] = None if base is None else bases[base]
                index = None if base is None else n_ret + base
            else:
                index = n_ret + j
            outputs[("mutated", a.name)] = items.pop(index, []) if index is not None else []
        for i in range(len(schema.returns)):
            outputs[("return", i)] = items.pop(i, [])
        if any(items.values()):
            return "an unexpected output of the functionalized call is used"
        return _Call(node, op, args, outputs, "af2" if v2 else "af")
    op = node.target
    if not isinstance(op, torch._ops.OpOverload) or op._schema.name not in FORMS:
        return None
    if op._schema.is_mutable:
        return None  # reaches post-grad graphs functionalized
    args = _bind(op._schema, node.args, node.kwargs)
    if len(op._schema.returns) == 1:
        outputs = {("return", 0): [node]}
    else:
        items = _getitems(node)
        if items is None:
            return "the call's tuple is read whole"
        outputs = {("return", i): items.pop(i, []) for i in range(len(op._schema.returns))}
        if any(items.values()):
            return "an unexpected output is used"
    return _Call(node, op, args, outputs, "ir")


# ------------------------------------------------------------------ rewriting


def _rewrite(gm: fx.GraphModule, call: _Call, report: GraphReport) -> str | None:
    key = call.op._schema.name  # "_C::silu_and_mul" for every overload
    form = FORMS[key]
    built = form.build(call.args)
    if isinstance(built, str):
        return built
    gems_op, op_args, mapping = built
    unused = [k for k, nodes in call.outputs.items() if nodes and k not in mapping.values()]
    if unused:
        return f"its value {unused[0]} is used and the flag_gems op does not produce it"
    graph = gm.graph
    with graph.inserting_before(call.node):
        new = graph.call_function(gems_op, op_args)
    try:
        set_fake_val(new, gems_op, *op_args)
    except (TypeError, ValueError, NotImplementedError, RuntimeError) as e:
        graph.erase_node(new)
        return f"flag_gems.{gems_op._schema.name.split('::')[-1]} refuses the inputs ({type(e).__name__}: {e})"
    outs = val(new)
    replacements = []
    for index, target in mapping.items():
        nodes = call.outputs.get(target, [])
        value = outs if index is None else outs[index]
        for n in nodes:
            old = _meta(n)
            if old is None or old.dtype != value.dtype or shape_of(n) != tuple(value.shape):
                graph.erase_node(new)
                return f"{target}: {tuple(shape_of(n) or ())} {dtype_of(n)} differs from the flag_gems op's output"
        replacements.append((index, nodes))
    for index, nodes in replacements:
        if index is None:
            source = new
        else:
            with graph.inserting_after(new):
                source = graph.call_function(operator.getitem, (new, index))
            source.meta["val"] = outs[index]
        for n in nodes:
            n.replace_all_uses_with(source)
    # The vLLM call and its getitems are dead now (the result buffer of a _C op too).
    for nodes in call.outputs.values():
        for n in nodes:
            if n is not call.node and not n.users:
                graph.erase_node(n)
    if not call.node.users:
        graph.erase_node(call.node)
    short = key.split("::")[-1]
    report.fuse(FAMILY[short], f"vllm_{form.variant}_{short}")
    return None


def rewrite_vllm_ops(gm: fx.GraphModule, report: GraphReport) -> int:
    """Rewrite every call of a vLLM op in :data:`FORMS` into its flag_gems op.

    Args:
        gm: a post-grad graph (functionalized), rewritten in place.
        report: one ``fuse`` per rewrite (pattern family, variant ``vllm_<ir|c>_<op>``), one
            ``keep`` per call left alone with its reason.

    Returns:
        The number of calls rewritten.
    """
    count = 0
    for node in list(gm.graph.nodes):
        if node.graph is not gm.graph or node.op != "call_function":
            continue
        call = _read(node)
        if call is None:
            continue
        if isinstance(call, str):
            report.keep(PATTERN, call)
            continue
        reason = _rewrite(gm, call, report)
        if reason:
            report.keep(f"{PATTERN} {call.op._schema.name}", reason)
            continue
        count += 1
    if count:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return count
