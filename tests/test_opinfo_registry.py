"""PyTorch's OpInfo sample inputs through the non-pointwise registry entries (reductions, softmax,
indexing, layer_norm, GEMMs): every aten call a sample makes that an entry takes is run by the
entry and compared with the native kernel on the same inputs, and each op name must run the
overloads listed for it (an op whose samples all stop reaching its entry fails by name). (The
pointwise family, ``_to_copy`` included, has its own OpInfo test in test_pointwise.py.)"""

import collections

import pytest
import torch

from accuracy import TOLERANCES, aten_calls, opinfo_samples, tag
from flag_gems.lowerings.registry import REGISTRY

# OpInfo name -> the registry overloads its samples must run through an entry: any one of the
# alternatives (a set of overloads, all of which must be checked at least once). Alternatives
# cover decompositions that differ by device or torch version (F.rms_norm is one fused op on
# CUDA, pow/mean/rsqrt on the CPU).
EXPECTED = {
    "sum": ({"sum.default", "sum.dim_IntList"},),
    "mean": ({"mean.dim"},),
    "amax": ({"amax.default"},),
    "all": ({"all.default", "all.dim"},),
    "softmax": ({"_softmax.default"},),
    "log_softmax": ({"_log_softmax.default"},),
    "nn.functional.embedding": ({"embedding.default"},),
    "index_select": ({"index_select.default"},),
    "gather": ({"gather.default"},),
    "cat": ({"cat.default"},),
    "arange": ({"arange.start_step"},),
    "nn.functional.layer_norm": ({"native_layer_norm.default"},),
    "mm": ({"mm.default"},),
    "bmm": ({"bmm.default"},),
    "addmm": ({"addmm.default"},),
    "nn.functional.linear": ({"addmm.default"}, {"mm.default"}),
    "nn.functional.rms_norm": ({"_fused_rms_norm.default"}, {"mean.dim"}),
    "nn.functional.nll_loss": ({"nll_loss_forward.default"},),
    "nn.functional.cross_entropy": ({"_log_softmax.default", "nll_loss_forward.default"},),
}
# Names whose samples reach an entry that refuses every one of them: each sample must still be
# refused cleanly (a reason, and NotImplementedError from impl for checks_in_impl entries); the
# kernels are checked on the inputs they take in the named test file.
REFUSED_ONLY = {
    "max": ("max.dim", "the samples reduce a 0-d input, a non-last dim or int64 (test_reduction.py)"),
    "cumsum": ("cumsum.default", "the samples scan a 0-d input or a non-last dim (test_reduction.py)"),
}
OPINFO_DTYPES = [torch.float32, torch.bfloat16, torch.int64]
# Samples per dtype; more where the first ones are refused (0-d inputs, non-last dims).
OPINFO_SAMPLES = collections.defaultdict(lambda: 3, {"sum": 8, "mean": 8, "all": 8, "amax": 8})
POINTWISE = {t for t, e in REGISTRY.items() if e.kernel.startswith("flag_gems.pointwise")}


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    return []


def _copy(v):
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, (list, tuple)):
        return type(v)(_copy(x) for x in v)
    return v


def _compare(out, ref, what):
    outs, refs = _tensors(out), _tensors(ref)
    assert len(outs) == len(refs), f"{what} {len(outs)} outputs, native {len(refs)}"
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert o.shape == r.shape and o.dtype == r.dtype, f"{what}[{i}] {o.dtype}{list(o.shape)} vs {r.dtype}{list(r.shape)}"
        if r.dtype in TOLERANCES:
            atol, rtol = TOLERANCES[r.dtype]
            torch.testing.assert_close(o, r, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{what}[{i}] {m}")
        else:
            assert torch.equal(o, r), f"{what}[{i}] differs"


def _run_samples(name, device):
    """Run every registry entry (pointwise excepted) that ``name``'s OpInfo samples reach.

    Returns:
        ``(checked, refused)``: per overload, the calls run by the entry and compared with the
        native kernel, and the calls the entry refused.
    """
    checked, refused = collections.Counter(), collections.Counter()
    for info, dtype, sample in opinfo_samples({name}, OPINFO_DTYPES, OPINFO_SAMPLES[name], device):
        # OpInfo's samples are valid inputs of the op: torch itself raising here is a test failure.
        calls = aten_calls(lambda: info.op(_copy(sample.input), *sample.args, **sample.kwargs))
        for func, args, kwargs in calls:
            entry = REGISTRY.get(func)
            if entry is None or func in POINTWISE:
                continue
            key = str(func).removeprefix("aten.")
            a1, k1 = _copy(list(args)), {n: _copy(v) for n, v in kwargs.items()}
            if entry.supports(*a1, **k1) is not None:
                if entry.checks_in_impl:  # the eager mode relies on impl refusing by itself
                    with pytest.raises(NotImplementedError):
                        entry.impl(*a1, **k1)
                refused[key] += 1
                continue
            ref = func(*_copy(list(args)), **{n: _copy(v) for n, v in kwargs.items()})
            out = entry.impl(*a1, **k1)
            shape = _tensors(ref)[0].shape if _tensors(ref) else ()
            _compare(out, ref, tag(f"{func}[opinfo {info.name}]", shape, dtype))
            checked[key] += 1
    return checked, refused


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_opinfo_samples_through_registry_entries(name, device):
    pytest.importorskip("expecttest")
    checked, refused = _run_samples(name, device)
    alternatives = EXPECTED[name]
    assert any(want <= set(checked) for want in alternatives), (
        f"[opinfo {name}] expected one of {[sorted(w) for w in alternatives]} to run through its entry; "
        f"checked {dict(checked)}, refused {dict(refused)}"
    )


@pytest.mark.parametrize("name", sorted(REFUSED_ONLY))
def test_opinfo_samples_refused_cleanly(name, device):
    pytest.importorskip("expecttest")
    checked, refused = _run_samples(name, device)
    overload, why = REFUSED_ONLY[name]
    assert checked[overload] + refused[overload] > 0, f"[opinfo {name}] no sample reached {overload} ({why})"
