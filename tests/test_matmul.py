"""Triton GEMM entries (mm, bmm, addmm): accuracy against float64, strides, edges, bad input, eager mode."""

import math

import pytest
import torch

import flag_gems
from accuracy import DEVICE, DTYPE_IDS, DTYPES, GEMM_RTOL, rand, reason, ref64, run, tag
from flag_gems.kernels import matmul as km
from flag_gems.lowerings.registry import REGISTRY

aten = torch.ops.aten


def close_gemm(out, ref, a, b, dtype, what, extra=None):
    """|out - ref| <= rtol(dtype, K) * (|a| @ |b| (+ |extra|)): the GEMM error bound, elementwise.

    A product's rounding error scales with the magnitudes summed, not with the (possibly
    cancelling) result; ``extra`` is the scaled bias term of addmm.
    """
    assert out.dtype == dtype, f"{what} dtype {out.dtype} != {dtype}"
    k = a.shape[-1]
    scale = ref64(a).abs() @ ref64(b).abs()
    if extra is not None:
        scale = scale + extra.abs()
    bound = GEMM_RTOL[dtype] * max(1.0, math.sqrt(k)) * scale + 1e-30
    err = (ref64(out) - ref).abs()
    assert not torch.isnan(ref64(out)).any(), f"{what} NaN in the output"
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"{what} error {worst:.2f}x the bound"


SHAPES = [(1, 1, 1), (1, 70, 45), (7, 17, 5), (33, 40, 65), (64, 3, 16)]  # (M, K, N): edges and non-multiples


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mkn", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_mm(mkn, dtype, device):
    m, k, n = mkn
    a, b = rand(m, k, dtype=dtype, device=device), rand(k, n, dtype=dtype, device=device)
    out = run(aten.mm.default, a, b)
    close_gemm(out, ref64(a) @ ref64(b), a, b, dtype, tag("mm", (m, k, n), dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["a_t", "b_t", "both_t", "sliced"])
def test_mm_strides(layout, dtype, device):
    m, k, n = 9, 20, 11
    a = rand(k, m, dtype=dtype, device=device).t() if layout in ("a_t", "both_t") else rand(m, k, dtype=dtype, device=device)
    b = rand(n, k, dtype=dtype, device=device).t() if layout in ("b_t", "both_t") else rand(k, n, dtype=dtype, device=device)
    if layout == "sliced":
        a = rand(m, 2 * k, dtype=dtype, device=device)[:, ::2]
        b = rand(k, 3 * n, dtype=dtype, device=device)[:, 1::3]
    out = run(aten.mm.default, a, b)
    close_gemm(out, ref64(a) @ ref64(b), a, b, dtype, tag(f"mm[{layout}]", (m, k, n), dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bmm(dtype, device):
    a = rand(3, 10, 19, dtype=dtype, device=device)
    b = rand(3, 5, 19, dtype=dtype, device=device).transpose(1, 2)  # HF's q @ k^T layout
    out = run(aten.bmm.default, a, b)
    close_gemm(out, ref64(a) @ ref64(b), a, b, dtype, tag("bmm", a.shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bias_shape", [(13,), (6, 13), (1, 13), (6, 1), ()], ids=str)
@pytest.mark.parametrize("beta, alpha", [(1, 1), (0.5, -2.0), (0, 1.5)], ids=["plain", "scaled", "beta0"])
def test_addmm(bias_shape, beta, alpha, dtype, device):
    a, b = rand(6, 21, dtype=dtype, device=device), rand(21, 13, dtype=dtype, device=device)
    bias = rand(*bias_shape, dtype=dtype, device=device)
    if beta == 0:
        bias = bias.fill_(float("nan"))  # torch ignores self when beta == 0: NaN must not propagate
    out = run(aten.addmm.default, bias, a, b, beta=beta, alpha=alpha)
    prod = alpha * (ref64(a) @ ref64(b))
    term = 0 if beta == 0 else beta * ref64(bias)
    close_gemm(out, prod + term, a, b, dtype, tag(f"addmm[beta={beta}]", bias_shape, dtype),
               extra=None if beta == 0 else torch.broadcast_to(term, prod.shape))


def test_empty_and_zero_k(device):
    a, b = rand(4, 0, device=device), rand(0, 3, device=device)
    assert torch.equal(run(aten.mm.default, a, b), torch.zeros(4, 3, device=device))
    bias = rand(3, device=device)
    out = run(aten.addmm.default, bias, a, b, beta=2, alpha=1)
    torch.testing.assert_close(out, (2 * bias).expand(4, 3))
    assert run(aten.mm.default, rand(0, 5, device=device), rand(5, 3, device=device)).shape == (0, 3)
    assert run(aten.bmm.default, rand(0, 2, 5, device=device), rand(0, 5, 3, device=device)).shape == (0, 2, 3)


def test_fp32_follows_matmul_precision(device):
    # "highest" (torch's default) is IEEE fp32: far under TF32's ~1e-3 relative error.
    a, b = rand(16, 256, device=device), rand(256, 16, device=device)
    assert torch.get_float32_matmul_precision() == "highest"
    out = run(aten.mm.default, a, b)
    rel = ((ref64(out) - ref64(a) @ ref64(b)).norm() / (ref64(a) @ ref64(b)).norm()).item()
    assert rel < 1e-5, tag("mm fp32 ieee", a.shape, torch.float32) + f" rel {rel:.1e}"


def test_reasons(device):
    x = rand(3, 4, device=device)
    assert "mixed dtypes" in reason(aten.mm.default, x, rand(4, 2, device=device, dtype=torch.float16))
    assert "do not multiply" in reason(aten.mm.default, x, rand(5, 2, device=device))
    assert "2-D" in reason(aten.mm.default, x, rand(1, 4, 2, device=device))
    assert "dtype" in reason(aten.mm.default, x.double(), rand(4, 2, device=device).double())
    assert "batch sizes" in reason(aten.bmm.default, rand(2, 3, 4, device=device), rand(3, 4, 2, device=device))
    assert "does not broadcast" in reason(aten.addmm.default, rand(5, device=device), x, rand(4, 2, device=device))
    assert "mat1 dtype" in reason(aten.addmm.default, rand(2, device=device), x.double(), rand(4, 2, device=device))
    assert "self" in reason(aten.addmm.default, rand(2, device=device, dtype=torch.float16), x, rand(4, 2, device=device))
    assert "beta of type" in reason(aten.addmm.default, rand(2, device=device), x, rand(4, 2, device=device), beta=1j)
    assert "device" in reason(aten.mm.default, torch.empty(3, 4, device="meta"), torch.empty(4, 2, device="meta"))
    with pytest.raises(NotImplementedError, match="do not multiply"):
        REGISTRY[aten.mm.default].impl(x, rand(5, 2, device=device))


def test_launcher_errors(device):
    x = rand(3, 4, device=device)
    with pytest.raises(TypeError, match="b: expected dtype"):
        km.matmul(x, rand(4, 2, device=device, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="b: expected 4 rows"):
        km.matmul(x, rand(5, 2, device=device))
    with pytest.raises(ValueError, match="bias: shape"):
        km.matmul(x, rand(4, 2, device=device), rand(3, 3, device=device))


def test_supports_on_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), torch.device(DEVICE):
        a, b, bias = torch.empty(8, 16), torch.empty(16, 4), torch.empty(4)
        assert REGISTRY[aten.mm.default].supports(a, b) is None
        assert REGISTRY[aten.addmm.default].supports(bias, a, b, beta=1, alpha=1) is None
        assert REGISTRY[aten.bmm.default].supports(torch.empty(2, 8, 16), torch.empty(2, 16, 4)) is None


def test_eager_mode_linear_layers(device, tmp_path):
    # nn.Linear with bias is addmm, without bias mm (2-D input) ; attention-style bmm.
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 10).to(device)
    lin_nb = torch.nn.Linear(10, 6, bias=False).to(device)
    x = rand(5, 24, device=device)
    q, k = rand(2, 7, 8, device=device), rand(2, 9, 8, device=device)
    log = tmp_path / "ops.log"
    with torch.no_grad():
        want = lin_nb(lin(x)), torch.bmm(q, k.transpose(1, 2))
        with flag_gems.use_gems(include=["mm", "bmm", "addmm"], record=True, once=True, path=log):
            got = lin_nb(lin(x)), torch.bmm(q, k.transpose(1, 2))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    logged = {line.split("GEMS ")[1] for line in log.read_text().splitlines()}
    assert {"ADDMM", "MM", "BMM"} <= logged, logged


def test_registry_policies():
    # On in the eager mode (every entry is); measured below cuBLAS, so neither fast nor lowered in graphs.
    for target in (aten.mm.default, aten.bmm.default, aten.addmm.default):
        entry = REGISTRY[target]
        assert entry.eager.on and not entry.fast.on and not entry.graph.on
        assert entry.data and min(m.ratio for m in entry.data) < 1.0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_llm_shapes_gpu(dtype):
    for m in (1, 8, 300, 2048):
        a, b = rand(m, 4096, dtype=dtype, device="cuda"), rand(4096, 1000, dtype=dtype, device="cuda")
        out = run(aten.mm.default, a, b)
        close_gemm(out, ref64(a) @ ref64(b), a, b, dtype, tag("mm llm", (m, 4096, 1000), dtype))
