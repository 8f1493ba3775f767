"""The flag_gems backend's RoPE fusion: HF (rotate_half, GQA), GPT-J (interleaved), vLLM (cos_sin_cache,
positions, partial rotary) and HF partial rotary styles, numerics, report, training, left-alone cases, dynamic shapes."""

import copy
import json
import os

import pytest
import torch
import torch._dynamo.testing

import flag_gems
from flag_gems.backend import GemsCompiler
from flag_gems.options import CompileOptions
from test_backend import compile_strict
from accuracy import assert_close, ref64, tag
from accuracy import rand as _rand

STRICT = {"strict": True}
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
PATTERN = "rotary pattern"


pytestmark = pytest.mark.usefixtures("fresh_dynamo")

# Modules, tables, positions and inputs are all made on the test device (the GPU when there
# is one); the float64 reference runs on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rand(*shape, **kwargs):
    return _rand(*shape, device=DEVICE, **kwargs)


@pytest.fixture(autouse=True)
def _on_device():
    with torch.device(DEVICE):
        yield


def run(m, *args):
    """(compiled output, explain report) of ``m(*args)`` without gradients."""
    with torch.no_grad():
        report = flag_gems.explain(m, *args, options=STRICT)
        torch._dynamo.reset()
        out = compile_strict(m)(*args)
    assert not report.fallbacks, str(report)
    return out, report


def reference(m, *args):
    """float64 copy of ``m`` run on float64 copies of the floating-point inputs."""
    m64 = copy.deepcopy(m).to(device="cpu", dtype=torch.float64)
    with torch.no_grad(), torch.device("cpu"):
        return m64(*[a if a is None else ref64(a) if a.is_floating_point() else a.cpu() for a in args])


def check(outs, refs, dtype, what):
    for i, (o, r) in enumerate(zip(outs, refs)):
        if o is None:
            assert r is None
            continue
        assert o.dtype == dtype, f"{tag(what, o.shape, dtype)} output {i} dtype {o.dtype}"
        assert_close(o, r, dtype, tag(f"{what}[{i}]", o.shape, dtype))


def fused(report) -> dict:
    return {k: v for g in report.graphs for k, v in g.fused.items() if k.startswith("rotary_embedding")}


def kept(report) -> list:
    return [r for g in report.graphs for r in g.kept.get(PATTERN, {})]


# ----------------------------------------------------------------- model styles (plain torch)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_every_two(x):
    even, odd = x[:, :, :, ::2], x[:, :, :, 1::2]
    return torch.stack((-odd, even), dim=-1).flatten(-2)


def inv_freq(rot, base=10000.0):
    return 1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)


class HFAttention(torch.nn.Module):
    """Llama-style q/k projections and ``apply_rotary_pos_emb`` (q [B, H, S, D]); ``rot < head_dim``
    is Phi / NeoX partial rotary (``q[..., :rot]`` rotated, the rest concatenated back)."""

    def __init__(self, hidden=48, heads=4, kv_heads=2, head_dim=16, rot=None):
        super().__init__()
        self.head_dim, self.rot = head_dim, rot or head_dim
        self.q_proj = torch.nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = torch.nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.register_buffer("inv_freq", inv_freq(self.rot), persistent=False)

    def tables(self, h, position_ids):
        freqs = position_ids[:, :, None].float() * self.inv_freq.float()  # [B, S, rot/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(h.dtype), emb.sin().to(h.dtype)

    def forward(self, h, position_ids):
        b, s, _ = h.shape
        q = self.q_proj(h).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, s, -1, self.head_dim).transpose(1, 2)
        cos, sin = self.tables(h, position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        if self.rot == self.head_dim:
            return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        out = []
        for x in (q, k):
            x_rot, x_pass = x[..., : self.rot], x[..., self.rot :]
            out.append(torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1))
        return tuple(out)


class GPTJAttention(torch.nn.Module):
    """GPT-J: q [B, S, H, D], sin|cos rows of a sinusoid table picked by position ids, repeated per
    pair, interleaved rotation of the first ``rot`` dims; ``table_dtype`` None keeps them in q's dtype."""

    def __init__(self, hidden=48, heads=4, head_dim=16, rot=8, max_pos=32, table_dtype=None):
        super().__init__()
        self.heads, self.head_dim, self.rot, self.table_dtype = heads, head_dim, rot, table_dtype
        self.q_proj = torch.nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = torch.nn.Linear(hidden, heads * head_dim, bias=False)
        angles = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq(rot)[None, :]
        self.register_buffer("sincos", torch.cat((angles.sin(), angles.cos()), dim=1), persistent=False)

    def forward(self, h, position_ids):
        b, s, _ = h.shape
        q = self.q_proj(h).view(b, s, self.heads, self.head_dim)
        k = self.k_proj(h).view(b, s, self.heads, self.head_dim)
        sin, cos = torch.split(self.sincos[position_ids], self.rot // 2, dim=-1)
        dtype = self.table_dtype or h.dtype
        sin = torch.repeat_interleave(sin[:, :, None, :], 2, 3).to(dtype)
        cos = torch.repeat_interleave(cos[:, :, None, :], 2, 3).to(dtype)
        out = []
        for x in (q, k):
            x_rot, x_pass = x[:, :, :, : self.rot], x[:, :, :, self.rot :]
            x = torch.cat((x_rot * cos + rotate_every_two(x_rot) * sin, x_pass), dim=-1)
            out.append(x.permute(0, 2, 1, 3))
        return tuple(out)


def rope_halves(x, cos, sin, neox):
    """vLLM-style rotation of ``x [T, H, rot]`` by half tables ``cos/sin [T, rot/2]``."""
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    if neox:
        x1, x2 = torch.chunk(x, 2, dim=-1)
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    y1, y2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    return torch.cat((y1, y2), dim=-1) if neox else torch.stack((y1, y2), dim=-1).flatten(-2)


class VllmRotary(torch.nn.Module):
    """vLLM's ``RotaryEmbedding.forward_native`` math: tokens ``[T, heads * D]``, a ``[max_pos, rot]``
    cos|sin cache indexed by positions, the first ``rot`` dims of each head rotated."""

    def __init__(self, head_size=16, rot=16, max_pos=40, neox=True, cache_dtype=F32, gather="index_select"):
        super().__init__()
        self.head_size, self.rot, self.neox, self.gather = head_size, rot, neox, gather
        angles = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq(rot)[None, :]
        self.register_buffer("cos_sin_cache", torch.cat((angles.cos(), angles.sin()), -1).to(cache_dtype))

    def forward(self, positions, query, key=None):
        positions = positions.flatten()
        t = positions.shape[0]
        if self.gather == "index_select":
            cos_sin = self.cos_sin_cache.index_select(0, positions)
        else:
            cos_sin = self.cos_sin_cache[positions]
        cos, sin = cos_sin.chunk(2, dim=-1)
        out = []
        for x in (query, key):
            if x is None:
                out.append(None)
                continue
            shape = x.shape
            x = x.view(t, -1, self.head_size)
            x_rot = rope_halves(x[..., : self.rot], cos, sin, self.neox)
            out.append(torch.cat((x_rot, x[..., self.rot :]), dim=-1).reshape(shape))
        return tuple(out)


class NanoRotary(torch.nn.Module):
    """nano-vLLM: a ``[max_pos, 1, rot]`` cache, rotation computed on an fp32 upcast and cast back."""

    def __init__(self, head_size=16, max_pos=40):
        super().__init__()
        self.head_size = head_size
        angles = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq(head_size)[None, :]
        self.register_buffer("cos_sin_cache", torch.cat((angles.cos(), angles.sin()), -1).unsqueeze(1))

    def forward(self, positions, query, key):
        cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)  # [T, 1, rot/2]
        out = []
        for x in (query, key):
            x = x.view(positions.shape[0], -1, self.head_size)
            x1, x2 = torch.chunk(x.float(), 2, dim=-1)
            y = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
            out.append(y.flatten(-2))
        return tuple(out)


def hf_inputs(dtype, b=2, s=7, hidden=48, requires_grad=False):
    h = rand(b, s, hidden, dtype=dtype, requires_grad=requires_grad)
    return h, torch.arange(s).expand(b, s) + torch.randint(0, 5, (b, 1))


def vllm_inputs(dtype, t=11, hq=4, hk=2, d=16, max_pos=40):
    return torch.randint(0, max_pos, (t,)), rand(t, hq * d, dtype=dtype), rand(t, hk * d, dtype=dtype)


# ----------------------------------------------------------------- fusions, by style


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["fp32", "bf16", "fp16"])
def test_hf_llama_gqa(dtype):
    m = HFAttention().to(dtype=dtype)
    args = hf_inputs(dtype)
    out, report = run(m, *args)
    assert fused(report) == {"rotary_embedding[hf]": 1}, str(report)
    check(out, reference(m, *args), dtype, "rope.hf")


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_hf_partial_rotary(dtype):
    m = HFAttention(heads=3, kv_heads=1, head_dim=20, rot=8).to(dtype=dtype)
    args = hf_inputs(dtype, s=5)
    out, report = run(m, *args)
    assert fused(report) == {"rotary_embedding[hf_partial]": 1}, str(report)
    check(out, reference(m, *args), dtype, "rope.hf_partial")


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rot", [8, 16], ids=["partial", "full"])
def test_gptj_interleaved(rot, dtype):
    m = GPTJAttention(rot=rot).to(dtype=dtype)
    args = hf_inputs(dtype, b=1, s=6)
    out, report = run(m, *args)
    assert fused(report) == {f"rotary_embedding[gptj{'_partial' if rot < 16 else ''}]": 1}, str(report)
    check(out, reference(m, *args), dtype, "rope.gptj")


VLLM_CASES = {
    "neox-partial-bf16": (dict(rot=8, cache_dtype=F32), BF16, "vllm_partial"),
    "neox-full-fp32": (dict(gather="getitem"), F32, "vllm"),
    "gptj-full-bf16": (dict(neox=False, cache_dtype=BF16), BF16, "vllm_gptj"),
    "gptj-partial-fp32": (dict(neox=False, rot=10, gather="getitem"), F32, "vllm_gptj_partial"),
}


@pytest.mark.parametrize("case", list(VLLM_CASES))
def test_vllm_cos_sin_cache(case):
    kw, dtype, variant = VLLM_CASES[case]
    m = VllmRotary(**kw)
    args = vllm_inputs(dtype)
    out, report = run(m, *args)
    assert fused(report) == {f"rotary_embedding[{variant}]": 1}, str(report)
    check(out, reference(m, *args), dtype, f"rope.{variant}")
    assert out[0].shape == args[1].shape and out[1].shape == args[2].shape


def test_vllm_without_key_uses_the_query_only_op():
    m = VllmRotary(rot=8)
    positions, query, _ = vllm_inputs(BF16, t=5)
    out, report = run(m, positions, query)
    assert fused(report) == {"rotary_embedding[vllm_partial_q_only]": 1}, str(report)
    check(out, reference(m, positions, query), BF16, "rope.vllm_q")


def test_half_tables_from_a_3d_cache_with_upcast():
    m = NanoRotary()
    args = vllm_inputs(BF16, t=6)
    out, report = run(m, *args)
    assert fused(report) == {"rotary_embedding[halves]": 1}, str(report)
    check(out, reference(m, *args), BF16, "rope.halves")


def test_lone_q_uses_an_empty_k():
    def f(q, k, cos, sin):  # k is not rotated: cross-attention-like
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + rotate_half(q) * sin, k * 2

    args = [rand(2, 3, 5, 16), rand(2, 3, 5, 16), rand(2, 5, 16), rand(2, 5, 16)]
    out, report = run(f, *args)
    assert fused(report) == {"rotary_embedding[hf_q_only]": 1}, str(report)
    check(out, f(*[ref64(a) for a in args]), F32, "rope.q_only")


def test_fp32_tables_cast_back_to_q_dtype():
    """OLMo-2: bf16 q times fp32 tables computes in fp32, cast back to bf16: the kernel's own numerics."""

    def f(q, k, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return (q * cos + rotate_half(q) * sin).to(q.dtype), (k * cos + rotate_half(k) * sin).to(k.dtype)

    args = [rand(2, 4, 5, 16, dtype=BF16), rand(2, 2, 5, 16, dtype=BF16), rand(2, 5, 16), rand(2, 5, 16)]
    out, report = run(f, *args)
    assert fused(report) == {"rotary_embedding[hf]": 1}, str(report)
    check(out, f(*[ref64(a) for a in args]), BF16, "rope.fp32_tables_cast_back")


# ----------------------------------------------------------------- training, dynamic shapes


def test_training_uses_fused_backward(tmp_path):
    dtype = F32
    m = HFAttention(rot=8)
    h, pos = hf_inputs(dtype, s=5, requires_grad=True)
    f = torch.compile(m, backend="flag_gems", options={"strict": True, "dump_dir": str(tmp_path)}, fullgraph=True)
    q, k = f(h, pos)
    (q.square().sum() + (k * k.detach().sin()).sum()).backward()
    grads = [h.grad, m.q_proj.weight.grad, m.k_proj.weight.grad]

    m64 = copy.deepcopy(m).to(device="cpu", dtype=torch.float64)
    h64 = ref64(h).requires_grad_()
    with torch.device("cpu"):
        q64, k64 = m64(h64, pos.cpu())
    (q64.square().sum() + (k64 * k64.detach().sin()).sum()).backward()
    refs = [h64.grad, m64.q_proj.weight.grad, m64.k_proj.weight.grad]
    for name, g, rg in zip(["h", "q_proj.weight", "k_proj.weight"], grads, refs):
        scale = rg.abs().max().item()
        assert_close(g / scale, rg / scale, dtype, tag(f"rope.train.d{name}", rg.shape, dtype), grad=True)
    code = {p: open(tmp_path / p).read() for p in os.listdir(tmp_path) if p.endswith(".py")}
    assert any("flag_gems.rotary_embedding_hf.default" in c for p, c in code.items() if p.endswith("_forward.py"))
    assert any("flag_gems.rotary_embedding_hf_backward" in c for p, c in code.items() if p.endswith("_backward.py"))


def test_dynamic_sequence_length_compiles_once(tmp_path):
    m = HFAttention(rot=8)
    compiler = GemsCompiler(CompileOptions(strict=True, dump_dir=str(tmp_path)))
    counter = torch._dynamo.testing.CompileCounterWithBackend(compiler)
    f = torch.compile(m, backend=counter, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for b, s in [(2, 3), (3, 7), (2, 2), (2, 13)]:  # >= 2: Dynamo specializes sizes 0 and 1
            args = hf_inputs(F32, b=b, s=s)
            check(f(*args), reference(m, *args), F32, f"rope.dynamic[s={s}]")
    assert counter.frame_count == 1
    (name,) = [p for p in os.listdir(tmp_path) if p.endswith("_report.json")]
    assert json.load(open(tmp_path / name))["fused"] == {"rotary_embedding[hf_partial]": 1}


# ----------------------------------------------------------------- left alone (with the reason), still correct


def _per_head_tables(q, k, cos, sin):
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _rotate_half_reused(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rq = rotate_half(q)
    return q * cos + rq * sin, k * cos + rotate_half(k) * sin, rq


def _odd_head_dim(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


LEFT_ALONE = {
    # name: (fn, q/k shape, table shape, reason fragment, rotations fused)
    "rotate_half_reused": (_rotate_half_reused, (2, 3, 5, 16), (2, 5, 16), "other users", 1),
    "per_head_tables": (_per_head_tables, (2, 3, 5, 16), (1, 3, 5, 16), "do not broadcast over the heads", 0),
    "odd_head_dim": (_odd_head_dim, (2, 3, 5, 15), (2, 5, 15), "odd", 0),
}


@pytest.mark.parametrize("case", list(LEFT_ALONE))
def test_left_alone_with_reason(case):
    fn, shape, table, reason, n_fused = LEFT_ALONE[case]
    args = [rand(*shape), rand(*shape), rand(*table), rand(*table)]
    out, report = run(fn, *args)
    assert sum(fused(report).values()) == n_fused, str(report)
    assert any(reason in r for r in kept(report)), str(report)
    check(out, fn(*[ref64(a) for a in args]), F32, f"rope.left_alone[{case}]")


def test_fp32_tables_on_bf16_q_are_left_alone():
    """bf16 q times fp32 tables is an fp32 result in the model: the op (q's dtype out) would change it."""
    m = GPTJAttention(table_dtype=F32).to(dtype=BF16)
    args = hf_inputs(BF16, b=1, s=4)
    out, report = run(m, *args)
    assert fused(report) == {}, str(report)
    assert any("promote" in r for r in kept(report)), str(report)
    ref = reference(m, *args)
    for i, (o, r) in enumerate(zip(out, ref)):
        assert o.dtype == F32, f"output {i} dtype {o.dtype}: the model's fp32 result"
        assert_close(o, r, BF16, tag(f"rope.fp32_tables[{i}]", o.shape, F32))


def test_in_place_op_between_rotation_and_use_is_left_alone():
    def f(q, k, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q_embed, k_embed = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        q.mul_(2.0)  # the fused op would run after this, at q_embed's first use
        return q_embed, k_embed

    args = [rand(2, 3, 5, 16), rand(2, 3, 5, 16), rand(2, 5, 16), rand(2, 5, 16)]
    report = flag_gems.explain(f, *[a.clone() for a in args], options=STRICT)
    torch._dynamo.reset()
    out = compile_strict(f)(*[a.clone() for a in args])
    assert "rotary_embedding[hf]" not in fused(report), str(report)
    assert any("in-place" in r for r in kept(report)), str(report)
    check(out, f(*[ref64(a) for a in args]), F32, "rope.in_place")
