"""RMSNorm and residual-add + RMSNorm: kernels, ops, public functions."""

import threading

import pytest
import torch
from torch.library import opcheck

import flag_gems
from flag_gems.kernels.rms_norm import rms_norm_fwd
from accuracy import DTYPES, DTYPE_IDS, OPCHECK_UTILS, assert_close, poison, rand, ref64, tag

EPS = 1e-6
# Rows x hidden: 1, primes, non-powers of two, a one-pass row and a looped row (> 16384).
SHAPES = [(1, 1), (3, 7), (2, 5, 128), (4, 2880), (2, 4096), (2, 5120), (1, 7168), (2, 20000)]


def ref_rms_norm(x, w, eps, offset=0.0, round_before=False, out_dtype=None):
    """float64 reference of ``x * rsqrt(mean(x^2) + eps) * (offset + w)`` (differentiable)."""
    x = x.to(device="cpu", dtype=torch.float64)
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if round_before and w is not None:
        y = y.to(out_dtype).double()
    if w is not None:
        y = y * (w.to(device="cpu", dtype=torch.float64) + offset)
    return y


def ref_add_rms_norm(x, r, w, eps, offset=0.0, round_before=False):
    """h rounded to x's dtype, then normalized (the kernels' contract)."""
    h = (ref64(x) + ref64(r)).to(x.dtype)
    return ref_rms_norm(h, w, eps, offset, round_before, x.dtype), h


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm_forward(shape, dtype, device):
    x = rand(*shape, dtype=dtype, device=device)
    w = rand(shape[-1], dtype=dtype, device=device)
    y = flag_gems.rms_norm(x, shape[-1], w, EPS)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, ref_rms_norm(x, w, EPS), dtype, tag("rms_norm", shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_add_rms_norm_forward_writes_every_element(shape, dtype, device):
    x = rand(*shape, dtype=dtype, device=device)
    r = rand(*shape, dtype=dtype, device=device)
    w = rand(shape[-1], dtype=dtype, device=device)
    y, h = poison(torch.empty_like(x)), poison(torch.empty_like(x))
    rms_norm_fwd(x, w, EPS, residual=r, out=y, residual_out=h)
    ry, rh = ref_add_rms_norm(x, r, w, EPS)
    assert_close(h, rh, dtype, tag("add_rms_norm.h", shape, dtype))
    assert_close(y, ry, dtype, tag("add_rms_norm.y", shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "variant",
    [dict(weight=False), dict(offset=1.0), dict(round_before=True), dict(fp32_weight=True)],
    ids=["no_weight", "gemma_offset", "round_before_weight", "fp32_weight"],
)
def test_rms_norm_variants(variant, dtype, device):
    shape = (3, 96)
    x = rand(*shape, dtype=dtype, device=device)
    wdtype = torch.float32 if variant.get("fp32_weight") else dtype
    w = None if variant.get("weight") is False else rand(shape[-1], dtype=wdtype, device=device)
    off = variant.get("offset", 0.0)
    rb = variant.get("round_before", False)
    y = flag_gems.rms_norm(x, shape[-1], w, EPS, weight_offset=off, round_before_weight=rb)
    assert y.dtype == dtype
    assert_close(y, ref_rms_norm(x, w, EPS, off, rb, dtype), dtype, tag(f"rms_norm[{variant}]", shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_multi_dim_normalized_shape(dtype, device):
    x = rand(2, 3, 4, 6, dtype=dtype, device=device)
    w = rand(4, 6, dtype=dtype, device=device)
    y = flag_gems.rms_norm(x, (4, 6), w, EPS)
    ref = ref_rms_norm(x.flatten(-2), w.flatten(), EPS).view(x.shape)
    assert_close(y, ref, dtype, tag("rms_norm[ns=(4,6)]", x.shape, dtype))
    r = rand(2, 3, 4, 6, dtype=dtype, device=device)
    rx, rr = x.clone(), r.clone()
    flag_gems.fused_add_rms_norm(rx, rr, (4, 6), w, EPS)
    ry, rh = ref_add_rms_norm(x.flatten(-2), r.flatten(-2), w.flatten(), EPS)
    assert_close(rr, rh.view(x.shape), dtype, tag("fused_add_rms_norm[ns=(4,6)].residual", x.shape, dtype))
    assert_close(rx, ry.view(x.shape), dtype, tag("fused_add_rms_norm[ns=(4,6)].x", x.shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "transposed_tokens", "sliced_rows", "last_dim_strided"])
def test_fused_add_rms_norm_in_place(layout, dtype, device):
    """In place on any layout: upstream leaves a non-contiguous x unchanged; we must not."""
    n = 40

    def make():
        if layout == "contiguous":
            return rand(3, 5, n, dtype=dtype, device=device)
        if layout == "transposed_tokens":
            return rand(5, 3, n, dtype=dtype, device=device).transpose(0, 1)
        if layout == "sliced_rows":
            return rand(3, 10, n, dtype=dtype, device=device)[:, ::2]
        return rand(3, 5, 2 * n, dtype=dtype, device=device)[..., ::2]

    x, r = make(), make()
    w = rand(n, dtype=dtype, device=device)
    ry, rh = ref_add_rms_norm(x, r, w, EPS)
    out_x, out_r = flag_gems.fused_add_rms_norm(x, r, n, w, EPS)
    assert out_x is x and out_r is r
    assert_close(r, rh, dtype, tag(f"fused_add_rms_norm[{layout}].residual", x.shape, dtype))
    assert_close(x, ry, dtype, tag(f"fused_add_rms_norm[{layout}].x", x.shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_torch_ops_fused_add_rms_norm_matches_vllm_convention(dtype, device):
    x = rand(6, 33, dtype=dtype, device=device)
    r = rand(6, 33, dtype=dtype, device=device)
    w = rand(33, dtype=dtype, device=device)
    ry, rh = ref_add_rms_norm(x, r, w, EPS)
    torch.ops.flag_gems.fused_add_rms_norm(x, r, w, EPS)
    assert_close(r, rh, dtype, tag("fused_add_rms_norm.op.residual", x.shape, dtype))
    assert_close(x, ry, dtype, tag("fused_add_rms_norm.op.x", x.shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 3, 130), (2, 20000)], ids=str)
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["w", "1+w"])
def test_rms_norm_backward(shape, offset, dtype, device):
    x = rand(*shape, dtype=dtype, device=device, requires_grad=True)
    w = rand(shape[-1], dtype=dtype, device=device, requires_grad=True)
    dy = rand(*shape, dtype=dtype, device=device)
    y = flag_gems.rms_norm(x, shape[-1], w, EPS, weight_offset=offset)
    y.backward(dy)
    x64 = ref64(x).requires_grad_()
    w64 = ref64(w).requires_grad_()
    ref_rms_norm(x64, w64, EPS, offset).backward(ref64(dy))
    assert_close(x.grad, x64.grad, dtype, tag("rms_norm.dx", shape, dtype), grad=True)
    assert_close(w.grad, w64.grad, dtype, tag("rms_norm.dw", shape, dtype), grad=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 5), (4, 3, 64), (3, 20000)], ids=str)
def test_add_rms_norm_backward(shape, dtype, device):
    x = rand(*shape, dtype=dtype, device=device, requires_grad=True)
    r = rand(*shape, dtype=dtype, device=device, requires_grad=True)
    w = rand(shape[-1], dtype=dtype, device=device, requires_grad=True)
    dy = rand(*shape, dtype=dtype, device=device)
    dh = rand(*shape, dtype=dtype, device=device)
    y, h = flag_gems.add_rms_norm(x, r, w, EPS)
    torch.autograd.backward((y, h), (dy, dh))
    x64, r64, w64 = (ref64(t).requires_grad_() for t in (x, r, w))
    h64 = x64 + r64
    y64 = ref_rms_norm(h64, w64, EPS)
    torch.autograd.backward((y64, h64), (ref64(dy), ref64(dh)))
    assert_close(x.grad, x64.grad, dtype, tag("add_rms_norm.dx", shape, dtype), grad=True)
    assert_close(r.grad, r64.grad, dtype, tag("add_rms_norm.dresidual", shape, dtype), grad=True)
    assert_close(w.grad, w64.grad, dtype, tag("add_rms_norm.dw", shape, dtype), grad=True)


def test_fused_add_rms_norm_in_place_with_autograd(device):
    """The in-place public function records its update for autograd like torch ops do."""
    x0 = rand(4, 24, device=device, requires_grad=True)
    r0 = rand(4, 24, device=device, requires_grad=True)
    w = rand(24, device=device, requires_grad=True)
    x, r = x0 * 1.0, r0 * 1.0  # non-leaves, so in-place is legal
    flag_gems.fused_add_rms_norm(x, r, 24, w, EPS)
    (x.sum() + 2 * r.sum()).backward()
    x64, r64, w64 = (ref64(t).requires_grad_() for t in (x0, r0, w))
    h64 = x64 + r64
    (ref_rms_norm(h64, w64, EPS).sum() + 2 * h64.sum()).backward()
    for got, ref, name in [(x0.grad, x64.grad, "dx"), (r0.grad, r64.grad, "dr"), (w.grad, w64.grad, "dw")]:
        assert_close(got, ref, torch.float32, tag(f"fused_add_rms_norm.{name}", x.shape, torch.float32), grad=True)


def test_opcheck_all_ops(device):
    def t(*s, rg=False):
        return rand(*s, device=device, requires_grad=rg)

    for args in [(t(3, 8), t(8), EPS), (t(2, 3, 8, rg=True), t(8, rg=True), EPS), (t(4, 8, rg=True), None, EPS, 1.0, False)]:
        opcheck(torch.ops.flag_gems.rms_norm.default, args, test_utils=OPCHECK_UTILS)
    for args in [(t(3, 8), t(3, 8), t(8), EPS), (t(2, 5, 8, rg=True), t(2, 5, 8, rg=True), t(8, rg=True), EPS, 1.0, True)]:
        opcheck(torch.ops.flag_gems.add_rms_norm.default, args, test_utils=OPCHECK_UTILS)
    opcheck(
        torch.ops.flag_gems.fused_add_rms_norm.default,
        (t(3, 8), t(3, 8), t(8), EPS),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static", "test_aot_dispatch_dynamic"),
    )
    opcheck(
        torch.ops.flag_gems.rms_norm_backward.default,
        (t(3, 8), t(3, 8), t(8), EPS, 0.0, False, t(3, 8), True),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static", "test_aot_dispatch_dynamic"),
    )


def test_compiles_without_graph_breaks(device):
    def block(x, r, w):
        y, h = torch.ops.flag_gems.add_rms_norm(x, r, w, EPS)
        return torch.ops.flag_gems.rms_norm(y, w, EPS) + h

    x, r, w = rand(4, 16, device=device), rand(4, 16, device=device), rand(16, device=device)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, r, w), block(x, r, w))


def test_threads(device):
    xs = [rand(3, 64, device=device) for _ in range(4)]
    w = rand(64, device=device)
    outs = [None] * len(xs)

    def run(i):
        outs[i] = flag_gems.rms_norm(xs[i], 64, w, EPS)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(xs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for x, y in zip(xs, outs):
        assert_close(y, ref_rms_norm(x, w, EPS), torch.float32, tag("rms_norm[thread]", x.shape, torch.float32))


# ------------------------------------------------------------------ bad input


def test_empty_rows(device):
    x = rand(0, 64, device=device)
    w = rand(64, device=device)
    assert flag_gems.rms_norm(x, 64, w).shape == (0, 64)
    y, h = flag_gems.add_rms_norm(x, x.clone(), w)
    assert y.shape == h.shape == (0, 64)
    xg = rand(0, 64, device=device, requires_grad=True)
    wg = rand(64, device=device, requires_grad=True)
    flag_gems.rms_norm(xg, 64, wg).sum().backward()
    assert xg.grad.shape == (0, 64) and torch.equal(wg.grad, torch.zeros_like(wg))


@pytest.mark.parametrize(
    "make, exc, words",
    [
        (lambda d: (torch.randint(0, 5, (3, 8), device=d), torch.ones(8, device=d)), TypeError, "x: dtype int64"),
        (lambda d: (torch.randn(3, 8, dtype=torch.float64, device=d), None), TypeError, "x: dtype float64"),
        (lambda d: (torch.randn(3, 8, device=d), torch.randn(7, device=d)), ValueError, "weight: expected shape [8]"),
        (lambda d: (torch.randn(3, 8, device=d), torch.randn(8, dtype=torch.float64, device=d)), TypeError, "weight"),
    ],
    ids=["int_x", "fp64_x", "weight_shape", "fp64_weight"],
)
def test_bad_input_rms_norm(make, exc, words, device):
    x, w = make(device)
    with pytest.raises(exc, match=words.replace("[", r"\[").replace("]", r"\]")):
        torch.ops.flag_gems.rms_norm(x, w, EPS)


def test_bad_input_add_rms_norm(device):
    x = rand(3, 8, device=device)
    with pytest.raises(ValueError, match="residual: expected shape"):
        flag_gems.add_rms_norm(x, rand(3, 9, device=device), None)
    with pytest.raises(TypeError, match="residual: expected dtype"):
        flag_gems.add_rms_norm(x, rand(3, 8, dtype=torch.float16, device=device), None)
    with pytest.raises(ValueError, match="normalized_shape"):
        flag_gems.rms_norm(x, 9)
    with pytest.raises(ValueError, match="residual"):
        flag_gems.fused_add_rms_norm(x, rand(3, 9, device=device), 8, None)


def test_cpu_tensor_outside_interpreter_is_a_clear_error(monkeypatch):
    import flag_gems.kernels._common as common

    monkeypatch.setattr(common, "interpreter_mode", lambda: False)
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET=1"):
        torch.ops.flag_gems.rms_norm(torch.randn(2, 8), None, EPS)


# ------------------------------------------------------------------ GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n", [4096, 5120, 2880, 7168, 128, 1])
def test_gpu_llm_shapes(n, dtype):
    x = rand(4096, n, dtype=dtype, device="cuda")
    r = rand(4096, n, dtype=dtype, device="cuda")
    w = rand(n, dtype=dtype, device="cuda")
    y, h = flag_gems.add_rms_norm(x, r, w, EPS)
    ry, rh = ref_add_rms_norm(x, r, w, EPS)
    assert_close(h, rh, dtype, tag("add_rms_norm.h", x.shape, dtype))
    assert_close(y, ry, dtype, tag("add_rms_norm.y", x.shape, dtype))


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_int64_offsets():
    """More than 2^31 elements: offsets must be computed in int64."""
    n = 4096
    rows = (2**31) // n + 7
    x = torch.randn(rows, n, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    y = flag_gems.rms_norm(x, n, w, EPS)
    tail = slice(rows - 5, rows)
    assert_close(y[tail], ref_rms_norm(x[tail], w, EPS), torch.bfloat16, tag("rms_norm[int64]", x.shape, torch.bfloat16))


@pytest.mark.gpu
def test_gpu_second_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    x = rand(8, 256, device="cuda:1")
    w = rand(256, device="cuda:1")
    y = flag_gems.rms_norm(x, 256, w, EPS)
    assert y.device == x.device
    assert_close(y, ref_rms_norm(x, w, EPS), torch.float32, tag("rms_norm[cuda:1]", x.shape, torch.float32))
