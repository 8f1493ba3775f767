"""Every C++ wrapper against a float64 plain-torch reference, and what each one refuses.

On a GPU the wrappers are the ops' CUDA kernels (launches from C++ once compiled); without
one they are registered as the CPU kernels for these tests and launch through the Python hook
to Triton's interpreter, so the same wrapper logic (checks, layouts, launch configuration,
kernel arguments) is checked here either way.

"Ran in C++" is read from the launcher's counters after the call: a wrapper that refuses
hands the call to the op's Python implementation (or the native aten kernel), which launches
nothing through the C++ launcher.
"""

import pytest
import torch
import torch.nn.functional as F

import flag_gems
from flag_gems import c_runtime
from accuracy import DTYPE_IDS, DTYPES, TOLERANCES, rand

aten = torch.ops.aten
fg = torch.ops.flag_gems


@pytest.fixture
def dev(cpp_dev):
    """The device whose flag_gems ops are served by the C++ wrappers for the test (conftest)."""
    return cpp_dev


def cpp_launches() -> int:
    s = c_runtime.stats()
    return s["cpp_launches"] + s["python_launches"]


class Counted:
    """``with Counted() as c: ...``; ``c.n``: launches the C++ launcher made in the block."""

    def __enter__(self):
        self.start = cpp_launches()
        return self

    def __exit__(self, *exc):
        self.n = cpp_launches() - self.start
        return False


def close(out, ref, what, dtype=None):
    atol, rtol = TOLERANCES[dtype or out.dtype]
    torch.testing.assert_close(out.double(), ref.double().to(out.device), atol=atol, rtol=rtol,
                               msg=lambda m: f"[{what}] {m}")


def rms_ref(x, w, eps, offset=0.0):
    xd = x.double()
    y = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
    return y * (w.double() + offset) if w is not None else y


# --------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 40), (7, 129)], ids=str)
def test_rms_norm(dev, dtype, shape):
    x, w = rand(*shape, dtype=dtype, device=dev), rand(shape[-1], dtype=dtype, device=dev)
    with Counted() as c:
        y = fg.rms_norm(x, w, 1e-6, 0.5)
    assert c.n == 1
    close(y, rms_ref(x, w, 1e-6, 0.5), f"op=rms_norm shape={shape} dtype={dtype}")
    with Counted() as c:
        y = flag_gems.rms_norm(x, [shape[-1]], None, 1e-6)  # the public function, no weight
    assert c.n == 1
    close(y, rms_ref(x, None, 1e-6), f"op=rms_norm(public) shape={shape} dtype={dtype}")


def test_rms_norm_strided_rows_and_refusals(dev):
    x = rand(4, 6, 64, device=dev)[:, ::2]  # token dims with strides: one view, no copy
    w = rand(64, device=dev)
    with Counted() as c:
        y = fg.rms_norm(x, w, 1e-5)
    assert c.n == 1
    close(y, rms_ref(x, w, 1e-5), "op=rms_norm strided")
    xt = rand(64, 5, device=dev).t()  # columns not unit-stride: the Python path copies
    with Counted() as c:
        y = fg.rms_norm(xt, w, 1e-5)
    assert c.n == 0
    close(y, rms_ref(xt, w, 1e-5), "op=rms_norm transposed (Python path)")
    with pytest.raises(ValueError, match="weight"):  # the Python implementation's error
        fg.rms_norm(x, rand(63, device=dev), 1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fused_add_rms_norm_in_place(dev, dtype):
    x, r, w = (rand(3, 96, dtype=dtype, device=dev), rand(3, 96, dtype=dtype, device=dev),
               rand(96, dtype=dtype, device=dev))
    h_ref = (x.double() + r.double()).to(dtype)  # the kernel normalizes the rounded sum
    y_ref = rms_ref(h_ref, w, 1e-6)
    with Counted() as c:
        fg.fused_add_rms_norm(x, r, w, 1e-6)
    assert c.n == 1
    close(r, h_ref, f"op=fused_add_rms_norm h dtype={dtype}")
    close(x, y_ref, f"op=fused_add_rms_norm y dtype={dtype}")


def test_add_rms_norm_functional(dev):
    x, r, w = rand(2, 3, 48, device=dev), rand(2, 3, 48, device=dev), rand(48, device=dev)
    with Counted() as c:
        y, h = flag_gems.add_rms_norm(x, r, w, 1e-6)
    assert c.n == 1
    close(h, x.double() + r.double(), "op=add_rms_norm h")
    close(y, rms_ref(h, w, 1e-6), "op=add_rms_norm y")


def test_aten_fused_rms_norm_through_the_eager_mode(dev):
    x, w = rand(2, 3, 4, 16, device=dev), rand(4, 16, device=dev)
    with flag_gems.use_gems(include=["_fused_rms_norm"]):
        with Counted() as c:
            y, rstd = aten._fused_rms_norm(x, [4, 16], w, 1e-6)
    assert c.n == 1
    xd = x.double().flatten(-2)
    ref = (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)).view(x.shape) * w.double()
    close(y, ref, "op=_fused_rms_norm")
    assert rstd.shape == (2, 3, 1, 1) and rstd.dtype == torch.float32
    close(rstd.flatten(), torch.rsqrt(xd.pow(2).mean(-1) + 1e-6).flatten(), "op=_fused_rms_norm rstd")


# --------------------------------------------------------------------------- SiLU·mul


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 72), (257,)], ids=str)
def test_silu_and_mul(dev, dtype, shape):
    a, b = rand(*shape, dtype=dtype, device=dev), rand(*shape, dtype=dtype, device=dev)
    with Counted() as c:
        out = flag_gems.silu_and_mul(a, b)
    assert c.n == 1
    close(out, F.silu(a.double()) * b.double(), f"op=silu_and_mul shape={shape} dtype={dtype}")


def test_silu_and_mul_layouts(dev):
    big = rand(4, 6, 2, 32, device=dev)
    a, b = big[:, :, 0], big[:, :, 1]  # token dims fold: no copy
    with Counted() as c:
        out = fg.silu_and_mul(a, b)
    assert c.n == 1
    close(out, F.silu(a.double()) * b.double(), "op=silu_and_mul strided")
    at = rand(32, 5, device=dev).t()  # last dim not unit-stride: the Python path (it copies)
    with Counted() as c:
        out = fg.silu_and_mul(at, at)
    assert c.n == 0
    close(out, F.silu(at.double()) * at.double(), "op=silu_and_mul transposed")


def _act_ref(a, act):
    ad = a.double()
    return {"silu": F.silu(ad), "none": F.gelu(ad), "tanh": F.gelu(ad, approximate="tanh")}[act]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act", ["silu", "none", "tanh"], ids=["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 72), (257,)], ids=str)
def test_act_and_mul_one_tensor_forms(dev, dtype, act, shape):
    # vLLM's SiluAndMul layout x [*, 2d] (what fuse_linear's gate/up GEMM feeds), the gelu forms
    # and the out= op: each one C++ launch, through the op and the public function.
    x = rand(*shape[:-1], 2 * shape[-1], dtype=dtype, device=dev)
    d = shape[-1]
    ref = _act_ref(x[..., :d], act) * x[..., d:].double()
    what = f"act={act} shape={shape} dtype={dtype}"
    if act == "silu":
        with Counted() as c:
            out = fg.silu_and_mul_fused(x)
        assert c.n == 1
        close(out, ref, "op=silu_and_mul_fused " + what)
        with Counted() as c:
            out = flag_gems.silu_and_mul_fused(x)
        assert c.n == 1
        close(out, ref, "op=silu_and_mul_fused public " + what)
        out = torch.full(shape, float("nan"), dtype=dtype, device=dev)
        v = out._version
        with Counted() as c:
            fg.silu_and_mul_out(out, x)
        assert c.n == 1 and out._version > v
        close(out, ref, "op=silu_and_mul_out " + what)
    else:
        with Counted() as c:
            out = flag_gems.gelu_and_mul_fused(x, act)
        assert c.n == 1
        close(out, ref, "op=gelu_and_mul_fused public " + what)
        a, b = rand(*shape, dtype=dtype, device=dev), rand(*shape, dtype=dtype, device=dev)
        with Counted() as c:
            out = flag_gems.gelu_and_mul(a, b, act)
        assert c.n == 1
        close(out, _act_ref(a, act) * b.double(), "op=gelu_and_mul public " + what)
    assert out.is_contiguous() and out.shape == shape


def test_act_and_mul_one_tensor_refusals(dev):
    # Left to the Python implementations, which answer or raise: a last dim that is not unit-stride
    # (copied there), an out= of the wrong shape (raises), an unknown approximation (raises).
    x = rand(2 * 24, 3, device=dev).t()  # [3, 48], strides (1, 3)
    with Counted() as c:
        out = fg.silu_and_mul_fused(x)
    assert c.n == 0
    close(out, F.silu(x[:, :24].double()) * x[:, 24:].double(), "op=silu_and_mul_fused transposed")
    with pytest.raises(ValueError, match="out"):
        fg.silu_and_mul_out(torch.empty(3, 25, device=dev), x.contiguous())
    with pytest.raises(ValueError, match="approximate"):
        fg.gelu_and_mul_fused(x.contiguous(), "fast")
    big = rand(4, 3, 64, device=dev)[:, 1]  # strided rows: read in place, one launch
    with Counted() as c:
        out = fg.silu_and_mul_fused(big)
    assert c.n == 1
    close(out, F.silu(big[:, :32].double()) * big[:, 32:].double(), "op=silu_and_mul_fused strided rows")


# --------------------------------------------------------------------------- RoPE


def rope_ref(x, cos, sin, pos, interleaved):
    """Half tables [max_pos, r/2] rows at pos (*tokens) on x (*tokens, H, D), float64."""
    half = cos.shape[-1]
    c, s = cos.double()[pos].unsqueeze(-2), sin.double()[pos].unsqueeze(-2)
    xd = x.double()
    out = xd.clone()
    if interleaved:
        x1, x2 = xd[..., 0:2 * half:2], xd[..., 1:2 * half:2]
        out[..., 0:2 * half:2] = x1 * c - x2 * s
        out[..., 1:2 * half:2] = x2 * c + x1 * s
    else:
        x1, x2 = xd[..., :half], xd[..., half:2 * half]
        out[..., :half] = x1 * c - x2 * s
        out[..., half:2 * half] = x2 * c + x1 * s
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("rot", [16, 10], ids=["full", "partial"])
def test_rotary_embedding(dev, dtype, interleaved, rot):
    q, k = rand(2, 3, 4, 16, dtype=dtype, device=dev), rand(2, 3, 2, 16, dtype=dtype, device=dev)
    cos, sin = rand(9, rot // 2, device=dev), rand(9, rot // 2, device=dev)
    pos = torch.randint(0, 9, (2, 3), device=dev)
    with Counted() as c:
        qo, ko = fg.rotary_embedding(q, k, cos, sin, pos, interleaved)
    assert c.n == 1
    what = f"op=rotary_embedding dtype={dtype} interleaved={interleaved} rot={rot}"
    close(qo, rope_ref(q, cos, sin, pos, interleaved), what)
    close(ko, rope_ref(k, cos, sin, pos, interleaved), what)
    # no position_ids: q [B, S, H, D], row = s
    with Counted() as c:
        qo, ko = flag_gems.apply_rotary_pos_emb(q, k, cos, sin, rotary_interleaved=interleaved)
    assert c.n == 1
    spos = torch.arange(3, device=dev).expand(2, 3)
    close(qo, rope_ref(q, cos, sin, spos, interleaved), what + " no positions")
    close(ko, rope_ref(k, cos, sin, spos, interleaved), what + " no positions")


def test_rotary_embedding_in_place_and_vllm_tokens(dev):
    q, k = rand(5, 4, 16, device=dev), rand(5, 2, 16, device=dev)  # [T, H, D], positions [T]
    cos, sin = rand(12, 8, device=dev), rand(12, 8, device=dev)
    pos = torch.randint(0, 12, (5,), device=dev)
    q_ref, k_ref = rope_ref(q, cos, sin, pos, False), rope_ref(k, cos, sin, pos, False)
    vq, vk = q._version, k._version
    with Counted() as c:
        out = flag_gems.apply_rotary_pos_emb(q, k, cos, sin, pos, inplace=True)
    assert c.n == 1 and out[0] is q and out[1] is k
    close(q, q_ref, "op=rotary_embedding_ q")
    close(k, k_ref, "op=rotary_embedding_ k")
    assert q._version > vq and k._version > vk
    if dev == "cpu":  # positions out of range on the CPU: the Python implementation raises
        with pytest.raises(ValueError, match="position_ids"):
            fg.rotary_embedding(q, k, cos, sin, torch.full((5,), 12, device=dev))


def hf_rope_ref(x, cos, sin, interleaved):
    """HF layout: x [B, H, S, D], full tables [B or 1, S, r], float64."""
    r = cos.shape[-1]
    c, s = cos.double().unsqueeze(1), sin.double().unsqueeze(1)
    xd = x.double()
    out = xd.clone()
    xr = xd[..., :r]
    if interleaved:
        rot = torch.stack((-xr[..., 1::2], xr[..., 0::2]), -1).flatten(-2)
    else:
        rot = torch.cat((-xr[..., r // 2:], xr[..., :r // 2]), -1)
    out[..., :r] = xr * c + rot * s
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("layout", ["bshd_view", "bhsd", "fused_qkv"])
@pytest.mark.parametrize("rot,tables", [(16, "3d"), (10, "3d_batch"), (16, "2d"), (16, "4d")])
def test_rotary_embedding_hf(dev, dtype, interleaved, layout, rot, tables):
    b, hq, hk, s, d = 2, 4, 2, 3, 16
    if layout == "bshd_view":  # what HF attention passes: [B, S, H, D] projections transposed
        q = rand(b, s, hq, d, dtype=dtype, device=dev).transpose(1, 2)
        k = rand(b, s, hk, d, dtype=dtype, device=dev).transpose(1, 2)
    elif layout == "fused_qkv":  # heads sliced out of one [B, S, Hq + 2 Hk, D] projection: not dense
        qkv = rand(b, s, hq + 2 * hk, d, dtype=dtype, device=dev)
        q, k = qkv[:, :, :hq].transpose(1, 2), qkv[:, :, hq:hq + hk].transpose(1, 2)
    else:
        q, k = rand(b, hq, s, d, dtype=dtype, device=dev), rand(b, hk, s, d, dtype=dtype, device=dev)
    cos3 = rand(b if tables == "3d_batch" else 1, s, rot, device=dev)
    sin3 = rand(*cos3.shape, device=dev)
    cos, sin = {"2d": (cos3[0], sin3[0]), "4d": (cos3.unsqueeze(1), sin3.unsqueeze(1))}.get(tables, (cos3, sin3))
    with Counted() as c:
        qo, ko = fg.rotary_embedding_hf(q, k, cos, sin, interleaved)
    assert c.n == 1
    what = f"op=rotary_embedding_hf dtype={dtype} interleaved={interleaved} {layout} rot={rot} {tables}"
    close(qo, hf_rope_ref(q, cos3, sin3, interleaved), what + " q")
    close(ko, hf_rope_ref(k, cos3, sin3, interleaved), what + " k")
    assert qo.stride() == torch.empty_like(q).stride() and ko.stride() == torch.empty_like(k).stride()
    # The same kernel as the Python launcher: bit-equal results.
    from flag_gems.kernels.rotary_embedding import rope_hf_fwd

    pq, pk = rope_hf_fwd(q, k, cos, sin, interleaved=interleaved)
    assert torch.equal(qo, pq) and torch.equal(ko, pk)
    with Counted() as c:  # the public function takes the wrapper too
        hq, hk = flag_gems.apply_rotary_pos_emb_hf(q, k, cos, sin, rotary_interleaved=interleaved)
    assert c.n == 1 and torch.equal(hq, pq) and torch.equal(hk, pk)


def cache_rope_ref(x, cache, pos, head_size, is_neox):
    """vLLM's layout: x (*tokens, H * D) or (*tokens, H, D), cos|sin cache [max_pos, r], float64."""
    half = cache.shape[1] // 2
    x3 = x.reshape(*pos.shape, -1, head_size)
    out = rope_ref(x3, cache[:, :half], cache[:, half:], pos, not is_neox)
    return out.reshape(x.shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("rot", [16, 10], ids=["full", "partial"])
@pytest.mark.parametrize("form", ["flat", "heads", "batched"])
def test_rotary_embedding_cache(dev, dtype, is_neox, rot, form):
    # vLLM's rope (positions, query, key, head_size, cos_sin_cache, is_neox) in one C++ launch:
    # out of place (new tensors of the inputs' shapes) and in place (the public function's
    # inplace=True, vLLM's own semantics), through the op and through the public function.
    tokens = {"flat": (5,), "heads": (5,), "batched": (2, 3)}[form]
    hq, hk, d = 4, 2, 16
    shape = (lambda h: (*tokens, h, d)) if form == "heads" else (lambda h: (*tokens, h * d))
    q, k = rand(*shape(hq), dtype=dtype, device=dev), rand(*shape(hk), dtype=dtype, device=dev)
    cache = rand(11, rot, device=dev)
    pos = torch.randint(0, 11, tokens, device=dev)
    q_ref, k_ref = cache_rope_ref(q, cache, pos, d, is_neox), cache_rope_ref(k, cache, pos, d, is_neox)
    what = f"op=rotary_embedding_cache dtype={dtype} neox={is_neox} rot={rot} {form}"
    with Counted() as c:
        qo, ko = fg.rotary_embedding_cache(pos, q, k, d, cache, is_neox)
    assert c.n == 1
    assert qo.shape == q.shape and ko.shape == k.shape and qo.is_contiguous() and ko.is_contiguous()
    close(qo, q_ref, what)
    close(ko, k_ref, what)
    with Counted() as c:
        qo, ko = flag_gems.rotary_embedding_cache(pos, q, k, d, cache, is_neox)
    assert c.n == 1
    close(qo, q_ref, what + " public")
    close(ko, k_ref, what + " public")
    vq, vk = q._version, k._version
    with Counted() as c:
        out = flag_gems.rotary_embedding_cache(pos, q, k, d, cache, is_neox, inplace=True)
    assert c.n == 1 and out[0] is q and out[1] is k
    assert q._version > vq and k._version > vk
    close(q, q_ref, what + " in place")
    close(k, k_ref, what + " in place")


def test_rotary_embedding_cache_refusals(dev):
    # What the wrappers leave to the Python implementation, which still answers correctly or
    # raises its own error: no key, a strided query the kernel cannot rotate in place, positions
    # out of range (on the CPU: the Python launcher raises), a head size that does not divide.
    q, k = rand(5, 4 * 16, device=dev), rand(5, 2 * 16, device=dev)
    cache, pos = rand(11, 16, device=dev), torch.randint(0, 11, (5,), device=dev)
    q_ref = cache_rope_ref(q, cache, pos, 16, True)
    with Counted() as c:
        qo, ko = flag_gems.rotary_embedding_cache(pos, q, None, 16, cache)
    assert c.n == 0 and ko is None
    close(qo, q_ref, "op=rotary_embedding_cache no key")
    big = rand(5, 2, 4 * 16, device=dev)
    qs, ks = big[:, 0], rand(5, 2 * 16, device=dev)  # rows 2 * 64 apart: views the kernel reads directly
    qs_ref, ks_ref = cache_rope_ref(qs, cache, pos, 16, True), cache_rope_ref(ks, cache, pos, 16, True)
    with Counted() as c:
        flag_gems.rotary_embedding_cache(pos, qs, ks, 16, cache, inplace=True)
    assert c.n == 1
    close(qs, qs_ref, "op=rotary_embedding_cache_ strided rows")
    close(ks, ks_ref, "op=rotary_embedding_cache_ strided rows")
    with pytest.raises(ValueError, match="head_size|query"):
        fg.rotary_embedding_cache(pos, q, k, 24, cache, True)
    if dev == "cpu":
        with pytest.raises(ValueError, match="positions"):
            fg.rotary_embedding_cache(pos.clone().fill_(11), q, k, 16, cache, True)


def test_rotary_embedding_hf_refusals(dev):
    q, k = rand(1, 4, 3, 16, device=dev), rand(1, 2, 3, 16, device=dev)
    cos, sin = rand(1, 3, 16, device=dev), rand(1, 3, 16, device=dev)
    with Counted() as c:  # mixed dtypes, a table of the wrong length: the Python path raises, naming it
        with pytest.raises(TypeError, match="k"):
            fg.rotary_embedding_hf(q, k.half(), cos, sin, False)
        with pytest.raises(ValueError, match="cos"):
            fg.rotary_embedding_hf(q, k, cos[:, :2], sin[:, :2], False)
        with pytest.raises(ValueError, match="rotary dim"):
            fg.rotary_embedding_hf(q, k, rand(1, 3, 18, device=dev), rand(1, 3, 18, device=dev), False)
    assert c.n == 0


# --------------------------------------------------------------------------- add


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shapes", [((3, 40), (3, 40)), ((2, 3, 40), (40,)), ((4, 1, 6), (5, 1)), ((), (7,))],
                         ids=str)
def test_add_tensor(dev, dtype, shapes):
    a, b = rand(*shapes[0], dtype=dtype, device=dev), rand(*shapes[1], dtype=dtype, device=dev)
    with Counted() as c:
        out = fg.add_tensor(a, b)
    assert c.n == 1
    ref = a.double() + b.double()
    assert out.shape == ref.shape and out.dtype == dtype
    close(out, ref, f"op=add_tensor shapes={shapes} dtype={dtype}")


def test_add_tensor_layouts_and_refusals(dev):
    a = rand(6, 40, device=dev)
    out = fg.add_tensor(a.t(), a.t())  # transposed: the output keeps the inputs' layout, as torch
    assert out.stride() == (a + a).t().stride()
    close(out, 2 * a.t().double(), "op=add_tensor transposed")
    i = torch.randint(-9, 9, (3, 4), device=dev)
    with Counted() as c:  # integers, mixed dtypes: the Python path (its kernel or torch.add)
        out_i = fg.add_tensor(i, i)
        out_m = fg.add_tensor(a.half(), a)
    assert c.n == 0
    assert torch.equal(out_i, i + i) and out_m.dtype == torch.float32
    close(out_m, a.half().double() + a.double(), "op=add_tensor mixed", torch.float16)


def test_aten_add_through_the_eager_mode(dev):
    a, b = rand(3, 33, device=dev), rand(33, device=dev)
    with flag_gems.use_gems(include=["add.Tensor"]):
        with Counted() as c:
            out = a + b
            scaled = torch.add(a, b, alpha=2.0)  # alpha: native
            number = a + 1.5  # a wrapped number: native
    assert c.n == 1
    close(out, a.double() + b.double(), "op=add.Tensor")
    close(scaled, a.double() + 2 * b.double(), "op=add.Tensor alpha")
    close(number, a.double() + 1.5, "op=add.Tensor number")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shapes", [((3, 40), (3, 40)), ((2, 3, 40), (40,)), ((4, 1, 6), (5, 1)), ((), (7,))],
                         ids=str)
def test_aten_mul_through_the_eager_mode(dev, dtype, shapes):
    """``aten::mul.Tensor``'s C++ wrapper: broadcasting, fp32 compute rounded once (torch's own
    result, so compared exactly as well as against float64)."""
    a, b = rand(*shapes[0], dtype=dtype, device=dev), rand(*shapes[1], dtype=dtype, device=dev)
    native = a * b
    with flag_gems.use_gems(include=["mul.Tensor"]):
        with Counted() as c:
            out = a * b
    assert c.n == 1
    assert out.shape == native.shape and out.dtype == dtype
    close(out, a.double() * b.double(), f"op=mul.Tensor shapes={shapes} dtype={dtype}")
    torch.testing.assert_close(out, native, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_aten_sub_through_the_eager_mode(dev, dtype):
    a, b = rand(2, 3, 40, dtype=dtype, device=dev), rand(40, dtype=dtype, device=dev)
    native = a - b
    with flag_gems.use_gems(include=["sub.Tensor"]):
        with Counted() as c:
            out = a - b
            scaled = torch.sub(a, b, alpha=2)  # alpha: native
        assert c.n == 1
    close(out, a.double() - b.double(), f"op=sub.Tensor dtype={dtype}")
    torch.testing.assert_close(out, native, rtol=0, atol=0)
    close(scaled, a.double() - 2 * b.double(), "op=sub.Tensor alpha", dtype)


def test_aten_mul_layouts_and_refusals(dev):
    a = rand(6, 40, device=dev)
    with flag_gems.use_gems(include=["mul.Tensor"]):
        with Counted() as c:
            t = a.t() * a.t()  # transposed: the output keeps the inputs' layout, as torch
        assert c.n == 1
        i = torch.randint(-9, 9, (3, 4), device=dev)
        with Counted() as c:  # a number, integers, mixed dtypes: the native kernel
            number = a * 1.5
            ints = i * i
            mixed = a.half() * a
        assert c.n == 0
    assert t.stride() == (a * a).t().stride()
    close(t, a.t().double() ** 2, "op=mul.Tensor transposed")
    close(number, a.double() * 1.5, "op=mul.Tensor number")
    assert torch.equal(ints, i * i) and mixed.dtype == torch.float32
    close(mixed, a.half().double() * a.double(), "op=mul.Tensor mixed", torch.float16)


POSITIVE = {"rsqrt", "sqrt", "log", "reciprocal"}  # inputs >= 0.5 for these
UNARY = {  # test id -> (eager entry, torch call; the float64 reference is the same call on float64)
    "neg": ("neg.default", torch.neg),
    "rsqrt": ("rsqrt.default", torch.rsqrt),
    "silu": ("silu.default", F.silu),
    "exp": ("exp.default", torch.exp),
    "sigmoid": ("sigmoid.default", torch.sigmoid),
    "cos": ("cos.default", torch.cos),
    "sin": ("sin.default", torch.sin),
    "tanh": ("tanh.default", torch.tanh),
    "sqrt": ("sqrt.default", torch.sqrt),
    "log": ("log.default", torch.log),
    "abs": ("abs.default", torch.abs),
    "reciprocal": ("reciprocal.default", torch.reciprocal),
    "gelu": ("gelu.default", F.gelu),
    "gelu_tanh": ("gelu.default", lambda x: F.gelu(x, approximate="tanh")),
}


def _python_path(dev, fn):
    """``fn()`` with the C++ wrappers off on ``dev``'s key: the entry's Python implementation."""
    key = "CUDA" if dev == "cuda" else "CPU"
    c_runtime.uninstall(key)
    try:
        return fn()
    finally:
        c_runtime.install(key)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", sorted(UNARY))
def test_aten_unary_through_the_eager_mode(dev, name, dtype):
    """The C++ wrappers of the one-tensor ops (neg, rsqrt, silu, exp, ..., gelu in both forms): contiguous, transposed and broadcast-
    strided inputs; against float64, and equal to the Python implementation's result (one generated
    kernel, fp32 compute)."""
    entry, fn = UNARY[name]
    base = rand(5, 24, dtype=dtype, device=dev)
    if name in POSITIVE:
        base = base.abs() + 0.5
    inputs = {"contiguous": base, "transposed": base.t(), "expanded": base[:1].expand(3, 24)}
    native = {layout: fn(x) for layout, x in inputs.items()}
    with flag_gems.use_gems(include=[entry]):
        for layout, x in inputs.items():
            with Counted() as c:
                out = fn(x)
            assert c.n == 1, layout
            python = _python_path(dev, lambda: fn(x))
            what = f"op={name} {layout} dtype={dtype}"
            assert out.dtype == dtype and out.shape == x.shape, what
            assert out.stride() == python.stride() == native[layout].stride(), what  # TensorIterator's layout
            close(out, fn(x.double()), what)  # float64: the native kernel (the wrappers refuse it)
            torch.testing.assert_close(out, python, rtol=0, atol=0, msg=lambda m: f"[{what} vs Python path] {m}")
    if dtype == torch.float32:  # what they refuse: integers, fp64: the native kernel
        i = torch.randint(-9, 9, (3, 4), device=dev)
        d = rand(3, 4, dtype=torch.float64, device=dev).abs() + 0.5
        with flag_gems.use_gems(include=[entry]), Counted() as c:
            if name == "neg":
                assert torch.equal(fn(i), -i)
            got = fn(d)
        assert c.n == 0, name
        torch.testing.assert_close(got, fn(d.clone()), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_aten_mean_dim_through_the_eager_mode(dev, dtype):
    """``aten::mean.dim``'s C++ wrapper (the row-sum kernel with a 1 / n scale): trailing dims,
    keepdim, an fp32 result dtype; against float64 and bit-equal to the Python path."""
    x = rand(4, 3, 40, dtype=dtype, device=dev)
    calls = {
        "last keepdim": lambda: x.mean(-1, keepdim=True),
        "last": lambda: x.mean(-1),
        "two trailing": lambda: x.mean([1, 2]),
        "all (dim=[])": lambda: torch.ops.aten.mean.dim(x, []),
        "fp32 result": lambda: x.mean(-1, dtype=torch.float32),
    }
    refs = {
        "last keepdim": x.double().mean(-1, keepdim=True), "last": x.double().mean(-1),
        "two trailing": x.double().mean([1, 2]), "all (dim=[])": x.double().mean(),
        "fp32 result": x.double().mean(-1),
    }
    with flag_gems.use_gems(include=["mean.dim"]):
        for what, call in calls.items():
            with Counted() as c:
                out = call()
            assert c.n >= 1, what
            python = _python_path(dev, call)
            assert out.shape == refs[what].shape and out.dtype == python.dtype, what
            close(out, refs[what], f"op=mean.dim {what} dtype={dtype}", dtype)
            torch.testing.assert_close(out, python, rtol=0, atol=0, msg=lambda m: f"[mean.dim {what}] {m}")
        empty = rand(3, 0, device=dev)
        with Counted() as c:  # not the trailing dims, strided, empty rows: the native kernel
            middle = x.mean(1)
            strided = x.transpose(1, 2).mean(-1)
            nan = empty.mean(-1)
        assert c.n == 0
    close(middle, x.double().mean(1), "op=mean.dim middle", dtype)
    close(strided, x.double().transpose(1, 2).mean(-1), "op=mean.dim strided", dtype)
    assert nan.shape == (3,) and bool(nan.isnan().all())


@pytest.mark.parametrize("src", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("dst", DTYPES, ids=DTYPE_IDS)
def test_aten_to_copy_through_the_eager_mode(dev, src, dst):
    """``aten::_to_copy``'s C++ wrapper: casts between fp16 / bf16 / fp32 (and same-dtype copies)
    of dense tensors in their own layout; equal to torch's cast bit for bit (one rounding)."""
    base = rand(6, 40, dtype=src, device=dev)
    odd = rand(6, 1, 40, dtype=src, device=dev).as_strided((6, 1, 40), (40, 7, 1))  # a size-1 dim's stride
    inputs = {"contiguous": base, "transposed": base.t(), "size-1 dim stride": odd}
    native = {k: torch.ops.aten._to_copy.default(x, dtype=dst) for k, x in inputs.items()}
    with flag_gems.use_gems(include=["_to_copy.default"]):
        for layout, x in inputs.items():
            with Counted() as c:
                out = torch.ops.aten._to_copy.default(x, dtype=dst)
                on_its_device = torch.ops.aten._to_copy.default(x, dtype=dst, device=x.device,
                                                                memory_format=torch.preserve_format)
            assert c.n == 2, layout
            what = f"op=_to_copy {src}->{dst} {layout}"
            assert out.dtype == dst and out.stride() == native[layout].stride(), what
            assert out.data_ptr() != x.data_ptr(), what  # a copy, also for the same dtype
            for o in (out, on_its_device):
                torch.testing.assert_close(o, native[layout], rtol=0, atol=0, msg=lambda m: f"[{what}] {m}")


def test_aten_to_copy_refusals(dev):
    x = rand(6, 40, device=dev)
    with flag_gems.use_gems(include=["_to_copy.default"]), Counted() as c:
        got = {
            "to int": x.to(torch.int32),
            "to fp64": x.double(),
            "from fp64": x.double().float(),
            "sliced (not dense)": x[:, ::2].to(torch.bfloat16),
            "contiguous_format of a transposed tensor": x.t().to(torch.bfloat16, memory_format=torch.contiguous_format),
        }
        if dev == "cuda":  # "cuda" means the current device, whichever that is: native
            got["device without an index"] = torch.ops.aten._to_copy.default(x, dtype=torch.bfloat16,
                                                                            device=torch.device("cuda"))
    assert c.n == 0
    assert torch.equal(got["to int"], x.to(torch.int32)) and got["to fp64"].dtype == torch.float64
    assert torch.equal(got["from fp64"], x)
    assert torch.equal(got["sliced (not dense)"], x[:, ::2].to(torch.bfloat16))
    t = got["contiguous_format of a transposed tensor"]
    assert t.is_contiguous() and torch.equal(t, x.t().to(torch.bfloat16))
    if dev == "cuda":
        assert torch.equal(got["device without an index"], x.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_aten_pow_scalar_through_the_eager_mode(dev, dtype):
    """``aten::pow.Tensor_Scalar``'s C++ wrapper: torch's exact forms (0, 1, 2, 3, +-0.5, -1, -2, as
    ints and floats) and the general pow; against float64, bit-equal to the Python path."""
    x = rand(5, 24, dtype=dtype, device=dev).abs() + 0.25  # fractional exponents need x > 0
    exponents = [2, 2.0, 3, 0, 1, 0.5, -0.5, -1, -2, 2.5, -1.75]
    native = {e: x.pow(e) for e in exponents}
    with flag_gems.use_gems(include=["pow.Tensor_Scalar"]):
        for e in exponents:
            with Counted() as c:
                out = x.pow(e)
            assert c.n == 1, e
            python = _python_path(dev, lambda: x.pow(e))
            what = f"op=pow.Tensor_Scalar e={e!r} dtype={dtype}"
            assert out.dtype == dtype and out.shape == x.shape, what
            close(out, x.double().pow(e), what)
            torch.testing.assert_close(out, python, rtol=0, atol=0, msg=lambda m: f"[{what} vs Python path] {m}")
            if e in (0, 1, 2):  # one rounding of an exact fp32 value, in torch too: the same bits
                torch.testing.assert_close(out, native[e], rtol=0, atol=0, msg=lambda m: f"[{what} vs torch] {m}")
        i = torch.randint(1, 9, (3, 4), device=dev)
        with Counted() as c:  # integer tensors, a bool exponent: the native kernel
            ints = i.pow(2)
            boolean = x.pow(True)
        assert c.n == 0
    assert torch.equal(ints, i * i) and torch.equal(boolean, x)


# --------------------------------------------------------------------------- mm / bmm


def gemm_close(out, a, b, what):
    from accuracy import GEMM_RTOL

    ref = a.double() @ b.double()
    bound = GEMM_RTOL[out.dtype] * a.shape[-1] ** 0.5 * (a.double().abs() @ b.double().abs()) + 1e-6
    err = (out.double() - ref.to(out.device)).abs()
    assert bool((err <= bound.to(out.device)).all()), f"[{what}] max err {err.max().item()}"


@pytest.fixture
def heuristic_gemm(monkeypatch):
    """The GEMM's heuristic tiles, nothing remembered: on a GPU under the default policy (``on``) the
    tuner may measure cuBLAS faster for a test shape (``NATIVE``) and the aten wrapper then refuses,
    rightly; which kernel wins is ``test_autotune``'s subject, not the wrapper's."""
    from flag_gems.kernels import _autotune as at

    monkeypatch.setenv("GEMS_AUTOTUNE", "off")
    at.clear_memory()
    yield
    at.clear_memory()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_mm_bmm(dev, dtype, heuristic_gemm):
    a, b = rand(33, 40, dtype=dtype, device=dev), rand(40, 17, dtype=dtype, device=dev)
    with Counted() as c:
        out = fg.mm(a, b)
        bt = rand(17, 40, dtype=dtype, device=dev).t()  # a strided operand
        out_t = fg.mm(a, bt)
    assert c.n == 2
    gemm_close(out, a, b, f"op=mm dtype={dtype}")
    gemm_close(out_t, a, bt, f"op=mm strided dtype={dtype}")
    x, y = rand(3, 9, 20, dtype=dtype, device=dev), rand(3, 20, 11, dtype=dtype, device=dev)
    with flag_gems.use_gems(include=["bmm"]):
        with Counted() as c:
            out = torch.bmm(x, y)
    assert c.n == 1
    gemm_close(out, x, y, f"op=bmm dtype={dtype}")


def test_mm_refusals_and_autograd(dev):
    i = torch.randint(-5, 5, (4, 6), device=dev, dtype=torch.float64)  # refused by the kernel, taken by torch on every device
    with Counted() as c:
        out = fg.mm(i, i.t())
    assert c.n == 0 and torch.equal(out, i @ i.t())
    a, b = rand(5, 8, device=dev, requires_grad=True), rand(8, 3, device=dev, requires_grad=True)
    g = rand(5, 3, device=dev)
    fg.mm(a, b).backward(g)
    close(a.grad, g.double() @ b.double().t(), "op=mm grad a")
    close(b.grad, a.double().t() @ g.double(), "op=mm grad b")


# --------------------------------------------------------------------------- cat


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_cat(dev, dim):
    sizes = [2, 3, 1]
    ts = [rand(*[s if d == dim % 3 else n for d, n in enumerate((3, 4, 5))], device=dev) for s in sizes]
    ts[1] = ts[1].transpose(0, 1).contiguous().transpose(0, 1)  # a strided input
    with Counted() as c:
        out = fg.cat(ts, dim)
    assert c.n == len(ts)
    assert torch.equal(out, torch.cat(ts, dim))


def test_cat_refusals_and_eager(dev):
    a, b = rand(2, 3, device=dev), rand(2, 3, device=dev).half()
    with Counted() as c:
        out = fg.cat([a, b], 0)  # mixed dtypes: torch promotes (Python path)
    assert c.n == 0 and torch.equal(out, torch.cat([a, b], 0))
    x = torch.randint(0, 9, (4, 2), device=dev)
    with flag_gems.use_gems(include=["cat"]):
        with Counted() as c:
            out = torch.cat([x, x, x[:0]], 0)  # an empty input adds no launch
    assert c.n == 2 and torch.equal(out, torch.cat([x, x], 0))


# --------------------------------------------------------------------------- sum


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sum(dev, dtype):
    x = rand(3, 4, 50, dtype=dtype, device=dev)
    with Counted() as c:
        s_last = fg.sum(x, [-1])
        s_two = fg.sum(x, [1, 2], True)
        s_all = fg.sum(x, dtype=torch.float32)
    assert c.n == 3
    close(s_last, x.double().sum(-1), f"op=sum dim=-1 dtype={dtype}")
    assert s_two.shape == (3, 1, 1)
    close(s_two, x.double().sum((1, 2), keepdim=True), f"op=sum dims=(1,2) dtype={dtype}", dtype)
    assert s_all.dtype == torch.float32
    close(s_all, x.double().sum(), f"op=sum all dtype={dtype}", dtype)


def test_sum_refusals_and_eager(dev):
    x = rand(3, 4, 5, device=dev)
    with Counted() as c:
        out = fg.sum(x, [0])  # not the trailing dims: torch.sum
    assert c.n == 0
    close(out, x.double().sum(0), "op=sum dim=0")
    with flag_gems.use_gems(include=["sum"]):
        with Counted() as c:
            a, b = x.sum(), x.sum(-1, keepdim=True)
            n = x.mT.sum(-1)  # not contiguous: native
    assert c.n == 2
    close(a, x.double().sum(), "op=sum.default")
    close(b, x.double().sum(-1, keepdim=True), "op=sum.dim_IntList")
    close(n, x.double().mT.sum(-1), "op=sum native")


def test_sum_autograd(dev):
    x = rand(3, 6, device=dev, requires_grad=True)
    fg.sum(x, [-1]).backward(torch.ones(3, device=dev))
    assert torch.equal(x.grad, torch.ones_like(x))


# --------------------------------------------------------------------------- nonzero


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32, torch.bool], ids=str)
@pytest.mark.parametrize("shape", [(50,), (3, 7, 11), (2, 1, 3, 1, 2)], ids=str)
def test_nonzero(dev, dtype, shape):
    x = rand(*shape, device=dev)
    x = torch.where(x > 0.3, x, torch.zeros_like(x)).to(dtype)
    with Counted() as c:
        out = fg.nonzero(x)
    assert c.n == 2
    assert torch.equal(out, torch.nonzero(x))


def test_nonzero_edges_and_eager(dev):
    z = torch.zeros(4, 5, device=dev)
    with Counted() as c:
        assert fg.nonzero(z).shape == (0, 2)  # one count launch, no write
        assert torch.equal(fg.nonzero(torch.tensor(3.0, device=dev)), torch.nonzero(torch.tensor(3.0)).to(dev))
        assert fg.nonzero(torch.empty(0, 3, device=dev)).shape == (0, 2)
    assert c.n == 2
    x = rand(6, 9, device=dev)
    with flag_gems.use_gems(include=["nonzero"]):
        with Counted() as c:
            out = torch.nonzero(x > 0)
    assert c.n == 2 and torch.equal(out, torch.nonzero(x > 0))
    cx = torch.randn(4, dtype=torch.complex64, device=dev)
    assert torch.equal(fg.nonzero(cx), torch.nonzero(cx))


# --------------------------------------------------------------------------- the new ops' registrations


@pytest.mark.parametrize("case", ["mm", "bmm", "cat", "sum", "sum_dtype", "nonzero"])
def test_new_ops_pass_opcheck(case):
    """flag_gems::mm / bmm / cat / sum / nonzero: schema, fake and autograd registrations
    (Python path: opcheck runs on CPU tensors, where the C++ wrappers are not registered)."""
    from accuracy import OPCHECK_UTILS

    utils = OPCHECK_UTILS
    if case == "mm":
        op, args, kwargs = fg.mm.default, (rand(5, 8, requires_grad=True), rand(8, 3, requires_grad=True)), {}
    elif case == "bmm":
        op, args, kwargs = fg.bmm.default, (rand(2, 5, 8, requires_grad=True), rand(2, 8, 3)), {}
    elif case == "cat":
        op, args, kwargs = fg.cat.default, ([rand(2, 3, requires_grad=True), rand(4, 3)], 0), {}
    elif case == "sum":
        op, args, kwargs = fg.sum.default, (rand(3, 4, 5, requires_grad=True), [-1], True), {}
    elif case == "sum_dtype":
        op, args, kwargs = fg.sum.default, (rand(3, 4, dtype=torch.bfloat16),), {"dtype": torch.float32}
    else:  # data-dependent output size: no AOT dispatch checks
        op, args, kwargs = fg.nonzero.default, (rand(4, 6) > 0,), {}
        utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(op, args, kwargs, test_utils=utils)


# --------------------------------------------------------------------------- a whole model


def test_tiny_llama_under_use_gems_runs_its_layers_through_the_wrappers(dev):
    """A tiny HF Llama forward under ``use_gems()`` (every entry) with the C++ wrappers on: the
    logits match eager's, and the norms, rope and MLP ops are served in C++ (the launcher's counter
    grows by at least one launch per wrapped op a layer makes)."""
    transformers = pytest.importorskip("transformers")
    from accuracy import LOGITS_COSINE

    cfg = transformers.AutoConfig.for_model(
        "llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(device=dev, dtype=torch.bfloat16).eval()
    ids = torch.randint(3, 128, (2, 5), device=dev)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits.float()
        with flag_gems.use_gems(), Counted() as c:
            out = model(ids, use_cache=False).logits.float()
    cos = F.cosine_similarity(out.flatten().double(), ref.flatten().double(), dim=0).item()
    assert cos >= LOGITS_COSINE[torch.bfloat16], cos
    # per layer at least: 2 x (_to_copy x2, pow, mean, rsqrt, mul x2) for the norms, rope's muls,
    # negs and adds, silu and mul for the MLP, the projections' mm
    assert c.n >= 2 * 20, c.n


# --------------------------------------------------------------------------- random layouts


def _random_view(rng, shape, dtype, dev):
    """A view of ``shape`` into a larger tensor: strided slices, an offset, sometimes permuted storage."""
    big = [s * rng.choice([1, 1, 2]) + rng.choice([0, 1]) for s in shape]
    base = rand(*big, dtype=dtype, device=dev) if big else rand(dtype=dtype, device=dev)
    idx = []
    for s, b in zip(shape, big):
        step = b // s if s and b >= 2 * s else 1
        start = rng.randint(0, b - ((s - 1) * step + 1)) if s else 0
        idx.append(slice(start, start + (s - 1) * step + 1 if s else start, step))
    t = base[tuple(idx)]
    if t.dim() > 1 and rng.random() < 0.5:
        p = list(range(t.dim()))
        rng.shuffle(p)
        t = t.permute(p).contiguous().permute([p.index(i) for i in range(t.dim())])
    assert tuple(t.shape) == tuple(shape)
    return t


def test_random_layouts_match_torch(dev):
    """Random ranks (0-4), sizes (0 and 1 included), strides, offsets and dtypes through the
    pointwise, cast, pow and mean wrappers: torch's values (tolerance table), shape, dtype and
    strides, whichever path each call took; the wrappers ran for most of them."""
    import random

    rng = random.Random(0)
    unary = {"neg": torch.neg, "exp": torch.exp, "silu": F.silu, "gelu": F.gelu, "tanh": torch.tanh,
             "sigmoid": torch.sigmoid}
    with Counted() as c:
        for trial in range(80):
            nd = rng.randint(0, 4)
            shape = [rng.choice([0, 1, 1, 2, 3, 5, 7]) for _ in range(nd)]
            dtype = rng.choice(DTYPES)
            x = _random_view(rng, shape, dtype, dev)
            name = rng.choice(list(unary) + ["mul", "add", "sub", "to_copy", "pow", "mean"])
            if name in ("mul", "add", "sub"):
                y = _random_view(rng, shape[rng.randint(0, nd):], dtype, dev)
                call = lambda f=getattr(torch, name), y=y: f(x, y)  # noqa: E731
            elif name == "to_copy":
                call = lambda to=rng.choice(DTYPES): x.to(to)  # noqa: E731
            elif name == "pow":
                call = lambda e=rng.choice([2, 3, 0.5, -1, 2.5]): (x.abs() + 0.5).pow(e)  # noqa: E731
            elif name == "mean":
                if nd == 0:
                    continue
                call = lambda kd=rng.random() < 0.5: x.mean(-1, keepdim=kd)  # noqa: E731
            else:
                call = lambda f=unary[name]: f(x)  # noqa: E731
            ref = call()
            with flag_gems.use_gems():
                out = call()
            what = f"trial {trial}: {name} shape={shape} strides={x.stride()} dtype={dtype}"
            assert out.shape == ref.shape and out.dtype == ref.dtype, what
            if out.numel() > 1:
                assert out.stride() == ref.stride(), f"{what}: strides {out.stride()} vs torch {ref.stride()}"
            atol, rtol = TOLERANCES[ref.dtype]
            torch.testing.assert_close(out, ref, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"[{what}] {m}")
    assert c.n >= 40, c.n
