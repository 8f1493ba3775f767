"""Dynamo's control-flow exceptions go through the backend (never reported as a fallback), and
``mode="reduce-overhead"`` without CUDA runs without CUDA graphs with one warning."""

import warnings

import pytest
import torch

import flag_gems
from flag_gems.kernels import _common
from flag_gems.backend import GemsCompiler, _collect
from flag_gems.options import CompileOptions
from flag_gems.report import CompileReport, GraphReport
from flag_gems.signals import is_dynamo_signal
from accuracy import assert_close, rand, ref64, tag
from test_backend import ResidualBlock, _reference

exc = torch._dynamo.exc

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def test_signals_are_told_from_failures():
    assert is_dynamo_signal(exc.TensorifyScalarRestartAnalysis())
    assert is_dynamo_signal(exc.SpeculationRestartAnalysis())
    assert is_dynamo_signal(exc.SkipFrame("skip"))
    assert not is_dynamo_signal(RuntimeError("a pass bug"))
    assert not is_dynamo_signal(exc.InternalTorchDynamoError("an error, not a signal"))


def test_float_specialization_restart_is_not_a_fallback(device):
    """``x.pow(s)`` with a Python float that changes between calls: AOT autograd asks Dynamo to
    restart with ``s`` specialized (TensorifyScalarRestartAnalysis). Before, the backend caught
    it and ran the unmodified graph with a "compiling the rewritten graph failed" warning."""

    def f(x, w, s):
        return torch.nn.functional.rms_norm(x.pow(s), (16,), w)

    report = CompileReport()
    compiled = torch.compile(f, backend=GemsCompiler(CompileOptions()))
    x, w = rand(4, 16, device=device).abs() + 0.5, rand(16, device=device)
    with _collect(report), warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        outs = [compiled(x, w, s) for s in (2.0, 3.0, 1.5)]
    assert not report.fallbacks, str(report)
    assert report.graphs and report.fused["rms_norm"] == len(report.graphs), str(report)
    for s, out in zip((2.0, 3.0, 1.5), outs):
        ref = torch.nn.functional.rms_norm(ref64(x).pow(s), (16,), ref64(w))
        assert_close(out, ref, torch.float32, tag(f"restart.pow[{s}]", out.shape, torch.float32))


@pytest.mark.parametrize("where", ["fusion pass", "aot"])
def test_a_signal_raised_inside_the_backend_reaches_dynamo(where, monkeypatch, device):
    """A restart raised by a pass or by AOT autograd propagates (Dynamo restarts the frame),
    even with strict off; the abandoned graph leaves no report behind."""
    import flag_gems.backend as backend

    raised = []

    def restart(*args, **kwargs):
        if not raised:
            raised.append(where)
            raise exc.TensorifyScalarRestartAnalysis()
        return original(*args, **kwargs)

    if where == "fusion pass":
        original = backend.FUSION_PASSES["rms_norm"]
        monkeypatch.setitem(backend.FUSION_PASSES, "rms_norm", restart)
    else:
        import torch._functorch.aot_autograd as aot

        original = aot.aot_module_simplified
        monkeypatch.setattr(aot, "aot_module_simplified", restart)
    m = ResidualBlock(16, "llama").to(device)
    x, r = rand(2, 16, device=device), rand(2, 16, device=device)
    report = CompileReport()
    with _collect(report), torch.no_grad():
        out, res = torch.compile(m, backend=GemsCompiler(CompileOptions()))(x, r)
    assert raised == [where]
    assert len(report.graphs) == 1 and not report.fallbacks, str(report)  # the restarted compile only
    assert report.fused["add_rms_norm"] == 2, str(report)
    ref_out, _ = _reference(m, x, r)
    assert_close(out, ref_out, torch.float32, tag("restart.block", out.shape, torch.float32))


def test_a_real_failure_still_falls_back(monkeypatch, device):
    import flag_gems.backend as backend

    def broken(gm, report):
        raise RuntimeError("a pass bug")

    monkeypatch.setitem(backend.FUSION_PASSES, "rms_norm", broken)
    m = ResidualBlock(16, "llama").to(device)
    x, r = rand(2, 16, device=device), rand(2, 16, device=device)
    report = CompileReport()
    with _collect(report), torch.no_grad():
        out, _ = torch.compile(m, backend=GemsCompiler(CompileOptions()))(x, r)
    assert report.fallbacks and "a pass bug" in report.fallbacks[0][1]
    ref_out, _ = _reference(m, x, r)
    assert_close(out, ref_out, torch.float32, tag("fallback.block", out.shape, torch.float32))


def test_optional_pass_lets_a_signal_through():
    compiler = GemsCompiler(CompileOptions())

    def skip():
        raise exc.SkipFrame("not this frame")

    with pytest.raises(exc.SkipFrame):
        compiler._optional_pass(GraphReport(0), "a pass", skip)
    report = GraphReport(0)
    compiler._optional_pass(report, "a pass", lambda: 1 / 0)
    assert report.notes and "ZeroDivisionError" in report.notes[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only case")
def test_reduce_overhead_without_cuda_runs_with_one_warning(monkeypatch):
    monkeypatch.setattr(_common, "_WARNED", set())
    m = ResidualBlock(16, "llama")
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for shape in ((2, 16), (3, 5, 16)):  # two graphs, one warning
            x, r = rand(*shape), rand(*shape)
            out, res = torch.compile(m, backend="flag_gems", mode="reduce-overhead")(x, r)
            torch._dynamo.reset()
            ref_out, ref_res = _reference(m, x, r)
            assert_close(out, ref_out, torch.float32, tag("reduce_overhead.cpu", out.shape, torch.float32))
        f = torch.compile(m, backend="flag_gems", options={"inductor": True, "cudagraphs": True})
        out, _ = f(x, r)
        assert_close(out, ref_out, torch.float32, tag("inductor_cudagraphs.cpu", out.shape, torch.float32))
    ours = [w for w in caught if "flag_gems" in str(w.message)]
    assert len(ours) == 1 and issubclass(ours[0].category, UserWarning), [str(w.message) for w in caught]
    assert "CUDA graphs" in str(ours[0].message) and "without CUDA graphs" in str(ours[0].message)
