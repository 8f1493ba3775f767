"""Rotary position embedding: the three layouts (upstream, HF, vLLM), both styles, in and out of place.

References are float64 plain torch written here: the pair formula for the half-table layouts
and HF's own ``q * cos + rotate_half(q) * sin`` for full tables.
"""

import pytest
import torch

import flag_gems.lowerings.rotary_embedding as rope
import flag_gems.kernels.rotary_embedding as kern
from accuracy import DTYPES, DTYPE_IDS, OPCHECK_UTILS, assert_close, poison, rand, ref64, tag

STYLES = [False, True]
STYLE_IDS = ["neox", "interleaved"]

# ------------------------------------------------------------------- references


def _halves(x, rot, interleaved):
    if interleaved:
        return x[..., 0:rot:2], x[..., 1:rot:2]
    return x[..., : rot // 2], x[..., rot // 2 : rot]


def ref_pairs(x, c, s, interleaved):
    """Half-table rotation of float64 ``x (.., D)``; ``c``/``s`` broadcast to ``(.., r/2)``."""
    rot = 2 * c.shape[-1]
    x1, x2 = _halves(x, rot, interleaved)
    y1, y2 = x1 * c - x2 * s, x2 * c + x1 * s
    y = torch.stack((y1, y2), -1).flatten(-2) if interleaved else torch.cat((y1, y2), -1)
    return torch.cat((y, x[..., rot:]), -1)


def ref_positions(x, cos, sin, pos, interleaved):
    """Upstream layout: ``x (*, H, D)``, tables ``[max_pos, r/2]``, ``pos (*)``."""
    return ref_pairs(x, cos[pos.long()].unsqueeze(-2), sin[pos.long()].unsqueeze(-2), interleaved)


def rotate_half(x, interleaved):
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((-x2, x1), -1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), -1)


def ref_hf(x, cos, sin, interleaved):
    """HF transformers: ``x [B, H, S, D]``, full tables ``[B or 1, S, r]``."""
    rot = cos.shape[-1]
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    xr = x[..., :rot]
    return torch.cat((xr * c + rotate_half(xr, interleaved) * s, x[..., rot:]), -1)


def ref_cache(x, head_size, cache, pos, is_neox):
    """vLLM layout: ``x [T, H * D]``, cache ``[max_pos, r]``."""
    half = cache.shape[1] // 2
    xh = x.reshape(*x.shape[:-1], -1, head_size)
    return ref_positions(xh, cache[:, :half], cache[:, half:], pos, not is_neox).reshape(x.shape)


def _tables(n_pos, width, device, dtype=torch.float32):
    # Random tables, not true cos/sin: the op is exact for any values.
    return rand(n_pos, width, dtype=dtype, device=device), rand(n_pos, width, dtype=dtype, device=device)


# --------------------------------------------------------- layout 1: upstream API

# (token dims, Hq, Hk, D, r)
SHAPES = [
    ((7,), 4, 2, 16, 16),
    ((5,), 3, 1, 16, 8),
    ((2, 3), 2, 1, 12, 12),
    ((1,), 1, 1, 6, 2),
    ((3,), 5, 5, 10, 6),
]


@pytest.mark.parametrize("interleaved", STYLES, ids=STYLE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_apply_rotary_pos_emb(shape, dtype, interleaved, device):
    tok, hq, hk, d, r = shape
    q = rand(*tok, hq, d, dtype=dtype, device=device)
    k = rand(*tok, hk, d, dtype=dtype, device=device)
    cos, sin = _tables(11, r // 2, device)  # fp32 tables, as vLLM keeps them
    pos = torch.randint(0, 11, tok, device=device)
    q_out, k_out = rope.apply_rotary_pos_emb(q, k, cos, sin, pos, rotary_interleaved=interleaved)
    t = tag("rotary_embedding", (*tok, hq, hk, d, r), dtype)
    assert_close(q_out, ref_positions(ref64(q), ref64(cos), ref64(sin), pos.cpu(), interleaved), dtype, t + " q")
    assert_close(k_out, ref_positions(ref64(k), ref64(cos), ref64(sin), pos.cpu(), interleaved), dtype, t + " k")


@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_table_dtypes_and_positions(dtype, pos_dtype, device):
    # Tables in q's dtype, int32 positions, repeated positions.
    q, k = rand(6, 3, 8, dtype=dtype, device=device), rand(6, 1, 8, dtype=dtype, device=device)
    cos, sin = _tables(4, 4, device, dtype)
    pos = torch.tensor([3, 0, 3, 1, 2, 2], dtype=pos_dtype, device=device)
    q_out, k_out = rope.apply_rotary_pos_emb(q, k, cos, sin, pos)
    t = tag("rotary_embedding", (6, 3, 1, 8), dtype)
    assert_close(q_out, ref_positions(ref64(q), ref64(cos), ref64(sin), pos.cpu(), False), dtype, t + " q")
    assert_close(k_out, ref_positions(ref64(k), ref64(cos), ref64(sin), pos.cpu(), False), dtype, t + " k")


@pytest.mark.parametrize("interleaved", STYLES, ids=STYLE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_no_position_ids(dtype, interleaved, device):
    b, s, hq, hk, d = 2, 5, 3, 2, 8
    q, k = rand(b, s, hq, d, dtype=dtype, device=device), rand(b, s, hk, d, dtype=dtype, device=device)
    cos, sin = _tables(7, 3, device)  # r = 6 < D, table longer than s
    q_out, k_out = rope.apply_rotary_pos_emb(q, k, cos, sin, rotary_interleaved=interleaved)
    pos = torch.arange(s).expand(b, s)
    t = tag("rotary_embedding", (b, s, hq, hk, d), dtype)
    assert_close(q_out, ref_positions(ref64(q), ref64(cos), ref64(sin), pos, interleaved), dtype, t + " q")
    assert_close(k_out, ref_positions(ref64(k), ref64(cos), ref64(sin), pos, interleaved), dtype, t + " k")


def _fused_qkv(t, hq, hk, d, dtype, device):
    qkv = rand(t, (hq + 2 * hk) * d, dtype=dtype, device=device)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)
    return qkv, q, k


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("interleaved", STYLES, ids=STYLE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fused_qkv_slices(dtype, interleaved, inplace, device):
    t, hq, hk, d, r = 5, 4, 2, 16, 8  # partial rotary: dims 8..15 untouched
    qkv, q, k = _fused_qkv(t, hq, hk, d, dtype, device)
    before = qkv.clone()
    cos, sin = _tables(9, r // 2, device)
    pos = torch.randint(0, 9, (t,), device=device)
    ref_q = ref_positions(ref64(q), ref64(cos), ref64(sin), pos.cpu(), interleaved)
    ref_k = ref_positions(ref64(k), ref64(cos), ref64(sin), pos.cpu(), interleaved)
    q_out, k_out = rope.apply_rotary_pos_emb(q, k, cos, sin, pos, rotary_interleaved=interleaved, inplace=inplace)
    tg = tag("rotary_embedding", (t, hq, hk, d, r), dtype)
    assert_close(q_out, ref_q, dtype, tg + " q")
    assert_close(k_out, ref_k, dtype, tg + " k")
    if inplace:
        assert q_out is q and k_out is k
        # v and the pass-through dims of q / k are bit-identical.
        assert torch.equal(qkv[:, (hq + hk) * d :], before[:, (hq + hk) * d :]), tg + " v was written"
        assert torch.equal(q[..., r:], before[:, : hq * d].view(t, hq, d)[..., r:]), tg + " pass dims changed"
    else:
        assert torch.equal(qkv, before), tg + " input was written"


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_strided_head_dim_copies(dtype, inplace, device):
    # Non-unit stride on head_dim and a token dim that does not flatten: computed in a copy.
    base_q = rand(2, 3, 2, 8, 2, dtype=dtype, device=device)
    q = base_q[..., 0].transpose(0, 1)  # [3, 2, 2, 8], stride 2 on D
    k = rand(3, 2, 1, 8, dtype=dtype, device=device)
    cos, sin = _tables(5, 4, device)
    pos = torch.randint(0, 5, (3, 2), device=device)
    ref_q = ref_positions(ref64(q), ref64(cos), ref64(sin), pos.cpu(), False)
    ref_k = ref_positions(ref64(k), ref64(cos), ref64(sin), pos.cpu(), False)
    other = base_q[..., 1].clone()
    q_out, k_out = rope.apply_rotary_pos_emb(q, k, cos, sin, pos, inplace=inplace)
    t = tag("rotary_embedding", q.shape, dtype)
    assert_close(q_out, ref_q, dtype, t + " q")
    assert_close(k_out, ref_k, dtype, t + " k")
    assert torch.equal(base_q[..., 1], other), t + " neighbouring elements were written"


def test_zero_tokens(device):
    q, k = rand(0, 4, 8, device=device), rand(0, 2, 8, device=device)
    cos, sin = _tables(3, 4, device)
    pos = torch.zeros(0, dtype=torch.int64, device=device)
    q_out, k_out = rope.apply_rotary_pos_emb(q, k, cos, sin, pos)
    assert q_out.shape == (0, 4, 8) and k_out.shape == (0, 2, 8)
    qe, ke = rope.apply_rotary_pos_emb_hf(rand(2, 4, 0, 8, device=device), rand(2, 2, 0, 8, device=device),
                                          rand(1, 0, 8, device=device), rand(1, 0, 8, device=device))
    assert qe.shape == (2, 4, 0, 8) and ke.shape == (2, 2, 0, 8)
    qo, ko = rope.rotary_embedding_cache(pos, rand(0, 32, device=device), None, 8, rand(3, 8, device=device))
    assert qo.shape == (0, 32) and ko is None


# ------------------------------------------------------------------- layout 2: HF


# (B, Hq, Hk, S, D, r, table batch)
HF_SHAPES = [(2, 4, 2, 5, 16, 16, 1), (1, 3, 1, 7, 12, 8, 1), (3, 2, 2, 3, 8, 8, 3)]


@pytest.mark.parametrize("transposed", [False, True], ids=["bhsd", "bshd_view"])
@pytest.mark.parametrize("interleaved", STYLES, ids=STYLE_IDS)
@pytest.mark.parametrize("shape", HF_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_apply_rotary_pos_emb_hf(shape, dtype, interleaved, transposed, device):
    b, hq, hk, s, d, r, bc = shape
    if transposed:  # q/k as attention code gets them: [B, S, H, D].transpose(1, 2)
        q = rand(b, s, hq, d, dtype=dtype, device=device).transpose(1, 2)
        k = rand(b, s, hk, d, dtype=dtype, device=device).transpose(1, 2)
    else:
        q, k = rand(b, hq, s, d, dtype=dtype, device=device), rand(b, hk, s, d, dtype=dtype, device=device)
    # Arbitrary full tables: the two halves differ, so both must be read.
    cos, sin = rand(bc, s, r, device=device), rand(bc, s, r, device=device)
    q_out, k_out = rope.apply_rotary_pos_emb_hf(q, k, cos, sin, rotary_interleaved=interleaved)
    # Laid out like the inputs, as eager's q * cos + rotate_half(q) * sin is (attention then
    # reads the [B, S, H, D] order and writes its output in it).
    assert q_out.stride() == (q * 1).stride() and k_out.stride() == (k * 1).stride()
    t = tag("rotary_embedding_hf", shape, dtype)
    assert_close(q_out, ref_hf(ref64(q), ref64(cos), ref64(sin), interleaved), dtype, t + " q")
    assert_close(k_out, ref_hf(ref64(k), ref64(cos), ref64(sin), interleaved), dtype, t + " k")


@pytest.mark.parametrize("form", ["2d", "4d"])
def test_hf_table_forms(form, device):
    b, h, s, d = 2, 2, 4, 8
    q, k = rand(b, h, s, d, device=device), rand(b, 1, s, d, device=device)
    cos, sin = rand(s, d, device=device), rand(s, d, device=device)
    cos_in, sin_in = (cos, sin) if form == "2d" else (cos[None, None], sin[None, None])
    q_out, k_out = rope.apply_rotary_pos_emb_hf(q, k, cos_in, sin_in)
    t = tag("rotary_embedding_hf", (b, h, s, d), torch.float32)
    assert_close(q_out, ref_hf(ref64(q), ref64(cos)[None], ref64(sin)[None], False), torch.float32, t)
    assert_close(k_out, ref_hf(ref64(k), ref64(cos)[None], ref64(sin)[None], False), torch.float32, t)


# ---------------------------------------------------------------- layout 3: vLLM


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("with_key", [True, False], ids=["qk", "q_only"])
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rotary_embedding_cache(dtype, pos_dtype, is_neox, with_key, inplace, device):
    t, hq, hk, d, r = 5, 3, 1, 16, 8
    qkv, q3, k3 = _fused_qkv(t, hq, hk, d, dtype, device)
    query, key = q3.view(t, hq * d), (k3.view(t, hk * d) if with_key else None)
    before = qkv.clone()
    cache = rand(13, r, device=device)  # fp32 cache
    pos = torch.randint(0, 13, (t,), dtype=pos_dtype, device=device)
    ref_q = ref_cache(ref64(query), d, ref64(cache), pos.cpu(), is_neox)
    ref_k = ref_cache(ref64(key), d, ref64(cache), pos.cpu(), is_neox) if with_key else None
    q_out, k_out = rope.rotary_embedding_cache(pos, query, key, d, cache, is_neox, inplace=inplace)
    tg = tag("rotary_embedding_cache", (t, hq, hk, d, r), dtype)
    assert_close(q_out, ref_q, dtype, tg + " query")
    if with_key:
        assert_close(k_out, ref_k, dtype, tg + " key")
    else:
        assert k_out is None
    if inplace:
        assert q_out is query and k_out is key
        start = (hq + hk) * d if with_key else hq * d
        assert torch.equal(qkv[:, start:], before[:, start:]), tg + " wrote past query/key"
    else:
        assert torch.equal(qkv, before), tg + " input was written"


def test_cache_3d_query_and_2d_positions(device):
    b, s, h, d = 2, 3, 2, 8
    query, key = rand(b, s, h, d, device=device), rand(b, s, h * d, device=device)
    cache = rand(6, d, device=device)
    pos = torch.randint(0, 6, (b, s), device=device)
    q_out, k_out = rope.rotary_embedding_cache(pos, query, key, d, cache, True)
    t = tag("rotary_embedding_cache", (b, s, h, d), torch.float32)
    assert_close(q_out, ref_cache(ref64(query).flatten(-2), d, ref64(cache), pos.cpu(), True).view(query.shape),
                 torch.float32, t)
    assert_close(k_out, ref_cache(ref64(key), d, ref64(cache), pos.cpu(), True), torch.float32, t)


@pytest.mark.parametrize("interleaved", STYLES, ids=STYLE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_launchers_write_every_output_element(dtype, interleaved, device):
    # Poisoned out= tensors (partial rotary): rotated and pass-through dims must all be written.
    t, hq, hk, d, r = 3, 3, 1, 12, 4
    q, k = rand(t, hq, d, dtype=dtype, device=device), rand(t, hk, d, dtype=dtype, device=device)
    cos, sin = _tables(5, r // 2, device)
    pos = torch.tensor([4, 0, 2], device=device)
    q_out, k_out = poison(torch.empty_like(q)), poison(torch.empty_like(k))
    kern.rope_fwd(q, k, cos, sin, pos, interleaved=interleaved, q_out=q_out, k_out=k_out)
    tg = tag("rope_fwd", (t, hq, hk, d, r), dtype)
    assert_close(q_out, ref_positions(ref64(q), ref64(cos), ref64(sin), pos.cpu(), interleaved), dtype, tg + " q")
    assert_close(k_out, ref_positions(ref64(k), ref64(cos), ref64(sin), pos.cpu(), interleaved), dtype, tg + " k")
    qh, kh = q.view(1, t, hq, d).transpose(1, 2), k.view(1, t, hk, d).transpose(1, 2)
    hc, hs = rand(1, t, r, device=device), rand(1, t, r, device=device)
    qh_out, kh_out = poison(torch.empty_like(qh)), poison(torch.empty_like(kh))
    kern.rope_hf_fwd(qh, kh, hc, hs, interleaved=interleaved, q_out=qh_out, k_out=kh_out)
    tg = tag("rope_hf_fwd", (t, hq, hk, d, r), dtype)
    assert_close(qh_out, ref_hf(ref64(qh), ref64(hc), ref64(hs), interleaved), dtype, tg + " q")
    assert_close(kh_out, ref_hf(ref64(kh), ref64(hc), ref64(hs), interleaved), dtype, tg + " k")
    cache = rand(5, r, device=device)
    query, query_out = q.view(t, hq * d), poison(torch.empty(t, hq * d, dtype=dtype, device=device))
    kern.rope_cache_fwd(pos, query, None, d, cache, not interleaved, query_out=query_out)
    tg = tag("rope_cache_fwd", (t, hq, d, r), dtype)
    assert_close(query_out, ref_cache(ref64(query), d, ref64(cache), pos.cpu(), not interleaved), dtype, tg)


# ------------------------------------------------------------------- backward


@pytest.mark.parametrize("tables_grad", [False, True], ids=["qk", "qk_tables"])
@pytest.mark.parametrize("interleaved", STYLES, ids=STYLE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_positions(dtype, interleaved, tables_grad, device):
    tok, hq, hk, d, r = (2, 3), 3, 1, 12, 8
    q = rand(*tok, hq, d, dtype=dtype, device=device, requires_grad=True)
    k = rand(*tok, hk, d, dtype=dtype, device=device, requires_grad=True)
    cos, sin = _tables(5, r // 2, device)
    cos.requires_grad_(tables_grad)
    sin.requires_grad_(tables_grad)
    pos = torch.tensor([[0, 4, 4], [2, 1, 0]], device=device)
    gq, gk = rand(*tok, hq, d, dtype=dtype, device=device), rand(*tok, hk, d, dtype=dtype, device=device)
    q_out, k_out = rope.apply_rotary_pos_emb(q, k, cos, sin, pos, rotary_interleaved=interleaved)
    torch.autograd.backward((q_out, k_out), (gq, gk))
    leaves = [ref64(x).requires_grad_() for x in (q, k, cos, sin)]
    rq = ref_positions(leaves[0], leaves[2], leaves[3], pos.cpu(), interleaved)
    rk = ref_positions(leaves[1], leaves[2], leaves[3], pos.cpu(), interleaved)
    torch.autograd.backward((rq, rk), (ref64(gq), ref64(gk)))
    t = tag("rotary_embedding.backward", (*tok, hq, hk, d, r), dtype)
    assert_close(q.grad, leaves[0].grad, dtype, t + " dq", grad=True)
    assert_close(k.grad, leaves[1].grad, dtype, t + " dk", grad=True)
    if tables_grad:
        # fp32 tables: their gradients are fp32 sums of exactly upcast products.
        assert_close(cos.grad, leaves[2].grad, cos.dtype, t + " dcos", grad=True)
        assert_close(sin.grad, leaves[3].grad, sin.dtype, t + " dsin", grad=True)


@pytest.mark.parametrize("tables_grad", [False, True], ids=["qk", "qk_tables"])
@pytest.mark.parametrize("interleaved", STYLES, ids=STYLE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_hf(dtype, interleaved, tables_grad, device):
    b, hq, hk, s, d, r = 2, 2, 1, 3, 8, 6
    q = rand(b, hq, s, d, dtype=dtype, device=device, requires_grad=True)
    k = rand(b, hk, s, d, dtype=dtype, device=device, requires_grad=True)
    cos = rand(1, s, r, device=device, requires_grad=tables_grad)
    sin = rand(1, s, r, device=device, requires_grad=tables_grad)
    gq, gk = rand(b, hq, s, d, dtype=dtype, device=device), rand(b, hk, s, d, dtype=dtype, device=device)
    q_out, k_out = rope.apply_rotary_pos_emb_hf(q, k, cos, sin, rotary_interleaved=interleaved)
    torch.autograd.backward((q_out, k_out), (gq, gk))
    leaves = [ref64(x).requires_grad_() for x in (q, k, cos, sin)]
    rq = ref_hf(leaves[0], leaves[2], leaves[3], interleaved)
    rk = ref_hf(leaves[1], leaves[2], leaves[3], interleaved)
    torch.autograd.backward((rq, rk), (ref64(gq), ref64(gk)))
    t = tag("rotary_embedding_hf.backward", (b, hq, hk, s, d, r), dtype)
    assert_close(q.grad, leaves[0].grad, dtype, t + " dq", grad=True)
    assert_close(k.grad, leaves[1].grad, dtype, t + " dk", grad=True)
    if tables_grad:
        assert_close(cos.grad, leaves[2].grad, cos.dtype, t + " dcos", grad=True)
        assert_close(sin.grad, leaves[3].grad, sin.dtype, t + " dsin", grad=True)


@pytest.mark.parametrize("cache_grad", [False, True], ids=["qk", "qk_cache"])
@pytest.mark.parametrize("with_key", [True, False], ids=["qk", "q_only"])
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_backward_cache(is_neox, with_key, cache_grad, device):
    dtype = torch.float32
    t, hq, hk, d, r = 4, 2, 1, 8, 6
    query = rand(t, hq * d, device=device, requires_grad=True)
    key = rand(t, hk * d, device=device, requires_grad=True) if with_key else None
    cache = rand(6, r, device=device, requires_grad=cache_grad)
    pos = torch.tensor([5, 0, 5, 2], device=device)
    q_out, k_out = rope.rotary_embedding_cache(pos, query, key, d, cache, is_neox)
    gq, gk = rand(*query.shape, device=device), rand(t, hk * d, device=device)
    torch.autograd.backward((q_out, k_out) if with_key else (q_out,), (gq, gk) if with_key else (gq,))
    lq, lc = ref64(query).requires_grad_(), ref64(cache).requires_grad_()
    outs, grads = [ref_cache(lq, d, lc, pos.cpu(), is_neox)], [ref64(gq)]
    if with_key:
        lk = ref64(key).requires_grad_()
        outs.append(ref_cache(lk, d, lc, pos.cpu(), is_neox))
        grads.append(ref64(gk))
    torch.autograd.backward(outs, grads)
    tg = tag("rotary_embedding_cache.backward", (t, hq, hk, d, r), dtype)
    assert_close(query.grad, lq.grad, dtype, tg + " dquery", grad=True)
    if with_key:
        assert_close(key.grad, lk.grad, dtype, tg + " dkey", grad=True)
    if cache_grad:
        assert_close(cache.grad, lc.grad, dtype, tg + " dcache", grad=True)


@pytest.mark.parametrize("tables_grad", [False, True], ids=["qk", "qk_tables"])
@pytest.mark.parametrize("layout", ["upstream", "cache"])
def test_backward_inplace(layout, tables_grad, device):
    # In place under autograd: the update is recorded like torch's own in-place ops.
    t, hq, hk, d, r = 3, 2, 1, 8, 6
    xq = rand(t, hq, d, device=device, requires_grad=True)
    xk = rand(t, hk, d, device=device, requires_grad=True)
    pos = torch.tensor([2, 0, 4], device=device)
    g = rand(t, hq, d, device=device)
    lq, lk = ref64(xq).requires_grad_(), ref64(xk).requires_grad_()
    if layout == "upstream":
        cos = rand(5, r // 2, device=device, requires_grad=tables_grad)
        sin = rand(5, r // 2, device=device, requires_grad=tables_grad)
        q, k = xq * 1, xk * 1
        q_out, k_out = rope.apply_rotary_pos_emb(q, k, cos, sin, pos, inplace=True)
        tables, lt = (cos, sin), [ref64(cos).requires_grad_(), ref64(sin).requires_grad_()]
        rq = ref_positions(lq, lt[0], lt[1], pos.cpu(), False)
        rk = ref_positions(lk, lt[0], lt[1], pos.cpu(), False)
    else:
        cache = rand(5, r, device=device, requires_grad=tables_grad)
        q, k = (xq * 1).view(t, hq * d), (xk * 1).view(t, hk * d)
        q_out, k_out = rope.rotary_embedding_cache(pos, q, k, d, cache, True, inplace=True)
        tables, lt = (cache,), [ref64(cache).requires_grad_()]
        rq = ref_cache(lq.view(t, -1), d, lt[0], pos.cpu(), True)
        rk = ref_cache(lk.view(t, -1), d, lt[0], pos.cpu(), True)
    assert q_out is q and k_out is k
    (q_out.reshape(g.shape) * g).sum().backward()
    ((rq.reshape(g.shape) * ref64(g)).sum() + 0 * rk.sum()).backward()
    tg = tag(f"rotary_embedding[{layout}].backward_inplace", (t, hq, hk, d, r), torch.float32)
    assert_close(xq.grad, lq.grad, torch.float32, tg + " dq", grad=True)
    assert_close(xk.grad, lk.grad, torch.float32, tg + " dk", grad=True)
    if tables_grad:
        for tb, ref in zip(tables, lt):
            assert_close(tb.grad, ref.grad, torch.float32, tg + " dtable", grad=True)


def test_backward_only_q_used(device):
    q = rand(3, 2, 8, device=device, requires_grad=True)
    k = rand(3, 1, 8, device=device, requires_grad=True)
    cos, sin = _tables(4, 4, device)
    pos = torch.tensor([1, 3, 0], device=device)
    q_out, _ = rope.apply_rotary_pos_emb(q, k, cos, sin, pos)
    q_out.sum().backward()
    assert torch.count_nonzero(k.grad) == 0
    lq = ref64(q).requires_grad_()
    ref_positions(lq, ref64(cos), ref64(sin), pos.cpu(), False).sum().backward()
    assert_close(q.grad, lq.grad, torch.float32, tag("rotary_embedding.backward", q.shape, torch.float32), grad=True)


# ------------------------------------------------------------------- opcheck


def _opcheck_cases(device):
    f32 = dict(device=device)
    cos, sin = rand(6, 4, **f32), rand(6, 4, **f32)
    pos = torch.tensor([[1, 5, 0]], device=device)
    q, k = rand(1, 3, 3, 8, **f32), rand(1, 3, 1, 8, **f32)
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    hq, hk = rand(2, 3, 4, 10, **f32), rand(2, 1, 4, 10, **f32)
    hcos, hsin = rand(1, 4, 6, **f32), rand(1, 4, 6, **f32)
    tpos = torch.tensor([4, 0, 2], device=device, dtype=torch.int32)
    query, key, cache = rand(3, 16, **f32), rand(3, 8, **f32), rand(5, 8, **f32)
    ops = torch.ops.flag_gems
    return {
        "rope_pos": (ops.rotary_embedding.default, (qg, kg, cos, sin, pos, False)),
        "rope_nopos_inter": (ops.rotary_embedding.default, (qg, kg, cos, sin, None, True)),
        "rope_bf16": (ops.rotary_embedding.default, (q.to(torch.bfloat16), k.to(torch.bfloat16), cos, sin, pos, True)),
        "rope_": (ops.rotary_embedding_.default, (q.clone(), k.clone(), cos, sin, pos, False)),
        "rope_backward": (ops.rotary_embedding_backward.default, (q, k, cos, sin, pos, True)),
        "hf": (ops.rotary_embedding_hf.default, (hq.requires_grad_(), hk.requires_grad_(), hcos, hsin, False)),
        "hf_inter": (ops.rotary_embedding_hf.default, (hq.detach(), hk.detach(), hcos, hsin, True)),
        "hf_backward": (ops.rotary_embedding_hf_backward.default, (hq.detach(), hk.detach(), hcos, hsin, False)),
        "cache": (ops.rotary_embedding_cache.default, (tpos, query.clone().requires_grad_(), key, 8, cache, True)),
        "cache_q": (ops.rotary_embedding_cache_q.default, (tpos, query.clone().requires_grad_(), 8, cache, False)),
        "cache_": (ops.rotary_embedding_cache_.default, (tpos, query.clone(), key.clone(), 8, cache, True)),
        "cache_q_": (ops.rotary_embedding_cache_.default, (tpos, query.clone(), None, 8, cache, False)),
        "cache_backward": (ops.rotary_embedding_cache_backward.default, (tpos, query, key, 8, cache, True)),
        "cache_q_backward": (ops.rotary_embedding_cache_backward.default, (tpos, query, None, 8, cache, False)),
    }


OPCHECK_CASES = ["rope_pos", "rope_nopos_inter", "rope_bf16", "rope_", "rope_backward", "hf", "hf_inter",
                 "hf_backward", "cache", "cache_q", "cache_", "cache_q_", "cache_backward", "cache_q_backward"]


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(case, device):
    cases = _opcheck_cases(device)
    assert sorted(cases) == sorted(OPCHECK_CASES)
    op, args = cases[case]
    torch.library.opcheck(op, args, test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize("layout", ["upstream", "hf", "cache"])
def test_opcheck_table_grads(layout, device):
    # Tables that require grad: the backward adds their plain-torch gradient (traced by AOT too).
    ops = torch.ops.flag_gems
    if layout == "upstream":
        q, k = rand(3, 2, 8, device=device, requires_grad=True), rand(3, 1, 8, device=device, requires_grad=True)
        cos, sin = rand(6, 4, device=device, requires_grad=True), rand(6, 4, device=device, requires_grad=True)
        op, args = ops.rotary_embedding.default, (q, k, cos, sin, torch.tensor([1, 5, 1], device=device), False)
    elif layout == "hf":
        q, k = rand(2, 2, 3, 8, device=device, requires_grad=True), rand(2, 1, 3, 8, device=device)
        cos, sin = rand(1, 3, 6, device=device, requires_grad=True), rand(1, 3, 6, device=device)
        op, args = ops.rotary_embedding_hf.default, (q, k, cos, sin, True)
    else:
        query, key = rand(3, 16, device=device), rand(3, 8, device=device, requires_grad=True)
        cache = rand(5, 6, device=device, requires_grad=True)
        op, args = ops.rotary_embedding_cache.default, (torch.tensor([4, 0, 4], device=device), query, key, 8, cache,
                                                        False)
    torch.library.opcheck(op, args, test_utils=OPCHECK_UTILS)


# ------------------------------------------------------------------- bad input


def _r(dev, *shape, dtype=torch.float32):
    return rand(*shape, dtype=dtype, device=dev)


def _p(dev, n=4):
    return torch.arange(n, device=dev)


_f = rope.apply_rotary_pos_emb
_hf = rope.apply_rotary_pos_emb_hf
_c = rope.rotary_embedding_cache

# (name, exception, words in the message, call(device))
BAD_CASES = [
    ("odd_head_dim", ValueError, "even",
     lambda d: _f(_r(d, 4, 2, 7), _r(d, 4, 1, 7), _r(d, 6, 3), _r(d, 6, 3), _p(d))),
    ("rotary_dim_gt_head_dim", ValueError, "rotary_dim",
     lambda d: _f(_r(d, 4, 2, 8), _r(d, 4, 1, 8), _r(d, 6, 8), _r(d, 6, 8), _p(d))),
    ("hf_odd_rotary_dim", ValueError, "even",
     lambda d: _hf(_r(d, 1, 2, 4, 8), _r(d, 1, 1, 4, 8), _r(d, 1, 4, 5), _r(d, 1, 4, 5))),
    ("hf_rotary_dim_gt_head_dim", ValueError, "rotary dim",
     lambda d: _hf(_r(d, 1, 2, 4, 8), _r(d, 1, 1, 4, 8), _r(d, 1, 4, 10), _r(d, 1, 4, 10))),
    ("cache_odd_rotary_dim", ValueError, "even", lambda d: _c(_p(d), _r(d, 4, 16), None, 8, _r(d, 6, 5))),
    ("cache_rotary_dim_gt_head_size", ValueError, "rotary dim",
     lambda d: _c(_p(d), _r(d, 4, 16), None, 8, _r(d, 6, 10))),
    ("token_mismatch", ValueError, "token dims",
     lambda d: _f(_r(d, 4, 2, 8), _r(d, 5, 1, 8), _r(d, 6, 4), _r(d, 6, 4), _p(d))),
    ("positions_mismatch", ValueError, "position_ids",
     lambda d: _f(_r(d, 4, 2, 8), _r(d, 4, 1, 8), _r(d, 6, 4), _r(d, 6, 4), _p(d, 3))),
    ("cache_key_tokens", ValueError, "key", lambda d: _c(_p(d), _r(d, 4, 16), _r(d, 3, 8), 8, _r(d, 6, 8))),
    ("cache_query_width", ValueError, "query", lambda d: _c(_p(d), _r(d, 4, 12), None, 8, _r(d, 6, 8))),
    ("hf_seq_mismatch", ValueError, "seq",
     lambda d: _hf(_r(d, 1, 2, 4, 8), _r(d, 1, 1, 3, 8), _r(d, 1, 4, 8), _r(d, 1, 4, 8))),
    ("hf_table_shape", ValueError, "full table",
     lambda d: _hf(_r(d, 1, 2, 4, 8), _r(d, 1, 1, 4, 8), _r(d, 1, 3, 8), _r(d, 1, 3, 8))),
    ("int_q", TypeError, "dtype",
     lambda d: _f(_p(d, 64).view(4, 2, 8), _p(d, 32).view(4, 1, 8), _r(d, 6, 4), _r(d, 6, 4), _p(d))),
    ("k_dtype", TypeError, "k",
     lambda d: _f(_r(d, 4, 2, 8), _r(d, 4, 1, 8, dtype=torch.float16), _r(d, 6, 4), _r(d, 6, 4), _p(d))),
    ("float_position_ids", TypeError, "position_ids",
     lambda d: _f(_r(d, 4, 2, 8), _r(d, 4, 1, 8), _r(d, 6, 4), _r(d, 6, 4), _p(d).float())),
    ("float_positions", TypeError, "positions", lambda d: _c(_p(d).float(), _r(d, 4, 16), None, 8, _r(d, 6, 8))),
    ("int_cache", TypeError, "cos_sin_cache", lambda d: _c(_p(d), _r(d, 4, 16), None, 8, _p(d, 48).view(6, 8))),
    ("k_missing", TypeError, "k", lambda d: _f(_r(d, 4, 2, 8), None, _r(d, 6, 4), _r(d, 6, 4), _p(d))),
    ("sin_shape", ValueError, "sin", lambda d: _f(_r(d, 4, 2, 8), _r(d, 4, 1, 8), _r(d, 6, 4), _r(d, 6, 2), _p(d))),
    ("3d_q_without_positions", ValueError, "position_ids",
     lambda d: _f(_r(d, 4, 2, 8), _r(d, 4, 1, 8), _r(d, 6, 4), _r(d, 6, 4))),
    ("seq_longer_than_table", ValueError, "exceeds",
     lambda d: _f(_r(d, 1, 7, 2, 8), _r(d, 1, 7, 1, 8), _r(d, 6, 4), _r(d, 6, 4))),
    ("bad_head_size", ValueError, "head_size", lambda d: _c(_p(d), _r(d, 4, 16), None, 5, _r(d, 6, 4))),
    ("cache_not_2d", ValueError, "cos_sin_cache", lambda d: _c(_p(d), _r(d, 4, 16), None, 8, _r(d, 1, 6, 8))),
]


@pytest.mark.parametrize("name, exc, words, call", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input(name, exc, words, call, device):
    with pytest.raises(exc, match=words):
        call(device)


def test_bad_input_under_fake_tensors(device):
    # The ops' fake implementations run the same checks (what torch.compile sees).
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k = torch.empty(4, 2, 7, device=device), torch.empty(4, 1, 7, device=device)
        cos = torch.empty(6, 3, device=device)
        with pytest.raises(ValueError, match="even"):
            torch.ops.flag_gems.rotary_embedding(q, k, cos, cos, None, False)


def test_positions_out_of_range(device):
    q, k = rand(3, 2, 8, device=device), rand(3, 1, 8, device=device)
    cos, sin = rand(4, 4, device=device), rand(4, 4, device=device)
    for bad in ([0, 4, 1], [0, -1, 1]):
        pos = torch.tensor(bad, device=device)
        if device == "cpu":
            # Host positions: checked, a clear error.
            with pytest.raises(ValueError, match="position_ids"):
                rope.apply_rotary_pos_emb(q, k, cos, sin, pos)
            with pytest.raises(ValueError, match="positions"):
                rope.rotary_embedding_cache(pos, q.view(3, 16), None, 8, rand(4, 8, device=device))
        else:
            # Device positions: no sync; the token's rotated dims come out NaN, the others are right.
            q_out, k_out = rope.apply_rotary_pos_emb(q, k, cos, sin, pos)
            assert torch.isnan(q_out[1]).all() and torch.isnan(k_out[1]).all()
            assert not torch.isnan(q_out[[0, 2]]).any()


def test_cpu_tensors_outside_interpreter(monkeypatch):
    import flag_gems.kernels._common as common

    monkeypatch.setattr(common, "interpreter_mode", lambda: False)
    q, k = torch.randn(2, 2, 8), torch.randn(2, 1, 8)
    cos, sin = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET"):
        rope.apply_rotary_pos_emb(q, k, cos, sin, torch.tensor([0, 2]))


def test_config_is_cached():
    assert kern.rope_config(32, 8, 64, 128, 2, False) is kern.rope_config(32, 8, 64, 128, 2, False)
    bhq, bhk, br2, _, _ = kern.rope_config(32, 8, 64, 128, 2, False)
    assert (bhq, bhk, br2) == (16, 8, 64)


# ------------------------------------------------------------------- GPU, Llama-3-8B


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["upstream", "hf", "vllm"])
def test_llama3_8b_shape(layout, device):
    t, hq, hk, d, dtype = 4096, 32, 8, 128, torch.bfloat16
    inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.arange(8192, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = ang.cos().float().to(device), ang.sin().float().to(device)
    qkv, q, k = _fused_qkv(t, hq, hk, d, dtype, device)
    pos = torch.randint(0, 8192, (t,), device=device)
    tg = tag(f"rotary_embedding[{layout}]", (t, hq, hk, d), dtype)
    ref_q = ref_positions(ref64(q), ref64(cos), ref64(sin), pos.cpu(), False)
    ref_k = ref_positions(ref64(k), ref64(cos), ref64(sin), pos.cpu(), False)
    if layout == "upstream":
        q_out, k_out = rope.apply_rotary_pos_emb(q, k, cos, sin, pos)
    elif layout == "vllm":
        cache = torch.cat((cos, sin), -1)
        q_out, k_out = rope.rotary_embedding_cache(pos, q.view(t, -1), k.view(t, -1), d, cache, True, inplace=True)
        q_out, k_out = q_out.view(t, hq, d), k_out.view(t, hk, d)
    else:
        full_c, full_s = torch.cat((cos, cos), -1)[pos][None], torch.cat((sin, sin), -1)[pos][None]
        qh, kh = q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2)
        q_out, k_out = rope.apply_rotary_pos_emb_hf(qh, kh, full_c, full_s)
        q_out, k_out = q_out.transpose(1, 2)[0], k_out.transpose(1, 2)[0]
    assert_close(q_out, ref_q, dtype, tg + " q")
    assert_close(k_out, ref_k, dtype, tg + " k")
