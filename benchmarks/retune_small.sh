#!/usr/bin/env bash
# One GPU call (session 9): check the autotuner's new timer against the benchmarks', re-tune the
# shipped small-token keys of the row-wise families with it, merge them into the shipped table,
# then measure the kernels at M = 1 / 64 and the model's decode steps on the merged table.
# Run from the repo root on the GPU machine; results under $OUT (the merged table included).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gems_out}
mkdir -p "$OUT"
TABLE=kernels/tuned/NVIDIA_H200.json
TUNERCHECK_S=120 bash benchmarks/gpu_session.sh tunercheck >"$OUT/session.log" 2>&1
grep -E "^\| " "$OUT/tunercheck.log" | tail -9
timeout 200 python3 -m flag_gems.pretune --ops rms_norm act_and_mul rope --tokens 1 64 --force \
  --cache-dir /tmp/pt_small --export "$OUT/tuned_small.json" --json "$OUT/pretune_small.json" --quiet 2>&1 | tail -6
python3 benchmarks/merge_tuned.py --into "$TABLE" "$OUT/tuned_small.json" && cp "$TABLE" "$OUT/NVIDIA_H200.json"
timeout 150 python3 benchmarks/bench_kernels.py --ms 1 64 --out "$OUT" >"$OUT/bench.log" 2>&1
grep -E "^\| (1|64) \|" "$OUT/bench.log"
timeout 150 python3 benchmarks/rope_variants.py --ms 1 64 --warps 4 --out "$OUT" >"$OUT/ropeprobe.log" 2>&1
grep -E "resolved|public|liger" "$OUT/ropeprobe.log" | tail -12
timeout "${MODEL_S:-200}" python3 benchmarks/bench_model.py --out "$OUT" --inputs decode_1x1 decode_8x1 decode_64x1 \
  --contenders inductor inductor_reduce_overhead flag_gems flag_gems_reduce_overhead flag_gems_fuse_linear \
  flag_gems_fuse_linear_reduce_overhead --rounds 5 >"$OUT/model.log" 2>&1
tail -28 "$OUT/model.log"
