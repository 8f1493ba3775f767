"""Rotary embedding fused in front of KV-cache updates: HF ``StaticCache`` / ``DynamicCache`` and
vLLM-style caches (``index_copy_``, ``cache[slots] = k``, slice assignment), graphs before / after,
the cache receiving the fused op's k, real HF models with ``use_cache=True`` and compiled greedy
``generate()`` with both cache kinds (tokens identical to eager)."""

import copy

import pytest
import torch

import flag_gems
from flag_gems.backend import GemsCompiler, _collect, trace_pre_dispatch
from flag_gems.options import CompileOptions
from flag_gems.report import CompileReport, GraphReport
from accuracy import assert_close, ref64, tag
from test_backend_rotary_embedding import VllmRotary, inv_freq, rotate_half

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, BF16 = torch.float32, torch.bfloat16
STRICT = {"strict": True}
aten = torch.ops.aten

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def rand(*shape, dtype=F32):
    return torch.randn(shape, dtype=F32, device=DEVICE).to(dtype)


# ----------------------------------------------------------------- cache writes, as models spell them


def _index_copy(cache, dim, index, start, x):  # HF StaticCache
    cache.index_copy_(dim, index, x)


def _index_put(cache, dim, index, start, x):  # cache[..., slots] = x
    cache[(slice(None),) * dim + (index,)] = x


def _slice_assign(cache, dim, index, start, x):  # cache[..., start:start + n] = x (a slice scatter)
    cache.narrow(dim, start, x.shape[dim]).copy_(x)


WRITES = {"index_copy_": _index_copy, "index_put_": _index_put, "slice_assign": _slice_assign}


class HFCachedAttention(torch.nn.Module):
    """Llama-style attention with a static cache ``[B, Hk, L, D]`` updated in place at ``cache_position``,
    then attention over the whole cache (what HF's ``StaticCache`` path computes)."""

    def __init__(self, write, hidden=48, heads=4, kv_heads=2, head_dim=16, max_len=12, batch=2):
        super().__init__()
        self.write, self.head_dim = WRITES[write], head_dim
        self.q_proj = torch.nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = torch.nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = torch.nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.register_buffer("inv_freq", inv_freq(head_dim), persistent=False)
        self.register_buffer("k_cache", torch.randn(batch, kv_heads, max_len, head_dim))
        self.register_buffer("v_cache", torch.randn(batch, kv_heads, max_len, head_dim))
        self.groups = heads // kv_heads

    def forward(self, h, position_ids, cache_position, start: int):
        b, s, _ = h.shape
        q = self.q_proj(h).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, s, -1, self.head_dim).transpose(1, 2)
        freqs = position_ids[:, :, None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), -1)
        cos, sin = emb.cos().to(h.dtype).unsqueeze(1), emb.sin().to(h.dtype).unsqueeze(1)
        q_embed = q * cos + rotate_half(q) * sin
        k_embed = k * cos + rotate_half(k) * sin
        self.write(self.k_cache, 2, cache_position, start, k_embed)
        self.write(self.v_cache, 2, cache_position, start, v)
        keys = self.k_cache.repeat_interleave(self.groups, 1)
        values = self.v_cache.repeat_interleave(self.groups, 1)
        att = (q_embed @ keys.transpose(-1, -2)) * self.head_dim**-0.5
        return att.softmax(-1) @ values


class VllmCachedAttention(torch.nn.Module):
    """vLLM-style: tokens ``[T, H * D]``, RoPE from a cos|sin cache, k and v written into
    ``[num_slots, Hk, D]`` caches at ``slot_mapping`` before attention reads them."""

    def __init__(self, write, heads=4, kv_heads=2, head_dim=16, slots=20):
        super().__init__()
        self.write, self.head_dim, self.kv_heads = WRITES[write], head_dim, kv_heads
        self.rope = VllmRotary(head_size=head_dim, rot=head_dim)
        self.register_buffer("k_cache", torch.randn(slots, kv_heads, head_dim))
        self.register_buffer("v_cache", torch.randn(slots, kv_heads, head_dim))

    def forward(self, positions, query, key, value, slot_mapping, start: int):
        q, k = self.rope(positions, query, key)
        t = positions.shape[0]
        self.write(self.k_cache, 0, slot_mapping, start, k.view(t, self.kv_heads, self.head_dim))
        self.write(self.v_cache, 0, slot_mapping, start, value.view(t, self.kv_heads, self.head_dim))
        return q, self.k_cache.sum(0), self.v_cache.sum(0)


def hf_case(write, dtype, s=3, start=4):
    m = HFCachedAttention(write).to(device=DEVICE, dtype=dtype)
    positions = torch.arange(start, start + s, device=DEVICE)
    args = (rand(2, s, 48, dtype=dtype), positions.expand(2, s), positions, start)
    return m, args


def vllm_case(write, dtype, t=5, start=7):
    m = VllmCachedAttention(write).to(device=DEVICE)
    m.k_cache, m.v_cache = m.k_cache.to(dtype), m.v_cache.to(dtype)
    positions = torch.randint(0, 40, (t,), device=DEVICE)
    slots = torch.arange(start, start + t, device=DEVICE)  # contiguous: the slice form writes the same rows
    args = (positions, rand(t, 64, dtype=dtype), rand(t, 32, dtype=dtype), rand(t, 32, dtype=dtype), slots, start)
    return m, args


def fused_graphs(m, args):
    """(aten graph before the passes, graph after them, report) of ``m``'s one graph."""
    out = {}

    def backend(gm, example_inputs):
        out["before"] = trace_pre_dispatch(gm, example_inputs)
        out["report"] = GraphReport(0)
        out["after"] = GemsCompiler(CompileOptions(strict=True)).fuse(gm, example_inputs, out["report"])
        return gm.forward

    with torch.no_grad():
        torch.compile(m, backend=backend, fullgraph=True)(*copy.deepcopy(args))
    torch._dynamo.reset()
    return out["before"], out["after"], out["report"]


def rope_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("flag_gems.rotary")]


def cache_writes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
            and n.target._schema.is_mutable and n.target is not aten.detach_.default]


def source_of(node):
    """Follow views and getitems back to the value they read."""
    views = (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.transpose.int, aten.slice.Tensor)
    while node.op == "call_function" and (node.target in views or "getitem" in str(node.target)):
        node = node.args[0]
    return node


def run_both(m, args):
    """(compiled outputs, compiled-run caches, float64 reference outputs, reference caches)."""
    m_ref = copy.deepcopy(m).to(device="cpu", dtype=torch.float64)
    ref_args = [ref64(a) if isinstance(a, torch.Tensor) and a.is_floating_point() else
                (a.cpu() if isinstance(a, torch.Tensor) else a) for a in args]
    with torch.no_grad():
        out = torch.compile(m, backend="flag_gems", options=STRICT, fullgraph=True)(*args)
        ref = m_ref(*ref_args)
    return out, (m.k_cache, m.v_cache), ref, (m_ref.k_cache, m_ref.v_cache)


# ----------------------------------------------------------------- graphs before / after, numerics


@pytest.mark.parametrize("write", list(WRITES))
def test_hf_static_cache_update_after_fused_rope(write):
    m, args = hf_case(write, F32)
    before, after, report = fused_graphs(m, args)
    assert not rope_nodes(before) and any(n.target is aten.neg.default for n in before.graph.nodes)
    assert dict(report.fused) == {"rotary_embedding[hf]": 1}, report.table()
    (rope,) = rope_nodes(after)
    assert not any(n.target is aten.neg.default for n in after.graph.nodes), after.code
    # The k written into the cache is the fused op's k, and the write comes after the op.
    order = {n: i for i, n in enumerate(after.graph.nodes)}
    k_write = cache_writes(after)[0]  # the model writes k first, then v
    value = k_write.args[1] if write == "slice_assign" else k_write.args[-1]  # copy_(view, k) / index_*_(.., k)
    assert source_of(value) is rope and order[rope] < order[k_write], after.code

    out, caches, ref, ref_caches = run_both(m, args)
    assert_close(out, ref, F32, tag(f"rope_kv.{write}.out", out.shape, F32))
    for name, c, rc in zip(("k_cache", "v_cache"), caches, ref_caches):
        assert_close(c, rc, F32, tag(f"rope_kv.{write}.{name}", c.shape, F32))


@pytest.mark.parametrize("write", list(WRITES))
def test_vllm_cache_write_after_fused_rope(write):
    m, args = vllm_case(write, BF16)
    before, after, report = fused_graphs(m, args)
    assert dict(report.fused) == {"rotary_embedding[vllm]": 1}, report.table()
    assert len(cache_writes(after)) == len(cache_writes(before)) == 2  # both writes kept, in order
    (rope,) = rope_nodes(after)
    order = {n: i for i, n in enumerate(after.graph.nodes)}
    assert all(order[rope] < order[w] for w in cache_writes(after))

    out, caches, ref, ref_caches = run_both(m, args)
    for i, (o, r) in enumerate(zip(out, ref)):
        assert_close(o, r, BF16, tag(f"rope_kv.vllm.{write}[{i}]", o.shape, BF16))
    for name, c, rc in zip(("k_cache", "v_cache"), caches, ref_caches):
        assert_close(c, rc, BF16, tag(f"rope_kv.vllm.{write}.{name}", c.shape, BF16))


def test_write_into_k_between_rotation_and_use_keeps_the_pattern():
    """An in-place op on k's own storage after the rotation: the fused op (at the first use)
    would read the updated k, so the rotation of k stays as the model wrote it."""

    def f(q, k, cos, sin, cache, pos):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q_embed, k_embed = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k.add_(1.0)  # e.g. a buggy in-place update of the projection's output
        cache.index_copy_(2, pos, k_embed)
        return q_embed, cache * 1

    args = [rand(2, 3, 5, 16), rand(2, 3, 5, 16), rand(2, 5, 16), rand(2, 5, 16), rand(2, 3, 8, 16),
            torch.arange(5, device=DEVICE)]
    report = flag_gems.explain(f, *[a.clone() for a in args], options=STRICT)
    torch._dynamo.reset()
    kept = [r for g in report.graphs for r in g.kept.get("rotary pattern", {})]
    assert any("add_" in r and "writes q, k or the tables" in r for r in kept), str(report)
    assert "rotary_embedding[hf]" not in str(report)
    ref_args = [ref64(a) if a.is_floating_point() else a.cpu() for a in args]
    with torch.no_grad():
        out = torch.compile(f, backend="flag_gems", options=STRICT)(*[a.clone() for a in args])
    ref = f(*ref_args)
    for i, (o, r) in enumerate(zip(out, ref)):
        assert_close(o, r, F32, tag(f"rope_kv.k_written[{i}]", o.shape, F32))


# ----------------------------------------------------------------- HF models, use_cache=True and generate()

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# model type -> (extra config, rotary variant); 2 layers: 2 fused rotary ops per graph
MODELS = {
    "llama": ({}, "hf"),
    "qwen2": ({}, "hf"),
    "mistral": ({}, "hf"),
    "gemma": ({"head_dim": 16}, "hf"),
    "phi3": ({"partial_rotary_factor": 0.5}, "hf_partial"),
    "gpt_neox": ({"rotary_pct": 0.5}, "hf_partial"),
}


def build(model_type, dtype):
    extra, _ = MODELS[model_type]
    cfg = transformers.AutoConfig.for_model(model_type, **BASE, **extra)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).to(device=DEVICE, dtype=dtype).eval()


def compiled_with_report(fn):
    """``fn`` compiled by the backend, and the report its graphs fill (one compile per graph)."""
    report = CompileReport()
    compiled = torch.compile(fn, backend=GemsCompiler(CompileOptions(strict=True)))

    def call(*args, **kwargs):
        with _collect(report):
            return compiled(*args, **kwargs)

    return call, report


def assert_rope_fused_everywhere(report, model_type):
    variant = f"rotary_embedding[{MODELS[model_type][1]}]"
    assert report.graphs and not report.fallbacks, str(report)
    for g in report.graphs:
        assert g.fused.get(variant) == 2, g.table()
        assert not g.kept.get("rotary pattern"), g.table()


@pytest.mark.parametrize("model_type", list(MODELS))
def test_hf_forward_with_cache_fuses_rope(model_type):
    model = build(model_type, BF16)
    ids = torch.randint(3, BASE["vocab_size"], (2, 7), device=DEVICE)
    forward, report = compiled_with_report(model)
    with torch.no_grad():
        ref = model(ids, use_cache=True).logits
        out = forward(ids, use_cache=True).logits
    assert_rope_fused_everywhere(report, model_type)
    cos = torch.nn.functional.cosine_similarity(out.double().flatten(), ref.double().flatten(), dim=0).item()
    assert cos >= 0.9995, f"[model={model_type} use_cache=True] logits cosine {cos}"


# Three rope spellings run by default (Llama's full rotary, Phi-3's and GPT-NeoX's partial ones); the
# Llama-like rest with --runslow (about 10 s each on the CPU).
GENERATE_MODELS = [m if m in ("llama", "phi3", "gpt_neox") else pytest.param(m, marks=pytest.mark.slow) for m in MODELS]


@pytest.mark.parametrize("cache", ["static", "dynamic"])
@pytest.mark.parametrize("model_type", GENERATE_MODELS)
def test_compiled_generate_matches_eager_greedy(model_type, cache):
    model = build(model_type, F32)
    ids = torch.randint(3, BASE["vocab_size"], (2, 5), device=DEVICE)
    kw = dict(max_new_tokens=4, do_sample=False, disable_compile=True)
    if cache == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        model.forward, report = compiled_with_report(model.forward)
        out = model.generate(ids, **kw)
    assert torch.equal(out, ref), f"[model={model_type} cache={cache}] tokens {out.tolist()} vs eager {ref.tolist()}"
    assert len(report.graphs) >= 2  # prefill and decode
    assert_rope_fused_everywhere(report, model_type)
