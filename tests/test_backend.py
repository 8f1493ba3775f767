"""The flag_gems torch.compile backend: registration, options, RMSNorm fusions, fallback, dynamic shapes, training, dumps."""

import json
import os

import pytest
import torch
import torch._dynamo.testing

import flag_gems
from flag_gems.backend import GemsCompiler
from flag_gems.options import CompileOptions
from accuracy import DTYPE_IDS, DTYPES, TOLERANCES, assert_close, rand, ref64, tag

STRICT = {"strict": True}


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def compile_strict(m, **kw):
    return torch.compile(m, backend="flag_gems", options=STRICT, fullgraph=True, **kw)


# ----------------------------------------------------------------- norm modules in the styles models use


class LlamaRMSNorm(torch.nn.Module):
    """HF Llama / Qwen2 / Mistral."""

    def __init__(self, n, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(n))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * x.to(dtype)


class GemmaRMSNorm(torch.nn.Module):
    def __init__(self, n, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(0.1 * torch.randn(n))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float())
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


class MulSquareNoWeight(torch.nn.Module):
    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt((xf * xf).mean(dim=-1, keepdim=True) + 1e-5)).to(x.dtype)


class TorchRMSNorm(torch.nn.RMSNorm):
    def __init__(self, n):
        super().__init__(n, eps=1e-5)
        with torch.no_grad():
            self.weight.copy_(1 + 0.1 * torch.randn(n))


NORMS = {"llama": LlamaRMSNorm, "gemma": GemmaRMSNorm, "no_weight": lambda n: MulSquareNoWeight(), "torch": TorchRMSNorm}


class ResidualBlock(torch.nn.Module):
    """Two residual adds, each followed by a norm: the decoder-layer shape of the pattern."""

    def __init__(self, n, norm):
        super().__init__()
        self.norm1 = NORMS[norm](n)
        self.norm2 = NORMS[norm](n)
        self.proj = torch.nn.Linear(n, n, bias=False)

    def forward(self, x, residual):
        residual = x + residual
        h = self.norm1(residual)
        x = self.proj(h)
        residual = x + residual
        return self.norm2(residual), residual


def _reference(module, *inputs):
    """float64 copy of the module run on float64 inputs (detached)."""
    import copy

    m64 = copy.deepcopy(module).to(device="cpu", dtype=torch.float64)
    with torch.no_grad():
        return m64(*[ref64(t) for t in inputs])


def _add_rms_norm_ref(args):
    """``flag_gems.add_rms_norm``'s math in float64 from one call's own arguments: ``(y, h)``."""
    x, r, w, eps, offset, round_before = (*args, 0.0, False)[:6]
    h = ref64(x) + ref64(r)
    n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if round_before and w is not None:
        n = n.to(x.dtype).double()  # HF Llama's `weight * hidden.to(input_dtype)`
    return (n * (offset + ref64(w)) if w is not None else n), h


class AddRmsNormCalls:
    """The ``add_rms_norm`` calls a compiled model makes, recorded (arguments, outputs) once each returned.

    Graphs compiled by the flag_gems backend call the op's implementation directly; Inductor's
    code calls the op: both are wrapped.
    """

    def __init__(self, monkeypatch):
        import flag_gems.passes.direct_calls as dc

        self.calls = []
        op = torch.ops.flag_gems.add_rms_norm.default
        direct, impl, dispatched = dc.direct_impl, dc.direct_impl(op), op._op

        def recorded(fn):
            def call(*args, **kwargs):
                out = fn(*args, **kwargs)
                if type(args[0]) is torch.Tensor:  # a run, not tracing (fake / functional tensors)
                    self.calls.append((args, out))
                return out

            return call

        monkeypatch.setattr(dc, "direct_impl", lambda o: recorded(impl) if o is op else direct(o))
        monkeypatch.setattr(op, "_op", recorded(dispatched))

    def second_run(self, compiled, *inputs):
        """Run ``compiled`` twice (the first call compiles, and compilers may run kernels while at it)
        and keep only the second run's calls."""
        compiled(*inputs)
        self.calls.clear()
        return compiled(*inputs)

    def check_residual_block(self, m, x, r, out, res, what):
        """Each call against the op's float64 math on its own inputs (forward tolerance: the kernel
        rounds once), and the wiring of ResidualBlock: call 1 takes (x, r), call 2 takes h1 and
        proj(y1), the block returns call 2's outputs."""
        dtype = x.dtype
        assert len(self.calls) == 2, f"{what} {len(self.calls)} add_rms_norm calls"
        for i, (args, (y, h)) in enumerate(self.calls):
            ref_y, ref_h = _add_rms_norm_ref(args)
            assert_close(h, ref_h, dtype, f"{what} call {i} h")
            assert_close(y, ref_y, dtype, f"{what} call {i} y")
        (a1, (y1, h1)), (a2, (y2, h2)) = self.calls

        def pair_is(args, first, second):  # x + r commutes: either order
            return any(torch.equal(a, first) and torch.equal(b, second) for a, b in (args[:2], args[1::-1]))

        assert pair_is(a1, x, r), f"{what} call 1 does not add x and r"
        hidden = a2[0] if torch.equal(a2[1], h1) else a2[1]
        assert torch.equal(a2[0], h1) or torch.equal(a2[1], h1), f"{what} call 2 does not take call 1's h"
        with torch.no_grad():
            assert_close(hidden, ref64(m.proj(y1)), dtype, f"{what} call 2 input is not proj(y1)")
        assert torch.equal(out, y2) and torch.equal(res, h2), f"{what} outputs are not call 2's"


# ----------------------------------------------------------------- registration and options


def test_backend_is_registered():
    assert "flag_gems" in torch._dynamo.list_backends()
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("flag_gems") is not None


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown option 'strickt' \(did you mean 'strict'\?\).*valid options: strict"):
        CompileOptions.from_user(None, {"strickt": True})
    with pytest.raises(ValueError, match="unknown mode"):
        CompileOptions.from_user("fastest", None)
    with pytest.raises(ValueError, match="unknown fusions"):
        CompileOptions.from_user(None, {"fusions": ["layer_norm"]})
    with pytest.raises(TypeError, match="'strict' must be a bool"):
        CompileOptions.from_user(None, {"strict": "yes"})
    assert CompileOptions.from_user("reduce-overhead", None).cudagraphs
    auto = CompileOptions.from_user("max-autotune-no-cudagraphs", {"inductor": True})
    assert auto.max_autotune and not auto.cudagraphs


def test_unknown_option_through_torch_compile(device):
    f = torch.compile(lambda x: x + 1, backend="flag_gems", options={"nope": 1})
    with pytest.raises(Exception, match="unknown option 'nope'"):
        f(rand(3, device=device))


# ----------------------------------------------------------------- fusions


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("norm", list(NORMS))
def test_residual_rms_norm_fused(norm, dtype, device, monkeypatch):
    n = 48
    m = ResidualBlock(n, norm).to(device=device, dtype=dtype)
    x, r = rand(2, 5, n, dtype=dtype, device=device), rand(2, 5, n, dtype=dtype, device=device)
    with torch.no_grad():
        report = flag_gems.explain(m, x, r, options=STRICT)
        torch._dynamo.reset()
        calls = AddRmsNormCalls(monkeypatch)
        out, res = calls.second_run(compile_strict(m), x, r)
    assert report.fused["add_rms_norm"] == 2, str(report)
    assert not report.fallbacks
    assert out.dtype == dtype and res.dtype == dtype
    calls.check_residual_block(m, x, r, out, res, tag(f"backend[{norm}]", out.shape, dtype))


def test_fp32_weight_on_bf16_keeps_the_weight_multiply(device):
    """Llama norm with an fp32 weight on bf16 activations returns fp32: only the norm is fused,
    the fp32 weight multiply stays, and the output keeps its dtype."""
    m = LlamaRMSNorm(32).to(device)  # fp32 weight
    x = rand(3, 32, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        report = flag_gems.explain(m, x, options=STRICT)
        out = compile_strict(m)(x)
        ref = m(x)
    assert report.graphs[0].fused == {"rms_norm[no_weight]": 1}, str(report)
    assert out.dtype == ref.dtype == torch.float32
    assert_close(out, _reference(m, x), torch.bfloat16, tag("backend[fp32 weight]", out.shape, torch.bfloat16))


class PromotedWeightNorm(torch.nn.Module):
    """``(nrm(x.float()) * w).to(d)`` with a half ``w`` promoted by the multiply (no cast node):
    ``nn.RMSNorm``'s decomposition; ``offset`` adds ``1 + w`` in the half dtype (rounds)."""

    def __init__(self, n, offset=False):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(n))
        self.offset = offset

    def forward(self, x):
        xf = x.float()
        nrm = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        w = 1.0 + self.weight if self.offset else self.weight
        return (nrm * w).to(x.dtype)


@pytest.mark.parametrize("offset", [False, True], ids=["promoted_weight", "half_one_plus_w"])
def test_half_weight_promoted_by_the_multiply(offset, device, monkeypatch):
    """A half weight multiplied into the fp32 norm is the fp32 multiply of ``fp32_weight``:
    fused, checked by result. ``1 + w`` computed in the half dtype rounds before the multiply:
    left alone, with the reason."""
    m = PromotedWeightNorm(32, offset).to(device=device, dtype=torch.bfloat16)
    x = rand(3, 32, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        report = flag_gems.explain(m, x, options=STRICT)
        out = compile_strict(m)(x)
    what = tag(f"backend[{'1 + w' if offset else 'promoted w'}]", out.shape, torch.bfloat16)
    if offset:
        assert sum(report.fused.values()) == 0, str(report)
        assert "weight is not a [hidden] tensor" in report.graphs[0].kept["rms_norm pattern"], str(report)
        assert_close(out, m(x), torch.bfloat16, what)
        return
    assert report.graphs[0].fused == {"rms_norm[fp32_weight]": 1}, str(report)
    x64, w64 = ref64(x), ref64(m.weight)
    ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w64
    assert out.dtype == torch.bfloat16
    assert_close(out, ref, torch.bfloat16, what)


def test_rms_norm_below_fp32_is_left_alone(device):
    def f(x):  # normalizes in bf16: fusing would change numerics
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    x = rand(4, 16, dtype=torch.bfloat16, device=device)
    report = flag_gems.explain(f, x, options=STRICT)
    assert sum(report.fused.values()) == 0
    kept = report.graphs[0].kept["rms_norm pattern"]
    assert any("below fp32" in r for r in kept), str(report)


# ----------------------------------------------------------------- dynamic shapes, training


def test_dynamic_shapes_compile_once(device):
    m = ResidualBlock(32, "llama").to(device)
    counter = torch._dynamo.testing.CompileCounterWithBackend(GemsCompiler(CompileOptions(strict=True)))
    f = torch.compile(m, backend=counter, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for b, s in [(2, 3), (3, 7), (4, 2), (2, 17)]:  # >= 2: Dynamo specializes sizes 0 and 1
            x, r = rand(b, s, 32, device=device), rand(b, s, 32, device=device)
            out, res = f(x, r)
            ref_out, ref_res = _reference(m, x, r)
            assert_close(out, ref_out, torch.float32, tag("backend[dynamic]", out.shape, torch.float32))
    assert counter.frame_count == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_training_uses_fused_backward(dtype, device, tmp_path):
    m = ResidualBlock(40, "llama").to(device=device, dtype=dtype)
    x = rand(2, 3, 40, dtype=dtype, device=device, requires_grad=True)
    r = rand(2, 3, 40, dtype=dtype, device=device, requires_grad=True)
    f = torch.compile(m, backend="flag_gems", options={"strict": True, "dump_dir": str(tmp_path)}, fullgraph=True)
    out, res = f(x, r)
    (out.float().square().sum() + res.float().sum()).backward()
    grads = [x.grad, r.grad, m.norm1.weight.grad, m.proj.weight.grad]

    import copy

    m64 = copy.deepcopy(m).to(device="cpu", dtype=torch.float64)
    x64, r64 = ref64(x).requires_grad_(), ref64(r).requires_grad_()
    o64, res64 = m64(x64, r64)
    (o64.square().sum() + res64.sum()).backward()
    refs = [x64.grad, r64.grad, m64.norm1.weight.grad, m64.proj.weight.grad]
    for name, g, rg in zip(["x", "residual", "norm1.weight", "proj.weight"], grads, refs):
        scale = rg.abs().max().item()
        assert_close(g / scale, rg / scale, dtype, tag(f"backend.train.d{name}", rg.shape, dtype), grad=True)
    backward_code = "".join(open(tmp_path / p).read() for p in os.listdir(tmp_path) if p.endswith("_backward.py"))
    assert "flag_gems.rms_norm_backward" in backward_code


# ----------------------------------------------------------------- fallback, strict, dumps


def test_failing_pass_falls_back_with_one_warning(device, monkeypatch):
    import warnings

    import flag_gems.passes as passes
    from flag_gems.kernels import _common

    def boom(gm, report):
        raise RuntimeError("synthetic pass failure")

    monkeypatch.setitem(passes.FUSION_PASSES, "rms_norm", boom)
    monkeypatch.setattr(_common, "_WARNED", set())
    m = ResidualBlock(16, "llama").to(device)
    x, r = rand(2, 16, device=device), rand(2, 16, device=device)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = flag_gems.explain(m, x, r)
        out, res = torch.compile(m, backend="flag_gems")(x, r)
    assert report.fallbacks and "synthetic pass failure" in report.fallbacks[0][1]
    said = [w for w in caught if "graph passes failed" in str(w.message)]
    assert len(said) == 1 and issubclass(said[0].category, RuntimeWarning), [str(w.message) for w in caught]
    assert "synthetic pass failure" in str(said[0].message)
    ref_out, _ = m(x, r)
    torch.testing.assert_close(out, ref_out)
    with pytest.raises(Exception, match="synthetic pass failure"), torch.no_grad():
        torch._dynamo.reset()
        compile_strict(m)(x, r)


@pytest.mark.parametrize("stage", ["lower_aten", "direct_calls"])
def test_failing_post_autograd_pass_is_noted_and_skipped(stage, device, monkeypatch):
    # The graph is right without these passes: not strict, the compiled graph runs and the
    # report says what was skipped; strict raises.
    import importlib

    module = importlib.import_module(f"flag_gems.passes.{stage}")

    def boom(*args, **kwargs):
        raise RuntimeError(f"synthetic {stage} failure")

    monkeypatch.setattr(module, stage, boom)
    m = ResidualBlock(16, "llama").to(device)
    x, r = rand(2, 16, device=device), rand(2, 16, device=device)
    with torch.no_grad():
        report = flag_gems.explain(m, x, r)
        torch._dynamo.reset()
        out, _ = torch.compile(m, backend="flag_gems")(x, r)
    notes = [n for g in report.graphs for n in g.notes]
    assert any(f"synthetic {stage} failure" in n and "skipped" in n for n in notes), notes
    assert report.graphs[0].fused  # the fusions before it stand
    torch.testing.assert_close(out, m(x, r)[0])
    with pytest.raises(Exception, match=f"synthetic {stage} failure"), torch.no_grad():
        torch._dynamo.reset()
        compile_strict(m)(x, r)


def test_dump_dir_writes_graphs_and_report(device, tmp_path, monkeypatch):
    monkeypatch.setenv("GEMS_DUMP_DIR", str(tmp_path))
    m = ResidualBlock(16, "gemma").to(device)
    x, r = rand(2, 16, device=device), rand(2, 16, device=device)
    with torch.no_grad():
        torch.compile(m, backend="flag_gems", options=STRICT)(x, r)
    files = sorted(os.listdir(tmp_path))
    for stage in ("dynamo", "aten", "fused", "inference"):
        assert any(f.endswith(f"_{stage}.py") for f in files), files
    report = json.load(open(tmp_path / next(f for f in files if f.endswith("_report.json"))))
    assert report["fused"] == {"add_rms_norm[gemma]": 2}
    fused_code = open(tmp_path / next(f for f in files if f.endswith("_fused.py"))).read()
    assert "flag_gems.add_rms_norm" in fused_code and "rsqrt" not in fused_code


def test_explain_report_prints_a_table(device):
    m = ResidualBlock(16, "torch").to(device)
    x, r = rand(2, 16, device=device), rand(2, 16, device=device)
    report = flag_gems.explain(m, x, r)
    text = str(report)
    assert "fused" in text and "add_rms_norm[aten]" in text and "kept" in text


# ----------------------------------------------------------------- Inductor as a partner


def _norm_args(norm) -> tuple:
    """(eps, weight_offset, round_before_weight) of the fused op that replaces a norm module of NORMS
    (Llama's ``weight * hidden.to(dtype)`` rounds before the weight; Gemma's ``1 + weight`` in fp32 does not)."""
    if isinstance(norm, LlamaRMSNorm):
        return norm.variance_epsilon, 0.0, True
    if isinstance(norm, GemmaRMSNorm):
        return norm.eps, 1.0, False
    raise TypeError(f"no fused-op arguments known for {type(norm).__name__}")


def _check_residual_block_by_result(m, x, r, out, res, what):
    """ResidualBlock (llama or gemma norms) from its outputs alone, for code where the fused calls
    cannot be recorded (Inductor launches the kernels itself): ``res`` is call 2's h, the sum of
    ``p = proj(y1)`` (``y1`` = call 1's y of ``(x, r)``, rounded to the dtype as the kernel stores it)
    and call 1's rounded h, two roundings from float64 (``p`` by the GEMM, the sum by the kernel):
    within the forward tolerance of each; ``out`` is call 2's y, the norm of ``res`` with norm2's
    weight (forward tolerance)."""
    dtype = x.dtype
    atol, rtol = TOLERANCES[dtype]
    n1, n2 = m.norm1, m.norm2
    y1, h1 = _add_rms_norm_ref((x, r, n1.weight, *_norm_args(n1)))
    p = y1.to(dtype).double() @ ref64(m.proj.weight).T
    ref_res = p + h1.to(dtype).double()
    bound = (atol + rtol * p.abs()) + (atol + rtol * ref_res.abs())
    excess = (ref64(res) - ref_res).abs() - bound
    assert not torch.isnan(excess).any() and bool((excess <= 0).all()), (
        f"{what} residual (call 2's h) off by {excess.max().item():.3g} beyond the bound")
    # call 2's y from its rounded h (= res): the residual adds an exact zero
    ref_out, _ = _add_rms_norm_ref((res, torch.zeros_like(res), n2.weight, *_norm_args(n2)))
    assert_close(out, ref_out, dtype, f"{what} output (norm2 of the residual)")


def test_inductor_custom_pass_fuses_and_has_stable_uuid(device, monkeypatch):
    """The partner pass fuses both norms of the block. Proven by the result: with the Triton
    interpreter (the CPU) the fused op stays a call, recorded and checked per call; with compiled
    Triton the pass inlines our kernels into Inductor's code (``flag_gems.inductor``), so the op
    is never called: Inductor's code must define our kernel and call no flag_gems op, and the
    outputs must be the two fused calls' math."""
    from flag_gems.lowerings.inductor_ops import kernels_traceable

    m = ResidualBlock(32, "llama").to(device=device, dtype=torch.bfloat16)
    x, r = rand(2, 5, 32, dtype=torch.bfloat16, device=device), rand(2, 5, 32, dtype=torch.bfloat16, device=device)
    p = flag_gems.GemsFusionPass()
    assert p.uuid() == flag_gems.GemsFusionPass().uuid() == flag_gems.inductor_pass.uuid()
    assert p.uuid() != flag_gems.GemsFusionPass(fusions=("rms_norm",)).uuid()
    compiled = torch.compile(m, options={"post_grad_custom_post_pass": p, "fx_graph_cache": False})
    what = tag("inductor_pass", x.shape, torch.bfloat16)
    if kernels_traceable():
        from torch._inductor.utils import run_and_get_code

        with torch.no_grad():
            (out, res), code = run_and_get_code(compiled, x, r)
            out2, res2 = compiled(x, r)  # the compiled code again, without compiling
        code = "\n".join(code)
        assert sum(rep.fused["add_rms_norm[llama]"] for rep in p.reports) == 2
        assert "_rms_norm_fwd_kernel" in code, f"{what} Inductor's code does not define our kernel"
        assert "torch.ops.flag_gems." not in code, f"{what} a fused op is still an opaque call"
        for o, rs in ((out, res), (out2, res2)):
            _check_residual_block_by_result(m, x, r, o, rs, what)
        return
    calls = AddRmsNormCalls(monkeypatch)
    with torch.no_grad():
        out, res = calls.second_run(compiled, x, r)
    assert sum(rep.fused["add_rms_norm[llama]"] for rep in p.reports) == 2
    calls.check_residual_block(m, x, r, out, res, what)
    _check_residual_block_by_result(m, x, r, out, res, what)  # the GPU's check holds here too


def test_backend_hands_rewritten_graph_to_inductor(device, monkeypatch):
    """``options={"inductor": True}``: the backend fuses both norms of the block and hands the graph
    to Inductor. Proven as the partner pass's test proves it: with compiled Triton our kernels are
    inlined into Inductor's code (it defines our kernel, calls no flag_gems op, the report lists both
    ops lowered) and the outputs are the two fused calls' float64 math; with the interpreter the op
    stays a call, recorded and checked per call."""
    from flag_gems.backend import _collect
    from flag_gems.lowerings.inductor_ops import kernels_traceable

    m = ResidualBlock(32, "gemma").to(device=device, dtype=torch.bfloat16)
    x, r = rand(2, 5, 32, dtype=torch.bfloat16, device=device), rand(2, 5, 32, dtype=torch.bfloat16, device=device)
    compiled = torch.compile(m, backend="flag_gems", options={"inductor": True, "strict": True})
    what = tag("backend[inductor]", x.shape, torch.bfloat16)
    report = flag_gems.report.CompileReport()
    if kernels_traceable():
        from torch._inductor.utils import run_and_get_code

        with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False), _collect(report):
            (out, res), code = run_and_get_code(compiled, x, r)
            out2, res2 = compiled(x, r)  # the compiled code again, without compiling
        code = "\n".join(code)
        assert sum(g.fused["add_rms_norm[gemma]"] for g in report.graphs) == 2, str(report)
        lowered = sum(g.lowered["flag_gems.add_rms_norm -> inductor triton kernels"] for g in report.graphs)
        assert lowered == 2, f"{what} both fused calls must be inlined:\n{report}"
        assert "_rms_norm_fwd_kernel" in code, f"{what} Inductor's code does not define our kernel"
        assert "torch.ops.flag_gems." not in code, f"{what} a fused op is still an opaque call:\n{report}"
        for o, rs in ((out, res), (out2, res2)):
            _check_residual_block_by_result(m, x, r, o, rs, what)
        return
    calls = AddRmsNormCalls(monkeypatch)
    with torch.no_grad(), _collect(report):
        out, res = calls.second_run(compiled, x, r)
    assert sum(g.fused["add_rms_norm[gemma]"] for g in report.graphs) == 2, str(report)
    calls.check_residual_block(m, x, r, out, res, what)
    _check_residual_block_by_result(m, x, r, out, res, what)  # the GPU's check holds here too


# ----------------------------------------------------------------- graph semantics the backend must keep


class Norm(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.norm = LlamaRMSNorm(n)

    def forward(self, x, cache):
        cache.add_(x)  # mutation of a graph input
        y = self.norm(x + cache)
        return y, x.view(-1), x.t()  # aliasing outputs


@pytest.mark.parametrize("ctx", ["no_grad", "inference_mode", "grad"])
def test_input_mutation_aliasing_outputs_and_grad_modes(ctx, device):
    m = Norm(8).to(device)
    x = rand(8, 8, device=device)
    cache0 = rand(8, 8, device=device)
    cm = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": torch.enable_grad}[ctx]
    with cm():
        cache = cache0.clone()
        y, flat, xt = compile_strict(m)(x, cache)
        ref_cache = cache0.clone()
        ry, rflat, rxt = m(x, ref_cache)
    torch.testing.assert_close(cache, ref_cache)  # the in-place update reached the caller's tensor
    assert_close(y, ry.detach().double(), torch.float32, tag(f"backend[{ctx}].y", y.shape, torch.float32))
    assert flat.data_ptr() == x.data_ptr() and xt.data_ptr() == x.data_ptr()  # views stay views
    assert xt.stride() == rxt.stride()


def test_non_contiguous_inputs(device):
    m = ResidualBlock(24, "llama").to(device)
    x = rand(24, 5, 2, device=device).permute(2, 1, 0)
    r = rand(2, 10, 24, device=device)[:, ::2]
    with torch.no_grad():
        out, res = compile_strict(m)(x, r)
    ref_out, ref_res = _reference(m, x, r)
    assert_close(out, ref_out, torch.float32, tag("backend[non-contiguous]", out.shape, torch.float32))
    assert_close(res, ref_res, torch.float32, tag("backend[non-contiguous].res", res.shape, torch.float32))


@pytest.mark.parametrize("bound", ["device", "host", "host, lower_aten='device'"])
def test_aten_lowering_follows_the_graph_policy(device, monkeypatch, bound):
    """lower_aten rewrites the nodes whose entry's policy is on, and no other: ``graph`` for a
    device-bound graph (or with ``lower_aten="device"``), ``graph_host`` (host time per call
    counts) for a host-bound one run without CUDA graphs. Proven by which implementations ran
    (counted after they returned) and by the compiled result."""
    import collections
    import dataclasses

    from flag_gems.lowerings.registry import REGISTRY
    from flag_gems.passes import lower_aten as lower_aten_pass

    aten = torch.ops.aten
    targets = [aten.cumsum.default, aten._softmax.default, aten.exp.default, aten.neg.default]
    # host-bound: more host than device time in the estimate (1 vs 0 µs), device-bound the reverse
    monkeypatch.setattr(lower_aten_pass, "step_estimate", lambda gm: (1.0, 0.0) if bound == "host" else (0.0, 1.0))
    forced = "lower_aten" in bound
    policy = {t: REGISTRY[t].graph_policy(cudagraphs=bound == "device" or forced).on for t in targets}
    if bound != "host":
        assert any(policy.values()) and not all(policy.values()), f"pick ops on both sides of the policy: {policy}"
    ran = collections.Counter()

    def counting(t, impl):
        def impl_counted(*args, **kwargs):
            out = impl(*args, **kwargs)
            ran[t] += 1
            return out

        return impl_counted

    for t in targets:
        monkeypatch.setitem(REGISTRY, t, dataclasses.replace(REGISTRY[t], impl=counting(t, REGISTRY[t].impl)))

    def f(x):
        return torch.cumsum(x, -1).softmax(-1).exp().neg()

    x = rand(5, 7, device=device)
    options = {**STRICT, "lower_aten": "device"} if forced else STRICT
    out = torch.compile(f, backend="flag_gems", options=options, fullgraph=True)(x)
    assert {t: ran[t] == 1 for t in targets} == policy, (dict(ran), policy)
    ref = -torch.exp(torch.softmax(torch.cumsum(ref64(x), -1), -1))
    assert_close(out, ref, torch.float32, tag("cumsum-softmax-exp-neg (compiled)", x.shape, x.dtype))
    # lower_aten=False: nothing lowered, whatever the policy.
    torch._dynamo.reset()
    ran.clear()
    torch.compile(f, backend="flag_gems", options={**STRICT, "lower_aten": False}, fullgraph=True)(x)
    assert not ran, dict(ran)


def test_graph_break_code_still_compiles_around_it(device):
    m = ResidualBlock(16, "llama").to(device)

    def f(x, r):
        out, res = m(x, r)
        print_me = out.sum().item()  # a graph break between two compiled graphs
        return m(out * (print_me > -1e9), res)

    x, r = rand(2, 16, device=device), rand(2, 16, device=device)
    with torch.no_grad():
        report = flag_gems.explain(f, x, r)
        out, res = torch.compile(f, backend="flag_gems", options=STRICT)(x, r)
        ref_out, ref_res = f(x, r)
    assert len(report.graphs) == 2 and report.fused["add_rms_norm"] == 4, str(report)
    assert_close(out, ref64(ref_out), torch.float32, tag("backend[graph break]", out.shape, torch.float32))


def test_pattern_kept_when_fused_op_refuses_inputs(device, monkeypatch):
    """CPU tensors outside interpreter mode: the op's fake refuses them, the pattern stays aten."""
    if device != "cpu":
        pytest.skip("CPU-only situation")
    import flag_gems.kernels._common as common
    import flag_gems.lowerings._utils as lowering_utils

    monkeypatch.setattr(common, "interpreter_mode", lambda: False)
    monkeypatch.setattr(lowering_utils, "interpreter_mode", lambda: False)  # the aten entries' supports() too
    m = ResidualBlock(16, "llama")
    x, r = rand(2, 16), rand(2, 16)
    with torch.no_grad():
        report = flag_gems.explain(m, x, r, options=STRICT)
        out, res = compile_strict(m)(x, r)
    assert sum(report.fused.values()) == 0
    assert any("refuses" in reason for reason in report.graphs[0].kept["rms_norm pattern"]), str(report)
    torch.testing.assert_close(out, m(x, r)[0])


def test_report_times_the_stages_and_the_first_call(device):
    """``GraphReport.timings``: the backend's stages, then the compiled graph's first run (where its
    Triton kernels compile), each once; later calls add nothing."""
    m = ResidualBlock(48, "llama").to(device)
    x, r = rand(2, 5, 48, device=device), rand(2, 5, 48, device=device)
    torch._dynamo.reset()
    with torch.no_grad():
        report = flag_gems.explain(m, x, r, options=STRICT)
    (g,) = report.graphs
    stages = ("pre-dispatch trace", "fusions", "inference passes", "inference wrapper", "AOT autograd",
              "inference first call")
    if device == "cuda" and os.environ.get("GEMS_PRECOMPILE", "1") != "0":
        stages += ("inference precompile",)  # compiled Triton on CUDA: kernels compiled before the first run
    assert set(g.timings) == set(stages) and all(v > 0 for v in g.timings.values()), g.timings
    # the post-autograd stages run inside AOT autograd
    inside = ("inference passes", "inference wrapper", "inference precompile")
    assert sum(g.timings.get(s, 0.0) for s in inside) <= g.timings["AOT autograd"]
    assert "compile time: pre-dispatch trace" in g.table() and g.to_dict()["timings"] == g.timings
    from flag_gems.backend import _collect
    from flag_gems.report import CompileReport

    torch._dynamo.reset()
    f = torch.compile(m, backend="flag_gems", options=STRICT)
    with torch.no_grad(), _collect(CompileReport()) as rep:
        want = f(x, r)
    first = dict(rep.graphs[0].timings)
    with torch.no_grad():
        got = f(x, r)
    assert rep.graphs[0].timings == first and "inference first call" in first
    assert all(torch.equal(a, b) for a, b in zip(got, want))
