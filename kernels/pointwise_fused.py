"""One Triton kernel per fused group of pointwise and indexing ops, generated from a small IR.

The compile backend's ``pointwise_fusion`` pass groups the aten ops left in a graph
(casts, arithmetic, comparisons, ``where``, ``cat``, ``constant_pad_nd``, ``arange``,
``index``, the views between them) and describes each group as an expression DAG over its
input tensors: the IR below. This module turns that DAG into one Triton kernel::

    Op(cos) <- Cat(dim=-1) <- Op(mul) <- Load(in0), Load(in1)      (the rope table)

    @_gems_jit
    def fused_cat_cos_mul_...(in0_ptr, in1_ptr, out0_ptr, BLOCK: tl.constexpr):
        offs = pid * BLOCK + tl.arange(0, BLOCK); xmask = offs < 16
        i2 = offs % 16
        c0 = i2 < 8 ...                       # which input of the cat
        tl.store(out0_ptr + offs, libdevice.cos(...), mask=xmask)

**Evaluation.** Every IR node is evaluated per element of the group's iteration space (the
shape all its outputs share), as a function of an index tuple in the node's own shape:
broadcasting drops or zeroes index components, views (:class:`Affine`, :class:`Reshape`)
map them, ``cat``/``pad`` select by index ranges, ``index`` (:class:`Gather`) loads its
indices first. An intermediate is never written to memory; one that several outputs read
at the same index is computed once (the generator memoizes on node, index and mask).

**Numerics** (as Inductor's fused kernels): fp16/bf16 values live in fp32 registers between
ops, fp32/fp64/integers in their own dtype, bool as int1; an op computes in torch's
computation dtype (``kernels.pointwise.op_dtypes``: type promotion, opmath); only an explicit
cast (:class:`Cast`, ``_to_copy``) rounds; outputs round once when stored. The math
functions are the pointwise module's (libdevice on the GPU, the interpreter's helpers on
the CPU), so a fused ``cos`` or ``exp`` gives the value the unfused kernel gives.

**Sizes** are ``int`` literals or names of int kernel arguments (symbolic sizes; the caller
computes their values at launch), so one source serves every shape of a dynamic graph.
**Caching**: kernels are cached by source text. Identical groups (the same ops on the same
shapes in 32 decoder layers) generate the same text and compile once.

Indexing is int32 unless some offset can reach 2**31 (``index64``; callers with symbolic
sizes pick the variant at launch).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import linecache
import math
import re
import threading

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._common import interpreter_mode
from ._launch import jit
from .pointwise import _MATH_GPU, _MATH_INTERP, _TL_DTYPES, PointwiseOp, _downcast_interp, _maximum, _minimum
from .pointwise import _div_interp, _pow_interp, _recip32, _recip64, _tanh_interp, _upcast_interp

__all__ = [
    "Affine", "Cast", "Cat", "Const", "Expr", "FusedKernel", "Gather", "Iota", "Load", "Op", "Pad", "Reduce", "Reshape",
    "Scan",
    "fused_kernel", "fused_kernel_cache_info", "launch_config", "reg_dtype",
]

_INTERPRET = interpreter_mode()
# Computation ("register") dtype of a value of each dtype between ops (torch's opmath).
_REG = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def launch_config(n: int) -> tuple[int, int]:
    """Elements per program (BLOCK) and warps of a fused kernel over ``n`` elements.

    GPU: 1024 elements on 4 warps, the single-op pointwise kernels' heuristic (H100 sweep in
    benchmarks/NOTES.md: no block/warp choice more than 2 % faster for bf16 add at any M). Not
    their autotuner: a fused group is another kernel than the one it tunes, and the choice is
    made at graph-compile time, where tuning would launch. Interpreter: one program per up to
    4096 elements (each program is a Python round trip).

    Returns:
        (BLOCK, num_warps)
    """
    if _INTERPRET:
        return max(16, min(4096, 1 << max(n - 1, 0).bit_length())), 1
    return 1024, 4


def reg_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a value of ``dtype`` is held in inside a fused kernel (fp16/bf16 -> fp32)."""
    return _REG.get(dtype, dtype)


# --------------------------------------------------------------------------- IR
# Sizes, strides and offsets ("Ints" below) are int literals, or names of int kernel arguments.


@dataclasses.dataclass(frozen=True, eq=False)
class Expr:
    """An IR node: a tensor-valued expression of ``shape`` (Ints) and ``dtype``."""

    shape: tuple
    dtype: torch.dtype


@dataclasses.dataclass(frozen=True, eq=False)
class Load(Expr):
    """Input tensor ``slot`` read through ``strides`` from ``offset`` elements past its data pointer."""

    slot: int
    strides: tuple
    offset: object = 0


@dataclasses.dataclass(frozen=True, eq=False)
class Const(Expr):
    """A constant broadcast to ``shape``. ``value``: a Python number, or the name of an int kernel
    argument. ``weak``: a Python scalar operand, converted straight to the consuming op's
    computation dtype (torch's wrapped numbers); otherwise a tensor constant whose value is
    already rounded to ``dtype``."""

    value: object
    weak: bool = False


@dataclasses.dataclass(frozen=True, eq=False)
class Op(Expr):
    """``op`` (a :class:`~flag_gems.kernels.pointwise.PointwiseOp`) of broadcast ``operands``,
    computed in ``compute``."""

    op: PointwiseOp
    operands: tuple
    compute: torch.dtype


@dataclasses.dataclass(frozen=True, eq=False)
class Cast(Expr):
    """``x`` converted to ``dtype`` as torch's ``_to_copy`` does (the one op that rounds in registers)."""

    x: Expr


@dataclasses.dataclass(frozen=True, eq=False)
class Affine(Expr):
    """A view of ``x`` whose index is affine in this node's index (expand, permute, slice,
    select, unsqueeze, squeeze): per dim of ``x``, ``(const, ((dim, coef), ...))``."""

    x: Expr
    index: tuple


@dataclasses.dataclass(frozen=True, eq=False)
class Reshape(Expr):
    """``x`` viewed with another shape (row-major linear index kept). ``in_strides`` /
    ``out_strides``: the contiguous strides of ``x.shape`` and of ``shape``."""

    x: Expr
    in_strides: tuple
    out_strides: tuple


@dataclasses.dataclass(frozen=True, eq=False)
class Cat(Expr):
    """``torch.cat(inputs, dim)``; ``offsets[k]``: where input k starts along ``dim``."""

    inputs: tuple
    dim: int
    offsets: tuple


@dataclasses.dataclass(frozen=True, eq=False)
class Pad(Expr):
    """``constant_pad_nd``: ``x`` shifted by ``lo`` (per dim; negative crops), ``value`` outside."""

    x: Expr
    lo: tuple
    value: object


@dataclasses.dataclass(frozen=True, eq=False)
class Iota(Expr):
    """``arange``: ``start + i * step`` in ``dtype`` (1-d)."""

    start: object
    step: object


@dataclasses.dataclass(frozen=True, eq=False)
class Reduce(Expr):
    """``op`` (sum, amax, amin) of ``x`` over ``dims`` (static sizes; unrolled), accumulated in
    ``acc``; ``keepdim`` as torch's. ``scale`` multiplies the result (a mean's 1 / count)."""

    x: Expr
    dims: tuple
    op: str
    keepdim: bool
    acc: torch.dtype
    scale: object = None


@dataclasses.dataclass(frozen=True, eq=False)
class Scan(Expr):
    """``cumsum`` of ``x`` along ``dim`` (a static size; unrolled), accumulated in ``acc``."""

    x: Expr
    dim: int
    acc: torch.dtype


@dataclasses.dataclass(frozen=True, eq=False)
class Gather(Expr):
    """``aten.index.Tensor(src, indices)``: ``indices[j]`` (an integer Expr or None) indexes dim j
    of ``src``; the non-None ones are adjacent, broadcast together, and replace those dims."""

    src: Expr
    indices: tuple


# --------------------------------------------------------------------------- codegen

_TOKEN = re.compile(r"[A-Za-z_]\w*")
_XVAR = re.compile(r"\bx(\d+)\b")


def _tl(dtype: torch.dtype) -> str:
    return _TL_DTYPES[dtype]


def _lit(value, dtype: torch.dtype) -> str:
    """A scalar of ``dtype`` in Triton source (``value``: a number or an int argument's name)."""
    t = _tl(dtype)
    if isinstance(value, str):
        return f"{value}.to({t})"
    if isinstance(value, bool) or dtype is torch.bool:
        return f"tl.full([], {int(bool(value))}, {t})"
    if dtype.is_floating_point:
        v = float(value)
        if math.isnan(v):
            text = 'float("nan")'
        elif math.isinf(v):
            text = 'float("inf")' if v > 0 else '-float("inf")'
        else:
            text = repr(v)
        return f"tl.full([], {text}, {t})"
    return f"tl.full([], {int(value)}, {t})"


def _int(x) -> int | None:
    """``x`` as an int when it is a literal (an int, or a string of one), else None."""
    if isinstance(x, int):
        return x
    return int(x) if re.fullmatch(r"-?\d+", x) else None


def _mul(a, b) -> str:
    """Index product ``a * b`` (strings or ints), folded when both are literals."""
    ia, ib = _int(a), _int(b)
    if ia == 0 or ib == 0:
        return "0"
    if ia is not None and ib is not None:
        return str(ia * ib)
    if ib == 1:
        return str(a)
    if ia == 1:
        return str(b)
    return f"{a} * {b}"


def _add(terms) -> str:
    """Index sum (strings or ints), literal terms folded into one."""
    const, rest = 0, []
    for t in terms:
        v = _int(t)
        if v is None:
            rest.append(str(t))
        else:
            const += v
    if const:
        rest.append(str(const))
    if not rest:
        return "0"
    return rest[0] if len(rest) == 1 else "(" + " + ".join(rest) + ")"


def _sub(a, b) -> str:
    """Index difference ``a - b``, folded when both are literals."""
    ia, ib = _int(a), _int(b)
    if ib == 0:
        return str(a)
    if ia is not None and ib is not None:
        return str(ia - ib)
    return f"({a} - {b})"


class _Codegen:
    """Triton source of one fused kernel (see :func:`fused_kernel`)."""

    def __init__(self, shape, inner, order, n, index64: bool):
        self.shape, self.inner, self.order, self.n, self.index64 = shape, inner, order, n, index64
        self.lines: list[str] = []
        self.memo: dict = {}
        self.texts: dict = {}  # emitted code -> its name (the same text computes the same value)
        self.block = {"offs", "xmask"}  # names whose value is a block (depends on the element)
        self.count = 0
        self.ops: set = set()

    # ----------------------------------------------------------- helpers
    def emit(self, code: str, block: bool | None = None, prefix: str = "t") -> str:
        got = self.texts.get(code)
        if got is not None:
            return got
        name = self.texts[code] = f"{prefix}{self.count}"
        self.count += 1
        self.lines.append(f"{name} = {code}")
        if block if block is not None else self.is_block(code):
            self.block.add(name)
        return name

    def is_block(self, code: str) -> bool:
        return any(tok in self.block for tok in _TOKEN.findall(str(code)))

    def and_mask(self, mask: str | None, *conds: str) -> str:
        """The load mask of a branch: the enclosing one (``xmask`` at the top) and ``conds``."""
        parts = [mask or "xmask"]
        for c in conds:
            if _INTERPRET and not self.is_block(c):  # the interpreter's block & scalar bool is no bool
                c = f"(tl.zeros([BLOCK], tl.int32) + ({c}).to(tl.int32)) != 0"
            parts.append(f"({c})")
        return self.emit(" & ".join(parts), prefix="m")

    @staticmethod
    def retype(code: str, src: torch.dtype, dst: torch.dtype) -> str:
        """A value held as ``src`` (a register dtype) held as ``dst``'s register dtype, without
        rounding (an op's result between ops; bool is ``!= 0``)."""
        if dst is torch.bool:
            return code if src is torch.bool else f"({code} != 0)"
        rd = reg_dtype(dst)
        return code if src is rd else f"({code}).to({_tl(rd)})"

    @staticmethod
    def cast(code: str, src: torch.dtype, dst: torch.dtype) -> str:
        """A register value of a ``src`` tensor converted to ``dst`` as torch's copy does: a
        narrowing to fp16/bf16 rounds (and is held as fp32); bool is ``!= 0``."""
        if dst in _REG and src is not dst:
            rs = reg_dtype(src)
            x = code if rs is torch.float32 else f"({code}).to(tl.float32)"
            if _INTERPRET:  # the interpreter's own fp32 -> bf16 conversion truncates
                return f"_upcast_interp(_downcast_interp({x}, {_tl(dst)}), tl.float32)"
            return f"({x}).to({_tl(dst)}).to(tl.float32)"
        return _Codegen.retype(code, reg_dtype(src), dst)

    # ----------------------------------------------------------- evaluation
    def value(self, e: Expr, idx: tuple, mask: str | None) -> str:
        """Name (or literal) of ``e``'s register value at index ``idx`` (strings, one per dim)."""
        key = (id(e),) if isinstance(e, Const) else (id(e), idx, mask)
        got = self.memo.get(key)
        if got is None:
            got = self.memo[key] = getattr(self, "_" + type(e).__name__.lower())(e, idx, mask)
        return got

    def broadcast(self, operand: Expr, idx: tuple) -> tuple:
        """``idx`` of a node, as the index of an operand broadcast to the node's shape."""
        r = len(operand.shape)
        sub = idx[len(idx) - r:] if r else ()
        return tuple("0" if s == 1 else i for s, i in zip(operand.shape, sub))

    def _load(self, e: Load, idx, mask):
        self.ops.add("load")
        off = _add([_mul(i, s) for i, s in zip(idx, e.strides)] + [e.offset])
        if self.is_contiguous_read(e, idx):
            off = "offs"
        ptr = f"in{e.slot}_ptr"
        if self.is_block(off):
            code = f"tl.load({ptr} + {off}, mask={mask or 'xmask'}, other=0)"
        else:  # one element for the whole block (a scalar pointer takes no block mask)
            code = f"tl.load({ptr} + {off})" if off != "0" else f"tl.load({ptr})"
        x = self.emit(code, block=self.is_block(off))
        if e.dtype in _REG:
            up = f"_upcast_interp({x}, tl.float32)" if _INTERPRET else f"{x}.to(tl.float32)"
            x = self.emit(up, block=x in self.block)
        return x

    def is_contiguous_read(self, e: Load, idx) -> bool:
        """Whether ``e`` at ``idx`` reads element ``offs`` (the iteration's own linear index)."""
        if e.offset != 0 or len(e.shape) != len(self.shape):
            return False
        for d, (i, size, stride) in enumerate(zip(idx, e.shape, e.strides)):
            if self.shape[d] == 1:
                continue
            if i != f"i{d}" or size != self.shape[d] or stride != self.inner[d]:
                return False
        return True

    def _const(self, e: Const, idx, mask):
        return _lit(e.value, reg_dtype(e.dtype) if e.dtype is not torch.bool else torch.bool)

    def _op(self, e: Op, idx, mask):
        op = e.op
        self.ops.add(op.name)
        T = _tl(e.compute)
        names, expr = [], op.expr
        for k, x in enumerate(e.operands):
            if k in op.bool_args:  # loaded as is (int1)
                names.append(self.value(x, self.broadcast(x, idx), mask))
            elif isinstance(x, Const) and x.weak:  # a Python scalar: straight to the computation dtype
                v = x.value
                if k == 1 and op.scalar_divisor and not isinstance(v, str) and e.compute.is_floating_point:
                    v = _recip64(v) if e.compute is torch.float64 else _recip32(v)
                    expr = "x0 * x1"  # torch's CUDA div by a scalar multiplies by its reciprocal
                names.append(_lit(v, e.compute))
            else:
                v = self.value(x, self.broadcast(x, idx), mask)
                names.append(self.retype(v, reg_dtype(x.dtype), e.compute))
        math_names = _MATH_INTERP if _INTERPRET else _MATH_GPU
        y = expr.format(one=f"tl.full([], 1, {T})", **math_names)
        y = _XVAR.sub(lambda m: f"({names[int(m.group(1))]})", y)
        if e.dtype is torch.bool and op.promotion == "bool":  # comparisons give int1
            return self.emit(y)
        return self.emit(self.retype(f"({y}).to({T})", e.compute, e.dtype))

    def _cast(self, e: Cast, idx, mask):
        self.ops.add("to_copy")
        x = self.value(e.x, idx, mask)
        out = self.cast(x, e.x.dtype, e.dtype)
        return x if out == x else self.emit(out)

    def _affine(self, e: Affine, idx, mask):
        sub = tuple(_add([_mul(idx[d], c) for d, c in terms] + [const]) for const, terms in e.index)
        return self.value(e.x, sub, mask)

    def _reshape(self, e: Reshape, idx, mask):
        self.ops.add("view")
        lin = _add([_mul(i, s) for i, s in zip(idx, e.out_strides)])
        if lin != "0" and lin not in self.block and not re.fullmatch(r"\w+", lin):
            lin = self.emit(lin)
        sub = []
        for j, (size, stride) in enumerate(zip(e.x.shape, e.in_strides)):
            if size == 1:
                sub.append("0")
                continue
            q = lin if stride == 1 else f"({lin} // {stride})"
            sub.append(q if j == 0 else f"({q} % {size})")
        return self.value(e.x, tuple(sub), mask)

    def _cat(self, e: Cat, idx, mask):
        self.ops.add("cat")
        d, i = e.dim, idx[e.dim]
        if _int(i) is not None and all(isinstance(o, int) for o in e.offsets):  # a known position
            k = max(j for j, o in enumerate(e.offsets) if o <= _int(i))
            sub = idx[:d] + (str(_int(i) - e.offsets[k]),) + idx[d + 1:]
            return self.cast(self.value(e.inputs[k], sub, mask), e.inputs[k].dtype, e.dtype)
        out = None
        for k in range(len(e.inputs) - 1, -1, -1):
            x, off = e.inputs[k], e.offsets[k]
            sub = idx[:d] + (_sub(i, off),) + idx[d + 1:]
            if k == len(e.inputs) - 1:
                out = self.cast(self.value(x, sub, self.and_mask(mask, f"{i} >= {off}")), x.dtype, e.dtype)
                continue
            cond = self.emit(f"{i} < {e.offsets[k + 1]}", prefix="c")
            v = self.cast(self.value(x, sub, self.and_mask(mask, cond)), x.dtype, e.dtype)
            out = self.emit(f"tl.where({cond}, {v}, {out})")
        return out

    def _pad(self, e: Pad, idx, mask):
        self.ops.add("constant_pad_nd")
        sub, conds = [], []
        for i, lo, size, out_size in zip(idx, e.lo, e.x.shape, e.shape):
            j = _sub(i, lo)
            sub.append("0" if size == 1 and lo == 0 else j)
            if lo == 0 and size == out_size:
                continue
            if _int(j) is not None and isinstance(size, int):  # a known position
                if not 0 <= _int(j) < size:
                    return _lit(e.value, reg_dtype(e.dtype))
                continue
            conds.append(f"({j} >= 0) & ({j} < {size})")  # a padded (or cropped) dim
        if not conds:
            return self.value(e.x, tuple(sub), mask)
        cond = self.emit(" & ".join(f"({c})" for c in conds), prefix="c")
        v = self.value(e.x, tuple(sub), self.and_mask(mask, *conds))
        return self.emit(f"tl.where({cond}, {v}, {_lit(e.value, reg_dtype(e.dtype))})")

    def _iota(self, e: Iota, idx, mask):
        self.ops.add("arange")
        r = reg_dtype(e.dtype)
        T = _tl(torch.float64 if r.is_floating_point else r)  # float aranges: start + i * step in fp64
        i = idx[0]
        code = _add([_mul(i if _int(i) is not None else f"{i}.to({T})", e.step), e.start])
        if _int(code) is not None:
            code = f"tl.full([], {code}, {T})"
        return self.emit(f"({code}).to({_tl(r)})")

    def _gather(self, e: Gather, idx, mask):
        self.ops.add("index")
        src = e.src
        pos = [j for j, t in enumerate(e.indices) if t is not None]
        first, k = pos[0], len(pos)
        b = len(e.shape) - (len(src.shape) - k)  # rank of the broadcast index shape
        bidx = idx[first:first + b]
        sub, conds = list(idx[:first]), []
        for j in pos:
            t = e.indices[j]
            tb = tuple(bidx[len(bidx) - len(t.shape):]) if t.shape else ()
            tb = tuple("0" if s == 1 else i for s, i in zip(t.shape, tb))
            v = self.value(t, tb, mask)
            size = src.shape[j]
            w = self.emit(f"tl.where({v} < 0, {v} + {size}, {v})")
            conds.append(f"({w} >= 0) & ({w} < {size})")
            sub.append(w)
        sub += list(idx[first + b:])
        # An index out of range is torch's error; here it reads nothing (never out of bounds).
        return self.value(src, tuple(sub), self.and_mask(mask, *conds))

    def _reduce(self, e: Reduce, idx, mask):
        self.ops.add(e.op)
        nd = len(e.x.shape)
        out_dims = [d for d in range(nd) if e.keepdim or d not in e.dims]  # x dims the result keeps
        base = dict(zip(out_dims, idx))
        acc, T = e.acc, _tl(e.acc)
        total = None
        for combo in itertools.product(*(range(e.x.shape[d]) for d in e.dims)):
            sub = dict(base)
            sub.update({d: str(k) for d, k in zip(e.dims, combo)})
            v = self.retype(self.value(e.x, tuple(sub[d] for d in range(nd)), mask), reg_dtype(e.x.dtype), acc)
            if total is None:
                total = v
            elif e.op == "sum":
                total = self.emit(f"{total} + {v}")
            else:
                total = self.emit(f"{'_maximum' if e.op == 'amax' else '_minimum'}({total}, {v})")
        if total is None:  # nothing to reduce over: the identity
            total = _lit(0, acc) if e.op == "sum" else _lit(float("-inf" if e.op == "amax" else "inf"), acc)
        if e.scale is not None:
            total = self.emit(f"{total} * {_lit(e.scale, acc)}")
        return self.emit(self.retype(f"({total}).to({T})", acc, e.dtype))

    def _scan(self, e: Scan, idx, mask):
        self.ops.add("cumsum")
        d, i = e.dim, idx[e.dim]
        T = _tl(e.acc)
        known = _int(i)  # a known position: its prefix only
        total = _lit(0, e.acc)
        for k in range(e.x.shape[d] if known is None else known + 1):
            sub = idx[:d] + (str(k),) + idx[d + 1:]
            v = self.retype(self.value(e.x, sub, mask), reg_dtype(e.x.dtype), e.acc)
            total = self.emit(f"{total} + {v}" if known is not None else
                              f"{total} + tl.where({k} <= {i}, {v}, {_lit(0, e.acc)})")
        return self.emit(self.retype(f"({total}).to({T})", e.acc, e.dtype))

    # ----------------------------------------------------------- kernel text
    def source(self, name: str, outputs, out_strides, n_inputs: int, int_params) -> str:
        head = ["pid = tl.program_id(0)" + (".to(tl.int64)" if self.index64 else ""),
                "offs = pid * BLOCK + tl.arange(0, BLOCK)", f"xmask = offs < {self.n}"]
        idx = []
        outer = next((d for d in self.order if self.shape[d] != 1), None)
        for d, size in enumerate(self.shape):
            if size == 1:
                idx.append("0")
                continue
            q = "offs" if self.inner[d] == 1 else f"(offs // {self.inner[d]})"
            head.append(f"i{d} = {q}" + ("" if d == outer else f" % {size}"))
            self.block.add(f"i{d}")
            idx.append(f"i{d}")
        idx = tuple(idx)
        for k, (out, strides) in enumerate(zip(outputs, out_strides)):
            v = self.value(out, idx, None)
            dst = "offs" if all(self.shape[d] == 1 or s == self.inner[d] for d, s in enumerate(strides)) else \
                _add([_mul(i, s) for i, s in zip(idx, strides)])
            ety = f"out{k}_ptr.dtype.element_ty"
            y = f"_downcast_interp({v}, {ety})" if _INTERPRET else f"({v}).to({ety})"
            self.lines.append(f"tl.store(out{k}_ptr + {dst}, tl.broadcast_to({y}, (BLOCK,)), mask=xmask)")
        params = [f"in{i}_ptr," for i in range(n_inputs)] + [f"out{k}_ptr," for k in range(len(outputs))]
        params += [f"{p}," for p in int_params] + ["BLOCK: tl.constexpr,"]
        text = [f"@_gems_jit", f"def {name}("] + [f"    {p}" for p in params] + ["):"]
        text += [f"    {line}" for line in head + self.lines]
        return "\n".join(text) + "\n"


# --------------------------------------------------------------------------- kernels and cache

_KERNELS: dict = {}
_LOCK = threading.Lock()
_NAMESPACE = {
    "triton": triton, "tl": tl, "libdevice": libdevice, "_gems_jit": jit, "_maximum": _maximum, "_minimum": _minimum,
    "_tanh_interp": _tanh_interp, "_pow_interp": _pow_interp, "_div_interp": _div_interp,
    "_upcast_interp": _upcast_interp, "_downcast_interp": _downcast_interp, "__name__": __name__ + "_generated",
}


@dataclasses.dataclass
class FusedKernel:
    """A generated kernel: its Triton source (int32 and int64 indexing) and launch signature.

    Launch: ``kernel(index64)[grid](*inputs, *outputs, *int_args, BLOCK=...)``; ``int_params``
    names the int arguments in order (the symbolic sizes the caller computes).

    Attributes:
        name: the kernel's name (the ops it fuses and a hash of its text).
        sources: index64 (bool) -> Triton source.
        n_inputs, n_outputs: pointer arguments.
        int_params: names of the int arguments.
        ops: the op names it computes (reports).
    """

    name: str
    sources: dict
    n_inputs: int
    n_outputs: int
    int_params: tuple
    ops: tuple

    def kernel(self, index64: bool = False):
        """The ``@jit`` function for this variant, compiled from its source once per process."""
        return _compile(self.name + ("_i64" if index64 else ""), self.sources[index64])


def _compile(name: str, src: str):
    fn = _KERNELS.get(src)
    if fn is not None:
        return fn
    with _LOCK:
        fn = _KERNELS.get(src)
        if fn is None:
            filename = f"<flag_gems.pointwise_fused {name}>"
            linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
            ns = dict(_NAMESPACE)
            exec(compile(src, filename, "exec"), ns)
            fn = _KERNELS[src] = ns[name]
    return fn


def fused_kernel(outputs, out_strides, shape, inner, order, n, n_inputs: int, int_params=(),
                 variants=(False,)) -> FusedKernel:
    """Generate the kernel computing ``outputs`` (IR) over the iteration space ``shape``.

    Args:
        outputs: IR nodes of ``shape``, stored in this order.
        out_strides: per output, its strides (Ints).
        shape: the iteration space (Ints).
        inner: per dim, the product of the sizes of the dims iterated inside it (the linear
            index's strides; any value for size-1 dims).
        order: dims, outermost first (the memory order of output 0).
        n: the number of elements (Int).
        n_inputs: pointer arguments for the inputs (``Load.slot`` < n_inputs).
        int_params: names of the int arguments that sizes, strides and constants use.
        variants: which indexings to generate: False (int32), True (int64).

    Returns:
        A :class:`FusedKernel` (its functions compile on first use, cached by source text).
    """
    sources, ops = {}, set()
    for index64 in variants:
        gen = _Codegen(tuple(shape), tuple(inner), tuple(order), n, index64)
        body = gen.source("KERNEL", outputs, out_strides, n_inputs, int_params)
        ops |= gen.ops
        sources[index64] = body
    label = "_".join(sorted(ops - {"load"}))[:48] or "copy"
    digest = hashlib.sha1("".join(sources[v] for v in variants).encode()).hexdigest()[:10]
    name = f"fused_{label}_{digest}"
    for index64 in variants:
        kname = name + ("_i64" if index64 else "")
        sources[index64] = f"# flag_gems fused pointwise kernel ({'int64' if index64 else 'int32'} indexing)\n" + \
            sources[index64].replace("def KERNEL(", f"def {kname}(")
    return FusedKernel(name, sources, n_inputs, len(outputs), tuple(int_params), tuple(sorted(ops - {"load"})))


def fused_kernel_cache_info() -> dict:
    """How many distinct generated kernel sources this process compiled (tests, reports)."""
    return {"kernels": len(_KERNELS)}
