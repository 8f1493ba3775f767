"""``benchmarks/host_costs.py --cpu-smoke``: the script runs every statement it times and writes its rows."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import host_costs  # noqa: E402


def test_host_costs_cpu_smoke(tmp_path):
    assert host_costs.main(["--cpu-smoke", "--out", str(tmp_path)]) == 0
    rows = json.load(open(tmp_path / "host_costs_cpu-smoke.json"))
    names = [r["statement"] for r in rows]
    assert "mm (allocates its output)" in names and "mm out= (a reused buffer)" in names
    assert any(n.startswith("silu_and_mul: torch.ops.flag_gems") for n in names)
    assert all(r["host_us"] > 0 and r["tokens"] == 8 for r in rows)
    assert "| statement | host µs |" in (tmp_path / "host_costs_cpu-smoke.md").read_text()
