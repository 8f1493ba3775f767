"""Registry entries for pointwise aten overloads, all served by the generated kernels.

Each aten overload below maps to a :class:`~flag_gems.kernels.pointwise.PointwiseOp`
(``kernels/pointwise.py``). Per family, a *resolver* turns the overload's arguments into
``(op, operands)``: it picks the op variant from non-tensor arguments (``alpha``, gelu's
``approximate``, pow's exponent) and orders the operands. Every overload of a family then
gets, generated from its schema so they take exactly the overload's arguments:

- ``impl``: functional overloads allocate; in-place ones (``add_.Tensor``) write into
  ``self`` with its strides; ``out=`` ones write into ``out`` (resizing a 0-element one);
- ``supports``: the same resolution plus the op's metadata-only check (dtype, device,
  layout, overlap of ``self``/``out`` with the inputs, scalar ranges), so it runs on
  FakeTensors and never reads data.

``alpha`` (``add``/``sub``) is a kernel argument like any scalar (``self + alpha * other``,
as torch computes it); only the combinations torch rejects are refused. Anything the
kernels do not take (a float ``alpha`` with integer tensors, a bool ``alpha``, complex or
unsigned-16/32/64 dtypes, more than ``MAX_DIMS`` non-coalescable dims, CPU tensors outside
the interpreter, a partially overlapping or expanded in-place ``self``, scalars that overflow
the computation dtype, symbolic pow exponents...) is a ``supports`` reason, so callers
fall back to PyTorch; ``impl`` raises NotImplementedError for exactly those, before writing.

``_to_copy`` (``x.to(dtype)``, ``.float()``, a same-device copy) resolves to
:func:`~flag_gems.kernels.pointwise.cast_op` for its dtype and memory format; a device move,
a pinned or non-strided output, or an unsupported dtype is a reason. ``clone`` is the same cast
without a dtype; ``copy_`` casts ``src`` to ``self``'s dtype and writes it through ``self``'s
strides (``src`` broadcast to ``self``'s shape; another device, a partial overlap or a shape
that does not broadcast is a reason, and torch's own copy raises or copies); ``zero_`` is
``fill_(0)``. With the backward entries (``gelu_backward``, ``native_dropout_backward``, and
tanh/sigmoid/silu's) these serve the copies and backward ops of a training step
(``benchmarks/training_ops.py`` lists them per model).

Policies (``flag_gems.lowerings.registry``): every entry is on in the eager mode. Each family
is measured as the overloads in :data:`MEASURED_AS` (its in-place and ``out=`` forms run the same
kernel); those figures decide ``preset="fast"`` and, for the families in :data:`GRAPH_PROXY`, the
lowering in compiled graphs until graph-mode data exists.
"""

from __future__ import annotations

import logging

import torch

from ..kernels.pointwise import CAST_DTYPES, OPS, PointwiseOp, cast_op
from .registry import register

logger = logging.getLogger(__name__)

__all__ = ["GRAPH_PROXY", "MEASURED_AS", "OVERLOADS"]

aten = torch.ops.aten
_SYM = (torch.SymInt, torch.SymFloat, torch.SymBool)

# family -> the overloads whose benchmark rows stand for the whole family (bench_ops.py cases);
# a family without a row here is measured as each overload itself (today: not measured).
MEASURED_AS: dict[str, tuple] = {
    "add": (aten.add.Tensor,), "sub": (aten.sub.Tensor,), "mul": (aten.mul.Tensor, aten.mul.Scalar),
    "div": (aten.div.Tensor,), "neg": (aten.neg.default,), "exp": (aten.exp.default,),
    "rsqrt": (aten.rsqrt.default,), "silu": (aten.silu.default,), "gelu": (aten.gelu.default,),
    "tanh": (aten.tanh.default,), "sigmoid": (aten.sigmoid.default,), "pow": (aten.pow.Tensor_Scalar,),
    "to_copy": (aten._to_copy.default,), "where": (aten.where.self,), "masked_fill": (aten.masked_fill.Scalar,),
    "compare": (aten.eq.Scalar,),
}
# Families lowered in compiled graphs on their eager-call data until graph-mode data exists:
# masked_fill is one pass where the native kernel clones and then fills.
GRAPH_PROXY = frozenset({"masked_fill"})


# --------------------------------------------------------------------------- resolvers
# (aten arguments) -> (PointwiseOp, operands) or a reason string.


def _alpha_op(plain: PointwiseOp, scaled: PointwiseOp):
    def resolve(self, other, alpha=1):
        if alpha.__class__ is int and alpha == 1:
            return plain, (self, other)
        if isinstance(alpha, bool):
            return "bool alpha"
        if not isinstance(alpha, (int, float) + _SYM):
            return f"alpha of type {type(alpha).__name__}"
        if isinstance(alpha, (float, torch.SymFloat)) and not (_is_float(self) or _is_float(other)):
            return "a floating-point alpha with integral inputs"
        return scaled, (self, other, alpha)

    return resolve


def _is_float(x) -> bool:
    if isinstance(x, torch.Tensor):
        return x.dtype.is_floating_point
    return isinstance(x, (float, torch.SymFloat))


def _binary(op: PointwiseOp):
    def resolve(self, other):
        return op, (self, other)

    return resolve


def _unary(op: PointwiseOp):
    def resolve(self):
        return op, (self,)

    return resolve


def _gelu(self, approximate="none"):
    if approximate == "none":
        return OPS["gelu"], (self,)
    if approximate == "tanh":
        return OPS["gelu_tanh"], (self,)
    return f"gelu approximate={approximate!r}"


# pow(x, e) for the exponents torch's kernel computes without pow (exact results).
_POW_FORMS = {0: "pow_zero", 1: "pow_one", 2: "pow_square", 3: "pow_cube", 0.5: "pow_sqrt", -0.5: "pow_rsqrt",
              -1: "pow_reciprocal", -2: "pow_inv_square"}


def _pow(self, exponent):
    if isinstance(exponent, _SYM):
        return "a symbolic exponent (the kernel form depends on its value)"
    if not isinstance(exponent, (int, float)):
        return f"exponent of type {type(exponent).__name__}"
    form = _POW_FORMS.get(exponent)  # True/False hash as 1/0: torch also copies / fills for them
    return OPS[form or "pow"], (self, exponent)


def _where(condition, self, other):
    return OPS["where"], (condition, self, other)


def _masked_fill(self, mask, value):
    return OPS["masked_fill"], (self, mask, value)


def _fill(self, value):
    return OPS["fill"], (value,)


def _zero_(self):
    return OPS["fill"], (0,)


def _gelu_backward(grad_output, self, approximate="none"):
    if approximate == "none":
        return OPS["gelu_backward"], (grad_output, self)
    if approximate == "tanh":
        return OPS["gelu_tanh_backward"], (grad_output, self)
    return f"gelu_backward approximate={approximate!r}"


def _native_dropout_backward(grad_output, mask, scale):
    if isinstance(scale, bool) or not isinstance(scale, (int, float) + _SYM):
        return f"scale of type {type(scale).__name__}"
    if isinstance(grad_output, torch.Tensor) and isinstance(mask, torch.Tensor):
        # torch's result has grad_output's shape; a mask that would broadcast it larger is left to torch
        if _symbolic(grad_output, mask):
            return "symbolic sizes (the mask's shape cannot be compared without a guard)"
        if mask.shape != grad_output.shape:
            return f"mask shape {list(mask.shape)} differs from grad_output's {list(grad_output.shape)}"
    return OPS["native_dropout_backward"], (grad_output, mask, scale)


def _symbolic(*tensors) -> bool:
    return any(isinstance(s, torch.SymInt) for t in tensors for s in t.shape)


# Casts whose GPU rounding differs from torch's (see _to_copy): sources wider than fp32's
# 24-bit significand, to 16-bit floats.
_WIDE_SOURCES = (torch.int32, torch.int64, torch.float64)
_HALF_TARGETS = (torch.float16, torch.bfloat16)

# _to_copy's memory formats -> the cast op's output layout (None is preserve_format).
_FORMATS = (torch.preserve_format, torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


def _to_copy(self, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False, memory_format=None):
    # A dtype cast (or a plain copy) on self's device; moves, pinned or sparse outputs stay native.
    # Metadata only: runs on fake tensors, adds no guards.
    if not isinstance(self, torch.Tensor):
        return f"self of type {type(self).__name__} (expected a tensor)"
    if self.layout != torch.strided:
        return f"self has layout {self.layout} (expected torch.strided)"
    if layout is not None and layout != torch.strided:
        return f"layout={layout} (expected None or torch.strided)"
    if pin_memory:
        return "pin_memory=True (expected None or False)"
    if device is not None and not _same_device(torch.device(device), self.device):
        return f"device={device}: a copy to another device (expected None or {self.device})"
    if memory_format is not None and memory_format not in _FORMATS:
        return f"memory_format={memory_format} (expected None or one of {', '.join(map(str, _FORMATS))})"
    if self.dtype not in CAST_DTYPES:
        return f"self: dtype {self.dtype} is not supported"
    if dtype is not None and dtype not in CAST_DTYPES:
        return f"dtype={dtype} is not supported (expected None or one of {', '.join(map(str, CAST_DTYPES))})"
    if self.is_neg() or self.is_conj():
        return "self is a negative/conjugate view (its bit is not applied by the kernel)"
    target = self.dtype if dtype is None else dtype
    if self.device.type == "cuda" and self.dtype in _WIDE_SOURCES and target in _HALF_TARGETS:
        # torch rounds these through fp32 (twice); on the H100 Triton folded our fp32 hop into
        # one direct rounding (int64 16842753 -> bf16 gave 16908288, torch 2**24). Left to torch.
        return f"{self.dtype} -> {target} on CUDA rounds once in Triton, twice (through fp32) in torch"
    fmt = torch.preserve_format if memory_format is None else memory_format
    return cast_op(self.dtype if dtype is None else dtype, fmt), (self,)


def _clone(self, memory_format=None):
    # clone is _to_copy without a dtype: the same output layout rule (preserve_format: self's strides
    # when non-overlapping and dense, else a dense layout in its dim order).
    return _to_copy(self, memory_format=memory_format)


def _copy_(self, src, non_blocking=False):
    # src cast to self's dtype (as _to_copy casts), broadcast to self's shape, written through self's strides.
    if not isinstance(self, torch.Tensor) or not isinstance(src, torch.Tensor):
        return "self and src must be tensors"
    if self.layout != torch.strided:
        return f"self has layout {self.layout} (expected torch.strided)"
    if src.device != self.device:
        return f"src on {src.device}, self on {self.device}: a copy across devices"
    if self.is_neg() or self.is_conj():
        return "self is a negative/conjugate view (its bit is not applied by the kernel)"
    for name, t in (("self", self), ("src", src)):
        if t.dtype not in CAST_DTYPES:
            return f"{name}: dtype {t.dtype} is not supported"
    r = _to_copy(src, dtype=self.dtype)
    if r.__class__ is str:
        return r
    if _symbolic(self, src):
        return "symbolic sizes (an in-place copy plans with concrete shapes)"
    if src.shape != self.shape:
        try:
            src = src.expand(self.shape)
        except RuntimeError:
            return f"src shape {list(src.shape)} does not broadcast to self's {list(self.shape)}"
    return r[0], (src,)


def _same_device(device: torch.device, current: torch.device) -> bool:
    if device.type != current.type:
        return False
    if device.type != "cuda":
        return True  # the CPU (interpreter) has one device
    if device.index is None:  # "cuda" means the current device, as in torch's _to_copy
        return current.index == (torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return device.index == current.index


# family -> (resolver, overloads). Functional, in-place (name ends in "_") and out= forms.
_CMP = ("Tensor", "Scalar", "Tensor_out", "Scalar_out")
OVERLOADS: dict[str, tuple] = {
    "add": (_alpha_op(OPS["add"], OPS["add_alpha"]),
            [aten.add.Tensor, aten.add.Scalar, aten.add_.Tensor, aten.add_.Scalar, aten.add.out, aten.add.Scalar_out]),
    "sub": (_alpha_op(OPS["sub"], OPS["sub_alpha"]),
            [aten.sub.Tensor, aten.sub.Scalar, aten.sub_.Tensor, aten.sub_.Scalar, aten.sub.out, aten.sub.Scalar_out]),
    "mul": (_binary(OPS["mul"]),
            [aten.mul.Tensor, aten.mul.Scalar, aten.mul_.Tensor, aten.mul_.Scalar, aten.mul.out, aten.mul.Scalar_out]),
    "div": (_binary(OPS["div"]),
            [aten.div.Tensor, aten.div.Scalar, aten.div_.Tensor, aten.div_.Scalar, aten.div.out, aten.div.Scalar_out]),
    "pow": (_pow, [aten.pow.Tensor_Scalar, aten.pow_.Scalar, aten.pow.Tensor_Scalar_out]),
    "gelu": (_gelu, [aten.gelu.default, aten.gelu_.default, aten.gelu.out]),
    "maximum": (_binary(OPS["maximum"]), [aten.maximum.default, aten.maximum.out]),
    "minimum": (_binary(OPS["minimum"]), [aten.minimum.default, aten.minimum.out]),
    "compare": None,  # filled below: eq/ne/lt/le/gt/ge
    "where": (_where, [aten.where.self, aten.where.self_out]),
    "masked_fill": (_masked_fill, [aten.masked_fill.Scalar, aten.masked_fill_.Scalar, aten.masked_fill.Scalar_out]),
    "fill": (_fill, [aten.fill.Scalar, aten.fill_.Scalar, aten.fill.Scalar_out]),
    "to_copy": (_to_copy, [aten._to_copy.default]),
    "activation_backward": [
        (_binary(OPS["tanh_backward"]), [aten.tanh_backward.default]),
        (_binary(OPS["sigmoid_backward"]), [aten.sigmoid_backward.default]),
        (_binary(OPS["silu_backward"]), [aten.silu_backward.default]),
    ],
    "gelu_backward": (_gelu_backward, [aten.gelu_backward.default]),
    "dropout_backward": (_native_dropout_backward, [aten.native_dropout_backward.default]),
    "copy": [(_clone, [aten.clone.default]), (_copy_, [aten.copy_.default])],
    "zero": (_zero_, [aten.zero_.default]),
    "bitwise_and": (_binary(OPS["bitwise_and"]), [aten.bitwise_and.Tensor, aten.bitwise_and.Scalar, aten.bitwise_and_.Tensor,
                                                  aten.bitwise_and_.Scalar, aten.bitwise_and.Tensor_out,
                                                  aten.bitwise_and.Scalar_out]),
}
for _name in ("neg", "abs", "reciprocal", "exp", "log", "sqrt", "rsqrt", "sin", "cos", "tanh", "sigmoid", "silu"):
    OVERLOADS[_name] = (_unary(OPS[_name]), [getattr(aten, _name).default, getattr(aten, _name + "_").default,
                                             getattr(aten, _name).out])
OVERLOADS["compare"] = [
    (_binary(OPS[c]), [getattr(getattr(aten, c), o) for o in _CMP] + [getattr(aten, c + "_").Tensor, getattr(aten, c + "_").Scalar])
    for c in ("eq", "ne", "lt", "le", "gt", "ge")
]


# --------------------------------------------------------------------------- impl / supports


def _run(resolve, out, *args):
    r = resolve(*args)
    if r.__class__ is str:
        raise NotImplementedError(f"flag_gems pointwise: {r}")
    return r[0](*r[1], out=out)


def _check(resolve, out, *args):
    r = resolve(*args)
    if r.__class__ is str:
        return r
    return r[0].reason(*r[1], out=out)


def _run_fill(resolve, out, self, value):
    # fill.Scalar (functional): a new tensor like self, filled.
    return _run(resolve, torch.empty_like(self), self, value)


def _check_fill(resolve, out, self, value):
    # The new tensor has self's dtype, device and shape: check against self's metadata.
    return _check(resolve, self, self, value)


def _params(target) -> tuple[str, str, str | None]:
    """(parameter list, arguments to forward in order, name of the written tensor) of an overload."""
    params, forward, kw_only, written = [], [], False, None
    for a in target._schema.arguments:
        if a.kwarg_only and not kw_only:
            params.append("*")
            kw_only = True
        params.append(f"{a.name}={a.default_value!r}" if a.has_default_value() else a.name)
        if a.alias_info is not None and a.alias_info.is_write:
            written = a.name
        if a.name != "out":
            forward.append(a.name)
    return ", ".join(params), ", ".join(forward), written


def _make(target, resolve, runner, checker):
    """impl and supports for ``target`` with exactly its schema's parameters (generated source:
    plain positional forwarding, no argument binding at call time)."""
    params, forward, written = _params(target)
    out = written or "None"
    name = str(target).replace(".", "_")
    src = (
        f"def {name}({params}):\n    return _runner(_resolve, {out}, {forward})\n"
        f"def supports_{name}({params}):\n    return _check(_resolve, {out}, {forward})\n"
    )
    ns = {"_runner": runner, "_check": checker, "_resolve": resolve, "__name__": __name__}
    exec(compile(src, f"<flag_gems.lowerings.pointwise {name}>", "exec"), ns)
    impl, supports = ns[name], ns[f"supports_{name}"]
    globals()[name] = impl  # importable by qualified name (FX codegen, pickling of graphs)
    impl.__doc__ = (
        f"``{target._schema}`` on the generated pointwise kernels. Raises NotImplementedError "
        "exactly when ``supports`` gives a reason, before writing anything."
    )
    return impl, supports


def _register_all():
    count = 0
    for family, entry in OVERLOADS.items():
        groups = entry if isinstance(entry, list) else [entry]
        for resolve, targets in groups:
            for target in targets:
                fill = target is aten.fill.Scalar
                impl, supports = _make(target, resolve, _run_fill if fill else _run, _check_fill if fill else _check)
                kernel = f"flag_gems.pointwise.{target.__name__.split('.')[0].strip('_')}"
                register(target, kernel=kernel, supports=supports, checks_in_impl=True,
                         measured_as=MEASURED_AS.get(family), graph_proxy=family in GRAPH_PROXY)(impl)
                count += 1
    logger.debug("registered %d pointwise aten overloads", count)


_register_all()
