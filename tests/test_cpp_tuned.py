"""The C++ wrappers launch with the autotuner's config, as the Python launchers do.

What is checked, per tunable family the C++ wrappers launch (rms_norm, act_and_mul, rope,
pointwise, matmul, reduction), through the public functions and the eager mode's aten
wrappers:

- with a tuned config in the user cache (a non-heuristic candidate, keyed by the Python
  launcher's own ``tune_key`` for the same inputs), the C++ launch runs that config: read
  after the call from what the launch through Triton recorded (constexprs, warps, stages),
  and the result matches float64;
- the second call of a key asks the Python side nothing (``tune_queries`` unchanged) and the
  C++ table holds the config;
- capture: a heuristic answered during CUDA-graph capture is not kept (each call asks again),
  a cached config is;
- ``GEMS_AUTOTUNE=off``: the C++ heuristic runs and equals the Python family's heuristic;
- a re-tune (``Tunable.tune`` with a fake timer) or ``clear_memory`` drops the C++ copies;
- matmul's ``NATIVE`` and tensor-descriptor configs go where the Python entries send them.

On the CPU the wrappers are registered as the CPU kernels (every launch goes through the
hook to Triton's interpreter); the GPU tests at the end also check the C++ launch cache.
"""

import pytest
import torch
import torch.nn.functional as F

import flag_gems
from accuracy import GEMM_RTOL, TOLERANCES, rand
from flag_gems import c_runtime
from flag_gems.kernels import _autotune as at
from flag_gems.kernels import _tune_cache as cache
from flag_gems.kernels import act_and_mul as kact
from flag_gems.kernels import matmul as km
from flag_gems.kernels import pointwise as kpw
from flag_gems.kernels import reduction as kred
from flag_gems.kernels import rms_norm as krms
from flag_gems.kernels import rotary_embedding as krope

aten = torch.ops.aten
fg = torch.ops.flag_gems


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture
def dev(cpp_dev):
    """The device whose ops the C++ wrappers serve (conftest's ``cpp_dev``), its launch cache empty
    on a GPU: every first call below is a miss, so its launch is recorded."""
    if cpp_dev == "cuda":
        torch.ops.flag_gems_cpp.clear_cache()
    return cpp_dev


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A private tuning cache, the default policy, no shipped tables, nothing remembered (Python or C++)."""
    monkeypatch.setenv("GEMS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("GEMS_AUTOTUNE", raising=False)
    monkeypatch.delenv("GEMS_AUTOTUNE_MARGIN", raising=False)
    monkeypatch.setattr(cache, "_SHIPPED", {})
    monkeypatch.setattr(at, "_SHIPPED_DIR", str(tmp_path / "shipped"))
    at.clear_memory()
    c_runtime._last_launch.clear()
    yield tmp_path
    at.clear_memory()


def index(device: str) -> int:
    """The autotuner's device index of a tensor on ``device`` (``Tensor.get_device()``)."""
    return torch.cuda.current_device() if device == "cuda" else -1


def queries() -> int:
    return c_runtime.tune_queries()


def launches() -> int:
    s = c_runtime.stats()
    return s["cpp_launches"] + s["python_launches"]


def other_config(name: str, key: tuple, dev_index: int) -> dict:
    """A candidate of ``name`` for ``key`` that is not the heuristic (plain tiles for matmul)."""
    t = at.TUNABLES[name]
    default = t.as_tuple(t._default(key, dev_index))
    for c in t.candidates(key, dev_index):
        c = t._with_native(c, False)
        if t.as_tuple(c) != default and c.get("KIND", "plain") == "plain":
            return c
    raise AssertionError(f"[{name} key={key}] no candidate other than the heuristic")


def seed(name: str, key: tuple, dev_index: int, config: dict) -> None:
    """Write ``config`` as the tuned record of ``key`` in the user cache (what a tuning run leaves)."""
    t = at.TUNABLES[name]
    result = at.TuneResult(name, key, dict(config), "tuned", best_us=1.0, default_us=2.0)
    assert cache.store(t, key, at.device_name(dev_index), result) is not None


def ran_with(kernel: str, config: dict, what: str) -> None:
    """The last recorded launch of ``kernel`` ran ``config`` (its constexprs, warps and stages)."""
    rec = c_runtime.last_launch(kernel)
    assert rec is not None, f"[{what}] no launch of {kernel} recorded"
    checked = 0
    for field, value in config.items():
        if field in ("num_warps", "num_stages"):
            got = rec[field]
        elif field in rec["constexprs"]:
            got = rec["constexprs"][field]
        else:
            assert field in ("KIND", "WARP_SPEC", "NATIVE"), f"[{what}] config field {field} not in the launch"
            continue
        assert got == value, f"[{what}] {field}: launched {got}, config {value} (launch {rec})"
        checked += 1
    assert checked >= 2, f"[{what}] only {checked} fields compared"


def close(out, ref, what):
    atol, rtol = TOLERANCES[out.dtype]
    torch.testing.assert_close(out.double().cpu(), ref.double().cpu(), atol=atol, rtol=rtol,
                               msg=lambda m: f"[{what}] {m}")


def gemm_close(out, a, b, what):
    ref = a.double() @ b.double()
    bound = GEMM_RTOL[out.dtype] * a.shape[-1] ** 0.5 * (a.double().abs() @ b.double().abs()) + 1e-6
    err = (out.double() - ref).abs()
    assert bool((err <= bound).all()), f"[{what}] max err {err.max().item()}"


def rms_ref(x, w, eps=1e-6):
    xd = x.double()
    return xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def rope_ref(x, cos, sin, pos):
    """Rotate-half with half tables ``[max_pos, r/2]`` at rows ``pos`` (float64); dims past r unchanged."""
    half = cos.shape[-1]
    c, s = cos.double()[pos].unsqueeze(-2), sin.double()[pos].unsqueeze(-2)
    xd = x.double()
    out = xd.clone()
    x1, x2 = xd[..., :half], xd[..., half:2 * half]
    out[..., :half] = x1 * c - x2 * s
    out[..., half:2 * half] = x2 * c + x1 * s
    return out


# --------------------------------------------------------------------------- the cases

class Case:
    """One public call that reaches a C++ wrapper: inputs, the call, its float64 check and the
    Python launcher's tuning key for the same inputs."""

    def __init__(self, id, family, kernel, make, call, check, key):
        self.id, self.family, self.kernel = id, family, kernel
        self.make, self.call, self.check, self.key = make, call, check, key


def _cases():
    f32, f16, bf = torch.float32, torch.float16, torch.bfloat16

    def rms_make(dtype, rows, cols, residual):
        def make(d):
            args = [rand(rows, cols, dtype=dtype, device=d)]
            if residual:
                args.append(rand(rows, cols, dtype=dtype, device=d))
            return args + [rand(cols, dtype=dtype, device=d)]
        return make

    def fused_check(args, out):  # args were updated in place; the reference was taken before
        x0, r0, w = out["before"]
        h = (x0.double() + r0.double()).to(x0.dtype)
        close(args[1], h, "fused_add_rms_norm h")
        close(args[0], rms_ref(h, w), "fused_add_rms_norm y")

    def fused_call(a):
        before = [t.clone() for t in a]
        flag_gems.fused_add_rms_norm(a[0], a[1], [a[0].shape[-1]], a[2], 1e-6)
        return {"before": before}

    def aten_rms(a):
        with flag_gems.use_gems(include=["_fused_rms_norm"]):
            return aten._fused_rms_norm(a[0], [a[0].shape[-1]], a[1], 1e-6)[0]

    # RoPE's GPU candidates are head blocks of 64-4096 pairs (2-32 per thread): with 4 q heads and a
    # rotary half of 16 pairs or fewer the heuristic is the only one (no config to seed), so the
    # rotary halves here are 32 and 21 pairs (head_dim 64; the partial one odd, as masks need).
    rope_d = 64

    def rope_make(dtype, rot):
        def make(d):
            return (rand(2, 3, 4, rope_d, dtype=dtype, device=d), rand(2, 3, 2, rope_d, dtype=dtype, device=d),
                    rand(9, rot // 2, device=d), rand(9, rot // 2, device=d), torch.randint(0, 9, (2, 3), device=d))
        return make

    def rope_check(a, out):
        q, k, cos, sin, pos = a
        close(out[0], rope_ref(q, cos, sin, pos), "rope q")
        close(out[1], rope_ref(k, cos, sin, pos), "rope k")

    def rope_key(a, copy_pass):
        q, k, cos = a[0], a[1], a[2]
        return krope.tune_key(6, 4, 2, cos.shape[1], q.shape[-1], q.dtype, copy_pass, False, False)

    def eager(include, fn):
        def call(a):
            with flag_gems.use_gems(include=include):
                return fn(*a)
        return call

    def mm_make(dtype, m, k, n, kmajor=False, batch=None):
        def make(d):
            lead = (batch,) if batch is not None else ()
            a = rand(*lead, m, k, dtype=dtype, device=d)
            b = rand(*lead, n, k, dtype=dtype, device=d).mT if kmajor else rand(*lead, k, n, dtype=dtype, device=d)
            return a, b
        return make

    return [
        Case("rms_norm(public)", "rms_norm", "rms_norm_fwd", rms_make(f32, 5, 96, False),
             lambda a: flag_gems.rms_norm(a[0], [96], a[1], 1e-6),
             lambda a, out: close(out, rms_ref(a[0], a[1]), "rms_norm"),
             lambda a: krms.tune_key(5, 96, a[0].dtype, False)),
        Case("add_rms_norm(public)", "rms_norm", "rms_norm_fwd", rms_make(bf, 3, 64, True),
             lambda a: flag_gems.add_rms_norm(a[0], a[1], a[2], 1e-6),
             lambda a, out: (close(out[1], a[0].double() + a[1].double(), "add_rms_norm h"),
                             close(out[0], rms_ref(out[1], a[2]), "add_rms_norm y")),
             lambda a: krms.tune_key(3, 64, a[0].dtype, True)),
        Case("fused_add_rms_norm(public)", "rms_norm", "rms_norm_fwd", rms_make(f16, 7, 48, True),
             fused_call, fused_check, lambda a: krms.tune_key(7, 48, a[0].dtype, True)),
        Case("_fused_rms_norm(aten)", "rms_norm", "rms_norm_fwd", rms_make(f32, 2, 40, False), aten_rms,
             lambda a, out: close(out, rms_ref(a[0], a[1]), "_fused_rms_norm"),
             lambda a: krms.tune_key(2, 40, a[0].dtype, False)),
        Case("silu_and_mul(public)", "act_and_mul", "act_and_mul_fwd",
             lambda d: (rand(3, 5, 72, dtype=bf, device=d), rand(3, 5, 72, dtype=bf, device=d)),
             lambda a: flag_gems.silu_and_mul(*a),
             lambda a, out: close(out, F.silu(a[0].double()) * a[1].double(), "silu_and_mul"),
             lambda a: kact.tune_key(15, 72, a[0].dtype)),
        Case("apply_rotary_pos_emb(public)", "rope", "rope", rope_make(f32, rope_d),
             lambda a: flag_gems.apply_rotary_pos_emb(*a), rope_check, lambda a: rope_key(a, False)),
        Case("apply_rotary_pos_emb(partial rot)", "rope", "rope", rope_make(f16, 42),
             lambda a: flag_gems.apply_rotary_pos_emb(*a), rope_check, lambda a: rope_key(a, True)),
        Case("add.Tensor(aten)", "pointwise", "pointwise",
             lambda d: (rand(3, 33, device=d), rand(33, device=d)), eager(["add.Tensor"], torch.add),
             lambda a, out: close(out, a[0].double() + a[1].double(), "add.Tensor"),
             lambda a: kpw.tune_key(99)),
        Case("mm(aten)", "matmul", "matmul", mm_make(f32, 33, 40, 17), eager(["mm"], torch.mm),
             lambda a, out: gemm_close(out, *a, "mm"), lambda a: km.tune_key(a[0], a[1], None)),
        Case("mm(K-major, bf16)", "matmul", "matmul", mm_make(bf, 33, 40, 24, kmajor=True), lambda a: fg.mm(*a),
             lambda a, out: gemm_close(out, *a, "mm K-major"), lambda a: km.tune_key(a[0], a[1], None)),
        Case("bmm(aten)", "matmul", "matmul", mm_make(f32, 9, 20, 11, batch=3), eager(["bmm"], torch.bmm),
             lambda a, out: gemm_close(out, *a, "bmm"), lambda a: km.tune_key(a[0], a[1], None)),
        Case("bmm(batch 1, fp16)", "matmul", "matmul", mm_make(f16, 9, 32, 16, batch=1), lambda a: fg.bmm(*a),
             lambda a, out: gemm_close(out, *a, "bmm batch 1"), lambda a: km.tune_key(a[0], a[1], None)),
        Case("sum(aten)", "reduction", "reduce", lambda d: (rand(3, 4, 50, device=d),),
             eager(["sum"], lambda x: x.sum(-1)),
             lambda a, out: close(out, a[0].double().sum(-1), "sum"),
             lambda a: kred.tune_key(12, 50, a[0].dtype)),
    ]


CASES = _cases()
IDS = [c.id for c in CASES]


def test_families_are_the_tunables():
    """Every family the C++ side asks for is a Tunable, with the sizes its launcher passes."""
    if not c_runtime.available:
        pytest.skip(f"C++ runtime unavailable: {c_runtime.reason}")
    names = list(torch.ops.flag_gems_cpp.tuned_family_names())
    assert names == [t.name for t in c_runtime._families]
    assert sorted(names) == sorted(c_runtime._TUNE_DIMS) and sorted({c.family for c in CASES}) == sorted(names)
    for name in names:  # round trip of the key encoding
        t = at.TUNABLES[name]
        key = tuple(torch.bfloat16 if f == "dtype" else (True if f in c_runtime._BOOL_KEY_FIELDS else 48)
                    for f in t.key_fields)
        ints, dtype = c_runtime._encode_key(t, key)
        assert c_runtime._decode_key(t, ints, dtype) == key


# --------------------------------------------------------------------------- tuned configs


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cpp_wrapper_launches_the_tuned_config(dev, env, case):
    args = case.make(dev)
    d = index(dev)
    key = case.key(args)
    tuned = other_config(case.family, key, d)
    seed(case.family, key, d, tuned)
    q0 = queries()
    with_cpp = launches()
    out = case.call(args)
    assert launches() > with_cpp, f"[{case.id}] the C++ wrapper did not launch"
    ran_with(case.kernel, tuned, case.id)
    case.check(args, out)
    assert queries() == q0 + 1, f"[{case.id}] expected one config query"
    assert c_runtime.kept_config(case.family, key, d) == tuned
    # The Python launcher's lookup agrees (the same Tunable, the same key).
    assert at.config_for(case.family, key, d) == tuned
    # Fresh inputs, same key: no question to Python, the same config.
    args = case.make(dev)
    c_runtime._last_launch.clear()
    out = case.call(args)
    assert queries() == q0 + 1, f"[{case.id}] a second call of the key asked Python"
    case.check(args, out)
    if dev == "cpu":  # every CPU launch goes through the hook: the record is of this call
        ran_with(case.kernel, tuned, case.id + " second call")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_autotune_off_runs_the_cpp_heuristic(dev, env, monkeypatch, case):
    """GEMS_AUTOTUNE=off: the cache's tuned config is ignored, the C++ heuristic runs and it is
    the Python family's heuristic; the Python side remembers the heuristic as its launcher would."""
    monkeypatch.setenv("GEMS_AUTOTUNE", "off")
    args = case.make(dev)
    d = index(dev)
    key = case.key(args)
    seed(case.family, key, d, other_config(case.family, key, d))
    t = at.TUNABLES[case.family]
    q0 = queries()
    out = case.call(args)
    ran_with(case.kernel, t._default(key, d), case.id)
    case.check(args, out)
    assert c_runtime.kept_config(case.family, key, d) == "heuristic"
    assert t.origin(key, d).origin == "default"
    args = case.make(dev)
    out = case.call(args)
    assert queries() == q0 + 1, f"[{case.id}] a second call under GEMS_AUTOTUNE=off asked Python"
    case.check(args, out)


def test_capture_heuristic_is_not_kept(dev, env, monkeypatch):
    """During CUDA-graph capture a key no cache has gets the heuristic for that call only (the Python
    launcher does not remember it either); a cached key is kept, capture or not."""
    case = CASES[0]
    args = case.make(dev)
    d = index(dev)
    key = case.key(args)
    t = at.TUNABLES[case.family]
    monkeypatch.setattr(at, "capturing", lambda: True)
    q0 = queries()
    for _ in range(2):
        out = case.call(args)
        ran_with(case.kernel, t._default(key, d), "capture")
        case.check(args, out)
    assert queries() == q0 + 2, "each call during capture asks again"
    assert c_runtime.kept_config(case.family, key, d) is None and t.origin(key, d) is None
    tuned = other_config(case.family, key, d)
    seed(case.family, key, d, tuned)  # a pretuned key: kept even during capture
    out = case.call(args)
    ran_with(case.kernel, tuned, "capture, cached key")
    case.check(args, out)
    assert c_runtime.kept_config(case.family, key, d) == tuned
    out = case.call(args)
    assert queries() == q0 + 3


class PreferTimer:
    """A fake timer (``_autotune.use_timer``): ``best`` measures 1 µs, every other config 10 µs."""

    def __init__(self, best: dict):
        self.best = best

    def __call__(self, run, cfg):
        return 1.0 if cfg is not None and all(cfg.get(k) == v for k, v in self.best.items()) else 10.0


def test_retune_and_clear_memory_drop_the_cpp_copies(dev, env, monkeypatch):
    """A key the C++ side kept (the heuristic: GEMS_AUTOTUNE=cache, nothing cached) and then tuned
    (``Tunable.tune`` with a fake timer, as pretune / warmup do): the next C++ call runs the new config."""
    monkeypatch.setenv("GEMS_AUTOTUNE", "cache")
    case = CASES[0]
    args = case.make(dev)
    d = index(dev)
    key = case.key(args)
    t = at.TUNABLES[case.family]
    case.call(args)
    default = t._default(key, d)
    ran_with(case.kernel, default, "before tuning")
    assert c_runtime.kept_config(case.family, key, d) == default
    tuned = other_config(case.family, key, d)
    with at.use_timer(PreferTimer(tuned)):
        result = t.tune(key, d, force=True)
    assert result.config == tuned
    assert c_runtime.kept_config(case.family, key, d) is None  # dropped by the change
    q0 = queries()
    out = case.call(args)
    ran_with(case.kernel, tuned, "after tuning")
    case.check(args, out)
    assert queries() == q0 + 1 and c_runtime.kept_config(case.family, key, d) == tuned
    at.clear_memory()
    assert c_runtime.kept_config(case.family, key, d) is None


def test_threads_ask_for_one_key_at_once(dev, env):
    """Several threads' first calls of one key: every result right, the config kept once, at most
    one question per thread (the table is shared, the Python side serializes the resolve)."""
    import threading

    case = CASES[0]
    d = index(dev)
    inputs = [case.make(dev) for _ in range(4)]
    key = case.key(inputs[0])
    tuned = other_config(case.family, key, d)
    seed(case.family, key, d, tuned)
    outs, errors = [None] * 4, []

    def work(j):
        try:
            outs[j] = case.call(inputs[j])
        except Exception as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    q0 = queries()
    threads = [threading.Thread(target=work, args=(j,)) for j in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for args, out in zip(inputs, outs):
        case.check(args, out)
    assert 1 <= queries() - q0 <= 4
    assert c_runtime.kept_config(case.family, key, d) == tuned
    ran_with(case.kernel, tuned, "threads")


# --------------------------------------------------------------------------- matmul's classes


def _gemm_args(dev, dtype, m=33, k=40, n=24):
    return rand(m, k, dtype=dtype, device=dev), rand(k, n, dtype=dtype, device=dev)


def test_matmul_native_config(dev, env):
    """NATIVE=1 (the tuner measured the native GEMM faster): the eager mode's aten::mm wrapper refuses
    (the native kernel runs, as the Python entry makes it); flag_gems::mm still runs our kernel."""
    a, b = _gemm_args(dev, torch.float32)
    d = index(dev)
    key = km.tune_key(a, b, None)
    t = at.TUNABLES["matmul"]
    native = dict(t._default(key, d), NATIVE=1)
    seed("matmul", key, d, native)
    n0 = launches()
    with flag_gems.use_gems(include=["mm"]):
        out = torch.mm(a, b)
    assert launches() == n0, "the C++ wrapper launched despite NATIVE"
    gemm_close(out, a, b, "mm native")
    out = fg.mm(a, b)
    assert launches() == n0 + 1
    ran_with("matmul", native, "flag_gems::mm with NATIVE")
    gemm_close(out, a, b, "flag_gems::mm native config")


def test_matmul_tensor_descriptor_config_runs_the_python_launcher(dev, env, monkeypatch):
    """A ``tma`` / ``persistent`` config: the C++ wrappers hand the call to kernels/matmul.py (which
    builds the descriptors), for flag_gems::mm and for the eager mode's aten::mm alike."""
    a, b = _gemm_args(dev, torch.bfloat16, m=16, k=32, n=16)
    d = index(dev)
    key = km.tune_key(a, b, None)
    if not key[-1]:
        pytest.skip("no tensor descriptors here (Triton or device)")
    t = at.TUNABLES["matmul"]
    tma = next(c for c in t.candidates(key, d) if c["KIND"] != "plain")
    seed("matmul", key, d, tma)
    ran = []
    real = km._launch_tma

    def spy(*args, **kwargs):
        real(*args, **kwargs)
        ran.append(args[11:14])  # persistent, warp_spec, BLOCK_M: recorded after the launch

    monkeypatch.setattr(km, "_launch_tma", spy)
    n0 = launches()
    out = fg.mm(a, b)
    with flag_gems.use_gems(include=["mm"]):
        out_aten = torch.mm(a, b)
    assert launches() == n0, "the C++ launcher ran a tensor-descriptor config"
    assert ran == [(tma["KIND"] == "persistent", bool(tma["WARP_SPEC"]), tma["BLOCK_M"])] * 2
    gemm_close(out, a, b, "flag_gems::mm tma")
    gemm_close(out_aten, a, b, "aten::mm tma")
    # flag_gems::mm's Python implementation handing the call back to torch.mm: the native kernel
    # answers that inner aten::mm (no loop between the two wrappers).
    from flag_gems.lowerings import matmul as lm

    monkeypatch.setattr(lm, "_supports_mm", lambda *args: "refused for the test")
    with flag_gems.use_gems(include=["mm"]):
        out_native = torch.mm(a, b)
    assert len(ran) == 2
    gemm_close(out_native, a, b, "aten::mm tma, Python implementation refusing")


# --------------------------------------------------------------------------- the GPU: the C++ launch cache


@pytest.mark.gpu
def test_gpu_first_call_tunes_then_no_python(dev, env):
    """Policy ``on``, nothing cached: the first C++ call tunes in the hook (a fake timer picks a
    non-heuristic candidate), later calls are C++ only with that config."""
    x, w = rand(5, 4096, dtype=torch.bfloat16, device=dev), rand(4096, dtype=torch.bfloat16, device=dev)
    d = index(dev)
    key = krms.tune_key(5, 4096, x.dtype, False)
    tuned = other_config("rms_norm", key, d)
    with at.use_timer(PreferTimer(tuned)):
        y = fg.rms_norm(x, w, 1e-6)
    ran_with("rms_norm_fwd", tuned, "gpu tuned")
    close(y, rms_ref(x, w), "gpu tuned")
    assert at.TUNABLES["rms_norm"].origin(key, d).origin == "tuned"
    torch.cuda.synchronize()
    py0, q0, cpp0 = c_runtime.python_launches(), queries(), c_runtime.stats()["cpp_launches"]
    x = rand(5, 4096, dtype=torch.bfloat16, device=dev)
    y = fg.rms_norm(x, w, 1e-6)
    torch.cuda.synchronize()
    assert (c_runtime.python_launches(), queries()) == (py0, q0)
    assert c_runtime.stats()["cpp_launches"] == cpp0 + 1
    close(y, rms_ref(x, w), "gpu second call")


@pytest.mark.gpu
def test_gpu_capture_uses_the_heuristic_without_keeping_it(dev, env, monkeypatch):
    """In a real capture an uncached key runs the heuristic (no tuning, no sync), is not kept, and
    the replay is right; after the capture the next call tunes and keeps the tuned config."""
    w = rand(4096, dtype=torch.bfloat16, device=dev)
    d = index(dev)
    monkeypatch.setenv("GEMS_AUTOTUNE", "off")
    fg.rms_norm(rand(3, 4096, dtype=torch.bfloat16, device=dev), w, 1e-6)  # compiles the heuristic (rows 4)
    monkeypatch.setenv("GEMS_AUTOTUNE", "on")
    key = krms.tune_key(6, 4096, torch.bfloat16, False)  # rows bucket 8: a key nobody resolved
    tuned = other_config("rms_norm", key, d)
    timer = PreferTimer(tuned)
    calls = []
    x = rand(6, 4096, dtype=torch.bfloat16, device=dev)
    torch.cuda.synchronize()
    with at.use_timer(lambda run, cfg: calls.append(cfg) or timer(run, cfg)):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = fg.rms_norm(x, w, 1e-6)
        assert calls == [], "tuned during capture"
        assert c_runtime.kept_config("rms_norm", key, d) is None
        x.copy_(rand(6, 4096, dtype=torch.bfloat16, device=dev))
        g.replay()
        torch.cuda.synchronize()
        close(y, rms_ref(x, w), "graph replay")
        c_runtime._last_launch.clear()
        y = fg.rms_norm(x, w, 1e-6)  # after the capture: tuned now
    assert calls, "not tuned after the capture"
    ran_with("rms_norm_fwd", tuned, "after capture")
    assert c_runtime.kept_config("rms_norm", key, d) == tuned
    close(y, rms_ref(x, w), "after capture")


@pytest.mark.gpu
def test_gpu_launch_key_holds_the_config(dev, env):
    """The same shape under two configs is two C++ launch entries (constexprs and warps are in the
    launcher's key): after the config changes, the first call compiles the new one through Python."""
    x, w = rand(4, 2048, dtype=torch.float16, device=dev), rand(2048, dtype=torch.float16, device=dev)
    d = index(dev)
    key = krms.tune_key(4, 2048, x.dtype, False)
    t = at.TUNABLES["rms_norm"]
    configs = [t._default(key, d), other_config("rms_norm", key, d)]
    for cfg in configs:
        at.clear_memory()
        seed("rms_norm", key, d, cfg)
        py0 = c_runtime.python_launches()
        y = fg.rms_norm(x, w, 1e-6)
        torch.cuda.synchronize()
        assert c_runtime.python_launches() == py0 + 1, f"[{cfg}] not a new launch entry"
        ran_with("rms_norm_fwd", cfg, f"config {cfg}")
        close(y, rms_ref(x, w), f"config {cfg}")
        y = fg.rms_norm(x, w, 1e-6)
        torch.cuda.synchronize()
        assert c_runtime.python_launches() == py0 + 1
        close(y, rms_ref(x, w), f"config {cfg} second call")
