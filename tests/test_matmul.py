"""Triton GEMM entries (mm, bmm, addmm): accuracy against float64, strides, edges, bad input, eager mode."""

import math
import warnings

import pytest
import torch

import flag_gems
from accuracy import DEVICE, DTYPE_IDS, DTYPES, GEMM_RTOL, poison, rand, reason, ref64, run, tag
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


# --------------------------------------------------------------------------- tuned classes (kernels/matmul.py)

from flag_gems.kernels import _autotune as at  # noqa: E402

CLASS_CONFIGS = [  # (KIND, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages, WARP_SPEC): every class and option
    ("plain", 16, 32, 16, 8, 4, 1, 0),
    ("plain", 32, 16, 32, 2, 4, 2, 0),
    ("tma", 16, 16, 16, 8, 4, 2, 0),
    ("tma", 32, 16, 16, 1, 4, 2, 1),
    ("persistent", 16, 16, 16, 2, 4, 2, 0),
    ("persistent", 16, 32, 16, 8, 4, 2, 1),
    # 128 rows, 4 warps, 2+ stages: Hopper's warp specialization splits the tile between two consumer
    # warp groups (hence the in-kernel descriptors of kernels/matmul.py _matmul_ws_kernel).
    ("tma", 128, 64, 32, 8, 4, 3, 1),
]


def _unsupported(exc) -> bool:
    """A config this GPU / Triton cannot compile or launch (the tuner drops such candidates with a
    warning): an MLIR pass that fails, a compile error, more shared memory than there is."""
    text = f"{type(exc).__name__} {exc}".lower()
    return any(w in text for w in ("compil", "out of resource", "passmanager", "warp_spec"))


def _cfg(c):
    return dict(zip(km.TUNABLE.fields, c + (0,)))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["b_rowmajor", "b_kmajor"])
@pytest.mark.parametrize("cfg", CLASS_CONFIGS, ids=lambda c: f"{c[0]}_{c[1]}x{c[2]}x{c[3]}_g{c[4]}_ws{c[7]}")
def test_every_class(cfg, layout, dtype, device):
    """Each kernel class at edge sizes (not multiples of any tile), with and without bias / scaling, vs float64."""
    if cfg[0] != "plain" and not km.HAS_TMA:
        pytest.skip("this Triton has no tensor descriptors")
    if device == "cuda" and cfg[0] != "plain" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need compute capability >= 9")
    if cfg[7] and not km.HAS_WARP_SPEC:
        pytest.skip("this Triton has no warp specialization (tl.range(warp_specialize=...))")
    m, k, n = 37, 56, 40  # 16-byte aligned rows for 16-bit types (k, n multiples of 8)
    a = rand(m, k, dtype=dtype, device=device)
    b = rand(n, k, dtype=dtype, device=device).t() if layout == "b_kmajor" else rand(k, n, dtype=dtype, device=device)
    bias = rand(n, dtype=dtype, device=device)
    for use_bias, beta, alpha in ((False, 1, 1), (True, 0.5, -2.0)):
        out = poison(torch.empty(m, n, dtype=dtype, device=device))
        with km.TUNABLE.forcing(_cfg(cfg)):
            km.matmul(a, b, bias if use_bias else None, beta=beta, alpha=alpha, out=out)
        prod = alpha * (ref64(a) @ ref64(b))
        term = beta * ref64(bias) if use_bias else None
        close_gemm(out, prod + (0 if term is None else term), a, b, dtype,
                   tag(f"mm[{cfg[0]} {layout} bias={use_bias}]", (m, k, n), dtype),
                   extra=None if term is None else torch.broadcast_to(term, prod.shape))
    ran_tma = cfg[0] != "plain" and dtype != torch.float32
    assert km.tma_eligible(a, b, out) == ran_tma or cfg[0] == "plain"


def test_scratch_allocator_is_scoped():
    """The warp-specialized launch lends Triton a scratch allocator for its own launch only, and keeps
    one the process set (``triton.set_allocator``)."""
    if km._allocation is None:
        pytest.skip("this Triton has no scratch allocator")
    var = km._allocation._allocator
    before = var.get()
    with km._scratch_allocator():
        inside = var.get()
    assert var.get() is before
    assert inside is (km._scratch if isinstance(before, km._allocation.NullAllocator) else before)

    def mine(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8)

    token = var.set(mine)
    try:
        with km._scratch_allocator():
            assert var.get() is mine
    finally:
        var.reset(token)


def test_descriptor_config_on_unaligned_operands_runs_the_plain_kernel(device):
    """A tensor-descriptor config for operands it cannot take (sliced rows, odd sizes, a batch) runs plain tiles."""
    dtype = torch.bfloat16
    a = rand(9, 2 * 21, dtype=dtype, device=device)[:, ::2]  # not unit stride
    b = rand(21, 13, dtype=dtype, device=device)  # 13 * 2 bytes: unaligned rows
    assert not km.tma_eligible(a, b, None)
    for c in CLASS_CONFIGS[2:]:
        with km.TUNABLE.forcing(_cfg(c)):
            out = km.matmul(a, b)
        close_gemm(out, ref64(a) @ ref64(b), a, b, dtype, tag(f"mm[{c[0]} unaligned]", (9, 21, 13), dtype))
    a3, b3 = rand(2, 8, 16, dtype=dtype, device=device), rand(2, 16, 24, dtype=dtype, device=device)
    assert not km.tma_eligible(a3, b3, None)
    with km.TUNABLE.forcing(_cfg(CLASS_CONFIGS[2])):
        out = km.matmul(a3, b3)
    close_gemm(out, ref64(a3) @ ref64(b3), a3, b3, dtype, tag("bmm[tma config]", a3.shape, dtype))


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A private cache folder and the ``cache`` policy (the caches, else the heuristic; never tuning at run
    time), whatever ``GEMS_AUTOTUNE`` the suite runs under."""
    monkeypatch.setenv("GEMS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("GEMS_AUTOTUNE", "cache")
    at.clear_memory()
    yield
    at.clear_memory()


def _decide(a, b, bias, native: bool):
    """Put a decision for this call's key in the table, as tuning (or a cache) would."""
    key = km.tune_key(a, b, bias)
    cfg = dict(km.TUNABLE.default(key, a.get_device()), NATIVE=int(native))
    km.TUNABLE._table[(a.get_device(), key)] = km.TUNABLE.as_tuple(cfg)


def test_native_faster_shapes_go_to_the_native_kernel(device, private_cache):
    a, b = rand(6, 16, device=device), rand(16, 8, device=device)
    _decide(a, b, None, native=True)
    with pytest.raises(NotImplementedError, match="cuBLAS measured faster"):
        REGISTRY[aten.mm.default].impl(a, b)  # the eager mode then runs the native kernel
    got = flag_gems.mm(a, b)  # public function: torch.mm for this shape
    torch.testing.assert_close(got, a @ b)
    forced = flag_gems.mm(a, b, allow_native=False)  # the Triton kernel anyway
    close_gemm(forced, ref64(a) @ ref64(b), a, b, torch.float32, tag("mm forced triton", (6, 16, 8), torch.float32))
    _decide(a, b, None, native=False)
    out = REGISTRY[aten.mm.default].impl(a, b)
    close_gemm(out, ref64(a) @ ref64(b), a, b, torch.float32, tag("mm triton", (6, 16, 8), torch.float32))


def test_eager_mode_falls_back_where_native_won(device, private_cache, tmp_path):
    a, b = rand(5, 24, device=device), rand(24, 10, device=device)
    _decide(a, b, None, native=True)
    log = tmp_path / "ops.log"
    with flag_gems.use_gems(include=["mm"], record=True, path=log):
        got = torch.mm(a, b)
    torch.testing.assert_close(got, a @ b)
    assert "GEMS MM" not in (log.read_text() if log.exists() else "")  # the native kernel ran


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_public_functions(dtype, device, private_cache):
    a, b = rand(7, 20, dtype=dtype, device=device), rand(20, 12, dtype=dtype, device=device)
    close_gemm(flag_gems.mm(a, b), ref64(a) @ ref64(b), a, b, dtype, tag("flag_gems.mm", (7, 20, 12), dtype))
    a3, b3 = rand(3, 7, 20, dtype=dtype, device=device), rand(3, 20, 12, dtype=dtype, device=device)
    close_gemm(flag_gems.bmm(a3, b3), ref64(a3) @ ref64(b3), a3, b3, dtype, tag("flag_gems.bmm", a3.shape, dtype))
    bias = rand(12, dtype=dtype, device=device)
    prod = -1.5 * (ref64(a) @ ref64(b))
    term = 0.25 * ref64(bias)
    close_gemm(flag_gems.addmm(bias, a, b, beta=0.25, alpha=-1.5), prod + term, a, b, dtype,
               tag("flag_gems.addmm", (7, 20, 12), dtype), extra=torch.broadcast_to(term, prod.shape))
    with pytest.raises(ValueError, match="expected a 2-D tensor"):
        flag_gems.mm(a3, b3)
    with pytest.raises(ValueError, match="expected a 3-D tensor"):
        flag_gems.bmm(a, b)
    with pytest.raises(ValueError, match="b: expected 20 rows"):
        flag_gems.mm(a, rand(21, 12, dtype=dtype, device=device))


def test_tuned_gemm_end_to_end(device, private_cache):
    """Tuning picks a non-heuristic config (fake timer: of the last class the candidates offer), stores it,
    and the next call reads it from the cache and runs it correctly."""
    dtype = torch.bfloat16
    a, b = rand(20, 32, dtype=dtype, device=device), rand(48, 32, dtype=dtype, device=device).t()
    key = km.tune_key(a, b, None)
    dev = a.get_device()
    default = km.TUNABLE.default(key, dev)
    kinds = {c["KIND"] for c in km.TUNABLE.candidates(key, dev) if c != default}
    want = next(kind for kind in ("persistent", "tma", "plain") if kind in kinds)
    assert want != "plain" or not key[-1], kinds  # descriptors usable: a descriptor class is offered

    def timer(run, cfg):
        run()
        if cfg is None:
            return 50.0  # native
        return 1.0 if cfg["KIND"] == want and cfg != default else 10.0

    with at.use_timer(timer):
        res = km.TUNABLE.tune(key, dev)
    assert res.origin == "tuned" and res.config != dict(default, NATIVE=0)
    assert res.config["KIND"] == want and res.config["NATIVE"] == 0 and res.baseline_us == 50.0
    at.clear_memory()
    out = flag_gems.mm(a, b)
    assert km.TUNABLE.origin(key, dev).origin == "cache"
    close_gemm(out, ref64(a) @ ref64(b), a, b, dtype, tag("mm tuned", (20, 32, 48), dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_every_gpu_candidate_gpu(dtype):
    """Every candidate the tuner may pick on this GPU, at LLM-like shapes (decode, mid, persistent-sized
    with and without bias), vs float64. A candidate that does not compile is one the tuner drops (with
    a warning); a class (kind, warp specialization) of which no candidate compiles fails the test, and
    so does every wrong result or any other error."""
    dev = torch.cuda.current_device()
    offered, ran, failed = set(), set(), {}
    for m, n, k, use_bias in ((1, 512, 4096, False), (96, 1024, 512, False), (2048, 2048, 512, False),
                              (2048, 2048, 256, True)):  # decode, mid, persistent-sized (addmm)
        a = rand(m, k, dtype=dtype, device="cuda")
        b = rand(n, k, dtype=dtype, device="cuda").t()
        bias = rand(n, dtype=dtype, device="cuda") if use_bias else None
        key = km.tune_key(a, b, bias)
        ref = ref64(a) @ ref64(b) + (ref64(bias) if use_bias else 0)
        for cfg in [km.TUNABLE.default(key, dev)] + km.TUNABLE.candidates(key, dev):
            cls = (cfg["KIND"], cfg["WARP_SPEC"])
            offered.add(cls)
            out = poison(torch.empty(m, n, dtype=dtype, device="cuda"))
            with km.TUNABLE.forcing(cfg):
                try:
                    km.matmul(a, b, bias, out=out)
                except Exception as exc:
                    if not _unsupported(exc):
                        raise
                    failed.setdefault(cls, []).append(f"{cfg}: {type(exc).__name__}: {str(exc)[:300]}")
                    continue
            close_gemm(out, ref, a, b, dtype, tag(f"mm[{cfg} bias={use_bias}]", (m, k, n), dtype),
                       extra=ref64(bias).expand(m, n) if use_bias else None)
            ran.add(cls)
    never = offered - ran
    assert not never, {cls: failed.get(cls) for cls in never}
    want = {"plain"}
    if dtype != torch.float32 and km.HAS_TMA and torch.cuda.get_device_capability()[0] >= 9:
        want = {"plain", "tma", "persistent"}
    assert want <= {kind for kind, _ in ran}, ran
    if failed:
        warnings.warn(f"candidates that do not compile here (the tuner drops them): {failed}")
