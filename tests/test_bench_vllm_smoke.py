"""The vLLM mode-3 benchmark runs end to end (tiny decoder, CPU, post-grad graphs); it measures nothing here."""

import json
import os
import sys


def test_bench_vllm_cpu_smoke(tmp_path, fresh_dynamo):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import bench_vllm
    import vllm_harness

    assert bench_vllm.main(["--cpu-smoke", "--out", str(tmp_path), "--profile", "1"]) == 0
    rows = json.load(open(tmp_path / "vllm_cpu-smoke.json"))
    got = {(r["shape"], r["provider"], r["metric"]) for r in rows}
    for inp in ("decode_b2", "prefill_16"):
        for prov in ("inductor", "flag_gems_pass", "flag_gems_pass_inline"):
            assert (inp, prov, "ms") in got, rows
    cos = [r["value"] for r in rows if r["metric"] == "cosine_vs_fp32"]
    assert len(cos) == 6 and min(cos) >= vllm_harness.LOGITS_COSINE, cos
    fused = {r["metric"] for r in rows if r["provider"] == "flag_gems_pass" and r["metric"].startswith("fused_")}
    assert {"fused_rms_norm", "fused_add_rms_norm", "fused_act_and_mul", "fused_rotary_embedding"} <= fused, fused
    assert not any(r["metric"].startswith("fused_") for r in rows if r["provider"] == "inductor")
    assert (tmp_path / "vllm_cpu-smoke.md").exists()
    # --profile: per-kernel (CPU: per-op) rows of the prefill step for both contenders, in the table too.
    prof = {r["provider"] for r in rows if r["metric"] == "prefill_kernel_us" and r["value"] > 0 and r["kernel"]}
    assert prof == {"inductor", "flag_gems_pass", "flag_gems_pass_inline"}, prof
    assert "Prefill, per step, by kernel" in (tmp_path / "vllm_cpu-smoke.md").read_text()
