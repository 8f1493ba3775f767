"""The eager-mode benchmark script runs end to end (tiny shapes, CPU interpreter); it measures nothing here."""

import json
import os
import sys

import pytest


def test_bench_ops_cpu_smoke(tmp_path):
    pytest.importorskip("transformers")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import bench_ops

    assert bench_ops.main(["--cpu-smoke", "--out", str(tmp_path), "--ops", "add.Tensor", "mul.Scalar"]) == 0
    rows = json.load(open(tmp_path / "ops_cpu-smoke.json"))
    got = {(r["op"], r["provider"], r["metric"]) for r in rows}
    for op in ("add.Tensor", "mul.Scalar"):
        for prov in ("native", "flag_gems"):
            assert (op, prov, "device_us") in got and (op, prov, "host_us") in got, rows
    cos = [r["value"] for r in rows if r["metric"] == "cosine_vs_eager"]
    assert cos and min(cos) > 0.999
