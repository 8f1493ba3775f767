"""The flag_gems backend's act_and_mul fusion: gated-MLP styles and layouts, dtypes, training,
dynamic shapes, and the candidates it must leave alone."""

import copy
import json
import os

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from torch import nn

import flag_gems
from flag_gems.backend import GemsCompiler
from flag_gems.options import CompileOptions
from test_backend import compile_strict
from accuracy import DTYPE_IDS, DTYPES, assert_close, rand, ref64, tag

try:  # HF's activation table: what the models' MLPs call
    from transformers.activations import ACT2FN
except ImportError:  # pragma: no cover - transformers is in the test extra
    ACT2FN = {"silu": nn.SiLU(), "gelu": nn.GELU(), "gelu_pytorch_tanh": nn.GELU(approximate="tanh")}

STRICT = {"strict": True}
N, M = 24, 40  # hidden, intermediate (gate/up width)


pytestmark = pytest.mark.usefixtures("fresh_dynamo")



# ----------------------------------------------------------------- MLPs in the styles models use


class GatedMLP(nn.Module):
    """HF LlamaMLP / GemmaMLP / Qwen2MLP: ``down(act(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, act="silu"):
        super().__init__()
        self.gate_proj = nn.Linear(N, M, bias=False)
        self.up_proj = nn.Linear(N, M, bias=False)
        self.down_proj = nn.Linear(M, N, bias=False)
        self.act_fn = ACT2FN[act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class SigmoidMLP(GatedMLP):
    """SiLU written out: ``g * sigmoid(g) * up``."""

    def forward(self, x):
        g = self.gate_proj(x)
        return self.down_proj(g * torch.sigmoid(g) * self.up_proj(x))


SPLITS = {
    "chunk": lambda h: h.chunk(2, dim=-1),
    "split": lambda h: h.split(M, dim=-1),
    "split_with_sizes": lambda h: h.split([M, M], dim=-1),
    "slice": lambda h: (h[..., :M], h[..., M:]),
}


class GateUpMLP(nn.Module):
    """Phi-3 / vLLM: one ``gate_up_proj``, its halves split off, ``up * act(gate)``."""

    def __init__(self, act="silu", split="chunk"):
        super().__init__()
        self.gate_up_proj = nn.Linear(N, 2 * M, bias=False)
        self.down_proj = nn.Linear(M, N, bias=False)
        self.act_fn = ACT2FN[act]
        self.split = split

    def forward(self, x):
        gate, up = SPLITS[self.split](self.gate_up_proj(x))
        return self.down_proj(up * self.act_fn(gate))


# style -> (module factory, the variant the pass reports)
STYLES = {
    "llama": (lambda: GatedMLP("silu"), "silu"),
    "gemma": (lambda: GatedMLP("gelu_pytorch_tanh"), "gelu_tanh"),
    "sigmoid": (lambda: SigmoidMLP(), "silu_sigmoid"),
    "phi3": (lambda: GateUpMLP("silu", "chunk"), "silu_chunk"),
    "gelu_chunk": (lambda: GateUpMLP("gelu", "chunk"), "gelu_chunk"),
    "split": (lambda: GateUpMLP("silu", "split"), "silu_split"),
    "split_with_sizes": (lambda: GateUpMLP("gelu", "split_with_sizes"), "gelu_split_with_sizes"),
    "slice": (lambda: GateUpMLP("gelu_pytorch_tanh", "slice"), "gelu_tanh_slice"),
}


def _reference(module, *inputs):
    m64 = copy.deepcopy(module).to(device="cpu", dtype=torch.float64)
    with torch.no_grad():
        return m64(*[ref64(t) for t in inputs])


def _kept(report):
    return {r for g in report.graphs for r in g.kept.get("act_and_mul pattern", {})}


# ----------------------------------------------------------------- fusions


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("style", list(STYLES))
def test_mlp_fused(style, dtype, device):
    factory, variant = STYLES[style]
    m = factory().to(device=device, dtype=dtype)
    x = rand(2, 5, N, dtype=dtype, device=device)
    with torch.no_grad():
        report = flag_gems.explain(m, x, options=STRICT)
        torch._dynamo.reset()
        out = compile_strict(m)(x)
    assert report.graphs[0].fused == {f"act_and_mul[{variant}]": 1}, str(report)
    assert not report.fallbacks and not _kept(report), str(report)
    assert out.dtype == dtype and out.shape == x.shape
    # The model rounds after each matmul and the activation: compare with float64 at the
    # gradient tolerance, as the RMSNorm block tests do.
    assert_close(out, _reference(m, x), dtype, tag(f"backend.act_and_mul[{style}]", out.shape, dtype), grad=True)


# name -> (fn(x) on x[..., 2 * M], the variant reported); the kernel output is compared at the
# forward tolerance (one rounding from fp32, against float64).
FORMS = {
    "up_first": (lambda x: x[..., M:] * F.silu(x[..., :M]), "silu_slice"),
    "negative_slice": (lambda x: F.silu(x[..., :M]) * x[..., -M:], "silu_slice"),
    "narrow": (lambda x: F.silu(x.narrow(-1, 0, M)) * x.narrow(-1, M, M), "silu_narrow"),
    "fp32_activation": (lambda x: F.silu(x[..., :M].float()).to(x.dtype) * x[..., M:], "silu_fp32_slice"),
    "sigmoid_first": (lambda x: torch.sigmoid(x[..., :M]) * x[..., :M] * x[..., M:], "silu_sigmoid_slice"),
    # halves of one tensor, but not [gate | up]: the two-tensor op reads the two views
    "swapped_halves": (lambda x: F.silu(x[..., M:]) * x[..., :M], "silu"),
    "three_way_split": (lambda x: (lambda g, u, rest: F.gelu(g) * u)(*x.split([M // 2, M // 2, M], -1)), "gelu"),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("form", list(FORMS))
def test_spellings_and_layouts(form, dtype, device):
    fn, variant = FORMS[form]
    x = rand(3, 2 * M, dtype=dtype, device=device)
    report = flag_gems.explain(fn, x, options=STRICT)
    torch._dynamo.reset()
    out = compile_strict(fn)(x)
    assert report.graphs[0].fused == {f"act_and_mul[{variant}]": 1}, str(report)
    ref = fn(ref64(x))
    assert out.dtype == dtype
    assert_close(out, ref, dtype, tag(f"backend.act_and_mul[{form}]", out.shape, dtype))


@pytest.mark.parametrize("rows", [0, 1, 13])
@pytest.mark.parametrize("layout", ["chunk", "two_tensors"])
def test_token_counts(layout, rows, device):
    def fn(x, u):
        gate, up = x.chunk(2, dim=-1) if layout == "chunk" else (x[..., :M], u)
        return F.silu(gate) * up

    x, u = rand(rows, 2 * M, device=device), rand(rows, M, device=device)
    report = flag_gems.explain(fn, x, u, options=STRICT)
    torch._dynamo.reset()
    out = compile_strict(fn)(x, u)
    assert report.fused["act_and_mul"] == 1, str(report)
    assert out.shape == (rows, M)
    assert_close(out, fn(ref64(x), ref64(u)), torch.float32, tag(f"backend.act_and_mul[{layout}]", out.shape, torch.float32))


def test_fused_graph_has_one_op_and_no_pattern_left(device, tmp_path):
    m = GateUpMLP("silu", "chunk").to(device)
    x = rand(4, N, device=device)
    with torch.no_grad():
        torch.compile(m, backend="flag_gems", options={"strict": True, "dump_dir": str(tmp_path)}, fullgraph=True)(x)
    files = os.listdir(tmp_path)
    aten = open(tmp_path / next(f for f in files if f.endswith("_aten.py"))).read()
    fused = open(tmp_path / next(f for f in files if f.endswith("_fused.py"))).read()
    assert "aten.silu" in aten and "aten.chunk" in aten
    assert fused.count("flag_gems.silu_and_mul_fused") == 1
    assert "aten.silu" not in fused and "aten.chunk" not in fused and "aten.mul" not in fused


# ----------------------------------------------------------------- training, dynamic shapes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("style", ["llama", "phi3", "gemma"])
def test_training_uses_fused_backward(style, dtype, device, tmp_path):
    factory, _ = STYLES[style]
    m = factory().to(device=device, dtype=dtype)
    x = rand(2, 3, N, dtype=dtype, device=device, requires_grad=True)
    f = torch.compile(m, backend="flag_gems", options={"strict": True, "dump_dir": str(tmp_path)}, fullgraph=True)
    f(x).float().square().sum().backward()
    names = [n for n, _ in m.named_parameters()]
    grads = [x.grad] + [p.grad for p in m.parameters()]

    m64 = copy.deepcopy(m).to(device="cpu", dtype=torch.float64)
    x64 = ref64(x).requires_grad_()
    m64(x64).square().sum().backward()
    refs = [x64.grad] + [p.grad for p in m64.parameters()]
    for name, g, rg in zip(["x"] + names, grads, refs):
        scale = rg.abs().max().item()
        assert_close(g / scale, rg / scale, dtype, tag(f"backend.act_and_mul[{style}].train.d{name}", rg.shape, dtype), grad=True)
    backward = "".join(open(tmp_path / p).read() for p in os.listdir(tmp_path) if p.endswith("_backward.py"))
    op = {"llama": "silu_and_mul_backward", "phi3": "silu_and_mul_fused_backward", "gemma": "gelu_and_mul_backward"}[style]
    assert f"flag_gems.{op}" in backward


def test_dynamic_token_count_compiles_once(device, tmp_path):
    m = GateUpMLP("silu", "chunk").to(device)
    compiler = GemsCompiler(CompileOptions(strict=True, dump_dir=str(tmp_path)))
    counter = torch._dynamo.testing.CompileCounterWithBackend(compiler)
    f = torch.compile(m, backend=counter, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for b, s in [(2, 3), (3, 7), (2, 17)]:  # >= 2: Dynamo specializes sizes 0 and 1
            x = rand(b, s, N, device=device)
            out = f(x)
            assert_close(out, _reference(m, x), torch.float32, tag("backend.act_and_mul[dynamic]", out.shape, torch.float32))
    assert counter.frame_count == 1
    (report,) = [json.load(open(tmp_path / p)) for p in os.listdir(tmp_path) if p.endswith("_report.json")]
    assert report["fused"] == {"act_and_mul[silu_chunk]": 1}, report


def test_dynamic_width_chunk_still_uses_one_tensor_op(device, tmp_path):
    """A symbolic last dim: the halves are proven from the shape expressions, no guard added."""

    def fn(x):
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    compiler = GemsCompiler(CompileOptions(strict=True, dump_dir=str(tmp_path)))
    counter = torch._dynamo.testing.CompileCounterWithBackend(compiler)
    f = torch.compile(fn, backend=counter, dynamic=True, fullgraph=True)
    for width in (6, 10, 34):
        x = rand(3, width, device=device)
        out = f(x)
        assert_close(out, fn(ref64(x)), torch.float32, tag("backend.act_and_mul[dynamic width]", out.shape, torch.float32))
    assert counter.frame_count == 1
    (report,) = [json.load(open(tmp_path / p)) for p in os.listdir(tmp_path) if p.endswith("_report.json")]
    assert report["fused"] == {"act_and_mul[silu_chunk]": 1}, report


# ----------------------------------------------------------------- left alone


def _used_twice(g, u):
    a = F.silu(g)
    return a * u + a


def _sigmoid_used_twice(g, u):
    s = torch.sigmoid(g)
    return g * s * u + s


# name -> (fn(g, u), u's shape given g's [5, M], reason the report gives)
LEFT_ALONE = {
    "activation_used_twice": (_used_twice, (5, M), "activation output has other users"),
    "sigmoid_used_twice": (_sigmoid_used_twice, (5, M), "sigmoid(gate) has other users"),
    "broadcasting_mul": (lambda g, u: F.gelu(g, approximate="tanh") * u, (1, M), "broadcasting mul"),
    "split_on_dim_0": (lambda g, u: (lambda a, b: F.silu(a) * b)(*torch.cat([g, u]).chunk(2, 0)), (5, M), "not the last dim"),
    "dtype_promotion": (lambda g, u: F.silu(g) * u.float(), (5, M), "dtypes differ"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(LEFT_ALONE))
def test_left_alone_and_correct(case, dtype, device):
    fn, up_shape, reason = LEFT_ALONE[case]
    g, u = rand(5, M, dtype=dtype, device=device), rand(*up_shape, dtype=dtype, device=device)
    report = flag_gems.explain(fn, g, u, options=STRICT)
    torch._dynamo.reset()
    out = compile_strict(fn)(g, u)
    if case == "dtype_promotion" and dtype == torch.float32:
        assert report.fused["act_and_mul"] == 1, str(report)  # fp32 * fp32: nothing promoted
    else:
        assert report.fused["act_and_mul"] == 0, str(report)
        assert any(reason in r for r in _kept(report)), str(report)
    # Eager math rounds at each op in the inputs' dtype (the promoted output too): its tolerance.
    assert_close(out, fn(ref64(g), ref64(u)), dtype, tag(f"backend.act_and_mul.left_alone[{case}]", out.shape, dtype), grad=True)


# ----------------------------------------------------------------- real transformers MLPs


@pytest.mark.parametrize(
    "model_type, cls, act, variant",
    [
        ("llama", "LlamaMLP", "silu", "silu"),
        ("gemma", "GemmaMLP", "gelu_pytorch_tanh", "gelu_tanh"),
        ("phi3", "Phi3MLP", "silu", "silu_chunk"),
    ],
)
def test_transformers_mlp_modules(model_type, cls, act, variant, device):
    transformers = pytest.importorskip("transformers")
    import importlib

    cfg = transformers.AutoConfig.for_model(
        model_type, hidden_size=N, intermediate_size=M, hidden_act=act, num_attention_heads=4, num_key_value_heads=2, head_dim=N // 4
    )
    module = getattr(importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}"), cls)
    m = module(cfg).to(device=device, dtype=torch.bfloat16)
    x = rand(2, 3, N, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        report = flag_gems.explain(m, x, options=STRICT)
        torch._dynamo.reset()
        out = compile_strict(m)(x)
    assert report.graphs[0].fused == {f"act_and_mul[{variant}]": 1}, str(report)
    assert_close(out, _reference(m, x), torch.bfloat16, tag(f"backend.act_and_mul[{cls}]", out.shape, torch.bfloat16), grad=True)
