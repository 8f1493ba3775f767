"""``passes/outer_products.py``: GEMMs with a contraction of 1 become broadcast products, fused downstream."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import flag_gems
from accuracy import assert_close, rand, ref64, tag
from flag_gems.passes.outer_products import rewrite_outer_products

aten = torch.ops.aten
pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _gemms(gm):
    return [n for n in gm.graph.nodes if n.target in (aten.mm.default, aten.bmm.default)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_k1_gemms_become_products_and_others_stay(dtype):
    def f(a, b, c, d, e, g):
        return (a @ b).cos(), torch.bmm(c, d).sin(), e @ g  # the last contracts over 4

    args = (rand(64, 1, dtype=dtype), rand(1, 5, dtype=dtype), rand(2, 64, 1, dtype=dtype),
            rand(2, 1, 7, dtype=dtype), rand(3, 4, dtype=dtype), rand(4, 6, dtype=dtype))
    gm = make_fx(f, tracing_mode="fake")(*args)
    assert rewrite_outer_products(gm) == 2
    left = _gemms(gm)
    assert len(left) == 1 and left[0].target is aten.mm.default and left[0].meta["val"].shape == (3, 6)
    outs = gm(*args)
    refs = f(*[ref64(x) for x in args])
    for name, out, ref in zip(("mm k=1", "bmm k=1", "mm k=4"), outs, refs):
        assert out.dtype == dtype
        assert_close(out, ref, dtype, tag(f"outer product[{name}]", out.shape, dtype))


def test_a_product_in_another_layout_than_the_gemm_keeps_the_gemm():
    # Operands whose batch dim is innermost: the broadcast product would come out batch-innermost,
    # while the graph's views of the result were traced on bmm's contiguous output.
    a = rand(64, 1, 2).permute(2, 0, 1)  # [2, 64, 1], strides (1, 2, 2)
    b = rand(1, 7, 2).permute(2, 0, 1)  # [2, 1, 7]
    gm = make_fx(lambda a, b: torch.bmm(a, b).view(2, 448), tracing_mode="fake")(a, b)
    mul_val = torch.mul(a, b)
    if mul_val.stride() == torch.bmm(a, b).stride():
        pytest.skip("this torch lays the product out like the GEMM")
    assert rewrite_outer_products(gm) == 0 and len(_gemms(gm)) == 1
    assert_close(gm(a, b), ref64(torch.bmm(a, b)).view(2, 448), torch.float32, tag("bmm kept", (2, 448), torch.float32))


def test_symbolic_contraction_is_left_alone():
    def f(a, b):
        return a @ b

    gm = make_fx(f, tracing_mode="symbolic")(rand(8, 3), rand(3, 5))
    assert rewrite_outer_products(gm) == 0 and len(_gemms(gm)) == 1


def test_hf_rope_angles_compile_without_a_gemm(device):
    # HF's rotary table: inv_freq[None, :, None] @ positions[:, None, :], then cos / sin of the
    # concatenated angles. Compiled, the K = 1 bmm is a product fused into the cos / sin kernel.
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float32, device=device) / 16))

    def table(position_ids):
        freqs = (inv_freq[None, :, None].expand(position_ids.shape[0], -1, 1).float()
                 @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    pos = torch.randint(0, 4096, (2, 5), device=device)
    report = flag_gems.explain(table, pos)
    cos, sin = torch.compile(table, backend="flag_gems", options={"strict": True}, fullgraph=True)(pos)
    notes = " ".join(n for g in report.graphs for n in g.notes)
    assert "1 GEMMs with a contraction of 1 rewritten as products" in notes, notes
    # arange / cast / product / cat / cos / sin: one generated kernel (three with the bmm kept)
    assert [g.kernels["inference"][1] for g in report.graphs] == [1], [g.kernel_line() for g in report.graphs]
    inv64, pos64 = inv_freq.double().cpu(), pos.double().cpu()
    freqs = (inv64[None, :, None] @ pos64[:, None, :]).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    # fp32 angles up to 4096 rad: the reference is the fp32 product's cos, to fp32 rounding of the angle.
    assert_close(cos, emb.float().double().cos(), torch.float32, tag("hf rope table cos", cos.shape, torch.float32))
    assert_close(sin, emb.float().double().sin(), torch.float32, tag("hf rope table sin", sin.shape, torch.float32))
