"""The pointwise fusion pass: which aten ops it groups into generated kernels, and that those
kernels compute what torch computes (float64 references, poisoned outputs, mixed dtypes,
broadcasting, strided inputs, dynamic shapes, in-place ops, a tiny HF Llama)."""

import copy
import json

import pytest
import torch
import torch._dynamo.testing
from torch.fx.experimental.proxy_tensor import make_fx

import flag_gems
from flag_gems.kernels.pointwise_fused import fused_kernel_cache_info
from flag_gems.passes import pointwise_fusion as pf
from flag_gems.passes.pointwise_rules import native_kernels
from flag_gems.report import GraphReport
from accuracy import DTYPE_IDS, DTYPES, assert_close, rand, tag

aten = torch.ops.aten
pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every output a generated kernel writes starts as NaN (integers: -123, bool: True)."""

    def empty(size, stride, dtype, device):
        t = torch.empty_strided(size, stride, dtype=dtype, device=device)
        return t.fill_(float("nan") if dtype.is_floating_point else (True if dtype is torch.bool else -123))

    monkeypatch.setattr(pf, "EMPTY_STRIDED", empty)


def fuse(f, *args, mode="fake"):
    """``f`` traced to aten (``make_fx``), then the pass; returns (graph, report)."""
    gm = make_fx(f, tracing_mode=mode)(*args)
    report = GraphReport(0)
    pf.fuse_pointwise(gm, report)
    return gm, report


def fused(gm) -> list:
    return [n for n in gm.graph.nodes if hasattr(n.target, "gems_launch")]


def aten_ops(gm) -> list:
    """The aten ops left in the graph that launch a kernel."""
    return [str(n.target) for n in gm.graph.nodes
            if isinstance(n.target, torch._ops.OpOverload) and native_kernels(n)]


def as64(*ts):
    return [t.detach().double() if t.is_floating_point() else t for t in ts]


# ----------------------------------------------------------------- grouping


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_chain_becomes_one_kernel(dtype, device):
    def f(x, y, w):
        return ((x * y + w).sigmoid() * 2.0 - x).tanh()

    x, y, w = rand(5, 33, dtype=dtype, device=device), rand(5, 33, dtype=dtype, device=device), rand(33, dtype=dtype, device=device)
    gm, report = fuse(f, x, y, w)
    assert len(fused(gm)) == 1 and aten_ops(gm) == [], gm.code
    assert sum(report.generated.values()) == 1
    out = gm(x, y, w)
    assert out.dtype == dtype and out.shape == x.shape and out.stride() == f(x, y, w).stride()
    assert_close(out, f(*as64(x, y, w)), dtype, tag("fused(mul,add,sigmoid,mul,sub,tanh)", x.shape, dtype))


def test_single_op_is_left_to_aten(device):
    x, y = rand(4, 8, device=device), rand(4, 8, device=device)
    gm, _ = fuse(lambda a, b: a + b, x, y)
    assert fused(gm) == [] and aten_ops(gm) == ["aten.add.Tensor"]
    # a lone cast is lowered (measured faster than the native copy), as is a lone pad (two native kernels)
    gm, _ = fuse(lambda a: a.to(torch.bfloat16), x)
    assert len(fused(gm)) == 1 and torch.equal(gm(x), x.to(torch.bfloat16))
    gm, _ = fuse(lambda a: torch.nn.functional.pad(a, (1, 2)), x)
    assert len(fused(gm)) == 1 and torch.equal(gm(x), torch.nn.functional.pad(x, (1, 2)))


def test_mixed_dtypes_promote_as_torch(device):
    def f(h, w, i, m):
        a = h * w  # bf16 * fp32 -> fp32
        b = a + i  # fp32 + int64 -> fp32
        c = torch.where(m, b, i.to(torch.float16))  # bool condition, fp32 / fp16 -> fp32
        return c, (i * 3 + 1) // 1, (a > 0) & m, h.to(torch.float32) / 4

    h = rand(3, 17, dtype=torch.bfloat16, device=device)
    w = rand(17, device=device)
    i = torch.randint(-50, 50, (3, 17), device=device)
    m = torch.rand(3, 17, device=device) > 0.5
    gm, _ = fuse(f, h, w, i, m)
    assert fused(gm), gm.code
    got, want = gm(h, w, i, m), f(h, w, i, m)
    for k, (g, e) in enumerate(zip(got, want)):
        assert g.dtype == e.dtype and g.shape == e.shape, f"[output {k}] {g.dtype} {g.shape} vs {e.dtype} {e.shape}"
    ref = f(h.double(), w.double(), i, m)
    assert_close(got[0], ref[0].float(), torch.float32, "[op=where(mixed) output 0]")
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    assert torch.equal(got[3], want[3])  # exact: a cast then a division by a power of two


def test_broadcasting_and_strided_inputs(device):
    def f(x, y, z):
        a = (x * y).exp()  # [4, 6] (x transposed, y broadcast)
        b = a.t() + z  # the transpose of an intermediate
        return b.reshape(3, 8).sin() * 2, a[:, 1::2] - 1  # a reshape, a strided slice of an intermediate

    x = rand(6, 4, device=device).t()  # non-contiguous
    y = rand(12, device=device)[::2]  # stride 2
    z = rand(1, 4, device=device).expand(6, 4)  # stride 0
    assert not x.is_contiguous() and y.stride() == (2,) and z.stride() == (0, 1)
    gm, _ = fuse(f, x, y, z)
    assert len(fused(gm)) == 2 and aten_ops(gm) == [], gm.code
    got, ref = gm(x, y, z), f(*as64(x, y, z))
    for k, (g, r) in enumerate(zip(got, ref)):
        assert_close(g, r, torch.float32, f"[op=broadcast/strided output {k} shape={tuple(r.shape)}]")
        assert g.stride() == f(x, y, z)[k].stride()


def test_mask_construction_and_index_ops(device):
    # HF's causal / padding mask: aranges, comparisons, index with index tensors, bitwise_and, where
    # over 0-d constants, constant_pad_nd; and masked_fill, cat, new_ones.
    def f(pos, keep):
        q = torch.arange(5, device=pos.device)
        kv = torch.arange(7, device=pos.device) - 2
        causal = kv[None, :] <= q[:, None]
        allowed = causal[None] & keep[:, None, :]  # [B, 5, 7]
        idx = pos[:, :, None].expand(2, 5, 7)
        picked = allowed[torch.arange(2, device=pos.device)[:, None, None], idx % 5, torch.arange(7, device=pos.device)]
        bias = torch.where(picked, torch.scalar_tensor(0.0, device=pos.device), torch.scalar_tensor(float("-inf"), device=pos.device))
        padded = torch.nn.functional.pad(bias, (0, 3), value=-1.0)
        filled = padded.masked_fill(padded < -1.5, -7.0)
        return torch.cat([filled, pos.new_ones(2, 5, 2).float()], -1)

    pos = torch.randint(0, 5, (2, 5), device=device)
    keep = torch.rand(2, 7, device=device) > 0.3
    gm, _ = fuse(f, pos, keep)
    assert len(fused(gm)) == 1 and aten_ops(gm) == [], gm.code
    got, want = gm(pos, keep), f(pos, keep)
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_rope_table_is_one_kernel_with_two_outputs(device):
    # HF LlamaRotaryEmbedding: inv_freq x positions, cat, cos / sin, scaling, cast (and the inline
    # inv_freq of models computing it in forward: base ** (arange / dim)).
    def f(position_ids):
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.int64, device=position_ids.device).float() / 16))
        freqs = (inv_freq[None, :, None].float() * position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * 1.0).to(torch.bfloat16), (emb.sin() * 1.0).to(torch.bfloat16)

    pos = torch.arange(9, device=device)[None].expand(2, 9) + 3
    gm, _ = fuse(f, pos)
    assert len(fused(gm)) == 1 and aten_ops(gm) == [], gm.code
    cos, sin = gm(pos)
    ref_cos, ref_sin = f(pos.double())
    for name, g, r in (("cos", cos, ref_cos), ("sin", sin, ref_sin)):
        assert g.dtype == torch.bfloat16
        assert_close(g, r.double(), torch.bfloat16, tag(f"rope_table.{name}", g.shape, torch.bfloat16))


def test_fp32_registers_prove_the_kernel_ran(device):
    # Eager rounds (x + 256) to bf16 before subtracting, losing x's low bits; the fused kernel
    # keeps the sum in an fp32 register and gets x back exactly. The result says which ran.
    def f(x):
        return (x + 256.0) - 256.0

    x = (rand(64, device=device) * 4).to(torch.bfloat16)
    gm, _ = fuse(f, x)
    assert len(fused(gm)) == 1
    assert not torch.equal(f(x), x)  # eager's composition rounds
    assert torch.equal(gm(x), x)


def test_inplace_op_splits_the_groups(device):
    # Not functionalized: the in-place add stays in the graph; nothing that reads x may move across it.
    def f(x, y):
        a = (x * 2).exp()
        x.add_(y)
        return (x * 3 + a).neg(), a

    x, y = rand(4, 8, device=device), rand(4, 8, device=device)
    gm = make_fx(f, tracing_mode="fake", pre_dispatch=True)(x.clone(), y)
    assert any(n.target is aten.add_.Tensor for n in gm.graph.nodes)
    report = GraphReport(0)
    pf.fuse_pointwise(gm, report)
    assert len(fused(gm)) == 2 and "aten.add_.Tensor" in aten_ops(gm), gm.code
    x1, x2 = x.clone(), x.clone()
    got, want = gm(x1, y), f(x2, y)
    assert torch.equal(x1, x2)  # the mutation happened once
    assert_close(got[0], -((x.double() + y.double()) * 3 + (x.double() * 2).exp()), torch.float32, "[op=inplace barrier]")
    assert_close(got[1], (x.double() * 2).exp(), torch.float32, "[op=inplace barrier a]")


def test_dynamic_shapes_one_graph_two_sizes(device):
    def f(x, y):
        b = (y * 2).unsqueeze(0).expand(x.shape[0], -1) + x  # a size-1 dim expanded to a symbolic one
        flat = (b.unsqueeze(1).squeeze(1) * 0.5).reshape(-1).exp()  # squeeze / reshape of intermediates
        return ((x * 2 + y).cos().t().contiguous() * 3, torch.cat([x, x * y], 1).sigmoid(), flat)

    x, y = rand(5, 7, device=device), rand(7, device=device)
    gm = make_fx(f, tracing_mode="symbolic")(x, y)
    shape_env = next(n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder").shape[0].node.shape_env
    guards = len(shape_env.guards)
    pf.fuse_pointwise(gm)
    assert len(shape_env.guards) == guards  # the pass adds no guard: nothing specialized
    assert len(fused(gm)) == 3 and aten_ops(gm) == [], gm.code
    for n, m in ((5, 7), (3, 11), (1, 1)):
        x, y = rand(n, m, device=device), rand(m, device=device)
        for k, (g, r) in enumerate(zip(gm(x, y), f(*as64(x, y)))):
            assert_close(g, r, torch.float32, f"[op=dynamic output {k} shape={(n, m)}]")


def test_compiled_dynamic_model_compiles_once(device):
    class M(torch.nn.Module):
        def forward(self, x, w):
            return (x.float() * w).sigmoid().to(x.dtype) * 2 + x

    m = M()
    counter = torch._dynamo.testing.CompileCounterWithBackend("flag_gems")
    f = torch.compile(m, backend=counter, dynamic=True)
    with torch.no_grad():
        for n in (3, 6, 10):
            x, w = rand(n, 24, dtype=torch.bfloat16, device=device), rand(24, device=device)
            ref = (x.double() * w.double()).sigmoid().to(torch.bfloat16).double() * 2 + x.double()
            assert_close(f(x, w), ref, torch.bfloat16, tag("compiled dynamic", x.shape, torch.bfloat16))
    assert counter.frame_count == 1
    report = flag_gems.explain(m, rand(4, 24, dtype=torch.bfloat16, device=device), rand(24, device=device),
                               options={"strict": True})
    assert sum(report.generated.values()) >= 1, str(report)


def test_identical_groups_compile_once(device):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(16))
            self.lin = torch.nn.Linear(16, 16)

        def forward(self, x):
            return self.lin((x * self.w).sigmoid() * 1.5 + 0.5)

    m = torch.nn.Sequential(Block(), Block(), Block()).to(device)
    x = rand(3, 16, device=device)
    before = fused_kernel_cache_info()["kernels"]
    with torch.no_grad():
        out = torch.compile(m, backend="flag_gems", options={"strict": True})(x)
        report = flag_gems.explain(m, x, options={"strict": True})
    assert list(report.generated.values()) == [3], str(report)  # one kernel, launched three times
    assert fused_kernel_cache_info()["kernels"] - before == 1  # three groups, one kernel text
    assert_close(out, copy.deepcopy(m).double()(x.double()), torch.float32, "[op=3 blocks]")


def test_cse_merges_duplicate_masks(device):
    def f(m, x):
        a = torch.where(m, torch.scalar_tensor(0.0), torch.scalar_tensor(float("-inf")))
        b = torch.where(m, torch.scalar_tensor(0.0), torch.scalar_tensor(float("-inf")))
        return x + a, x * b

    m, x = torch.rand(3, 4) > 0.5, rand(3, 4)
    gm = make_fx(f, tracing_mode="fake")(m, x)
    assert sum(n.target is aten.where.self for n in gm.graph.nodes) == 2
    assert pf.cse(gm) == 3  # one where and its two constants
    assert sum(n.target is aten.where.self for n in gm.graph.nodes) == 1
    got, want = gm(m, x), f(m, x)
    assert all(torch.equal(g, e) for g, e in zip(got, want))


# ----------------------------------------------------------------- training and a real model


def test_backward_graph_fuses_and_matches(device, tmp_path):
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(20, 20)

        def forward(self, x, y):
            h = self.lin(x)
            return ((h * 0.5).sigmoid() * y + h.tanh() * 2).sum()

    m = M().to(device)
    x, y = rand(6, 20, device=device, requires_grad=True), rand(6, 20, device=device)
    out = torch.compile(m, backend="flag_gems", options={"strict": True, "dump_dir": str(tmp_path)})(x, y)
    out.backward()
    got = (x.grad.clone(), m.lin.weight.grad.clone())
    (path,) = tmp_path.glob("graph_*_forward+backward_report.json")  # written once the backward compiled
    report = json.loads(path.read_text())
    assert sum(report["generated"].values()) >= 3, report  # two forward kernels, one (at least) backward
    assert report["kernels"]["backward"]["after"] < report["kernels"]["backward"]["before"], report
    m64 = M().to(device).double()
    m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    x64 = x.detach().double().requires_grad_()
    m64(x64, y.double()).backward()
    assert_close(got[0], x64.grad, torch.float32, "[op=backward dx]", grad=True)
    assert_close(got[1], m64.lin.weight.grad, torch.float32, "[op=backward dW]", grad=True)


def test_tiny_hf_llama_matches_eager_with_fewer_kernels(device):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AutoConfig.for_model(
        "llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=torch.bfloat16).eval()
    ids = torch.randint(3, 128, (2, 5), device=device)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        report = flag_gems.explain(model, ids, use_cache=False, options={"strict": True})
        torch._dynamo.reset()
        off = flag_gems.explain(model, ids, use_cache=False, options={"strict": True, "fuse_pointwise": False})
        torch._dynamo.reset()
        out = torch.compile(model, backend="flag_gems", options={"strict": True}, fullgraph=True)(ids, use_cache=False).logits
    g, g_off = report.graphs[0], off.graphs[0]
    assert g.layers == 2 and g.kernels["inference"][0] == g_off.kernels["inference"][1]
    before, after = g.kernels["inference"]
    assert after < before and after <= 0.6 * before, str(report)  # 68 -> 33 when written
    assert "kernels per call: inference" in str(report)
    cos = torch.nn.functional.cosine_similarity(out.double().flatten(), ref.double().flatten(), dim=0).item()
    assert cos >= 0.9995


def test_option_turns_the_pass_off(device):
    x = rand(4, 8, device=device)
    report = flag_gems.explain(lambda a: (a * 2).exp(), x, options={"strict": True, "fuse_pointwise": False})
    assert not report.generated and report.graphs[0].kernels["inference"] == (2, 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_small_reductions_and_scans_are_unrolled(dtype, device):
    # GQA's backward sums the repeated heads (4 here); a decode step's position cumsum runs over
    # one token. Static extents up to MAX_UNROLL become part of the kernel; longer ones stay aten.
    def f(g, x, ids):
        heads = (g * 2).view(2, 3, 4, 5).sum(2, keepdim=True)
        peak = x.view(2, 3, 4, 5).amax(1) - x.view(2, 3, 4, 5).amin(1)
        avg = x.view(6, 4, 5).mean(1) * 3
        pos = ids.ne(1).cumsum(-1) - 1
        return heads, peak, avg, pos, x.sum(-1)  # the last: over 20 elements, left to aten

    g, x = rand(6, 20, dtype=dtype, device=device), rand(6, 20, dtype=dtype, device=device)
    ids = torch.randint(0, 3, (2, 7), device=device)
    gm, _ = fuse(f, g, x, ids)
    assert len(fused(gm)) == 4 and aten_ops(gm) == ["aten.sum.dim_IntList"], gm.code
    got, want = gm(g, x, ids), f(*as64(g, x), ids)
    for k, (o, r) in enumerate(zip(got[:3], want[:3])):
        assert o.dtype == dtype
        assert_close(o, r, dtype, tag(f"unrolled reduction {k}", r.shape, dtype))
    assert got[3].dtype == torch.int64 and torch.equal(got[3], want[3])


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels run in the tests above")
def test_generated_kernels_compile_for_sm90():
    # The interpreter runs other source (numpy math helpers); this compiles the GPU source of the
    # rope-table, mask, GQA and cast kernels for an H100/H200 target with Triton, no GPU needed.
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "_sm90_compile.py")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "compiled 5" in out.stdout, out.stdout + out.stderr[-2000:]


@pytest.mark.gpu
def test_static_kernel_count_matches_the_profiler():
    # The report's count (native_kernels per node) against what one call launches on the GPU.
    # cuBLAS may add a split-K reduction per GEMM, hence the bound by the number of mm nodes.
    transformers = pytest.importorskip("transformers")
    from torch.profiler import ProfilerActivity, profile

    cfg = transformers.AutoConfig.for_model(
        "llama", vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
    ids = torch.randint(3, 256, (8, 1), device="cuda")
    with torch.no_grad():
        report = flag_gems.explain(model, ids, use_cache=False, options={"strict": True})
        torch._dynamo.reset()
        f = torch.compile(model, backend="flag_gems", options={"strict": True})
        for _ in range(3):
            f(ids, use_cache=False)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            f(ids, use_cache=False)
            torch.cuda.synchronize()
    launched = sum(e.count for e in prof.key_averages()
                   if e.device_type == torch.autograd.DeviceType.CUDA and not e.key.startswith(("Memcpy", "Memset")))
    before, after = report.graphs[0].kernels["inference"]
    mms = 15  # 7 projections per layer and the lm head
    assert after < before and after - 3 <= launched <= after + mms, (before, after, launched, str(report))


def test_a_group_the_generator_fails_on_stays_aten(device, monkeypatch):
    def f(x):
        return (x * 2).exp() + 1

    def broken(*args, **kwargs):
        raise KeyError("an unexpected dtype")

    x = rand(4, 8, device=device)
    monkeypatch.setattr(pf, "_build", broken)
    gm = make_fx(f, tracing_mode="fake")(x)
    with pytest.raises(KeyError):
        pf.fuse_pointwise(gm, strict=True)
    report = GraphReport(0)
    with pytest.warns(RuntimeWarning, match="could not generate a kernel"):
        assert pf.fuse_pointwise(gm, report) == 0
    assert fused(gm) == [] and any("not generated" in n for n in report.notes)
    assert_close(gm(x), f(x.double()), torch.float32, "[op=generator failure fallback]")
