#!/usr/bin/env bash
# One GPU session: install, GPU test suite, kernel benchmark. Logs and results go to $OUT.
# Usage (on the GPU machine, repo root): bash benchmarks/gpu_session.sh [tests|bench|model|ops|all] [extra bench args]
# Each part fits one device call (< 10 min); 'all' runs the three in sequence.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gems_out}
mkdir -p "$OUT"
what=${1:-all}
shift || true
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
if ls .carry/liger_kernel-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --target /tmp/liger .carry/liger_kernel-*.whl >>"$OUT/install.log" 2>&1
  export PYTHONPATH=/tmp/liger${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv >"$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
rc=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  timeout 330 python3 -m pytest tests -q --maxfail=25 -p no:cacheprovider --runslow 2>&1 | tee "$OUT/tests_gpu.log" | tail -25
  rc=${PIPESTATUS[0]}
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  python3 benchmarks/bench_kernels.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | tail -80
fi
if [ "$what" = model ] || [ "$what" = all ]; then
  python3 benchmarks/bench_model.py --out "$OUT" 2>&1 | tee "$OUT/model.log" | tail -30
fi
if [ "$what" = ops ] || [ "$what" = all ]; then
  python3 benchmarks/bench_ops.py --out "$OUT" 2>&1 | tee "$OUT/ops.log" | tail -45
fi
exit $rc
