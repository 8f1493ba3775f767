"""Several GPUs in one process, several threads, and a 2-process tensor-parallel decoder (issue 14).

What runs where (``tests/multigpu_cases.py`` holds the ops, the probes and the child process):

- ``multigpu`` (skipped with fewer than 2 CUDA devices): every fused op and ``add_tensor`` on each
  device, on a side stream made current (its inputs written there after a sleep, so a launch on any
  other stream reads stale inputs and fails the float64 check); a fresh process working on
  ``cuda:1`` only (no context and no memory on device 0, compiles attributed to device 1, none on
  repeats), then two threads on two devices at once; the seeds' use case 1 as written; the
  tensor-parallel decoder over NCCL with ``torchrun``.
- Everywhere (the CPU included): the same tensor-parallel script on two processes over gloo, so
  the split, the three modes' equality with the single-device run and the shared tuning cache are
  checked in CI too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import multigpu_cases as mc  # noqa: E402

N_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
multigpu = [pytest.mark.multigpu, pytest.mark.skipif(N_GPUS < 2, reason="needs 2 or more CUDA devices")]
# The device machines' rule, also for the child processes of these tests.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _child_env(**extra) -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", **MULTICAST_OFF, **extra)


# --------------------------------------------------------------------------- one process, each device


def _on_side_stream(case, device: str):
    """``case`` on ``device`` with a new stream current: its inputs are copied in on that stream
    behind a ~20 ms sleep, so only a kernel launched on that stream (in order) sees them."""
    src = case.make(device)
    refs = case.ref(mc.to64(src))
    torch.cuda.synchronize(device)
    stream = torch.cuda.Stream(device=device)
    with torch.cuda.device(device), torch.cuda.stream(stream):
        args = tuple(torch.full_like(a, 7) if a.is_floating_point() else torch.zeros_like(a) for a in src)
        torch.cuda._sleep(20_000_000)  # ~20 ms of GPU cycles, on the side stream
        for a, s in zip(args, src):
            a.copy_(s)
        outs = case.call(args)
    stream.synchronize()
    for n, (out, ref) in enumerate(zip(outs, refs, strict=True)):
        assert out.device == torch.device(device), f"[op={case.name}] output {n} on {out.device}, inputs on {device}"
        mc.assert_close(out, ref, out.dtype, mc.tag(f"{case.name}[{device} side stream] output {n}", out.shape,
                                                    out.dtype))


@pytest.mark.parametrize("case", mc.CASES, ids=mc.CASE_IDS)
@pytest.mark.multigpu
@pytest.mark.skipif(N_GPUS < 2, reason="needs 2 or more CUDA devices")
def test_each_device_and_its_current_stream(case):
    for d in reversed(range(N_GPUS)):  # the last device first: device 0 stays current throughout
        mc.run_case(case, f"cuda:{d}")
        _on_side_stream(case, f"cuda:{d}")
    assert torch.cuda.current_device() == 0


@pytest.mark.multigpu
@pytest.mark.skipif(N_GPUS < 2, reason="needs 2 or more CUDA devices")
def test_threads_one_device_each_at_once():
    """One thread per device, all started together, every case with fresh inputs, three times."""
    errors: list = []
    barrier = threading.Barrier(N_GPUS)

    def work(device):
        try:
            barrier.wait()
            for _ in range(3):
                for case in mc.CASES:
                    mc.run_case(case, device, " thread")
        except BaseException as exc:  # noqa: BLE001  (reported by the main thread)
            errors.append((device, exc))

    threads = [threading.Thread(target=work, args=(f"cuda:{d}",)) for d in range(N_GPUS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.mark.multigpu
@pytest.mark.skipif(N_GPUS < 2, reason="needs 2 or more CUDA devices")
def test_seeds_use_case_1_as_written():
    """``seeds/use-cases.md`` 1, its devices mapped onto the ones present (it names cuda:0..3)."""
    dev = [f"cuda:{d % N_GPUS}" for d in range(4)]
    for d in dev[:3]:
        x = torch.randn(10, device=d)
        out = torch.ops.flag_gems.add_tensor(x, x)
        assert out.device == x.device
        torch.testing.assert_close(out, x + x, rtol=0, atol=0)
    got = {}

    def f(x):
        got["out"] = torch.ops.flag_gems.add_tensor(x, x)

    x = torch.randn(10, device=dev[3])
    t = threading.Thread(target=f, args=(x,))
    t.start()
    t.join()
    torch.testing.assert_close(got["out"], x + x, rtol=0, atol=0)

    def g(x, y):
        return torch.ops.flag_gems.add_tensor(x, y)

    F = torch.compile(g)
    x = torch.randn(2, 1, 3, device="cuda:1", requires_grad=True)
    y = torch.randn(4, 1, device="cuda:1", requires_grad=True)
    out = F(x, y)
    ref = x + y
    assert out.device == torch.device("cuda:1") and out.shape == (2, 4, 3)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(x.grad, grad.sum(1, keepdim=True), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y.grad, grad.sum(0), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- a fresh process on cuda:1


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    """What ``multigpu_cases.py`` saw, run alone on a fresh tuning cache."""
    cache = tmp_path_factory.mktemp("gems_cache")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "multigpu_cases.py")], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=_child_env(GEMS_CACHE_DIR=str(cache)))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _compiles_on(events, device: int) -> bool:
    return bool(events) and all(e[0] == device for e in events)


def _no_repeated_compile(events) -> bool:
    keys = [(e[0], e[2], e[3]) for e in events]
    return len(keys) == len(set(keys))


@pytest.mark.multigpu
@pytest.mark.skipif(N_GPUS < 2, reason="needs 2 or more CUDA devices")
def test_fresh_process_leaves_device_0_alone(child):
    ctx0 = child["ctx0"]
    for when in ("after import", "after cuda:1 (C++ wrappers)", "after cuda:1 (Python launchers)",
                 "after cuda:1 (another thread)"):
        if when in ctx0:
            assert ctx0[when] is False, f"a context on device 0 {when}: {ctx0}"
    assert child["ctx1"] is True
    assert child["memory0"] == {"reserved": 0, "allocated": 0}, child["memory0"]
    assert child["memory1"]["reserved"] > 0


@pytest.mark.multigpu
@pytest.mark.skipif(N_GPUS < 2, reason="needs 2 or more CUDA devices")
def test_fresh_process_compiles_once_per_device(child):
    if not mc.compile_hook_available():
        pytest.skip("this Triton has no jit_post_compile_hook")
    seen = {}
    for name, r in child["cuda1"].items():
        assert all(e[0] == 1 for e in r["first"]), (name, r["first"])
        assert r["repeat"] == [], f"[op={name}] compiled again on a repeat: {r['repeat']}"
        assert _no_repeated_compile(r["first"]), (name, r["first"])
        seen.update({(e[2], e[3]): name for e in r["first"]})
    assert seen, "nothing compiled on cuda:1 in a fresh process"
    # The Python launchers and another thread on cuda:1 reuse what was compiled for it.
    for part in ("python1",):
        for name, r in child[part].items():
            assert all(e[0] == 1 for e in r["first"] + r["repeat"]), (part, name, r)
            assert r["repeat"] == [], (part, name, r)
    for name, r in child["threads"]["thread-cuda1-alone"].items():
        assert r["first"] == [] and r["repeat"] == [], f"[op={name}] recompiled for cuda:1 in another thread: {r}"
    # Device 0, from its own thread while cuda:1 runs in another: compiled for device 0 only, once.
    zero = child["threads"]["thread-cuda0"]
    assert any(_compiles_on(r["first"], 0) for r in zero.values())
    for name, r in zero.items():
        assert all(e[0] == 0 for e in r["first"]) and r["repeat"] == [], (name, r)
        assert _no_repeated_compile(r["first"]), (name, r["first"])
    for name, r in child["threads"]["thread-cuda1"].items():
        assert r["first"] == [] and r["repeat"] == [], (name, r)
    assert child["unattributed"] == []


# --------------------------------------------------------------------------- tensor parallel, 2 processes


def _failed_rows(out, written) -> list[str]:
    """The modes a rank judged failed, with their evidence: a failed check exits 1 with no exception."""
    lines = []
    for name in written:
        with open(os.path.join(out, name), encoding="utf-8") as f:
            rows = json.load(f)
        evidence = {(r.get("rank"), r["provider"]): r["value"] for r in rows if r.get("metric") == "evidence"}
        lines += [f"rank {r.get('rank')} {r['provider']}: passed=False, evidence "
                  f"{json.dumps(evidence.get((r.get('rank'), r['provider'])))}"
                  for r in rows if r.get("metric") == "passed" and not r["value"]]
    return lines


def _torchrun_tp(out, *args, timeout=900, **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "benchmarks", "multigpu_tp.py"), "--out", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=_child_env(**env))
    written = [f for f in os.listdir(out) if f.startswith("multigpu_tp_") and f.endswith(".json")]
    if proc.returncode != 0:
        # The ranks' exception lines and failed checks first: the tail alone is torchrun's summary
        # (a GPU run lost the cause so).
        causes = [ln for ln in proc.stderr.splitlines() if re.search(r"\w+(Error|Exception)\b|^\s*E\s", ln)]
        pytest.fail(f"torchrun exited {proc.returncode}\nfailed checks:\n" + "\n".join(_failed_rows(out, written))
                    + "\ncauses:\n" + "\n".join(causes[:40])
                    + f"\nstdout tail:\n{proc.stdout[-2000:]}\nstderr tail:\n{proc.stderr[-3000:]}")
    assert len(written) == 1, written
    with open(os.path.join(out, written[0]), encoding="utf-8") as f:
        return json.load(f)


def _check_tp_rows(rows, modes, device_prefix):
    """Every rank and mode passed by its own figures; each rank on its own device."""
    cosine = {(r["rank"], r["provider"]): r["value"] for r in rows if r.get("metric") == "cosine"}
    passed = {(r["rank"], r["provider"]): r["value"] for r in rows if r.get("metric") == "passed"}
    assert set(passed) == {(rank, m) for rank in (0, 1) for m in modes}, sorted(passed)
    assert all(passed.values()), passed
    from accuracy import LOGITS_COSINE

    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
        rows[0]["shape"].split()[-2]]
    assert all(c >= LOGITS_COSINE[dtype] for c in cosine.values()), cosine
    devices = {r["rank"]: r["device"] for r in rows if "rank" in r}
    assert all(d.startswith(device_prefix) for d in devices.values()), devices
    if device_prefix == "cuda":
        assert devices[0] != devices[1], devices
    evidence = {(r["rank"], r["provider"]): r["value"] for r in rows if r.get("metric") == "evidence"}
    for rank in (0, 1):
        if "use_gems" in modes:
            assert evidence[(rank, "use_gems")]["gems_ops"], evidence
        if "compiled" in modes:
            ev = evidence[(rank, "compiled")]
            assert ev["fallbacks"] == [] and ev["fused"].get("add_rms_norm", 0) > 0, ev
    cache = next(r["value"] for r in rows if r.get("metric") == "shared_cache")
    assert cache["passed"] == 1, cache
    warnings_ = [r["value"] for r in rows if r.get("metric") == "autotune_warnings"]
    assert warnings_ == [[], []], warnings_  # the autotune warnings each rank caught


def test_tensor_parallel_two_processes_on_the_cpu(tmp_path):
    """gloo, Triton's interpreter, the tiny decoder: the split and the three modes agree with one process.

    The GPUs are hidden from the ranks: with a CUDA device visible, flag_gems detects the nvidia
    backend and ``use_gems()`` registers its kernels on the CUDA key, so on a GPU machine the ranks'
    CPU tensors ran none of them ("no flag_gems kernel ran under use_gems()"). Hidden, the ranks see
    what CI sees."""
    rows = _torchrun_tp(tmp_path, "--device", "cpu", "--size", "tiny", "--iters", "1", CUDA_VISIBLE_DEVICES="")
    assert {r["backend"] for r in rows} == {"gloo"}
    _check_tp_rows(rows, ("eager", "use_gems", "compiled"), "cpu")


@pytest.mark.multigpu
@pytest.mark.skipif(N_GPUS < 2, reason="needs 2 or more CUDA devices")
def test_tensor_parallel_two_gpus_over_nccl(tmp_path):
    out = os.environ.get("GEMS_MULTIGPU_OUT") or tmp_path
    os.makedirs(out, exist_ok=True)
    rows = _torchrun_tp(out, "--device", "cuda")
    assert {r["backend"] for r in rows} == {"nccl"}
    multicast = next(r["value"] for r in rows if r.get("metric") == "multicast_off")
    assert multicast == MULTICAST_OFF, multicast
    _check_tp_rows(rows, ("eager", "use_gems", "compiled"), "cuda")
