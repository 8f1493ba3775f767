"""PyTorch's OpInfo sample inputs through the non-pointwise registry entries (reductions, softmax,
indexing, layer_norm, GEMMs): every aten call a sample makes that an entry takes is run by the
entry and compared with the native kernel on the same inputs. (The pointwise family has its own
OpInfo test in test_pointwise.py.)"""

import pytest
import torch

from accuracy import TOLERANCES, aten_calls, opinfo_samples, tag
from flag_gems.lowerings.registry import REGISTRY

OPINFO_NAMES = {
    "sum", "mean", "amax", "max", "all", "softmax", "log_softmax", "nn.functional.embedding", "index_select",
    "gather", "cat", "cumsum", "arange", "nn.functional.layer_norm", "mm", "bmm", "addmm", "nn.functional.linear",
    "nn.functional.rms_norm", "to", "nn.functional.nll_loss", "nn.functional.cross_entropy",
}
OPINFO_DTYPES = [torch.float32, torch.bfloat16, torch.int64]
OPINFO_SAMPLES = 3


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


def test_opinfo_samples_through_registry_entries(device):
    pytest.importorskip("expecttest")
    pointwise = {t for t, e in REGISTRY.items() if e.kernel.startswith("flag_gems.pointwise")}
    checked, refused = set(), set()
    for info, dtype, sample in opinfo_samples(OPINFO_NAMES, OPINFO_DTYPES, OPINFO_SAMPLES, device):
        try:
            calls = aten_calls(lambda: info.op(_copy(sample.input), *sample.args, **sample.kwargs))
        except Exception:
            continue  # torch refuses this sample
        for func, args, kwargs in calls:
            entry = REGISTRY.get(func)
            if entry is None or func in pointwise:
                continue
            a1, k1 = _copy(list(args)), {n: _copy(v) for n, v in kwargs.items()}
            if entry.supports(*a1, **k1) is not None:
                if entry.checks_in_impl:  # the eager mode relies on impl refusing by itself
                    with pytest.raises(NotImplementedError):
                        entry.impl(*a1, **k1)
                    refused.add(str(func).removeprefix("aten."))
                continue
            ref = func(*_copy(list(args)), **{n: _copy(v) for n, v in kwargs.items()})
            out = entry.impl(*a1, **k1)
            shape = _tensors(ref)[0].shape if _tensors(ref) else ()
            _compare(out, ref, tag(f"{func}[opinfo {info.name}]", shape, dtype))
            checked.add(str(func).removeprefix("aten."))
    assert len(checked) >= 14, sorted(checked)  # 15 on torch 2.13 (CPU)
    assert len(refused) >= 5, sorted(refused)  # int64 samples and other refusals of checks_in_impl entries
