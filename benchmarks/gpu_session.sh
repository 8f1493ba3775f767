#!/usr/bin/env bash
# One GPU device call: install, then the named parts in order. Logs and results go to $OUT.
# Usage (on the GPU machine, repo root):
#   bash benchmarks/gpu_session.sh PARTS
# PARTS is a comma-separated list of: tests (GPU test suite incl. gpu/slow tests, 8 xdist workers),
# sweep (launch-heuristic sweep), bench (kernel table, issue 2), model (model table, issue 3),
# ops (op + model table, issue 4), eager (model under eager / use_gems() / preset fast, issue 10), graph (each
# op alone in a compiled graph, aten vs lowered), profile (where the model's time goes), hostprof (host time of eager
# op calls, with a cProfile), retest (pytest on $RETEST), vllm (vLLM mode-3 harness: three contenders and
# the prefill kernel profile), ropeprobe (RoPE probe kernels against Liger, benchmarks/rope_variants.py), tunercheck (the
# autotuner's timer against the benchmarks' on the shipped small-token keys), cpp (C++ runtime host times, incl. the eager-only wrappers), lgroup (grouped
# linears of options fuse_linear against separate ones), precheck (first calls cold with precompile on and off),
# multigpu (tests
# marked multigpu, the 2-process tensor-parallel decoder over NCCL writing its results to $OUT; needs 2 GPUs,
# NVLink multicast off). Each part runs under its own time limit (seconds, overridable
# with e.g. TESTS_S=200) so that the parts chosen for one call end inside the call's 10 minutes.
set -uo pipefail
PROFILE_ARGS=${PROFILE_ARGS:-}  # also SWEEP_ARGS, MODEL_ARGS: extra arguments of those parts
RETEST=${RETEST:-tests}
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gems_out}
mkdir -p "$OUT"
parts=${1:-tests}
t_install=$SECONDS
python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/install.log 2>&1 || { cat /tmp/install.log; exit 1; }
if ls .carry/liger_kernel-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --target /tmp/liger .carry/liger_kernel-*.whl >>/tmp/install.log 2>&1
  export PYTHONPATH=/tmp/liger${PYTHONPATH:+:$PYTHONPATH}
fi
echo "install (with the C++ runtime build): $((SECONDS - t_install)) s"
python3 -c "import flag_gems.c_runtime as c; print('C++ runtime:', c.available, c.reason)" 2>&1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} >"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
rc=0
run_part() {  # name, seconds, command...
  local name=$1 secs=$2
  shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${secs}s)"
  # In its own session, so that what it leaves behind (pytest-xdist workers after a timeout) is
  # killed with it and does not share the GPU and CPUs with the next part.
  setsid timeout "$secs" "$@" >"$OUT/$name.log" 2>&1 &
  local pid=$!
  wait "$pid"
  local st=$?
  pkill -KILL -s "$pid" 2>/dev/null
  echo "=== $name: exit $st after $((SECONDS - t0))s"
  [ "$st" = 0 ] || rc=$st
}
IFS=, read -ra list <<<"$parts"
for part in "${list[@]}"; do
  case $part in
    tests) GEMS_AUTOTUNE=${GEMS_AUTOTUNE:-off} run_part tests "${TESTS_S:-300}" python3 -m pytest tests -q -n ${XDIST:-8} --maxfail=${MAXFAIL:-40} -p no:cacheprovider --runslow -rfE ${TESTS_ARGS:-}
           grep -E "^(FAILED|ERROR)|\] (FAILED|ERROR) " "$OUT/tests.log" | head -40; tail -5 "$OUT/tests.log" ;;
    sweep) run_part sweep "${SWEEP_S:-200}" python3 benchmarks/sweep.py --out "$OUT" ${SWEEP_ARGS:-}
           grep -E "current|best|Error" "$OUT/sweep.log" | tail -40 ;;
    bench) run_part bench "${BENCH_S:-240}" python3 benchmarks/bench_kernels.py --out "$OUT" --time-budget "$(( ${BENCH_S:-240} - 20 ))"
           tail -60 "$OUT/bench.log" ;;
    model) run_part model "${MODEL_S:-240}" python3 benchmarks/bench_model.py --out "$OUT" ${MODEL_ARGS:-}
           tail -30 "$OUT/model.log" ;;
    ops)   run_part ops "${OPS_S:-240}" python3 benchmarks/bench_ops.py --out "$OUT"
           tail -60 "$OUT/ops.log" ;;
    profile) run_part profile "${PROFILE_S:-150}" python3 benchmarks/profile_model.py $PROFILE_ARGS
           grep -vE "^\s+-? *$" "$OUT/profile.log" | tail -120 ;;
    eager) run_part eager "${EAGER_S:-200}" python3 benchmarks/bench_eager.py --out "$OUT" ${EAGER_ARGS:-}
           tail -45 "$OUT/eager.log" ;;
    graph) run_part graph "${GRAPH_S:-240}" python3 benchmarks/bench_ops.py --parts graph --out "$OUT" \
             --time-budget "$(( ${GRAPH_S:-240} - 30 ))" ${GRAPH_ARGS:-}
           tail -80 "$OUT/graph.log" ;;
    hostprof) run_part hostprof "${HOSTPROF_S:-60}" python3 benchmarks/host_profile_ops.py
            grep -E "^== " "$OUT/hostprof.log" ;;
    retest) run_part retest "${RETEST_S:-120}" python3 -m pytest -q -n 8 -p no:cacheprovider --runslow -rfE $RETEST
            tail -15 "$OUT/retest.log" ;;
    vllm)  run_part vllm "${VLLM_S:-240}" python3 benchmarks/bench_vllm.py --quick --profile 3 --out "$OUT" ${VLLM_ARGS:-}
           grep -vE "^\s*$" "$OUT/vllm.log" | tail -60 ;;
    precheck) run_part precheck "${PRECHECK_S:-240}" python3 benchmarks/precompile_check.py --out "$OUT" --inputs prefill_1x2048 decode_8x1
           tail -25 "$OUT/precheck.log" ;;
    ropeprobe) run_part ropeprobe "${ROPEPROBE_S:-150}" python3 benchmarks/rope_variants.py --out "$OUT" ${ROPEPROBE_ARGS:-}
           grep -E "^\| " "$OUT/ropeprobe.log" | tail -80 ;;
    tunercheck) run_part tunercheck "${TUNERCHECK_S:-120}" python3 benchmarks/tuner_timing_check.py --out "$OUT" ${TUNERCHECK_ARGS:-}
           grep -E "^\| " "$OUT/tunercheck.log" | tail -40 ;;
    lgroup) run_part lgroup "${LGROUP_S:-120}" python3 benchmarks/bench_linear_group.py --out "$OUT"
           tail -14 "$OUT/lgroup.log" ;;
    cpp)   run_part cpp "${CPP_S:-180}" python3 benchmarks/bench_cpp.py --out "$OUT" ${CPP_ARGS:-}
           tail -45 "$OUT/cpp.log" ;;
    multigpu) NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 GEMS_MULTIGPU_OUT="$OUT" \
              run_part multigpu "${MULTIGPU_S:-400}" python3 -m pytest -q -p no:cacheprovider -rfEs -m multigpu \
              tests/test_multigpu.py tests/test_cpp_gpu.py
            tail -30 "$OUT/multigpu.log" ;;
    *) echo "unknown part: $part"; rc=2 ;;
  esac
done
exit $rc
