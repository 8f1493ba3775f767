"""Every pointwise op from one generator: N-ary, broadcasting, type promotion, any strides.

An op is a :class:`PointwiseOp`: a Triton expression over ``x0 .. x{n-1}`` (its operands,
already converted to the computation dtype) plus its type-promotion rule and the dtype
categories it accepts. ``OPS["add"](a, b)`` computes ``a + b`` for tensors and Python
scalars alike. A call:

1. **plans** from metadata only, cached by (dtypes, shapes, strides, devices, scalar types):
   torch's type promotion (``torch._prims_common.elementwise_dtypes``: 0-d tensors and
   scalars rank below dimensioned tensors), the broadcast shape, the output layout,
   the iteration order, dim coalescing, an access class per operand, 32- or 64-bit
   indexing, the block size;
2. **fetches the kernel** for the plan's signature, generating it on first use;
3. **allocates** the output (or takes ``out``, which in-place ops set to ``self``) and launches.

Output layout and iteration order follow TensorIterator: contiguous when every input is,
otherwise dims sorted by the inputs' strides (the first operand decides, broadcast dims
are skipped), so ``a.t() + b.t()`` is transposed like its inputs and a given ``out`` is
written in its own memory order. The kernel iterates the output's dims outermost to
innermost after dropping size-1 dims and merging dims that are contiguous with each other
in every operand. Each operand then has one access class::

    c  contiguous in iteration order: offset = linear index (loads vectorize)
    s  one element for the whole call (0-d tensor, or stride 0 everywhere): loaded once
    g  any strides: offset = sum(index_d * stride_d) over the unravelled index, d < MAX_DIMS

A call with no ``g`` operand (same-shape contiguous inputs, or any dense layout shared by
all operands) runs a flat loop with no index arithmetic. Programs over full blocks load and
store without a mask, so contiguous accesses vectorize to 16 bytes whatever the element
count (a mask on ``n`` allows that only when ``n % 16 == 0``, checked in the PTX for
sm_90); the last program is masked. (Deviation from TensorIterator:
strides of size-1 dims in an allocated output may differ; they address nothing.) Offsets are int32 unless the
element count or an operand's extent reaches 2**31 (64-bit division is several times
slower than 32-bit on GPUs).

Kernel signature, the cache key: (op, per operand: access class or scalar kind, output
access class, computation dtype, rank of the strided index space, 64-bit indexing).
Storage dtypes are not in it: loads convert to the computation dtype and the store
converts to the output pointer's element type, so one generated function serves
fp16/bf16/fp32 storage with fp32 math, and Triton's own cache specializes it per pointer
dtypes. Python scalars (and 0-d CPU tensors beside CUDA tensors) are kernel arguments,
never constants (``do_not_specialize``), so one kernel serves every value.

Host time: a call costs one dict lookup keyed by the operands' metadata (the plan holds
the output allocation parameters, the kernel's integer arguments, grid, block size and
the kernel itself), the output allocation and Triton's launch; no Triton helper
(``cdiv``, ``next_power_of_2``) runs per call. :meth:`PointwiseOp.reason` is the
metadata-only check (FakeTensors welcome); calling the op raises NotImplementedError
exactly when it would give a reason, before writing, so a caller may skip the check.

Codegen: Triton source text per signature, registered with ``linecache`` (Triton and its
interpreter read a kernel's source through ``inspect``) and exec'd into a namespace that
holds ``tl``, ``libdevice`` and the helpers below. Text rather than one ``@triton.jit``
closure over constexpr op ids, because the operand count, each operand's access class and
the rank change the kernel's parameter list, which one Triton function cannot express (no
variadic pointer arguments); the text is also what a Triton error shows, and
:func:`kernel_source` returns it for a given call.

Numerics (as torch's CUDA kernels): fp16/bf16 are computed in fp32, fp32/fp64/integers
natively, bool as int32; on the GPU the math functions are libdevice's (the CUDA math
library torch's kernels call: ``expf``, ``logf``, ``sinf``, ``tanhf``, ``erff``, ``powf``,
IEEE ``div_rn``/``sqrt_rn``), in the interpreter numpy's through ``tl`` (libdevice does
not run there); maximum/minimum propagate NaN; a division by a scalar multiplies by the
reciprocal computed in the computation dtype, as torch's CUDA ``div`` does for a CPU scalar.
In the interpreter, bf16 values convert through bit helpers (its own fp32 -> bf16 conversion
truncates and its bf16 -> fp32 one mishandles subnormals), so CPU runs round as the GPU does.

Casts (``aten._to_copy``): :func:`cast_op` gives ``OPS["to_copy"]`` with a result dtype and
an output memory format; its plan lays the output out as torch's ``_to_copy`` does (the
input's strides when it is non-overlapping and dense, else a dense layout in its dim order;
or contiguous / channels-last as asked), and the conversion is one Triton cast in the
result's opmath, which gives torch's values (see :func:`cast_op`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import linecache
import math
import struct
import threading

import torch
import triton
import triton.language as tl
from torch._prims_common import ELEMENTWISE_TYPE_PROMOTION_KIND, elementwise_dtypes
from triton.language.extra import libdevice

from . import _autotune as at
from ._common import device_guard, interpreter_mode
from ._launch import jit

__all__ = ["CAST_DTYPES", "MAX_DIMS", "OPS", "PointwiseOp", "cast_op", "kernel_cache_info", "kernel_source", "launch_config",
           "op_dtypes"]

# Most dims of a strided (class g) index space after coalescing; more -> a reason.
MAX_DIMS = 8

_TL_DTYPES = {
    torch.float16: "tl.float16",
    torch.bfloat16: "tl.bfloat16",
    torch.float32: "tl.float32",
    torch.float64: "tl.float64",
    torch.int8: "tl.int8",
    torch.int16: "tl.int16",
    torch.int32: "tl.int32",
    torch.int64: "tl.int64",
    torch.uint8: "tl.uint8",
    torch.bool: "tl.int1",
}
# Computation dtype for each result / common dtype (torch's opmath; bool arithmetic in int32).
_OPMATH = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.bool: torch.int32}
_INT_RANGE = {d: (torch.iinfo(d).min, torch.iinfo(d).max) for d in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)}
_FLOAT_MAX = {d: torch.finfo(d).max for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}
_SYM = (torch.SymInt, torch.SymFloat, torch.SymBool)
_INTERPRET = interpreter_mode()


def _category(dtype: torch.dtype) -> str:
    return "bool" if dtype is torch.bool else ("float" if dtype.is_floating_point else "int")


# --------------------------------------------------------------------------- launch heuristic


def launch_config(n: int) -> tuple[int, int]:
    """Elements per program (BLOCK) and warps for a pointwise kernel over ``n`` elements, tuned per
    element-count bucket and device kind (``TUNABLE`` at the end of this file). The heuristic:

    GPU: 1024 elements on 4 warps (8 per thread: two 16-byte fp32 vectors, one for fp16)
    for every size, so each signature compiles once. These are the values of Triton's
    vector-add tutorial. H100 sweep (benchmarks/NOTES.md, bf16 add at [M, 4096]): no other
    block/warp choice was more than 2 % faster at any M, within run-to-run spread, and the
    ops table has every unary/binary op at 0.99-1.00x native's device time at [4096, 4096].
    Interpreter: one program per up to 4096 elements, since each program costs a Python
    round trip while numpy handles a block at once.

    Returns:
        (BLOCK, num_warps)
    """
    # Plans cache the answer: one lookup per plan, not per call.
    key = tune_key(n)
    dev = at.current_device()
    cfg = TUNABLE.chosen.get((dev, key))
    return cfg if cfg is not None else TUNABLE.resolve(key, dev, {"n": n})


# --------------------------------------------------------------------------- device helpers


@triton.jit
def _maximum(a, b):
    # NaN in either operand gives NaN, as torch.maximum (tl.maximum alone may drop it).
    m = tl.maximum(a, b)
    m = tl.where(b != b, b, m)
    return tl.where(a != a, a, m)


@triton.jit
def _minimum(a, b):
    m = tl.minimum(a, b)
    m = tl.where(b != b, b, m)
    return tl.where(a != a, a, m)


@triton.jit
def _tanh_interp(x):
    # Interpreter only (libdevice does not run there): tanh from exp, in fp64.
    xd = x.to(tl.float64)
    e = tl.exp(-2.0 * tl.abs(xd))
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(xd < 0, -t, t)
    return tl.where(tl.abs(xd) < 1e-4, xd - xd * xd * xd / 3.0, t).to(x.dtype)  # series: no cancellation


@triton.jit
def _pow_interp(x, y):
    # Interpreter only: pow from exp/log in fp64, with C's rules for negative bases
    # (odd integral exponents keep the sign, non-integral ones give NaN unless x = -inf),
    # y == 0 and x == 1.
    xd = x.to(tl.float64)
    yd = y.to(tl.float64)
    r = tl.exp(yd * tl.log(tl.abs(xd)))
    y_int = tl.floor(yd) == yd
    y_odd = tl.floor(yd * 0.5) * 2.0 != yd
    signed = tl.where(y_int, tl.where(y_odd, -r, r), r)  # -inf ** y: sign of odd powers only
    r = tl.where(xd < 0, tl.where(xd == float("-inf"), signed, tl.where(y_int, signed, float("nan"))), r)
    r = tl.where(yd == 0, 1.0, r)
    r = tl.where(xd == 1, 1.0, r)
    return r.to(x.dtype)


@triton.jit
def _div_interp(a, b):
    return a / b  # numpy division: IEEE round to nearest


@triton.jit
def _upcast_interp(x, dtype: tl.constexpr):
    # Interpreter only: its bf16 -> fp32 conversion flushes subnormals wrongly. A bf16 is
    # the upper half of an fp32, so the bits shift exactly.
    if x.dtype == tl.bfloat16:
        x = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _downcast_interp(x, dtype: tl.constexpr):
    # Interpreter only: its fp32 -> bf16 conversion truncates. Round to nearest even on the
    # bits, as c10::BFloat16 and the GPU's cvt.rn.bf16.f32 do (overflow gives inf, NaN stays NaN).
    if dtype == tl.bfloat16:
        u = x.to(tl.float32).to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(x != x, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


# Math functions by backend: on the GPU libdevice (CUDA's math library, as torch's
# kernels), in the interpreter tl.* (numpy) and the fp64 helpers above.
_MATH_GPU = {
    "exp": "libdevice.exp", "log": "libdevice.log", "sin": "libdevice.sin", "cos": "libdevice.cos",
    "tanh": "libdevice.tanh", "erf": "libdevice.erf", "pow": "libdevice.pow", "rsqrt": "libdevice.rsqrt",
    "sqrt": "libdevice.sqrt_rn", "div": "libdevice.div_rn",
}
_MATH_INTERP = {
    "exp": "tl.exp", "log": "tl.log", "sin": "tl.sin", "cos": "tl.cos", "tanh": "_tanh_interp",
    "erf": "tl.erf", "pow": "_pow_interp", "rsqrt": "tl.rsqrt", "sqrt": "tl.sqrt", "div": "_div_interp",
}


# --------------------------------------------------------------------------- op description


@dataclasses.dataclass(frozen=True, eq=False)
class PointwiseOp:
    """One pointwise op: what the generated kernel computes and how dtypes are chosen.

    Attributes:
        name: identifier (kernel names and reports).
        arity: number of operands (tensors or Python scalars).
        expr: Triton expression over ``x0 .. x{arity-1}`` in the computation dtype. ``{exp}``,
            ``{div}``... name the math functions (libdevice on the GPU); ``{one}`` is 1 in
            the computation dtype.
        promotion: ``"default"`` (result = promoted dtype), ``"int_to_float"`` (integer
            results become the default float dtype), ``"bool"`` (comparisons: computed in the
            promoted dtype, result bool), ``"out"`` (result = ``out``'s dtype; no inputs promote)
            or ``"cast"`` (result = ``dtype``, or operand 0's dtype when None; computed in the
            result's opmath, so fp64 and integers reach fp16/bf16 through fp32 as in torch's
            casts; a bool result is computed in operand 0's opmath).
        accepts: dtype categories (``float``, ``int``, ``bool``) of the promoted dtype the op
            is defined on (torch raises on the others; we return a reason).
        promote: operands taking part in type promotion (None: all but ``bool_args``).
        bool_args: operands that must be bool (``where``'s condition, ``masked_fill``'s mask);
            loaded as is, never converted.
        checked_scalars: scalar operands cast to the result dtype with torch's overflow check
            (``fill_``'s and ``masked_fill``'s value).
        contiguous_out: the functional form returns a contiguous tensor (``masked_fill``).
        dtype: the result dtype of a ``"cast"`` op (None: operand 0's).
        out_format: the allocated output's layout from operand 0's (which has the result's
            shape), as ``torch._to_copy`` lays it out for this memory format:
            ``torch.preserve_format`` (operand 0's strides when it is non-overlapping and
            dense, else a dense layout in its dim order), ``contiguous_format``,
            ``channels_last`` (4-d) or ``channels_last_3d`` (5-d). None: TensorIterator's rule.
        scalar_divisor: operand 1 is a divisor; when it is a scalar the kernel computes
            ``x0 * x1`` with ``x1 = 1 / divisor`` rounded to the computation dtype (as
            torch's CUDA div does for a CPU scalar).
    """

    name: str
    arity: int
    expr: str
    promotion: str = "default"
    accepts: frozenset = frozenset({"float", "int", "bool"})
    promote: tuple | None = None
    bool_args: tuple = ()
    checked_scalars: tuple = ()
    contiguous_out: bool = False
    scalar_divisor: bool = False
    dtype: torch.dtype | None = None
    out_format: torch.memory_format | None = None

    def reason(self, *operands, out=None) -> str | None:
        """Why this op's kernel cannot take these operands (None when it can). Metadata only.

        Args:
            operands: tensors or Python numbers, ``arity`` of them.
            out: the output tensor for out= and in-place forms (in-place: ``self``).

        Returns:
            None, or a sentence saying what is not supported.
        """
        plan = _plan(self, operands, out)
        if plan.__class__ is str:
            return plan
        return plan.call_reason(operands, out) if plan.per_call_checks else None

    def __call__(self, *operands, out=None):
        """Run the op. Raises exactly when :meth:`reason` gives a reason, before writing anything,
        so a caller may skip :meth:`reason` and fall back on NotImplementedError.

        Args:
            operands: tensors or Python numbers, ``arity`` of them.
            out: write here (out= and in-place forms); a 0-element ``out`` is resized.

        Returns:
            ``out``, or a new tensor.

        Raises:
            NotImplementedError: the kernel cannot take these operands (the reason).
        """
        plan = _plan(self, operands, out)
        if plan.__class__ is not _Plan:
            if plan.__class__ is _Resize:  # a 0-element out= tensor takes the result's shape
                out.resize_(plan.shape)
                return self(*operands, out=out)
            raise NotImplementedError(f"pointwise {self.name}: {plan if plan.__class__ is str else 'symbolic sizes'}")
        if plan.per_call_checks:
            why = plan.call_reason(operands, out)
            if why is not None:
                raise NotImplementedError(f"pointwise {self.name}: {why}")
        return plan.run(operands, out)

    def __repr__(self):
        return f"PointwiseOp({self.name})"


def _op(name, arity, expr, **kw):
    return name, PointwiseOp(name, arity, expr, **kw)


_FI = frozenset({"float", "int"})
_F = frozenset({"float"})
_ONE_ARG_FLOAT = dict(promotion="int_to_float")

OPS: dict[str, PointwiseOp] = dict([
    _op("add", 2, "x0 + x1"),
    _op("add_alpha", 3, "x0 + x2 * x1", promote=(0, 1)),  # x2 = alpha
    _op("sub", 2, "x0 - x1", accepts=_FI),
    _op("sub_alpha", 3, "x0 - x2 * x1", promote=(0, 1), accepts=_FI),
    _op("mul", 2, "x0 * x1"),
    _op("div", 2, "{div}(x0, x1)", promotion="int_to_float", scalar_divisor=True),
    _op("neg", 1, "-x0", accepts=_FI),
    _op("abs", 1, "tl.abs(x0)", accepts=_FI),
    _op("reciprocal", 1, "{div}({one}, x0)", **_ONE_ARG_FLOAT),
    _op("exp", 1, "{exp}(x0)", **_ONE_ARG_FLOAT),
    _op("log", 1, "{log}(x0)", **_ONE_ARG_FLOAT),
    _op("sqrt", 1, "{sqrt}(x0)", **_ONE_ARG_FLOAT),
    _op("rsqrt", 1, "{rsqrt}(x0)", **_ONE_ARG_FLOAT),
    _op("sin", 1, "{sin}(x0)", **_ONE_ARG_FLOAT),
    _op("cos", 1, "{cos}(x0)", **_ONE_ARG_FLOAT),
    _op("tanh", 1, "{tanh}(x0)", **_ONE_ARG_FLOAT),
    _op("sigmoid", 1, "{div}({one}, {one} + {exp}(-x0))", **_ONE_ARG_FLOAT),
    _op("silu", 1, "{div}(x0, {one} + {exp}(-x0))", accepts=_F),
    # Activation backwards (training steps): x0 is the incoming gradient; x1 the forward's
    # output (tanh, sigmoid) or input (silu), as in torch's formulas.
    _op("tanh_backward", 2, "x0 * ({one} - x1 * x1)", accepts=_F),
    _op("sigmoid_backward", 2, "x0 * ({one} - x1) * x1", accepts=_F),
    _op("silu_backward", 2,
        "x0 * {div}({one}, {one} + {exp}(-x1)) * ({one} + x1 * ({one} - {div}({one}, {one} + {exp}(-x1))))",
        accepts=_F),
    # gelu's: x1 is the forward's input. Terms in the order of torch's CUDA kernel: grad * (cdf + x * pdf),
    # pdf = exp(-x^2 / 2) / sqrt(2 pi); tanh form: 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 k x^2), with
    # 3 * k multiplied in the computation dtype as torch's constexpr (fp32: one ulp below 0.134145).
    _op("gelu_backward", 2,
        "x0 * (0.5 * ({one} + {erf}(x1 * 0.7071067811865476)) + x1 * ({exp}(-0.5 * x1 * x1) * 0.3989422804014327))",
        accepts=_F),
    _op("gelu_tanh_backward", 2,
        "x0 * (0.5 * ({one} + _T) + 0.5 * x1 * ({one} - _T * _T) * (0.7978845608028654 * ({one} + {one} * 3.0 * 0.044715 * (x1 * x1))))"
        .replace("_T", "{tanh}(0.7978845608028654 * (x1 + 0.044715 * (x1 * x1 * x1)))"),
        accepts=_F),
    # native_dropout's: grad (x0) * bool mask (x1) * scale (x2, a scalar in the computation dtype), as torch's
    # (float)mask * grad * scale; a dropped NaN/inf gradient stays NaN (0 * inf), as in torch.
    _op("native_dropout_backward", 3, "x1.to(x0.dtype) * x0 * x2", bool_args=(1,), promote=(0,), accepts=_F),
    # Attention-mask construction (bool masks; integers too, as torch): bool is computed in int32.
    _op("bitwise_and", 2, "x0 & x1", accepts=frozenset({"int", "bool"})),
    # torch's gelu: x/2 * (1 + erf(x / sqrt(2))); tanh form with sqrt(2/pi) and 0.044715.
    _op("gelu", 1, "x0 * 0.5 * ({one} + {erf}(x0 * 0.7071067811865476))", accepts=_F),
    _op("gelu_tanh", 1, "0.5 * x0 * ({one} + {tanh}(0.7978845608028654 * (x0 + 0.044715 * (x0 * x0 * x0))))", accepts=_F),
    # pow(x, e): torch specializes these exponents (exact results); x1 (e) only promotes.
    _op("pow", 2, "{pow}(x0, x1)", accepts=_F),
    _op("pow_zero", 2, "{one}"),
    _op("pow_one", 2, "x0"),
    _op("pow_square", 2, "x0 * x0"),
    _op("pow_cube", 2, "x0 * x0 * x0"),
    _op("pow_sqrt", 2, "{sqrt}(x0)", accepts=_F),
    _op("pow_rsqrt", 2, "{rsqrt}(x0)", accepts=_F),
    _op("pow_reciprocal", 2, "{div}({one}, x0)", accepts=_F),
    _op("pow_inv_square", 2, "{div}({one}, x0 * x0)", accepts=_F),
    _op("maximum", 2, "_maximum(x0, x1)"),
    _op("minimum", 2, "_minimum(x0, x1)"),
    _op("eq", 2, "x0 == x1", promotion="bool"),
    _op("ne", 2, "x0 != x1", promotion="bool"),
    _op("lt", 2, "x0 < x1", promotion="bool"),
    _op("le", 2, "x0 <= x1", promotion="bool"),
    _op("gt", 2, "x0 > x1", promotion="bool"),
    _op("ge", 2, "x0 >= x1", promotion="bool"),
    _op("where", 3, "tl.where(x0, x1, x2)", bool_args=(0,), promote=(1, 2)),
    _op("masked_fill", 3, "tl.where(x1, x2, x0)", bool_args=(1,), promote=(0,), checked_scalars=(2,), contiguous_out=True),
    _op("fill", 1, "x0", promotion="out", promote=(), checked_scalars=(0,)),
    # A copy that keeps the dtype; cast_op() gives the variants with a result dtype and a layout.
    _op("to_copy", 1, "x0", promotion="cast", out_format=torch.preserve_format),
])

# Result dtypes of cast_op (the storage dtypes the kernels take).
CAST_DTYPES = tuple(_TL_DTYPES)
# Output layouts of cast_op, with the rank each requires (None: any).
_FORMAT_RANK = {torch.preserve_format: None, torch.contiguous_format: None, torch.channels_last: 4,
                torch.channels_last_3d: 5}
_CASTS: dict = {}


def cast_op(dtype: torch.dtype, memory_format: torch.memory_format = torch.preserve_format) -> PointwiseOp:
    """``OPS["to_copy"]`` to ``dtype`` with ``memory_format``'s output layout: ``torch._to_copy``.

    Values as torch's casts: floats to integers truncate toward zero (NaN, infinities and
    out-of-range values are undefined in torch too), anything to bool is ``x != 0`` (NaN is
    True), fp64 and integers reach fp16/bf16 through fp32 (torch rounds twice as well), other
    float narrowing rounds to nearest even. One op object per (dtype, format), so plans cache
    per pair; the generated kernels are shared (the result dtype is not in a kernel's signature).

    Args:
        dtype: the result dtype, one of :data:`CAST_DTYPES`.
        memory_format: ``torch.preserve_format``, ``contiguous_format``, ``channels_last`` or
            ``channels_last_3d`` (see ``PointwiseOp.out_format``).

    Returns:
        The PointwiseOp (arity 1).

    Raises:
        ValueError: an unsupported dtype or memory format.
    """
    op = _CASTS.get((dtype, memory_format))
    if op is None:
        if dtype not in _TL_DTYPES:
            raise ValueError(f"cast_op: dtype {dtype} is not supported (expected one of {list(CAST_DTYPES)})")
        if memory_format not in _FORMAT_RANK:
            raise ValueError(f"cast_op: memory_format {memory_format} is not supported (expected one of {list(_FORMAT_RANK)})")
        expr = "x0 != 0" if dtype is torch.bool else "x0"
        op = _CASTS.setdefault(
            (dtype, memory_format), dataclasses.replace(OPS["to_copy"], expr=expr, dtype=dtype, out_format=memory_format)
        )
    return op


# --------------------------------------------------------------------------- planning


class _Resize:
    """Plan marker: ``out`` has 0 elements and must first be resized to ``shape`` (torch's out= rule)."""

    per_call_checks = False

    def __init__(self, shape):
        self.shape = shape


class _Plan:
    """Everything about a call that depends only on metadata; run() allocates and launches."""

    __slots__ = (
        "shape", "out_strides", "dtype", "device", "n", "ptr_ops", "arg_kinds", "kernel_key", "int_args",
        "grid", "block", "warps", "scalar_checks", "int_range", "result_range", "per_call_checks", "_kernel",
    )

    def run(self, operands, out):
        if out is None:
            if self.out_strides is None:
                out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            else:
                out = torch.empty_strided(self.shape, self.out_strides, dtype=self.dtype, device=self.device)
        if self.n == 0:
            return out
        kernel = self._kernel
        if kernel is None:
            kernel = self._kernel = _get_kernel(self.kernel_key)
        if self.arg_kinds is None:  # every operand is a pointer
            args = [*operands, out, *self.int_args]
        else:
            args = []
            for v, (is_ptr, conv) in zip(operands, self.arg_kinds):
                if not is_ptr:
                    if isinstance(v, torch.Tensor):
                        v = v.item()  # a 0-d CPU tensor beside device tensors
                    if conv is not None:
                        v = conv(v)
                args.append(v)
            args.append(out)
            args += self.int_args
        with device_guard(out):
            kernel.run(*args, grid=self.grid, warmup=False, BLOCK=self.block, num_warps=self.warps)
        return out

    def call_reason(self, operands, out):
        """Checks a cached plan cannot make: scalar ranges (torch raises on overflow), and
        ``out`` partially overlapping an input (torch raises; full aliasing is fine)."""
        if out is not None:
            why = _overlap_reason(operands, out, self.ptr_ops)
            if why is not None:
                return why
        for i, checked in self.scalar_checks:
            v = operands[i]
            if isinstance(v, _SYM):  # its value is unknown here: refuse where it could overflow
                if checked or (self.int_range is not None and self.int_range[1] < 2**63 - 1):
                    return f"a symbolic scalar ({type(v).__name__}) that could overflow {self.dtype}"
                continue
            if not isinstance(v, (int, float)):
                continue  # a 0-d tensor
            if isinstance(v, int) and not isinstance(v, bool):
                if not -(2**63) <= v < 2**64:
                    return f"scalar {v} does not fit in 64 bits"
                if self.int_range is not None and not self.int_range[0] <= v <= self.int_range[1]:
                    return f"scalar {v} overflows the computation dtype"
            if checked and self.result_range is not None and math.isfinite(v) and not self.result_range[0] <= v <= self.result_range[1]:
                return f"value {v} overflows {self.dtype}"
        return None


_PLANS: dict = {}
_MAX_PLANS = 8192


def _plan(op: PointwiseOp, operands, out):
    if len(operands) != op.arity:
        return f"expected {op.arity} operands, got {len(operands)}"
    key = [op]
    for a in operands:
        if isinstance(a, torch.Tensor):
            key.append((a.dtype, a.shape, a.stride(), a.device))
        else:
            key.append(type(a))
    if out is not None:
        key.append((out.dtype, out.shape, out.stride(), out.device, out is operands[0]))
    try:
        key = tuple(key)
        plan = _PLANS.get(key)
    except TypeError:  # symbolic sizes (SymInt) are not hashable: plan without caching
        return _build(op, operands, out, symbolic=True)
    if plan is None:
        plan = _build(op, operands, out, symbolic=False)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _device_ok(device: torch.device) -> str | None:
    if device.type == "cuda" or (device.type == "cpu" and _INTERPRET):
        return None
    if device.type == "cpu":
        return "CPU tensors run only through Triton's interpreter (TRITON_INTERPRET=1)"
    return f"device {device} is not supported (CUDA only)"


def _build(op: PointwiseOp, operands, out, symbolic: bool):
    """Plan a call from its operands' metadata: a _Plan, a _Resize, or a reason string."""
    # --- operands: pointers (tensors) and kernel scalar arguments
    devices = set()
    for i, a in enumerate(operands):
        if isinstance(a, torch.Tensor):
            if a.dtype not in _TL_DTYPES:
                return f"operand {i}: dtype {a.dtype} is not supported"
            if a.dim() > 0 or a.device.type != "cpu":
                devices.add(a.device)
        elif not isinstance(a, (bool, int, float) + _SYM):
            return f"operand {i}: {type(a).__name__} is not a tensor or a real number"
    for i in op.bool_args:
        if not isinstance(operands[i], torch.Tensor) or operands[i].dtype is not torch.bool:
            return f"operand {i} must be a bool tensor"
    if out is not None:
        if out.dtype not in _TL_DTYPES:
            return f"out: dtype {out.dtype} is not supported"
        devices.add(out.device)
    if len(devices) > 1:
        return f"operands on several devices ({', '.join(sorted(map(str, devices)))})"
    device = devices.pop() if devices else torch.device("cpu")
    why = _device_ok(device)
    if why is not None:
        return why
    # 0-d CPU tensors beside device tensors are scalars (read at launch), as in torch.
    ptrs = [i for i, a in enumerate(operands) if isinstance(a, torch.Tensor) and a.device == device]

    # --- dtypes: result, and the computation dtype (torch's opmath)
    dtypes = _dtypes(op, operands, out)
    if dtypes.__class__ is str:
        return dtypes
    result, compute = dtypes
    if out is not None and not torch.can_cast(result, out.dtype):
        return f"result type {result} can't be cast to the output dtype {out.dtype}"
    if op.out_format is not None:
        if ptrs != [0] or op.arity != 1:
            return f"{op.name} takes one tensor on the kernel's device"
        rank = _FORMAT_RANK.get(op.out_format)
        if rank is not None and operands[0].dim() != rank:
            return f"memory_format={op.out_format} needs a {rank}-d tensor, got {operands[0].dim()}-d"

    if symbolic:
        # Dynamic shapes (compile backend): no layout analysis, hence no guards on sizes; the
        # rank bounds the coalesced rank. The launch plans again with concrete sizes.
        if out is not None:
            return "symbolic shapes with an output argument"
        nd = max([operands[i].dim() for i in ptrs] or [0])
        if nd > MAX_DIMS:
            return f"{nd} dims with symbolic sizes (at most {MAX_DIMS})"
        return _SYMBOLIC_OK

    # --- shape
    shapes = [tuple(operands[i].shape) for i in ptrs]
    if out is not None and not ptrs:
        shape = tuple(out.shape)
    else:
        try:
            shape = tuple(torch.broadcast_shapes(*shapes)) if shapes else ()
        except RuntimeError:
            return f"shapes {[list(s) for s in shapes]} do not broadcast"
    nd = len(shape)
    if out is not None and tuple(out.shape) != shape:
        if out.numel() == 0 and out is not operands[0]:
            return _Resize(shape)
        return f"out has shape {list(out.shape)}, the result has {list(shape)}"

    # --- strides in the broadcast shape (0 on broadcast dims); output layout; iteration order
    bstrides = []
    for i in ptrs:
        t = operands[i]
        pad = nd - t.dim()
        st = [0] * pad
        for k, (size, stride) in enumerate(zip(t.shape, t.stride())):
            st.append(0 if size == 1 and shape[pad + k] != 1 else stride)
        bstrides.append(st)
    alloc = None  # strides to allocate the output with (None: contiguous, or given)
    if out is not None:
        out_strides = list(out.stride())
        if _may_overlap(shape, out_strides):
            return "out has overlapping elements (expanded or strided onto itself)"
    elif op.out_format is not None:  # operand 0 has the result's shape (checked above)
        alloc = _format_strides(op.out_format, shape, tuple(operands[0].stride()))
        out_strides = _dense_strides(shape, range(nd)) if alloc is None else list(alloc)
    elif op.contiguous_out or all(operands[i].is_contiguous() and tuple(operands[i].shape) == shape for i in ptrs):
        out_strides = _dense_strides(shape, range(nd))
    else:
        out_strides = _dense_strides(shape, _iteration_order(shape, bstrides))
        alloc = tuple(out_strides)
    order = _iteration_order(shape, [out_strides] + bstrides)

    # --- coalesce (outermost first) and classify: column 0 is the output, then ptrs
    merged = []
    for d in order:
        size, st = shape[d], [out_strides[d]] + [s[d] for s in bstrides]
        if size == 1:
            continue
        if merged and all(ps == s * size for ps, s in zip(merged[-1][1], st)):
            merged[-1] = (merged[-1][0] * size, st)
        else:
            merged.append((size, st))
    sizes = [s for s, _ in merged] or [1]
    n = math.prod(shape)
    contig = [math.prod(sizes[k + 1:]) for k in range(len(sizes))]
    classes, strides = [], []
    for j in range(len(ptrs) + 1):
        st = [s[j] for _, s in merged] or [0]
        if st == contig or (j == 0 and not any(st)):
            cls = "c"
        elif not any(st):
            cls = "s"
        else:
            cls = "g"
        classes.append(cls)
        strides.append(st)
    rank = len(sizes) if "g" in classes else 0
    if rank > MAX_DIMS:
        return f"{rank} dims after coalescing (at most {MAX_DIMS})"
    block, warps = launch_config(n)
    extent = max([n] + [sum((sz - 1) * s for sz, s in zip(sizes, st)) + 1 for c, st in zip(classes, strides) if c == "g"])
    index64 = extent + block >= 2**31

    # --- kernel signature and arguments
    recip = op.scalar_divisor and 1 not in ptrs and compute.is_floating_point
    descs, scalar_ops = [], []
    for i in range(op.arity):
        if i in ptrs:
            descs.append(classes[1 + ptrs.index(i)])
            continue
        conv = None
        if recip and i == 1:
            conv = _recip64 if compute is torch.float64 else _recip32
        if i in op.bool_args:
            descs.append("sbool")
            conv = int
        elif compute is torch.float64:
            descs.append("f64")
            conv = _f64_bits if conv is None else (lambda v, _r=conv: _f64_bits(_r(v)))
        else:
            descs.append("scalar")
        scalar_ops.append((i, conv))
    int_args = [n]
    if rank:
        int_args += sizes[1:]
        for j, i in enumerate(ptrs):
            if classes[1 + j] == "g":
                int_args += strides[1 + j]
        if classes[0] == "g":
            int_args += strides[0]
    plan = _Plan()
    plan.shape, plan.out_strides, plan.dtype, plan.device, plan.n = shape, alloc, result, device, n
    plan.ptr_ops = tuple(ptrs)
    convs = dict(scalar_ops)
    plan.arg_kinds = None if len(ptrs) == op.arity else tuple((i in ptrs, convs.get(i)) for i in range(op.arity))
    expr = "x0 * x1" if recip else op.expr
    plan.kernel_key = (op.name, expr, tuple(descs), op.bool_args, classes[0], compute, rank, index64)
    plan.int_args = int_args
    plan.grid = ((n + block - 1) // block,)
    plan.block, plan.warps = block, warps
    plan._kernel = None
    plan.scalar_checks = tuple((i, i in op.checked_scalars) for i, _ in scalar_ops if i not in op.bool_args)
    plan.int_range = None if compute.is_floating_point else _INT_RANGE.get(compute)
    plan.result_range = _INT_RANGE.get(result) or ((-_FLOAT_MAX[result], _FLOAT_MAX[result]) if result in _FLOAT_MAX else None)
    plan.per_call_checks = bool(plan.scalar_checks) or out is not None
    return plan


def op_dtypes(op: "PointwiseOp", *operands) -> tuple[torch.dtype, torch.dtype] | str:
    """Result dtype and computation dtype of ``op(*operands)`` (torch's type promotion and opmath).

    Metadata only (FakeTensors and symbolic scalars welcome); what the fused-group generator
    (``kernels/pointwise_fused.py``) uses to type each op of a group as this module types a call.

    Args:
        operands: tensors or Python numbers, ``op.arity`` of them.

    Returns:
        ``(result, compute)``, or a reason string when the op is not defined for these dtypes.
    """
    if len(operands) != op.arity:
        return f"expected {op.arity} operands, got {len(operands)}"
    return _dtypes(op, operands, None)


def _dtypes(op, operands, out):
    """(result, compute) dtypes of a call, or a reason (see :func:`op_dtypes`)."""
    promote = op.promote if op.promote is not None else tuple(i for i in range(op.arity) if i not in op.bool_args)
    if op.promotion == "out":
        if out is None:
            return "the output dtype comes from out="
        common = result = out.dtype
    elif op.promotion == "cast":
        common = operands[0].dtype if isinstance(operands[0], torch.Tensor) else None
        result = common if op.dtype is None else op.dtype
    else:
        args = [operands[i] for i in promote]
        common = elementwise_dtypes(*args, type_promotion_kind=ELEMENTWISE_TYPE_PROMOTION_KIND.DEFAULT)[1]
        result = common
        if op.promotion == "int_to_float":
            result = elementwise_dtypes(*args, type_promotion_kind=ELEMENTWISE_TYPE_PROMOTION_KIND.INT_TO_FLOAT)[1]
        elif op.promotion == "bool":
            result = torch.bool
    if common is None:
        return "operand 0 must be a tensor"
    for d in (common, result):
        if d not in _TL_DTYPES:
            return f"dtype {d} is not supported"
    if _category(common) not in op.accepts:
        return f"{op.name} is not defined for {common}"
    if op.promotion == "cast":
        base = common if result is torch.bool else result  # a bool result is x != 0 in the input's dtype
    else:
        base = result if op.promotion == "int_to_float" else common
    return result, _OPMATH.get(base, base)


class _SymbolicOk:
    """Plan stand-in for symbolic shapes: the op is supported; impls plan again at launch."""

    per_call_checks = False


_SYMBOLIC_OK = _SymbolicOk()


def _iteration_order(shape, strides_list) -> list:
    """Dims outermost to innermost, sorted as TensorIterator's reorder_dimensions does.

    The first operand whose strides differ on two dims decides their order (a broadcast
    dim, stride 0, leaves the decision to the next operand); equal strides put the
    smaller dim inside. An insertion sort that keeps undecided pairs in place.
    """
    nd = len(shape)
    perm = list(range(nd - 1, -1, -1))  # innermost first

    def should_swap(d0, d1):
        for st in strides_list:
            s0, s1 = st[d0], st[d1]
            if s0 == 0 or s1 == 0:
                continue
            if s0 != s1:
                return -1 if s0 < s1 else 1
            if shape[d0] > shape[d1]:
                return 1
        return 0

    for i in range(1, nd):
        dim1 = i
        for dim0 in range(i - 1, -1, -1):
            c = should_swap(perm[dim0], perm[dim1])
            if c > 0:
                perm[dim0], perm[dim1] = perm[dim1], perm[dim0]
                dim1 = dim0
            elif c < 0:
                break
    return perm[::-1]


def _format_strides(memory_format, shape, strides) -> tuple | None:
    """Strides of ``torch._to_copy``'s output for an input of this shape and strides (None:
    contiguous, as ``torch.empty`` lays it out).

    preserve_format: the input's own strides when it is non-overlapping and dense, else
    ATen's ``infer_dense_strides`` (TensorIterator's dim order: stride-0 dims keep their
    place, size-0/1 dims add no extent); channels_last(_3d): c10's channels-last strides.
    """
    if memory_format == torch.preserve_format:
        if _non_overlapping_and_dense(shape, strides):
            return None if strides == _contiguous_strides(shape) else strides
        out, step = [0] * len(shape), 1
        for d in reversed(_iteration_order(shape, [strides])):  # innermost first
            out[d] = step
            step *= max(shape[d], 1)
        out = tuple(out)
        return None if out == _contiguous_strides(shape) else out
    if memory_format == torch.channels_last:
        n, c, h, w = shape
        return (h * w * c, 1, w * c, c)
    if memory_format == torch.channels_last_3d:
        n, c, d, h, w = shape
        return (d * h * w * c, 1, h * w * c, w * c, c)
    return None  # contiguous_format


def _non_overlapping_and_dense(shape, strides) -> bool:
    """c10's is_non_overlapping_and_dense: an empty tensor, or one whose dims of size > 1,
    sorted by stride, are contiguous."""
    if 0 in shape:
        return True
    step = 1
    for stride, size in sorted((st, sz) for sz, st in zip(shape, strides) if sz > 1):
        if stride != step:
            return False
        step *= size
    return True


def _contiguous_strides(shape) -> tuple:
    """``torch.empty(shape).stride()``."""
    out, step = [0] * len(shape), 1
    for d in range(len(shape) - 1, -1, -1):
        out[d] = step
        step *= max(shape[d], 1)
    return tuple(out)


def _dense_strides(shape, order) -> list:
    """Strides of a dense tensor whose dims, outermost first, are ``order``."""
    strides = [0] * len(shape)
    step = 1
    for d in reversed(list(order)):
        strides[d] = step
        step *= shape[d]
    return strides


def _may_overlap(shape, strides) -> bool:
    """Whether two elements may share memory (conservative: True unless provably disjoint)."""
    dims = sorted((s, n) for n, s in zip(shape, strides) if n > 1)
    reach = 0  # largest offset reachable with the smaller-stride dims
    for s, n in dims:
        if s <= reach:
            return True
        reach += (n - 1) * s
    return False


def _overlap_reason(operands, out, ptr_ops) -> str | None:
    """Reason when ``out`` partially overlaps an input (torch raises; eager falls back)."""
    for i in ptr_ops:
        t = operands[i]
        if t is out or not torch._C._is_alias_of(t, out):
            continue
        if t.storage_offset() == out.storage_offset() and t.stride() == out.stride() and t.shape == out.shape and t.dtype.itemsize == out.dtype.itemsize:
            continue  # the same elements: each is read before it is written, by one thread
        lo_t, hi_t = _byte_range(t)
        lo_o, hi_o = _byte_range(out)
        if lo_t < hi_o and lo_o < hi_t:
            return f"out partially overlaps operand {i}"
    return None


def _byte_range(t):
    start = t.storage_offset() * t.dtype.itemsize
    extent = sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1 if t.numel() else 0
    return start, start + extent * t.dtype.itemsize


def _f32(x: float) -> float:
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def _recip32(v) -> float:
    """1 / v in fp32 (v rounded to fp32 first), as torch's CUDA div by a CPU scalar."""
    b = _f32(float(v))
    if b == 0:
        return math.copysign(math.inf, b) if not math.isnan(b) else b
    return _f32(1.0 / b)


def _recip64(v) -> float:
    b = float(v)
    return math.copysign(math.inf, b) if b == 0 else 1.0 / b


def _f64_bits(v) -> int:
    """A float64 scalar as its bit pattern (Triton passes Python floats as fp32)."""
    return struct.unpack("q", struct.pack("d", float(v)))[0]


# --------------------------------------------------------------------------- codegen

_KERNELS: dict = {}
_KERNELS_LOCK = threading.Lock()
_NAMESPACE = {
    "triton": triton, "tl": tl, "libdevice": libdevice, "_gems_jit": jit, "_maximum": _maximum, "_minimum": _minimum,
    "_tanh_interp": _tanh_interp, "_pow_interp": _pow_interp, "_div_interp": _div_interp,
    "_upcast_interp": _upcast_interp, "_downcast_interp": _downcast_interp,
    "__name__": __name__ + "_generated",
}


def _source(name: str, key) -> str:
    """Triton source of the kernel for signature ``key`` (see the module docstring)."""
    op_name, expr, descs, bool_args, out_cls, compute, rank, index64 = key
    T = _TL_DTYPES[compute]
    params, body, dns = [], [], []
    for i, d in enumerate(descs):
        if d in ("c", "s", "g"):
            params.append(f"in{i}_ptr,  # operand {i}: {'contiguous' if d == 'c' else 'one element' if d == 's' else 'strided'}")
        else:
            params.append(f"s{i},  # operand {i}: scalar")
            dns.append(f"s{i}")
    params.append(f"out_ptr,  # output: {'contiguous' if out_cls == 'c' else 'strided'}")
    params.append("n,  # elements")
    if rank > 1:
        params.append(" ".join(f"size{d}," for d in range(1, rank)) + "  # sizes of dims 1.. (dim 0 follows from n)")
    for i, d in enumerate(descs):
        if d == "g":
            params.append(" ".join(f"stride{i}_{k}," for k in range(rank)) + f"  # strides of operand {i}")
    if out_cls == "g":
        params.append(" ".join(f"stride_out_{k}," for k in range(rank)) + "  # strides of the output")
    params.append("BLOCK: tl.constexpr,")

    body.append("pid = tl.program_id(0)" + (".to(tl.int64)" if index64 else ""))
    body.append("offs = pid * BLOCK + tl.arange(0, BLOCK)")
    if rank:
        body.append("rest = offs")
        for d in range(rank - 1, 0, -1):
            body.append(f"i{d} = rest % size{d}")
            body.append(f"rest = rest // size{d}")
        body.append("i0 = rest")

    def strided(prefix):
        return "(" + " + ".join(f"i{d} * {prefix}{d}" for d in range(rank)) + ")"

    def load(i, addr):
        """Load operand i, converted to the computation dtype (bool operands as they are)."""
        if i in bool_args:
            return f"tl.load({addr})"
        if _INTERPRET:  # the interpreter's bf16 -> fp32 conversion loses subnormals
            return f"_upcast_interp(tl.load({addr}), {T})"
        return f"tl.load({addr}).to({T})"

    for i, d in enumerate(descs):  # scalars and one-element operands: once, outside the branches
        if d == "s":
            body.append(f"x{i} = {load(i, f'in{i}_ptr')}")
        elif d == "sbool":
            body.append(f"x{i} = s{i} != 0")
        elif d == "f64":
            body.append(f"x{i} = tl.cast(tl.cast(s{i}, tl.int64), tl.float64, bitcast=True)")
        elif d == "scalar":
            body.append(f"x{i} = tl.cast(s{i}, {T})")
    math_names = _MATH_INTERP if _INTERPRET else _MATH_GPU
    y = expr.format(one=f"tl.full([], 1, {T})", **math_names)
    dst = "offs" if out_cls == "c" else strided("stride_out_")

    def tile(masked: bool) -> list:
        m = ", mask=mask, other=0" if masked else ""
        lines = []
        for i, d in enumerate(descs):
            if d == "c":
                lines.append(f"x{i} = {load(i, f'in{i}_ptr + offs{m}')}")
            elif d == "g":
                addr = f"in{i}_ptr + {strided(f'stride{i}_')}{m}"
                lines.append(f"x{i} = {load(i, addr)}")
        # Through the computation dtype (a no-op except for comparisons' int1, which the
        # interpreter cannot cast to bf16 directly), then to the output's (in the interpreter
        # through a helper: its fp32 -> bf16 conversion truncates instead of rounding).
        if _INTERPRET:
            lines.append(f"y = _downcast_interp(({y}).to({T}), out_ptr.dtype.element_ty)")
        else:
            lines.append(f"y = ({y}).to({T}).to(out_ptr.dtype.element_ty)")
        lines.append(f"tl.store(out_ptr + {dst}, tl.broadcast_to(y, (BLOCK,)){', mask=mask' if masked else ''})")
        return lines

    # Full blocks without a mask: their loads and stores vectorize whatever n is (a mask
    # on n allows 16-byte accesses only when n % 16 == 0); the last block is masked.
    body.append("if pid * BLOCK + BLOCK <= n:")
    body += [f"    {line}" for line in tile(False)]
    body.append("else:")
    body.append("    mask = offs < n")
    body += [f"    {line}" for line in tile(True)]

    deco = f"@_gems_jit(do_not_specialize={dns!r})" if dns else "@_gems_jit"
    lines = [f"# flag_gems pointwise {op_name}: {key!r}", deco, f"def {name}("]
    lines += [f"    {p}" for p in params]
    lines.append("):")
    lines += [f"    {b}" for b in body]
    return "\n".join(lines) + "\n"


def _get_kernel(key):
    kernel = _KERNELS.get(key)
    if kernel is not None:
        return kernel
    with _KERNELS_LOCK:
        kernel = _KERNELS.get(key)
        if kernel is None:
            name = f"pointwise_{key[0]}_{hashlib.sha1(repr(key).encode()).hexdigest()[:12]}"
            src = _source(name, key)
            filename = f"<flag_gems.pointwise {name}>"
            linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
            exec(compile(src, filename, "exec"), _NAMESPACE)
            kernel = _KERNELS[key] = _NAMESPACE[name]
    return kernel


def kernel_cache_info() -> dict:
    """Sizes of the caches: generated kernels and metadata plans (tests, reports)."""
    return {"kernels": len(_KERNELS), "plans": len(_PLANS)}


def kernel_source(op: PointwiseOp, *operands, out=None) -> str:
    """The generated Triton source that ``op(*operands, out=out)`` runs (debugging, docs).

    Raises:
        NotImplementedError: the kernel cannot take these operands.
    """
    plan = _plan(op, operands, out)
    if plan.__class__ is not _Plan:
        raise NotImplementedError(f"pointwise {op.name}: {plan if isinstance(plan, str) else 'no kernel for this call'}")
    name = f"pointwise_{plan.kernel_key[0]}_{hashlib.sha1(repr(plan.kernel_key).encode()).hexdigest()[:12]}"
    return _source(name, plan.kernel_key)


# --------------------------------------------------------------------------- autotuning

_N_BUCKET_CAP = 1 << 28


def tune_key(n: int) -> tuple:
    """The autotuning key of a pointwise launch over ``n`` elements: (n bucket,)."""
    return (at.pow2_bucket(n, _N_BUCKET_CAP),)


def _tune_default(key, dev) -> dict:
    if _INTERPRET:
        return {"BLOCK": max(16, min(4096, key[0])), "num_warps": 1}
    return {"BLOCK": 1024, "num_warps": 4}


def _tune_candidates(key, dev) -> list:
    """512-8192 elements per program on 2-16 warps (4-64 elements per thread); the interpreter gets one."""
    if dev < 0:
        return [{"BLOCK": max(16, min(4096, key[0]) // 2), "num_warps": 1}]
    out = [{"BLOCK": b, "num_warps": w} for b in (512, 1024, 2048, 4096, 8192) for w in (2, 4, 8, 16)
           if 4 <= b // (32 * w) <= 64]
    return at.near_first(_tune_default(key, dev), out)


def _tune_bench(key, dev, dims):
    """A bf16 ``add`` of two contiguous vectors of the bucket's size (plans are built per run, so the
    forced config is the one launched)."""
    n = (dims or {}).get("n", key[0])
    device = at.torch_device(dev)
    a = torch.randn(n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, device=device, dtype=torch.bfloat16)
    out = torch.empty_like(a)
    op = OPS["add"]
    return lambda: _build(op, (a, b), out, symbolic=False).run((a, b), out)


TUNABLE = at.register(at.Tunable(
    "pointwise",
    fields=("BLOCK", "num_warps"),
    key_fields=("n_bucket",),
    default=_tune_default,
    candidates=_tune_candidates,
    make_bench=_tune_bench,
    sources=(_source,),
))
