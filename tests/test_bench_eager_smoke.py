"""The issue-10 benchmark scripts run end to end on tiny inputs (CPU interpreter here), and graph-mode
rows reach the registry's graph policy through make_measurements.py. They measure nothing here."""

import json
import os
import sys

import pytest

from flag_gems.lowerings.registry import REGISTRY

BENCH_DIR = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)


def test_bench_eager_cpu_smoke(tmp_path):
    pytest.importorskip("transformers")
    import bench_eager

    assert bench_eager.main(["--cpu-smoke", "--out", str(tmp_path)]) == 0
    rows = json.load(open(tmp_path / "eager_model_cpu-smoke.json"))
    cell = {(r["op"], r["provider"], r["shape"], r["metric"]): r["value"] for r in rows}
    for shape in bench_eager.SMOKE_INPUTS:
        for mode in bench_eager.MODES:
            assert cell[("llama_4layer", mode, shape, "ms")] > 0
            assert cell[("llama_4layer", mode, shape, "cosine_vs_eager")] > 0.999
        # every entry vs the fast preset (the entries measured faster per call: possibly none), and the
        # forward really ran our kernels
        fast = sum(e.fast.on for e in REGISTRY.values())
        assert cell[("llama_4layer", "use_gems", shape, "ops_registered")] > fast
        assert cell[("llama_4layer", "use_gems_fast", shape, "ops_registered")] == fast
        assert cell[("llama_4layer", "use_gems", shape, "gems_calls")] > 0
        per_op = [k for k in cell if k[2] == shape and k[3] == "host_us_per_call" and k[1] == "use_gems"]
        assert len(per_op) == 5 and all(k[0].startswith("aten::") for k in per_op)
    text = (tmp_path / "eager_model_cpu-smoke.md").read_text()
    assert "use_gems_fast" in text and "Host µs per call" in text


def test_bench_ops_graph_part_cpu_smoke(tmp_path):
    import bench_ops

    assert bench_ops.main(["--cpu-smoke", "--out", str(tmp_path), "--parts", "graph",
                           "--ops", "_softmax.default", "cat.default"]) == 0
    rows = json.load(open(tmp_path / "ops_graph_cpu-smoke.json"))
    got = {(r["op"], r["provider"], r["metric"]) for r in rows}
    for op in ("_softmax.default", "cat.default"):  # cat: a list argument, lowered too
        for prov in ("graph_native", "graph_flag_gems"):
            assert (op, prov, "device_us") in got and (op, prov, "host_us") in got, rows
        assert (op, "graph_flag_gems", "speed_vs_native") in got
    assert all(r.get("dtype") == "bfloat16" for r in rows if r["metric"] == "speed_vs_native")


def test_graph_rows_set_the_graph_policy(tmp_path):
    # A results file with graph-mode rows (as bench_ops --parts graph writes them on a GPU) becomes
    # Measurement rows of mode "graph", and graph data decides the graph policy over the proxy.
    import make_measurements

    from flag_gems.lowerings import registry

    meta = dict(gpu="TEST GPU", torch="x", triton="x", liger="x", git="x", date="2030-01-01T00:00:00")
    rows = []
    for shape, (native, ours) in {"decode_8x4096": (3.0, 2.0), "prefill_4096x4096": (50.0, 55.0)}.items():
        for provider, us in (("graph_native", native), ("graph_flag_gems", ours)):
            rows.append(dict(meta, op="_softmax.default", provider=provider, shape=shape, dtype="bfloat16",
                             metric="device_us", value=us))
        rows.append(dict(meta, op="_softmax.default", provider="graph_flag_gems", shape=shape, dtype="bfloat16",
                         metric="speed_vs_native", value=native / ours))
    path = tmp_path / "ops_TEST_GPU_2030-01-01.json"
    path.write_text(json.dumps(rows))
    got = [dict(zip(make_measurements.FIELDS, r)) for r in make_measurements.collect([str(path)])]
    assert {(g["mode"], g["shape"], g["ratio"]) for g in got} == {
        ("graph", "decode_8x4096", 1.5), ("graph", "prefill_4096x4096", 0.909)}
    data = tuple(registry.Measurement(**g) for g in got)
    proxy_data = registry.REGISTRY[registry.aten._softmax.default].data
    assert registry.graph_policy(proxy_data, proxy=True).on  # today: the eager-data proxy
    p = registry.graph_policy(proxy_data + data, proxy=True)  # graph data supersedes it: slower at prefill
    assert not p.on and "0.91x" in p.reason and "compiled graph" in p.reason
