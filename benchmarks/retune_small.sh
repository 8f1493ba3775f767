#!/usr/bin/env bash
# One GPU call (session 9): the autotuner's timer against the benchmarks' candidate by candidate,
# a re-tune of the shipped small-token keys of the row-wise families with it, merged into the
# shipped table, then the kernels at M = 1 / 64 on the merged table (MODEL=1: the model's decode
# steps too). Run from the repo root on the GPU machine; results under $OUT (the merged table
# included; logs stay in /tmp, as the device returns only a few files).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gems_out}
mkdir -p "$OUT" /tmp/rt
TABLE=kernels/tuned/NVIDIA_H200.json
python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/rt/install.log 2>&1 || { tail /tmp/rt/install.log; exit 1; }
timeout 200 python3 benchmarks/tuner_timing_check.py --candidates --tokens 64 --out /tmp/rt >/tmp/rt/check.log 2>&1
grep -E "pick" /tmp/rt/check.log; cp /tmp/rt/tuner_timing_*.md "$OUT/"
timeout 200 python3 -m flag_gems.pretune --ops rms_norm act_and_mul rope --tokens 1 64 --force \
  --cache-dir /tmp/pt_small --export /tmp/rt/tuned_small.json --json "$OUT/pretune_small.json" --quiet 2>&1 | tail -5
python3 benchmarks/merge_tuned.py --into "$TABLE" /tmp/rt/tuned_small.json && cp "$TABLE" "$OUT/NVIDIA_H200.json"
timeout 150 python3 benchmarks/bench_kernels.py --ms 1 64 --out /tmp/rt >/tmp/rt/bench.log 2>&1
grep -E "^\| (1|64) \|" /tmp/rt/bench.log; cp /tmp/rt/kernels_*.md "$OUT/"
timeout 120 python3 benchmarks/rope_variants.py --ms 1 64 --warps 4 >/tmp/rt/ropeprobe.log 2>&1
grep -E "resolved|public" /tmp/rt/ropeprobe.log | tail -8
if [ "${MODEL:-0}" = 1 ]; then
  timeout "${MODEL_S:-200}" python3 benchmarks/bench_model.py --out /tmp/rt --inputs decode_1x1 decode_8x1 decode_64x1 \
    --contenders inductor inductor_reduce_overhead flag_gems flag_gems_reduce_overhead --rounds 5 >/tmp/rt/model.log 2>&1
  tail -16 /tmp/rt/model.log; cp /tmp/rt/model_*.md "$OUT/"
fi
