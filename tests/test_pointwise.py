"""Pointwise generator (kernels/pointwise.py) and its registry entries (lowerings/pointwise.py).

Every registered aten overload against plain torch: float ops in fp32/fp16/bf16 (float64
reference) and fp64, integer and bool ops exactly; broadcast, transposed, sliced, expanded,
0-d, empty and scalar operands; torch's type promotion and output layout; NaN/Inf; in-place
and out= forms with aliasing; the kernel cache; supports() on fake and symbolic tensors;
PyTorch's OpInfo samples.
"""


import pytest
import torch

import flag_gems  # noqa: F401
from accuracy import DEVICE, DTYPE_IDS, DTYPES, assert_close, aten_calls, opinfo_samples, poison, rand, reason, run, tag
from flag_gems.kernels import pointwise as pw
from flag_gems.lowerings import pointwise as lp
from flag_gems.lowerings.registry import FALLBACKS, REGISTRY

aten = torch.ops.aten
NAN, INF = float("nan"), float("inf")
INT_DTYPES = [torch.int32, torch.int64, torch.int8, torch.uint8]



def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """A view of ``x``'s values with the given layout (same shape as ``x`` for 2-D inputs)."""
    if kind == "contiguous":
        return x
    if kind == "transposed":
        return x.t().contiguous().t()
    if kind == "sliced":
        wide = torch.empty(x.shape[0], 2 * x.shape[1], dtype=x.dtype, device=x.device)
        wide[:, ::2] = x
        return wide[:, ::2]
    if kind == "expanded":
        return x[:1].expand_as(x)
    raise ValueError(kind)


def close(out, ref, what):
    """Exact for integers/bools, dtype tolerance for floats (fp64: torch's defaults); NaNs must match."""
    assert out.dtype == ref.dtype, f"{what} dtype {out.dtype} != torch's {ref.dtype}"
    assert out.shape == ref.shape, f"{what} shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if not ref.dtype.is_floating_point:
        assert torch.equal(out.cpu(), ref.cpu()), f"{what} {out} != {ref}"
    elif ref.dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert torch.equal(out.isnan().cpu(), ref.isnan().cpu()), f"{what} NaN positions differ: {out} vs {ref}"
        assert_close(torch.nan_to_num(out.double()), torch.nan_to_num(ref.double()), ref.dtype, what)
    else:
        torch.testing.assert_close(out, ref, equal_nan=True, msg=lambda m: f"{what} {m}")


# ------------------------------------------------------------------ unary float ops

UNARY = {
    aten.neg.default: (torch.neg, "any"),
    aten.abs.default: (torch.abs, "any"),
    aten.exp.default: (torch.exp, "any"),
    aten.log.default: (torch.log, "positive"),
    aten.sqrt.default: (torch.sqrt, "positive"),
    aten.rsqrt.default: (torch.rsqrt, "positive"),
    aten.sin.default: (torch.sin, "any"),
    aten.cos.default: (torch.cos, "any"),
    aten.tanh.default: (torch.tanh, "any"),
    aten.sigmoid.default: (torch.sigmoid, "any"),
    aten.silu.default: (torch.nn.functional.silu, "any"),
    aten.gelu.default: (torch.nn.functional.gelu, "any"),
    aten.reciprocal.default: (torch.reciprocal, "positive"),
}
LAYOUTS = ["contiguous", "transposed", "sliced", "expanded"]


def unary_input(domain, *shape, dtype, device):
    x = rand(*shape, dtype=torch.float32, device=device) * 2
    if domain == "positive":
        x = x.abs() + 0.05
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("target", list(UNARY), ids=lambda t: str(t).removeprefix("aten."))
def test_unary_float(target, kind, dtype, device):
    fn, domain = UNARY[target]
    x = layout(unary_input(domain, 5, 7, dtype=dtype, device=device), kind)
    out = run(target, x)
    ref = fn(x.double()).to(dtype)
    assert out.stride() == fn(x).stride(), f"{tag(target, x.shape, dtype)} strides {out.stride()} != torch's {fn(x).stride()}"
    close(out, ref, tag(f"{target}[{kind}]", x.shape, dtype))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=DTYPE_IDS + ["fp64"])
def test_gelu_forms_and_fp64(approximate, dtype, device):
    x = rand(3, 11, dtype=dtype, device=device) * 3
    out = run(aten.gelu.default, x, approximate=approximate)
    close(out, torch.nn.functional.gelu(x.double(), approximate=approximate).to(dtype), tag(f"gelu[{approximate}]", x.shape, dtype))


@pytest.mark.parametrize("target", list(UNARY), ids=lambda t: str(t).removeprefix("aten."))
def test_unary_fp64_0d_and_empty(target, device):
    fn, domain = UNARY[target]
    for shape in [(), (0,), (4, 0, 3), (13,), (64, 64), (4500,)]:  # 0-d, empty, masked, full blocks
        x = unary_input(domain, *shape, dtype=torch.float64, device=device)
        close(run(target, x), fn(x), tag(target, shape, torch.float64))


def test_unary_int_and_bool_inputs(device):
    """Integer and bool inputs: exact results for neg/abs; INT_TO_FLOAT ops return float32."""
    for dtype in INT_DTYPES:
        x = torch.randint(0 if dtype is torch.uint8 else -9, 9, (4, 5), dtype=dtype, device=device)
        for target in (aten.neg.default, aten.abs.default):
            close(run(target, x), UNARY[target][0](x), tag(target, x.shape, dtype))
        for target in (aten.exp.default, aten.sin.default, aten.sigmoid.default, aten.reciprocal.default):
            close(run(target, x), UNARY[target][0](x), tag(target, x.shape, dtype))
    b = torch.rand(6, device=device) > 0.5
    close(run(aten.exp.default, b), torch.exp(b), tag("exp", b.shape, torch.bool))
    assert reason(aten.neg.default, b) is not None  # torch raises for bool negation
    assert reason(aten.silu.default, torch.ones(3, dtype=torch.int64, device=device)) is not None


# ------------------------------------------------------------------ binary ops

SHAPE_PAIRS = [
    ((10,), (10,)),
    ((2, 1, 3), (4, 1)),
    ((3, 8, 4), (3, 1, 4)),
    ((), (5, 3)),
    ((7, 1, 5, 1, 3), (1, 6, 1, 2, 3)),
    ((0, 3), (3,)),
    ((3, 1500), (1500,)),  # several programs: unmasked full blocks and a masked tail
]
BINARY = {
    aten.add.Tensor: torch.add,
    aten.sub.Tensor: torch.sub,
    aten.mul.Tensor: torch.mul,
    aten.div.Tensor: torch.div,
    aten.maximum.default: torch.maximum,
    aten.minimum.default: torch.minimum,
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shapes", SHAPE_PAIRS, ids=str)
@pytest.mark.parametrize("target", list(BINARY), ids=lambda t: str(t).removeprefix("aten."))
def test_binary_broadcast(target, shapes, dtype, device):
    a = rand(*shapes[0], dtype=dtype, device=device)
    b = rand(*shapes[1], dtype=dtype, device=device)
    out = run(target, a, b)
    close(out, BINARY[target](a.double(), b.double()).to(dtype), tag(target, out.shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_binary_scalar_operands(dtype, device):
    x = rand(4, 6, dtype=dtype, device=device)
    x64 = x.double()
    cases = [
        (aten.add.Scalar, (x, 0.75), x64 + 0.75),
        (aten.add.Tensor, (x, 3), x64 + 3),  # a Python number in a .Tensor overload (FX graphs)
        (aten.sub.Scalar, (x, -1.5), x64 + 1.5),
        (aten.mul.Scalar, (x, 3.0), x64 * 3.0),
        (aten.div.Scalar, (x, 3.0), x64 / 3.0),
        (aten.div.Tensor, (x, torch.tensor(-7.0)), x64 / -7.0),  # 0-d tensor of another dtype
        (aten.add.Tensor, (x, rand(6, dtype=dtype, device=device)[2]), None),  # 0-d view of the device
        (aten.add.Tensor, (x, rand(6, dtype=dtype, device=device)), None),
        (aten.add.Tensor, (x, rand(4, 6, dtype=dtype, device=device)), None),
    ]
    cases += [(aten.add.Tensor, (x, x), 2 * x64), (aten.add.Scalar, (x, 2, 3), x64 + 6), (aten.sub.Tensor, (x, x.t().t()), x64 * 0)]
    for target, args, ref in cases:
        out = run(target, *args)
        if ref is None:
            ref = args[0].double() + args[1].double()
        close(out, ref.to(out.dtype), tag(f"{target}{[type(a).__name__ for a in args]}", out.shape, dtype))


def test_alpha(device):
    x, y = rand(5, 3, device=device), rand(3, device=device)
    close(run(aten.add.Tensor, x, y, alpha=2.5), torch.add(x, y, alpha=2.5), tag("add[alpha]", x.shape, torch.float32))
    close(run(aten.sub.Tensor, x, y, alpha=-3), torch.sub(x, y, alpha=-3), tag("sub[alpha]", x.shape, torch.float32))
    close(run(aten.add.Scalar, x, 2.0, 0.5), torch.add(x, 2.0, alpha=0.5), tag("add.Scalar[alpha]", x.shape, torch.float32))
    i = torch.arange(6, device=device)
    close(run(aten.add.Tensor, i, i, alpha=3), torch.add(i, i, alpha=3), tag("add[alpha]", i.shape, torch.int64))
    assert "floating-point alpha" in reason(aten.add.Tensor, i, i, alpha=0.5)
    assert reason(aten.add.Tensor, x, y, alpha=True) is not None


@pytest.mark.parametrize("dtype", INT_DTYPES + [torch.bool], ids=str)
def test_integer_and_bool_ops_exact(dtype, device):
    lo = 0 if dtype in (torch.uint8, torch.bool) else -20
    a = torch.randint(lo, 20, (3, 5), device=device).to(dtype)
    b = torch.randint(lo, 20, (5,), device=device).to(dtype)
    targets = [aten.add.Tensor, aten.mul.Tensor, aten.maximum.default, aten.minimum.default, aten.div.Tensor]
    targets += [aten.sub.Tensor] if dtype is not torch.bool else []
    for target in targets:
        close(run(target, a, b), BINARY[target](a, b), tag(target, a.shape, dtype))
    for name in ("eq", "ne", "lt", "le", "gt", "ge"):
        fn = getattr(torch, name)
        close(run(getattr(aten, name).Tensor, a, b), fn(a, b), tag(name, a.shape, dtype))
        close(run(getattr(aten, name).Scalar, a, 3), fn(a, 3), tag(f"{name}.Scalar", a.shape, dtype))
    if dtype is torch.bool:
        assert reason(aten.sub.Tensor, a, b) is not None  # torch raises for bool subtraction


def test_integer_wraparound_and_scalar_ranges(device):
    a = torch.tensor([2**31 - 1, -(2**31), 7], dtype=torch.int32, device=device)
    close(run(aten.add.Scalar, a, 1), a + 1, tag("add[wrap]", a.shape, torch.int32))
    close(run(aten.mul.Tensor, a, a), a * a, tag("mul[wrap]", a.shape, torch.int32))
    assert "overflows" in reason(aten.eq.Scalar, a, 2**40)
    assert "64 bits" in reason(aten.add.Scalar, a, 2**70)


# ------------------------------------------------------------------ promotion and layout

PROMOTION = [
    (torch.float16, (4, 3), torch.float32, (3,)),
    (torch.bfloat16, (4, 3), torch.float32, ()),  # 0-d tensor: lower priority
    (torch.bfloat16, (4, 3), torch.float16, (4, 3)),
    (torch.int32, (4, 3), torch.float64, ()),  # 0-d of a higher category wins
    (torch.int64, (4, 3), torch.bool, (3,)),
    (torch.uint8, (4, 3), torch.int8, (4, 3)),
]


@pytest.mark.parametrize("case", PROMOTION, ids=str)
def test_type_promotion_matches_torch(case, device):
    da, sa, db, sb = case
    a = (rand(*sa, device=device) * 5).to(da)
    b = (rand(*sb, device=device) * 5).to(db)
    for target, fn in [(aten.add.Tensor, torch.add), (aten.div.Tensor, torch.div), (aten.lt.Tensor, torch.lt),
                       (aten.maximum.default, torch.maximum)]:
        close(run(target, a, b), fn(a, b), tag(f"{target}[{da}, {db}]", a.shape, da))
    for s in (2, 2.5, True):
        close(run(aten.mul.Tensor, a, s), a * s, tag(f"mul[{da}, {type(s).__name__}]", a.shape, da))


def test_output_layout_follows_torch(device):
    """TensorIterator's rule: dense permuted inputs give outputs permuted alike."""
    a = rand(4, 6, 5, device=device)
    cases = [
        (a.permute(2, 0, 1), rand(5, 4, 6, device=device)),  # the first operand decides
        (rand(5, 4, 6, device=device), a.permute(2, 0, 1)),
        (a.permute(2, 0, 1), a.permute(2, 0, 1)),
        (a.transpose(0, 1), rand(5, device=device)),  # broadcast operand skipped
        (a[:, ::2, :].transpose(0, 2), 1.0),  # sliced: dense output in the input's order
        (a[:, :1, :].expand(4, 6, 5), rand(4, 6, 5, device=device)),
    ]
    for x, y in cases:
        out, ref = run(aten.add.Tensor, x, y), torch.add(x, y)
        assert out.stride() == ref.stride(), f"[op=add shape={tuple(ref.shape)}] strides {out.stride()} != torch's {ref.stride()}"
        close(out, ref, tag("add[layout]", ref.shape, torch.float32))
    m = torch.rand(5, 6, device=device) > 0.5
    out = run(aten.masked_fill.Scalar, a[0].t(), m, -1.0)
    assert out.is_contiguous()  # torch's masked_fill returns a contiguous clone
    close(out, torch.masked_fill(a[0].t(), m, -1.0), tag("masked_fill", out.shape, torch.float32))


def test_many_dims_coalesce_and_limit(device):
    x = rand(*([2] * 9), device=device)
    close(run(aten.mul.Tensor, x, x), x * x, tag("mul[9-d contiguous]", x.shape, torch.float32))  # coalesces to 1 dim
    y = rand(*([2] * 9), device=device).permute(*range(8, -1, -1))
    close(run(aten.add.Tensor, x[..., :1], x), x[..., :1] + x, tag("add[9-d broadcast]", x.shape, torch.float32))
    assert "dims after coalescing" in reason(aten.add.Tensor, x, y)
    with pytest.raises(NotImplementedError, match="dims after coalescing"):
        REGISTRY[aten.add.Tensor].impl(x, y)


def test_index64_chosen_by_extent():
    """int64 offsets only when an extent reaches 2**31 (planned on fake tensors: no memory)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), torch.device(DEVICE):
        big = torch.empty(2**31 + 8, dtype=torch.float16)
        small = torch.empty(1000, dtype=torch.float16)
        strided = torch.empty(2, 2**30 + 16, dtype=torch.int8)[:, ::2]
        assert ".to(tl.int64)" in pw.kernel_source(pw.OPS["neg"], big)
        assert ".to(tl.int64)" not in pw.kernel_source(pw.OPS["neg"], small)
        assert ".to(tl.int64)" in pw.kernel_source(pw.OPS["neg"], strided)


# ------------------------------------------------------------------ select, fill, pow, comparisons


@pytest.mark.parametrize("dtype", DTYPES + [torch.int64, torch.bool], ids=DTYPE_IDS + ["int64", "bool"])
def test_where_masked_fill_fill(dtype, device):
    a = (rand(4, 1, 5, device=device) * 5).to(dtype)
    b = (rand(3, 5, device=device) * 5).to(dtype)
    cond = torch.rand(3, 1, device=device) > 0.5
    close(run(aten.where.self, cond, a, b), torch.where(cond, a, b), tag("where", (4, 3, 5), dtype))
    mask = torch.rand(5, device=device) > 0.5
    value = True if dtype is torch.bool else 3
    close(run(aten.masked_fill.Scalar, a, mask, value), a.masked_fill(mask, value), tag("masked_fill", a.shape, dtype))
    x = a.clone()
    assert run(aten.masked_fill_.Scalar, x, mask, value) is x
    close(x, a.masked_fill(mask, value), tag("masked_fill_", a.shape, dtype))
    close(run(aten.fill.Scalar, b, value), torch.full_like(b, value), tag("fill", b.shape, dtype))
    y = b.t()
    assert run(aten.fill_.Scalar, y, value) is y
    close(y, torch.full_like(y, value), tag("fill_", y.shape, dtype))
    assert "overflows" in reason(aten.fill_.Scalar, rand(3, dtype=torch.float16, device=device), 1e6)
    assert reason(aten.where.self, cond.int(), a, b) is not None  # torch requires a bool condition


@pytest.mark.parametrize("exponent", [0, 1, 2, 3, 0.5, -0.5, -1, -2, 2.5, -1.3, 0.0, 2.0, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pow_tensor_scalar(exponent, dtype, device):
    x = rand(3, 7, dtype=dtype, device=device)
    if not (isinstance(exponent, int) or float(exponent).is_integer()):
        x = x.abs() + 0.1
    out = run(aten.pow.Tensor_Scalar, x, exponent)
    close(out, torch.pow(x.double(), exponent).to(out.dtype), tag(f"pow[{exponent}]", x.shape, dtype))


def test_pow_integer_base(device):
    i = torch.randint(-5, 5, (3, 4), device=device)
    for e in (0, 1, 2, 3, 0.5, 2.5):
        if isinstance(e, float):
            i = i.abs()
        close(run(aten.pow.Tensor_Scalar, i, e), torch.pow(i, e), tag(f"pow[{e}]", i.shape, torch.int64))
    assert reason(aten.pow.Tensor_Scalar, i, 5) is not None  # integer powers other than 0..3: torch
    assert reason(aten.pow.Tensor_Scalar, i, -1) is not None  # torch raises


# ------------------------------------------------------------------ NaN / Inf

SPECIAL = torch.tensor([NAN, INF, -INF, 0.0, -0.0, 1.0, -1.0, 1e-30, 88.0, -88.0, 3e38])


@pytest.mark.parametrize("target", list(UNARY) + [aten.pow.Tensor_Scalar], ids=lambda t: str(t).removeprefix("aten."))
def test_nan_inf_unary(target, device):
    x = SPECIAL.to(device)
    args = (x, 2.5) if target is aten.pow.Tensor_Scalar else (x,)
    ref = target(x.double(), *args[1:]).float()  # as torch's CUDA kernels (fp32 math); CPU torch differs at +-inf
    out = run(target, *args)
    finite, inf = ref.isfinite(), ref.isinf()
    assert torch.equal(out.isnan(), ref.isnan()), f"[op={target}] NaN positions: {out} vs {ref}"
    assert torch.equal(out[inf], ref[inf]), f"[op={target}] infinities: {out} vs {ref}"
    close(out[finite], ref[finite], tag(target, x.shape, torch.float32))


def test_nan_inf_binary(device):
    a = torch.tensor([NAN, 1.0, NAN, INF, -INF, 0.0, -0.0, 1.0, -1.0, 0.0, INF], device=device)
    b = torch.tensor([1.0, NAN, NAN, INF, INF, 0.0, 0.0, 0.0, 0.0, -0.0, 0.0], device=device)
    for target in [aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.maximum.default,
                   aten.minimum.default, aten.eq.Tensor, aten.ne.Tensor, aten.lt.Tensor, aten.ge.Tensor]:
        out, ref = run(target, a, b), target(a, b)
        assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.nan_to_num(), ref.nan_to_num()), f"[op={target}] {out} vs {ref}"
    for s in (0.0, -0.0, INF, NAN):
        out, ref = run(aten.div.Scalar, a, s), a / s
        assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.nan_to_num(), ref.nan_to_num()), f"[op=div.Scalar {s}] {out} vs {ref}"
    assert torch.equal(run(aten.eq.Scalar, a, NAN), a == NAN)


# ------------------------------------------------------------------ in-place, out=, aliasing


def test_inplace_keeps_strides_and_returns_self(device):
    base = rand(6, 5, device=device)
    x = base.t()  # transposed self
    other = rand(5, 1, device=device)
    expected = x.double() * other.double()
    assert run(aten.mul_.Tensor, x, other) is x
    assert x.stride() == (1, 5)
    close(x, expected.float(), tag("mul_[transposed self]", x.shape, torch.float32))
    y = rand(4, 8, device=device)[:, ::2]  # sliced self: only its elements change
    parent = y._base.clone()
    ref = y.double() * 2.0 + 1.0
    run(aten.mul_.Scalar, y, 2.0)
    run(aten.add_.Scalar, y, 1.0)
    close(y, ref.float(), tag("mul_/add_[sliced self]", y.shape, torch.float32))
    assert torch.equal(y._base[:, 1::2], parent[:, 1::2]), "[op=mul_] wrote outside the view"


def test_inplace_dtype_cast_and_refusals(device):
    h = rand(3, 4, dtype=torch.float16, device=device)
    o = rand(3, 4, device=device)
    ref = (h.float() + o).half()
    run(aten.add_.Tensor, h, o)  # computed in fp32, cast into fp16 self
    close(h, ref, tag("add_[fp16 self, fp32 other]", h.shape, torch.float16))
    i = torch.arange(6, device=device)
    assert "can't be cast" in reason(aten.mul_.Scalar, i, 1.5)  # torch raises
    assert "can't be cast" in reason(aten.div_.Tensor, i, i)
    x = rand(3, 4, device=device)
    assert "overlapping" in reason(aten.add_.Tensor, x[:1].expand(3, 4), x)  # expanded self
    assert "partially overlaps" in reason(aten.add_.Tensor, x[1:], x[:-1])
    assert "shape" in reason(aten.add_.Tensor, x[0], x)  # self would need to broadcast
    assert reason(aten.add_.Tensor, x[0], x[1]) is None  # same storage, disjoint rows
    ref = x.double() * 2
    run(aten.add_.Tensor, x, x)  # self aliases other exactly: fine
    close(x, ref.float(), tag("add_[self aliases other]", x.shape, torch.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_out_variants(dtype, device):
    a, b = rand(3, 5, dtype=dtype, device=device), rand(5, dtype=dtype, device=device)
    out = poison(torch.empty(5, 3, dtype=dtype, device=device)).t()  # strided out keeps its strides
    assert run(aten.add.out, a, b, out=out) is out and out.stride() == (1, 3)
    close(out, (a.double() + b.double()).to(dtype), tag("add.out", out.shape, dtype))
    out = poison(torch.empty(3, 5, device=device))  # fp32 out of an fp16/bf16 result
    run(aten.mul.Scalar_out, a, 3.0, out=out)
    close(out, (a.double() * 3.0).float(), tag("mul.Scalar_out", out.shape, torch.float32))
    empty = torch.empty(0, dtype=dtype, device=device)  # resized, as torch does
    run(aten.exp.out, a, out=empty)
    assert empty.shape == a.shape
    close(empty, a.double().exp().to(dtype), tag("exp.out[resized]", a.shape, dtype))
    cmp = poison(torch.empty(3, 5, device=device))
    run(aten.lt.Tensor_out, a, b, out=cmp)  # bool result cast into a float out
    close(cmp, (a < b).float(), tag("lt.Tensor_out", a.shape, dtype))
    assert "shape" in reason(aten.add.out, a, b, out=torch.empty(2, 2, dtype=dtype, device=device))
    assert "can't be cast" in reason(aten.add.out, a, b, out=torch.empty(3, 5, dtype=torch.int32, device=device))
    where_out = poison(torch.empty(3, 5, dtype=dtype, device=device))
    cond = torch.rand(3, 5, device=device) > 0.5
    run(aten.where.self_out, cond, a, b, out=where_out)
    close(where_out, torch.where(cond, a, b), tag("where.self_out", a.shape, dtype))


INPLACE = {
    aten.exp_.default: torch.exp, aten.sqrt_.default: torch.sqrt, aten.rsqrt_.default: torch.rsqrt,
    aten.tanh_.default: torch.tanh, aten.sigmoid_.default: torch.sigmoid, aten.neg_.default: torch.neg,
    aten.abs_.default: torch.abs, aten.reciprocal_.default: torch.reciprocal, aten.log_.default: torch.log,
    aten.sin_.default: torch.sin, aten.cos_.default: torch.cos, aten.silu_.default: torch.nn.functional.silu,
    aten.gelu_.default: torch.nn.functional.gelu,
}


@pytest.mark.parametrize("target", list(INPLACE), ids=lambda t: str(t).removeprefix("aten."))
def test_unary_inplace(target, device):
    x = rand(4, 6, dtype=torch.bfloat16, device=device).abs().add(0.1).t()
    ref = INPLACE[target](x.double()).to(torch.bfloat16)
    assert run(target, x) is x
    close(x, ref, tag(target, x.shape, torch.bfloat16))


def test_compare_inplace_and_pow_inplace(device):
    x = rand(3, 4, device=device)
    y = x.clone()
    run(aten.gt_.Scalar, y, 0.0)
    close(y, (x > 0).float(), tag("gt_.Scalar", x.shape, torch.float32))
    z = x.clone()
    run(aten.pow_.Scalar, z, 2)
    close(z, (x.double() ** 2).float(), tag("pow_.Scalar", x.shape, torch.float32))


# ------------------------------------------------------------------ kernel cache


def test_kernel_cache_reuse_and_new_signatures(device):
    op = pw.OPS["sub"]

    def kernel_of(*operands):
        op(*operands)
        return pw._plan(op, operands, None)._kernel

    a, b = rand(6, 7, device=device), rand(7, device=device)
    kernel = kernel_of(a, b)
    n = pw.kernel_cache_info()["kernels"]
    assert kernel_of(rand(6, 7, device=device), rand(7, device=device)) is kernel  # same signature, new tensors
    assert kernel_of(rand(9, 3, device=device), rand(3, device=device)) is kernel  # other sizes, same signature
    assert kernel_of(a.to(torch.bfloat16), b.to(torch.bfloat16)) is kernel  # fp32 math over bf16 storage
    assert pw.kernel_cache_info()["kernels"] == n
    others = [kernel_of(a.to(torch.int32), b.to(torch.int32)), kernel_of(a.double(), b.double()), kernel_of(a, 2.0)]
    assert len({id(k) for k in others + [kernel]}) == 4  # int32, fp64 computation, a scalar operand: new kernels
    assert kernel_of(a, -5.0) is others[2]  # a scalar's value is an argument, not a constant
    close(op(a, -5.0), a + 5.0, tag("sub[scalar value]", a.shape, torch.float32))
    src = pw.kernel_source(op, a, 2.0)
    assert "do_not_specialize=['s1']" in src and "2.0" not in src


def test_flat_path_has_no_index_math(device):
    a = rand(4, 5, device=device)
    assert "%" not in pw.kernel_source(pw.OPS["mul"], a, a)
    assert "%" not in pw.kernel_source(pw.OPS["mul"], a.t(), a.t())  # same dense layout: flat too
    assert "%" in pw.kernel_source(pw.OPS["mul"], a, a[:, :1])


# ------------------------------------------------------------------ registry and fake tensors


def _example_args(target, fake_mode):
    """Arguments for ``target`` built from its schema, as fake tensors."""
    name = target.__name__
    args, kwargs = [], {}
    for a in target._schema.arguments:
        t = str(a.type)
        if a.name == "out":
            dtype = torch.float32
            kwargs["out"] = torch.empty(3, 4, dtype=dtype)
            continue
        if t.startswith("Tensor"):
            boolean, integral = a.name in ("condition", "mask"), name.startswith("bitwise")  # bitwise: no floats
            v = torch.empty(3, 4, dtype=torch.bool if boolean else torch.int64 if integral else torch.float32)
        elif t in ("number", "float"):  # Scalar, or a float (native_dropout_backward's scale)
            v = 2
        elif a.has_default_value():
            continue
        else:
            raise AssertionError(f"no example for {name} {a}")
        (kwargs.__setitem__(a.name, v) if a.kwarg_only else args.append(v))
    return args, kwargs


def test_supports_on_fake_tensors_for_every_entry():
    from torch._subclasses.fake_tensor import FakeTensorMode

    ours = [t for t, e in REGISTRY.items() if e.kernel.startswith("flag_gems.pointwise")]
    assert len(ours) > 100
    with FakeTensorMode() as mode, torch.device(DEVICE):
        for target in ours:
            args, kwargs = _example_args(target, mode)
            why = REGISTRY[target].supports(*args, **kwargs)  # a fake tensor's data cannot be read
            assert why is None, f"[op={target}] supports() on fake tensors: {why}"


def test_supports_on_symbolic_shapes_adds_no_guards():
    from torch._guards import detect_fake_mode
    from torch.fx.experimental.proxy_tensor import make_fx

    seen = {}

    def f(x, y):
        seen["add"] = reason(aten.add.Tensor, x, y)
        seen["mul_sym"] = reason(aten.mul.Tensor, x, x.shape[0])  # a SymInt operand
        seen["add_"] = reason(aten.add_.Tensor, x, y)
        seen["pow"] = reason(aten.pow.Tensor_Scalar, x, x.shape[0])
        seen["guards"] = list(detect_fake_mode([x]).shape_env.guards)
        return x + y

    make_fx(f, tracing_mode="symbolic")(torch.randn(3, 4, device=DEVICE), torch.randn(4, device=DEVICE))
    assert seen["add"] is None and seen["mul_sym"] is None
    assert seen["add_"] is not None and seen["pow"] is not None  # refused, not guarded
    assert seen["guards"] == []


def test_registry_entries_match_schemas():
    families = set(lp.OVERLOADS)
    assert set(lp.MEASURED_AS) <= families and lp.GRAPH_PROXY <= families
    for target, entry in REGISTRY.items():
        if not entry.kernel.startswith("flag_gems.pointwise"):
            continue
        assert target not in FALLBACKS
        # On in the eager mode; fast or lowered in graphs only with measurements behind it.
        assert entry.eager.on and (entry.data or not (entry.fast.on or entry.graph.on)), target
        assert entry.impl.__module__ == "flag_gems.lowerings.pointwise"


def test_unsupported_inputs_give_reasons(device):
    x = rand(3, 4, device=device)
    assert "not supported" in reason(aten.add.Tensor, x.to(torch.complex64), x)
    assert "approximate" in reason(aten.gelu.default, x, approximate="sigmoid")
    assert "device" in reason(aten.add.Tensor, torch.empty(3, 4, device="meta"), torch.empty(3, 4, device="meta"))
    assert "several devices" in reason(aten.add.Tensor, torch.empty(3, 4, device="meta"), x)
    assert "do not broadcast" in reason(aten.add.Tensor, x, rand(5, device=device))
    with pytest.raises(NotImplementedError, match="do not broadcast"):
        REGISTRY[aten.mul.Tensor].impl(x, rand(5, device=device))


def test_impl_raises_exactly_when_supports_refuses(device):
    """impl checks what supports checks (per call too) and raises before writing anything."""
    x = rand(4, 5, device=device)
    before = x.clone()
    cases = [
        (aten.add_.Tensor, (x[1:], x[:-1])),  # partial overlap
        (aten.add_.Tensor, (x[:1].expand(4, 5), x)),  # expanded self
        (aten.fill_.Scalar, (x.half(), 1e6)),  # overflows fp16
        (aten.eq.Scalar, (x.int(), 2**40)),  # overflows int32
        (aten.add.Tensor, (x, x, ), {"alpha": True}),
    ]
    for target, args, *kw in cases:
        kwargs = kw[0] if kw else {}
        why = reason(target, *args, **kwargs)
        assert why is not None, f"[op={target}] expected a reason"
        with pytest.raises(NotImplementedError):
            REGISTRY[target].impl(*args, **kwargs)
    assert torch.equal(x, before)


# ------------------------------------------------------------------ OpInfo samples

# OpInfo name -> the overloads its samples must run through their entries (functional and in-place
# variants). ``pow`` is not here: its samples call pow.Tensor_Tensor, which has no entry
# (pow.Tensor_Scalar is tested above).
OPINFO_EXPECTED = {
    "add": {"add.Tensor", "add_.Tensor"}, "sub": {"sub.Tensor", "sub_.Tensor"},
    "mul": {"mul.Tensor", "mul_.Tensor"}, "div": {"div.Tensor", "div_.Tensor"},
    "neg": {"neg.default", "neg_.default"}, "abs": {"abs.default", "abs_.default"},
    "exp": {"exp.default", "exp_.default"}, "log": {"log.default", "log_.default"},
    "sqrt": {"sqrt.default", "sqrt_.default"}, "rsqrt": {"rsqrt.default", "rsqrt_.default"},
    "reciprocal": {"reciprocal.default", "reciprocal_.default"}, "sin": {"sin.default", "sin_.default"},
    "cos": {"cos.default", "cos_.default"}, "tanh": {"tanh.default", "tanh_.default"},
    "sigmoid": {"sigmoid.default", "sigmoid_.default"}, "nn.functional.silu": {"silu.default", "silu_.default"},
    "nn.functional.gelu": {"gelu.default"}, "maximum": {"maximum.default"}, "minimum": {"minimum.default"},
    "where": {"where.self"}, "masked_fill": {"masked_fill.Scalar", "masked_fill_.Scalar"},
    "fill": {"fill.Scalar", "fill_.Scalar"},
    "eq": {"eq.Tensor", "eq_.Tensor"}, "ne": {"ne.Tensor", "ne_.Tensor"}, "lt": {"lt.Tensor", "lt_.Tensor"},
    "le": {"le.Tensor", "le_.Tensor"}, "gt": {"gt.Tensor", "gt_.Tensor"}, "ge": {"ge.Tensor", "ge_.Tensor"},
    "to": {"_to_copy.default"},
}
OPINFO_DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.bool]
OPINFO_SAMPLES = 4
# torch's own refusals of an in-place variant's sample (a result type the input cannot hold, an
# input smaller than the broadcast shape): that sample has no in-place call to check.
INPLACE_REFUSALS = ("can't be cast to the desired output type", "doesn't match the broadcast shape")


@pytest.mark.parametrize("name", sorted(OPINFO_EXPECTED))
def test_opinfo_samples(name, device):
    """OpInfo sample inputs (a few per dtype) through every registered aten call they make."""
    pytest.importorskip("expecttest")

    def copy(v):
        return v.clone() if isinstance(v, torch.Tensor) else v

    checked = set()
    samples = opinfo_samples({name}, OPINFO_DTYPES, OPINFO_SAMPLES, device, variants=("", "no_rounding_mode"))
    for info, dtype, sample in samples:
        for variant in (info.op, info.inplace_variant):
            if variant is None:
                continue
            try:
                calls = aten_calls(lambda: variant(copy(sample.input), *sample.args, **sample.kwargs))
            except RuntimeError as e:
                if variant is info.op or not any(m in str(e) for m in INPLACE_REFUSALS):
                    raise
                continue
            for func, args, kwargs in calls:
                entry = REGISTRY.get(func)
                if entry is None:
                    continue
                a1, k1 = [copy(v) for v in args], {n: copy(v) for n, v in kwargs.items()}
                if entry.supports(*a1, **k1) is not None:
                    continue
                a2, k2 = [copy(v) for v in args], {n: copy(v) for n, v in kwargs.items()}
                ref = func(*a2, **k2)
                out = entry.impl(*a1, **k1)
                close(out, ref, tag(f"{func}[opinfo {info.name}]", ref.shape, ref.dtype))
                checked.add(str(func).removeprefix("aten."))
    want = OPINFO_EXPECTED[name]
    assert want <= checked, f"[opinfo {name}] never ran through its entry: {sorted(want - checked)}; checked {sorted(checked)}"


# ------------------------------------------------------------------ compile backend


def test_backend_lowers_pointwise_nodes_only_when_asked(device):
    def f(x, y):
        return torch.where(x > 0, x * 2.0 + y, torch.exp(-x))

    x, y = rand(4, 5, device=device), rand(5, device=device)
    torch._dynamo.mark_dynamic(x, 0)  # supports() sees symbolic sizes
    # lower_aten's own decisions: the pointwise fusion pass (on by default) would fuse these nodes first
    default = flag_gems.explain(f, x, y, options={"strict": True, "fuse_pointwise": False})
    assert not any(g.lowered for g in default.graphs), str(default)
    assert any(r.startswith("graph policy off") for g in default.graphs for r in g.kept.get("exp.default", {})), str(default)
    torch._dynamo.reset()
    report = flag_gems.explain(f, x, y, options={"strict": True, "lower_aten": "all"})
    lowered = " ".join(k for g in report.graphs for k in g.lowered)
    for op in ("mul.Tensor", "add.Tensor", "gt.Scalar", "exp.default", "where.self", "neg.default"):
        assert op in lowered, str(report)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="flag_gems", dynamic=True, options={"lower_aten": "all"})
    for shape in [(4, 5), (7, 5)]:
        x = rand(*shape, device=device)
        close(compiled(x, y), f(x, y), tag("compiled pointwise", shape, torch.float32))


# ------------------------------------------------------------------ GPU (libdevice paths, large shapes)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gpu_large_shapes_all_unary(dtype):
    x = torch.randn(4096, 1531, device="cuda", dtype=dtype)
    for target, (fn, domain) in UNARY.items():
        inp = x.abs() + 0.05 if domain == "positive" else x
        close(run(target, inp.t()), fn(inp.double().t()).to(dtype), tag(target, inp.shape, dtype))
    big = torch.tensor([0.5, 1e4, -1e4, 3e38, 1e-30, NAN, INF, -INF], device="cuda")
    for target in (aten.sin.default, aten.cos.default, aten.exp.default, aten.tanh.default):  # libdevice accuracy
        ref = target(big.double()).float()
        close(run(target, big), ref, tag(f"{target}[libdevice]", big.shape, torch.float32))


@pytest.mark.gpu
def test_gpu_int64_indexing():
    x = torch.ones(2**31 + 1000, dtype=torch.int8, device="cuda")
    out = run(aten.mul.Scalar, x, 3)
    assert out[-1].item() == 3 and out[0].item() == 3 and int(out.sum(dtype=torch.int64)) == 3 * x.numel()
