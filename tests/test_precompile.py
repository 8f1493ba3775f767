"""Precompile (``kernels/_precompile.py``): record mode, a graph's launches, forked compile workers, the hook.

Without a GPU, the worker side still runs for real: a child process (compiled Triton, no interpreter)
records the launches of a graph of our ops on fake CUDA tensors and compiles them for sm_90 in forked
workers into an empty Triton cache; a second, fresh process replays the same launches on real (CPU)
tensors through ``FastKernel`` and Triton's JIT, which must find every kernel in that cache (a launch
then fails: there is no GPU to load it on). That proves the keys agree across processes, the
generated pointwise kernels' included. The children are this file run as a script.
"""

import os
import sys

if __name__ == "__main__":  # a child process: compiled Triton (set before Triton decorates any kernel)
    os.environ["TRITON_INTERPRET"] = "0"

import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import operator  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import flag_gems  # noqa: E402
from flag_gems import graph_precompile  # noqa: E402
from flag_gems.kernels import _common, _launch, _precompile  # noqa: E402
from flag_gems.kernels._launch import FastKernel, launches_traced  # noqa: E402
from flag_gems.kernels._precompile import PrecompileResult, TensorArg, compile_records, recording_launches  # noqa: E402
from flag_gems.options import CompileOptions  # noqa: E402

HERE = os.path.abspath(__file__)


def _toy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n, other=0.0) * 2, mask=offs < n)


def _toy_kernel() -> FastKernel:
    # JITFunction directly: in the interpreter (this process) ``jit`` gives no FastKernel.
    return FastKernel(JITFunction(_toy))


# --------------------------------------------------------------------------- record mode (this process)


def test_recorded_launches_compile_and_launch_nothing():
    k = _toy_kernel()
    x, y = torch.randn(64), torch.empty(64)
    with recording_launches() as recs:
        assert launches_traced()  # the autotuner never tunes a recorded launch
        assert k[(4,)](x, y, 64, BLOCK=16, num_warps=2) is None
        assert k.run(x, y, 64, grid=(4,), warmup=False, BLOCK=16) is None  # generated launchers call run
    assert not launches_traced() and _launch._recording == 0
    assert not k._compiled and not k._uncached and not k.fn.device_caches
    # the recorded key is the one FastKernel computes for the launch itself (a broken record fails here)
    assert [r.key for r in recs] == [k._bind(x, y, 64, BLOCK=16, num_warps=2)[1], k._bind(x, y, 64, BLOCK=16)[1]]
    assert recs[0].args == (TensorArg(torch.float32, True), TensorArg(torch.float32, True), 64, 16)
    assert recs[0].options == (("num_warps", 2),) and recs[1].options == ()
    assert recs[0].device == 0 and recs[0].name == "_toy"


@pytest.mark.parametrize("offset", [0, 1, 3, 8, 16], ids=lambda o: f"offset{o}")
def test_fake_tensor_alignment_from_storage_offset(offset):
    k = _toy_kernel()
    real = torch.empty(128, dtype=torch.bfloat16)[offset:offset + 64]  # CPU allocations are 64-byte aligned
    with FakeTensorMode():
        fake = torch.empty(128, dtype=torch.bfloat16).as_strided((64,), (1,), offset)
    with recording_launches() as recs:
        k[(1,)](fake, fake, 64, BLOCK=16)
    assert recs[0].args[0] == TensorArg(torch.bfloat16, offset * 2 % 16 == 0)
    assert recs[0].key == k._bind(real, real, 64, BLOCK=16)[1]


def test_record_mode_is_per_thread():
    seen = []
    with recording_launches():
        t = threading.Thread(target=lambda: seen.append(launches_traced()))
        t.start()
        t.join()
    assert seen == [False]


def test_unkeyed_argument_raises_in_record_mode():
    k = _toy_kernel()
    with recording_launches() as recs, pytest.raises(Exception):
        k[(1,)](torch.empty(4), torch.empty(4), object(), BLOCK=16)
    assert recs == []


# --------------------------------------------------------------------------- the workers (this process, forked)


class _Job:
    """A stand-in record: what the worker calls (``device``, ``warmup``)."""

    device = 0

    def __init__(self, what):
        self.name = what

    def warmup(self):
        if self.name == "fail":
            raise ValueError("boom")
        if self.name == "hang":
            time.sleep(600)
        if self.name == "die":
            os._exit(3)


def _reaped(pid) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def test_failed_dead_and_hung_jobs_are_ignored(monkeypatch, recwarn):
    pids, fork = [], os.fork

    def recording_fork():
        pid = fork()
        if pid:
            pids.append(pid)
        return pid

    monkeypatch.setattr(_precompile.os, "fork", recording_fork)
    monkeypatch.setattr(_common, "_WARNED", set())
    jobs = [_Job("ok"), _Job("fail"), _Job("hang"), _Job("ok"), _Job("die")]
    got = compile_records(jobs, target="sm_90", timeout_s=3.0, max_workers=5)
    assert got.jobs == 5 and got.compiled == 2 and got.failed == 3, got
    assert got.workers == len(pids) == min(5, _precompile._cpus())
    assert any("fail: ValueError: boom" in e for e in got.errors), got.errors
    assert all(_reaped(pid) for pid in pids)  # the hung worker was killed, every worker waited for
    # The wait the user sat through is said once; failed and dead jobs are not (DEBUG log).
    said = [str(w.message) for w in recwarn if "precompile" in str(w.message)]
    assert len(said) == 1 and "still compiling after 3 s were killed" in said[0], said  # the hang's worker
    compile_records([_Job("hang"), _Job("ok")], target="sm_90", timeout_s=1.0, max_workers=2)
    assert len([w for w in recwarn if "precompile" in str(w.message)]) == 1
    assert "2 Triton kernels" in got.note() and "3 failed or timed out" in got.note()


class _Compiled:
    """A stand-in ``CompiledKernel``: what ``_build_launcher`` reads."""

    def __init__(self, name):
        self.src, self.metadata = f"src-{name}", f"md-{name}"


class _KernelJob(_Job):
    """A job whose warmup returns a compiled kernel (as ``JITFunction.run(warmup=True)`` does)."""

    def warmup(self):
        return _Compiled(self.name)


def test_workers_build_each_compiled_kernels_launcher(monkeypatch, tmp_path):
    """Each worker builds the launcher of what it compiled (Triton <= 3.6 compiles one C module per
    signature at a kernel's first launch); a launcher that fails to build leaves the compile counted."""
    built = tmp_path / "built"
    built.mkdir()

    class _Launcher:  # stands in for CudaLauncher: records its arguments in a file (workers are processes)
        def __init__(self, src, metadata):
            if src == "src-broken":
                raise RuntimeError("no host compiler")
            (built / f"{src}+{metadata}").touch()

    monkeypatch.setattr(_precompile, "_launcher_cls", lambda: _Launcher)
    jobs = [_KernelJob("a"), _KernelJob("broken"), _KernelJob("b"), _Job("ok")]
    got = compile_records(jobs, target="sm_90", timeout_s=10.0, max_workers=2)
    assert got.compiled == 4 and got.failed == 0, got
    assert sorted(p.name for p in built.iterdir()) == ["src-a+md-a", "src-b+md-b"]


def test_forks_stop_when_forking_is_slow(monkeypatch):
    """A process with a large memory forks slowly: past FORK_BUDGET_S no more workers start, and their
    jobs are left to the first run."""
    monkeypatch.setattr(_precompile, "FORK_BUDGET_S", 0.0)
    got = compile_records([_Job("ok") for _ in range(4)], target="sm_90", max_workers=4)
    assert got.workers == 1 and got.jobs == 4
    planned = min(4, _precompile._cpus())  # workers planned; the first one has jobs[0::planned]
    assert got.compiled == len(range(0, 4, planned)) and got.failed == 4 - got.compiled, got


def test_no_fork_or_no_driver_warns_once_and_compiles_nothing(monkeypatch):
    def no_fork():
        raise OSError("Resource temporarily unavailable")

    monkeypatch.setattr(_common, "_WARNED", set())
    monkeypatch.setattr(_precompile.os, "fork", no_fork)
    with pytest.warns(RuntimeWarning, match="no precompile worker process could be started"):
        got = compile_records([_Job("ok"), _Job("ok")], target="sm_90")
    assert got.workers == 0 and got.failed == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile_records([_Job("ok")], target="sm_90")
    monkeypatch.undo()
    assert compile_records([], target="sm_90").jobs == 0
    if torch.cuda.is_available():
        return  # the driver half below needs a machine without a GPU driver
    monkeypatch.setattr(_common, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="cannot be precompiled"):  # no target given, no GPU driver here
        assert compile_records([_Job("ok")]).failed == 1


# --------------------------------------------------------------------------- the compiler warm-up


@pytest.fixture
def fresh_warm(monkeypatch):
    """No warm-up started yet in this process; the target and the compile are stand-ins (records)."""
    calls = []
    monkeypatch.setattr(_precompile, "_warm_thread", None)
    monkeypatch.setattr(_precompile, "_target", lambda device: f"target-{device}")
    monkeypatch.setattr(_precompile, "_warm_compile", lambda target: calls.append(
        (target, threading.current_thread().name)))
    yield calls
    _precompile.join_warm()


def test_warm_up_runs_once_per_process_in_a_thread(fresh_warm):
    assert _precompile.warm_compiler(1) is True
    assert _precompile.warm_compiler(0) is False  # once per process
    _precompile.join_warm()
    assert fresh_warm == [("target-1", "flag_gems-warm-triton")]


def test_a_warm_up_that_fails_is_only_a_debug_line(fresh_warm, monkeypatch, caplog):
    def boom(target):
        raise RuntimeError("no ptxas")

    monkeypatch.setattr(_precompile, "_warm_compile", boom)
    with caplog.at_level("DEBUG", logger=_precompile.logger.name):
        assert _precompile.warm_compiler(0) is True
        _precompile.join_warm()
    assert "compiler warm-up failed: RuntimeError: no ptxas" in caplog.text


def test_no_target_no_warm_up_ever(fresh_warm, monkeypatch):
    def no_driver(device):
        raise RuntimeError("no GPU driver")

    monkeypatch.setattr(_precompile, "_target", no_driver)
    assert _precompile.warm_compiler(0) is False
    monkeypatch.setattr(_precompile, "_target", lambda device: "target")
    assert _precompile.warm_compiler(0) is False and fresh_warm == []  # not retried


def test_workers_are_forked_only_after_the_warm_up(fresh_warm, monkeypatch):
    """Forking while another thread is inside the compiler could leave a worker with its locks held."""
    finished, at_fork, fork = [], [], os.fork

    def slow(target):
        time.sleep(0.3)
        finished.append(target)

    def recording_fork():
        pid = fork()
        if pid:
            at_fork.append(list(finished))
        return pid

    monkeypatch.setattr(_precompile, "_warm_compile", slow)
    monkeypatch.setattr(_precompile.os, "fork", recording_fork)
    assert _precompile.warm_compiler(0)
    got = compile_records([_Job("ok"), _Job("ok")], target="sm_90", max_workers=2)
    assert got.compiled == 2 and at_fork and all(f == ["target-0"] for f in at_fork), (got, at_fork)


def test_the_backend_warms_up_only_for_cuda_graphs_it_will_precompile(fresh_warm, monkeypatch):
    assert graph_precompile.warm_up([torch.ones(2)]) is False  # the interpreter here: nothing to warm
    monkeypatch.setattr(graph_precompile, "_enabled", lambda: True)
    assert graph_precompile.warm_up([torch.ones(2), 3]) is False  # no CUDA tensor
    with FakeTensorMode():
        x = torch.empty(2, device="cuda:1")
    assert graph_precompile.warm_up([3, x]) is True
    _precompile.join_warm()
    assert fresh_warm == [("target-1", "flag_gems-warm-triton")]


def test_the_warm_up_kernel_compiles_for_sm90():
    """The real ``_warm_compile`` in a child with compiled Triton (no GPU needed: a target is given)."""
    code = ("import os; os.environ['TRITON_INTERPRET'] = '0'\n"
            "from triton.backends.compiler import GPUTarget\n"
            "from flag_gems.kernels import _precompile\n"
            "_precompile._warm_compile(GPUTarget('cuda', 90, 32)); print('compiled')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TRITON_INTERPRET="0"))
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


# --------------------------------------------------------------------------- the option and the hook


def test_option_and_env():
    assert CompileOptions.from_user(None, {}).precompile is True
    assert CompileOptions.from_user(None, {"precompile": False}).precompile is False
    with pytest.raises(TypeError, match="precompile"):
        CompileOptions.from_user(None, {"precompile": "no"})


def test_applies_only_to_compiled_triton_on_cuda(monkeypatch):
    from torch import fx

    g = fx.Graph()
    x = g.placeholder("x")
    with FakeTensorMode():
        x.meta["val"] = torch.empty(4, device="cuda")
    g.output(x)
    gm = fx.GraphModule(torch.nn.Module(), g)
    monkeypatch.setattr(graph_precompile, "interpreter_mode", lambda: True)
    assert not graph_precompile.precompile_applies(gm)  # the interpreter's kernels compile nothing
    monkeypatch.setattr(graph_precompile, "interpreter_mode", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert graph_precompile.precompile_applies(gm)
    monkeypatch.setenv("GEMS_PRECOMPILE", "0")
    assert not graph_precompile.precompile_applies(gm)
    monkeypatch.delenv("GEMS_PRECOMPILE")
    with FakeTensorMode():
        x.meta["val"] = torch.empty(4)
    assert not graph_precompile.precompile_applies(gm)  # a CPU graph


def _f(x, w):
    return (x * w).sigmoid() + 1.0


def test_hook_runs_once_per_graph_and_is_reported(monkeypatch, fresh_dynamo):
    calls = []

    def precompile_graph(gm, policy=None, **_):
        calls.append(policy)
        return PrecompileResult(jobs=3, compiled=3, workers=2)

    monkeypatch.setattr(graph_precompile, "precompile_applies", lambda gm: True)
    monkeypatch.setattr(graph_precompile, "precompile_graph", precompile_graph)
    x, w = torch.randn(4, 8), torch.randn(8)
    g = flag_gems.explain(_f, x, w, options={"strict": True}).graphs[0]
    assert calls == ["cache"]  # the graph's autotune policy
    assert "inference precompile" in g.timings
    assert "precompiled 3 Triton kernels (inference graph) in 2 processes" in g.notes

    calls.clear()
    torch._dynamo.reset()
    g = flag_gems.explain(_f, x, w, options={"strict": True, "precompile": False}).graphs[0]
    assert calls == [] and not [s for s in g.timings if "precompile" in s]


def test_a_graphs_first_run_waits_for_the_warm_up(fresh_warm, monkeypatch, fresh_dynamo):
    """The first run's own compiles come after the warm-up's (never two compiles at once): a warm-up
    still running when the compile ends (released then, done 0.5 s later) is done when the first call
    returns."""
    from flag_gems import backend

    compiled, done = threading.Event(), []

    def slow(target):
        compiled.wait(30)
        time.sleep(0.5)
        done.append(target)

    finish = backend.GemsCompiler._finish

    def finish_and_release(self, report):
        finish(self, report)
        compiled.set()

    monkeypatch.setattr(_precompile, "_warm_compile", slow)
    monkeypatch.setattr(backend.GemsCompiler, "_finish", finish_and_release)
    monkeypatch.setattr(graph_precompile, "warm_up", lambda inputs: _precompile.warm_compiler(0))
    x, w = torch.randn(4, 8), torch.randn(8)
    torch.compile(_f, backend="flag_gems")(x, w)
    assert done == ["target-0"]


def test_the_backend_starts_the_warm_up_before_tracing(monkeypatch, fresh_dynamo):
    seen = []
    monkeypatch.setattr(graph_precompile, "warm_up", lambda inputs: seen.append([tuple(t.shape) for t in inputs]))
    x, w = torch.randn(4, 8), torch.randn(8)
    flag_gems.explain(_f, x, w, options={"strict": True})
    assert seen == [[(4, 8), (8,)]]
    seen.clear()
    torch._dynamo.reset()
    flag_gems.explain(_f, x, w, options={"strict": True, "precompile": False})
    assert seen == []


def test_hook_never_runs_in_the_interpreter(monkeypatch, fresh_dynamo):
    def precompile_graph(*args, **kwargs):
        raise AssertionError("precompile ran under the interpreter")

    monkeypatch.setattr(graph_precompile, "precompile_graph", precompile_graph)
    x, w = torch.randn(4, 8), torch.randn(8)
    g = flag_gems.explain(_f, x, w, options={"strict": True}).graphs[0]
    assert not [s for s in g.timings if "precompile" in s] and not [n for n in g.notes if "precompile" in n]


# --------------------------------------------------------------------------- records agree with the C++ launches


def _launch_spec(fn, args, kwargs, backend):
    """A launch of ``fn`` as Triton keys it: per parameter its specialization (constexprs by value),
    and the parsed options."""
    sig = inspect.signature(fn.fn)
    names = list(sig.parameters)
    bound = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in names})
    bound.apply_defaults()
    spec = [(n, v if "constexpr" in str(p.annotation) else _launch._record_spec(v))
            for (n, p), v in zip(sig.parameters.items(), bound.arguments.values())]
    return spec, backend.parse_options({k: v for k, v in kwargs.items() if k not in names}).__dict__


def test_python_launchers_and_cpp_wrappers_launch_alike(cpp_dev, monkeypatch):
    """What we record (the ops' Python launchers) is what the C++ wrappers, which compiled graphs call
    on a GPU, launch: same specialization, same options (otherwise the precompiled kernel is not the one
    the first run looks up). Seen where the wrappers' launches go through Python (the CPU registration);
    on a GPU they launch from C++, and ``benchmarks/precompile_check.py`` shows the same thing from the
    other side: every Triton compile of a first run a disk hit (H200, 2026-12-03: 12 of 12, 10 of 10)."""
    if cpp_dev == "cuda":
        pytest.skip("the C++ wrappers launch from C++ on a GPU: precompile_check.py's disk-hit column checks this there")
    from torch._library import custom_ops
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    from flag_gems.kernels import act_and_mul, rms_norm, rotary_embedding

    monkeypatch.setenv("GEMS_AUTOTUNE", "off")
    backend = make_backend(GPUTarget("cuda", 90, 32))
    seen = []
    for fn in (rms_norm._rms_norm_fwd_kernel, act_and_mul._act_and_mul_fwd_kernel, rotary_embedding._rope_kernel):
        def run(*args, grid, warmup, _fn=fn, _run=fn.run, **kwargs):
            seen.append(_launch_spec(_fn, args, kwargs, backend))
            return _run(*args, grid=grid, warmup=warmup, **kwargs)

        monkeypatch.setattr(fn, "run", run)

    def impl(name):
        return custom_ops.OPDEFS[f"flag_gems::{name}"]._init_fn

    bf = torch.bfloat16
    x, w = torch.randn(8, 4096, dtype=bf, device=cpp_dev), torch.randn(4096, dtype=bf, device=cpp_dev)
    r = torch.randn_like(x)
    a, b = torch.randn(8, 1024, dtype=bf, device=cpp_dev), torch.randn(8, 1024, dtype=bf, device=cpp_dev)
    q, k = torch.randn(1, 32, 8, 128, dtype=bf, device=cpp_dev), torch.randn(1, 8, 8, 128, dtype=bf, device=cpp_dev)
    cos, sin = torch.randn(1, 8, 128, dtype=bf, device=cpp_dev), torch.randn(1, 8, 128, dtype=bf, device=cpp_dev)
    for name, args in (("add_rms_norm", (x, r, w, 1e-5)), ("rms_norm", (x, w, 1e-5)), ("silu_and_mul", (a, b)),
                       ("rotary_embedding_hf", (q, k, cos, sin))):
        seen.clear()
        impl(name)(*args)
        python = list(seen)
        seen.clear()
        getattr(torch.ops.flag_gems, name)(*args)
        assert len(python) == 1 and seen == python, f"[op={name}] C++ {seen} vs Python {python}"


# --------------------------------------------------------------------------- the worker side for real (children)


def _child_env(cache_dir):
    env = dict(os.environ)
    env.update(TRITON_INTERPRET="0", TRITON_CACHE_DIR=cache_dir, GEMS_CACHE_DIR=os.path.join(cache_dir, "gems"))
    env.pop("GEMS_AUTOTUNE", None)
    return env


@pytest.fixture(scope="module")
def children(tmp_path_factory):
    """Run the record-and-compile child, then the fresh replay child, on one empty Triton cache."""
    tmp = tmp_path_factory.mktemp("precompile")
    cache = str(tmp / "triton")
    os.makedirs(cache)
    out = {}
    for phase in ("compile", "replay"):
        path = str(tmp / f"{phase}.json")
        proc = subprocess.run([sys.executable, HERE, phase, path], env=_child_env(cache), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, f"[phase={phase}] child failed:\n{proc.stderr[-4000:]}"
        out[phase] = json.load(open(path))
    return out


def test_a_graphs_records(children):
    got = children["compile"]
    # 9 nodes of ours, one with symbolic sizes; 8 launches, 6 distinct (a fused_add_rms_norm like the
    # add_rms_norm, an aligned offset like no offset)
    assert got["stats"] == {"nodes": 9, "skipped": 1, "launches": 8}, got["stats"]
    assert sorted(r["name"] for r in got["records"]) == sorted(
        ["_rms_norm_fwd_kernel"] * 3 + ["_act_and_mul_fwd_kernel", "_rope_kernel", got["fused_name"]])
    assert got["unaligned_x"] == [False], got  # the rms_norm on a 6-byte offset: x unaligned, the rest aligned
    assert got["keys_match"] and got["nothing_compiled"], got
    assert got["target_kinds"] == ["function", "op"], got  # direct calls and a mutable op's OpOverload


def test_workers_compile_every_record_into_the_cache(children):
    got = children["compile"]
    assert got["result"]["compiled"] == got["result"]["jobs"] == 6 and got["result"]["failed"] == 0, got["result"]
    assert got["cache_entries"] >= 6
    assert got["precompiled_skipped"]


def test_a_fresh_process_finds_every_kernel_in_the_cache(children):
    got = children["replay"]
    assert len(got["hits"]) == 6 and all(h == [True] for h in got["hits"].values()), got["hits"]
    assert got["control"] == [False], got  # another launch config: compiled, not found


def test_records_use_the_configs_of_the_run_under_the_cache_policy(children):
    assert children["compile"]["cache_policy_keys_match"], children["compile"]["cache_policy_mismatch"]


def test_check_script_cpu_smoke(tmp_path):
    pytest.importorskip("transformers")
    script = os.path.join(os.path.dirname(HERE), "..", "benchmarks", "precompile_check.py")
    proc = subprocess.run([sys.executable, script, "--cpu-smoke", "--inputs", "decode_2x1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.load(open(tmp_path / "precompile_cpu-smoke.json"))
    got = {(r["provider"], r["metric"]): r["value"] for r in rows}
    for mode in ("on", "off"):
        assert got[(f"flag_gems_precompile_{mode}", "first_call_s")] > 0
        assert got[(f"flag_gems_precompile_{mode}", "precompile_s")] == 0  # the interpreter: a no-op
    assert got[("flag_gems_precompile_on", "logits_sum")] == got[("flag_gems_precompile_off", "logits_sum")]
    assert "| decode_2x1 | on |" in (tmp_path / "precompile_cpu-smoke.md").read_text()


# --------------------------------------------------------------------------- the children's code


def _graph():
    """A post-pass graph of our ops on fake CUDA tensors: functional ops as direct calls, a mutable op,
    a generated pointwise kernel, offset inputs (aligned and not) and a node with symbolic sizes."""
    from torch import fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from flag_gems.passes.direct_calls import direct_calls
    from flag_gems.passes.pointwise_fusion import fuse_pointwise

    fg = torch.ops.flag_gems
    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env)
    g = fx.Graph()

    def ph(name, shape, offset=0, dtype=torch.bfloat16):
        n = g.placeholder(name)
        with mode:
            base = torch.empty(offset + math.prod(shape), dtype=dtype, device="cuda")
            n.meta["val"] = base.as_strided(shape, [math.prod(shape[i + 1:]) for i in range(len(shape))], offset)
        return n

    def call(target, args, val):
        n = g.call_function(target, args)
        with mode:
            n.meta["val"] = val(*[a.meta["val"] if isinstance(a, fx.Node) else a for a in args])
        return n

    def like(t, *_):
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    def pair(a, b, *_):
        return like(a), like(b)

    x, r, w = ph("x", (8, 4096)), ph("r", (8, 4096)), ph("w", (4096,))
    x8, x3 = ph("x8", (8, 4096), offset=8), ph("x3", (8, 4096), offset=3)
    a, b = ph("a", (8, 14336)), ph("b", (8, 14336))
    q, k, cos, sin = ph("q", (1, 32, 8, 128)), ph("k", (1, 8, 8, 128)), ph("cos", (1, 8, 128)), ph("sin", (1, 8, 128))
    xs = g.placeholder("xs")
    with mode:
        xs.meta["val"] = torch.empty(env.create_unbacked_symint(), 4096, dtype=torch.bfloat16, device="cuda")
    h = call(fg.add_rms_norm.default, (x, r, w, 1e-5), lambda x, r, *_: (like(x), like(x)))
    outs = [call(operator.getitem, (h, 0), lambda t, i: t[i])]
    outs.append(call(fg.fused_add_rms_norm.default, (x, r, w, 1e-5), lambda *_: None))
    outs.append(call(fg.rms_norm.default, (x, w, 1e-5), like))
    outs.append(call(fg.rms_norm.default, (x8, w, 1e-5), like))
    outs.append(call(fg.rms_norm.default, (x3, w, 1e-5), like))
    outs.append(call(fg.rms_norm.default, (xs, w, 1e-5), like))
    outs.append(call(fg.silu_and_mul.default, (a, b), like))
    outs.append(call(fg.rotary_embedding_hf.default, (q, k, cos, sin), pair))
    s = call(torch.ops.aten.sigmoid.default, (a,), like)
    outs.append(call(torch.ops.aten.mul.Tensor, (s, b), like))
    g.output(tuple(outs))
    gm = fx.GraphModule(torch.nn.Module(), g)
    assert fuse_pointwise(gm) == 1
    direct_calls(gm)
    return gm


def _cpu_stand_ins():
    """This build has no CUDA: what the launchers ask of it on fake CUDA tensors (device 0, an SM count)."""
    from flag_gems.kernels import _common

    torch._C._cuda_getDevice = lambda: 0
    _common._cuda_sms = lambda index: 132


def _real(arg):
    """A CPU tensor specialized as the recorded one (CPU allocations are 64-byte aligned)."""
    if not isinstance(arg, TensorArg):
        return arg
    base = torch.zeros(64, dtype=arg.dtype)
    return base if arg.aligned else base[1:]


def _child_compile(out_path):
    from torch import fx
    from triton.backends.compiler import GPUTarget

    from flag_gems.kernels import _autotune

    _cpu_stand_ins()
    gm = _graph()
    cache_dir = os.environ["TRITON_CACHE_DIR"]
    records, stats = graph_precompile.collect(gm, "off")
    got = {"stats": stats, "records": [{"name": r.name, "args": repr(r.args), "options": r.options} for r in records]}
    got["fused_name"] = next(n.target.gems_launch.kernel.name for n in gm.graph.nodes if hasattr(n.target, "gems_launch"))
    got["target_kinds"] = sorted({"op" if isinstance(n.target, torch._ops.OpOverload) else "function"
                                  for n in gm.graph.nodes if graph_precompile._python_impl(n) is not None})
    unaligned = [r for r in records if any(isinstance(a, TensorArg) and not a.aligned for a in r.args)]
    got["unaligned_x"] = [r.args[0].aligned for r in unaligned]
    got["keys_match"] = all(r.kernel._bind(*map(_real, r.args), **dict(r.options))[1] == r.key for r in records)
    got["nothing_compiled"] = not os.listdir(cache_dir) and not any(r.kernel._compiled for r in records)
    got["result"] = vars(compile_records(records, target=GPUTarget("cuda", 90, 32)))
    got["cache_entries"] = len(os.listdir(cache_dir))
    # The cache policy (compiled graphs' default) with the H200's shipped table: the records' configs
    # against those the run resolves (the oracle: the same launchers with nothing recorded or fake in the
    # autotuner's view).
    again, _ = graph_precompile.collect(gm, "off")
    got["precompiled_skipped"] = not again  # precompiled in this process: a later graph's collect skips them
    _precompile._PRECOMPILED.clear()
    _autotune._DEVICE_NAMES[0] = "NVIDIA H200"
    for t in _autotune.TUNABLES.values():
        t._table.clear()
    recorded, _ = graph_precompile.collect(gm, "cache")
    for t in _autotune.TUNABLES.values():
        t._table.clear()
    _autotune._fake_tracing = lambda: False
    _launch.launches_traced = lambda: False
    oracle, _ = graph_precompile.collect(gm, "cache")
    mismatch = [a.name for a, b in zip(recorded, oracle) if a.key != b.key]
    got["cache_policy_keys_match"] = len(recorded) == len(oracle) and not mismatch
    got["cache_policy_mismatch"] = mismatch
    assert isinstance(gm, fx.GraphModule)
    json.dump(got, open(out_path, "w"))


def _child_replay(out_path):
    from triton.backends.compiler import GPUTarget

    _cpu_stand_ins()
    target = GPUTarget("cuda", 90, 32)

    class Driver:  # what FastKernel and the JIT ask before the launch
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return target

    triton.runtime.driver.set_active(Driver())
    hits = []
    triton.knobs.compilation.listener = lambda *, cache_hit=None, **_: hits.append(cache_hit)

    def replay(rec, **options):
        hits.clear()
        try:
            rec.kernel[(1,)](*map(_real, rec.args), **dict(rec.options, **options))
        except Exception:  # noqa: BLE001 - compiled (or found), then no GPU to load it on
            pass
        return list(hits)

    records, _ = graph_precompile.collect(_graph(), "off")
    got = {"hits": {f"{i}:{r.name}": replay(r) for i, r in enumerate(records)}}
    got["control"] = replay(next(r for r in records if r.name == "_rms_norm_fwd_kernel"), num_warps=1)
    json.dump(got, open(out_path, "w"))


if __name__ == "__main__":
    {"compile": _child_compile, "replay": _child_replay}[sys.argv[1]](sys.argv[2])
