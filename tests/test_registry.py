"""The op registry as a whole: every entry's contract, the registration rules, the policies and the
measurement data they rest on, the flag_gems ops table."""

import dataclasses
import inspect
import os
import subprocess
import sys

import pytest
import torch

import flag_gems  # noqa: F401  (registers every family)
from flag_gems.lowerings import exclusions, registry
from flag_gems.lowerings.registry import (
    FALLBACKS,
    FAST_MIN_SPEEDUP,
    FUSED,
    MEASUREMENTS,
    REGISTRY,
    describe,
    register,
    register_fused,
)
from flag_gems.passes import FUSION_PASSES, OPTION_PASSES

aten = torch.ops.aten
ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.mark.parametrize("target", sorted(REGISTRY, key=str), ids=str)
def test_entry_matches_its_schema(target):
    """impl and supports take exactly the overload's arguments (names, keyword-only ones too)."""
    entry = REGISTRY[target]
    assert target not in FALLBACKS, f"[op={target}] is both lowered and a declared fallback"
    assert entry.kernel and entry.eager.reason and entry.graph.reason and entry.fast.reason
    names = [a.name for a in target._schema.arguments]
    for fn in (entry.impl, entry.supports):
        params = inspect.signature(fn).parameters
        assert list(params) == names, f"[op={target}] {fn.__name__}{inspect.signature(fn)} vs {target._schema}"
        for a in target._schema.arguments:
            kw_only = params[a.name].kind is inspect.Parameter.KEYWORD_ONLY
            assert kw_only == a.kwarg_only, f"[op={target}] {a.name}"


def test_register_rejects_packets_and_duplicates():
    with pytest.raises(TypeError, match=r"name an overload, not the packet aten::add \(one of: .*aten::add.Tensor"):
        register(aten.add, kernel="k", supports=lambda *a: None)
    with pytest.raises(ValueError, match="already registered"):
        register(aten.add.Tensor, kernel="k", supports=lambda *a: None)
    with pytest.raises(ValueError, match="declared fallback"):
        register(next(iter(FALLBACKS)), kernel="k", supports=lambda *a: None)


# --------------------------------------------------------------------------- policies


def _per_call(m):
    """Independent of Measurement.call_ratio: a call waits for the larger of host and device time."""
    if m.ours_host_us is None or m.base_host_us is None:
        return m.ratio
    return max(m.base_us, m.base_host_us) / max(m.ours_us, m.ours_host_us)


def _newest_ratios(data, mode, per_call=False):
    """Independent of the registry's helper: newest ratio per (case, shape, baseline)."""
    best = {}
    for m in data:
        if m.mode == mode:
            k = (m.case, m.shape, m.baseline)
            if k not in best or (m.date, m.source) > best[k][0]:
                best[k] = ((m.date, m.source), _per_call(m) if per_call else m.ratio)
    return [r for _, r in best.values()]


@pytest.mark.parametrize("target", sorted(REGISTRY, key=str), ids=str)
def test_policies_follow_the_data(target):
    """Each entry's three policies are what its measurements and the exclusion records say."""
    e = REGISTRY[target]
    excluded = [x for x in exclusions.EXCLUSIONS if x.op == str(target)]
    assert e.eager.on == (not excluded), f"[op={target}] eager {e.eager}"
    eager_ratios = _newest_ratios(e.data, "eager")
    call_ratios = _newest_ratios(e.data, "eager", per_call=True)
    fast = bool(call_ratios) and min(call_ratios) >= FAST_MIN_SPEEDUP and e.eager.on
    assert e.fast.on == fast, f"[op={target}] fast {e.fast} vs per-call ratios {call_ratios}"
    graph_ratios = _newest_ratios(e.data, "graph")
    if e.graph.on:  # on only with data at or above the bar at every measured shape
        ratios = graph_ratios or eager_ratios
        assert ratios and min(ratios) >= FAST_MIN_SPEEDUP, f"[op={target}] graph {e.graph} vs {ratios}"
        assert e.graph.evidence, f"[op={target}] graph policy on without evidence"
    elif graph_ratios:
        assert min(graph_ratios) < FAST_MIN_SPEEDUP, f"[op={target}] graph data {graph_ratios} says on"


def test_graph_proxy_entries_today():
    # Until graph-mode data exists, the declared proxies with eager data above the bar are lowered
    # in graphs; nothing else is (the rest: no graph-mode measurement).
    on = sorted(str(t) for t, e in REGISTRY.items() if e.graph.on)
    assert on, "the graph side is dead again"
    for t, e in REGISTRY.items():
        if not e.graph.on and not _newest_ratios(e.data, "graph"):
            assert e.graph.reason.startswith(("no graph-mode measurement", "eager-call device time")), (t, e.graph)
    assert {"aten._softmax.default", "aten.cumsum.default", "aten.mean.dim"} <= set(on), on


def test_exclusion_record_turns_the_eager_policy_off(monkeypatch):
    record = exclusions.Exclusion(op="aten.add.Tensor", finding="wrong result for X", input="[3] bf16",
                                  test="tests/x.py::t", date="2026-12-01")
    monkeypatch.setattr(exclusions, "EXCLUSIONS", (record,))
    p = registry.eager_policy("aten.add.Tensor")
    assert not p.on and p.evidence == (record,) and "wrong result for X" in p.reason
    assert registry.eager_policy("aten.mul.Tensor") is registry.EAGER_ON
    assert not registry.fast_policy(REGISTRY[aten.mean.dim].data, p).on  # excluded: not fast either


def test_policy_reasons_render_data_not_prose():
    # Reasons are short policy statements; the figures in them come from the data records.
    for t, e in REGISTRY.items():
        for p, ratio in ((e.eager, None), (e.graph, lambda m: m.ratio), (e.fast, _per_call)):
            assert len(p.reason) < 600, (t, p.reason)
            for m in p.evidence:
                if isinstance(m, registry.Measurement) and ratio(m) < FAST_MIN_SPEEDUP and not p.on:
                    assert f"{m.case} {m.shape} {ratio(m):.2f}x" in p.reason, (t, p.reason)
    e = REGISTRY[aten._softmax.default]
    assert e.graph.on and e.graph.evidence and all(m.op == "aten._softmax.default" for m in e.graph.evidence)


# --------------------------------------------------------------------------- measurement data


def test_every_measurement_belongs_to_an_entry_or_a_flag_gems_op():
    ops = {str(t) for t in REGISTRY} | set(FUSED)
    orphans = sorted({m.op for m in MEASUREMENTS} - ops)
    assert not orphans, orphans
    for m in MEASUREMENTS:
        assert m.mode in ("eager", "graph", "fused") and m.ratio > 0 and m.date[:2] == "20" and m.device, m
        assert abs(m.ratio - m.base_us / m.ours_us) < 0.01 * m.ratio, m


def test_measurements_are_what_the_results_give():
    # lowerings/measurements.py is generated from benchmarks/results/*.json: traceable, not edited.
    script = os.path.join(ROOT, "benchmarks", "make_measurements.py")
    r = subprocess.run([sys.executable, script, "--check"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_measurements_module_is_plain_data():
    import flag_gems.lowerings.measurements as data

    assert data.FIELDS == tuple(f.name for f in dataclasses.fields(registry.Measurement))
    assert all(len(row) == len(data.FIELDS) for row in data.ROWS) and len(MEASUREMENTS) == len(data.ROWS)


# --------------------------------------------------------------------------- flag_gems ops


def _defined_flag_gems_ops():
    return sorted({n.split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith("flag_gems::")})


def test_every_flag_gems_op_is_listed_with_its_kernel():
    assert sorted(FUSED) == _defined_flag_gems_ops()
    for op, f in FUSED.items():
        assert f.kernel.startswith("flag_gems."), (op, f.kernel)
        assert (f.fused_by is None) or (f.fused_by in {**FUSION_PASSES, **OPTION_PASSES}), (op, f.fused_by)
        assert f.graph.on == (f.fused_by is not None), (op, f.graph)
    emitted = {f.fused_by for f in FUSED.values() if f.fused_by}
    assert emitted == set(FUSION_PASSES) | set(OPTION_PASSES), "every fusion pass emits a listed op"


def test_register_fused_rejects_bad_names():
    with pytest.raises(ValueError, match="expected 'flag_gems::<name>'"):
        register_fused("aten::add", kernel="k")
    with pytest.raises(ValueError, match="is not defined"):
        register_fused("flag_gems::no_such_op", kernel="k")
    with pytest.raises(ValueError, match="already listed"):
        register_fused("flag_gems::rms_norm", kernel="k")


# --------------------------------------------------------------------------- describe


def test_describe_lists_every_entry_fallback_and_flag_gems_op_with_figures():
    text = describe()
    lines = text.splitlines()
    for target in list(REGISTRY) + list(FALLBACKS):
        assert any(ln.startswith(str(target) + " ") for ln in lines), target
    for op in FUSED:
        assert any(ln.startswith(op + " ") for ln in lines), op
    # The figures come from the data: the softmax row shows its newest eager ratios.
    row = next(ln for ln in lines if ln.startswith("aten._softmax.default "))
    for m in REGISTRY[aten._softmax.default].fast.evidence:
        assert f"{m.shape} {m.ratio:.2f}x" in row, row
    fused_row = next(ln for ln in lines if ln.startswith("flag_gems::add_rms_norm "))
    assert "vs inductor" in fused_row and "rms_norm" in fused_row


def test_graph_host_policy_is_graph_and_the_per_call_rule():
    # Graphs run op by op from the host: on only where `graph` is on and every newest figure
    # of the same data passes max(host, device) per call (embedding measured 2.3x faster on the
    # device but 0.49x per call at decode on the H200).
    for target, e in REGISTRY.items():
        p = e.graph_policy(cudagraphs=False)
        assert e.graph_policy(cudagraphs=True) is e.graph
        if not e.graph.on:
            assert not p.on, (target, p)
            continue
        mode = "graph" if _newest_ratios(e.data, "graph") else "eager"
        calls = _newest_ratios(e.data, mode, per_call=True)
        assert p.on == (min(calls) >= FAST_MIN_SPEEDUP), (target, p, calls)
    e = REGISTRY[aten.embedding.default]
    assert e.graph.on and not e.graph_policy(cudagraphs=False).on
    assert "embedding.default decode_8x4096 0.49x" in e.graph_policy(cudagraphs=False).reason


def test_host_bound_estimate_tells_decode_from_prefill():
    # One projection and an activation: 8 rows stream the [4096, 4096] weight in ~11 µs, less
    # than two launches take to issue; 2048 rows take ~170 µs of tensor-core time.
    from torch.fx.experimental.proxy_tensor import make_fx

    from flag_gems.passes.lower_aten import DEVICE_BYTES_PER_US, DEVICE_FLOPS_PER_US, HOST_US_PER_KERNEL
    from flag_gems.passes.lower_aten import host_bound, step_estimate

    def f(x, w):
        return torch.relu(x @ w)

    w = torch.empty(4096, 4096, device="meta", dtype=torch.bfloat16)
    for rows, expected in ((8, True), (64, True), (2048, False)):
        gm = make_fx(f, tracing_mode="fake")(torch.empty(rows, 4096, device="meta", dtype=torch.bfloat16), w)
        assert host_bound(gm) is expected, rows
        host_us, device_us = step_estimate(gm)
        gemm_bytes = 2 * (rows * 4096 * 2 + 4096 * 4096)  # x and w read, out written (bf16)
        want = max(gemm_bytes / DEVICE_BYTES_PER_US, 2 * rows * 4096 * 4096 / DEVICE_FLOPS_PER_US)
        want += rows * 4096 * 2 / DEVICE_BYTES_PER_US  # relu's output
        assert host_us == 2 * HOST_US_PER_KERNEL and device_us == pytest.approx(want, rel=0.01), (rows, device_us, want)
