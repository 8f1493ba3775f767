"""SiLU·mul and GELU·mul (two-tensor and one-tensor forms): kernels, ops, public functions."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import flag_gems
from flag_gems.kernels import act_and_mul as kern
from flag_gems.kernels._common import cdiv, next_pow2
from accuracy import DTYPES, DTYPE_IDS, OPCHECK_UTILS, OPCHECK_UTILS_MUTABLE, assert_close, poison, rand, ref64, tag

# Utils that apply to an op that mutates ``out`` and has no autograd formula.

# Tokens x d: 1, primes, non-powers of two, 3-D, 0 tokens, a row cut into column blocks.
SHAPES = [(1, 1), (3, 7), (2, 5, 129), (0, 8), (3, 2500)]
# (activation, approximate)
ACTS = [("silu", "none"), ("gelu", "none"), ("gelu", "tanh")]
ACT_IDS = ["silu", "gelu", "gelu_tanh"]


def ref_act_and_mul(a, b, act, approximate="none"):
    """float64 reference ``act(a) * b`` (differentiable when a/b are float64 leaves)."""
    a = a if a.dtype == torch.float64 else ref64(a)
    b = b if b.dtype == torch.float64 else ref64(b)
    if act == "silu":
        return a * torch.sigmoid(a) * b
    return F.gelu(a, approximate=approximate) * b


def ref_fused(x, act, approximate="none"):
    d = x.shape[-1] // 2
    return ref_act_and_mul(x[..., :d], x[..., d:], act, approximate)


def public_two(a, b, act, approximate):
    if act == "silu":
        return flag_gems.silu_and_mul(a, b)
    return flag_gems.gelu_and_mul(a, b, approximate)


def public_fused(x, act, approximate):
    if act == "silu":
        return flag_gems.silu_and_mul_fused(x)
    return flag_gems.gelu_and_mul_fused(x, approximate)


def op_two(a, b, act, approximate):
    if act == "silu":
        return torch.ops.flag_gems.silu_and_mul(a, b)
    return torch.ops.flag_gems.gelu_and_mul(a, b, approximate)


def op_fused(x, act, approximate):
    if act == "silu":
        return torch.ops.flag_gems.silu_and_mul_fused(x)
    return torch.ops.flag_gems.gelu_and_mul_fused(x, approximate)


def name(act, approximate, fused=False):
    n = f"{act}_and_mul" + ("_fused" if fused else "")
    return n + ("[tanh]" if approximate == "tanh" else "")


# ------------------------------------------------------------------ forward


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_two_tensor(shape, act, dtype, device):
    a = rand(*shape, dtype=dtype, device=device, scale=2.0)
    b = rand(*shape, dtype=dtype, device=device)
    ref = ref_act_and_mul(a, b, *act)
    what = tag(name(*act), shape, dtype)
    for fn in (public_two, op_two):
        out = fn(a, b, *act)
        assert out.dtype == dtype and out.shape == a.shape and out.is_contiguous(), what
        assert_close(out, ref, dtype, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_fused(shape, act, dtype, device):
    x = rand(*shape[:-1], 2 * shape[-1], dtype=dtype, device=device, scale=2.0)
    ref = ref_fused(x, *act)
    what = tag(name(*act, fused=True), x.shape, dtype)
    for fn in (public_fused, op_fused):
        out = fn(x, *act)
        assert out.dtype == dtype and tuple(out.shape) == shape, what
        assert_close(out, ref, dtype, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_forward_writes_every_element(act, dtype, device):
    """Poisoned out= tensors, both forms, through the launchers."""
    shape = (5, 3, 67)
    a, b = rand(*shape, dtype=dtype, device=device), rand(*shape, dtype=dtype, device=device)
    out = poison(torch.empty(shape, dtype=dtype, device=device))
    assert kern.act_and_mul_fwd(a, b, *act, out=out) is out
    assert_close(out, ref_act_and_mul(a, b, *act), dtype, tag(name(*act) + "[out=]", shape, dtype))
    x = rand(*shape[:-1], 2 * shape[-1], dtype=dtype, device=device)
    out = poison(torch.empty(shape, dtype=dtype, device=device))
    assert kern.act_and_mul_fused_fwd(x, *act, out=out) is out
    assert_close(out, ref_fused(x, *act), dtype, tag(name(*act, True) + "[out=]", x.shape, dtype))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # interpreter's numpy exp -> inf
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_extreme_values(act, device):
    """Large |a|: no overflow to NaN/inf in the activation (e.g. exp in sigmoid / tanh form)."""
    a = torch.tensor([[-200.0, -90.0, -30.0, -8.0, -1e-4, 0.0, 1e-4, 8.0, 30.0, 90.0, 200.0]], device=device)
    b = torch.full_like(a, 1.5)
    out = kern.act_and_mul_fwd(a, b, *act)
    assert torch.isfinite(out).all(), tag(name(*act), a.shape, a.dtype)
    assert_close(out, ref_act_and_mul(a, b, *act), torch.float32, tag(name(*act) + "[extreme]", a.shape, a.dtype))
    g = torch.ones_like(a)
    da, db = kern.act_and_mul_bwd(g, a, b, *act)
    a64, b64 = ref64(a).requires_grad_(), ref64(b).requires_grad_()
    ref_act_and_mul(a64, b64, *act).backward(ref64(g))
    assert torch.isfinite(da).all() and torch.isfinite(db).all(), tag(name(*act) + ".bwd", a.shape, a.dtype)
    assert_close(da, a64.grad, torch.float32, tag(name(*act) + "[extreme].da", a.shape, a.dtype), grad=True)
    assert_close(db, b64.grad, torch.float32, tag(name(*act) + "[extreme].db", a.shape, a.dtype), grad=True)


def _layouts(kind, d, dtype, device):
    """(a, b) pairs of shape [3, 5, d] with non-contiguous token dims."""
    if kind == "transposed_tokens":
        return (rand(5, 3, d, dtype=dtype, device=device).transpose(0, 1),
                rand(5, 3, d, dtype=dtype, device=device).transpose(0, 1))
    if kind == "sliced_rows":
        return rand(3, 10, d, dtype=dtype, device=device)[:, ::2], rand(3, 5, d, dtype=dtype, device=device)
    if kind == "chunk_of_2d":  # gate, up = proj(x).chunk(2, -1): row stride 2d, each its own
        return rand(3, 5, 2 * d, dtype=dtype, device=device).chunk(2, dim=-1)
    if kind == "last_dim_strided":
        return rand(3, 5, 2 * d, dtype=dtype, device=device)[..., ::2], rand(3, 5, d, dtype=dtype, device=device)
    if kind == "three_token_groups":  # does not fold into [outer, inner]: copied
        a = rand(4, 6, 6, d, dtype=dtype, device=device)[::2, ::2, ::2]
        assert kern._layout(a.shape[:-1], [a]) is None
        return a, rand(2, 3, 3, d, dtype=dtype, device=device)
    raise AssertionError(kind)


LAYOUTS = ["transposed_tokens", "sliced_rows", "chunk_of_2d", "last_dim_strided", "three_token_groups"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_tensor_layouts(layout, dtype, device):
    a, b = _layouts(layout, 40, dtype, device)
    out = flag_gems.silu_and_mul(a, b)
    assert_close(out, ref_act_and_mul(a, b, "silu"), dtype, tag(f"silu_and_mul[{layout}]", a.shape, dtype))
    out = flag_gems.gelu_and_mul(b, a, "tanh")  # a as the multiplier too
    assert_close(out, ref_act_and_mul(b, a, "gelu", "tanh"), dtype, tag(f"gelu_and_mul[{layout}]", a.shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["transposed_tokens", "sliced_rows", "last_dim_strided", "three_token_groups"])
def test_fused_layouts(layout, dtype, device):
    d = 24
    if layout == "transposed_tokens":
        x = rand(5, 3, 2 * d, dtype=dtype, device=device).transpose(0, 1)
    elif layout == "sliced_rows":
        x = rand(3, 10, 2 * d, dtype=dtype, device=device)[:, 1::2]
    elif layout == "last_dim_strided":
        x = rand(3, 5, 4 * d, dtype=dtype, device=device)[..., ::2]
    else:
        x = rand(4, 6, 6, 2 * d, dtype=dtype, device=device)[::2, ::2, ::2]
    out = flag_gems.silu_and_mul_fused(x)
    assert_close(out, ref_fused(x, "silu"), dtype, tag(f"silu_and_mul_fused[{layout}]", x.shape, dtype))
    out = flag_gems.gelu_and_mul_fused(x)
    assert_close(out, ref_fused(x, "gelu"), dtype, tag(f"gelu_and_mul_fused[{layout}]", x.shape, dtype))


# ------------------------------------------------------------------ out= op (vLLM)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("out_layout", ["contiguous", "sliced_cols", "three_token_groups"])
def test_silu_and_mul_out_op(out_layout, dtype, device):
    d = 33
    x = rand(2, 3, 3, 2 * d, dtype=dtype, device=device)
    if out_layout == "contiguous":
        out = torch.empty(2, 3, 3, d, dtype=dtype, device=device)
    elif out_layout == "sliced_cols":  # rows of a wider buffer
        out = torch.empty(2, 3, 3, 2 * d + 5, dtype=dtype, device=device)[..., 3:3 + d]
    else:
        out = torch.empty(4, 6, 6, d, dtype=dtype, device=device)[::2, ::2, ::2]
        assert kern._layout(out.shape[:-1], [out]) is None
    poison(out)
    res = torch.ops.flag_gems.silu_and_mul_out(out, x)
    assert res is None
    assert_close(out, ref_fused(x, "silu"), dtype, tag(f"silu_and_mul_out[{out_layout}]", x.shape, dtype))


# ------------------------------------------------------------------ backward


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 3, 130), (0, 8), (2, 2500)], ids=str)
def test_backward_two_tensor(shape, act, dtype, device):
    a = rand(*shape, dtype=dtype, device=device, scale=2.0, requires_grad=True)
    b = rand(*shape, dtype=dtype, device=device, requires_grad=True)
    g = rand(*shape, dtype=dtype, device=device)
    public_two(a, b, *act).backward(g)
    a64, b64 = ref64(a).requires_grad_(), ref64(b).requires_grad_()
    ref_act_and_mul(a64, b64, *act).backward(ref64(g))
    assert_close(a.grad, a64.grad, dtype, tag(name(*act) + ".da", shape, dtype), grad=True)
    assert_close(b.grad, b64.grad, dtype, tag(name(*act) + ".db", shape, dtype), grad=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 3, 130), (0, 8), (2, 2500)], ids=str)
def test_backward_fused(shape, act, dtype, device):
    x = rand(*shape[:-1], 2 * shape[-1], dtype=dtype, device=device, scale=2.0, requires_grad=True)
    g = rand(*shape, dtype=dtype, device=device)
    public_fused(x, *act).backward(g)
    x64 = ref64(x).requires_grad_()
    ref_fused(x64, *act).backward(ref64(g))
    assert_close(x.grad, x64.grad, dtype, tag(name(*act, True) + ".dx", x.shape, dtype), grad=True)


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_backward_strided_inputs_and_grad(act, device):
    """Chunked a/b (row stride 2d), a transposed-token x, and an expanded (stride-0) grad."""
    dtype = torch.float32
    base = rand(4, 3, 2 * 19, dtype=dtype, device=device, requires_grad=True)
    a, b = base.chunk(2, dim=-1)
    public_two(a, b, *act).sum().backward()
    b64 = ref64(base).requires_grad_()
    ref_act_and_mul(*b64.chunk(2, dim=-1), *act).sum().backward()
    assert_close(base.grad, b64.grad, dtype, tag(name(*act) + "[chunk].dx", base.shape, dtype), grad=True)

    leaf = rand(5, 4, 2 * 19, dtype=dtype, device=device, requires_grad=True)
    x = leaf.transpose(0, 1)
    g = rand(5, 4, 19, dtype=dtype, device=device).transpose(0, 1)
    public_fused(x, *act).backward(g)
    l64 = ref64(leaf).requires_grad_()
    ref_fused(l64.transpose(0, 1), *act).backward(ref64(g))
    assert_close(leaf.grad, l64.grad, dtype, tag(name(*act, True) + "[transposed].dx", x.shape, dtype), grad=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_backward_launchers_write_every_element(act, dtype, device):
    """The backward launchers on odd shapes (every gradient element is compared; outputs are new)."""
    shape = (3, 2, 45)
    a, b, g = (rand(*shape, dtype=dtype, device=device) for _ in range(3))
    da, db = kern.act_and_mul_bwd(g, a, b, *act)
    a64, b64 = ref64(a).requires_grad_(), ref64(b).requires_grad_()
    ref_act_and_mul(a64, b64, *act).backward(ref64(g))
    assert_close(da, a64.grad, dtype, tag(name(*act) + ".bwd.da", shape, dtype), grad=True)
    assert_close(db, b64.grad, dtype, tag(name(*act) + ".bwd.db", shape, dtype), grad=True)
    x = rand(*shape[:-1], 2 * shape[-1], dtype=dtype, device=device)
    dx = kern.act_and_mul_fused_bwd(g, x, *act)
    x64 = ref64(x).requires_grad_()
    ref_fused(x64, *act).backward(ref64(g))
    assert_close(dx, x64.grad, dtype, tag(name(*act, True) + ".bwd.dx", x.shape, dtype), grad=True)


# ------------------------------------------------------------------ ops, compile


def _opcheck_cases(device):
    """(op name, args, utils) for every op: a few argument sets each, one non-contiguous."""

    def t(*s, rg=False):
        return rand(*s, device=device, requires_grad=rg)

    pairs = [(t(3, 8), t(3, 8)), (t(2, 3, 5, rg=True), t(2, 3, 5, rg=True)), (t(1, 1, rg=True), t(1, 1))]
    xs = [t(3, 8), t(2, 3, 10, rg=True), t(4, 2, rg=True)]
    strided = t(6, 3, 16)[::2].transpose(0, 1)
    return {
        "silu_and_mul": [(p, OPCHECK_UTILS) for p in pairs] + [(tuple(strided.chunk(2, -1)), OPCHECK_UTILS)],
        "gelu_and_mul": [(p, OPCHECK_UTILS) for p in pairs] + [((*pairs[1], "tanh"), OPCHECK_UTILS)],
        "silu_and_mul_fused": [((x,), OPCHECK_UTILS) for x in xs] + [((strided,), OPCHECK_UTILS)],
        "gelu_and_mul_fused": [((x,), OPCHECK_UTILS) for x in xs] + [((xs[1], "tanh"), OPCHECK_UTILS)],
        "silu_and_mul_out": [
            ((torch.empty(3, 4, device=device), t(3, 8)), OPCHECK_UTILS_MUTABLE),
            ((torch.empty(2, 3, 5, device=device), t(2, 3, 10)), OPCHECK_UTILS_MUTABLE),
        ],
        # Backward ops have no double backward: their inputs do not require grad.
        "silu_and_mul_backward": [((t(3, 8), t(3, 8), t(3, 8)), OPCHECK_UTILS)],
        "gelu_and_mul_backward": [((t(3, 8), t(3, 8), t(3, 8), "tanh"), OPCHECK_UTILS)],
        "silu_and_mul_fused_backward": [((t(2, 3, 4), t(2, 3, 8)), OPCHECK_UTILS)],
        "gelu_and_mul_fused_backward": [((t(2, 3, 4), t(2, 3, 8), "none"), OPCHECK_UTILS)],
    }


OPS = [
    "silu_and_mul", "gelu_and_mul", "silu_and_mul_fused", "gelu_and_mul_fused", "silu_and_mul_out",
    "silu_and_mul_backward", "gelu_and_mul_backward", "silu_and_mul_fused_backward", "gelu_and_mul_fused_backward",
]


@pytest.mark.parametrize("op_name", OPS)
def test_opcheck(op_name, device):
    op = getattr(torch.ops.flag_gems, op_name).default
    for args, utils in _opcheck_cases(device)[op_name]:
        opcheck(op, args, test_utils=utils)


def test_schemas():
    fg = torch.ops.flag_gems
    assert str(fg.silu_and_mul.default._schema) == "flag_gems::silu_and_mul(Tensor a, Tensor b) -> Tensor"
    assert str(fg.gelu_and_mul.default._schema) == (
        'flag_gems::gelu_and_mul(Tensor a, Tensor b, str approximate="none") -> Tensor'
    )
    assert str(fg.silu_and_mul_fused.default._schema) == "flag_gems::silu_and_mul_fused(Tensor x) -> Tensor"
    mut = fg.silu_and_mul_out.default._schema
    assert [a.name for a in mut.arguments] == ["out", "x"] and mut.arguments[0].alias_info.is_write
    assert len(mut.returns) == 0


def test_compiles_without_graph_breaks(device):
    def mlp(x, g):
        gate, up = x.chunk(2, dim=-1)
        return flag_gems.silu_and_mul(gate, up) + flag_gems.gelu_and_mul_fused(g, "tanh")

    x = rand(4, 32, device=device, requires_grad=True)
    g = rand(4, 32, device=device, requires_grad=True)
    compiled = torch.compile(mlp, backend="aot_eager", fullgraph=True)
    out = compiled(x, g)
    torch.testing.assert_close(out, mlp(x, g))
    out.sum().backward()
    x64, g64 = ref64(x).requires_grad_(), ref64(g).requires_grad_()
    (ref_act_and_mul(*x64.chunk(2, -1), "silu") + ref_fused(g64, "gelu", "tanh")).sum().backward()
    fp32 = torch.float32
    assert_close(x.grad, x64.grad, fp32, tag("silu_and_mul[compiled].dx", x.shape, fp32), grad=True)
    assert_close(g.grad, g64.grad, fp32, tag("gelu_and_mul_fused[compiled].dx", g.shape, fp32), grad=True)


def test_exported_names():
    for n in ("silu_and_mul", "gelu_and_mul", "silu_and_mul_fused", "gelu_and_mul_fused"):
        assert n in flag_gems.lowerings.act_and_mul.__all__


def test_launch_config_properties():
    """What the tile heuristic promises (not the tiles it picks today): power-of-two tiles within the
    tile cap and no wider than the row, rows batched only for short rows, full tiles once the rows
    alone fill the GPU, a decode launch cut into enough programs, more rows never a smaller tile."""
    cfg, tile, min_tile, many = kern._launch_config, kern._TILE, kern._MIN_TILE, kern._MANY_ROWS
    sms = 132  # an H100's SMs
    for eb in (2, 4):
        for d in (1, 7, 64, 129, 4096, 14336, 20000):
            row = next_pow2(d)
            last = 0
            for rows in (1, 2, 8, 64, 512, many, 1 << 16):  # rows_bucket: powers of two
                bm, bn, w = cfg(rows, d, eb, sms)
                what = f"[act_and_mul launch rows={rows} d={d} elem_bytes={eb}] ({bm}, {bn}, {w})"
                assert bm >= 1 and bn >= 1 and bm & (bm - 1) == 0 and bn & (bn - 1) == 0, what
                assert bm * bn <= tile and bn <= row and bm <= rows, what
                assert 1 <= w <= 16 and w & (w - 1) == 0, what
                if row >= tile:
                    assert bm == 1, what  # a long row is cut into column blocks, never batched
                programs = cdiv(rows, bm) * cdiv(d, bn)
                assert programs >= 2 * sms or bm * bn <= min_tile, what  # the GPU is filled, or tiles are minimal
                if rows * row >= 2 * sms * tile:
                    assert bm * bn == min(tile, rows * row), what  # enough rows: no shrinking
                assert bm * bn >= last, what  # more rows never give a smaller tile
                last = bm * bn
    bm, bn, _ = cfg(1, 14336, 2, sms)
    assert cdiv(14336, bn) >= 2 * sms or bm * bn == min_tile  # decode: one row still spreads over the GPU


# ------------------------------------------------------------------ bad input, empty


def test_empty_tokens(device):
    for dtype in DTYPES:
        a = rand(0, 16, dtype=dtype, device=device)
        assert flag_gems.silu_and_mul(a, a).shape == (0, 16)
        assert flag_gems.gelu_and_mul(a, a, "tanh").shape == (0, 16)
        x = rand(2, 0, 32, dtype=dtype, device=device)
        assert flag_gems.silu_and_mul_fused(x).shape == (2, 0, 16)
        assert flag_gems.gelu_and_mul_fused(x).shape == (2, 0, 16)
        torch.ops.flag_gems.silu_and_mul_out(torch.empty(2, 0, 16, dtype=dtype, device=device), x)
    xg = rand(0, 32, device=device, requires_grad=True)
    flag_gems.silu_and_mul_fused(xg).sum().backward()
    assert xg.grad.shape == (0, 32)
    assert flag_gems.silu_and_mul_fused(rand(3, 0, device=device)).shape == (3, 0)


def _esc(s):
    return s.replace("[", r"\[").replace("]", r"\]")


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda d: flag_gems.silu_and_mul(torch.ones(3, 8, dtype=torch.int32, device=d),
                                          torch.ones(3, 8, dtype=torch.int32, device=d)), TypeError, "a: dtype int32"),
        (lambda d: flag_gems.silu_and_mul(torch.randn(3, 8, dtype=torch.float64, device=d),
                                          torch.randn(3, 8, dtype=torch.float64, device=d)),
         TypeError, "a: dtype float64"),
        (lambda d: flag_gems.gelu_and_mul(torch.randn(3, 8, device=d), torch.randn(3, 9, device=d)),
         ValueError, "b: expected shape [3, 8]"),
        (lambda d: flag_gems.silu_and_mul(torch.randn(3, 8, device=d), torch.randn(8, device=d)),
         ValueError, "broadcasting is not supported"),
        (lambda d: flag_gems.silu_and_mul(torch.randn(3, 8, device=d), torch.randn(3, 8, device=d).half()),
         TypeError, "b: expected dtype torch.float32"),
        (lambda d: kern.act_and_mul_fwd(torch.randn(3, 8, device=d), "b"), TypeError, "b: expected a torch.Tensor"),
        (lambda d: flag_gems.silu_and_mul(torch.tensor(1.0, device=d), torch.tensor(1.0, device=d)),
         ValueError, "a: expected at least 1 dimension"),
        (lambda d: flag_gems.gelu_and_mul(torch.randn(3, 8, device=d), torch.randn(3, 8, device=d), "erf"),
         ValueError, "approximate: expected 'none' or 'tanh'"),
        (lambda d: flag_gems.gelu_and_mul_fused(torch.randn(3, 8, device=d), "fast"),
         ValueError, "approximate: expected 'none' or 'tanh'"),
        (lambda d: torch.ops.flag_gems.gelu_and_mul(torch.randn(3, 8, device=d), torch.randn(3, 8, device=d), "x"),
         ValueError, "approximate"),
        (lambda d: flag_gems.silu_and_mul_fused(torch.randn(3, 7, device=d)), ValueError, "must be even"),
        (lambda d: torch.ops.flag_gems.gelu_and_mul_fused(torch.randn(3, 9, device=d)), ValueError, "must be even"),
        (lambda d: flag_gems.silu_and_mul_fused(torch.randn(3, 8, dtype=torch.float64, device=d)),
         TypeError, "x: dtype float64"),
        (lambda d: flag_gems.silu_and_mul_fused(torch.ones(3, 8, dtype=torch.int64, device=d)),
         TypeError, "x: dtype int64"),
        (lambda d: torch.ops.flag_gems.silu_and_mul_out(torch.empty(3, 8, device=d), torch.randn(3, 8, device=d)),
         ValueError, "out: expected shape [3, 4]"),
        (lambda d: torch.ops.flag_gems.silu_and_mul_out(torch.empty(3, 4, device=d).half(),
                                                        torch.randn(3, 8, device=d)),
         TypeError, "out: expected dtype torch.float32"),
        (lambda d: kern.act_and_mul_fwd(torch.randn(3, 8, device=d), torch.randn(3, 8, device=d), "relu"),
         ValueError, "activation: expected 'silu' or 'gelu'"),
        (lambda d: kern.act_and_mul_bwd(torch.randn(3, 4, device=d), torch.randn(3, 8, device=d),
                                        torch.randn(3, 8, device=d)), ValueError, "grad_out: expected shape [3, 8]"),
    ],
    ids=["int_a", "fp64_a", "shape_mismatch", "no_broadcast", "dtype_mismatch", "not_tensor", "zero_dim",
         "approximate_public", "approximate_fused", "approximate_op", "odd_last_dim", "odd_last_dim_op", "fp64_x",
         "int_x", "out_shape", "out_dtype", "unknown_activation", "grad_shape"],
)
def test_bad_input(call, exc, words, device):
    with pytest.raises(exc, match=_esc(words)):
        call(device)


def test_bad_input_under_fake_tensors(device):
    """The fake implementations reject what the kernels reject (errors at trace time)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a = torch.empty(3, 8, device=device)
        with pytest.raises(ValueError, match="broadcasting"):
            torch.ops.flag_gems.silu_and_mul(a, torch.empty(3, 9, device=device))
        with pytest.raises(ValueError, match="must be even"):
            torch.ops.flag_gems.silu_and_mul_fused(torch.empty(3, 7, device=device))
        with pytest.raises(ValueError, match="approximate"):
            torch.ops.flag_gems.gelu_and_mul(a, a, "bad")
        assert torch.ops.flag_gems.gelu_and_mul_fused(a, "tanh").shape == (3, 4)


def test_cpu_tensor_outside_interpreter_is_a_clear_error(monkeypatch):
    import flag_gems.kernels._common as common

    monkeypatch.setattr(common, "interpreter_mode", lambda: False)
    a = torch.randn(2, 8)
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET=1"):
        kern.act_and_mul_fwd(a, a, "silu")
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET=1"):
        kern.act_and_mul_fused_fwd(a, "gelu")
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET=1"):
        torch.ops.flag_gems.silu_and_mul(a, a)
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET=1"):
        flag_gems.silu_and_mul_fused(a)


# ------------------------------------------------------------------ GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 4096])
def test_gpu_llama_mlp_shape(m):
    """SiLU·mul at d=14336 bf16 (Llama-3-8B's MLP), both forms, forward and backward."""
    dtype, d = torch.bfloat16, 14336
    x = rand(m, 2 * d, dtype=dtype, device="cuda", requires_grad=True)
    out = flag_gems.silu_and_mul_fused(x)
    assert_close(out, ref_fused(x, "silu"), dtype, tag("silu_and_mul_fused", x.shape, dtype))
    gate, up = x.detach().chunk(2, -1)
    out2 = flag_gems.silu_and_mul(gate, up)
    torch.testing.assert_close(out2, out, atol=0, rtol=0)
    g = rand(m, d, dtype=dtype, device="cuda")
    out.backward(g)
    x64 = ref64(x).requires_grad_()
    ref_fused(x64, "silu").backward(ref64(g))
    assert_close(x.grad, x64.grad, dtype, tag("silu_and_mul_fused.dx", x.shape, dtype), grad=True)
    res = torch.empty(m, d, dtype=dtype, device="cuda")
    torch.ops.flag_gems.silu_and_mul_out(res, x.detach())
    torch.testing.assert_close(res, out, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gpu_gelu_and_mul_large(approximate):
    dtype = torch.bfloat16
    a = rand(4096, 14336, dtype=dtype, device="cuda")
    b = rand(4096, 14336, dtype=dtype, device="cuda")
    out = flag_gems.gelu_and_mul(a, b, approximate)
    assert_close(out, ref_act_and_mul(a, b, "gelu", approximate), dtype, tag("gelu_and_mul", a.shape, dtype))


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_int64_offsets():
    """More than 2^31 elements in x: offsets must be computed in int64."""
    d = 8192
    rows = (2**31) // (2 * d) + 3
    x = torch.randn(rows, 2 * d, dtype=torch.bfloat16, device="cuda")
    out = flag_gems.silu_and_mul_fused(x)
    tail = slice(rows - 3, rows)
    bf16 = torch.bfloat16
    assert_close(out[tail], ref_fused(x[tail], "silu"), bf16, tag("silu_and_mul_fused[int64]", x.shape, bf16))
