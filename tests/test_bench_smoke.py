"""The kernel benchmark script runs end to end on tiny shapes (CPU interpreter here, the GPU when there is one).

It measures nothing meaningful at these sizes; the point is that every (op, contender, M) cell
produces its rows, the files are written, and the outputs agree with eager.
"""

import json
import math
import os
import sys

BENCH_DIR = os.path.join(os.path.dirname(__file__), "..", "benchmarks")

EXPECTED = {
    "add_rms_norm": ("eager", "flag_gems"),
    "silu_and_mul": ("eager", "flag_gems", "flag_gems_ab"),
    "rope": ("eager", "flag_gems"),
}
META = ("gpu", "torch", "triton", "liger", "git", "date")


def _bench():
    if BENCH_DIR not in sys.path:
        sys.path.insert(0, BENCH_DIR)
    import bench_kernels

    return bench_kernels


def _load(tmp_path):
    files = list(tmp_path.glob("kernels_smoke_*.json"))
    assert len(files) == 1, files
    assert files[0].with_suffix(".md").exists()
    return json.load(open(files[0])), files[0].with_suffix(".md").read_text()


def test_bench_kernels_cpu_smoke(tmp_path):
    assert _bench().main(["--cpu-smoke", "--out", str(tmp_path)]) == 0
    rows, md = _load(tmp_path)
    skipped = [r for r in rows if r["metric"] == "skipped"]
    assert not skipped, skipped
    for r in rows:
        for key in META:
            assert r.get(key), f"[row={r}] missing {key}"
    got = {(r["op"], r["provider"], r["M"], r["metric"]): r["value"] for r in rows}
    for op, providers in EXPECTED.items():
        assert f"### {op}" in md
        for p in providers:
            for M in (1, 3):
                for metric in ("device_us", "host_us", "gbps", "pct_copy"):
                    v = got.get((op, p, M, metric))
                    assert v is not None and math.isfinite(v) and v > 0, f"[op={op} provider={p} M={M}] {metric}={v}"
                if p != "eager":
                    diff = got[(op, p, M, "max_rel_diff")]
                    assert diff < 2e-2, f"[op={op} provider={p} M={M}] output differs from eager: {diff}"
                if p.startswith("flag_gems"):
                    assert math.isfinite(got[(op, p, M, "vs_best_other")])
    assert math.isfinite(got[("copy", "torch", 1 << 20, "gbps")])


def test_bench_kernels_skips_are_rows(tmp_path):
    # An exhausted time budget (like a missing contender) is recorded, never a crash.
    args = ["--cpu-smoke", "--ops", "rope", "--ms", "2", "--providers", "eager", "--time-budget", "0", "--out", str(tmp_path)]
    assert _bench().main(args) == 0
    rows, md = _load(tmp_path)
    cells = [r for r in rows if r["op"] == "rope"]
    assert [(r["provider"], r["M"], r["metric"]) for r in cells] == [("eager", 2, "skipped")]
    assert "time budget" in cells[0]["value"] and "eager skipped" in md
