"""The eager-mode benchmark script runs end to end (tiny shapes, CPU interpreter); it measures nothing here."""

import json
import os
import sys

import pytest
import torch


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


def test_bench_ops_graph_part_measures_the_registry_kernel(tmp_path):
    """``--parts graph`` times the entry's kernel (not a generated pointwise kernel, which took
    masked_fill and _to_copy before), and names why an op cannot be lowered in a graph."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import bench_ops

    ops = ["masked_fill.Scalar", "_to_copy[bf16->fp32]", "_fused_rms_norm.default"]
    assert bench_ops.main(["--cpu-smoke", "--parts", "graph", "--out", str(tmp_path), "--ops", *ops]) == 0
    (path,) = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    rows = json.load(open(path))
    speed = {r["op"] for r in rows if r["metric"] == "speed_vs_native"}
    assert speed == {"masked_fill.Scalar", "_to_copy[bf16->fp32]"}, rows
    skipped = {r["op"]: r["value"] for r in rows if r["metric"] == "skipped"}
    why = skipped["_fused_rms_norm.default"]
    if torch.cuda.is_available():
        # torch 2.11 on CUDA fails compiling the op alone (UnboundLocalError inside torch, seen on
        # the H200); the benchmark records the reason as a row either way.
        assert why.startswith("not lowered") or "Error" in why, skipped
    else:
        assert "decomposed before lowering" in why, skipped
