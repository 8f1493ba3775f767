"""Fuse the pointwise and indexing aten ops left in a compiled graph into generated Triton kernels.

Runs on AOT autograd's forward, backward and inference graphs, after the pattern fusions
(RMSNorm, SiLU/GELU·mul, RoPE) and before aten lowering. What it groups is what
:mod:`.pointwise_rules` can translate: casts, arithmetic, comparisons, ``where`` and mask
construction, ``cat``, ``constant_pad_nd``, ``arange``, ``index``, constants and the views
between them. Before / after, the rope table of an HF Llama::

    mul = aten.mul.Tensor(_to_copy, _to_copy_1)          # inv_freq x positions
    cat = aten.cat.default([mul, mul], -1)
    cos = aten.cos.default(cat);  mul_1 = aten.mul.Tensor(cos, 1.0);  _to_copy_2 = aten._to_copy(mul_1, bf16)
    sin = aten.sin.default(cat);  mul_2 = aten.mul.Tensor(sin, 1.0);  _to_copy_3 = aten._to_copy(mul_2, bf16)
    ->
    fused = fused_cat_cos_mul_sin_to_copy_...(_to_copy, _to_copy_1)     # one kernel, two outputs
    _to_copy_2, _to_copy_3 = fused[0], fused[1]

**Grouping.** A translatable node whose value leaves the group's reach (a user that is not
translatable, the graph output, a view that does) is *materialized*: a kernel output. Every
other translatable node is *inlined*: recomputed in registers by each kernel that reads it,
never stored. A kernel starts as one materialized node with its inlined ancestors; kernels
whose outputs have the same shape then merge (horizontally: the K and V copies of
``repeat_kv``; vertically: a materialized node read by a later one) when the merged kernel
can sit at its last output's place: every other reader of its outputs comes later.

**Mutation.** A node that mutates (an in-place or ``out=`` op, or anything not known to be
pure) splits the graph into segments; a kernel's nodes and the tensors it reads all lie in
one segment, and the kernel runs within it, so no read moves across a write.

**Worth it.** A kernel is kept when the ops it replaces launch more than one kernel natively
(``pointwise_rules.native_kernels``); a lone op is left to aten (same bytes, and a Python
launch) except a lone cast, whose Triton kernel measured 1.5-1.8x the native copy.

**Dynamic shapes.** Sizes are sympy expressions of the graph's symbols; each distinct one
becomes an int argument of the kernel, computed by the launcher from the graph's SymInt
inputs (or their tensors' sizes), so a dynamic graph compiles one kernel for every shape.

Each kernel is launched by a generated Python function (the FX node's target) that
allocates the outputs with the strides the graph's values have and launches; the wrapper
(``flag_gems.wrapper``) inlines the same lines into its flat function. Identical groups
(one per decoder layer) produce identical kernel text: one compile.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator

import sympy
import torch
from torch import fx

from ..kernels._common import device_guard, interpreter_mode, warn_once
from ..kernels.pointwise_fused import Expr, Load, fused_kernel, launch_config
from .pointwise_rules import RULES, native_kernels

logger = logging.getLogger(__name__)

__all__ = ["count_kernels", "cse", "fuse_pointwise", "FusedLaunch"]

aten = torch.ops.aten

# Kernels merge only when their outputs lie within this many graph nodes of each other:
# farther apart, a merge would keep the first outputs' inputs alive longer for little gain.
MERGE_WINDOW = 64
# A lone op still worth a generated kernel: measured faster than the native kernel.
_ALONE = {aten._to_copy.default: "H100: bf16 -> fp32 1.5-1.8x the native copy (benchmarks/results/ops_*)"}
_INDEX32_LIMIT = 2**31


def _warn_once(msg: str) -> None:
    warn_once(("pointwise_fusion", msg), msg, RuntimeWarning, stacklevel=2)


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else n


def _expr(v):
    """A size (int or SymInt) as a sympy expression."""
    return v.node.expr if isinstance(v, torch.SymInt) else sympy.Integer(int(v))


# --------------------------------------------------------------------------- CSE


def cse(gm: fx.GraphModule) -> int:
    """Merge duplicate nodes among the ones this pass translates (the same target on the same
    arguments: the per-layer attention masks of HF models, their scalar constants).

    Nodes whose value reaches the graph output are left alone (two outputs must stay two
    tensors), as are mutating and random ops (never in the rule table).

    Returns:
        The number of nodes removed.
    """
    outputs = set()
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    stack = [a for a in out.all_input_nodes]
    while stack:  # the outputs and the views they are made of
        n = stack.pop()
        if n in outputs:
            continue
        outputs.add(n)
        if n.op == "call_function" and getattr(RULES.get(n.target), "is_view", False):
            stack.extend(n.all_input_nodes)
    seen, removed = {}, 0
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target not in RULES or n in outputs:
            continue
        try:
            key = (n.target, _hashable(n.args), _hashable(tuple(sorted(n.kwargs.items()))))
            hash(key)
        except TypeError:
            continue
        prev = seen.get(key)
        if prev is None:
            seen[key] = n
            continue
        n.replace_all_uses_with(prev)
        gm.graph.erase_node(n)
        removed += 1
    return removed


def _hashable(a):
    if isinstance(a, (list, tuple)):
        return (type(a).__name__,) + tuple(_hashable(x) for x in a)
    if isinstance(a, float) and math.isnan(a):
        return ("nan",)
    if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        raise TypeError
    return a


# --------------------------------------------------------------------------- symbols


class _Symbols:
    """Where each symbol of the graph's sizes comes from at run time: a SymInt input, or a
    size / stride of a tensor input (read by a ``sym_size`` / ``sym_stride`` node added once)."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        self.direct, self.derived, self.nodes = {}, {}, {}
        for ph in self.placeholders:
            v = _val(ph)
            if isinstance(v, torch.SymInt) and isinstance(v.node.expr, sympy.Symbol):
                self.direct.setdefault(v.node.expr, ph)
            elif isinstance(v, torch.Tensor):
                for how, values in (("size", v.shape), ("stride", v.stride())):
                    for d, s in enumerate(values):
                        if isinstance(s, torch.SymInt) and isinstance(s.node.expr, sympy.Symbol):
                            self.derived.setdefault(s.node.expr, (ph, how, d))

    def available(self, expr) -> bool:
        return all(s in self.direct or s in self.derived for s in expr.free_symbols)

    def node(self, sym) -> fx.Node:
        if sym in self.direct:
            return self.direct[sym]
        got = self.nodes.get(sym)
        if got is None:
            ph, how, d = self.derived[sym]
            target = aten.sym_size.int if how == "size" else aten.sym_stride.int
            with self.graph.inserting_after(self.placeholders[-1]):
                got = self.graph.call_function(target, (ph, d))
            got.meta["val"] = getattr(_val(ph), how)(d)
            self.nodes[sym] = got
        return got


# --------------------------------------------------------------------------- translation context


class _Unfusable(Exception):
    pass


class _Ctx:
    """Builds one kernel's IR: its members are translated, everything else is an input."""

    def __init__(self, symbols: _Symbols, members=None):
        self.symbols = symbols
        self.members = members  # None: checking one node (every operand a stand-in)
        self.leaves: list = []
        self.slots: dict = {}
        self.names: dict = {}  # sympy expr -> int argument name
        self.memo: dict = {}

    def int(self, v):
        e = _expr(v) if not isinstance(v, sympy.Expr) else v
        if e.is_Integer:
            return int(e)
        if not self.symbols.available(e):
            raise _Unfusable(f"a size ({e}) depends on a symbol the graph's inputs do not give")
        name = self.names.get(e)
        if name is None:
            name = self.names[e] = f"z{len(self.names)}"
        return name

    def contiguous_strides(self, shape) -> tuple:
        out, step = [], sympy.Integer(1)
        for s in reversed(shape):
            out.append(self.int(step))
            step = step * _expr(s)
        return tuple(reversed(out))

    def ir(self, a) -> Expr:
        got = self.memo.get(a)
        if got is not None:
            return got
        v = _val(a)
        if not isinstance(v, torch.Tensor):
            raise _Unfusable(f"operand {a} is not a tensor")
        if self.members is None or a not in self.members:
            got = self.load(a, a)
        else:
            got = translate(self, a)
        self.memo[a] = got
        return got

    def load(self, leaf: fx.Node, view: fx.Node) -> Load:
        """``view`` (``leaf`` itself or a view of it) read from ``leaf``'s data pointer."""
        if self.members is None:  # checking: a stand-in of the operand's shape
            return Expr(tuple(self.int(s) for s in _val(view).shape), _val(view).dtype)
        slot = self.slots.get(leaf)
        if slot is None:
            slot = self.slots[leaf] = len(self.leaves)
            self.leaves.append(leaf)
        v, base = _val(view), _val(leaf)
        offset = _expr(v.storage_offset()) - _expr(base.storage_offset())
        return Load(tuple(self.int(s) for s in v.shape), v.dtype, slot, tuple(self.int(s) for s in v.stride()),
                    self.int(offset))

    def fold_view(self, x: Expr, node: fx.Node):
        """A view of a loaded tensor: the same tensor loaded with the view's strides."""
        if not isinstance(x, Load):
            return None
        leaf = self.leaves[x.slot]
        return self.load(leaf, node)


def translate(ctx: _Ctx, node: fx.Node) -> Expr:
    """The IR of ``node`` (its rule), or _Unfusable with the reason."""
    rule = RULES.get(node.target)
    if rule is None:
        raise _Unfusable("no rule")
    out = rule(ctx, node)
    if isinstance(out, str):
        raise _Unfusable(out)
    return out


def check(node: fx.Node, symbols: _Symbols, device_ok) -> str | None:
    """Why ``node`` cannot be put in a generated kernel (None when it can). Metadata only."""
    if node.op != "call_function" or node.target not in RULES:
        return "no rule"
    v = _val(node)
    if not isinstance(v, torch.Tensor):
        return "not a tensor"
    why = device_ok(v)
    if why:
        return why
    from ..kernels.pointwise import CAST_DTYPES

    if v.dtype not in CAST_DTYPES:
        return f"dtype {v.dtype}"
    try:
        translate(_Ctx(symbols), node)
    except _Unfusable as e:
        return str(e)
    except Exception as e:  # a rule that cannot read these arguments: not fused, said why
        return f"{type(e).__name__}: {e}"
    return None


def _device_ok(v) -> str | None:
    if v.device.type == "cuda" or (v.device.type == "cpu" and interpreter_mode()):
        return None
    return f"device {v.device}"


# --------------------------------------------------------------------------- grouping


def _is_barrier(n: fx.Node) -> bool:
    """Whether ``n`` may write memory another node reads (splits the graph into segments)."""
    if n.op in ("placeholder", "output", "get_attr"):
        return False
    if n.op != "call_function":
        return True
    t = n.target
    if t is operator.getitem or getattr(t, "__module__", None) in ("_operator", "math"):
        return False
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.is_mutable
    return True  # a Python function: assume it may write


@dataclasses.dataclass
class _Group:
    roots: list
    key: tuple
    seg: int
    last: int  # position of the last root
    moved: set = dataclasses.field(default_factory=set)  # readers of early roots moved after the kernel


def _groups(nodes, fusable, seg, pos):
    """Kernels as lists of roots (materialized nodes), merged by shape."""
    is_view = {n for n, kind in fusable.items() if kind == "view"}
    escapes_memo: dict = {}

    def escapes(n) -> bool:
        got = escapes_memo.get(n)
        if got is None:
            got = False
            for u in n.users:
                if u not in fusable or seg[u] != seg[n] or (u in is_view and escapes(u)):
                    got = True
                    break
            escapes_memo[n] = got
        return got

    roots = [n for n in nodes if fusable.get(n) == "op" and escapes(n)]
    rootset = set(roots)

    def members(rs) -> set:
        mem, stack = set(rs), list(rs)
        while stack:
            n = stack.pop()
            for a in n.all_input_nodes:
                if a in mem or a not in fusable or seg[a] != seg[n] or (a in rootset and a not in rs):
                    continue
                mem.add(a)
                stack.append(a)
        return mem

    kernel_bound = {n for n, kind in fusable.items() if kind == "op" or not escapes(n)}

    def movable(rs, mem):
        """The nodes to move after a kernel placed at its last root (readers of its earlier roots
        that sit before it), or None when one cannot move: it belongs to a kernel, or a member
        of this one reads it."""
        last = max(pos[r] for r in rs)
        moved, stack = set(), [u for r in rs for u in r.users if u not in mem and pos[u] < last]
        while stack:
            u = stack.pop()
            if u in moved:
                continue
            if u in kernel_bound or u.op != "call_function":
                return None
            moved.add(u)
            stack += [w for w in u.users if w not in mem and pos[w] < last]
        if moved and any(a in moved for m in mem for a in m.all_input_nodes):
            return None
        return moved

    groups: list[_Group] = []
    open_by_key: dict = {}
    for r in roots:
        v = _val(r)
        key = (tuple(_expr(s) for s in v.shape), v.device)
        merged = False
        for g in reversed(open_by_key.get(key, [])):
            if pos[r] - g.last > MERGE_WINDOW:
                break
            if g.seg != seg[r]:
                continue
            rs = g.roots + [r]
            moved = movable(rs, members(rs))
            if moved is not None:
                g.roots.append(r)
                g.last = pos[r]
                g.moved = moved
                merged = True
                break
        if not merged:
            g = _Group([r], key, seg[r], pos[r])
            groups.append(g)
            open_by_key.setdefault(key, []).append(g)
    return [(g.roots, members(g.roots), g.moved) for g in groups]


# --------------------------------------------------------------------------- launcher


_PRINT = None


def _py(e) -> str:
    """A sympy size expression as Python code over the symbols' names."""
    global _PRINT
    if _PRINT is None:
        from torch.utils._sympy.printers import PythonPrinter

        _PRINT = PythonPrinter()
    return str(int(e)) if e.is_Integer else _PRINT.doprint(e)


@dataclasses.dataclass
class FusedLaunch:
    """How to launch one generated kernel; renders the launch as Python lines.

    Attributes:
        kernel: the :class:`~flag_gems.kernels.pointwise_fused.FusedKernel`.
        n_inputs: tensor inputs (launch arguments ``in0..``).
        symbols: names of the SymInt arguments that follow the tensors.
        int_args: per int kernel argument, its Python expression over the symbols.
        outputs: per output: (shape code, stride code, dtype, device).
        numel: Python expression (or int) of the element count.
        static: every size is a literal (block, grid and indexing were chosen at build time).
        block, warps, index64: the static launch configuration (when ``static``).
        extents: Python expressions of the largest offset of each input (dynamic indexing choice).
    """

    kernel: object
    n_inputs: int
    symbols: tuple
    int_args: tuple
    outputs: tuple
    numel: object
    static: bool
    block: int = 0
    warps: int = 0
    index64: bool = False
    extents: tuple = ()

    def lines(self, ins, syms, outs, k32: str, k64: str, empty: str, config: str, tmp: str):
        """The launch as Python statements, in three parts: int arguments, output allocations, launch.

        ``ins``/``syms``/``outs`` name the inputs, the symbol values and the outputs; ``k32``/``k64``
        the kernels; ``empty(size_code, stride_code, dtype, device)`` gives an allocation's code;
        ``config`` names ``launch_config``; temporaries start with ``tmp``.

        Returns:
            ``(ints, allocations, launch)``, lists of lines.
        """
        sub = dict(zip(self.symbols, syms))

        def code(expr_code) -> str:
            return _rename(str(expr_code), sub)

        ints = [f"{tmp}{name} = {code(c)}" for name, c in self.int_args]
        int_names = [f"{tmp}{name}" for name, _ in self.int_args]
        alloc = [f"{o} = {empty(code(shape), code(stride), dtype, dev)}"
                 for o, (shape, stride, dtype, dev) in zip(outs, self.outputs)]
        args = ", ".join(list(ins) + list(outs) + int_names)
        if self.static:
            if self.numel == 0:
                return ints, alloc, []
            grid = -(-self.numel // self.block)
            k = k64 if self.index64 else k32
            return ints, alloc, [f"{k}.run({args}, grid=({grid},), warmup=False, BLOCK={self.block}, "
                                 f"num_warps={self.warps})"]
        n = f"{tmp}n"
        big = " or ".join([f"{n} + {tmp}block >= {_INDEX32_LIMIT}"] +
                          [f"{code(e)} + {tmp}block >= {_INDEX32_LIMIT}" for e in self.extents])
        launch = [
            f"{n} = {code(self.numel)}",
            f"if {n} > 0:",
            f"    {tmp}block, {tmp}warps = {config}({n})",
            f"    ({k64} if {big} else {k32}).run({args}, grid=(({n} + {tmp}block - 1) // {tmp}block,), "
            f"warmup=False, BLOCK={tmp}block, num_warps={tmp}warps)",
        ]
        return ints, alloc, launch


def _rename(code: str, sub: dict) -> str:
    import re

    return re.sub(r"\b[A-Za-z_]\w*\b", lambda m: sub.get(m.group(0), m.group(0)), code)


def _empty_strided(size, stride, dtype, device):
    return torch.empty_strided(size, stride, dtype=dtype, device=device)


# How generated launchers allocate their outputs, read when a launcher (or a wrapper) is built:
# ``(size, stride, dtype, device) -> Tensor``. Tests replace it with one that fills with NaN.
EMPTY_STRIDED = _empty_strided


def _make_launcher(launch: FusedLaunch, index: int):
    """The launch as a Python function ``(*inputs, *symbols) -> tuple(outputs)`` (the FX node's target)."""
    ins = [f"in{i}" for i in range(launch.n_inputs)]
    syms = [f"sym{i}" for i in range(len(launch.symbols))]
    outs = [f"out{k}" for k in range(len(launch.outputs))]
    consts = {}

    def empty(shape, stride, dtype, dev):
        consts.setdefault(dtype, f"_c{len(consts)}")
        consts.setdefault(dev, f"_c{len(consts)}")
        return f"_empty({shape}, {stride}, {consts[dtype]}, {consts[dev]})"

    ints, alloc, launch_lines = launch.lines(ins, syms, outs, "_k32", "_k64", empty, "_config", "_t_")
    name = f"{launch.kernel.name}_launch{index}"
    src = [f"def {name}({', '.join(ins + syms)}):"] + [f"    {line}" for line in ints + alloc]
    if launch_lines:  # under the device guard (in the interpreter: its lock)
        src.append(f"    with _guard({outs[0]}):")
        src += [f"        {line}" for line in launch_lines]
    src.append(f"    return ({', '.join(outs)},)")
    ns = {
        "_k32": launch.kernel.kernel(False) if False in launch.kernel.sources else None,
        "_k64": launch.kernel.kernel(True) if True in launch.kernel.sources else None,
        "_empty": EMPTY_STRIDED, "_config": launch_config, "_guard": device_guard, "torch": torch, "math": math,
    }
    ns.update({name: obj for obj, name in consts.items()})
    exec(compile("\n".join(src) + "\n", f"<flag_gems.pointwise_fusion {name}>", "exec"), ns)
    fn = ns[name]
    fn.__module__ = __name__
    fn.gems_launch = launch
    fn.gems_source = "\n".join(src)
    return fn


# --------------------------------------------------------------------------- building a kernel


def _build(roots, mem, symbols: _Symbols, index: int):
    """(launcher, input nodes, symbol nodes) for one kernel; raises _Unfusable."""
    ctx = _Ctx(symbols, mem)
    outs_ir = [ctx.ir(r) for r in roots]
    v0 = _val(roots[0])
    shape = tuple(_expr(s) for s in v0.shape)
    strides0 = tuple(_expr(s) for s in v0.stride())
    nd = len(shape)
    # Iteration order: output 0's memory order when its strides are known numbers, else row-major.
    order = list(range(nd))
    if all(s.is_Integer for s in strides0 + shape):
        order = sorted(range(nd), key=lambda d: (-int(strides0[d]), d))
    inner, step = [sympy.Integer(1)] * nd, sympy.Integer(1)
    for d in reversed(order):
        inner[d] = step
        step = step * shape[d]
    numel = step
    out_strides = [tuple(ctx.int(_expr(s)) for s in _val(r).stride()) for r in roots]
    static = not (numel.free_symbols or any(s.free_symbols for s in shape))
    extents = []
    for leaf in ctx.leaves:
        lv = _val(leaf)
        extents.append(sum(((_expr(n) - 1) * _expr(s) for n, s in zip(lv.shape, lv.stride())), sympy.Integer(0)) + 1)
    for r in roots:
        rv = _val(r)
        extents.append(sum(((_expr(n) - 1) * _expr(s) for n, s in zip(rv.shape, rv.stride())), sympy.Integer(0)) + 1)
    index_ints = (tuple(ctx.int(s) for s in shape), tuple(ctx.int(s) for s in inner), ctx.int(numel))
    if static:
        n = int(numel)
        block, warps = launch_config(n)
        index64 = any(int(e) + block >= _INDEX32_LIMIT for e in extents + [numel] if e.is_Integer) or \
            any(not e.is_Integer for e in extents)
        variants = (index64,)
    else:
        block = warps = 0
        index64 = False
        variants = (False, True)
    kernel = fused_kernel(outs_ir, out_strides, index_ints[0], index_ints[1], order, index_ints[2],
                          len(ctx.leaves), int_params=tuple(ctx.names.values()), variants=variants)
    free = sorted({s for e in ctx.names for s in e.free_symbols} |
                  {s for r in roots for x in (*_val(r).shape, *_val(r).stride()) for s in _expr(x).free_symbols},
                  key=str)
    sym_names = tuple(str(s) for s in free)
    outputs = []
    for r in roots:
        rv = _val(r)
        outputs.append(("(" + "".join(f"{_py(_expr(s))}, " for s in rv.shape) + ")",
                        "(" + "".join(f"{_py(_expr(s))}, " for s in rv.stride()) + ")", rv.dtype, rv.device))
    launch = FusedLaunch(kernel, len(ctx.leaves), sym_names, tuple((name, _py(e)) for e, name in ctx.names.items()),
                         tuple(outputs), int(numel) if static else _py(numel), static, block, warps, index64,
                         tuple(_py(e) for e in extents if not e.is_Integer))
    fn = _make_launcher(launch, index)
    return fn, list(ctx.leaves), [symbols.node(s) for s in free]


# --------------------------------------------------------------------------- the pass


def fuse_pointwise(gm: fx.GraphModule, report=None, kind: str = "graph", strict: bool = False) -> int:
    """Replace groups of pointwise / indexing aten nodes of ``gm`` by generated kernels.

    Args:
        gm: a post-autograd aten graph (values in ``meta["val"]``).
        report: a :class:`~flag_gems.report.GraphReport` (optional): each kernel under
            ``generated``, a note with the totals.
        kind: the graph's kind (inference, forward, backward), for the note.
        strict: raise when a group's kernel cannot be generated for an unexpected reason (a bug),
            instead of leaving that group to aten with a note.

    Returns:
        The number of kernels generated (``gm`` is recompiled when > 0).
    """
    graph = gm.graph
    removed = cse(gm)
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    seg, s = {}, 0
    for n in nodes:
        seg[n] = s
        if _is_barrier(n):
            s += 1
    symbols = _Symbols(graph)
    fusable = {}
    for n in nodes:
        if n.op != "call_function" or n.target not in RULES:
            continue
        why = check(n, symbols, _device_ok)
        if why is None:
            fusable[n] = "view" if getattr(RULES[n.target], "is_view", False) else "op"
        else:
            logger.debug("pointwise fusion: %s stays: %s", n.format_node(), why)
    built, alone, failed = [], 0, []
    for roots, mem, moved in _groups(nodes, fusable, seg, pos):
        ops = [m for m in mem if fusable[m] == "op"]
        native = sum(native_kernels(m) for m in mem)
        if native <= 1 and not (len(ops) == 1 and ops[0].target in _ALONE):
            alone += 1
            continue
        try:
            fn, leaves, syms = _build(roots, mem, symbols, len(built))
        except _Unfusable as e:
            failed.append(str(e))
            logger.debug("pointwise fusion: group of %s not fused: %s", [r.name for r in roots], e)
            continue
        except Exception as e:  # a generator bug: that group stays aten, the others are fused
            if strict:
                raise
            failed.append(f"{type(e).__name__}: {e}")
            _warn_once(f"flag_gems: pointwise fusion could not generate a kernel ({type(e).__name__}: {e}); "
                       "that group runs as aten ops")
            continue
        built.append((roots, mem, fn, leaves, syms, moved))
    # All kernels are placed before any root is replaced: a kernel reading another's output then
    # reads the fused node's result whichever was built first.
    replace = []
    for roots, mem, fn, leaves, syms, moved in built:
        with graph.inserting_after(max(roots, key=pos.get)):
            fused = graph.call_function(fn, tuple(leaves) + tuple(syms))
            fused.meta["val"] = tuple(_val(r) for r in roots)
        prev = fused
        for k, r in enumerate(roots):
            with graph.inserting_after(prev):
                g = graph.call_function(operator.getitem, (fused, k))
            g.meta["val"] = _val(r)
            prev = g
            replace.append((r, g, mem))
        for d in sorted(moved, key=pos.get):  # readers of the earlier outputs: after the kernel now
            prev.append(d)
            prev = d
        if report is not None:
            report.generated[fn.gems_launch.kernel.name] += 1
    for r, g, mem in replace:  # the kernel's own members keep the old node: they are dead now
        r.replace_all_uses_with(g, delete_user_cb=lambda u, mem=mem: u not in mem)
    if built or removed:
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
    if report is not None and (built or alone or failed):
        n_ops = sum(len([m for m in mem if fusable[m] == "op"]) for _, mem, *_ in built)
        note = (f"pointwise fusion ({kind}): {len(built)} kernels for {n_ops} ops"
                f" ({len({b[2].gems_launch.kernel.name for b in built})} distinct)")
        if alone:
            note += f"; {alone} single-op groups left to aten"
        if failed:
            note += f"; {len(failed)} groups not generated ({failed[0]})"
        report.notes.append(note)
    logger.info("flag_gems: pointwise fusion (%s): %d kernels, %d single-op groups left, %d duplicates removed",
                kind, len(built), alone, removed)
    return len(built)


def count_kernels(gm: fx.GraphModule) -> int:
    """CUDA kernels one call of ``gm`` launches, counted from its nodes (see ``native_kernels``)."""
    return sum(native_kernels(n) for n in gm.graph.nodes)
