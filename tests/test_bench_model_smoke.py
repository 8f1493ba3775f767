"""The model benchmark script runs end to end (tiny config, CPU interpreter); it measures nothing here."""

import json

import pytest

pytest.importorskip("transformers")


def test_bench_model_cpu_smoke(tmp_path):
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import bench_model

    assert bench_model.main(["--cpu-smoke", "--out", str(tmp_path)]) == 0
    rows = json.load(open(tmp_path / "model_cpu-smoke.json"))
    got = {(r["input"], r["provider"], r["metric"]) for r in rows}
    for inp in ("prefill_1x16", "decode_2x1"):
        for prov in ("eager", "flag_gems"):
            for metric in ("ms", "first_call_s", "cosine_vs_eager"):
                assert (inp, prov, metric) in got, rows
        # the backend's own kernel count of the compiled graphs, per layer
        assert (inp, "flag_gems", "static_kernels_per_layer") in got, rows
        # the backend's share of the first call: its stages, then the graphs' first run, within the call
        stage = {r["metric"]: r["value"] for r in rows if r["input"] == inp and r["provider"] == "flag_gems"}
        assert 0 < stage["backend_compile_s"] and 0 < stage["graph_first_run_s"], stage
        assert stage["backend_compile_s"] + stage["graph_first_run_s"] <= stage["first_call_s"], stage
    assert "| input | eager | ours |" in (tmp_path / "model_cpu-smoke.md").read_text()
    host = [r["value"] for r in rows if r["metric"] == "host_ms"]
    assert host and min(host) > 0
    cos = [r["value"] for r in rows if r["metric"] == "cosine_vs_eager"]
    assert min(cos) > 0.999
    table = (tmp_path / "model_cpu-smoke.md").read_text()
    assert "| input | eager | ours |" in table and "Targets (issue 11)" in table


def test_bench_model_has_the_issue_columns():
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import bench_model

    assert list(bench_model.CONTENDERS) == [
        "eager", "inductor", "inductor_reduce_overhead", "flag_gems", "flag_gems_reduce_overhead",
        "flag_gems_inductor", "flag_gems_inductor_cudagraphs", "flag_gems_fuse_linear",
        "flag_gems_fuse_linear_reduce_overhead"]
    assert {"prefill_1x2048", "decode_1x1", "decode_8x1", "decode_64x1"} <= set(bench_model.INPUTS)
