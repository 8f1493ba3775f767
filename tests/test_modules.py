"""``flag_gems.modules`` against the math each module replaces, fp32/fp16/bf16, forward and backward.

References (float64, plain torch): ``F.rms_norm`` for GemsRMSNorm (of ``x + residual`` with
one), rotate-half / GPT-J rotation with tables ``cos(p * base^(-2i/r))`` for GemsRope,
transformers' DeepseekV3 rotary code (``DeepseekV3RotaryEmbedding`` and
``apply_rotary_pos_emb_interleave`` / ``apply_rotary_pos_emb``) for GemsDeepseekYarnRoPE, and
``silu(x) * y`` for GemsSiluAndMul. Backward: autograd through the same references.
"""

import inspect

import pytest
import torch
import torch.nn.functional as F

import flag_gems
from accuracy import DEVICE, DTYPE_IDS, DTYPES, assert_close, rand, ref64, tag
from flag_gems.modules import GemsDeepseekYarnRoPE, GemsRMSNorm, GemsRope, GemsSiluAndMul
from flag_gems.modules.rotary_embedding import yarn_find_correction_range, yarn_get_mscale, yarn_linear_ramp_mask


def test_exports():
    import flag_gems.modules as mod

    for name in ("GemsRMSNorm", "GemsRope", "GemsDeepseekYarnRoPE", "GemsSiluAndMul"):
        assert getattr(flag_gems, name) is getattr(mod, name) and name in flag_gems.__all__ and name in mod.__all__


def test_modules_run_flag_gems_kernels(monkeypatch, request):
    """With Triton's interpreter off, a CPU tensor is refused by the kernels' device check: each module
    reaches flag_gems' kernels (a module that quietly ran torch ops instead would return a result)."""
    if DEVICE != "cpu":
        pytest.skip("the CPU device check is what shows the kernel path")
    import flag_gems.kernels._common as common
    from flag_gems import c_runtime

    if c_runtime.available and "CPU" in c_runtime.installed_keys():  # GEMS_CPP_CPU=1: C++ wrappers check
        c_runtime.uninstall("CPU")  # in C++; the Python launchers are the path under test here
        request.addfinalizer(lambda: c_runtime.install("CPU"))
    monkeypatch.setattr(common, "interpreter_mode", lambda: False)
    x = torch.randn(2, 3, 2, 8)
    calls = {
        "GemsRMSNorm": lambda: GemsRMSNorm(8)(x),
        "GemsRMSNorm+residual": lambda: GemsRMSNorm(8)(x, x.clone()),
        "GemsRope": lambda: GemsRope(8, 16)(x, x),
        "GemsDeepseekYarnRoPE": lambda: GemsDeepseekYarnRoPE(8, 16, scaling_factor=4.0)(x, x),
        "GemsSiluAndMul": lambda: GemsSiluAndMul()(x, x),
        "GemsSiluAndMul[fused]": lambda: GemsSiluAndMul()(x),
    }
    for name, call in calls.items():
        with pytest.raises(NotImplementedError, match="TRITON_INTERPRET=1"):
            call()
            pytest.fail(f"{name} returned without a flag_gems kernel")


# ------------------------------------------------------------------ GemsRMSNorm

# (input shape, normalized_shape): one row, non-powers of two, a 3-D batch, a 2-D normalized shape
NORM_CASES = [((1, 16), (16,)), ((7, 33), (33,)), ((2, 5, 48), (48,)), ((3, 4, 12), (4, 12))]
NORM_IDS = ["1x16", "7x33", "2x5x48", "3x[4x12]"]


def norm_module(ns, dtype, affine, device, eps=1e-6):
    m = GemsRMSNorm(list(ns), eps=eps, elementwise_affine=affine, device=device, dtype=dtype)
    if affine:
        with torch.no_grad():
            m.weight.copy_(rand(*ns, dtype=dtype, device=device))
    return m


def norm_ref(x64, m):
    w = ref64(m.weight) if m.weight is not None else None
    return F.rms_norm(x64, list(m.normalized_shape), w, m.eps)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_weight"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,ns", NORM_CASES, ids=NORM_IDS)
def test_rms_norm_forward(shape, ns, dtype, affine, device):
    m = norm_module(ns, dtype, affine, device)
    x = rand(*shape, dtype=dtype, device=device)
    before = x.clone()
    what = tag(f"GemsRMSNorm[{'affine' if affine else 'no_weight'}]", shape, dtype)
    y = m(x)
    assert y is not x and y.dtype == dtype and torch.equal(x, before), what
    assert_close(y, norm_ref(ref64(x), m), dtype, what)
    out = m(x, inplace=True)
    assert out is x, what
    assert_close(x, norm_ref(ref64(before), m), dtype, what + " inplace")


@pytest.mark.parametrize("inplace", [None, True, False], ids=["upstream", "inplace", "outplace"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_weight"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,ns", NORM_CASES, ids=NORM_IDS)
def test_rms_norm_fused_residual(shape, ns, dtype, affine, inplace, device):
    m = norm_module(ns, dtype, affine, device)
    x, r = rand(*shape, dtype=dtype, device=device), rand(*shape, dtype=dtype, device=device)
    x0, r0 = x.clone(), r.clone()
    what = tag(f"GemsRMSNorm+residual[inplace={inplace}, affine={affine}]", shape, dtype)
    y, h = m(x, r, inplace=inplace)
    h64 = ref64(x0) + ref64(r0)
    assert_close(h, h64, dtype, what + " h")
    assert_close(y, norm_ref(h64, m), dtype, what + " y")
    if inplace is False:
        assert y is not x and h is not r and torch.equal(x, x0) and torch.equal(r, r0), what
    else:  # upstream: x <- y, residual <- x + residual, returned
        assert y is x and h is r, what


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_weight"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rms_norm_backward(dtype, affine, device):
    shape, ns = (3, 5, 40), (40,)
    m = norm_module(ns, dtype, affine, device)
    x = rand(*shape, dtype=dtype, device=device, requires_grad=True)
    g = rand(*shape, dtype=dtype, device=device)
    m(x).backward(g)
    x64 = ref64(x).requires_grad_()
    w64 = ref64(m.weight).requires_grad_() if affine else None
    F.rms_norm(x64, list(ns), w64, m.eps).backward(ref64(g))
    what = tag(f"GemsRMSNorm.backward[affine={affine}]", shape, dtype)
    assert_close(x.grad, x64.grad, dtype, what + " dx", grad=True)
    if affine:
        assert_close(m.weight.grad, w64.grad, dtype, what + " dw", grad=True)


@pytest.mark.parametrize("inplace", [False, True], ids=["outplace", "inplace"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rms_norm_fused_residual_backward(dtype, inplace, device):
    """Gradients of y and h reach x, residual and the weight; in place they flow through the
    updated tensors to the leaves they were computed from."""
    shape, ns = (4, 3, 24), (24,)
    m = norm_module(ns, dtype, True, device)
    xl = rand(*shape, dtype=dtype, device=device, requires_grad=True)
    rl = rand(*shape, dtype=dtype, device=device, requires_grad=True)
    gy, gh = rand(*shape, dtype=dtype, device=device), rand(*shape, dtype=dtype, device=device)
    x, r = (xl * 1, rl * 1) if inplace else (xl, rl)  # in place needs non-leaf tensors, as in torch
    y, h = m(x, r, inplace=inplace)
    ((y.float() * gy.float()).sum() + (h.float() * gh.float()).sum()).backward()
    x64, r64 = ref64(xl).requires_grad_(), ref64(rl).requires_grad_()
    w64 = ref64(m.weight).requires_grad_()
    h64 = x64 + r64
    ((F.rms_norm(h64, list(ns), w64, m.eps) * ref64(gy)).sum() + (h64 * ref64(gh)).sum()).backward()
    what = tag(f"GemsRMSNorm+residual.backward[inplace={inplace}]", shape, dtype)
    assert_close(xl.grad, x64.grad, dtype, what + " dx", grad=True)
    assert_close(rl.grad, r64.grad, dtype, what + " dresidual", grad=True)
    assert_close(m.weight.grad, w64.grad, dtype, what + " dw", grad=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rms_norm_eps_none_is_the_dtype_eps(dtype, device):
    # torch.nn.RMSNorm's convention; inputs scaled so that eps is comparable to mean(x^2).
    eps = torch.finfo(dtype).eps
    m = norm_module((32,), dtype, True, device, eps=None)
    x = rand(5, 32, dtype=dtype, device=device, scale=eps**0.5)
    what = tag("GemsRMSNorm[eps=None]", x.shape, dtype)
    assert_close(m(x), F.rms_norm(ref64(x), [32], ref64(m.weight), eps), dtype, what)
    with pytest.raises(AssertionError):  # eps matters at this scale: a wrong eps would be seen
        assert_close(m(x), F.rms_norm(ref64(x), [32], ref64(m.weight), 1e-6), dtype, what)


def test_rms_norm_module_api(device):
    m = GemsRMSNorm(16)
    assert m.eps == 1e-6 and m.normalized_shape == (16,) and torch.equal(m.weight, torch.ones(16))
    assert list(m.state_dict()) == ["weight"] and "elementwise_affine=True" in repr(m)
    bare = GemsRMSNorm([4, 6], elementwise_affine=False)
    assert bare.weight is None and list(bare.parameters()) == [] and bare.normalized_shape == (4, 6)
    with torch.no_grad():
        m.weight.mul_(3)
    m.reset_parameters()
    assert torch.equal(m.weight, torch.ones(16))
    assert GemsRMSNorm(8, dtype=torch.bfloat16).weight.dtype == torch.bfloat16


def test_rms_norm_bad_input(device):
    m = GemsRMSNorm(16).to(device)
    with pytest.raises(ValueError, match=r"x: expected trailing dims \[16\] \(normalized_shape\), got shape \[3, 15\]"):
        m(rand(3, 15, device=device))
    with pytest.raises(ValueError, match="residual: expected"):
        m(rand(3, 16, device=device), rand(2, 16, device=device))
    with pytest.raises(ValueError, match="residual: expected"):
        m(rand(3, 16, device=device), rand(2, 16, device=device), inplace=False)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        m([1.0] * 16)
    with pytest.raises(ValueError, match="normalized_shape: expected positive sizes"):
        GemsRMSNorm(0)
    with pytest.raises(ValueError, match="normalized_shape: expected positive sizes"):
        GemsRMSNorm([])


# ------------------------------------------------------------------ rotary references


def rotate_ref(x64, cos64, sin64, interleaved: bool):
    """Plain RoPE in float64: ``x (*, H, D)``, per-token half tables ``(*, r/2)``; dims past r unchanged."""
    r = 2 * cos64.shape[-1]
    c, s = cos64.unsqueeze(-2), sin64.unsqueeze(-2)
    if interleaved:
        x1, x2 = x64[..., 0:r:2], x64[..., 1:r:2]
        rot = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), -1).flatten(-2)
    else:
        x1, x2 = x64[..., : r // 2], x64[..., r // 2 : r]
        rot = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)
    return torch.cat((rot, x64[..., r:]), -1)


def rope_tables64(rotary_dim, max_pos, base):
    """``cos / sin(p * base^(-2i/r))`` in float64: RoPE's definition."""
    inv = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv)
    return angles.cos(), angles.sin()


def rope_inputs(layout, hq, hk, d, dtype, device, max_pos, requires_grad=False):
    """(q, k, position_ids or None, per-token rows) for a layout: [B, S, H, D] without positions,
    the same with random positions, or vLLM's flat tokens [T, H, D]."""
    shape = {"bshd": (2, 5), "bshd+pos": (2, 5), "tokens": (7,)}[layout]
    q = rand(*shape, hq, d, dtype=dtype, device=device, requires_grad=requires_grad)
    k = rand(*shape, hk, d, dtype=dtype, device=device, requires_grad=requires_grad)
    if layout == "bshd":
        return q, k, None, torch.arange(shape[1]).expand(*shape)
    pos = torch.randint(0, max_pos, shape, device=device)
    return q, k, pos, pos.cpu()


ROPE_LAYOUTS = ["bshd", "bshd+pos", "tokens"]
# (rotary_dim, head_dim, q heads, k heads): full rotary with GQA, partial rotary
ROPE_DIMS = [(16, 16, 4, 2), (8, 24, 3, 1)]
ROPE_DIM_IDS = ["r16d16", "r8d24"]


def test_rope_tables_are_ropes_definition(device):
    m = GemsRope(24, 64, 500.0, device=device)
    cos64, sin64 = rope_tables64(24, 64, 500.0)
    assert m.cos_cached.shape == (64, 12) and m.cos_cached.dtype == torch.float32
    assert not m.state_dict()  # non-persistent buffers: checkpoints need no table
    assert_close(m.cos_cached, cos64, torch.float32, tag("GemsRope.cos_cached", (64, 12), torch.float32))
    assert_close(m.sin_cached, sin64, torch.float32, tag("GemsRope.sin_cached", (64, 12), torch.float32))


@pytest.mark.parametrize("inplace", [False, True], ids=["outplace", "inplace"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
@pytest.mark.parametrize("dims", ROPE_DIMS, ids=ROPE_DIM_IDS)
@pytest.mark.parametrize("layout", ROPE_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rope_forward(dtype, layout, dims, interleaved, inplace, device):
    r, d, hq, hk = dims
    m = GemsRope(r, 32, 10000.0, interleaved, torch.float32, device)
    q, k, pos, rows = rope_inputs(layout, hq, hk, d, dtype, device, 32)
    q0, k0 = q.clone(), k.clone()
    qe, ke = m(q, k, position_ids=pos, inplace=inplace)
    cos64, sin64 = ref64(m.cos_cached)[rows], ref64(m.sin_cached)[rows]
    what = tag(f"GemsRope[{layout}, r={r}, interleaved={interleaved}, inplace={inplace}]", q.shape, dtype)
    assert_close(qe, rotate_ref(ref64(q0), cos64, sin64, interleaved), dtype, what + " q")
    assert_close(ke, rotate_ref(ref64(k0), cos64, sin64, interleaved), dtype, what + " k")
    if inplace:
        assert qe is q and ke is k, what
    else:
        assert torch.equal(q, q0) and torch.equal(k, k0), what


@pytest.mark.parametrize("inplace", [False, True], ids=["outplace", "inplace"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rope_backward(dtype, interleaved, inplace, device):
    r, d, hq, hk = 8, 12, 3, 1
    m = GemsRope(r, 32, 10000.0, interleaved, torch.float32, device)
    ql, kl, pos, rows = rope_inputs("bshd+pos", hq, hk, d, dtype, device, 32, requires_grad=True)
    q, k = (ql * 1, kl * 1) if inplace else (ql, kl)
    qe, ke = m(q, k, pos, inplace=inplace)
    gq, gk = rand(*q.shape, dtype=dtype, device=device), rand(*k.shape, dtype=dtype, device=device)
    torch.autograd.backward((qe, ke), (gq, gk))
    q64, k64 = ref64(ql).requires_grad_(), ref64(kl).requires_grad_()
    cos64, sin64 = ref64(m.cos_cached)[rows], ref64(m.sin_cached)[rows]
    torch.autograd.backward(
        (rotate_ref(q64, cos64, sin64, interleaved), rotate_ref(k64, cos64, sin64, interleaved)), (ref64(gq), ref64(gk))
    )
    what = tag(f"GemsRope.backward[interleaved={interleaved}, inplace={inplace}]", q.shape, dtype)
    assert_close(ql.grad, q64.grad, dtype, what + " dq", grad=True)
    assert_close(kl.grad, k64.grad, dtype, what + " dk", grad=True)


def test_rope_bad_arguments(device):
    for bad in (7, 0, -2, 8.0, True):
        with pytest.raises(ValueError, match="rotary_dim: expected a positive even int"):
            GemsRope(bad, 16)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        GemsRope(8, 0)
    with pytest.raises(ValueError, match="base"):
        GemsRope(8, 16, 1.0)
    m = GemsRope(8, 4, device=device)
    q = rand(1, 3, 2, 6, device=device)
    with pytest.raises(ValueError, match="query: head dim 6 is below rotary_dim 8"):
        m(q, q)
    q = rand(1, 5, 2, 8, device=device)
    with pytest.raises(ValueError, match="query: 5 positions .* exceed max_position_embeddings 4"):
        m(q, q)
    with pytest.raises(TypeError, match="query: expected a torch.Tensor"):
        m(None, q)
    if device == "cpu":  # positions are checked where they can be read without a device sync
        with pytest.raises((IndexError, ValueError), match="position"):
            m(q, q, torch.full((1, 5), 4))


def test_rope_module_follows_to(device):
    m = GemsRope(8, 16).to(dtype=torch.bfloat16)
    assert m.cos_cached.dtype == torch.bfloat16  # buffers follow .to(), as upstream's test relies on
    q = rand(1, 3, 2, 8, dtype=torch.bfloat16, device=device)
    m = m.to(device)
    qe, _ = m(q, q)
    rows = torch.arange(3)
    ref = rotate_ref(ref64(q), ref64(m.cos_cached)[rows], ref64(m.sin_cached)[rows], False)
    assert_close(qe, ref, torch.bfloat16, tag("GemsRope[bf16 tables]", q.shape, torch.bfloat16))


# ------------------------------------------------------------------ GemsDeepseekYarnRoPE vs transformers

# (scaling_factor, original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim)
YARN_CONFIGS = {
    "deepseek_v3": (40.0, 4096, 32.0, 1.0, 1.0, 1.0),  # the released config: cos/sin unscaled
    "mscale_0.707": (40.0, 4096, 32.0, 1.0, 0.707, 1.0),  # cos/sin scaled by mscale / mscale_all_dim
    "short_context": (4.0, 64, 16.0, 2.0, 1.0, 0.0),  # the ramp covers other dims; 0.1 ln f + 1 scaling
}
YARN_DIM = 16  # qk_rope_head_dim
YARN_MAX_POS = 48


def hf_deepseek_rotary(config):
    """transformers' DeepseekV3RotaryEmbedding for a YaRN config (both config styles of transformers)."""
    ds = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    from transformers import DeepseekV3Config

    factor, orig, beta_fast, beta_slow, mscale, mscale_all_dim = config
    rope = dict(rope_type="yarn", factor=factor, original_max_position_embeddings=orig, beta_fast=beta_fast,
                beta_slow=beta_slow, mscale=mscale, mscale_all_dim=mscale_all_dim)
    common = dict(qk_rope_head_dim=YARN_DIM, hidden_size=64, num_attention_heads=4,
                  max_position_embeddings=int(factor * orig))
    if "rope_parameters" in inspect.signature(DeepseekV3Config).parameters:  # transformers >= 5
        cfg = DeepseekV3Config(**common, rope_parameters={**rope, "rope_theta": 10000.0})
    else:
        cfg = DeepseekV3Config(**common, rope_scaling=rope, rope_theta=10000.0)
    rotary = ds.DeepseekV3RotaryEmbedding(cfg)
    assert rotary.rope_type == "yarn"
    return ds, rotary


def yarn_module(config, interleaved, device):
    factor, orig, beta_fast, beta_slow, mscale, mscale_all_dim = config
    return GemsDeepseekYarnRoPE(
        YARN_DIM, YARN_MAX_POS, 10000.0, interleaved, torch.float32, device, scaling_factor=factor,
        original_max_position_embeddings=orig, beta_fast=beta_fast, beta_slow=beta_slow, mscale=mscale,
        mscale_all_dim=mscale_all_dim,
    )


@pytest.mark.parametrize("config", list(YARN_CONFIGS))
def test_yarn_tables_match_transformers(config, device):
    _, rotary = hf_deepseek_rotary(YARN_CONFIGS[config])
    m = yarn_module(YARN_CONFIGS[config], True, device)
    pos = torch.arange(YARN_MAX_POS)[None]
    cos, sin = rotary(torch.ones(1, dtype=torch.float32), pos)  # [1, P, r]: cat(freqs, freqs), scaled
    what = tag(f"GemsDeepseekYarnRoPE.tables[{config}]", m.cos_cached.shape, torch.float32)
    assert_close(m.cos_cached, cos[0, :, : YARN_DIM // 2], torch.float32, what + " cos")
    assert_close(m.sin_cached, sin[0, :, : YARN_DIM // 2], torch.float32, what + " sin")
    assert m._attention_scaling() == pytest.approx(rotary.attention_scaling, rel=1e-12), what


def deinterleave(t):
    """Pairs layout -> transformers' (evens, odds) layout of the rotary dims."""
    return torch.cat((t[..., 0::2], t[..., 1::2]), -1)


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
@pytest.mark.parametrize("config", list(YARN_CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_yarn_rope_matches_transformers(dtype, config, interleaved, device):
    """Forward and backward against transformers' DeepseekV3 rotary code run in float64."""
    ds, rotary = hf_deepseek_rotary(YARN_CONFIGS[config])
    m = yarn_module(YARN_CONFIGS[config], interleaved, device)
    B, S, hq, hk = 2, 6, 3, 1
    q = rand(B, S, hq, YARN_DIM, dtype=dtype, device=device, requires_grad=True)
    k = rand(B, S, hk, YARN_DIM, dtype=dtype, device=device, requires_grad=True)
    pos = torch.randint(0, YARN_MAX_POS, (B, S), device=device)
    gq, gk = rand(B, S, hq, YARN_DIM, dtype=dtype, device=device), rand(B, S, hk, YARN_DIM, dtype=dtype, device=device)
    qe, ke = m(q, k, position_ids=pos)
    torch.autograd.backward((qe, ke), (gq, gk))

    q64, k64 = ref64(q).requires_grad_(), ref64(k).requires_grad_()
    cos, sin = rotary(q64, pos.cpu())  # [B, S, r] in float64 (fp32 angles, as the module)
    apply = ds.apply_rotary_pos_emb_interleave if interleaved else ds.apply_rotary_pos_emb
    rq, rk = apply(q64.transpose(1, 2), k64.transpose(1, 2), cos, sin)  # transformers' [B, H, S, D]
    rq, rk = rq.transpose(1, 2), rk.transpose(1, 2)
    layout = deinterleave if interleaved else (lambda t: t)
    # The same loss: transformers' output is ours with the pair dims de-interleaved.
    torch.autograd.backward((rq, rk), (ref64(layout(gq)), ref64(layout(gk))))
    what = tag(f"GemsDeepseekYarnRoPE[{config}, interleaved={interleaved}]", q.shape, dtype)
    assert_close(layout(qe), rq, dtype, what + " q")
    assert_close(layout(ke), rk, dtype, what + " k")
    assert_close(q.grad, q64.grad, dtype, what + " dq", grad=True)
    assert_close(k.grad, k64.grad, dtype, what + " dk", grad=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_yarn_rope_in_place(dtype, device):
    m = yarn_module(YARN_CONFIGS["mscale_0.707"], True, device)
    q, k = rand(9, 4, YARN_DIM, dtype=dtype, device=device), rand(9, 2, YARN_DIM, dtype=dtype, device=device)
    pos = torch.randint(0, YARN_MAX_POS, (9,), device=device)
    want_q, want_k = m(q, k, pos)
    got_q, got_k = m(q, k, pos, inplace=True)
    assert got_q is q and got_k is k
    assert torch.equal(q, want_q) and torch.equal(k, want_k)  # the same kernel, written in place


def test_yarn_helpers():
    assert yarn_get_mscale(1.0, 5.0) == 1.0 and yarn_get_mscale(0.5) == 1.0
    assert yarn_get_mscale(40.0, 0.707) == pytest.approx(0.1 * 0.707 * 3.6888794541139363 + 1.0)
    low, high = yarn_find_correction_range(32, 1, 64, 10000, 4096)
    assert 0 <= low < high <= 63
    ramp = yarn_linear_ramp_mask(low, high, 32)
    assert ramp.dtype == torch.float32 and ramp[: low + 1].eq(0).all() and ramp[high:].eq(1).all()
    assert (ramp.diff() >= 0).all()
    assert torch.equal(yarn_linear_ramp_mask(3, 3, 6), torch.tensor([0.0, 0, 0, 0, 1, 1]))
    for bad in ("scaling_factor", "original_max_position_embeddings", "beta_fast", "beta_slow"):
        with pytest.raises(ValueError, match=bad):
            GemsDeepseekYarnRoPE(16, **{bad: 0})
    unscaled = GemsDeepseekYarnRoPE(16, 32)  # scaling_factor 1: plain RoPE
    plain = GemsRope(16, 32)
    assert torch.equal(unscaled.cos_cached, plain.cos_cached) and torch.equal(unscaled.sin_cached, plain.sin_cached)


# ------------------------------------------------------------------ GemsSiluAndMul


@pytest.mark.parametrize("form", ["two_tensors", "fused"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 8), (5, 37), (2, 3, 64)], ids=str)
def test_silu_and_mul(shape, dtype, form, device):
    m = GemsSiluAndMul()
    x = rand(*shape, dtype=dtype, device=device, requires_grad=True)
    y = rand(*shape, dtype=dtype, device=device, requires_grad=True)
    g = rand(*shape, dtype=dtype, device=device)
    if form == "fused":
        xy = torch.cat([x, y], -1).detach().requires_grad_()
        out = m(xy)
    else:
        x0, y0 = x.detach().clone(), y.detach().clone()
        out = m(x, y)
        assert torch.equal(x, x0) and torch.equal(y, y0)  # out of place
    out.backward(g)
    x64, y64 = ref64(x).requires_grad_(), ref64(y).requires_grad_()
    ref = F.silu(x64) * y64
    ref.backward(ref64(g))
    what = tag(f"GemsSiluAndMul[{form}]", shape, dtype)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, what)
    if form == "fused":
        assert_close(xy.grad, torch.cat([x64.grad, y64.grad], -1), dtype, what + " dxy", grad=True)
    else:
        assert_close(x.grad, x64.grad, dtype, what + " dx", grad=True)
        assert_close(y.grad, y64.grad, dtype, what + " dy", grad=True)


def test_silu_and_mul_bad_input(device):
    m = GemsSiluAndMul()
    with pytest.raises(ValueError):
        m(rand(3, 8, device=device), rand(3, 4, device=device))
    with pytest.raises(ValueError):
        m(rand(3, 7, device=device))
    with pytest.raises(TypeError):
        m(rand(3, 8, device=device), rand(3, 8, device=device, dtype=torch.float16))
    assert list(m.parameters()) == []


# ------------------------------------------------------------------ torch.compile


def test_modules_compile_to_flag_gems_ops(device, fresh_dynamo):
    """A block of all four modules under torch.compile(fullgraph=True): Dynamo's graph calls the
    flag_gems ops (none is traced into torch ops), and the result is eager's."""
    norm = norm_module((32,), torch.float32, True, device)
    rope = GemsRope(8, 16, device=device)
    yarn = yarn_module(YARN_CONFIGS["mscale_0.707"], True, device)
    act = GemsSiluAndMul()

    def block(x, r):
        y, h = norm(x, r, inplace=False)
        q = y.view(2, 3, 2, 16)  # partial rotary (8 of 16 dims), then YaRN on all 16
        q1, k1 = rope(q, q)
        q2, k2 = yarn(q1, k1, torch.arange(3, device=q.device).expand(2, 3))
        return act(q2.flatten(-2), k2.flatten(-2)), h

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x, r = rand(2, 3, 32, device=device), rand(2, 3, 32, device=device)
    out, h = torch.compile(block, backend=capture, fullgraph=True)(x, r)
    want, want_h = block(x, r)
    assert len(graphs) == 1
    called = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    for op in ("flag_gems.add_rms_norm", "flag_gems.rotary_embedding", "flag_gems.silu_and_mul"):
        assert op in called, sorted(called)
    assert_close(out, ref64(want), torch.float32, tag("modules[compiled]", out.shape, torch.float32))
    assert_close(h, ref64(want_h), torch.float32, tag("modules[compiled].h", h.shape, torch.float32))
