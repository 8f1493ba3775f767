"""The ``flag_gems`` torch.compile backend.

Pipeline, per graph Dynamo hands over::

    Dynamo FX graph (torch IR)
      -> pre-dispatch aten graph          make_fx(pre_dispatch=True) in Dynamo's fake mode:
                                          aten ops, above autograd, not yet decomposed
      -> fusion passes                    RMSNorm (+ residual add), SiLU/GELU * mul, RoPE,
                                          rewritten into torch.ops.flag_gems.* functional ops
      -> aot_autograd                     functionalization; forward + backward graphs whose
                                          fused ops' backward is our backward kernels
      -> pointwise fusion                 the remaining pointwise / indexing aten ops grouped into
                                          generated Triton kernels (forward, backward, inference)
      -> aten lowering + report           per-node decisions (flag_gems.lowerings registry), kernel counts
      -> executable                       one generated flat function per graph (flag_gems.wrapper),
                                          optionally CUDA-graph replayed; or Inductor

Fusing *before* autograd is what lets training use the fused backward kernels: AOT
traces through our ops' autograd formulas instead of through the decomposed math.

A pass that raises, or a graph the tracing cannot handle, falls back to the unmodified
graph with one warning (``options={"strict": True}`` raises instead). Dynamo's own
control-flow exceptions (a restart of the analysis, ``SkipFrame``: ``signals.py``) are
never taken for failures: they propagate to Dynamo.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import warnings

import torch
from torch import fx

from . import graph_precompile
from .aot import precompiling, serializable_graph
from .kernels._autotune import enter_policy, exit_policy
from .kernels._common import warn_once
from .kernels._precompile import join_warm
from .options import CompileOptions
from .passes import FUSION_PASSES, OPTION_PASSES
from .report import CompileReport, GraphReport, count_layers, dump_graph, dump_report, dump_text
from .signals import is_dynamo_signal

logger = logging.getLogger(__name__)

__all__ = ["flag_gems_backend", "GemsCompiler", "explain"]

# Decompositions applied while AOT autograd traces. Deliberately small: every entry splits
# one native kernel into several launches, which only pays where a pass fuses the pieces
# again. Today none does, so the table only holds ops whose native kernel is a composite of
# small launches anyway.
DECOMPOSITIONS: dict = {}

_graph_ids = itertools.count()
_sinks = threading.local()


def _warn_once(key: str, msg: str, *args) -> None:
    logger.debug(msg, *args)
    warn_once(("backend", key), msg % args, RuntimeWarning, stacklevel=3)


def _record_sink():
    return getattr(_sinks, "stack", None)


def _forget(report, sink) -> None:
    """Drop the report of a compile Dynamo abandoned (a restart): the retried compile reports anew."""
    if sink and report in sink[-1].graphs:
        sink[-1].graphs.remove(report)


def _fake_inputs(example_inputs):
    """Example inputs as fake tensors of Dynamo's fake mode (symbolic sizes kept)."""
    from torch._guards import TracingContext, detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensor

    fake_mode = detect_fake_mode(example_inputs)
    if fake_mode is None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        fake_mode = FakeTensorMode()
    tc = TracingContext.try_get()
    out = []
    with fake_mode:
        for x in example_inputs:
            if isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor):
                ctx = tc.tensor_to_context.get(x) if tc is not None else None
                src = getattr(ctx, "tensor_source", None)
                x = fake_mode.from_tensor(x, symbolic_context=ctx, source=src, trace=ctx is None)
            out.append(x)
    return fake_mode, out


def trace_pre_dispatch(gm: fx.GraphModule, example_inputs) -> fx.GraphModule:
    """Trace a Dynamo graph into a pre-dispatch aten graph (above autograd, undecomposed).

    Args:
        gm: the graph Dynamo hands to the backend.
        example_inputs: its example inputs (real tensors, SymInts).

    Returns:
        A GraphModule with the same inputs and outputs, whose nodes are aten ops with
        ``meta["val"]`` fake values.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    # `param.data` (vLLM's layers pass `self.weight.data`) reaches Dynamo's graph as
    # `_get_data_attr`, which make_fx does not track: the traced graph would hold a fake
    # constant. `detach` is the same value (no history) and is traced.
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch._C._autograd._get_data_attr:
            node.target = torch.ops.aten.detach.default
    gm.recompile()
    fake_mode, fakes = _fake_inputs(example_inputs)
    with fake_mode:
        aten_gm = make_fx(gm, pre_dispatch=True, tracing_mode="real")(*fakes)
    _carry_dynamo_metadata(gm, aten_gm)
    return aten_gm


def _carry_dynamo_metadata(src: fx.GraphModule, dst: fx.GraphModule) -> None:
    """Give the retraced graph what AOT autograd reads off a Dynamo graph.

    AOT autograd takes a graph for Dynamo's only with ``meta["dynamo_compile_id"]``,
    ``_param_name_to_source`` and each placeholder's ``_dynamo_source``; from them it
    lists the static inputs (parameters, buffers, ``mark_static_address`` tensors such as
    a static KV cache) that CUDA graphs read in place. A retraced graph without them has
    no static inputs: Inductor's CUDA graphs then copied every weight into its graph
    buffers before each replay (issue 11: ``options={"inductor": True, "cudagraphs": True}``
    decode 1.94 ms against 0.81), and skip graphs that update a static cache in place.
    The placeholders are the same inputs in the same order, so the metadata is copied
    by position; nothing is copied when that does not hold.
    """
    src_ph, dst_ph = list(src.graph.find_nodes(op="placeholder")), list(dst.graph.find_nodes(op="placeholder"))
    names = getattr(src, "_param_name_to_source", None)
    if len(src_ph) != len(dst_ph) or "dynamo_compile_id" not in src.meta or names is None:
        return
    own = [n for n, _ in dst.named_parameters(remove_duplicate=False)] + [n for n, _ in dst.named_buffers(remove_duplicate=False)]
    if any(n not in names for n in own):  # AOT autograd would look these up by name
        return
    for a, b in zip(src_ph, dst_ph):
        if hasattr(a, "_dynamo_source"):
            b._dynamo_source = a._dynamo_source
        if "tensor_dict" in a.meta:
            b.meta["tensor_dict"] = a.meta["tensor_dict"]
    dst._param_name_to_source = names
    for key, value in src.meta.items():
        dst.meta.setdefault(key, value)


class _CompiledGraph:
    """A boxed compiled graph as the backend returns it: run under the backend's autotune policy
    (``options["autotune"]``), its first call timed into the graph's report."""

    _boxed_call = True

    def __init__(self, fn, policy: str, report: GraphReport, kind: str):
        self.fn, self.policy = fn, policy
        self.gems_source = getattr(fn, "gems_source", None)
        self._first_call = (report, f"{kind} first call")

    def __call__(self, args):
        previous = enter_policy(self.policy)
        try:
            if self._first_call is None:
                return self.fn(args)
            report, stage = self._first_call
            self._first_call = None
            join_warm()  # the first run's own compiles start from the warmed process, never beside it
            while report.at_first_call:
                report.at_first_call.pop(0)()
            with report.timed(stage):
                return self.fn(args)
        finally:
            exit_policy(previous)


def _with_first_call_actions(fn, report: GraphReport):
    """``fn`` running ``report.at_first_call`` once before its first call (for callables that are not
    a :class:`_CompiledGraph`, which runs them itself: Inductor's, with ``options={"inductor": True}``)."""
    if not report.at_first_call:
        return fn

    def call(*args, **kwargs):
        while report.at_first_call:
            report.at_first_call.pop(0)()
        return fn(*args, **kwargs)

    call._boxed_call = getattr(fn, "_boxed_call", False)
    return call


class GemsCompiler:
    """A configured instance of the backend (what ``torch.compile`` calls per graph).

    Args:
        options: the backend's options.
    """

    def __init__(self, options: CompileOptions | None = None):
        self.options = options or CompileOptions()

    # -------------------------------------------------------------- dumps
    def _dump(self, report: GraphReport, stage: str, gm) -> None:
        if self.options.dump_dir:
            dump_graph(self.options.dump_dir, report.graph_id, stage, gm)

    def _finish(self, report: GraphReport) -> None:
        if self.options.dump_dir:
            dump_report(self.options.dump_dir, report)

    # -------------------------------------------------------------- stages
    def fuse(self, gm: fx.GraphModule, example_inputs, report: GraphReport) -> fx.GraphModule:
        """Trace to aten and run the fusion passes; the unmodified graph on failure (not strict)."""
        try:
            with report.timed("pre-dispatch trace"):
                aten_gm = trace_pre_dispatch(gm, example_inputs)
            self._dump(report, "aten", aten_gm)
            with report.timed("fusions"):
                for name in self.options.fusions:
                    fn = FUSION_PASSES.get(name)
                    if fn is None:
                        report.notes.append(f"fusion {name!r} is not available in this build")
                        continue
                    fn(aten_gm, report)
                for name, fn in OPTION_PASSES.items():
                    if getattr(self.options, name):
                        fn(aten_gm, example_inputs, report)
            aten_gm.graph.lint()
            aten_gm.recompile()
            self._dump(report, "fused", aten_gm)
            return aten_gm
        except Exception as e:
            if self.options.strict or is_dynamo_signal(e):
                raise
            report.fallback = f"{type(e).__name__}: {e}"
            _warn_once(f"fuse:{type(e).__name__}:{e}", "flag_gems: graph passes failed (%s); running the unmodified graph", report.fallback)
            return gm

    def _optional_pass(self, report: GraphReport, what: str, run) -> None:
        """Run a pass the graph is correct without: strict raises its error, otherwise it is noted and skipped."""
        try:
            run()
        except Exception as e:
            if self.options.strict or is_dynamo_signal(e):
                raise
            report.notes.append(f"{what} skipped: {type(e).__name__}: {e}")

    def _graph_compiler(self, report: GraphReport, kind: str):
        from functorch.compile import make_boxed_func

        from .passes.direct_calls import direct_calls
        from .passes.lower_aten import lower_aten
        from .passes.noop_clones import drop_noop_clones
        from .passes.outer_products import rewrite_outer_products
        from .passes.pointwise_fusion import count_kernels, fuse_pointwise

        def drop_clones(gm, report):
            n = drop_noop_clones(gm)
            if n:
                report.notes.append(f"{n} clones of intermediates already in their layout dropped ({kind} graph)")

        def outer_products(gm, report):
            n = rewrite_outer_products(gm)
            if n:
                report.notes.append(f"{n} GEMMs with a contraction of 1 rewritten as products, for the pointwise "
                                    f"fusion ({kind} graph)")

        def compile_graph(gm: fx.GraphModule, example_inputs):
            report.kind = kind if report.kind == "dynamo" else f"{report.kind}+{kind}"
            saved = precompiling()  # an ahead-of-time artifact keeps registered ops only (aot.py)
            if saved and (self.options.fuse_pointwise or self.options.lower_aten):
                report.notes.append("pointwise fusion and aten lowering off: their nodes call Python functions, "
                                    "which an ahead-of-time artifact cannot save")
            with report.timed(f"{kind} passes"):
                before = count_kernels(gm)
                self._optional_pass(report, f"no-op clone removal on the {kind} graph", lambda: drop_clones(gm, report))
                if self.options.fuse_pointwise and not saved:
                    self._optional_pass(report, f"outer-product rewrite on the {kind} graph",
                                        lambda: outer_products(gm, report))
                    self._optional_pass(report, f"pointwise fusion on the {kind} graph",
                                        lambda: fuse_pointwise(gm, report, kind, strict=self.options.strict))
                if self.options.lower_aten and not saved:
                    self._optional_pass(report, f"aten lowering on the {kind} graph",
                                        lambda: lower_aten(gm, report, everything=self.options.lower_aten == "all",
                                                           cudagraphs=(self.options.cudagraphs and kind == "inference")
                                                           or self.options.lower_aten == "device"))
                report.count_kernels(kind, before, count_kernels(gm))
            self._dump(report, kind, gm)
            if saved:  # the graph is saved, ops by name (aot.py)
                report.notes.append(f"{kind} graph saved for ahead-of-time compilation (no direct calls, no CUDA graphs)")
                self._finish(report)
                return serializable_graph(gm)
            with report.timed(f"{kind} wrapper"):
                # Skipped, the dispatcher calls stay: slower, still right.
                self._optional_pass(report, f"direct calls on the {kind} graph", lambda: direct_calls(gm))
                fn = self._wrapper(gm, report, kind) if self.options.wrapper else None
                if fn is None:
                    fn = make_boxed_func(gm.forward)
            # The first run's Triton kernels, compiled in worker processes (graph_precompile.py)
            if self.options.precompile and graph_precompile.precompile_applies(gm):
                def precompile():
                    with report.timed(f"{kind} precompile"):
                        result = graph_precompile.precompile_graph(gm, self.options.graph_autotune)
                    report.notes.append(result.note(kind))

                self._optional_pass(report, f"precompile of the {kind} graph's kernels", precompile)
            fn = _CompiledGraph(fn, self.options.graph_autotune, report, kind)
            if self.options.cudagraphs and kind == "inference":
                fn = self._cudagraphs(gm, fn, report)
            self._finish(report)
            return fn

        return compile_graph

    def _wrapper(self, gm, report, kind):
        """The graph as one generated flat function (boxed), or None after a note (strict: raises)."""
        from .wrapper import generate_wrapper

        try:
            src, namespace = generate_wrapper(gm)
            filename = f"<flag_gems wrapper graph {report.graph_id} {kind}>"
            import linecache

            linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
            exec(compile(src, filename, "exec"), namespace)
        except Exception as e:
            if self.options.strict:
                raise
            report.notes.append(f"flat wrapper off for the {kind} graph ({type(e).__name__}: {e}); "
                                "running the FX graph's forward")
            return None
        if self.options.dump_dir:
            stage = "backward_wrapper" if kind == "backward" else "wrapper"
            dump_text(self.options.dump_dir, report.graph_id, stage, src)
        fn = namespace["call"]
        fn._boxed_call = True
        fn.gems_source = src
        return fn

    def _cudagraphs(self, gm, fn, report):
        from .cudagraphs import CUDAGraphRunner, cuda_graphs_available

        if not cuda_graphs_available():  # warned once: runs without CUDA graphs
            report.notes.append("CUDA graphs off: no CUDA device")
            return fn
        tc = torch._guards.TracingContext.try_get()
        meta = getattr(tc, "fw_metadata", None) if tc is not None else None
        static = getattr(meta, "static_input_indices", None)
        if static is None:
            report.notes.append("CUDA graphs off: AOT autograd did not report the static inputs")
            return fn
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        index = {n: i for i, n in enumerate(placeholders)}
        mutated = sorted(
            {index[n.args[0]] for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.copy_.default and n.args[0] in index}
        )
        report.notes.append(f"CUDA graphs on ({len(static)} static inputs, {len(mutated)} mutated inputs)")
        return CUDAGraphRunner(fn, static, mutated)

    def _inductor(self, gm: fx.GraphModule, example_inputs, report: GraphReport):
        """Hand the rewritten graph to Inductor, which launches our fused ops' kernels itself.

        A post-grad pass (:class:`~flag_gems.inductor.InlineKernelsPass`, after any post-grad
        pass the user configured) turns the fused ops of the forward and backward graphs into
        Triton kernel nodes of Inductor's own code. CUDA graphs are Inductor's (cudagraph
        trees), fed the static inputs that the retraced graph now reports.
        """
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx

        from .cudagraphs import cuda_graphs_available
        from .inductor import InlineKernelsPass

        report.kind = "inductor"
        cudagraphs = self.options.cudagraphs and cuda_graphs_available()
        patches = {
            "max_autotune": self.options.max_autotune,
            "triton.cudagraphs": cudagraphs,
            "post_grad_custom_post_pass": InlineKernelsPass(report, inductor_config.post_grad_custom_post_pass),
        }
        compiled = compile_fx(gm, example_inputs, config_patches=patches)
        self._finish(report)
        return _with_first_call_actions(compiled, report)

    # -------------------------------------------------------------- entry
    def __call__(self, gm: fx.GraphModule, example_inputs):
        report = GraphReport(next(_graph_ids))
        report.layers = count_layers(gm)
        sink = _record_sink()
        if sink:
            sink[-1].graphs.append(report)
        self._dump(report, "dynamo", gm)
        if self.options.precompile and not self.options.inductor:
            graph_precompile.warm_up(example_inputs)  # Triton's first-compile set-up, while we trace
        try:
            fused = self.fuse(gm, example_inputs, report)
        except Exception as e:
            if is_dynamo_signal(e):
                _forget(report, sink)
            raise
        logger.info("flag_gems: graph %d: %s", report.graph_id, dict(report.fused) or "nothing fused")
        try:
            if self.options.inductor:
                return self._inductor(fused, example_inputs, report)
            from torch._functorch.aot_autograd import aot_module_simplified

            with report.timed("AOT autograd"):  # the forward / inference stages above run inside it
                return aot_module_simplified(
                    fused,
                    example_inputs,
                    fw_compiler=self._graph_compiler(report, "forward"),
                    bw_compiler=self._graph_compiler(report, "backward"),
                    inference_compiler=self._graph_compiler(report, "inference"),
                    decompositions=DECOMPOSITIONS,
                    keep_inference_input_mutations=True,
                )
        except Exception as e:
            if is_dynamo_signal(e):  # e.g. a restart: Dynamo traces the frame again and calls us anew
                _forget(report, sink)
                raise
            if self.options.strict or fused is gm or precompiling():  # an unmodified gm.forward cannot be saved
                raise
            report.fallback = f"{type(e).__name__}: {e}"
            _warn_once(f"aot:{type(e).__name__}", "flag_gems: compiling the rewritten graph failed (%s); running the unmodified graph", report.fallback)
            self._finish(report)
            return gm.forward


def flag_gems_backend(gm: fx.GraphModule, example_inputs, mode: str | None = None, options: dict | None = None):
    """The ``torch.compile`` backend registered as ``"flag_gems"``.

    Args:
        gm: the FX graph Dynamo captured.
        example_inputs: its example inputs.
        mode: ``torch.compile``'s mode (``"reduce-overhead"`` turns CUDA graphs on).
        options: ``torch.compile``'s options dict (see :class:`~flag_gems.options.CompileOptions`).

    Returns:
        A callable running the compiled graph.

    Raises:
        ValueError: unknown mode or option.
    """
    return GemsCompiler(CompileOptions.from_user(mode, options))(gm, example_inputs)


@contextlib.contextmanager
def _collect(report: CompileReport):
    stack = getattr(_sinks, "stack", None)
    if stack is None:
        stack = _sinks.stack = []
    stack.append(report)
    try:
        yield report
    finally:
        stack.pop()


def explain(fn_or_module, *args, options: dict | None = None, **kwargs) -> CompileReport:
    """Compile ``fn_or_module`` with the flag_gems backend, run it once, and report what was done.

    Args:
        fn_or_module: a function or ``nn.Module``.
        *args, **kwargs: the call's arguments.
        options: backend options (as for ``torch.compile``); ``strict`` defaults to False.

    Returns:
        A :class:`~flag_gems.report.CompileReport`: per graph, the patterns fused, the aten
        ops lowered to which kernel, the generated pointwise kernels, the CUDA kernels one call
        launches before and after the passes (per decoder layer when the graph holds a module
        list of layers), and each node left to PyTorch with its reason. ``print`` it for a table.
    """
    report = CompileReport()
    compiler = GemsCompiler(CompileOptions.from_user(None, options))
    compiled = torch.compile(fn_or_module, backend=compiler)
    with _collect(report), warnings.catch_warnings():
        compiled(*args, **kwargs)
    return report
