"""benchmarks/bench_tune.py runs end to end on tiny shapes (the CPU interpreter here): every phase writes
its rows, the shipped-table file is written, nothing is skipped. It measures nothing meaningful."""

import json
import math
import os
import sys

from flag_gems.kernels import _autotune as at

BENCH_DIR = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


def _bench():
    if BENCH_DIR not in sys.path:
        sys.path.insert(0, BENCH_DIR)
    import bench_tune

    return bench_tune


def test_bench_tune_cpu_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMS_CACHE_DIR", str(tmp_path / "unused"))  # restored afterwards; the script sets its own
    monkeypatch.delenv("GEMS_AUTOTUNE", raising=False)
    try:
        rc = _bench().main(["--cpu-smoke", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
                            "--no-subprocess"])
    finally:
        at.clear_memory()
    assert rc == 0
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 3 and any(f.startswith("tuned_") for f in files), files
    rows = json.loads(next(out.glob("tune_smoke_*.json")).read_text())
    assert not [r for r in rows if r["metric"] in ("skipped", "error")], [r for r in rows if r["metric"] in (
        "skipped", "error")]
    metrics = {(r["section"], r["metric"]) for r in rows}
    for want in (("first_call", "first_call_before_ms"), ("first_call", "first_call_after_ms"), ("tune", "tune_s"),
                 ("tune", "tuned_us"), ("kernels", "device_us"), ("gemm_tune", "native_us"), ("gemm", "vs_cublas")):
        assert want in metrics, want
    provs = {r["provider"] for r in rows if r["section"] == "kernels" and r["metric"] == "device_us"}
    assert {"eager", "flag_gems", "flag_gems_tuned", "flag_gems_untuned"} <= provs
    for r in rows:
        if r["metric"] in ("device_us", "tune_s", "vs_cublas"):
            assert math.isfinite(r["value"]) and r["value"] > 0, r
    table = json.loads(next(out.glob("tuned_*.json")).read_text())
    kernels = {e["kernel"] for e in table["entries"]}
    assert {"act_and_mul", "rope", "rms_norm", "matmul"} <= kernels
    md = next(out.glob("tune_smoke_*.md")).read_text()
    assert "### GEMM: tuned Triton vs cuBLAS" in md and "### Kernels vs contenders" in md
