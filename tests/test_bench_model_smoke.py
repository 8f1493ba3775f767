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
            assert (inp, prov, "cosine_vs_eager") in got, rows
    cos = [r["value"] for r in rows if r["metric"] == "cosine_vs_eager"]
    assert min(cos) > 0.999
