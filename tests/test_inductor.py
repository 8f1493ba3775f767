"""Our fused ops inside Inductor: triton_op twins, the post-grad rewrite into Triton kernel nodes
(partner pass and the backend's ``options={"inductor": True}``), the pass ``uuid()`` over the
rewrite sources, the static inputs Inductor's CUDA graphs see. GPU tests check Inductor's
generated code launches our kernels and that inductor + cudagraphs replays without weight copies."""

import collections
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import triton
from torch.fx.experimental.proxy_tensor import make_fx

import flag_gems
from flag_gems import inductor
from flag_gems.backend import trace_pre_dispatch
from flag_gems.kernels import _launch
from flag_gems.lowerings import inductor_ops
from flag_gems.report import GraphReport
from accuracy import DEVICE, assert_close, rand, ref64, tag
from test_backend import ResidualBlock, TorchRMSNorm, _add_rms_norm_ref, _reference

BF16, F32 = torch.bfloat16, torch.float32
HOP = "triton_kernel_wrapper_functional"
ops = torch.ops.flag_gems

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def kernel_nodes(gm):
    return [n for n in gm.graph.nodes if HOP in str(n.target)]


def published_nodes(gm):
    return [n for n in gm.graph.nodes if str(n.target).startswith("flag_gems.")]


# ----------------------------------------------------------------- uuid: Inductor's FX-graph cache key


def test_uuid_is_stable_and_tracks_the_pass_options():
    p = flag_gems.GemsFusionPass()
    assert p.uuid() == flag_gems.GemsFusionPass().uuid() == flag_gems.inductor_pass.uuid()
    assert p.uuid() != flag_gems.GemsFusionPass(fusions=("rms_norm",)).uuid()
    assert p.uuid() != flag_gems.GemsFusionPass(inline_kernels=False).uuid()
    assert inductor.InlineKernelsPass().uuid() not in (None, p.uuid())
    assert inductor.InlineKernelsPass(then=lambda g: None).uuid() is None  # a user pass without uuid: no cache
    assert inductor.InlineKernelsPass(then=p).uuid() != inductor.InlineKernelsPass().uuid()


def test_uuid_hashes_every_rewrite_source(tmp_path, monkeypatch):
    sources = inductor.rewrite_sources()
    rel = {os.path.relpath(p, os.path.dirname(os.path.dirname(inductor.__file__))) for p in sources}
    for f in ("gems_compile/passes/rotary_embedding.py", "gems_compile/passes/matching.py", "gems_compile/inductor.py",
              "lowerings/inductor_ops.py", "lowerings/rms_norm.py", "kernels/rotary_embedding.py", "kernels/_launch.py"):
        assert f in rel, f"{f} is not hashed into the uuid"
    # Edit a copy of one pass and point the source list at it: the uuid follows the edit.
    target = next(p for p in sources if p.endswith(os.path.join("passes", "rotary_embedding.py")))
    copy = tmp_path / "passes" / "rotary_embedding.py"
    copy.parent.mkdir()
    shutil.copy(target, copy)
    swapped = [str(copy) if p == target else p for p in sources]
    monkeypatch.setattr(inductor, "rewrite_sources", lambda: swapped)
    p = flag_gems.GemsFusionPass()
    before = p.uuid()
    copy.write_text(copy.read_text() + "\n# an edit\n")
    after = p.uuid()
    assert after != before
    monkeypatch.undo()
    assert p.uuid() == flag_gems.inductor_pass.uuid()


# ----------------------------------------------------------------- the twins


def test_each_twin_has_the_published_schema_and_a_graph_only_namespace():
    assert len(inductor_ops.twins()) == 18
    for published, twin in inductor_ops.twins().items():
        assert inductor_ops.has_twin(published) and inductor_ops.twin_of(published) is twin
        assert published.namespace == "flag_gems" and twin.namespace == inductor_ops.NAMESPACE
        assert twin._opname == published._opname
        assert [(a.name, str(a.type), a.default_value if a.has_default_value() else None) for a in twin._schema.arguments] == [
            (a.name, str(a.type), a.default_value if a.has_default_value() else None) for a in published._schema.arguments
        ], published
        assert [str(r.type) for r in twin._schema.returns] == [str(r.type) for r in published._schema.returns]
        assert not published._schema.is_mutable and not twin._schema.is_mutable


def test_twins_called_eagerly_compute_what_the_published_ops_do(device):
    x, w = rand(3, 7, 40, dtype=BF16, device=device), rand(40, dtype=BF16, device=device)
    twin = torch.ops.flag_gems_inductor.rms_norm(x, w, 1e-6, 0.0, True)
    assert torch.equal(twin, ops.rms_norm(x, w, 1e-6, 0.0, True))
    ref = ref64(x) * torch.rsqrt(ref64(x).pow(2).mean(-1, keepdim=True) + 1e-6)
    assert_close(twin, ref.to(BF16).double() * ref64(w), BF16, tag("twin.rms_norm", x.shape, BF16))
    q, k = rand(2, 4, 5, 16, device=device), rand(2, 2, 5, 16, device=device)
    cos, sin = rand(1, 5, 16, device=device), rand(1, 5, 16, device=device)
    for a, b in zip(torch.ops.flag_gems_inductor.rotary_embedding_hf(q, k, cos, sin, False),
                    ops.rotary_embedding_hf(q, k, cos, sin, False)):
        assert torch.equal(a, b)


_FRESH_LOOKUP = textwrap.dedent('''
    import json, sys
    import torch
    import flag_gems
    from flag_gems.lowerings import inductor_ops

    before = inductor_ops._by_name is not None  # import flag_gems registers nothing
    twin = torch.ops.flag_gems_inductor.rms_norm  # the first thing this process asks for
    x, w = torch.randn(3, 7, 40, device=sys.argv[1]), torch.randn(40, device=sys.argv[1])
    y = torch.empty_like(x).fill_(float("nan"))
    y.copy_(twin(x, w, 1e-6))
    ref = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    print("RESULT " + json.dumps(dict(before=before, name=str(twin.default), n=len(inductor_ops.twins()),
                                      same=torch.equal(y, torch.ops.flag_gems.rms_norm(x, w, 1e-6)),
                                      err=(y.double() - ref).abs().max().item())))
''')


def test_twin_namespace_registers_on_first_lookup(tmp_path):
    """In a fresh process, ``torch.ops.flag_gems_inductor.X`` read by name, before anything called
    ``twins()``, is the registered twin (whoever looks first: a user, the dispatcher's Python-op cache,
    a pickled graph), and ``import flag_gems`` alone registered nothing (it costs about a second)."""
    proc = subprocess.run([sys.executable, "-c", _FRESH_LOOKUP, DEVICE], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT "):])
    assert not got["before"] and got["name"] == "flag_gems_inductor.rms_norm.default" and got["n"] == 18, got
    assert got["same"] and got["err"] <= 1e-5, got  # fp32: the published op's result, near the float64 math


def _wrap_op(monkeypatch, op):
    """What a test recording calls does (tests/test_backend.py: AddRmsNormCalls): wrap ``op._op``.
    An OpOverload hashes by its ``_op``, so this changes ``hash(op)`` while it lasts."""
    real = op._op
    monkeypatch.setattr(op, "_op", lambda *args, **kwargs: real(*args, **kwargs))


def test_twin_lookup_survives_a_wrapped_op(monkeypatch):
    """GPU run 3: a dict keyed by the published overloads, built while a test had wrapped
    ``add_rms_norm.default._op``, missed afterwards (the hash had changed back): the lookup gave None and
    tracing the launcher failed with "'NoneType' object is not callable". Twins are found by name."""
    op = torch.ops.flag_gems.add_rms_norm.default
    twin = inductor_ops.twin_of(op)
    assert twin is torch.ops.flag_gems_inductor.add_rms_norm.default
    before = hash(op)
    # A dict may still find a key whose hash changed when the new hash's probe happens to reach the
    # old slot (GPU runs 2 and 3 differed so): eight wrappers, each must find it.
    for _ in range(8):
        _wrap_op(monkeypatch, op)
        assert hash(op) != before  # the condition of the failure
        assert inductor_ops.twin_of(op) is twin
    monkeypatch.undo()
    assert inductor_ops.twin_of(op) is twin


# ----------------------------------------------------------------- the post-grad rewrite (CPU)


def _graph(fn, *shapes, dtype=F32):
    return make_fx(fn, tracing_mode="fake")(*[rand(*s, dtype=dtype) for s in shapes])


def _block(x, r, w, a, b, q, k, cos, sin):
    y, h = ops.add_rms_norm(x, r, w, 1e-6)
    act = ops.silu_and_mul(a, b)
    gelu = ops.gelu_and_mul(a, b, "tanh")
    q2, k2 = ops.rotary_embedding_hf(q, k, cos, sin, False)
    return y, h, act, gelu, q2, k2


BLOCK_SHAPES = [(2, 3, 32), (2, 3, 32), (32,), (2, 3, 48), (2, 3, 48), (2, 4, 3, 16), (2, 2, 3, 16), (1, 3, 16), (1, 3, 16)]


@pytest.mark.skipif(not _launch.interpreter_mode(), reason="the interpreter case")
def test_interpreted_kernels_stay_calls_with_a_note():
    gm = _graph(_block, *BLOCK_SHAPES)
    report = GraphReport(0)
    assert inductor.inline_triton_kernels(gm, report) == 0
    assert len(published_nodes(gm)) == 4 and not kernel_nodes(gm)
    assert any("interpreter" in n for n in report.notes), report.table()


@pytest.fixture
def traceable_kernels(monkeypatch):
    """Compiled-Triton kernel objects for tracing (a JITFunction of each interpreted kernel's
    code); returns a function that points the traced graph's kernel nodes back at the
    interpreter's kernels, so the rewritten graph runs on the CPU."""
    from flag_gems.kernels import act_and_mul, rms_norm, rotary_embedding
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    from triton.runtime.interpreter import InterpretedFunction

    if not _launch.interpreter_mode():
        pytest.skip("compiled Triton: the GPU tests cover the real kernels")
    interpreted, patched = {}, []
    for module in (rms_norm, act_and_mul, rotary_embedding):
        for name, value in list(vars(module).items()):
            if isinstance(value, InterpretedFunction):  # kernels and the jit helpers they call
                interpreted[value.fn] = value
                jitted = triton.runtime.jit.JITFunction(value.fn)
                monkeypatch.setattr(module, name, _launch.FastKernel(jitted) if name.endswith("_kernel") else jitted)
                patched.append((module, name, value))
    monkeypatch.setattr(inductor_ops, "kernels_traceable", lambda: True)

    def run_interpreted(gm):
        for module, name, value in patched:  # the interpreter calls what it finds in the modules
            monkeypatch.setattr(module, name, value)
        for idx in {n.kwargs["kernel_idx"] for n in kernel_nodes(gm)}:  # repeated layers share one
            k = kernel_side_table.get_kernel(idx)
            while not isinstance(k, triton.runtime.jit.JITFunction):
                k = k.fn  # the one-config autotuner that carries num_warps
            monkeypatch.setitem(kernel_side_table.id_to_kernel, idx, interpreted[k.fn])

    return run_interpreted


def test_dynamic_shapes_stay_calls(traceable_kernels):
    """GPU run (session 6): inlined into vLLM's piecewise graphs (token count marked dynamic), the
    launchers' size-dependent config choices specialized the dim and Dynamo raised
    ConstraintViolationError. With symbolic sizes the ops stay calls, with the reason."""
    gm = make_fx(_block, tracing_mode="symbolic")(*[rand(*s) for s in BLOCK_SHAPES])
    report = GraphReport(0)
    assert inductor.inline_triton_kernels(gm, report) == 0
    assert len(published_nodes(gm)) == 4 and not kernel_nodes(gm)
    for op in ("flag_gems.add_rms_norm", "flag_gems.silu_and_mul", "flag_gems.rotary_embedding_hf"):
        assert any("dynamic shapes" in r for r in report.kept[op]), report.table()


def test_rewrite_into_kernel_nodes_computes_the_same(traceable_kernels):
    gm = _graph(_block, *BLOCK_SHAPES)
    report = GraphReport(0)
    n = inductor.inline_triton_kernels(gm, report)
    # The interpreter process cannot run Inductor's analysis of the kernel code, so each kernel
    # counts as writing every tensor it gets. The RMSNorm launcher passes y as the unused rstd
    # pointer and the RoPE launcher cos as the unused positions: two "written" arguments on one
    # buffer, so those stay calls here (compiled Triton names only the real outputs: next test).
    assert n == 2, report.table()
    assert sorted(str(p.target) for p in published_nodes(gm)) == ["flag_gems.add_rms_norm.default",
                                                                   "flag_gems.rotary_embedding_hf.default"]
    for op in ("flag_gems.add_rms_norm", "flag_gems.rotary_embedding_hf"):
        assert any("share memory" in r for r in report.kept[op]), report.table()
    assert report.lowered == {"flag_gems.silu_and_mul -> inductor triton kernels": 1,
                              "flag_gems.gelu_and_mul -> inductor triton kernels": 1}
    assert len(kernel_nodes(gm)) == 2
    traceable_kernels(gm)
    inputs = [rand(*s) for s in BLOCK_SHAPES]
    outs = gm(*inputs)
    refs = _block(*inputs)  # the published ops, one launch each
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert torch.equal(o, r), f"[output {i}] the rewritten graph differs from the published ops"
    a, b = ref64(inputs[3]), ref64(inputs[4])
    assert_close(outs[2], torch.nn.functional.silu(a) * b, F32, tag("inline.silu_and_mul", a.shape, F32))
    gelu = torch.nn.functional.gelu(a, approximate="tanh") * b
    assert_close(outs[3], gelu, F32, tag("inline.gelu_and_mul", a.shape, F32))


def test_inlining_survives_a_wrapped_op(traceable_kernels, monkeypatch):
    """The rewrite finds each op's twin while the published op is wrapped (its hash changed): both
    act-and-mul ops become kernel nodes and the graph computes what the published ops compute."""
    for name in ("silu_and_mul", "gelu_and_mul"):
        inductor_ops.twin_of(getattr(ops, name).default)  # registered before the wrap, as in GPU run 3
        _wrap_op(monkeypatch, getattr(ops, name).default)

    def acts(a, b):
        return ops.silu_and_mul(a, b), ops.gelu_and_mul(a, b, "tanh")

    gm = _graph(acts, (2, 3, 48), (2, 3, 48))
    report = GraphReport(0)
    assert inductor.inline_triton_kernels(gm, report) == 2, report.table()
    assert not published_nodes(gm) and len(kernel_nodes(gm)) == 2
    traceable_kernels(gm)
    a, b = rand(2, 3, 48), rand(2, 3, 48)
    for i, (o, r) in enumerate(zip(gm(a, b), acts(a, b))):
        assert torch.equal(o, r), f"[output {i}] the rewritten graph differs from the published ops"
    assert_close(gm(a, b)[0], torch.nn.functional.silu(ref64(a)) * ref64(b), F32,
                 tag("inline.wrapped.silu_and_mul", a.shape, F32))


def _no_hook(*args):
    hook = None
    return hook(*args)  # TypeError: 'NoneType' object is not callable (the GPU run's message)


def test_a_failed_trace_says_where_it_failed(traceable_kernels, monkeypatch):
    """An op whose launcher fails to trace stays a call; the report's reason names the error and
    the innermost frame it came from (file:line in function), so a GPU log points at the line."""
    from flag_gems.kernels import rms_norm as rms_norm_kernels

    monkeypatch.setattr(rms_norm_kernels, "tune_key", _no_hook)  # the launcher calls it before launching
    gm = _graph(_block, *BLOCK_SHAPES)
    report = GraphReport(0)
    assert inductor.inline_triton_kernels(gm, report) == 2, report.table()  # the act-and-mul ops
    (reason,) = report.kept["flag_gems.add_rms_norm"]
    line = _no_hook.__code__.co_firstlineno + 2
    assert "tracing its launcher failed (TypeError: 'NoneType' object is not callable" in reason, reason
    assert f"tests/test_inductor.py:{line} in _no_hook" in reason, reason


def test_repeated_layers_are_traced_once(traceable_kernels, monkeypatch):
    calls = []
    trace = inductor._trace_twin
    monkeypatch.setattr(inductor, "_trace_twin", lambda *a: calls.append(a[0]) or trace(*a))

    def layers(a, b, c, d, e, f):
        return ops.silu_and_mul(ops.silu_and_mul(a, b), c), ops.silu_and_mul(d, e), ops.silu_and_mul(d, f.t())

    shapes = [(4, 24)] * 5 + [(24, 4)]
    gm = _graph(layers, *shapes)
    assert inductor.inline_triton_kernels(gm) == 4 and not published_nodes(gm)
    assert len(calls) == 2  # one shape and layout, then f.t()'s other strides
    # Each copy has example values of its own: four output buffers, four storages (what
    # Inductor's reinplacing reads aliasing from).
    from flag_gems.passes.matching import storages

    buffers = [n for n in gm.graph.nodes if n.target in (torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default)]
    assert len(buffers) == 4 and len(set().union(*(storages(b) for b in buffers))) == 4
    traceable_kernels(gm)
    inputs = [rand(*s) for s in shapes]
    for i, (o, r) in enumerate(zip(gm(*inputs), layers(*inputs))):
        assert torch.equal(o, r), f"[output {i}] the rewritten graph differs from the published ops"


def test_an_op_whose_trace_inductor_cannot_lower_stays_a_call(traceable_kernels, monkeypatch):
    """Traced without Inductor's decompositions, the HF RoPE launcher's ``transpose`` (a layout
    view) is an op Inductor decomposes and has no lowering for; spliced in, it failed Inductor's
    graph lowering. Such an op stays a call, with the reason; the other ops are still rewritten."""
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.lowering import lowerings

    monkeypatch.setattr(inductor, "_inductor_decompositions", lambda: {})
    gm = _graph(_block, *BLOCK_SHAPES)
    report = GraphReport(0)
    assert inductor.inline_triton_kernels(gm, report) == 2, report.table()
    assert "flag_gems.rotary_embedding_hf.default" in [str(p.target) for p in published_nodes(gm)]
    assert any("aten.transpose.int" in r and "no lowering" in r for r in report.kept["flag_gems.rotary_embedding_hf"]), \
        report.table()
    decomps = select_decomp_table()
    left = [n.target for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
            and n.target not in lowerings and n.target in decomps]
    assert not left, f"the rewritten graph has ops Inductor cannot lower: {left}"
    traceable_kernels(gm)
    inputs = [rand(*s) for s in BLOCK_SHAPES]
    for i, (o, r) in enumerate(zip(gm(*inputs), _block(*inputs))):
        assert torch.equal(o, r), f"[output {i}] the rewritten graph differs from the published ops"


_PRECISE = textwrap.dedent('''
    import json, os, types
    os.environ["TRITON_INTERPRET"] = "0"
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    import flag_gems
    from flag_gems import inductor

    if not torch.cuda.is_available():  # no device: stub what Triton's code generator and torch ask of one
        class Driver:  # Triton's code generator needs a target, not a device
            def get_current_target(self):
                return GPUTarget("cuda", 90, 32)
            def get_current_device(self):
                return 0
        triton.runtime.driver.set_active(Driver())
        torch._C._cuda_getDevice = lambda: 0
        torch.cuda.get_device_properties = lambda index=None: types.SimpleNamespace(
            multi_processor_count=8, name="stub", major=9, minor=0)
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.lowering import lowerings
    from torch._higher_order_ops.triton_kernel_wrap import triton_kernel_wrapper_functional as functional
    decomps = select_decomp_table()

    def unlowerable(gm):  # nodes Inductor's GraphLowering would fail on: decomposed ops without a lowering
        return sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_function"
                       and n.target is not functional and isinstance(n.target, torch._ops.OpOverload)
                       and n.target not in lowerings and n.target in decomps})

    ops = torch.ops.flag_gems
    B, L = torch.bfloat16, torch.int64
    cases = {
        "rms_norm": (lambda x, w: ops.rms_norm(x, w, 1e-6), [(2, 5, 64), (64,)]),
        "add_rms_norm": (lambda x, r, w: ops.add_rms_norm(x, r, w, 1e-6), [(2, 5, 64), (2, 5, 64), (64,)]),
        "rms_norm_backward": (lambda g, x, w: ops.rms_norm_backward(g, x, w, 1e-6, 0.0, False, None, True),
                              [(2, 5, 64), (2, 5, 64), (64,)]),
        "silu_and_mul": (lambda a, b: ops.silu_and_mul(a, b), [(2, 5, 96), (2, 5, 96)]),
        "silu_and_mul_backward": (lambda g, a, b: ops.silu_and_mul_backward(g, a, b), [(2, 5, 96)] * 3),
        "gelu_and_mul_fused": (lambda x: ops.gelu_and_mul_fused(x, "tanh"), [(2, 5, 192)]),
        "rotary_embedding_hf": (lambda q, k, c, s: ops.rotary_embedding_hf(q, k, c, s, False),
                                [(2, 4, 5, 16), (2, 2, 5, 16), (1, 5, 16), (1, 5, 16)]),
        "rotary_embedding_hf_backward": (lambda q, k, c, s: ops.rotary_embedding_hf_backward(q, k, c, s, False),
                                         [(2, 4, 5, 16), (2, 2, 5, 16), (1, 5, 16), (1, 5, 16)]),
        "rotary_embedding": (lambda q, k, c, s, p: ops.rotary_embedding(q, k, c, s, p, False),
                             [(2, 5, 4, 16), (2, 5, 2, 16), (9, 8), (9, 8), ((2, 5), L)]),
    }
    out = {}
    for name, (fn, specs) in cases.items():
        specs = [s if isinstance(s[-1], torch.dtype) else (s, B) for s in specs]
        with FakeTensorMode():
            gm = make_fx(fn, tracing_mode="real")(*[torch.empty(s, device="cuda", dtype=d) for s, d in specs])
        n = inductor.inline_triton_kernels(gm)
        out[name] = [n, [list(k.kwargs["tensors_to_clone"]) for k in gm.graph.nodes if "triton_kernel_wrapper" in str(k.target)],
                     [str(k.target) for k in gm.graph.nodes if str(k.target).startswith("flag_gems.")], unlowerable(gm)]
    print("RESULT " + json.dumps(out))
''')


def test_compiled_triton_analysis_names_only_the_written_outputs(tmp_path):
    """In a compiled-Triton process (fake CUDA tensors; without a GPU, Triton generates the kernels'
    IR for an sm_90 target; with one, for the device), Inductor's analysis of our kernels names only
    the outputs they store to, so each op becomes one kernel node that copies no input, and every
    other node of the rewrite is one Inductor lowers (the launchers' views and casts come out
    decomposed: a ``transpose`` left in fails Inductor's graph lowering). The autotuner is on and
    must not tune inside the trace (it would launch under the tracer)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "GEMS_AUTOTUNE": "on", "GEMS_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", _PRECISE], capture_output=True, text=True, env=env, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT "):])
    assert got == {
        "rms_norm": [1, [["y_ptr"]], [], []],
        "add_rms_norm": [1, [["y_ptr", "h_ptr"]], [], []],
        "rms_norm_backward": [1, [["dx_ptr", "dw_ptr"]], [], []],
        "silu_and_mul": [1, [["out_ptr"]], [], []],
        "silu_and_mul_backward": [1, [["da_ptr", "db_ptr"]], [], []],
        "gelu_and_mul_fused": [1, [["out_ptr"]], [], []],
        "rotary_embedding_hf": [1, [["q_out_ptr", "k_out_ptr"]], [], []],
        "rotary_embedding_hf_backward": [1, [["q_out_ptr", "k_out_ptr"]], [], []],
        "rotary_embedding": [1, [["q_out_ptr", "k_out_ptr"]], [], []],
    }, got


# ----------------------------------------------------------------- the backend's inductor branch (CPU)


class _Capture(torch._inductor.custom_graph_pass.CustomGraphPass):
    """A user's post-grad pass: records the static inputs AOT autograd reported for the graph."""

    def __init__(self):
        self.static = []

    def __call__(self, graph):
        meta = torch._guards.TracingContext.try_get().fw_metadata
        self.static.append(sorted(meta.static_input_indices))

    def uuid(self):
        return "capture"


def test_retraced_graph_keeps_dynamos_static_inputs(device):
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    seen = {}

    def capture(tag):
        def fw(gm, example_inputs):
            seen[tag] = sorted(torch._guards.TracingContext.try_get().fw_metadata.static_input_indices)
            return make_boxed_func(gm.forward)
        return fw

    def backend(gm, example_inputs):
        aot_module_simplified(gm, example_inputs, fw_compiler=capture("dynamo"))
        return aot_module_simplified(trace_pre_dispatch(gm, example_inputs), example_inputs, fw_compiler=capture("retraced"))

    m = ResidualBlock(16, "llama").to(device)
    with torch.no_grad():
        torch.compile(m, backend=backend)(rand(2, 16, device=device), rand(2, 16, device=device))
    assert len(seen["dynamo"]) == len(list(m.parameters())) == 3, seen
    assert seen["retraced"] == seen["dynamo"]


def test_inductor_branch_runs_the_users_pass_and_sees_the_weights_as_static(device):
    m = ResidualBlock(32, "llama").to(device=device, dtype=BF16)
    x, r = rand(2, 5, 32, dtype=BF16, device=device), rand(2, 5, 32, dtype=BF16, device=device)
    user = _Capture()
    report = flag_gems.report.CompileReport()
    with torch._inductor.config.patch(post_grad_custom_post_pass=user, fx_graph_cache=False), torch.no_grad():
        from flag_gems.backend import _collect

        with _collect(report):
            out, res = torch.compile(m, backend="flag_gems", options={"inductor": True, "strict": True})(x, r)
    # The three weights are static inputs (CUDA graphs read them in place); none without Dynamo's metadata.
    assert len(user.static) == 1 and len(user.static[0]) == len(list(m.parameters())) == 3, user.static
    assert report.graphs[0].fused["add_rms_norm[llama]"] == 2, str(report)
    if _launch.interpreter_mode():
        assert any("interpreter" in n for n in report.graphs[0].notes), str(report)
    ref_out, ref_res = _reference(m, x, r)
    assert_close(out, ref_out, BF16, tag("backend[inductor].out", out.shape, BF16), grad=True)


# ----------------------------------------------------------------- what Inductor decomposed before the pass


class GatedMLPBlock(torch.nn.Module):
    """A residual add, ``nn.RMSNorm``, a SiLU-gated MLP. Inductor's post-grad graph holds the
    norm's weight multiply in fp32 on a bf16 weight (promoted by the multiply, no cast) and SiLU
    as ``x / (1 + exp(-x))``: neither matched before the respelling."""

    def __init__(self, n, inter, gated=True):
        super().__init__()
        self.norm = TorchRMSNorm(n)
        self.gate = torch.nn.Linear(n, inter, bias=False)
        self.up = torch.nn.Linear(n, inter, bias=False) if gated else None
        self.down = torch.nn.Linear(inter, n, bias=False)

    def forward(self, x, residual):
        residual = x + residual
        h = self.norm(residual)
        a = torch.nn.functional.silu(self.gate(h))
        return self.down(a * self.up(h) if self.up is not None else a), residual


class _OpCalls:
    """Every call of ``targets`` (flag_gems OpOverloads) a compiled graph makes, recorded with its
    outputs once it returned (Inductor's code calls the ops: their ``_op`` is wrapped)."""

    def __init__(self, monkeypatch, *targets):
        # Keyed by name: wrapping ``_op`` changes an OpOverload's hash.
        self.calls = {t.name(): [] for t in targets}
        for t in targets:
            monkeypatch.setattr(t, "_op", self._recorded(t.name(), t._op))

    def _recorded(self, name, fn):
        def call(*args, **kwargs):
            out = fn(*args, **kwargs)
            if type(args[0]) is torch.Tensor:  # a run, not tracing
                self.calls[name].append((args, out))
            return out

        return call

    def second_run(self, compiled, *inputs):
        compiled(*inputs)
        for c in self.calls.values():
            c.clear()
        return compiled(*inputs)


def test_partner_pass_fuses_torch_rmsnorm_and_inductors_decomposed_silu(device, monkeypatch):
    from flag_gems.lowerings.inductor_ops import kernels_traceable

    m = GatedMLPBlock(32, 48).to(device=device, dtype=BF16)
    x, r = rand(3, 5, 32, dtype=BF16, device=device), rand(3, 5, 32, dtype=BF16, device=device)
    p = flag_gems.GemsFusionPass()
    compiled = torch.compile(m, options={"post_grad_custom_post_pass": p, "fx_graph_cache": False})
    what = tag("inductor_pass[nn.RMSNorm + SiLU·mul]", x.shape, BF16)
    ref_out, ref_res = _reference(m, x, r)
    if kernels_traceable():  # compiled Triton: our kernels inlined into Inductor's code
        from torch._inductor.utils import run_and_get_code

        with torch.no_grad():
            (out, res), code = run_and_get_code(compiled, x, r)
        code = "\n".join(code)
        for kernel in (KERNEL_OF["add_rms_norm"], KERNEL_OF["act_and_mul"]):
            assert kernel in code, f"{what} Inductor's code does not define {kernel}"
        assert "torch.ops.flag_gems." not in code, f"{what} a fused op is still an opaque call"
    else:  # the interpreter: the fused ops stay calls, each checked on its own inputs
        calls = _OpCalls(monkeypatch, ops.add_rms_norm.default, ops.silu_and_mul.default)
        with torch.no_grad():
            out, res = calls.second_run(compiled, x, r)
        ((args, (y, h)),) = calls.calls[ops.add_rms_norm.default.name()]
        assert args[4:] == (0.0, False), args  # weight multiplied in fp32, as nn.RMSNorm does
        ref_y, ref_h = _add_rms_norm_ref(args)
        assert_close(h, ref_h, BF16, f"{what} add_rms_norm h")
        assert_close(y, ref_y, BF16, f"{what} add_rms_norm y")
        ((args, a),) = calls.calls[ops.silu_and_mul.default.name()]
        ref_a = torch.nn.functional.silu(ref64(args[0])) * ref64(args[1])
        assert_close(a, ref_a, BF16, f"{what} silu_and_mul")
        assert args[0].shape == (3, 5, 48)
    fused = sum((rep.fused for rep in p.reports), start=collections.Counter())
    assert fused == {"add_rms_norm[fp32_weight]": 1, "act_and_mul[silu_sigmoid_fp32]": 1}, fused
    assert_close(res, ref_res, BF16, f"{what} residual")
    assert_close(out, ref_out, BF16, f"{what} out", grad=True)  # three matmuls round in between


def test_partner_pass_restores_a_silu_it_did_not_fuse(device):
    """A SiLU with no multiply after it: respelled for the matcher, not fused, put back as Inductor
    wrote it; the norm still fuses and the result is the module's."""
    m = GatedMLPBlock(32, 48, gated=False).to(device=device, dtype=BF16)
    x, r = rand(2, 32, dtype=BF16, device=device), rand(2, 32, dtype=BF16, device=device)
    p = flag_gems.GemsFusionPass()
    compiled = torch.compile(m, options={"post_grad_custom_post_pass": p, "fx_graph_cache": False})
    with torch.no_grad():
        out, res = compiled(x, r)
    fused = sum((rep.fused for rep in p.reports), start=collections.Counter())
    assert fused == {"add_rms_norm[fp32_weight]": 1}, fused
    ref_out, ref_res = _reference(m, x, r)
    assert_close(out, ref_out, BF16, tag("inductor_pass[unfused SiLU].out", out.shape, BF16), grad=True)
    assert_close(res, ref_res, BF16, tag("inductor_pass[unfused SiLU].res", res.shape, BF16))


# ----------------------------------------------------------------- GPU: Inductor launches our kernels

transformers = pytest.importorskip("transformers")

LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# fused family (report name) -> the kernel Inductor's code must then define
KERNEL_OF = {"rms_norm": "_rms_norm_fwd_kernel", "add_rms_norm": "_rms_norm_fwd_kernel",
             "act_and_mul": "_act_and_mul_fwd_kernel", "rotary_embedding": "_rope_kernel"}


def tiny_llama(dtype=BF16):
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model("llama", **LLAMA)
    return transformers.AutoModelForCausalLM.from_config(cfg).to(device="cuda", dtype=dtype).eval()


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def compiled_code(fn, *args, **kwargs):
    from torch._inductor.utils import run_and_get_code

    with torch._inductor.config.patch(fx_graph_cache=False):
        return run_and_get_code(fn, *args, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("how", ["partner_pass", "backend_inductor"])
def test_inductor_code_launches_our_kernels(how):
    from flag_gems.backend import _collect

    model = tiny_llama()
    ids = torch.randint(3, 128, (2, 9), device="cuda")
    report = flag_gems.report.CompileReport()
    if how == "partner_pass":
        p = flag_gems.GemsFusionPass()
        compiled = torch.compile(model, options={"post_grad_custom_post_pass": p})
        report.graphs = p.reports
    else:
        compiled = torch.compile(model, backend="flag_gems", options={"inductor": True, "strict": True})
    with torch.no_grad(), _collect(report):
        ref = model(ids, use_cache=False).logits
        out, code = compiled_code(compiled, ids, use_cache=False)
    code = "\n".join(code)
    fused = set(report.fused)
    # SiLU·mul too: the partner pass respells Inductor's decomposed SiLU (passes/canonicalize.py).
    assert {"add_rms_norm", "rotary_embedding", "act_and_mul"} <= fused, str(report)
    for family in fused:
        assert KERNEL_OF[family] in code, f"[{how}] {family} fused, but Inductor's code does not define {KERNEL_OF[family]}"
    assert "torch.ops.flag_gems." not in code, f"[{how}] a fused op is still an opaque call:\n{report}"
    lowered = sum((g.lowered for g in report.graphs), start=collections.Counter())
    assert lowered["flag_gems.rotary_embedding_hf -> inductor triton kernels"] == 2, str(report)
    assert cosine(out.logits, ref) >= 0.9995


@pytest.mark.gpu
def test_backend_inductor_training_launches_our_backward_kernels():
    m = ResidualBlock(256, "llama").cuda()
    x, r = rand(8, 256, device="cuda", requires_grad=True), rand(8, 256, device="cuda")
    compiled = torch.compile(m, backend="flag_gems", options={"inductor": True, "strict": True})

    def step():
        out, res = compiled(x, r)
        (out.square().sum() + res.sum()).backward()
        return out

    out, code = compiled_code(step)
    assert any("_rms_norm_bwd_kernel" in c for c in code), "the backward graph does not launch our kernel"
    grads = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    x64 = ref64(x).requires_grad_()
    import copy

    m64 = copy.deepcopy(m).cpu().double()
    o64, res64 = m64(x64, ref64(r))
    (o64.square().sum() + res64.sum()).backward()
    for g, rg in zip(grads, [x64.grad] + [p.grad for p in m64.parameters()]):
        s = rg.abs().max().item()
        assert_close(g / s, rg / s, F32, tag("inductor.train.grad", g.shape, F32), grad=True)


# Greedy generation of a tiny F32 Llama with a static KV cache, eager then compiled (argv[1]: the
# device, the compile arguments, the config), before and after an in-place weight update; prints
# the tokens and Inductor's counters as one RESULT line. Run in a child process: a crash there
# (see the test) fails the test with the child's stderr instead of killing the pytest worker.
_GENERATE_REPLAY = textwrap.dedent('''
    import json, sys
    import torch, transformers
    import flag_gems  # noqa: F401  (registers the backend)
    from torch._dynamo.utils import counters

    spec = json.loads(sys.argv[1])
    device, f32 = spec["device"], torch.float32
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model("llama", tie_word_embeddings=False, **spec["llama"])
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=f32).eval()
    ids = torch.randint(3, cfg.vocab_size, (2, 5), device=device)
    new, length = 6, 16
    try:
        cache = transformers.StaticCache(config=cfg, max_cache_len=length)
    except TypeError:  # older transformers: allocated (and its addresses marked static) here
        cache = transformers.StaticCache(config=cfg, max_batch_size=2, max_cache_len=length, device=device, dtype=f32)
    eager = model.forward
    compiled = torch.compile(model.forward, backend=spec["backend"], **spec["compile"])

    def generate(forward):
        cache.reset()  # same tensors, zeroed
        model.forward = forward
        return model.generate(ids, past_key_values=cache, max_new_tokens=new, do_sample=False,
                              disable_compile=True).tolist()

    with torch.no_grad():
        ref = generate(eager)  # the cache's tensors are made here, outside the compiled code
        counters.clear()
        out = generate(compiled)
        first = dict(counters["inductor"])  # one generation: prefill warm-up, decode recorded and replayed
        model.lm_head.weight.neg_()  # in place: the logits become exactly -2x (argmax -> argmin)
        model.model.norm.weight.mul_(2.0)
        ref2 = generate(eager)
        out2 = generate(compiled)  # the decode steps replay graphs recorded before the update
    print("RESULT " + json.dumps(dict(ref=ref, out=out, ref2=ref2, out2=out2, first=first,
                                      inductor=dict(counters["inductor"]), n_params=len(list(model.parameters())))))
''')


def run_generate_replay(device, backend, compile_kwargs, cwd):
    """The child's RESULT (``_GENERATE_REPLAY``); fails with its exit status and stderr when it dies.
    ``cwd``: an empty folder (``python -c`` imports from its working directory, and the repository
    root's ``kernels`` folder would shadow the optional ``kernels`` package transformers probes)."""
    spec = dict(device=device, backend=backend, compile=compile_kwargs, llama=LLAMA)
    proc = subprocess.run([sys.executable, "-c", _GENERATE_REPLAY, json.dumps(spec)], capture_output=True, text=True,
                          timeout=540, cwd=cwd)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"the generating process failed (exit status {proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.gpu
def test_inductor_cudagraphs_replay_reads_weights_in_place(tmp_path):
    """``options={"inductor": True, "cudagraphs": True}`` through ``generate`` with a static KV cache:
    the tokens are eager's; no graph is skipped; only the per-step inputs are copied into the
    graphs (the weights and the cache are static inputs, read in place); after an in-place weight
    update the replays generate what eager generates with the new weights.

    The cache is made by an eager run first, as transformers requires when the prefill is compiled
    (its lazy allocation marks the tensors static only outside Dynamo): allocated inside the compiled
    prefill, the cache would be outputs of a CUDA graph, which cudagraph trees free at the next
    call; the decode step then writes them as non-static inputs, the graph is skipped and its
    kernels get freed tensors (torch 2.11's static launcher crashed the process there)."""
    got = run_generate_replay("cuda", "flag_gems", {"options": {"inductor": True, "cudagraphs": True, "strict": True}},
                              tmp_path)
    assert got["out"] == got["ref"], f"tokens {got['out']} vs eager {got['ref']}"
    assert got["ref2"] != got["ref"], "the weight update does not change eager's tokens: the check below proves nothing"
    assert got["out2"] == got["ref2"], f"after the weight update: tokens {got['out2']} vs eager {got['ref2']}"
    assert got["inductor"].get("cudagraph_skips", 0) == 0, got["inductor"]
    recorded = got["first"].get("cudagraph_recorded_non_static_inputs", 0)
    # Before the fix every weight was a non-static input, copied into the graph before each replay.
    assert 0 < recorded < got["n_params"], (
        f"{recorded} non-static inputs recorded for a model of {got['n_params']} weights")


def test_generate_replay_child_runs_eagerly(tmp_path):
    """The child process of the test above, with Dynamo's eager backend on the test device (no
    CUDA graphs): the script itself cannot rot on a machine without a GPU."""
    got = run_generate_replay(DEVICE, "eager", {}, tmp_path)
    assert got["out"] == got["ref"] and got["out2"] == got["ref2"] and got["ref2"] != got["ref"], got
