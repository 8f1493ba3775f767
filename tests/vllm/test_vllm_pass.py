"""``flag_gems.vllm_pass`` (mode 3) inside vLLM's own ``PostGradPassManager``, on graphs traced from
real vLLM layers: the graph after holds our ops instead of vLLM's, and the numbers match a
float64 reference.

The graphs go through Inductor's real pipeline up to code generation (vllm_helpers.post_grad_backend:
AOT autograd with Inductor's decompositions, vLLM's pre-grad IR functionalization, Inductor's
post-grad passes with vLLM's manager as the custom post pass), then run as they are: CPU code
generation would cost minutes per graph on CI.
"""

import os
import pickle

import pytest
import torch

from vllm_helpers import act_math, import_vllm_or_skip, post_grad_backend, rms_math, rope_math, targets

vllm = import_vllm_or_skip()

import flag_gems  # noqa: E402
from accuracy import assert_close, rand, tag  # noqa: E402
from flag_gems.vllm.fusion_pass import GemsVllmPass  # noqa: E402

DT = torch.bfloat16


@pytest.fixture
def compile_with_vllm_passes(vllm_config, fresh_dynamo):
    """``compile(fn, *args)``: fn compiled through vLLM's pass manager with a strict GemsVllmPass;
    returns (outputs, the post-grad graph, the pass's report)."""
    from vllm.compilation.passes.inductor_pass import pass_context
    from vllm.compilation.passes.ir.inplace_functionalization import VllmIRInplaceFunctionalizationPass
    from vllm.compilation.passes.pass_manager import PostGradPassManager
    from vllm.config.utils import Range

    def run(fn, *args, dynamic=True, gems=True):
        manager = PostGradPassManager()
        manager.configure(vllm_config)
        gems = GemsVllmPass(strict=True) if gems else None
        if gems is not None:
            manager.add(gems)
        graphs = []
        backend = post_grad_backend(manager, graphs, VllmIRInplaceFunctionalizationPass(vllm_config))
        if dynamic:
            for a in args:
                if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] > 1:
                    torch._dynamo.mark_dynamic(a, 0)
        with pass_context(Range(1, 8192)), torch.no_grad():
            out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
        assert len(graphs) == 1
        return out, graphs[0], gems.report() if gems is not None else None

    return run


def _layers():
    from vllm.model_executor.layers import activation, layernorm, rotary_embedding

    return layernorm, activation, rotary_embedding


def _norm(hidden=64):
    layer = _layers()[0].RMSNorm(hidden, 1e-6, dtype=DT)
    with torch.no_grad():
        layer.weight.normal_(1.0, 0.3)
    return layer


def test_rms_norm_ir_ops_become_flag_gems_ops(compile_with_vllm_passes):
    norm = _norm()
    x, r = rand(6, 64, dtype=DT), rand(6, 64, dtype=DT)

    def f(x, r):
        y = norm(x.clone())
        y2, h = norm(x.clone(), r.clone())
        return y, y2, h

    (y, y2, h), gm, report = compile_with_vllm_passes(f, x, r)
    ops = targets(gm)
    assert "flag_gems.rms_norm.default" in ops and "flag_gems.add_rms_norm.default" in ops, ops
    assert not any(o.startswith("vllm_ir.") for o in ops), ops
    w = norm.weight.data
    assert_close(y, rms_math(x, w, 1e-6)[0], DT, tag("vllm_pass rms_norm", x.shape, DT))
    ry, rh = rms_math(x, w, 1e-6, r)
    assert_close(y2, ry, DT, tag("vllm_pass add_rms_norm y", x.shape, DT))
    assert_close(h, rh, DT, tag("vllm_pass add_rms_norm h", x.shape, DT))
    assert report.fused["rms_norm"] == 1 and report.fused["add_rms_norm"] == 1, report


@pytest.mark.parametrize("kind", ["silu", "none", "tanh"])
def test_native_act_and_mul_becomes_the_fused_op(compile_with_vllm_passes, kind):
    _, activation, _ = _layers()
    layer = activation.SiluAndMul() if kind == "silu" else activation.GeluAndMul(approximate=kind)
    x = rand(6, 96, dtype=DT)
    out, gm, report = compile_with_vllm_passes(lambda x: layer(x), x)
    op = "silu_and_mul_fused" if kind == "silu" else "gelu_and_mul_fused"
    assert f"flag_gems.{op}.default" in targets(gm), targets(gm)
    assert not {"aten.sigmoid.default", "aten.exp.default", "aten.gelu.default"} & targets(gm), targets(gm)
    assert_close(out, act_math(x, kind), DT, tag(f"vllm_pass {type(layer).__name__}({kind})", x.shape, DT))
    assert report.fused["act_and_mul"] == 1, report


@pytest.mark.parametrize("is_neox,rotary_dim", [(True, 16), (True, 32), (False, 32)],
                         ids=["neox_partial", "neox", "gptj"])
def test_native_rope_becomes_one_flag_gems_launch(compile_with_vllm_passes, is_neox, rotary_dim):
    _, _, rope = _layers()
    layer = rope.get_rope(32, 512, is_neox_style=is_neox,
                          rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": rotary_dim / 32}, dtype=DT)
    pos = torch.randint(0, 512, (6,))
    q, k = rand(6, 4 * 32, dtype=DT), rand(6, 2 * 32, dtype=DT)
    (qo, ko), gm, report = compile_with_vllm_passes(lambda p, q, k: layer(p, q, k), pos, q, k)
    assert "flag_gems.rotary_embedding_cache.default" in targets(gm), targets(gm)
    for name, out, x in (("q", qo, q), ("k", ko, k)):
        ref = rope_math(pos, x, 32, layer.cos_sin_cache, is_neox)
        assert_close(out, ref, DT, tag(f"vllm_pass rope(neox={is_neox}, rot={rotary_dim}) {name}", x.shape, DT))
    assert report.fused["rotary_embedding"] == 1, report


def test_deepseek_yarn_interleaved_rope_is_fused(compile_with_vllm_passes):
    _, _, rope = _layers()
    params = {"rope_type": "deepseek_yarn", "rope_theta": 10000.0, "factor": 4.0,
              "original_max_position_embeddings": 256, "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
              "mscale_all_dim": 0.707}
    layer = rope.get_rope(32, 1024, is_neox_style=False, rope_parameters=params, dtype=DT)
    pos = torch.randint(0, 1024, (6,))
    q, k = rand(6, 4, 32, dtype=DT), rand(6, 1, 32, dtype=DT)
    (qo, ko), gm, report = compile_with_vllm_passes(lambda p, q, k: layer(p, q, k), pos, q, k)
    assert any(o.startswith("flag_gems.rotary_embedding") for o in targets(gm)), targets(gm)
    assert "aten.neg.default" not in targets(gm), targets(gm)
    for name, out, x in (("q", qo, q), ("k", ko, k)):
        ref = rope_math(pos, x, 32, layer.cos_sin_cache, False)
        assert_close(out, ref, DT, tag(f"vllm_pass deepseek_yarn rope {name}", x.shape, DT))
    assert report.fused["rotary_embedding"] == 1, report


def test_functionalized_c_ops_become_flag_gems_ops(compile_with_vllm_passes, c_ops):
    """Enabled CustomOps on a GPU build call torch.ops._C.*: functionalized in the post-grad graph."""
    from vllm import _custom_ops as ops

    _, activation, rope = _layers()
    silu, gelu = activation.SiluAndMul(), activation.GeluAndMul(approximate="tanh")
    silu.op, gelu.op = torch.ops._C.silu_and_mul, torch.ops._C.gelu_tanh_and_mul  # what __init__ binds on CUDA
    layer = rope.get_rope(32, 512, is_neox_style=True, rope_parameters={"rope_theta": 10000.0}, dtype=DT)
    w = rand(64, dtype=DT)
    x, r, a = rand(6, 64, dtype=DT), rand(6, 64, dtype=DT), rand(6, 96, dtype=DT)
    pos, q, k = torch.randint(0, 512, (6,)), rand(6, 4 * 32, dtype=DT), rand(6, 2 * 32, dtype=DT)

    def f(x, r, a, pos, q, k):
        y = torch.empty_like(x)
        ops.rms_norm(y, x, w, 1e-6)
        x2, r2 = x.clone(), r.clone()
        ops.fused_add_rms_norm(x2, r2, w, 1e-6)
        q2, k2 = layer.forward_cuda(pos, q.clone(), k.clone())
        return y, x2, r2, silu.forward_cuda(a), gelu.forward_cuda(a), q2, k2

    outs, gm, report = compile_with_vllm_passes(f, x, r, a, pos, q, k)
    ops_after = targets(gm)
    assert not any(o.startswith("_C.") for o in ops_after), ops_after
    for op in ("rms_norm", "add_rms_norm", "silu_and_mul_fused", "gelu_and_mul_fused", "rotary_embedding_cache"):
        assert f"flag_gems.{op}.default" in ops_after, (op, ops_after)
    y, x2, r2, s, g, q2, k2 = outs
    assert_close(y, rms_math(x, w, 1e-6)[0], DT, tag("vllm_pass _C.rms_norm", x.shape, DT))
    ry, rh = rms_math(x, w, 1e-6, r)
    assert_close(x2, ry, DT, tag("vllm_pass _C.fused_add_rms_norm y", x.shape, DT))
    assert_close(r2, rh, DT, tag("vllm_pass _C.fused_add_rms_norm h", x.shape, DT))
    assert_close(s, act_math(a, "silu"), DT, tag("vllm_pass _C.silu_and_mul", a.shape, DT))
    assert_close(g, act_math(a, "tanh"), DT, tag("vllm_pass _C.gelu_tanh_and_mul", a.shape, DT))
    assert_close(q2, rope_math(pos, q, 32, layer.cos_sin_cache, True), DT, tag("vllm_pass _C.rope q", q.shape, DT))
    assert_close(k2, rope_math(pos, k, 32, layer.cos_sin_cache, True), DT, tag("vllm_pass _C.rope k", k.shape, DT))
    assert sum(report.fused.values()) == 5, report


def test_unfusable_silu_keeps_inductors_spelling(compile_with_vllm_passes):
    """A SiLU times a broadcast weight is respelled for the matcher, refused, and restored."""
    w = rand(48, dtype=DT)
    x = rand(6, 48, dtype=DT)
    out, gm, report = compile_with_vllm_passes(lambda x: torch.nn.functional.silu(x) * w, x)
    assert not any(o.startswith("flag_gems.") for o in targets(gm)), targets(gm)
    assert "aten.sigmoid.default" not in targets(gm) and "aten.exp.default" in targets(gm), targets(gm)
    assert any("1 unfused one(s) restored" in n for n in report.graphs[0].notes), report
    ref = torch.nn.functional.silu(x.double()) * w.double()
    assert_close(out, ref, DT, tag("vllm_pass silu * weight (unfused)", x.shape, DT))


# ------------------------------------------------------------------ installation, cache keys, dumps


def test_vllm_resolves_the_pass_by_qualified_name_and_its_backend_adds_it(vllm_config, monkeypatch):
    from vllm.config import CompilationConfig

    # vLLM looks "flag_gems.vllm_pass" up in flag_gems' __dict__: the plugin (loaded by vLLM's
    # engine arguments before they build the config) puts it there, also with GEMS_VLLM unset.
    monkeypatch.delenv("GEMS_VLLM", raising=False)
    flag_gems.vllm.register()
    cc = CompilationConfig(inductor_passes={"post_grad_custom_post_pass": "flag_gems.vllm_pass"})
    assert cc.inductor_compile_config["post_grad_custom_post_pass"] is flag_gems.vllm_pass
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.compilation.backends import VllmBackend

    cfg = VllmConfig(compilation_config=cc)
    with set_current_vllm_config(cfg):
        backend = VllmBackend(cfg)
        backend.configure_post_pass()
    assert any(p is flag_gems.vllm_pass for p in backend.pass_manager.passes)


def test_uuid_hashes_settings_and_sources_and_pickling_drops_reports():
    a, b = GemsVllmPass(), GemsVllmPass()
    assert a.uuid() == b.uuid() and len(a.uuid()) == 64
    assert GemsVllmPass(fusions=("rms_norm",)).uuid() != a.uuid()
    a.reports.append("a report")
    c = pickle.loads(pickle.dumps(a))  # vLLM's config (with the pass in it) goes to worker processes
    assert c.reports == [] and c.fusions == a.fusions and c.uuid() == a.uuid()


def test_dumps_and_report_go_to_gems_dump_dir(compile_with_vllm_passes, tmp_path, monkeypatch):
    monkeypatch.setenv("GEMS_DUMP_DIR", str(tmp_path))
    _, activation, _ = _layers()
    layer = activation.SiluAndMul()
    compile_with_vllm_passes(lambda x: layer(x), rand(4, 32, dtype=DT))
    (d,) = os.listdir(tmp_path)
    files = sorted(os.listdir(tmp_path / d))
    assert files == ["graph_000_after.py", "graph_000_before.py", "graph_000_vllm post-grad_report.json",
                     "graph_000_vllm post-grad_report.txt"], files
    assert "silu_and_mul_fused" in (tmp_path / d / "graph_000_after.py").read_text()
    assert "act_and_mul" in (tmp_path / d / "graph_000_vllm post-grad_report.txt").read_text()


def test_without_the_pass_vllms_ir_lowering_picks_the_patched_provider(compile_with_vllm_passes, unpatched):
    """The patches' IR route in compiled graphs: vLLM's own lowering traces our provider."""
    from flag_gems.vllm import apply_gems_patches_to_vllm

    assert apply_gems_patches_to_vllm(ops=["rms_norm"]) == {"rms_norm": "ir"}
    norm = _norm()
    x, r = rand(6, 64, dtype=DT), rand(6, 64, dtype=DT)

    def f(x, r):
        return norm(x.clone()), *norm(x.clone(), r.clone())

    (y, y2, h), gm, _ = compile_with_vllm_passes(f, x, r, gems=False)
    ops = targets(gm)
    assert "flag_gems.rms_norm.default" in ops and "flag_gems.fused_add_rms_norm.default" in ops, ops
    w = norm.weight.data
    assert_close(y, rms_math(x, w, 1e-6)[0], DT, tag("vllm IR lowering -> flag_gems rms_norm", x.shape, DT))
    ry, rh = rms_math(x, w, 1e-6, r)
    assert_close(y2, ry, DT, tag("vllm IR lowering -> flag_gems fused_add_rms_norm y", x.shape, DT))
    assert_close(h, rh, DT, tag("vllm IR lowering -> flag_gems fused_add_rms_norm h", x.shape, DT))
