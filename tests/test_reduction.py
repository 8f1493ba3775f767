"""Reductions and softmax (kernels/reduction.py) and their registry entries (lowerings/reduction.py).

Every entry is checked against torch in float64, on shapes with 1 and 0 rows, primes,
non-powers of two, rows longer than MAX_FUSED_BLOCK (looped and split paths), keepdim,
``-1`` vs ``ndim-1``, NaN/Inf rows; the refusals run torch's kernel through the eager mode
with torch's exact result; ``supports`` runs on FakeTensors; a small training step under
``use_gems`` gives eager's gradients.
"""


import pytest
import torch

import flag_gems
from accuracy import DEVICE, DTYPES, DTYPE_IDS, GRAD_TOLERANCES, TOLERANCES, assert_close, rand, reason, ref64, run, tag
from flag_gems import eager
from flag_gems.kernels import reduction as kr
from flag_gems.kernels._common import MAX_FUSED_BLOCK
from flag_gems.lowerings import reduction as lr
from flag_gems.lowerings.registry import FALLBACKS, REGISTRY

aten = torch.ops.aten
NAN, INF = float("nan"), float("inf")
LONG = MAX_FUSED_BLOCK + 613  # a row the kernels walk in chunks

OUR_NAMES = ["sum", "mean", "amax", "max.dim", "all", "_softmax", "_log_softmax", "_softmax_backward_data",
             "_log_softmax_backward_data"]


@pytest.fixture(autouse=True)
def _off():
    eager.disable()
    yield
    eager.disable()



def close_nan(out, ref, dtype, what, grad=False):
    """assert_close where NaN in the reference must be NaN in the output (same places)."""
    atol, rtol = (GRAD_TOLERANCES if grad else TOLERANCES)[dtype]
    assert out.dtype == dtype, f"{what} dtype {out.dtype} != {dtype}"
    torch.testing.assert_close(ref64(out), ref64(ref), atol=atol, rtol=rtol, equal_nan=True,
                               msg=lambda m: f"{what} {m}")


SHAPES = [(1, 1), (3, 5), (7, 13), (2, 3, 17), (0, 5), (4, 0), (130, 33), (2, LONG)]


# ------------------------------------------------------------------ sum / mean


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sum_mean_last_dim(shape, dtype, device):
    x = rand(*shape, dtype=dtype, device=device)
    for keepdim in (False, True):
        for dim in ([-1], [len(shape) - 1]):
            what = tag(f"sum dim={dim} keepdim={keepdim}", shape, dtype)
            out = run(aten.sum.dim_IntList, x, dim, keepdim)
            close_nan(out, ref64(x).sum(dim, keepdim=keepdim), dtype, what)
            out = run(aten.mean.dim, x, dim, keepdim)
            close_nan(out, ref64(x).mean(dim, keepdim=keepdim), dtype, tag(f"mean dim={dim} keepdim={keepdim}", shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sum_trailing_full_and_dtype(dtype, device):
    x = rand(3, 4, 7, dtype=dtype, device=device)
    x64 = ref64(x)
    for dim in ([1, 2], [2, -2], None, [], [0, 1, 2]):
        what = tag(f"sum dim={dim}", x.shape, dtype)
        close_nan(run(aten.sum.dim_IntList, x, dim), x64.sum(dim if dim is not None else []), dtype, what)
        close_nan(run(aten.mean.dim, x, dim, True), x64.mean(dim if dim is not None else [], keepdim=True), dtype, what)
    close_nan(run(aten.sum.default, x), x64.sum(), dtype, tag("sum", x.shape, dtype))
    out = run(aten.sum.default, x, dtype=torch.float32)  # widening dtype=: fp32 result
    close_nan(out, x64.sum(), torch.float32, tag("sum dtype=fp32", x.shape, dtype))
    out = run(aten.sum.dim_IntList, x, [-1], dtype=torch.float32)
    close_nan(out, x64.sum(-1), torch.float32, tag("sum dim dtype=fp32", x.shape, dtype))
    # One long row split across programs, partials reduced by a second launch.
    big = rand(5, 4 * LONG + 1, dtype=dtype, device=device)
    close_nan(run(aten.sum.default, big), ref64(big).sum(), dtype, tag("sum split", big.shape, dtype))
    close_nan(run(aten.mean.dim, big, None), ref64(big).mean(), dtype, tag("mean split", big.shape, dtype))
    close_nan(run(aten.amax.default, big), ref64(big).amax(), dtype, tag("amax split", big.shape, dtype))
    # Empty tensors: sum 0, mean NaN, as torch.
    e = rand(0, 3, dtype=dtype, device=device)
    close_nan(run(aten.sum.default, e), torch.zeros((), dtype=torch.float64), dtype, tag("sum empty", e.shape, dtype))
    close_nan(run(aten.mean.dim, e, None), torch.tensor(NAN, dtype=torch.float64), dtype, tag("mean empty", e.shape, dtype))
    close_nan(run(aten.sum.default, rand(dtype=dtype, device=device) * 0 + 2), torch.tensor(2.0), dtype, "[op=sum 0-dim]")


def test_sum_many_long_rows_loop_without_split(device):
    # Enough row programs that the rows are not split: each program loops over its row.
    rows = 2 * kr.num_sms(torch.device(device)) + 1  # 9 under the interpreter
    x = rand(rows, LONG, device=device)
    assert kr._splits(rows, LONG, 1, MAX_FUSED_BLOCK, x.device) == 1
    out = run(aten.sum.dim_IntList, x, [-1])
    # A sum can cancel to near 0: bound the error by the summed magnitudes (fp32 tree
    # reduction, ~log2(n) roundings of eps), not by the result.
    err = (ref64(out) - ref64(x).sum(-1)).abs()
    bound = 16 * torch.finfo(torch.float32).eps * ref64(x).abs().sum(-1)
    assert out.dtype == torch.float32 and bool((err <= bound).all()), f"{tag('sum loop', x.shape, torch.float32)} max err/bound {(err / bound).max():.2f}"


# ------------------------------------------------------------------ amax / max.dim


def with_specials(x):
    """Rows with NaN, +-Inf, all -inf and ties (dtype-exact values)."""
    x = x.clone()
    if x.shape[0] >= 4 and x.shape[-1] >= 3:
        x[0, 1] = NAN
        x[0, -1] = NAN
        x[1, :] = -INF
        x[2, 0] = INF
        x[2, -1] = INF
        x[3, :] = x[3, :].round()  # ties
    return x


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (4, 3, 19), (0, 5), (129, 17), (4, LONG)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_amax_max_dim_exact(shape, dtype, device):
    x = with_specials(rand(*shape, dtype=dtype, device=device, scale=2.0))
    for keepdim in (False, True):
        for dim in (-1, len(shape) - 1):
            what = tag(f"max dim={dim} keepdim={keepdim}", shape, dtype)
            values, indices = run(aten.max.dim, x, dim, keepdim)
            ref_v, ref_i = torch.max(x.cpu(), dim, keepdim)  # exact: no rounding in a maximum
            assert torch.equal(values.cpu().isnan(), ref_v.isnan()), what
            assert torch.equal(values.cpu().nan_to_num(), ref_v.nan_to_num()), what
            assert indices.dtype == torch.int64 and torch.equal(indices.cpu(), ref_i), f"{what} indices"
            amax = run(aten.amax.default, x, [dim], keepdim)
            assert torch.equal(amax.cpu().nan_to_num(), ref_v.nan_to_num()), tag("amax", shape, dtype)
            assert torch.equal(amax.cpu().isnan(), ref_v.isnan()), tag("amax", shape, dtype)
    if x.numel():
        full = run(aten.amax.default, x)
        ref = x.cpu().amax()
        assert torch.equal(full.cpu().isnan(), ref.isnan()) and (ref.isnan() or full.cpu() == ref), tag("amax all", shape, dtype)


def test_max_first_index_across_chunks(device):
    x = torch.full((2, 3 * LONG), -INF, device=device)
    x[0, LONG + 5] = 1.0
    x[0, 2 * LONG + 7] = 1.0  # tie in a later chunk: the earlier index wins
    x[1, 2 * LONG] = NAN
    x[1, 2 * LONG + 1] = NAN  # first NaN wins
    x[1, 3] = 5.0
    values, indices = run(aten.max.dim, x, -1)
    assert indices.tolist() == [LONG + 5, 2 * LONG] and values[0] == 1.0 and values[1].isnan()


# ------------------------------------------------------------------ all


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32, torch.int64, torch.float32, torch.bfloat16],
                         ids=["bool", "i32", "i64", "fp32", "bf16"])
def test_all(dtype, device):
    x = (torch.randn(6, 37) > -1.5).to(dtype).to(device)
    x[0] = 1
    if dtype.is_floating_point:
        x[1, 3] = NAN  # NaN is nonzero
        x[1, 4] = 0.0
        x[2] = NAN
    for keepdim in (False, True):
        out = run(aten.all.dim, x, -1, keepdim)
        assert out.dtype == torch.bool and torch.equal(out.cpu(), x.cpu().all(-1, keepdim)), tag("all.dim", x.shape, dtype)
    assert torch.equal(run(aten.all.default, x).cpu(), x.cpu().all())
    assert torch.equal(run(aten.all.default, x[:1]).cpu(), x[:1].cpu().all())
    assert run(aten.all.default, x[:0]).item() is True
    assert torch.equal(run(aten.all.dim, x[:, :0], 1).cpu(), torch.ones(6, dtype=torch.bool))
    assert reason(aten.all.default, x.to(torch.uint8)) is not None  # torch returns uint8 for uint8


# ------------------------------------------------------------------ softmax


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 3, 17), (0, 7), (130, 33), (2, LONG)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_softmax_log_softmax(shape, dtype, device):
    x = rand(*shape, dtype=dtype, device=device, scale=3.0)
    for dim in (-1, len(shape) - 1):
        y = run(aten._softmax.default, x, dim, False)
        close_nan(y, torch.softmax(ref64(x), -1), dtype, tag(f"softmax dim={dim}", shape, dtype))
        y = run(aten._log_softmax.default, x, dim, False)
        close_nan(y, torch.log_softmax(ref64(x), -1), dtype, tag(f"log_softmax dim={dim}", shape, dtype))


@pytest.mark.parametrize("n_cols", [6, LONG], ids=["short", "long"])
def test_softmax_nan_inf_rows(n_cols, device):
    x = rand(5, n_cols, device=device)
    x[0, :] = -INF  # all -inf: NaN in torch
    x[1, : n_cols // 2] = -INF  # -inf then finite (across chunks when long)
    x[2, 3] = INF  # +inf: NaN row
    x[3, 2] = NAN
    for target, ref_fn in ((aten._softmax.default, torch.softmax), (aten._log_softmax.default, torch.log_softmax)):
        y = run(target, x, -1, False)
        ref = ref_fn(ref64(x), -1)
        close_nan(y, ref, torch.float32, tag(f"{target} specials", x.shape, torch.float32))
        assert torch.equal(y.cpu().isnan(), ref.isnan())


def test_softmax_half_to_float(device):
    x = rand(4, 33, dtype=torch.float16, device=device)
    y = run(aten._softmax.default, x, -1, True)
    close_nan(y, torch.softmax(ref64(x), -1), torch.float32, tag("softmax half_to_float", x.shape, torch.float16))
    g = rand(4, 33, device=device)
    dx = run(aten._softmax_backward_data.default, g, y, -1, torch.float16)
    y64 = torch.softmax(ref64(x), -1)
    ref = y64 * (ref64(g) - (ref64(g) * y64).sum(-1, keepdim=True))
    close_nan(dx, ref, torch.float16, tag("softmax_backward half_to_float", x.shape, torch.float16), grad=True)
    assert "half_to_float" in reason(aten._softmax.default, x.bfloat16(), -1, True)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 3, 17), (0, 7), (130, 33), (2, LONG)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_softmax_backward_ops(shape, dtype, device):
    x = rand(*shape, dtype=dtype, device=device, scale=2.0)
    g = rand(*shape, dtype=dtype, device=device)
    for log, fwd, bwd in ((False, torch.softmax, aten._softmax_backward_data.default),
                          (True, torch.log_softmax, aten._log_softmax_backward_data.default)):
        x64 = ref64(x).requires_grad_(True)
        y64 = fwd(x64, -1)
        y64.backward(ref64(g))
        y = fwd(x, -1)  # the forward output the backward op takes
        dx = run(bwd, g, y, -1, dtype)
        close_nan(dx, x64.grad, dtype, tag(f"{bwd}", shape, dtype), grad=True)


# ------------------------------------------------------------------ refusals, eager mode, fake tensors


def test_refusals_give_reasons_and_impl_raises(device):
    x = rand(4, 6, device=device)
    cases = [
        (aten.sum.dim_IntList, (x, [0]), "last dim"),
        (aten.sum.dim_IntList, (x.t(), [-1]), "non-contiguous"),
        (aten.sum.dim_IntList, (x.long(), [-1]), "dtype"),
        (aten.sum.dim_IntList, (x.double(), [-1]), "dtype"),
        (aten.sum.dim_IntList, (x, [1, -1]), "repeats"),
        (aten.sum.dim_IntList, (x, [2]), "out of range"),
        (aten.mean.dim, (x, [-1], False), "dtype=", {"dtype": torch.float16}),
        (aten.amax.default, (x[:, :0], [-1]), "empty"),
        (aten.max.dim, (x, 0), "last dim"),
        (aten.max.dim, (x[0, 0], 0), "0-dim"),
        (aten._softmax.default, (x, 0, False), "last dim"),
        (aten._log_softmax.default, (x.bfloat16(), -1, True), "half_to_float"),
        (aten._softmax_backward_data.default, (x, x.half(), -1, torch.float32), "differ"),
        (aten._softmax_backward_data.default, (x, x, -1, torch.bfloat16), "input_dtype"),
        (aten.all.dim, (x, 0), "last dim"),
        (aten.sum.default, (torch.empty(3, device="meta"),), "device"),
    ]
    for target, args, expect, *kw in cases:
        kwargs = kw[0] if kw else {}
        why = reason(target, *args, **kwargs)
        assert why is not None and expect in why, f"[op={target}] {expect!r} not in {why!r}"
        with pytest.raises(NotImplementedError, match="flag_gems reduction"):
            REGISTRY[target].impl(*args, **kwargs)


def _log_lines(path):
    with open(path) as f:
        return f.read()


def test_fallbacks_through_eager_mode_are_exact(device, tmp_path):
    """Calls the entries refuse run torch's kernel under use_gems: torch's exact result, nothing logged."""
    x = rand(5, 6, device=device)
    i = torch.randint(-5, 5, (5, 6), device=device)
    cases = [
        lambda: x.sum(0),
        lambda: x.sum(dim=(0,)),
        lambda: x.t().sum(-1),
        lambda: i.sum(-1),
        lambda: i.sum(),
        lambda: x.mean(0, keepdim=True),
        lambda: i.amax(-1),
        lambda: x.amax(0),
        lambda: x.max(0),
        lambda: i.max(-1),
        lambda: torch.softmax(x, 0),
        lambda: torch.log_softmax(x.double(), -1),
        lambda: x.t().softmax(-1),
        lambda: (i > 0).all(0),
    ]
    expected = [f() for f in cases]
    path = tmp_path / "ops.log"
    with flag_gems.use_gems(include=OUR_NAMES, record=True, path=str(path)):
        got = [f() for f in cases]
    for k, (out, ref) in enumerate(zip(got, expected)):
        if isinstance(ref, tuple):
            assert all(torch.equal(a, b) for a, b in zip(out, ref)), f"[case {k}]"
        else:
            assert torch.equal(out, ref), f"[case {k}]"
    assert "GEMS" not in _log_lines(path), _log_lines(path)


def test_entries_run_under_use_gems(device, tmp_path):
    x = rand(4, 9, device=device)
    path = tmp_path / "ops.log"
    with flag_gems.use_gems(include=OUR_NAMES, record=True, path=str(path)):
        active = set(flag_gems.all_registered_ops())
        outs = [x.sum(-1), x.sum(), x.mean(-1), x.amax(-1), x.max(-1)[0], (x > 0).all(), (x > 0).all(-1),
                torch.softmax(x, -1), torch.log_softmax(x, -1)]
    refs = [x.sum(-1), x.sum(), x.mean(-1), x.amax(-1), x.max(-1)[0], (x > 0).all(), (x > 0).all(-1),
            torch.softmax(x, -1), torch.log_softmax(x, -1)]
    for out, ref in zip(outs, refs):
        if ref.dtype == torch.bool:
            assert torch.equal(out, ref)
        else:
            assert_close(out, ref, torch.float32, tag("use_gems", x.shape, torch.float32))
    assert {str(t).removeprefix("aten.").replace(".default", "") for t in lr.TARGETS} <= active, active
    log = _log_lines(path)
    for name in ("SUM_DIM_INTLIST", "GEMS SUM\n", "MEAN_DIM", "AMAX", "MAX_DIM", "GEMS ALL\n", "ALL_DIM",
                 "GEMS _SOFTMAX\n", "GEMS _LOG_SOFTMAX\n"):
        assert name in log, f"{name!r} not in the record log:\n{log}"


def test_training_step_under_use_gems_matches_eager(device, tmp_path):
    """Attention-like softmax + a log_softmax loss: forward and backward through our entries."""
    torch.manual_seed(0)
    q = rand(2, 7, 12, device=device, requires_grad=True)
    w = rand(12, 10, device=device, scale=0.3, requires_grad=True)
    target = torch.randint(0, 10, (2, 7), device=device)

    def step(q, w):
        scores = q @ q.transpose(-1, -2) / 3.0
        p = torch.softmax(scores, -1)
        h = p @ q
        logp = torch.log_softmax(h @ w, -1)
        loss = torch.nn.functional.nll_loss(logp.reshape(-1, 10), target.reshape(-1))
        loss.backward()
        return loss.detach()

    q2, w2 = q.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    path = tmp_path / "ops.log"
    with flag_gems.use_gems(include=OUR_NAMES, record=True, path=str(path)):
        loss = step(q, w)
    ref_loss = step(q2, w2)
    dtype = torch.float32
    assert_close(loss, ref_loss, dtype, tag("train loss", (), dtype))
    assert_close(q.grad, q2.grad, dtype, tag("train q.grad", q.shape, dtype), grad=True)
    assert_close(w.grad, w2.grad, dtype, tag("train w.grad", w.shape, dtype), grad=True)
    log = _log_lines(path)
    for name in ("_SOFTMAX\n", "_LOG_SOFTMAX\n", "_SOFTMAX_BACKWARD_DATA", "_LOG_SOFTMAX_BACKWARD_DATA"):
        assert f"GEMS {name}" in log, f"{name!r} not in the record log:\n{log}"


def _fake_cases(mode):
    def t(*shape, dtype=torch.float32):
        return mode.from_tensor(torch.empty(shape, dtype=dtype))

    x = t(3, 5)
    return {
        aten.sum.dim_IntList: ((x, [-1]), {"dtype": torch.float32}),
        aten.sum.default: ((x,), {}),
        aten.mean.dim: ((x, [-1], True), {}),
        aten.amax.default: ((x, [-1]), {}),
        aten.max.dim: ((x, -1), {}),
        aten.all.default: ((t(3, 5, dtype=torch.bool),), {}),
        aten.all.dim: ((t(3, 5, dtype=torch.bool), -1), {}),
        aten._softmax.default: ((x, -1, False), {}),
        aten._log_softmax.default: ((x, -1, False), {}),
        aten._softmax_backward_data.default: ((x, x, -1, torch.float32), {}),
        aten._log_softmax_backward_data.default: ((x, x, -1, torch.float32), {}),
    }


def test_supports_on_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode, torch.device(DEVICE):
        cases = _fake_cases(mode)
        assert set(cases) == set(lr.TARGETS)
        for target, (args, kwargs) in cases.items():
            assert REGISTRY[target].supports(*args, **kwargs) is None, f"[op={target}]"
        x = mode.from_tensor(torch.empty(3, 5))
        assert "last dim" in REGISTRY[aten.sum.dim_IntList].supports(x, [0])
        assert "dtype" in REGISTRY[aten._softmax.default].supports(x.long(), -1, False)


def test_registry_entries_match_schemas():
    for target in lr.TARGETS:
        entry = REGISTRY[target]
        assert target not in FALLBACKS
        assert entry.eager.on and (entry.data or not (entry.fast.on or entry.graph.on)), target


def test_launcher_errors(device):
    x = rand(3, 4, device=device)
    with pytest.raises(ValueError, match="contiguous"):
        kr.row_sum(x.t(), 3)
    with pytest.raises(ValueError, match="rows of 5"):
        kr.row_sum(x, 5)
    with pytest.raises(TypeError, match="dtype"):
        kr.row_sum(x.long(), 4)
    with pytest.raises(ValueError, match="positive row length"):
        kr.row_max(x[:, :0].contiguous(), 0)
    with pytest.raises(ValueError, match="grad"):
        kr.softmax_bwd(x[:, :3].contiguous(), x)


# ------------------------------------------------------------------ GPU (large shapes)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gpu_large_shapes(dtype):
    for shape in [(4096, 4096), (8, 151936), (1, 1 << 24), (65536, 7)]:
        x = torch.randn(shape, device="cuda", dtype=dtype)
        close_nan(run(aten.sum.dim_IntList, x, [-1]), ref64(x).sum(-1), dtype, tag("sum", shape, dtype))
        close_nan(run(aten.sum.default, x), ref64(x).sum(), dtype, tag("sum all", shape, dtype))
        v, i = run(aten.max.dim, x, -1)
        rv, ri = x.max(-1)
        assert torch.equal(v, rv) and torch.equal(i, ri), tag("max", shape, dtype)
        close_nan(run(aten._softmax.default, x, -1, False), torch.softmax(ref64(x), -1), dtype, tag("softmax", shape, dtype))
