"""The post-autograd pass that makes compiled graphs call flag_gems' functions without the dispatcher."""

import torch
from torch import fx

import flag_gems  # noqa: F401  (registers the ops)
from flag_gems.passes.direct_calls import direct_calls, direct_impl
from accuracy import assert_close, rand, ref64, tag

ops = torch.ops.flag_gems


def test_only_functional_flag_gems_ops_are_mapped():
    assert callable(direct_impl(ops.add_rms_norm.default))
    assert callable(direct_impl(ops.silu_and_mul_fused_backward.default))
    assert direct_impl(ops.fused_add_rms_norm.default) is None  # mutates its inputs
    assert direct_impl(ops.rotary_embedding_cache_.default) is None
    assert direct_impl(torch.ops.aten.add.Tensor) is None
    assert direct_impl(torch.add) is None


def test_rewritten_graph_gives_the_same_tensors(device):
    def f(x, r, w):
        y, h = ops.add_rms_norm.default(x, r, w, 1e-6)
        return ops.silu_and_mul_fused.default(torch.cat([y, h], -1)), h

    gm = fx.symbolic_trace(f)
    x, r = rand(3, 40, dtype=torch.bfloat16, device=device), rand(3, 40, dtype=torch.bfloat16, device=device)
    w = rand(40, dtype=torch.bfloat16, device=device)
    want = gm(x, r, w)
    assert direct_calls(gm) == 2
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert not any(isinstance(t, torch._ops.OpOverload) and t.namespace == "flag_gems" for t in targets)
    got = gm(x, r, w)
    for g, e in zip(got, want):
        assert g.dtype == e.dtype and torch.equal(g, e)


def test_compiled_inference_graph_bypasses_the_dispatcher(device, monkeypatch):
    """The RMSNorm pattern is fused into add_rms_norm, and the compiled graph calls its Python
    implementation directly: never through the dispatcher, and the direct call returns each time."""
    import flag_gems.passes.direct_calls as dc

    real = direct_impl(ops.add_rms_norm.default)
    dispatched, direct = [], []

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        direct.append(1)  # after the kernel returned
        return out

    def patched_direct_impl(op):
        return counting if op is ops.add_rms_norm.default else direct_impl(op)

    monkeypatch.setattr(dc, "direct_impl", patched_direct_impl)

    def m(x, r, w):
        h = x + r
        hf = h.float()
        return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype) * w, h

    x, r = rand(4, 32, dtype=torch.bfloat16, device=device), rand(4, 32, dtype=torch.bfloat16, device=device)
    w = rand(32, dtype=torch.bfloat16, device=device)
    torch._dynamo.reset()
    f = torch.compile(m, backend="flag_gems", options={"strict": True}, fullgraph=True)
    with torch.no_grad():
        out = f(x, r, w)  # compiles, runs
        assert direct == [1], "the pattern was not fused into a direct add_rms_norm call"
        # The op's dispatcher entry must not run once compiled: count any call that reaches it.
        monkeypatch.setattr(ops.add_rms_norm.default, "_op", lambda *a, **k: dispatched.append(1) or real(*a, **k))
        again = f(x, r, w)
        assert dispatched == [] and direct == [1, 1]
        ops.add_rms_norm.default(x, r, w, 1e-6)  # the patch does intercept dispatcher calls
    assert dispatched == [1] and torch.equal(out[0], again[0]) and torch.equal(out[1], again[1])
    h64 = ref64(x) + ref64(r)
    y64 = h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + 1e-6) * ref64(w)
    assert_close(out[1], h64, torch.bfloat16, tag("direct add_rms_norm h", x.shape, torch.bfloat16))
    assert_close(out[0], y64, torch.bfloat16, tag("direct add_rms_norm y", x.shape, torch.bfloat16))
