"""``aten._to_copy.default`` (``x.to(dtype)``, ``.float()``, ``.half()``...) on the generated pointwise kernel.

Every (source, result) pair of the ten dtypes the kernels take, against torch's own cast on
the same device, exactly: the same bits for every non-NaN value (so fp16/bf16 round to
nearest even, ties included, and signed zeros survive), NaN where torch has NaN, the same
dtype, shape and strides. Inputs: random values plus the edge values of each pair (ties,
overflow to inf, subnormals, NaN/inf where torch defines the result; float -> integer only
in range, as torch leaves the rest undefined), in contiguous, transposed, sliced, expanded,
0-d and empty layouts. Then the output layouts for each memory format, the eager mode's
``x.to(dtype)``, supports() reasons, fake and symbolic tensors, and the compile backend.
"""

import pytest
import torch

import flag_gems
from accuracy import DEVICE, reason, run, tag
from flag_gems.lowerings.registry import REGISTRY

aten = torch.ops.aten
TO_COPY = aten._to_copy.default
NAN, INF = float("nan"), float("inf")

DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
          torch.float16, torch.bfloat16, torch.float32, torch.float64]
IDS = {torch.bool: "bool", torch.uint8: "u8", torch.int8: "i8", torch.int16: "i16", torch.int32: "i32",
       torch.int64: "i64", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
       torch.float64: "fp64"}
PAIRS = [(s, d) for s in DTYPES for d in DTYPES]
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}


def same(out, ref, what):
    """``out`` is torch's result exactly: dtype, shape, strides, values (bits for floats, NaN as NaN)."""
    assert out.dtype == ref.dtype, f"{what} dtype {out.dtype} != torch's {ref.dtype}"
    assert out.shape == ref.shape, f"{what} shape {tuple(out.shape)} != torch's {tuple(ref.shape)}"
    assert out.stride() == ref.stride(), f"{what} strides {out.stride()} != torch's {ref.stride()}"
    if ref.dtype.is_floating_point:
        nan = ref.isnan()
        assert torch.equal(out.isnan(), nan), f"{what} NaN positions differ:\n{out}\n{ref}"
        bits_out, bits_ref = out.view(_BITS[ref.dtype])[~nan], ref.view(_BITS[ref.dtype])[~nan]
        assert torch.equal(bits_out, bits_ref), f"{what} values differ:\n{out}\n{ref}"
    else:
        assert torch.equal(out, ref), f"{what} values differ:\n{out}\n{ref}"


def _edges(src: torch.dtype, dst: torch.dtype) -> list:
    """Edge values of a (source, result) pair where torch defines the result."""
    if src is torch.bool:
        return [True, False]
    if not src.is_floating_point:
        info = torch.iinfo(src)
        vals = [0, 1, info.max, info.min, info.max - 1]
        if info.min < 0:
            vals += [-1, -2]
        if info.bits >= 32:  # int -> fp32 -> bf16 rounds twice, as in torch: 2^24 + 2^16 + 1 -> 2^24
            vals += [2**24 + 2**16 + 1, -(2**24 + 2**16 + 1), 2**31 - 1]
        return vals
    if dst is torch.bool:
        return [0.0, -0.0, NAN, INF, -INF, 0.3, -1e-40, 1e-45]
    if not dst.is_floating_point:  # float -> integer: in range only (torch leaves the rest undefined)
        return [0.0, -0.0, 0.99, 1.5, 2.5, 100.75, 126.0] + ([] if dst is torch.uint8 else [-0.99, -1.5, -127.9])
    return [
        0.0, -0.0, INF, -INF, NAN, 1.0,
        1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8),  # bf16 ties: to even
        1 + 2**-11, 1 + 3 * 2**-11,  # fp16 ties
        1 + 2**-11 + 2**-40,  # fp64 -> fp32 -> fp16 rounds twice, as in torch
        65504.0, 65519.0, 65520.0, 1e5, -1e5,  # fp16 max, just below / at overflow
        3.4e38, 3.3961514e38,  # bf16 overflow to inf
        1e-6, 6e-8, 1e-40, -1e-39, 1e-310,  # fp16 / fp32 / fp64 subnormals
        0.1, -0.1, 1 / 3,
    ]


def _values(src: torch.dtype, dst: torch.dtype, shape) -> torch.Tensor:
    """Random values of ``src`` that the cast to ``dst`` defines, the pair's edge values first."""
    if src is torch.bool:
        x = torch.rand(shape) > 0.5
    elif not src.is_floating_point:
        info = torch.iinfo(src)
        x = torch.randint(info.min, info.max, shape, dtype=torch.int64).to(src)
    elif dst.is_floating_point or dst is torch.bool:
        x = (torch.randn(shape, dtype=torch.float64) * torch.logspace(-3, 3, shape[-1], dtype=torch.float64)).to(src)
    else:  # float -> integer: strictly inside the result's range, fractions of both signs
        lo, hi = (0.0, 254.0) if dst is torch.uint8 else (-126.0, 126.0)
        x = (torch.rand(shape, dtype=torch.float64) * (hi - lo) + lo).to(src)
    edges = torch.tensor(_edges(src, dst), dtype=torch.float64 if src.is_floating_point else None).to(src)
    flat = x.view(-1)
    flat[: edges.numel()] = edges[: flat.numel()]
    return x.to(DEVICE)


def _layouts(x: torch.Tensor) -> dict:
    """Views of a 2-D tensor: every layout class the output rule distinguishes."""
    return {
        "contiguous": x,
        "transposed": x.t(),  # dense: its strides are kept
        "sliced": x[:, ::3],  # not dense: contiguous result
        "transposed-sliced": x.t()[::2],  # not dense: a dense result in its dim order
        "expanded": x[:1].expand(x.shape[0], x.shape[1]),  # stride 0
        "0-d": x[1, 2],
        "empty": x[:0],
    }


def _left_to_torch(src, dst) -> bool:
    """Casts the entry refuses on CUDA: there Triton rounds wide sources to fp16/bf16 once, torch twice."""
    return DEVICE == "cuda" and src in (torch.int32, torch.int64, torch.float64) and dst in (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("src,dst", PAIRS, ids=[f"{IDS[s]}->{IDS[d]}" for s, d in PAIRS])
def test_every_dtype_pair(src, dst):
    x = _values(src, dst, (9, 13))
    if _left_to_torch(src, dst):
        assert "rounds once" in reason(TO_COPY, x, dtype=dst)
        return
    for name, v in _layouts(x).items():
        ref = TO_COPY(v, dtype=dst)  # torch's own cast, same device
        out = run(TO_COPY, v, dtype=dst)
        same(out, ref, tag(f"_to_copy[{IDS[src]}->{IDS[dst]} {name}]", v.shape, dst))


def test_edge_values_round_as_torch():
    """The double rounding torch does (fp64 and wide integers reach fp16/bf16 through fp32)."""
    x = torch.tensor([1 + 2**-11 + 2**-40, 1 + 2**-8 + 2**-40], dtype=torch.float64, device=DEVICE)
    i = torch.tensor([2**24 + 2**16 + 1], device=DEVICE)
    if DEVICE == "cuda":  # measured on the H100: Triton's GPU code rounded once; these stay with torch
        for v in (x, i):
            for dt in (torch.float16, torch.bfloat16):
                assert "rounds once" in reason(TO_COPY, v, dtype=dt)
        return
    assert run(TO_COPY, x, dtype=torch.float16)[0].item() == 1.0 == TO_COPY(x, dtype=torch.float16)[0].item()
    assert run(TO_COPY, x, dtype=torch.bfloat16)[1].item() == 1.0 == TO_COPY(x, dtype=torch.bfloat16)[1].item()
    assert run(TO_COPY, i, dtype=torch.bfloat16).item() == 2**24 == TO_COPY(i, dtype=torch.bfloat16).item()


def _strided(shape, strides):
    return torch.randn(1000, device=DEVICE).as_strided(shape, strides)


# (name, input) for the layout rules of each memory format.
def _format_inputs():
    x4 = torch.randn(2, 3, 4, 5, device=DEVICE)
    cl = x4.to(memory_format=torch.channels_last)
    return {
        "size-1 dims with odd strides": _strided((3, 1, 4), (4, 99, 1)),
        "permuted size-1 dims": _strided((3, 1, 4), (1, 99, 3)),
        "empty, zero strides": _strided((0, 5), (1, 0)),
        "permuted 3-d slice": torch.randn(3, 4, 10, device=DEVICE).permute(2, 0, 1)[:, :, ::2],
        "broadcast dims": _strided((4, 3, 5), (0, 5, 1)),
        "broadcast inner dim": _strided((4, 3), (1, 0)),
        "contiguous 4-d": x4,
        "channels_last": cl,
        "channels_last sliced": cl[:, :, ::2],
        "channels_last sliced W": cl[..., ::2],
        "4-d size-1 channels": torch.randn(2, 1, 1, 5, device=DEVICE),
        "4-d empty": torch.randn(2, 0, 1, 5, device=DEVICE),
        "5-d": torch.randn(2, 3, 2, 2, 3, device=DEVICE).transpose(1, 4),
        "0-d": torch.tensor(1.5, device=DEVICE),
    }


@pytest.mark.parametrize(
    "memory_format",
    [None, torch.preserve_format, torch.contiguous_format, torch.channels_last, torch.channels_last_3d],
    ids=["none", "preserve", "contiguous", "channels_last", "channels_last_3d"],
)
def test_output_strides_as_torch(memory_format):
    rank = {torch.channels_last: 4, torch.channels_last_3d: 5}.get(memory_format)
    for name, x in _format_inputs().items():
        kw = {} if memory_format is None else {"memory_format": memory_format}
        if rank is not None and x.dim() != rank:
            why = reason(TO_COPY, x, dtype=torch.bfloat16, **kw)
            assert why is not None and f"{rank}-d" in why, f"[{name}] {why}"
            with pytest.raises(RuntimeError):  # torch refuses too
                TO_COPY(x, dtype=torch.bfloat16, **kw)
            continue
        out = run(TO_COPY, x, dtype=torch.bfloat16, **kw)
        same(out, TO_COPY(x, dtype=torch.bfloat16, **kw), tag(f"_to_copy[{name} {memory_format}]", x.shape, torch.bfloat16))


@pytest.mark.parametrize("dtype", [None, torch.float32], ids=["dtype=None", "same dtype"])
def test_a_copy_is_a_new_tensor(dtype):
    x = torch.randn(4, 6, device=DEVICE).t()
    out = run(TO_COPY, x, dtype=dtype)
    same(out, TO_COPY(x, dtype=dtype), tag("_to_copy[copy]", x.shape, torch.float32))
    assert out.data_ptr() != x.data_ptr()
    before = x.clone()
    out.fill_(7.0)
    assert torch.equal(x, before), "the copy shares memory with its input"


def test_eager_mode_serves_to_dtype(tmp_path):
    x = torch.randn(5, 7, device=DEVICE) * 100
    b = x.bfloat16().t()
    calls = {
        "to(bf16)": lambda: x.to(torch.bfloat16),
        "float()": lambda: b.float(),
        "half()": lambda: x.half(),
        "to(int32)": lambda: x.to(dtype=torch.int32),
        "to(bool)": lambda: (x - x.round()).to(torch.bool),
        "to(x.dtype, copy=True)": lambda: x.to(x.dtype, copy=True),
    }
    refs = {name: f() for name, f in calls.items()}
    log = tmp_path / "ops.log"
    with flag_gems.use_gems(include=["_to_copy"], record=True, path=log):
        outs = {name: f() for name, f in calls.items()}
        alias = x.to(torch.float32)  # no copy: torch returns x itself
    assert "_to_copy" not in flag_gems.all_registered_ops()  # the block restored the native kernel
    for name in calls:
        same(outs[name], refs[name], tag(f"eager {name}", x.shape, refs[name].dtype))
    assert alias is x
    lines = log.read_text().splitlines()
    assert len(lines) >= len(calls) and all(line.endswith("GEMS _TO_COPY") for line in lines), lines


def test_supports_reasons(device):
    x = torch.randn(3, 4, device=device)
    meta = "meta" if device != "meta" else "cpu"
    assert "device" in reason(TO_COPY, x, device=torch.device(meta))
    assert "layout" in reason(TO_COPY, x, layout=torch.sparse_coo)
    assert "layout" in reason(TO_COPY, x.to_sparse(), dtype=torch.float16)
    assert "pin_memory" in reason(TO_COPY, x, pin_memory=True)
    assert "4-d" in reason(TO_COPY, x, memory_format=torch.channels_last)
    assert "5-d" in reason(TO_COPY, x, memory_format=torch.channels_last_3d)
    assert "dtype" in reason(TO_COPY, x, dtype=torch.complex64)
    assert "not supported" in reason(TO_COPY, x.to(torch.complex64), dtype=torch.float32)
    assert "not supported" in reason(TO_COPY, x.to(torch.uint16))
    assert "negative" in reason(TO_COPY, torch._neg_view(x))
    # What it takes: same device (also named), any non_blocking, pin_memory=False, strided layout.
    for kw in ({"device": torch.device(device)}, {"device": device}, {"non_blocking": True},
               {"pin_memory": False}, {"layout": torch.strided}, {"memory_format": torch.contiguous_format}):
        assert reason(TO_COPY, x, dtype=torch.bfloat16, **kw) is None, kw
    # impl refuses exactly those calls, before allocating anything.
    with pytest.raises(NotImplementedError, match="pin_memory"):
        REGISTRY[TO_COPY].impl(x, pin_memory=True)
    with pytest.raises(NotImplementedError, match="4-d"):
        REGISTRY[TO_COPY].impl(x, memory_format=torch.channels_last)


def test_registry_entry():
    entry = REGISTRY[TO_COPY]
    assert entry.kernel == "flag_gems.pointwise.to_copy"
    # On in the eager mode; not lowered in graphs (no graph-mode data, and no graph proxy
    # declared: ~20 casts per forward). Preset "fast" takes it only if every eager call is
    # >= 1.03x native counting host time too: max(host, device) per call.
    assert entry.eager.on and not entry.graph.on
    eager = [m for m in entry.data if m.mode == "eager"]
    per_call = min(max(m.base_us, m.base_host_us) / max(m.ours_us, m.ours_host_us) for m in eager)
    assert entry.fast.on == (per_call >= 1.03), (per_call, entry.fast)


def test_supports_on_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), torch.device(DEVICE):
        x = torch.empty(3, 4, dtype=torch.bfloat16)
        assert reason(TO_COPY, x, dtype=torch.float32) is None
        assert reason(TO_COPY, x.t()[::2], dtype=torch.int8, memory_format=torch.contiguous_format) is None
        assert reason(TO_COPY, torch.empty(2, 3, 4, 5), memory_format=torch.channels_last) is None
        assert "pin_memory" in reason(TO_COPY, x, pin_memory=True)


def test_supports_on_symbolic_shapes_adds_no_guards():
    from torch._guards import detect_fake_mode
    from torch.fx.experimental.proxy_tensor import make_fx

    seen = {}

    def f(x, y):
        seen["cast"] = reason(TO_COPY, x, dtype=torch.float16)
        seen["sliced"] = reason(TO_COPY, x.t()[::2], dtype=torch.bool)
        seen["channels_last"] = reason(TO_COPY, y, dtype=torch.bfloat16, memory_format=torch.channels_last)
        seen["3-d channels_last"] = reason(TO_COPY, x, memory_format=torch.channels_last)
        seen["guards"] = list(detect_fake_mode([x]).shape_env.guards)
        return x * 2

    make_fx(f, tracing_mode="symbolic")(torch.randn(3, 4, device=DEVICE), torch.randn(2, 3, 4, 5, device=DEVICE))
    assert seen["cast"] is None and seen["sliced"] is None and seen["channels_last"] is None
    assert "4-d" in seen["3-d channels_last"]
    assert seen["guards"] == []


def test_backend_lowers_casts_when_asked(device):
    def f(x):
        return (x.to(torch.bfloat16) * 2).float()

    x = torch.randn(4, 6, device=device)
    torch._dynamo.reset()
    report = flag_gems.explain(f, x, options={"strict": True, "lower_aten": "all"})
    lowered = " ".join(k for g in report.graphs for k in g.lowered)
    assert "_to_copy.default" in lowered, str(report)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="flag_gems", dynamic=True, options={"lower_aten": "all"})
    for shape in [(4, 6), (7, 6)]:
        x = torch.randn(*shape, device=device)
        same(compiled(x), f(x), tag("compiled _to_copy", shape, torch.float32))
