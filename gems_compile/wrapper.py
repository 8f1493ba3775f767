"""A compiled graph as one flat Python function that launches its kernels directly.

What ``_graph_compiler`` runs instead of ``GraphModule.forward`` (as Inductor's wrapper does
for its graphs). For each post-autograd graph it generates::

    def call(args):
        arg0_1, arg1_1, arg2_1 = args          # inputs unpacked once; the caller's list is
        args.clear()                           # emptied so dead inputs can be freed
        with _device_guard(0):
            view = arg1_1.view([8, 4096])      # views: Tensor methods (no dispatcher trip for the op lookup)
            mm = _aten_mm(view, arg2_1)        # other aten ops: the overload's C++ callable
            del view
            buf0 = _empty((8, 4096), (4096, 1), _c0, _c1)       # a fused kernel: allocation
            _k0_32.run(mm, buf0, grid=(32,), warmup=False, BLOCK=1024, num_warps=4)  # and launch
            del mm
            ...
        return (buf0,)

- fused pointwise kernels (``passes.pointwise_fusion``) are inlined: their outputs are
  allocated with the graph's strides and the kernel is launched through the fast launch
  path (``kernels._launch.FastKernel``), with the grid and every static argument as literals;
- flag_gems ops are called as the C++ runtime's wrappers when it serves the graph's device
  (``c_runtime.fast_ops``: no Python in the call), else as their Python implementations
  (``passes.direct_calls``);
- every other aten op through its ``OpOverload``'s C++ callable (``_op``), views through
  the equivalent Tensor method;
- a value is deleted right after its last use (``del``), inputs included (boxed calling
  convention: ``call(args)`` takes the list and clears it), so backward graphs free saved
  activations as they go;
- SymInt inputs are plain ints at run time: dynamic graphs run the same function.

The source is dumped as ``graph_NNN_wrapper.py`` (``graph_NNN_backward_wrapper.py``) under
``dump_dir``, with the generated Triton kernels at its end.
"""

from __future__ import annotations

import functools
import logging
import math
import operator

import torch
from torch import fx

from .kernels._common import _INTERPRETER_LOCK, interpreter_mode
from .passes import pointwise_fusion
from .passes.matching import is_view, symbolic_layout

logger = logging.getLogger(__name__)

__all__ = ["generate_wrapper"]

aten = torch.ops.aten

# aten views as Tensor methods: the same op, without the OpOverload call's Python frame.
_METHODS = {
    aten.view.default: "view", aten._unsafe_view.default: "view", aten.reshape.default: "reshape",
    aten.expand.default: "expand", aten.permute.default: "permute", aten.transpose.int: "transpose",
    aten.t.default: "t", aten.unsqueeze.default: "unsqueeze", aten.squeeze.dim: "squeeze",
    aten.squeeze.dims: "squeeze", aten.squeeze.default: "squeeze", aten.select.int: "select",
    aten.as_strided.default: "as_strided", aten.sym_size.int: "size", aten.sym_stride.int: "stride",
    aten.sym_numel.default: "numel", aten.sym_storage_offset.default: "storage_offset",
}
_BINARY = {operator.add: "+", operator.sub: "-", operator.mul: "*", operator.floordiv: "//", operator.mod: "%",
           operator.truediv: "/", operator.eq: "==", operator.ne: "!=", operator.lt: "<", operator.le: "<=",
           operator.gt: ">", operator.ge: ">=", operator.pow: "**"}
_GUARDS = getattr(torch._C._dynamo, "guards", None)
_EMPTY_CUDA = getattr(_GUARDS, "_empty_strided_cuda", None)
_REINTERPRET = getattr(_GUARDS, "_reinterpret_tensor", None)


class _Namespace:
    """Globals of the generated function, named by kind (``_aten_mm``, ``_c3``, ``_k0_32``)."""

    def __init__(self):
        self.globals = {"torch": torch, "math": math}
        self.by_id: dict = {}

    def add(self, obj, hint: str) -> str:
        key = id(obj)
        if isinstance(obj, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
            key = (type(obj), obj)  # equal constants share one name
        name = self.by_id.get(key)
        if name is None:
            base = "_" + "".join(c if c.isalnum() else "_" for c in hint).strip("_")
            name, k = base, 0
            while name in self.globals:
                k += 1
                name = f"{base}_{k}"
            self.globals[name] = obj
            self.by_id[key] = name
        return name

    def const(self, obj) -> str:
        """Python source for a constant argument."""
        if obj is None or isinstance(obj, (bool, int, str)):
            return repr(obj)
        if isinstance(obj, float):
            return repr(obj) if math.isfinite(obj) else self.add(obj, f"c_{obj}")
        if isinstance(obj, (list, tuple)):
            inner = ", ".join(self.const(x) for x in obj)
            return f"[{inner}]" if isinstance(obj, list) else f"({inner}{',' if len(obj) == 1 else ''})"
        return self.add(obj, "c")


def _device(gm) -> torch.device | None:
    """The device the graph's tensors live on: its CUDA device if it has one, else the first
    tensor's (None: no tensor)."""
    first = None
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        vs = v if isinstance(v, (list, tuple)) else [v]
        for x in vs:
            if isinstance(x, torch.Tensor):
                if x.device.type == "cuda":
                    return x.device
                first = first or x.device
    return first


def _static(v) -> bool:
    return isinstance(v, torch.Tensor) and not symbolic_layout(v)


def _collapsed_views(nodes, output) -> dict:
    """View nodes computed straight from the tensor their chain of views starts at, with the
    sizes and strides of their FX value (one ``reinterpret_tensor`` call for a chain of views,
    as Inductor's wrapper does): view -> base. Views whose users are all views are not computed
    at all. Static shapes only; outputs keep torch's own view ops (aliasing outputs replay them)."""
    if _REINTERPRET is None:
        return {}
    out_nodes = set(output.all_input_nodes)
    collapsed = {}
    for n in nodes:
        if not is_view(n) or n in out_nodes or not isinstance(n.args[0], fx.Node):
            continue
        base = n.args[0]
        while base in collapsed:
            base = collapsed[base]
        while is_view(base) and all(is_view(u) for u in base.users) and base not in out_nodes:
            base = base.args[0]
        if base is not n.args[0] or _static(n.meta.get("val")):
            if _static(n.meta.get("val")) and _static(base.meta.get("val")):
                collapsed[n] = base
    return collapsed


def generate_wrapper(gm: fx.GraphModule, name: str = "call") -> tuple[str, dict]:
    """The flat function for ``gm``'s graph: ``(source, globals)``; exec the source with the
    globals and call ``globals[name](args)``.

    Raises:
        NotImplementedError: a node the generator does not handle (the caller falls back).
    """
    ns = _Namespace()
    graph = gm.graph
    nodes = list(graph.nodes)
    output = next(n for n in reversed(nodes) if n.op == "output")
    collapsed = _collapsed_views(nodes, output)
    # Views only other (collapsed) views read are never computed.
    skipped = {n for n in collapsed if n.users and all(u in collapsed for u in n.users)}

    def inputs(n):
        if n in collapsed:
            return [collapsed[n]]
        return n.all_input_nodes

    last_use = {}
    for n in nodes:
        if n in skipped:
            continue
        for a in inputs(n):
            last_use[a] = n
    var = {}  # node -> Python name of its value (None: no value kept)
    inline_getitem = {}  # getitem node -> name already bound by the fused launch
    device = _device(gm)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    body: list[str] = []

    def fmt(a) -> str:
        if isinstance(a, fx.Node):
            return var[a]
        if isinstance(a, (list, tuple)):
            inner = ", ".join(fmt(x) for x in a)
            return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
        if isinstance(a, dict):
            return "{" + ", ".join(f"{k!r}: {fmt(v)}" for k, v in a.items()) + "}"
        return ns.const(a)

    def call_args(n) -> str:
        parts = [fmt(a) for a in n.args] + [f"{k}={fmt(v)}" for k, v in n.kwargs.items()]
        return ", ".join(parts)

    kernel_sources = []
    for n in nodes:
        if n.op == "placeholder":
            var[n] = n.name
            continue
        if n.op == "output":
            body.append(f"return {fmt(n.args[0])}")
            break
        if n in skipped:
            continue
        if n.op == "get_attr":
            obj = gm
            for part in n.target.split("."):
                obj = getattr(obj, part)
            var[n] = n.name
            body.append(f"{n.name} = {ns.add(obj, n.target)}")
        elif n.op != "call_function":
            raise NotImplementedError(f"{n.op} node {n.name}")
        elif n in inline_getitem:
            var[n] = inline_getitem[n]
            continue
        elif n in collapsed:
            v, b = n.meta["val"], collapsed[n].meta["val"]
            delta = v.storage_offset() - b.storage_offset()
            body.append(f"{n.name} = {ns.add(_REINTERPRET, 'reinterpret_tensor')}({var[collapsed[n]]}, "
                        f"{tuple(v.shape)!r}, {tuple(v.stride())!r}, {delta})")
            var[n] = n.name
        else:
            launch = getattr(n.target, "gems_launch", None)
            if launch is not None:
                body += _fused_lines(n, launch, var, ns, inline_getitem, device)
                kernel_sources += [src for src in launch.kernel.sources.values()]
            else:
                body.append(_call_line(n, ns, fmt, call_args, device))
                var[n] = n.name if n.users else None
        dead = [a for a in inputs(n) if last_use.get(a) is n and var.get(a)]
        if n.op == "call_function" and not n.users and var.get(n):
            dead.append(n)
        if dead:
            body.append("del " + ", ".join(sorted({var[a] for a in dead})))
    lines = [f"def {name}(args):"]
    if placeholders:
        lines.append(f"    {', '.join(p.name for p in placeholders)}, = args")
    lines.append("    args.clear()")
    unused = [p.name for p in placeholders if p not in last_use]
    if unused:
        lines.append(f"    del {', '.join(unused)}")
    if device is not None and device.type == "cuda":
        guard = ns.add(torch.cuda._DeviceGuard, "device_guard")
        lines.append(f"    with {guard}({device.index if device.index is not None else 0}):")
    elif interpreter_mode():
        lines.append(f"    with {ns.add(_INTERPRETER_LOCK, 'interpreter_lock')}:")
    else:
        lines.append("    if True:")
    lines += [f"        {line}" for line in body]
    src = "\n".join(lines) + "\n"
    if kernel_sources:
        src += "\n\n# Generated Triton kernels launched above:\n" + "\n".join(
            "# " + line for s in dict.fromkeys(kernel_sources) for line in s.splitlines())
        src += "\n"
    return src, ns.globals


@functools.lru_cache(maxsize=None)
def _ops_by_impl() -> dict:
    """Python implementation (what ``passes.direct_calls`` points nodes at) -> its flag_gems op."""
    from .passes.direct_calls import direct_impl

    out = {}
    for name in dir(torch.ops.flag_gems):
        packet = getattr(torch.ops.flag_gems, name, None)
        op = getattr(packet, "default", None)
        fn = direct_impl(op) if isinstance(op, torch._ops.OpOverload) else None
        if fn is not None:
            out[fn] = op
    return out


def _cpp_callable(t, device):
    """The C++ runtime's wrapper of a flag_gems op (called at the device's dispatch key, below
    the custom op's Python autograd layer), when the runtime serves that device; else None."""
    if device is None:
        return None
    try:
        from . import c_runtime
    except ImportError:
        return None
    fast = c_runtime.fast_ops(device.type) if getattr(c_runtime, "available", False) else None
    if fast is None:
        return None
    op = t if isinstance(t, torch._ops.OpOverload) and t.namespace == "flag_gems" else _ops_by_impl().get(t)
    return getattr(fast, op._opname, None) if op is not None and op._overloadname == "default" else None


def _call_line(n: fx.Node, ns: _Namespace, fmt, call_args, device=None) -> str:
    t = n.target
    lhs = f"{n.name} = " if n.users else ""
    cpp = _cpp_callable(t, device)
    if cpp is not None:  # positional: the wrapper takes the op's schema order
        op = t if isinstance(t, torch._ops.OpOverload) else _ops_by_impl()[t]
        if not n.kwargs:
            return f"{lhs}{ns.add(cpp, 'cpp_' + op._opname)}({', '.join(fmt(a) for a in n.args)})"
    if t is operator.getitem:
        return f"{lhs}{fmt(n.args[0])}[{fmt(n.args[1])}]"
    if t in _BINARY and len(n.args) == 2 and not n.kwargs:
        return f"{lhs}{fmt(n.args[0])} {_BINARY[t]} {fmt(n.args[1])}"
    method = _METHODS.get(t)
    if method is not None and not n.kwargs and n.args and isinstance(n.args[0], fx.Node):
        rest = list(n.args[1:])
        if len(rest) == 1 and isinstance(rest[0], (list, tuple)) and method in ("view", "reshape", "expand", "permute"):
            rest = list(rest[0])  # varargs: a list argument costs the Tensor method a conversion
        return f"{lhs}{fmt(n.args[0])}.{method}({', '.join(fmt(a) for a in rest)})"
    if isinstance(t, torch._ops.OpOverload):
        fn = getattr(t, "_op", t)
        return f"{lhs}{ns.add(fn, 'aten_' + str(t).replace('aten.', '').replace('.', '_') if t.namespace == 'aten' else str(t))}({call_args(n)})"
    if callable(t):
        return f"{lhs}{ns.add(t, getattr(t, '__name__', 'fn'))}({call_args(n)})"
    raise NotImplementedError(f"call_function target {t!r}")


def _fused_lines(n, launch, var, ns, inline_getitem, device) -> list[str]:
    """A fused kernel's launch, with its outputs bound to the names of the getitem nodes that read them."""
    k = len(launch.outputs)
    outs = [f"{n.name}_out{i}" for i in range(k)]
    for u in n.users:
        if u.target is operator.getitem and isinstance(u.args[1], int) and not u.kwargs:
            outs[u.args[1]] = u.name
            inline_getitem[u] = u.name
    if any(u not in inline_getitem for u in n.users):
        raise NotImplementedError(f"fused node {n.name} read other than by index")
    args = [var[a] if isinstance(a, fx.Node) else ns.const(a) for a in n.args]
    ins, syms = args[:launch.n_inputs], args[launch.n_inputs:]
    kern = launch.kernel
    k32 = ns.add(kern.kernel(False), f"k_{kern.name}_32") if False in kern.sources else "None"
    k64 = ns.add(kern.kernel(True), f"k_{kern.name}_64") if True in kern.sources else "None"
    fast_cuda = _EMPTY_CUDA is not None and pointwise_fusion.EMPTY_STRIDED is pointwise_fusion._empty_strided
    generic = ns.add(pointwise_fusion.EMPTY_STRIDED, "empty_strided")

    def empty(shape, stride, dtype, dev):
        if fast_cuda and device is not None and device.type == "cuda" and dev == device:  # under the device guard
            return f"{ns.add(_EMPTY_CUDA, 'empty_cuda')}({shape}, {stride}, {ns.const(dtype)})"
        return f"{generic}({shape}, {stride}, {ns.const(dtype)}, {ns.const(dev)})"

    ints, alloc, run = launch.lines(ins, syms, outs, k32, k64, empty,
                                    ns.add(pointwise_fusion.launch_config, "launch_config"), f"_{n.name}_")
    lines = ints + alloc + run
    unused = [o for i, o in enumerate(outs) if o == f"{n.name}_out{i}"]
    if unused:
        lines.append(f"del {', '.join(unused)}")
    for u in n.users:
        if not u.users:  # an output nobody reads
            lines.append(f"del {u.name}")
    return lines
