"""The C++-runtime benchmark script runs end to end (tiny shapes, CPU interpreter); it measures nothing here."""

import json
import os
import sys

import pytest

from flag_gems import c_runtime


@pytest.mark.skipif(not c_runtime.available, reason=f"C++ runtime unavailable: {c_runtime.reason}")
def test_bench_cpp_cpu_smoke(tmp_path):
    pytest.importorskip("transformers")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import bench_cpp

    keys = c_runtime.installed_keys()
    assert bench_cpp.main(["--cpu-smoke", "--out", str(tmp_path), "--ops", "add_tensor", "rms_norm", "mul.Tensor"]) == 0
    assert c_runtime.installed_keys() == keys  # the script put the registrations back
    rows = json.load(open(tmp_path / "cpp_cpu-smoke.json"))
    got = {(r["op"], r["provider"], r["metric"], r["shape"]) for r in rows}
    for op in ("add_tensor", "rms_norm"):
        for m in ("M=1", "M=8"):
            for prov in ("native", "python", "cpp", "eager_python", "eager_cpp"):
                assert (op, prov, "host_us", m) in got, (op, prov, m)
    assert ("rms_norm", "cpp_dispatcher", "host_us", "M=1") in got
    for prov in ("native", "eager_python", "eager_cpp"):  # mul.Tensor: served in the eager mode only
        assert ("mul.Tensor", prov, "host_us", "M=1") in got, prov
    assert ("mul.Tensor", "cpp", "host_us", "M=1") not in got
    speeds = {r["provider"] for r in rows if r["metric"] == "speed_vs_eager"}
    assert speeds == {"use_gems_cpp", "use_gems_python", "use_gems_all_cpp", "use_gems_all_python"}
    cos = [r["value"] for r in rows if r["metric"] == "cosine_vs_eager"]
    assert cos and min(cos) > 0.999
    assert (tmp_path / "cpp_cpu-smoke.md").exists()
