"""The fusion passes as an Inductor post-grad custom pass, and our kernels inside Inductor's code.

Inductor users keep Inductor and add our fused kernels::

    torch.compile(model, options={"post_grad_custom_post_pass": flag_gems.inductor_pass})

or set ``torch._inductor.config.post_grad_custom_post_pass = flag_gems.inductor_pass``.
The pass runs the same matchers as the ``flag_gems`` backend on Inductor's post-grad
graphs (functional aten with ``prims.convert_element_type`` casts), then
:func:`inline_triton_kernels` turns each fused op into the ``triton_kernel_wrapper``
nodes of its kernels (``flag_gems.lowerings.inductor_ops``): Inductor compiles and
launches them from its own wrapper code, next to its own kernels, instead of calling an
opaque custom op. Before / after, in the post-grad graph::

    add_rms_norm = flag_gems.add_rms_norm.default(x, r, w, 1e-06, 0.0, True)
        ->  empty = aten.empty.memory_format(..); empty_1 = ..
            tkw = triton_kernel_wrapper_functional(kernel_idx=.., grid=[(n, 1, 1)], kwargs={..})

With the Triton interpreter (no GPU) kernels cannot be traced and the fused ops stay calls.
An op also stays a call, with its reason in the report, when tracing its launcher fails (the
reason names the error and the innermost frame it came from, ``file:line in function``), when
the trace holds an op Inductor cannot lower, or when its kernel may write two arguments that
share memory: slower, still right, and Inductor's compilation goes on.
The ``flag_gems`` backend's ``options={"inductor": True}`` fuses *before* autograd and hands
the rewritten graph to Inductor with :class:`InlineKernelsPass` chained after any
post-grad pass the user set, so forward and backward graphs launch our kernels the same way.

``uuid()`` hashes the source of every module whose code decides what these passes write
into a graph (the passes, the ops, the kernels: :func:`rewrite_sources`), so editing any of
them invalidates Inductor's FX-graph cache; it is stable across processes otherwise.

In training graphs the forward's intermediates are saved for the backward, so a matched
norm is still computed for its saved values; the pass pays off in inference graphs.
The backend's ``options={"inductor": True}`` does use the fused backward kernels.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import operator
import os
import traceback

import torch
from torch import fx

from .options import FUSIONS
from .passes import fuse_post_grad
from .passes.matching import symbolic_layout
from .report import GraphReport
from .signals import is_dynamo_signal

logger = logging.getLogger(__name__)

__all__ = ["GemsFusionPass", "InlineKernelsPass", "inductor_pass", "inline_triton_kernels", "rewrite_sources"]

try:
    from torch._inductor.custom_graph_pass import CustomGraphPass
except ImportError:  # pragma: no cover - very old torch
    CustomGraphPass = object

# Packages whose every module can change what the passes write into a graph, and single modules.
_SOURCE_PACKAGES = ("flag_gems.passes", "flag_gems.lowerings", "flag_gems.kernels")
_SOURCE_MODULES = ("flag_gems.inductor", "flag_gems.options", "flag_gems.signals")


def rewrite_sources() -> list:
    """The source files whose code affects the graphs these passes produce, sorted.

    Returns:
        Absolute paths: every ``.py`` file of ``flag_gems.passes``, ``flag_gems.lowerings``
        and ``flag_gems.kernels`` (matchers, ops, launchers, kernels: Inductor inlines the
        kernels' source), and the modules ``inductor``, ``options``, ``signals``.
    """
    files = set()
    for name in _SOURCE_PACKAGES:
        for folder in importlib.import_module(name).__path__:
            files.update(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".py"))
    for name in _SOURCE_MODULES:
        files.add(importlib.import_module(name).__file__)
    return sorted(os.path.abspath(f) for f in files)


_file_digests: dict = {}  # path -> ((mtime_ns, size), sha256 of the bytes)


def _file_digest(path: str) -> str:
    st = os.stat(path)
    stamp = (st.st_mtime_ns, st.st_size)
    cached = _file_digests.get(path)
    if cached is None or cached[0] != stamp:
        with open(path, "rb") as f:
            cached = _file_digests[path] = (stamp, hashlib.sha256(f.read()).hexdigest())
    return cached[1]


def source_digest(paths=None) -> str:
    """sha256 over the relative names and contents of ``paths`` (default: :func:`rewrite_sources`)."""
    paths = rewrite_sources() if paths is None else paths
    root = os.path.commonpath(paths) if paths else ""
    h = hashlib.sha256()
    for p in paths:
        h.update(os.path.relpath(p, root).encode() + b"\0" + _file_digest(p).encode() + b"\0")
    return h.hexdigest()


# ------------------------------------------------------------------ our kernels as Inductor's


def _tensor_slots(node: fx.Node):
    """(full positional args, indices of tensor args) of a call to a published op, or a reason."""
    schema = node.target._schema
    args = list(node.args)
    for a in schema.arguments[len(args):]:
        if a.name in node.kwargs:
            args.append(node.kwargs[a.name])
        elif a.has_default_value():
            args.append(a.default_value)
        else:
            return f"argument {a.name!r} missing"
    slots = []
    for i, a in enumerate(args):
        if isinstance(a, fx.Node):
            if not isinstance(a.meta.get("val"), torch.Tensor):
                return f"argument {schema.arguments[i].name!r} is a symbolic value"
            slots.append(i)
        elif isinstance(a, (list, tuple)) and any(isinstance(x, fx.Node) for x in a):
            return f"argument {schema.arguments[i].name!r} is a list of nodes"
    return args, slots


def _trace_key(target, args: list, slots: list, values: list):
    """What a twin's trace depends on: the op, the other arguments, each tensor's shape, strides,
    offset, dtype and device, and which tensor arguments share memory."""
    from .passes.matching import storages

    seen, share = {}, []
    for i, n in enumerate(slots):
        mine = storages(args[n]) or set()
        share.append(next((seen[s] for s in mine if s in seen), i))
        for s in mine:
            seen.setdefault(s, i)
    tensors = tuple(
        (repr(tuple(v.shape)), repr(v.stride()), repr(v.storage_offset()), v.dtype, str(v.device), group)
        for v, group in zip(values, share)
    )
    return target, tuple(repr(a) for i, a in enumerate(args) if i not in slots), tensors


def _inductor_decompositions() -> dict:
    """The decomposition table Inductor's AOT trace applies (``compile_fx``'s default)."""
    from torch._inductor.decomposition import select_decomp_table

    return select_decomp_table()


def _trace_twin(twin, args: list, slots: list, values: list) -> fx.GraphModule:
    """The functionalized graph of ``twin(*args)`` with the tensors at ``slots`` as inputs.

    Traced with Inductor's decompositions, as AOT autograd traces the graphs Inductor gets: the
    launcher's own tensor ops (``transpose`` of a layout change, a ``.to(dtype)``) come out as
    the ops Inductor lowers (``permute``, ``convert_element_type``). Inductor has no lowering
    for an op it decomposes, and fails (``both a fallback and a decomp for same op``) when it
    meets one in a post-grad graph.
    """
    from torch._guards import detect_fake_mode
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    def call(*tensors):
        full = list(args)
        for i, t in zip(slots, tensors):
            full[i] = t
        return twin(*full)

    fake_mode = detect_fake_mode(values)
    with fake_mode if fake_mode is not None else torch._subclasses.fake_tensor.FakeTensorMode():
        return make_fx(dispatch_functionalize(call), decomposition_table=_inductor_decompositions(),
                       tracing_mode="real")(*values)


def _unlowerable(sub: fx.GraphModule) -> str | None:
    """A reason when Inductor's graph lowering would reject a node of ``sub``, else None.

    Inductor lowers a post-grad node through its lowering table, or (``implicit_fallbacks``)
    calls an op without a lowering eagerly; an op it decomposes before lowering gets neither
    (``both a fallback and a decomp for same op``). The kernel nodes themselves are decomposed
    by Inductor's own post-grad passes, which run after ours.
    """
    from torch._higher_order_ops.triton_kernel_wrap import triton_kernel_wrapper_functional
    from torch._inductor import config, lowering

    decomps = _inductor_decompositions()
    allowed = getattr(lowering, "FALLBACK_ALLOW_LIST", ())
    for n in sub.graph.nodes:
        target = n.target
        if n.op != "call_function" or target is operator.getitem or target is triton_kernel_wrapper_functional:
            continue
        if not isinstance(target, torch._ops.OpOverload):
            return f"its launcher traced to {target}, which Inductor does not lower"
        if target in lowering.lowerings or target.name().split(".")[0] in allowed:
            continue
        if target in decomps or target in lowering.decompositions:
            return f"its launcher traced to {target}, which Inductor decomposes and has no lowering for"
        if not config.implicit_fallbacks:
            return f"its launcher traced to {target}, which Inductor has no lowering for (implicit_fallbacks off)"
    return None


def _aliased_writes(sub: fx.GraphModule) -> str | None:
    """A reason when a kernel in ``sub`` may write two arguments that share memory.

    The functional kernel node gives each argument the kernel may write its own copy, so
    two such arguments on one buffer (a launcher's dummy pointer for an unused output is
    an alias of a real one) would come back as two buffers, and the wrong one may be kept.
    Inductor's analysis of the kernel's code names only what it stores to (a store under a
    false constexpr is no store); where it cannot tell, it names every tensor argument.
    """
    from .passes.matching import storages

    for n in sub.graph.nodes:
        if n.op != "call_function" or "tensors_to_clone" not in n.kwargs:
            continue
        seen = {}
        for name in n.kwargs["tensors_to_clone"]:
            for s in storages(n.kwargs["kwargs"][name]) or ():
                if s in seen:
                    return f"kernel arguments {seen[s]!r} and {name!r} may be written and share memory"
                seen[s] = name
    return None


def _splice(gm: fx.GraphModule, node: fx.Node, sub: fx.GraphModule, inputs: list) -> None:
    """Copy ``sub``'s nodes in before ``node``, its placeholders bound to ``inputs``, and give
    ``node``'s users (or its ``getitem`` users, for a tuple) ``sub``'s outputs.

    The copies' example values are computed anew from ``inputs``' (one trace serves every layer;
    Inductor's reinplacing reads buffers' aliasing off these values).
    """
    from torch._guards import detect_fake_mode

    tuple_out = isinstance(node.meta.get("val"), (list, tuple))
    if tuple_out and any(u.target is not operator.getitem for u in node.users):
        raise RuntimeError("a tuple output is used other than through getitem")
    graph = gm.graph
    env, new = {}, []
    placeholders = iter(inputs)
    outputs = None
    with graph.inserting_before(node):
        for n in sub.graph.nodes:
            if n.op == "placeholder":
                env[n] = next(placeholders)
            elif n.op == "output":
                outputs = fx.map_arg(n.args[0], lambda a: env[a])
            else:
                env[n] = graph.node_copy(n, lambda a: env[a])
                new.append(env[n])
    fake_mode = detect_fake_mode([i.meta.get("val") for i in inputs])
    with fake_mode:
        for n in new:
            if n.op == "call_function":
                args, kwargs = fx.map_arg((n.args, n.kwargs), lambda a: a.meta.get("val"))
                n.meta["val"] = n.target(*args, **kwargs)
    if tuple_out:
        for user in list(node.users):
            user.replace_all_uses_with(outputs[user.args[1]])
            graph.erase_node(user)
    else:
        if isinstance(outputs, (list, tuple)):
            (outputs,) = outputs
        node.replace_all_uses_with(outputs)
    graph.erase_node(node)


def _short_path(path: str) -> str:
    """A source path from its package on (``torch/_ops.py``, ``gems_compile/inductor.py``)."""
    parts = os.path.normpath(path).split(os.sep)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in ("site-packages", "dist-packages"):
            return "/".join(parts[i + 1:])
    return "/".join(parts[-2:])


def _one_line(e: BaseException) -> str:
    message = str(e).strip()
    return f"{type(e).__name__}: {message.splitlines()[0]}" if message else type(e).__name__


def _failure(e: BaseException) -> str:
    """One line naming an exception and where it came from: the innermost frame of the original
    error (the end of its ``raise ... from`` chain) as ``file:line in function``."""
    root, seen = e, {id(e)}
    while root.__cause__ is not None and id(root.__cause__) not in seen:
        root = root.__cause__
        seen.add(id(root))
    text = _one_line(e) if root is e else f"{_one_line(e)}; from {_one_line(root)}"
    frames = traceback.extract_tb(root.__traceback__)
    if frames:
        text += f", at {_short_path(frames[-1].filename)}:{frames[-1].lineno} in {frames[-1].name}"
    return text


def inline_triton_kernels(gm: fx.GraphModule, report: GraphReport | None = None) -> int:
    """Replace each fused flag_gems op of a post-grad graph by its kernels' wrapper nodes.

    Args:
        gm: a functional post-autograd graph (what Inductor's post-grad passes see).
        report: where to record each rewrite (``lowered``: ``flag_gems.X -> inductor
            triton kernels``) and each op left as a call with its reason (``kept``).

    Returns:
        The number of ops rewritten. 0, with a note, when our kernels cannot be traced
        (the Triton interpreter).
    """
    from .lowerings.inductor_ops import NAMESPACE, has_twin, kernels_traceable, twin_of

    ops = [n for n in gm.graph.nodes if n.op == "call_function" and has_twin(n.target)]
    if not ops:
        return 0
    if not kernels_traceable():
        if report is not None:
            report.notes.append("fused ops stay calls: the Triton interpreter's kernels cannot be traced into Inductor")
        return 0
    count, traced = 0, {}
    for node in ops:
        name = f"flag_gems.{node.target._opname}"
        found = _tensor_slots(node)
        twin = twin_of(node.target)
        if isinstance(found, str):
            reason = found
        elif twin is None:  # _make_twin found no implementation (logged then)
            reason = f"no {NAMESPACE} twin is registered for it"
        elif any(symbolic_layout(found[0][i].meta["val"]) for i in found[1]):
            # Its launcher picks tiles and grids from the sizes in Python: traced here, that
            # would specialize the dims the caller marked dynamic (vLLM's token count).
            reason = "dynamic shapes: its launcher's size-dependent choices would specialize them"
        else:
            args, slots = found
            values = [args[i].meta["val"] for i in slots]
            try:
                key = _trace_key(node.target, args, slots, values)
                if key not in traced:  # decoder layers repeat one call: traced (and analyzed) once
                    sub = _trace_twin(twin, args, slots, values)
                    traced[key] = (sub, _unlowerable(sub) or _aliased_writes(sub))
                sub, reason = traced[key]
                if reason is None:
                    _splice(gm, node, sub, [args[i] for i in slots])
            except Exception as e:  # the op stays a call: slower, still right
                if is_dynamo_signal(e):
                    raise
                logger.debug("flag_gems: tracing the launcher of %s failed", name, exc_info=True)
                reason = f"tracing its launcher failed ({_failure(e)})"
        if reason is None:
            count += 1
            if report is not None:
                report.lower(name, "inductor triton kernels")
        else:
            logger.debug("flag_gems: %s stays a call: %s", name, reason)
            if report is not None:
                report.keep(name, f"stays a custom-op call in Inductor's code: {reason}")
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def _uuid(*parts) -> str:
    from . import __version__

    return hashlib.sha256(":".join(["flag_gems", __version__, source_digest(), *map(str, parts)]).encode()).hexdigest()


class GemsFusionPass(CustomGraphPass):
    """Inductor post-grad pass running flag_gems' pattern fusions.

    Args:
        fusions: the pattern families to run (default: all).
        inline_kernels: turn the fused ops into Triton kernels Inductor launches
            (:func:`inline_triton_kernels`); False keeps them as custom-op calls.

    Attributes:
        reports: one :class:`~flag_gems.report.GraphReport` per graph the pass saw.
    """

    def __init__(self, fusions=FUSIONS, inline_kernels: bool = True):
        self.fusions = tuple(fusions)
        self.inline_kernels = inline_kernels
        self.reports: list = []

    def __call__(self, graph: fx.Graph) -> None:
        gm = graph.owning_module
        report = GraphReport(len(self.reports), kind="inductor post-grad")
        self.reports.append(report)
        fuse_post_grad(gm, report, self.fusions)
        if self.inline_kernels:
            inline_triton_kernels(gm, report)
        logger.info("flag_gems inductor pass: %s", dict(report.fused) or "nothing fused")

    def uuid(self) -> str:
        """Stable across processes; changes with the fusions, the inlining and any rewrite source."""
        return _uuid(",".join(self.fusions), self.inline_kernels)


class InlineKernelsPass(CustomGraphPass):
    """Post-grad pass for the backend's ``options={"inductor": True}``: runs ``then`` (the
    user's own post-grad pass, if any) and :func:`inline_triton_kernels`.

    Args:
        report: where the rewrites are recorded.
        then: the post-grad custom pass that was configured (a callable, or None).
    """

    def __init__(self, report: GraphReport | None = None, then=None):
        self.report, self.then = report, then

    def __call__(self, graph: fx.Graph) -> None:
        if self.then is not None:
            self.then(graph)
        inline_triton_kernels(graph.owning_module, self.report)

    def uuid(self):
        if self.then is None:
            return _uuid("inline")
        inner = self.then.uuid() if hasattr(self.then, "uuid") else None
        return None if inner is None else _uuid("inline", inner)  # None: Inductor bypasses its cache


inductor_pass = GemsFusionPass()
