"""Flash attention (scaled_dot_product_attention, forward): accuracy against float64, masks,
causal, GQA, HF layouts, fully masked rows, empty shapes, supports() reasons, explicit-API errors.

The kernel allocates its output, so there is nothing to poison; instead every element is
compared with the reference and NaN fails the comparison (unwritten rows would show).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import flag_gems
from accuracy import DEVICE, DTYPE_IDS, DTYPES, assert_close, rand, reason, ref64, run, tag
from flag_gems.kernels import attention as ka
from flag_gems.kernels._common import cdiv, next_pow2
from flag_gems.lowerings.registry import REGISTRY

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


def ref_attention(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """softmax(q k^T * scale + mask) v in float64; GQA by repeat_interleave, causal by tril.

    A row with every score -inf gives zeros (torch's CPU kernels' "safe softmax").
    """
    q, k, v = ref64(q), ref64(k), ref64(v)
    if enable_gqa:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    n_q, n_k = s.shape[-2:]
    if is_causal:
        s = s.masked_fill(~torch.ones(n_q, n_k, dtype=torch.bool).tril(), float("-inf"))
    if attn_mask is not None:
        m = attn_mask.detach().cpu()
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.double()
    dead = (s == float("-inf")).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)
    return p @ v


def check(out, q, v, ref, dtype, what):
    """Shape, dtype, the [B, L, H, Dv]-contiguous layout, no NaN, and every element close."""
    b, h, n_q, dv = q.shape[0], q.shape[1], q.shape[2], v.shape[-1]
    assert out.shape == (b, h, n_q, dv), f"{what} shape {tuple(out.shape)}"
    assert out.dtype == dtype, f"{what} dtype {out.dtype}"
    assert out.transpose(1, 2).is_contiguous(), f"{what} strides {out.stride()} (expected [B, L, H, Dv] storage)"
    assert not torch.isnan(out).any(), f"{what} NaN in the output"
    assert_close(out, ref, dtype, what)


def qkv(b, hq, hkv, n_q, n_k, d, dv=None, dtype=torch.float32, device="cpu"):
    return (rand(b, hq, n_q, d, dtype=dtype, device=device), rand(b, hkv, n_k, d, dtype=dtype, device=device),
            rand(b, hkv, n_k, dv or d, dtype=dtype, device=device))


# (B, H, L, S, D, Dv): 1 row and 1 key, primes, non-power-of-two head dims, L > S and L < S.
SHAPES = [(1, 1, 1, 1, 16, 16), (2, 3, 5, 40, 24, 24), (1, 2, 17, 5, 64, 64), (1, 2, 40, 17, 16, 24)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward(shape, dtype, device):
    b, h, n_q, n_k, d, dv = shape
    q, k, v = qkv(b, h, h, n_q, n_k, d, dv, dtype, device)
    out = run(SDPA, q, k, v)
    check(out, q, v, ref_attention(q, k, v), dtype, tag("sdpa", shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lens", [(17, 40), (40, 17), (33, 33)], ids=["L<S", "L>S", "L=S"])
def test_causal(lens, dtype, device):
    n_q, n_k = lens
    q, k, v = qkv(1, 2, 2, n_q, n_k, 16, dtype=dtype, device=device)
    out = run(SDPA, q, k, v, is_causal=True)
    check(out, q, v, ref_attention(q, k, v, is_causal=True), dtype, tag("sdpa causal", q.shape, dtype))


def test_causal_is_top_left_like_torch(device):
    # torch's convention for L != S (query i sees keys j <= i), checked against torch itself.
    for n_q, n_k in ((5, 9), (9, 5)):
        q, k, v = qkv(1, 1, 1, n_q, n_k, 16, device=device)
        out = run(SDPA, q, k, v, is_causal=True)
        want = F.scaled_dot_product_attention(q.cpu(), k.cpu(), v.cpu(), is_causal=True)
        assert_close(out, want.double(), torch.float32, tag("sdpa causal vs torch", (n_q, n_k), torch.float32))


MASK_SHAPES = {"LS": lambda b, h, n_q, n_k: (n_q, n_k), "B1LS": lambda b, h, n_q, n_k: (b, 1, n_q, n_k),
               "1H1S": lambda b, h, n_q, n_k: (1, h, 1, n_k)}


@pytest.mark.parametrize("kind, mask_shape, dtype", [
    ("bool", "LS", torch.float32), ("bool", "B1LS", torch.bfloat16), ("bool", "1H1S", torch.float16),
    ("float", "LS", torch.float16), ("float", "B1LS", torch.float32), ("float", "1H1S", torch.bfloat16),
    ("fp32 float", "B1LS", torch.bfloat16),
], ids=lambda x: str(x).replace("torch.", ""))
def test_masks(kind, mask_shape, dtype, device):
    b, h, n_q, n_k = 2, 2, 5, 40
    q, k, v = qkv(b, h, h, n_q, n_k, 24, dtype=dtype, device=device)
    shape = MASK_SHAPES[mask_shape](b, h, n_q, n_k)
    if kind == "bool":
        mask = torch.rand(shape, device=device) > 0.3
    else:
        mask = rand(*shape, dtype=torch.float32 if kind == "fp32 float" else dtype, device=device)
        mask = mask.masked_fill(torch.rand(shape, device=device) < 0.3, float("-inf"))
    out = run(SDPA, q, k, v, mask)
    check(out, q, v, ref_attention(q, k, v, mask), dtype, tag(f"sdpa {kind} mask {mask_shape}", q.shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gqa(dtype, device):
    q, k, v = qkv(1, 4, 2, 17, 40, 24, dtype=dtype, device=device)
    out = run(SDPA, q, k, v, is_causal=True, enable_gqa=True)
    check(out, q, v, ref_attention(q, k, v, is_causal=True, enable_gqa=True), dtype, tag("sdpa gqa", q.shape, dtype))


def test_gqa_float_mask_like_torch(device):
    # Which kv head a query head reads (h // group, not h % Hkv), checked against torch itself.
    q, k, v = qkv(2, 6, 2, 5, 17, 16, device=device)
    bias = rand(2, 1, 5, 17, device=device)
    out = run(SDPA, q, k, v, bias, enable_gqa=True)
    want = F.scaled_dot_product_attention(q.cpu(), k.cpu(), v.cpu(), attn_mask=bias.cpu(), enable_gqa=True)
    assert_close(out, want.double(), torch.float32, tag("sdpa gqa vs torch", q.shape, torch.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_hf_layout(dtype, device):
    # HF: q/k/v are transposed views of [B, L, H, D] projections. A single kv head expanded to
    # every query head (stride 0 on the head dim) is read in place too.
    b, h, n_q, n_k, d = 1, 4, 17, 20, 16
    q = rand(b, n_q, h, d, dtype=dtype, device=device).transpose(1, 2)
    k = rand(b, n_k, 1, d, dtype=dtype, device=device).transpose(1, 2).expand(b, h, n_k, d)
    v = rand(b, n_k, 2, d, dtype=dtype, device=device).transpose(1, 2)[:, 1:].expand(b, h, n_k, d)
    assert k.stride(1) == 0 and v.stride(1) == 0 and q.stride(-2) == h * d
    mask = torch.rand(b, 1, n_q, n_k, device=device) > 0.2
    out = run(SDPA, q, k, v, mask)
    check(out, q, v, ref_attention(q, k, v, mask), dtype, tag("sdpa hf layout", q.shape, dtype))


def test_custom_scale(device):
    q, k, v = qkv(1, 2, 2, 5, 17, 64, device=device)
    out = run(SDPA, q, k, v, scale=0.3)
    check(out, q, v, ref_attention(q, k, v, scale=0.3), torch.float32, tag("sdpa scale=0.3", q.shape, torch.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fully_masked_rows(dtype, device):
    # A row with no key to attend to is zeros: what torch's CPU kernels return (safe softmax).
    q, k, v = qkv(1, 2, 2, 5, 40, 16, dtype=dtype, device=device)
    keep = torch.rand(5, 40, device=device) > 0.3
    keep[1] = False
    bias = torch.zeros(1, 2, 5, 40, dtype=dtype, device=device).masked_fill(~keep, float("-inf"))
    for mask in (keep, bias):
        out = run(SDPA, q, k, v, mask)
        what = tag(f"sdpa fully masked ({mask.dtype})", q.shape, dtype)
        check(out, q, v, ref_attention(q, k, v, mask), dtype, what)
        assert (out[:, :, 1] == 0).all(), what
        native = F.scaled_dot_product_attention(q.cpu(), k.cpu(), v.cpu(), attn_mask=mask.cpu())
        assert (native[:, :, 1] == 0).all(), "torch changed: its CPU kernel no longer gives zeros here"


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy: -inf, as intended
def test_finfo_min_mask_like_torch(device):
    # HF pads with finfo.min, not -inf: a row masked that way is a (near) uniform average in
    # torch, not zeros. Scores must not overflow to -inf (the log2(e) factor is applied late).
    q, k, v = qkv(1, 1, 1, 3, 40, 16, device=device)
    bias = torch.zeros(3, 40, device=device)
    bias[1] = torch.finfo(torch.float32).min
    bias[2, 7:] = torch.finfo(torch.float32).min
    out = run(SDPA, q, k, v, bias)
    want = F.scaled_dot_product_attention(q.cpu(), k.cpu(), v.cpu(), attn_mask=bias.cpu())
    assert_close(out, want.double(), torch.float32, tag("sdpa finfo.min mask vs torch", q.shape, torch.float32))


def test_empty(device):
    q, k, v = qkv(1, 2, 2, 0, 5, 16, device=device)
    assert run(SDPA, q, k, v).shape == (1, 2, 0, 16)
    q, k, v = qkv(1, 2, 2, 3, 0, 16, device=device)  # no keys: zeros, as torch
    out = run(SDPA, q, k, v)
    assert torch.equal(out.cpu(), F.scaled_dot_product_attention(q.cpu(), k.cpu(), v.cpu())), out
    assert torch.equal(out.cpu(), torch.zeros(1, 2, 3, 16))
    q, k, v = qkv(0, 2, 2, 3, 4, 16, device=device)
    assert run(SDPA, q, k, v, is_causal=True).shape == (0, 2, 3, 16)


def test_reasons(device):
    q, k, v = qkv(1, 4, 2, 5, 7, 16, device=device)
    k4, v4 = qkv(1, 4, 4, 5, 7, 16, device=device)[1:]
    mask = torch.ones(5, 7, dtype=torch.bool, device=device)
    assert reason(SDPA, q, k4, v4) is None
    assert "dropout_p" in reason(SDPA, q, k4, v4, dropout_p=0.1)
    assert "is_causal" in reason(SDPA, q, k4, v4, mask, is_causal=True)
    assert "enable_gqa" in reason(SDPA, q, k, v)
    assert reason(SDPA, q, k, v, enable_gqa=True) is None
    assert "do not divide" in reason(SDPA, q, k4[:, :3], v4[:, :3], enable_gqa=True)
    assert "dtype" in reason(SDPA, q.double(), k4.double(), v4.double())
    assert "mixed dtypes" in reason(SDPA, q, k4.half(), v4)
    assert "ranks" in reason(SDPA, q[0], k4[0], v4[0])
    assert "head dim" in reason(SDPA, q, k4[..., :8], v4)
    assert "above 256" in reason(SDPA, *qkv(1, 1, 1, 2, 2, 300, device=device))
    assert "attn_mask dtype" in reason(SDPA, q, k4, v4, mask.half())
    assert "does not broadcast" in reason(SDPA, q, k4, v4, mask[:, :6])
    assert "does not broadcast" in reason(SDPA, q, k4, v4, mask[None, None, None])
    assert "device" in reason(SDPA, *(torch.empty(1, 1, 2, 16, device="meta"),) * 3)
    qg = q.clone().requires_grad_()
    assert "requires grad" in reason(SDPA, qg, k4, v4)
    with torch.no_grad():
        assert reason(SDPA, qg, k4, v4) is None
    with torch.inference_mode():
        assert reason(SDPA, q, k4, v4) is None
    nested = torch.nested.nested_tensor([torch.randn(2, 3, 16), torch.randn(2, 5, 16)], layout=torch.jagged)
    assert "nested" in reason(SDPA, nested, nested, nested)
    with pytest.raises(NotImplementedError, match="dropout_p"):
        REGISTRY[SDPA].impl(q, k4, v4, dropout_p=0.5)


def test_supports_on_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), torch.device(DEVICE):
        q, k, v = torch.empty(2, 8, 16, 64), torch.empty(2, 2, 32, 64), torch.empty(2, 2, 32, 64)
        assert REGISTRY[SDPA].supports(q, k, v, None, 0.0, True, enable_gqa=True) is None
        assert REGISTRY[SDPA].supports(q, k, v, torch.empty(16, 32, dtype=torch.bool), enable_gqa=True) is None
        assert "requires grad" in REGISTRY[SDPA].supports(q.requires_grad_(), k, v, enable_gqa=True)


def test_explicit_api(device):
    q, k, v = qkv(1, 2, 2, 5, 7, 16, device=device)
    out = flag_gems.scaled_dot_product_attention(q, k, v, None, 0.0, True, 0.5)
    assert_close(out, ref_attention(q, k, v, is_causal=True, scale=0.5), torch.float32,
                 tag("flag_gems.scaled_dot_product_attention", q.shape, torch.float32))
    with pytest.raises(NotImplementedError, match="dropout_p"):
        flag_gems.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
    with pytest.raises(NotImplementedError, match="requires grad"):
        flag_gems.scaled_dot_product_attention(q.clone().requires_grad_(), k, v)
    keep = torch.ones(5, 7, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match="attn_mask: must be None with is_causal"):
        flag_gems.scaled_dot_product_attention(q, k, v, keep, is_causal=True)
    with pytest.raises(TypeError, match="k: expected dtype"):
        flag_gems.scaled_dot_product_attention(q, k.half(), v)
    with pytest.raises(TypeError, match="attn_mask: dtype int32"):
        flag_gems.scaled_dot_product_attention(q, k, v, torch.ones(5, 7, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="q: expected a 4-D tensor"):
        flag_gems.scaled_dot_product_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="k: expected head dim 16"):
        flag_gems.scaled_dot_product_attention(q, k[..., :8], v)
    with pytest.raises(ValueError, match="pass enable_gqa=True"):
        flag_gems.scaled_dot_product_attention(q, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="do not divide"):
        flag_gems.scaled_dot_product_attention(q.repeat(1, 2, 1, 1)[:, :3], k, v, enable_gqa=True)
    with pytest.raises(ValueError, match="v: expected 2 heads and 7 keys"):
        flag_gems.scaled_dot_product_attention(q, k, v[:, :, :6])
    with pytest.raises(ValueError, match=r"attn_mask: shape \[5, 6\] does not broadcast"):
        flag_gems.scaled_dot_product_attention(q, k, v, torch.ones(5, 6, dtype=torch.bool, device=device))
    with pytest.raises(NotImplementedError, match="head dims"):
        flag_gems.scaled_dot_product_attention(*qkv(1, 1, 1, 2, 2, 300, device=device))
    with pytest.raises(TypeError, match="q: expected a torch.Tensor"):
        flag_gems.scaled_dot_product_attention(None, k, v)


def test_opinfo_samples(device):
    # PyTorch's own sample inputs: those the entry takes (4-D, no dropout) match native torch.
    pytest.importorskip("expecttest")
    from torch.testing._internal.common_methods_invocations import op_db

    info = next(i for i in op_db if i.name == "nn.functional.scaled_dot_product_attention")
    taken = 0
    for dtype in (torch.float32, torch.bfloat16):
        for sample in info.sample_inputs(device, dtype):
            args = (sample.input, *sample.args)
            if reason(SDPA, *args, **sample.kwargs) is not None:
                continue
            out = run(SDPA, *args, **sample.kwargs)
            cpu = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
            kw = {n: a.cpu() if isinstance(a, torch.Tensor) else a for n, a in sample.kwargs.items()}
            want = F.scaled_dot_product_attention(*(a.float() for a in cpu),
                                                  **{n: a.float() if isinstance(a, torch.Tensor) else a
                                                     for n, a in kw.items()})
            assert_close(out, want.double(), dtype, tag(f"sdpa opinfo {sorted(sample.kwargs)}", args[0].shape, dtype))
            taken += 1
    assert taken >= 6, taken  # 10 on torch 2.13 (CPU): causal, plain and float-mask samples


def test_registry_entry_policies():
    # On in the eager mode (calls needing gradients go native through supports); measured below
    # native flash attention, so neither fast nor lowered in graphs.
    entry = REGISTRY[SDPA]
    assert entry.kernel == "flag_gems.attention.flash"
    assert entry.eager.on and not entry.fast.on and not entry.graph.on and entry.data
    assert "scaled_dot_product_attention" in flag_gems.__all__


H100_SMEM = 227 * 1024  # shared memory one block may use on an H100 (bytes)


def _pow2(n):
    return n >= 1 and n & (n - 1) == 0


def test_gpu_tile_heuristic_properties(monkeypatch):
    """What the GPU tiles must satisfy (checked on any machine: the interpreter switch is patched off):
    power-of-two tiles of at least 16 (tl.dot's minimum), Q plus the pipelined K and V blocks fit an
    H100's shared memory, 16-bit decode wastes fewer than 16 query rows and short queries never take
    128-row tiles, longer queries never smaller tiles, larger head dims never larger tiles, fp32
    (full-precision dots) never larger tiles than 16-bit."""
    monkeypatch.setattr(ka, "interpreter_mode", lambda: False)
    cfg = ka.attention_config
    seqs = (1, 2, 8, 16, 17, 64, 65, 128, 2048, 8192)
    dims = (16, 32, 64, 128, 256)
    for eb in (2, 4):
        for d in dims:
            last = 0
            for seq_q in seqs:
                bm, bn, warps, stages = cfg(seq_q, d, eb)
                what = f"[attention tiles seq_q={seq_q} block_d={d} elem_bytes={eb}] {(bm, bn, warps, stages)}"
                assert _pow2(bm) and _pow2(bn) and bm >= 16 and bn >= 16, what
                assert warps in (1, 2, 4, 8) and stages >= 1, what
                assert (bm * d + stages * 2 * bn * d) * eb <= H100_SMEM, what
                assert bm <= max(64, next_pow2(seq_q)), what
                if seq_q <= 16 and eb == 2:  # (fp32 keeps its register-sized tiles: 32 rows up to D = 64)
                    assert bm == 16, what
                assert bm >= last, what
                last = bm
    for seq_q in seqs:
        tiles = {eb: [cfg(seq_q, d, eb)[0] * cfg(seq_q, d, eb)[1] for d in dims] for eb in (2, 4)}
        for eb, sizes in tiles.items():
            assert sizes == sorted(sizes, reverse=True), f"[attention tiles seq_q={seq_q} elem_bytes={eb}] {sizes}"
        assert all(a <= b for a, b in zip(tiles[4], tiles[2])), f"[attention tiles seq_q={seq_q}] fp32 {tiles[4]} > 16-bit {tiles[2]}"


def test_interpreter_tiles_walk_several_key_blocks():
    """Under Triton's interpreter the kernel takes small tiles, so that the accuracy tests above run
    the online-softmax rescaling over several key blocks (and several query blocks)."""
    if not ka.interpreter_mode():
        pytest.skip("no interpreter here: the GPU tiles are checked by test_gpu_tile_heuristic_properties")
    longest_keys = max(s[3] for s in SHAPES)
    longest_queries = max(s[2] for s in SHAPES)
    for d in (16, 64, 256):
        for eb in (2, 4):
            bm, bn, _, _ = ka.attention_config(longest_queries, d, eb)
            assert cdiv(longest_keys, bn) >= 2 and cdiv(longest_queries, bm) >= 2, (d, eb, bm, bn)


# --------------------------------------------------------------------------- GPU


def _native_fp32(q, k, v, **kw):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw)


@pytest.mark.gpu
def test_llm_prefill_gpu():
    dtype = torch.bfloat16
    q, k, v = qkv(1, 32, 8, 2048, 2048, 128, dtype=dtype, device="cuda")
    out = run(SDPA, q, k, v, is_causal=True, enable_gqa=True)
    want = _native_fp32(q, k, v, is_causal=True, enable_gqa=True)
    check(out, q, v, want.double(), dtype, tag("sdpa llm prefill", q.shape, dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_llm_decode_gpu(dtype):
    q, k, v = qkv(2, 32, 8, 1, 4096, 128, dtype=dtype, device="cuda")
    mask = torch.ones(2, 1, 1, 4096, dtype=torch.bool, device="cuda")
    mask[0, ..., :1000] = False  # left padding of the first sequence
    out = run(SDPA, q, k, v, mask, enable_gqa=True)
    want = _native_fp32(q, k, v, attn_mask=mask, enable_gqa=True)
    check(out, q, v, want.double(), dtype, tag("sdpa llm decode", q.shape, dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_head_dims_gpu(dtype):
    for d in (64, 80, 96, 256):
        q, k, v = qkv(2, 4, 4, 300, 517, d, dtype=dtype, device="cuda")
        out = run(SDPA, q, k, v, is_causal=True)
        check(out, q, v, ref_attention(q, k, v, is_causal=True), dtype, tag(f"sdpa D={d}", q.shape, dtype))


@pytest.mark.slow
@pytest.mark.gpu
def test_over_2_31_elements_gpu():
    # q in HF layout with more than 2**31 elements: row offsets m * H * D pass 2**31.
    hq, d, n_k = 32, 128, 64
    n_q = 2**31 // (hq * d) + 300
    need = 2 * n_q * hq * d * 2 + (1 << 30)  # q and the output in bf16, plus slack
    if torch.cuda.get_device_properties(0).total_memory < need + 8 * (1 << 30):
        pytest.skip("not enough GPU memory for a > 2**31-element q")
    q = torch.randn(1, n_q, hq, d, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    assert q.numel() > 2**31
    k, v = (rand(1, hq, n_k, d, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    out = run(SDPA, q, k, v)
    for rows in (slice(0, 200), slice(n_q - 200, n_q)):
        want = _native_fp32(q[:, :, rows], k, v)
        assert_close(out[:, :, rows], want.double(), torch.bfloat16, tag("sdpa > 2**31", q.shape, torch.bfloat16))


# --------------------------------------------------------------------------- eager dispatcher mode


def test_use_gems_runs_the_kernel_and_leaves_grads_to_the_native_composite(tmp_path):
    # sdpa is CompositeImplicitAutograd: the eager mode reaches our kernel in every grad mode, and
    # a call needing grads falls back to torch's composite, which records its autograd graph.
    q, k, v = (rand(1, 2, n, 16, device=DEVICE) for n in (5, 7, 7))
    log = tmp_path / "ops.log"
    qg = q.clone().requires_grad_()
    want_grad = torch.autograd.grad(F.scaled_dot_product_attention(qg, k, v).square().sum(), qg)[0]
    try:
        with flag_gems.use_gems(include=["scaled_dot_product_attention"], record=True, path=str(log)):
            out = F.scaled_dot_product_attention(q, k, v)
            with torch.no_grad():
                out_ng = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            got_grad = torch.autograd.grad(F.scaled_dot_product_attention(qg, k, v).square().sum(), qg)[0]
    finally:
        flag_gems.disable()
    lines = log.read_text().splitlines()
    assert lines == ["[DEBUG] flag_gems.ops.scaled_dot_product_attention: GEMS SCALED_DOT_PRODUCT_ATTENTION"] * 2, lines
    assert_close(out, ref_attention(ref64(q), ref64(k), ref64(v)), q.dtype, tag("sdpa use_gems", q.shape, q.dtype))
    assert_close(out_ng, ref_attention(ref64(q), ref64(k), ref64(v), is_causal=True), q.dtype,
                 tag("sdpa use_gems causal", q.shape, q.dtype))
    torch.testing.assert_close(got_grad, want_grad)
