"""LayerNorm (kernels/layer_norm.py) and its registry entries (lowerings/layer_norm.py).

Forward (out, mean, rstd) and backward (every output_mask) against float64 torch, on
hidden sizes 1, 7, 768 and one longer than MAX_FUSED_BLOCK (looped rows), 0/1/5 rows,
with and without weight/bias, fp32 parameters on a bf16 input; ``supports`` on
FakeTensors; ``torch.nn.LayerNorm`` under ``use_gems`` equals eager and the record log
shows both entries ran; declined calls give torch's exact result.
"""


import pytest
import torch

import flag_gems
from accuracy import DEVICE, DTYPE_IDS, DTYPES, assert_close, assert_masked_grads, poison, rand, ref64, tag
from flag_gems import eager
from flag_gems.kernels import layer_norm as kl
from flag_gems.kernels._common import MAX_FUSED_BLOCK
from flag_gems.lowerings import layer_norm as ll
from flag_gems.lowerings.registry import FALLBACKS, REGISTRY

aten = torch.ops.aten
FWD, BWD = aten.native_layer_norm.default, aten.native_layer_norm_backward.default
NAMES = ["native_layer_norm", "native_layer_norm_backward"]
LONG = MAX_FUSED_BLOCK + 3616  # 20000: a row the kernels walk in chunks
EPS = 1e-5


@pytest.fixture(autouse=True)
def _off():
    eager.disable()
    yield
    eager.disable()


def run(target, *args):
    """The registry entry's impl, after asserting its supports() accepts the call."""
    entry = REGISTRY[target]
    why = entry.supports(*args)
    assert why is None, f"[op={target}] supports() refused: {why}"
    return entry.impl(*args)


def ref_forward(x, normalized_shape, w, b):
    """float64 LayerNorm: (out, mean, rstd) with torch's stat shape."""
    dims = list(range(x.dim() - len(normalized_shape), x.dim()))
    x64 = ref64(x)
    mean = x64.mean(dims, keepdim=True)
    var = ((x64 - mean) ** 2).mean(dims, keepdim=True)
    rstd = (var + EPS).rsqrt()
    y = (x64 - mean) * rstd
    if w is not None:
        y = y * ref64(w)
    if b is not None:
        y = y + ref64(b)
    return y, mean, rstd


def stats_dtype(x, w, b):
    """torch's mean/rstd dtype: fp32 on CUDA; on the CPU x's dtype unless the parameters are fp32."""
    if x.device.type != "cpu":
        return torch.float32
    return torch.float32 if any(p is not None and p.dtype != x.dtype for p in (w, b)) else x.dtype


CASES = [((1, 1), [1]), ((5, 7), [7]), ((1, 768), [768]), ((0, 768), [768]), ((5, 3, 7), [3, 7]), ((2, LONG), [LONG])]


@pytest.mark.parametrize("shape,ns", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("affine", ["wb", "w", "b", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_forward(shape, ns, affine, dtype, device):
    x = rand(*shape, dtype=dtype, device=device, scale=2.0) + 0.5
    w = rand(*ns, dtype=dtype, device=device) if "w" in affine else None
    b = rand(*ns, dtype=dtype, device=device) if "b" in affine else None
    y, mean, rstd = run(FWD, x, ns, w, b, EPS)
    ry, rmean, rrstd = ref_forward(x, ns, w, b)
    what = tag(f"native_layer_norm {affine}", shape, dtype)
    sd = stats_dtype(x, w, b)
    assert y.dtype == dtype and mean.dtype == sd and rstd.dtype == sd, f"{what} dtypes {y.dtype} {mean.dtype}"
    assert_close(y, ry, dtype, what)
    assert_close(mean, rmean, sd, what + " mean")
    assert_close(rstd, rrstd, sd, what + " rstd")


@pytest.mark.parametrize("shape,ns", [((5, 7), [7]), ((2, 3, 17), [17]), ((2, LONG), [LONG])], ids=str)
def test_forward_fp32_params_on_bf16(shape, ns, device):
    if device != "cpu":
        pytest.skip("fp32 parameters on a bf16 input: CUDA's native kernel raises; declined there")
    x = rand(*shape, dtype=torch.bfloat16, device=device)
    w, b = rand(*ns, device=device), rand(*ns, device=device)
    y, mean, rstd = run(FWD, x, ns, w, b, EPS)
    ry, rmean, rrstd = ref_forward(x, ns, w, b)
    ny, nmean, nrstd = aten.native_layer_norm(x, ns, w, b, EPS)
    what = tag("native_layer_norm mixed", shape, torch.bfloat16)
    assert (y.dtype, mean.dtype, mean.shape) == (ny.dtype, nmean.dtype, nmean.shape), what
    assert_close(y, ry, torch.bfloat16, what)
    assert_close(rstd, rrstd, torch.float32, what + " rstd")


MASKS = [[a, b, c] for a in (True, False) for b in (True, False) for c in (True, False)]


@pytest.mark.parametrize("shape,ns", [((5, 7), [7]), ((1, 768), [768]), ((0, 7), [7]), ((3, 2, 5), [2, 5]),
                                      ((2, LONG), [LONG])], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_all_masks(shape, ns, dtype, device):
    x = rand(*shape, dtype=dtype, device=device)
    w, b = rand(*ns, dtype=dtype, device=device), rand(*ns, dtype=dtype, device=device)
    g = rand(*shape, dtype=dtype, device=device)
    _, mean, rstd = aten.native_layer_norm(x, ns, w, b, EPS)
    x64, w64, b64 = (ref64(t).requires_grad_(True) for t in (x, w, b))
    torch.nn.functional.layer_norm(x64, ns, w64, b64, EPS).backward(ref64(g))
    refs = (x64.grad, w64.grad, b64.grad)
    for mask in MASKS:
        outs = run(BWD, g, x, ns, mean, rstd, w, b, mask)
        assert_masked_grads(outs, refs, ("dx", "dw", "db"), mask, dtype, tag("native_layer_norm_backward", shape, dtype))


@pytest.mark.parametrize("ns", [[7], [LONG]], ids=["short", "long"])
def test_backward_without_params_and_mixed(ns, device):
    x = rand(4, *ns, dtype=torch.bfloat16, device=device)
    g = rand(4, *ns, dtype=torch.bfloat16, device=device)
    _, mean, rstd = aten.native_layer_norm(x, ns, None, None, EPS)
    x64 = ref64(x).requires_grad_(True)
    torch.nn.functional.layer_norm(x64, ns, None, None, EPS).backward(ref64(g))
    dx, dw, db = run(BWD, g, x, ns, mean, rstd, None, None, [True, False, False])
    assert dw is None and db is None
    assert_close(dx, x64.grad, torch.bfloat16, tag("layer_norm_backward no params", x.shape, torch.bfloat16), grad=True)
    if device != "cpu":
        return
    w, b = rand(*ns, device=device), rand(*ns, device=device)  # fp32 parameters, bf16 input (CPU rules)
    _, mean, rstd = aten.native_layer_norm(x, ns, w, b, EPS)
    x64, w64, b64 = ref64(x).requires_grad_(True), ref64(w).requires_grad_(True), ref64(b).requires_grad_(True)
    torch.nn.functional.layer_norm(x64, ns, w64, b64, EPS).backward(ref64(g))
    dx, dw, db = run(BWD, g, x, ns, mean, rstd, w, b, [True, True, True])
    what = tag("layer_norm_backward mixed", x.shape, torch.bfloat16)
    assert (dx.dtype, dw.dtype, db.dtype) == (torch.bfloat16, torch.float32, torch.float32), what
    assert_close(dx, x64.grad, torch.bfloat16, what, grad=True)
    assert_close(dw, w64.grad, torch.bfloat16, what + " dw", grad=True)  # dy is bf16: bf16-level error
    assert_close(db, b64.grad, torch.bfloat16, what + " db", grad=True)


def test_refusals_give_reasons_and_impl_raises(device):
    x = rand(4, 6, device=device)
    w = rand(6, device=device)
    _, m, r = aten.native_layer_norm(x, [6], w, w, EPS)
    cases = [
        (FWD, (x.double(), [6], None, None, EPS), "dtype"),
        (FWD, (x.t(), [4], None, None, EPS), "non-contiguous"),
        (FWD, (x, [4], None, None, EPS), "trailing dims"),
        (FWD, (x[:, :0], [0], None, None, EPS), "empty normalized"),
        (FWD, (x, [6], w.half(), None, EPS), "dtype"),
        (FWD, (x, [6], w[:5], None, EPS), "shape"),
        (FWD, (torch.empty(3, 6, device="meta"), [6], None, None, EPS), "device"),
        (BWD, (x, x, [6], m, r, None, None, [True, True, False]), "weight gradient"),
        (BWD, (x, x, [6], m, r, w, None, [True, False, True]), "bias gradient"),
        (BWD, (x.t(), x.t(), [4], m, r, None, None, [True, False, False]), "non-contiguous"),
        (BWD, (x, x, [6], m[:2], r, w, w, [True, True, True]), "rows"),
    ]
    for target, args, expect in cases:
        why = REGISTRY[target].supports(*args)
        assert why is not None and expect in why, f"[op={target}] {expect!r} not in {why!r}"
        with pytest.raises(NotImplementedError, match="flag_gems layer_norm"):
            REGISTRY[target].impl(*args)


def test_declined_calls_through_eager_mode_are_exact(device, tmp_path):
    x = rand(5, 6, device=device, dtype=torch.float64)
    w = rand(6, device=device, dtype=torch.float64)
    xt = rand(6, 5, device=device).t()
    cases = [
        lambda: torch.nn.functional.layer_norm(x, [6], w, w),
        lambda: aten.native_layer_norm(x, [6], w, None, EPS),
        lambda: torch.nn.functional.layer_norm(xt, [6]),
    ]
    expected = [f() for f in cases]
    path = tmp_path / "ops.log"
    with flag_gems.use_gems(include=NAMES, record=True, path=str(path)):
        got = [f() for f in cases]
    for k, (out, ref) in enumerate(zip(got, expected)):
        outs, refs = (out, ref) if isinstance(ref, tuple) else ((out,), (ref,))
        for a, b in zip(outs, refs):
            assert a.dtype == b.dtype and torch.equal(a, b), f"[case {k}]"
    assert "GEMS" not in path.read_text(), path.read_text()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nn_layer_norm_under_use_gems(dtype, device, tmp_path):
    torch.manual_seed(0)
    ln = torch.nn.LayerNorm(48, device=device, dtype=dtype)
    with torch.no_grad():
        ln.weight.copy_(rand(48, dtype=dtype, device=device))
        ln.bias.copy_(rand(48, dtype=dtype, device=device))
    x = rand(3, 5, 48, dtype=dtype, device=device, requires_grad=True)
    g = rand(3, 5, 48, dtype=dtype, device=device)
    path = tmp_path / "ops.log"
    with flag_gems.use_gems(include=NAMES, record=True, path=str(path)):
        y = ln(x)
        y.backward(g)
    # Eager (native) on the same inputs, and the float64 reference both compare.
    ln2 = torch.nn.LayerNorm(48, device=device, dtype=dtype)
    ln2.load_state_dict(ln.state_dict())
    x2 = x.detach().clone().requires_grad_(True)
    y2 = ln2(x2)
    y2.backward(g)
    x64 = ref64(x).requires_grad_(True)
    w64, b64 = ref64(ln.weight).requires_grad_(True), ref64(ln.bias).requires_grad_(True)
    y64 = torch.nn.functional.layer_norm(x64, [48], w64, b64, ln.eps)
    y64.backward(ref64(g))
    what = tag("nn.LayerNorm use_gems", x.shape, dtype)
    for out, native, ref, name, grad in ((y, y2, y64, "y", False), (x.grad, x2.grad, x64.grad, "dx", True),
                                         (ln.weight.grad, ln2.weight.grad, w64.grad, "dw", True),
                                         (ln.bias.grad, ln2.bias.grad, b64.grad, "db", True)):
        assert out.dtype == native.dtype and out.shape == native.shape, f"{what} {name}"
        assert_close(out, ref, dtype, f"{what} {name}", grad=grad)
        if dtype == torch.float32:
            assert_close(out, ref64(native), dtype, f"{what} {name} vs eager", grad=grad)
    log = path.read_text()
    for name in ("GEMS NATIVE_LAYER_NORM\n", "GEMS NATIVE_LAYER_NORM_BACKWARD\n"):
        assert name in log, f"{name!r} not in the record log:\n{log}"


def test_supports_on_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode, torch.device(DEVICE):
        def t(*shape, dtype=torch.float32):
            return mode.from_tensor(torch.empty(shape, dtype=dtype))

        x, w, m = t(4, 3, 8, dtype=torch.bfloat16), t(8, dtype=torch.bfloat16), t(4, 3, 1)
        assert REGISTRY[FWD].supports(x, [8], w, w, EPS) is None
        assert REGISTRY[FWD].supports(x, [3, 8], None, None, EPS) is None
        assert REGISTRY[BWD].supports(x, x, [8], m, m, w, w, [True, True, True]) is None
        assert REGISTRY[BWD].supports(x, x, [8], m, m, None, None, [True, False, False]) is None
        assert "dtype" in REGISTRY[FWD].supports(t(4, 8, dtype=torch.float64), [8], None, None, EPS)
        assert "trailing" in REGISTRY[FWD].supports(x, [3], None, None, EPS)


def test_registry_entries_match_schemas():
    assert set(ll.TARGETS) == {FWD, BWD}
    for target in ll.TARGETS:
        entry = REGISTRY[target]
        assert target not in FALLBACKS
        # On in the eager mode; not in the GPU benchmark yet, so neither fast nor lowered in graphs.
        assert entry.eager.on and not entry.fast.on and not entry.graph.on and not entry.data


def test_launcher_errors(device):
    x = rand(3, 4, device=device)
    with pytest.raises(ValueError, match="2 dims"):
        kl.layer_norm_fwd(x.view(12), None, None, EPS)
    with pytest.raises(ValueError, match="contiguous"):
        kl.layer_norm_fwd(x.t(), None, None, EPS)
    with pytest.raises(TypeError, match="dtype"):
        kl.layer_norm_fwd(x.double(), None, None, EPS)
    with pytest.raises(ValueError, match="weight"):
        kl.layer_norm_fwd(x, rand(5, device=device), None, EPS)
    with pytest.raises(ValueError, match="positive row length"):
        kl.layer_norm_fwd(x[:, :0].contiguous(), None, None, EPS)
    _, m, r = kl.layer_norm_fwd(x, None, None, EPS)
    with pytest.raises(ValueError, match="dy"):
        kl.layer_norm_bwd(x[:, :3].contiguous(), x, m, r, None)
    with pytest.raises(ValueError, match="mean"):
        kl.layer_norm_bwd(x, x, m[:2], r, None)


def test_poisoned_outputs_are_overwritten(device):
    # Outputs are fresh tensors; a NaN anywhere in them would mean an unwritten element.
    x = rand(5, 33, device=device)
    y, m, r = kl.layer_norm_fwd(x, None, None, EPS)
    assert not (y.isnan().any() or m.isnan().any() or r.isnan().any())
    dx, dw, db = kl.layer_norm_bwd(poison(x.clone()).nan_to_num(1.0), x, m, r, rand(33, device=device))
    assert not (dx.isnan().any() or dw.isnan().any() or db.isnan().any())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gpu_large_shapes(dtype):
    for shape in [(8192, 768), (4096, 4096), (16, 65536), (65536, 7)]:
        n = shape[-1]
        x = torch.randn(shape, device="cuda", dtype=dtype)
        w, b = torch.randn(n, device="cuda", dtype=dtype), torch.randn(n, device="cuda", dtype=dtype)
        y, mean, rstd = run(FWD, x, [n], w, b, EPS)
        ry, _, rrstd = ref_forward(x, [n], w, b)
        assert_close(y, ry, dtype, tag("native_layer_norm", shape, dtype))
        assert_close(rstd, rrstd, torch.float32, tag("native_layer_norm rstd", shape, dtype))
