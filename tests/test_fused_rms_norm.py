"""aten's fused RMSNorm entries (lowerings/fused_rms_norm.py) and the launchers' rstd arguments.

Forward ``(out, rstd)`` and backward (every ``output_mask``) against float64 torch written
here, on hidden sizes 1, 7, 17, 768 and one longer than MAX_FUSED_BLOCK (looped rows), 0/1/5
rows, 1-D and 2-D ``normalized_shape``, with and without weight, strided token dims;
``eps=None`` is fp32's epsilon as in torch; ``F.rms_norm`` / ``nn.RMSNorm`` under ``use_gems``
(the record log shows the entry ran); declined calls give torch's exact result; ``supports``
on FakeTensors and symbolic shapes.

On the CPU, ``aten::_fused_rms_norm_backward`` has no native kernel, so the eager mode cannot
register its entry there (it captures the native kernel as the fallback) and a CPU forward
served by the entry has no backward: training under ``use_gems`` is a GPU test.
"""

import pytest
import torch
import torch.nn.functional as F

import flag_gems
import flag_gems.lowerings.fused_rms_norm as lf  # registers the entries
from accuracy import DEVICE, DTYPE_IDS, DTYPES, assert_close, assert_masked_grads, poison, rand, reason, ref64, run, tag
from flag_gems import eager
from flag_gems.kernels._common import MAX_FUSED_BLOCK
from flag_gems.kernels.rms_norm import rms_norm_bwd, rms_norm_fwd
from flag_gems.lowerings.registry import FALLBACKS, REGISTRY

aten = torch.ops.aten
FWD, BWD = aten._fused_rms_norm.default, aten._fused_rms_norm_backward.default
LONG = MAX_FUSED_BLOCK + 3616  # 20000: a row the kernels walk in chunks
F32_EPS = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def _off():
    eager.disable()
    yield
    eager.disable()


def ref_forward(x, ns, w, eps):
    """float64 RMSNorm over the trailing ``len(ns)`` dims: (out, rstd with torch's stat shape)."""
    eps = F32_EPS if eps is None else eps
    dims = list(range(x.dim() - len(ns), x.dim()))
    x64 = ref64(x)
    rstd = (x64.pow(2).mean(dims, keepdim=True) + eps).rsqrt()
    y = x64 * rstd
    if w is not None:
        y = y * ref64(w)
    return y, rstd


def check_forward(x, ns, w, eps, what):
    y, rstd = run(FWD, x, ns, w, eps)
    ry, rrstd = ref_forward(x, ns, w, eps)
    stat_shape = list(x.shape[: x.dim() - len(ns)]) + [1] * len(ns)
    assert y.dtype == x.dtype and y.shape == x.shape and y.is_contiguous(), f"{what} out {y.dtype} {y.stride()}"
    assert rstd.dtype == torch.float32 and list(rstd.shape) == stat_shape and rstd.is_contiguous(), (
        f"{what} rstd {rstd.dtype} {tuple(rstd.shape)}"
    )
    assert_close(y, ry, x.dtype, what)
    assert_close(rstd, rrstd, torch.float32, what + " rstd")
    return y, rstd


FWD_CASES = [((1, 1), [1]), ((5, 7), [7]), ((2, 3, 17), [17]), ((0, 7), [7]), ((1, 768), [768]),
             ((5, 3, 7), [3, 7]), ((2, LONG), [LONG])]


@pytest.mark.parametrize("shape,ns", FWD_CASES, ids=str)
@pytest.mark.parametrize("affine", ["w", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_forward(shape, ns, affine, dtype, device):
    x = rand(*shape, dtype=dtype, device=device, scale=2.0)
    w = rand(*ns, dtype=dtype, device=device) if affine == "w" else None
    check_forward(x, ns, w, 1e-5, tag(f"_fused_rms_norm {affine}", shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_default_eps_is_fp32_epsilon(dtype, device):
    # Small rows: mean(x^2) ~ 1e-8 is below fp32's eps (1.2e-7), so the eps shows in the result.
    x = rand(4, 33, dtype=dtype, device=device, scale=1e-4)
    w = rand(33, dtype=dtype, device=device)
    what = tag("_fused_rms_norm eps=None", x.shape, dtype)
    _, rstd = check_forward(x, [33], w, None, what)
    _, native_rstd = aten._fused_rms_norm(x, [33], w, None)  # torch's own default
    assert_close(rstd, ref64(native_rstd), torch.float32, what + " vs native")
    if dtype != torch.float32:  # not the input dtype's epsilon
        _, other = ref_forward(x, [33], w, torch.finfo(dtype).eps)
        with pytest.raises(AssertionError):  # that eps would be seen by the comparison above
            assert_close(rstd, other, torch.float32, what + " with the input dtype's eps")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_strided_token_dims(dtype, device):
    cases = [
        (rand(4, 12, 8, dtype=dtype, device=device)[:, ::2], [8]),  # strided middle dim: viewed
        (rand(7, 3, 16, dtype=dtype, device=device).transpose(0, 1), [16]),  # permuted tokens: copied
        (rand(5, 4, 2, 8, dtype=dtype, device=device)[:, ::2], [2, 8]),  # 2-D row, strided tokens
        (rand(3, 1, 9, dtype=dtype, device=device).expand(3, 4, 9), [9]),  # broadcast rows
    ]
    for x, ns in cases:
        assert not x.is_contiguous()
        w = rand(*ns, dtype=dtype, device=device)
        check_forward(x, ns, w, 1e-6, tag(f"_fused_rms_norm strided {list(x.stride())}", x.shape, dtype))


MASKS = [[True, True], [True, False], [False, True], [False, False]]
BWD_CASES = [((5, 7), [7]), ((1, 768), [768]), ((0, 7), [7]), ((3, 2, 5), [2, 5]), ((2, LONG), [LONG])]


@pytest.mark.parametrize("shape,ns", BWD_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_all_masks(shape, ns, dtype, device):
    eps = 1e-5
    x = rand(*shape, dtype=dtype, device=device)
    w = rand(*ns, dtype=dtype, device=device)
    g = rand(*shape, dtype=dtype, device=device)
    _, rstd = run(FWD, x, ns, w, eps)
    x64, w64 = ref64(x).requires_grad_(True), ref64(w).requires_grad_(True)
    F.rms_norm(x64, ns, w64, eps).backward(ref64(g))
    for mask in MASKS:
        outs = run(BWD, g, x, ns, rstd, w, mask)
        assert_masked_grads(outs, (x64.grad, w64.grad), ("dx", "dw"), mask, dtype,
                            tag("_fused_rms_norm_backward", shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_without_weight_and_strided(dtype, device):
    x = rand(4, 6, 9, dtype=dtype, device=device)[:, ::2]  # strided tokens
    g = rand(9, 3, 4, dtype=dtype, device=device).permute(2, 1, 0)  # grad_out of any layout
    _, rstd = run(FWD, x, [9], None, None)
    x64 = ref64(x).requires_grad_(True)
    F.rms_norm(x64, [9], None, F32_EPS).backward(ref64(g))
    dx, dw = run(BWD, g, x, [9], rstd, None, [True, False])
    assert dw is None
    what = tag("_fused_rms_norm_backward no weight", x.shape, dtype)
    assert dx.dtype == dtype and dx.shape == x.shape, what
    assert_close(dx, x64.grad, dtype, what, grad=True)


def test_backward_uses_the_given_rstd(device):
    # The schema has no eps: the backward must use the forward's rstd, not recompute one.
    x = rand(3, 16, device=device, scale=1e-4)
    w = rand(16, device=device)
    g = rand(3, 16, device=device)
    eps = 1e-6  # comparable to mean(x^2): a recomputed rstd with another eps would differ
    _, rstd = run(FWD, x, [16], w, eps)
    x64, w64 = ref64(x).requires_grad_(True), ref64(w).requires_grad_(True)
    F.rms_norm(x64, [16], w64, eps).backward(ref64(g))
    dx, dw = run(BWD, g, x, [16], rstd, w, [True, True])
    what = tag("_fused_rms_norm_backward given rstd", x.shape, torch.float32)
    scale = x64.grad.abs().max()  # dx is of order 1 / rms(x) = 1e4: compare relative to its size
    assert_close(ref64(dx) / scale, x64.grad / scale, torch.float32, what + " dx", grad=True)
    assert_close(dw, w64.grad, torch.float32, what + " dw", grad=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_f_rms_norm_under_use_gems(dtype, device, tmp_path):
    # On the CPU too: with our CPU kernel registered, aten::rms_norm calls _fused_rms_norm.
    norm = torch.nn.RMSNorm([4, 12], eps=1e-5, device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(rand(4, 12, dtype=dtype, device=device))
    x = rand(3, 5, 4, 12, dtype=dtype, device=device)
    x2 = rand(2, 7, 12, dtype=dtype, device=device)
    w2 = rand(12, dtype=dtype, device=device)
    native = (norm(x), F.rms_norm(x2, [12], w2), aten._fused_rms_norm(x2, [12], None, None))
    path = tmp_path / "ops.log"
    with flag_gems.use_gems(include=["_fused_rms_norm"], record=True, path=str(path)):
        y = norm(x)
        y2 = F.rms_norm(x2, [12], w2)  # eps=None
        y3, rstd3 = aten._fused_rms_norm(x2, [12], None, None)
    log = path.read_text()
    assert log.count("GEMS _FUSED_RMS_NORM\n") == 3, log
    what = tag("RMSNorm use_gems", x.shape, dtype)
    for out, nat, ref, name in ((y, native[0], ref_forward(x, [4, 12], norm.weight, 1e-5)[0], "nn.RMSNorm"),
                                (y2, native[1], ref_forward(x2, [12], w2, None)[0], "F.rms_norm"),
                                (y3, native[2][0], ref_forward(x2, [12], None, None)[0], "aten")):
        assert out.dtype == nat.dtype and out.shape == nat.shape, f"{what} {name}"
        assert_close(out, ref, dtype, f"{what} {name}")
    assert rstd3.shape == native[2][1].shape and rstd3.dtype == native[2][1].dtype, what
    assert_close(rstd3, ref64(native[2][1]), torch.float32, what + " rstd vs native")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nn_rms_norm_training_under_use_gems(dtype, tmp_path):
    norm = torch.nn.RMSNorm(48, eps=1e-6, device="cuda", dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(rand(48, dtype=dtype, device="cuda"))
    x = rand(3, 5, 48, dtype=dtype, device="cuda", requires_grad=True)
    g = rand(3, 5, 48, dtype=dtype, device="cuda")
    path = tmp_path / "ops.log"
    with flag_gems.use_gems(include=["_fused_rms_norm", "_fused_rms_norm_backward"], record=True, path=str(path)):
        y = norm(x)
        y.backward(g)
    x64, w64 = ref64(x).requires_grad_(True), ref64(norm.weight).requires_grad_(True)
    y64 = F.rms_norm(x64, [48], w64, 1e-6)
    y64.backward(ref64(g))
    what = tag("nn.RMSNorm training use_gems", x.shape, dtype)
    assert_close(y, y64, dtype, what + " y")
    assert_close(x.grad, x64.grad, dtype, what + " dx", grad=True)
    assert_close(norm.weight.grad, w64.grad, dtype, what + " dw", grad=True)
    log = path.read_text()
    for name in ("GEMS _FUSED_RMS_NORM\n", "GEMS _FUSED_RMS_NORM_BACKWARD\n"):
        assert name in log, f"{name!r} not in the record log:\n{log}"


def test_declined_calls_through_eager_mode_are_exact(device, tmp_path):
    x = rand(5, 6, device=device, dtype=torch.float64)
    w = rand(6, device=device, dtype=torch.float64)
    xb = rand(5, 6, device=device, dtype=torch.bfloat16)
    xt = rand(6, 5, device=device).t()
    cases = [
        lambda: F.rms_norm(x, [6], w),  # float64
        lambda: aten._fused_rms_norm(xb, [6], w.float(), 1e-5),  # mixed weight dtype
        lambda: aten._fused_rms_norm(xt, [6], None, None),  # last dim not unit-stride
    ]

    def outcome(f):  # CUDA's native kernel raises on the mixed-dtype case: the same error then
        try:
            return f()
        except RuntimeError as e:
            return type(e)

    expected = [outcome(f) for f in cases]
    path = tmp_path / "ops.log"
    with flag_gems.use_gems(include=["_fused_rms_norm"], record=True, path=str(path)):
        got = [outcome(f) for f in cases]
    for k, (out, ref) in enumerate(zip(got, expected)):
        if isinstance(ref, type):
            assert out is ref, f"[case {k}] {out} != {ref}"
            continue
        outs, refs = (out, ref) if isinstance(ref, tuple) else ((out,), (ref,))
        for a, b in zip(outs, refs):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"[case {k}]"
    assert "GEMS" not in path.read_text(), path.read_text()


def test_refusals_give_reasons_and_impl_raises(device):
    x = rand(4, 6, device=device)
    w = rand(6, device=device)
    _, r = run(FWD, x, [6], w, None)
    cases = [
        (FWD, (x.double(), [6], None, None), "input dtype"),
        (FWD, (x, [4], None, None), "trailing dims"),
        (FWD, (x, [], None, None), "non-empty"),
        (FWD, (x[:, :0], [0], None, None), "empty normalized"),
        (FWD, (x.t(), [4], None, None), "not contiguous"),
        (FWD, (rand(4, 3, 2, device=device).transpose(1, 2), [2, 3], None, None), "not contiguous"),
        (FWD, (x, [6], w.half(), None), "mixed dtypes"),
        (FWD, (x, [6], w[:5], None), "weight shape"),
        (FWD, (x, [6], rand(12, device=device)[::2], None), "non-contiguous weight"),
        (FWD, (x, [6], None, "1e-5"), "eps"),
        (FWD, (torch.empty(3, 6, device="meta"), [6], None, None), "device"),
        (BWD, (x, x, [6], r, None, [True, True]), "weight gradient"),
        (BWD, (x, x, [6], r[:2], w, [True, True]), "rows"),
        (BWD, (x, x, [6], r.bfloat16(), w, [True, True]), "rstd dtype"),
        (BWD, (x.half(), x, [6], r, w, [True, True]), "grad_out dtype"),
        (BWD, (x[:2], x, [6], r, w, [True, True]), "grad_out shape"),
        (BWD, (x, x, [6], r, w, [True, True, True]), "2 bools"),
        (BWD, (x.t(), x.t(), [4], r, None, [True, False]), "not contiguous"),
    ]
    for target, args, expect in cases:
        why = reason(target, *args)
        assert why is not None and expect in why, f"[op={target}] {expect!r} not in {why!r}"
        with pytest.raises(NotImplementedError, match="flag_gems _fused_rms_norm"):
            REGISTRY[target].impl(*args)


def test_supports_on_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode, torch.device(DEVICE):
        def t(*shape, dtype=torch.float32):
            return mode.from_tensor(torch.empty(shape, dtype=dtype))

        x, w, r = t(4, 3, 8, dtype=torch.bfloat16), t(8, dtype=torch.bfloat16), t(4, 3, 1)
        assert reason(FWD, x, [8], w, None) is None
        assert reason(FWD, x, [3, 8], None, 1e-6) is None
        assert reason(FWD, x[:, ::2], [8], w, None) is None
        assert reason(BWD, x, x, [8], r, w, [True, True]) is None
        assert reason(BWD, x, x, [8], r, None, [True, False]) is None
        assert "dtype" in reason(FWD, t(4, 8, dtype=torch.float64), [8], None, None)
        assert "trailing" in reason(FWD, x, [3], None, None)
        assert "mixed" in reason(FWD, x, [8], t(8), None)


def test_supports_on_symbolic_shapes_adds_no_guards():
    from torch._guards import detect_fake_mode
    from torch.fx.experimental.proxy_tensor import make_fx

    seen = {}

    def f(x, w):
        seen["fwd"] = reason(FWD, x, [8], w, None)
        seen["guards"] = list(detect_fake_mode([x]).shape_env.guards)
        return x * 2

    make_fx(f, tracing_mode="symbolic")(torch.randn(3, 5, 8, device=DEVICE), torch.randn(8, device=DEVICE))
    assert seen["fwd"] is not None and "symbolic" in seen["fwd"], seen["fwd"]  # refused, not guarded
    assert seen["guards"] == []


def test_registry_entries():
    assert set(lf.TARGETS) == {FWD, BWD}
    for target in lf.TARGETS:
        entry = REGISTRY[target]
        assert target not in FALLBACKS
        # On in the eager mode; not lowered in graphs (the rms_norm pass fuses it there); the
        # forward is in the GPU benchmark, the backward not yet.
        assert entry.eager.on and not entry.graph.on and bool(entry.data) == (target == FWD)


# --------------------------------------------------------------------------- launcher arguments


@pytest.mark.parametrize("n", [7, LONG], ids=["one-pass", "looped"])
def test_launcher_rstd_out_and_rstd(n, device):
    x = rand(3, 2, n, dtype=torch.bfloat16, device=device)
    r = rand(3, 2, n, dtype=torch.bfloat16, device=device)
    w = rand(n, dtype=torch.bfloat16, device=device)
    rstd = poison(torch.empty(6, device=device))
    y, h = rms_norm_fwd(x, w, 1e-6, residual=r, rstd_out=rstd)
    h64 = ref64(h)  # the norm is of the rounded sum
    ref_rstd = (h64.pow(2).mean(-1) + 1e-6).rsqrt().reshape(6)
    assert_close(rstd, ref_rstd, torch.float32, tag("rms_norm_fwd rstd_out", x.shape, torch.bfloat16))
    g = rand(3, 2, n, dtype=torch.bfloat16, device=device)
    recomputed = rms_norm_bwd(g, h, w, 1e-6)
    given = rms_norm_bwd(g, h, w, 123.0, rstd=rstd)  # eps unused when rstd is given
    for a, b, name in zip(given, recomputed, ("dx", "dw")):
        assert_close(a, ref64(b), torch.bfloat16, tag(f"rms_norm_bwd rstd= {name}", x.shape, torch.bfloat16), grad=True)


def test_launcher_rstd_errors(device):
    x = rand(3, 8, device=device)
    with pytest.raises(TypeError, match="rstd_out: expected a float32"):
        rms_norm_fwd(x, None, 1e-6, rstd_out=torch.empty(3, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="rstd_out: expected a contiguous tensor of 3"):
        rms_norm_fwd(x, None, 1e-6, rstd_out=torch.empty(4, device=device))
    with pytest.raises(ValueError, match="rstd: expected a contiguous tensor of 3"):
        rms_norm_bwd(x, x, None, 1e-6, rstd=torch.empty(6, device=device)[::2])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gpu_large_shapes_match_native(dtype):
    for shape, ns in [((8192, 4096), [4096]), ((16, 65536), [65536]), ((4, 512, 7), [7]), ((2, 64, 8, 128), [8, 128])]:
        x = torch.randn(shape, device="cuda", dtype=dtype)
        w = torch.randn(ns, device="cuda", dtype=dtype)
        what = tag("_fused_rms_norm", shape, dtype)
        y, rstd = check_forward(x, ns, w, None, what)
        ny, nrstd = aten._fused_rms_norm(x, ns, w, None)
        assert (ny.dtype, nrstd.dtype, nrstd.shape) == (y.dtype, rstd.dtype, rstd.shape), what
        assert_close(rstd, ref64(nrstd), torch.float32, what + " rstd vs native")
        g = torch.randn(shape, device="cuda", dtype=dtype)
        dx, dw = run(BWD, g, x, ns, rstd, w, [True, True])
        ndx, ndw = aten._fused_rms_norm_backward(g, x, ns, nrstd, w, [True, True])
        assert (dx.dtype, dw.dtype, dw.shape) == (ndx.dtype, ndw.dtype, ndw.shape), what
        assert_close(dx, ref64(ndx), dtype, what + " dx vs native", grad=True)
        assert_close(dw, ref64(ndw), dtype, what + " dw vs native", grad=True)
