"""The C++ runtime without a GPU: the build, loading and its fallback, registration, the key.

What runs here is everything but the driver launch: the library the install built, the
wrappers registered as the ops' CUDA kernels (and, in a fixture, as their CPU kernels, where
every launch goes through the Python hook to Triton's interpreter), the eager mode's hook,
and the specialization key against the Python one. The launch itself is tested on a GPU
(tests/test_cpp_gpu.py).
"""

import os
import subprocess
import sys
import threading

import pytest
import torch

import flag_gems
from flag_gems import c_runtime
from flag_gems.kernels import _launch
from flag_gems.lowerings.registry import REGISTRY

aten = torch.ops.aten
needs_cpp = pytest.mark.skipif(not c_runtime.available, reason=f"C++ runtime unavailable: {c_runtime.reason}")

# FlagGems' C++-runtime op list (seeds: use-flag-gems.md), plus the ops our public functions and
# compiled graphs use (rotary_embedding_hf: the HF-layout rope the backend's fusion emits).
FLAG_GEMS_OPS = ["add_tensor", "rms_norm", "fused_add_rms_norm", "add_rms_norm", "rotary_embedding",
                 "rotary_embedding_", "rotary_embedding_hf", "rotary_embedding_cache", "rotary_embedding_cache_",
                 "silu_and_mul", "gelu_and_mul", "silu_and_mul_fused", "gelu_and_mul_fused", "silu_and_mul_out",
                 "mm", "bmm", "cat", "sum", "nonzero"]
ATEN_OPS = [aten.add.Tensor, aten.mul.Tensor, aten.neg.default, aten.rsqrt.default, aten.silu.default,
            aten.exp.default, aten.sigmoid.default, aten.mean.dim, aten._to_copy.default,
            aten.pow.Tensor_Scalar, aten.sub.Tensor, aten.cos.default, aten.sin.default, aten.tanh.default,
            aten.sqrt.default, aten.log.default, aten.abs.default, aten.reciprocal.default, aten.gelu.default,
            aten.mm.default, aten.bmm.default, aten.cat.default, aten.sum.default,
            aten.sum.dim_IntList, aten.nonzero.default, aten._fused_rms_norm.default]


def test_cpp_runtime_is_available():
    """The install built the extension (CI runs the README's command): a missing one fails here, once."""
    if os.environ.get("GEMS_CPP") == "0":
        pytest.skip("GEMS_CPP=0")
    assert c_runtime.available, c_runtime.reason
    from flag_gems import c_operators

    assert c_operators.available and c_operators.reason is None


@needs_cpp
def test_wrappers_are_the_cuda_kernels_of_the_flag_gems_ops():
    assert "CUDA" in c_runtime.installed_keys()
    for name in FLAG_GEMS_OPS:
        dump = torch._C._dispatch_dump(f"flag_gems::{name}")
        cuda = [line for line in dump.splitlines() if line.startswith("CUDA:")]
        assert cuda and "csrc/runtime.cpp" in cuda[0], f"[op={name}] {dump}"
        # The Python implementation stays (CPU, and the C++ wrapper's fallback), so do fake and autograd.
        assert "CompositeExplicitAutograd[alias]" in dump and "Meta:" in dump and "Autograd[alias]" in dump


@needs_cpp
def test_every_wrapper_has_its_op():
    from flag_gems import c_operators

    names = c_operators.wrapped_ops()
    assert sorted(f"flag_gems::{n}" for n in FLAG_GEMS_OPS) == sorted(n for n in names if n.startswith("flag_gems"))
    assert sorted(t.name() for t in ATEN_OPS) == sorted(n for n in names if n.startswith("aten"))
    for target in ATEN_OPS:
        assert c_runtime.has_aten(target) and target in REGISTRY, target
    assert not c_runtime.has_aten(aten.div.Tensor)


def test_unavailable_runtime_leaves_the_python_path(tmp_path):
    """GEMS_CPP=0 (as a machine without the extension): flag_gems imports, c_operators raises
    ImportError with the one-line reason, the ops run their Python implementations."""
    script = (
        "import torch, flag_gems\n"
        "try:\n"
        "    from flag_gems import c_operators\n"
        "except ImportError as e:\n"
        "    print('REASON', e)\n"
        "x = torch.randn(3, 16); w = torch.randn(16)\n"
        "y = flag_gems.rms_norm(x, [16], w, 1e-6)\n"
        "ref = (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()).float()\n"
        "print('OK', bool(torch.allclose(y, ref, atol=1e-5, rtol=1.3e-5)), flag_gems.c_runtime.installed_keys())\n"
    )
    env = dict(os.environ, GEMS_CPP="0", TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "REASON flag_gems C++ runtime unavailable: disabled by GEMS_CPP=0" in out.stdout
    assert "OK True []" in out.stdout


def test_library_built_for_another_python_gives_a_reason(monkeypatch, tmp_path):
    """A ``_C`` named for another interpreter that fails to load: the reason names it and how to
    rebuild, instead of only the loader's error; nothing is registered."""
    bogus = tmp_path / "_C.cpython-399-x86_64-linux-gnu.so"
    bogus.write_bytes(b"not a shared library")
    monkeypatch.setattr(c_runtime, "_HERE", str(tmp_path))
    monkeypatch.delenv("GEMS_CPP_JIT", raising=False)
    monkeypatch.delenv("GEMS_CPP", raising=False)
    monkeypatch.setattr(c_runtime, "available", False)
    monkeypatch.setattr(c_runtime, "reason", "not loaded yet")
    assert c_runtime._library_path() == str(bogus) and c_runtime._foreign(str(bogus))
    c_runtime._load()
    assert not c_runtime.available
    assert "_C.cpython-399-x86_64-linux-gnu.so was built for another Python" in c_runtime.reason, c_runtime.reason
    assert "--no-build-isolation" in c_runtime.reason and "\n" not in c_runtime.reason


def test_a_parameter_list_mismatch_warns_once_and_keeps_the_python_path(monkeypatch):
    """A C++ wrapper passing another parameter count than the compiled kernel has (an extension
    built from other kernel sources): no cached launch, and one RuntimeWarning naming the kernel."""
    import types
    import warnings

    from flag_gems.kernels import _common

    monkeypatch.setattr(_common, "_WARNED", set())
    monkeypatch.setattr(c_runtime._launch, "_hooks_active", lambda: False)
    md = types.SimpleNamespace(num_warps=4, num_ctas=1, shared=0)
    kernel = types.SimpleNamespace(metadata=md, function=1234,
                                   src=types.SimpleNamespace(signature={"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}))
    fn = types.SimpleNamespace(arg_names=["x_ptr", "n", "BLOCK"], __name__="my_kernel")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert c_runtime._launch_info(kernel, fn, 2) == []
        assert c_runtime._launch_info(kernel, fn, 2) == []
    said = [w for w in caught if "my_kernel takes 3 parameters but the C++ wrapper passes 2" in str(w.message)]
    assert len(said) == 1 and issubclass(said[0].category, RuntimeWarning), [str(w.message) for w in caught]
    # The matching count packs a launch (what the C++ side keeps), silently.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        info = c_runtime._launch_info(kernel, fn, 3)
    assert info[:4] == [1234, 4, 1, 0] and len(info) == 7 + 3


def test_missing_library_gives_a_reason(monkeypatch):
    """An install without the extension: the reason says how to get it; nothing is registered."""
    monkeypatch.setattr(c_runtime, "_library_path", lambda: None)
    monkeypatch.delenv("GEMS_CPP_JIT", raising=False)
    monkeypatch.delenv("GEMS_CPP", raising=False)
    monkeypatch.setattr(c_runtime, "available", False)
    monkeypatch.setattr(c_runtime, "reason", "not loaded yet")
    c_runtime._load()
    assert not c_runtime.available
    assert "installed without its C++ extension" in c_runtime.reason and "--no-build-isolation" in c_runtime.reason
    assert "\n" not in c_runtime.reason


# --------------------------------------------------------------------------- the key


def _values():
    base = torch.zeros(64, dtype=torch.float32)
    ints = [0, 1, 2, 15, 16, 17, 32, -16, -1, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**40, 2**40 + 1]
    tensors = [base, base[1:], base[4:], torch.zeros(8, dtype=torch.bfloat16), torch.zeros(8, dtype=torch.float16),
               torch.zeros(8, dtype=torch.int64), torch.zeros(8, dtype=torch.bool)]
    return ints + [0.5, 1.0, True, False, None] + tensors


def _encode(values):
    """The hook's encoding of a parameter list (c_runtime._triton_launch's argument kinds)."""
    tensors, kinds, ints, floats = [], [], [], []
    for v in values:
        if isinstance(v, torch.Tensor):
            kinds.append(0)
            tensors.append(v)
        elif v is None:
            kinds.append(4)
        elif isinstance(v, bool):
            kinds.append(3)
            ints.append(int(v))
        elif isinstance(v, int):
            kinds.append(1)
            ints.append(v)
        else:
            kinds.append(2)
            floats.append(v)
    return tensors, kinds, ints, floats


def _cpp_key(values, kernel=0, variant=(), device=0):
    tensors, kinds, ints, floats = _encode(values)
    return tuple(torch.ops.flag_gems_cpp.spec_key(kernel, list(variant), tensors, kinds, ints, floats, device))


@needs_cpp
def test_cpp_key_codes_are_pythons():
    """Per argument, the C++ code is _launch.spec_code's, and both split values exactly as the
    fast Python launcher's key (_launch._spec) does: never coarser than Triton's specialization."""
    values = _values()
    cpp = [_cpp_key([v])[-1] for v in values]
    assert cpp == [_launch.spec_code(v) for v in values]
    py = [("tensor" if isinstance(v, torch.Tensor) else type(v).__name__, _launch._spec(v)) for v in values]
    for i in range(len(values)):
        for j in range(len(values)):
            assert (cpp[i] == cpp[j]) == (py[i] == py[j]), (values[i], values[j])


@needs_cpp
def test_cpp_key_separates_what_triton_specializes():
    t = torch.zeros(32)
    k = _cpp_key([t, 16, 0.5])
    assert _cpp_key([torch.ones(32), 32, 1.5]) == k  # same dtype/alignment, %16, float
    assert _cpp_key([t[1:], 16, 0.5]) != k  # 16-byte alignment
    assert _cpp_key([t.half(), 16, 0.5]) != k  # dtype
    assert _cpp_key([t, 1, 0.5]) != k and _cpp_key([t, 17, 0.5]) != k and _cpp_key([t, 2**33, 0.5]) != k
    assert _cpp_key([t, 16, 0.5], kernel=1) != k  # another kernel
    assert _cpp_key([t, 16, 0.5], variant=(1,)) != k  # another generated kernel of a family
    assert _cpp_key([t, 16, 0.5], device=1) != k  # another device
    # constexprs by value (kinds 5, 6): the encoding the wrappers use
    c = lambda v: tuple(torch.ops.flag_gems_cpp.spec_key(0, [], [t], [0, 5], [v], [], 0))  # noqa: E731
    assert c(64) != c(128) and c(64) == c(64)


# --------------------------------------------------------------------------- the CPU path of the wrappers


@pytest.fixture
def cpp_cpu():
    """The C++ wrappers as the CPU kernels of the flag_gems ops (launches through the hook)."""
    if not c_runtime.available:
        pytest.skip(f"C++ runtime unavailable: {c_runtime.reason}")
    if not torch.cuda.is_available():
        had = "CPU" in c_runtime.installed_keys()
        c_runtime.install("CPU")
        yield "cpu"
        if not had:
            c_runtime.uninstall("CPU")
    else:
        yield "cuda"


def test_install_and_uninstall_cpu(cpp_cpu):
    if cpp_cpu != "cpu":
        pytest.skip("CPU registration is for machines without a GPU")
    x, w = torch.randn(2, 32), torch.randn(32)
    before = c_runtime.python_launches()
    y = torch.ops.flag_gems.rms_norm(x, w, 1e-6)
    assert c_runtime.python_launches() == before + 1  # the C++ wrapper launched, through the hook
    c_runtime.uninstall("CPU")
    try:
        assert "CPU" not in c_runtime.installed_keys() and c_runtime.fast_ops("cpu") is None
        before = c_runtime.python_launches()
        y2 = torch.ops.flag_gems.rms_norm(x, w, 1e-6)
        assert c_runtime.python_launches() == before  # the Python implementation again
        torch.testing.assert_close(y, y2, atol=0, rtol=0)
    finally:
        c_runtime.install("CPU")


def test_eager_mode_registers_the_cpp_wrapper(cpp_cpu):
    """use_gems: an entry with a C++ wrapper is registered as that wrapper on a key the C++
    runtime serves (the Python kernel while recording); leaving the block restores native."""
    key = "CUDA" if cpp_cpu == "cuda" else "CPU"
    from flag_gems import eager

    a, b = torch.randn(5, 24, device=cpp_cpu), torch.randn(5, 24, device=cpp_cpu)
    with flag_gems.use_gems(include=["add.Tensor"]):
        reg = eager._registered[aten.add.Tensor]
        assert reg.cpp is not None
        assert "csrc/runtime.cpp" in torch._C._dispatch_dump("aten::add.Tensor").split(f"\n{key}:")[1].split("\n")[0]
        before = c_runtime.python_launches()
        out = a + b
        launched = c_runtime.python_launches() - before
    torch.testing.assert_close(out, a + b, atol=0, rtol=0)
    if cpp_cpu == "cpu":
        assert launched == 1
    assert "csrc/runtime.cpp" not in torch._C._dispatch_dump("aten::add.Tensor")


def test_eager_recording_uses_the_python_kernel(cpp_cpu, tmp_path):
    from flag_gems import eager

    a = torch.randn(3, 8, device=cpp_cpu)
    path = tmp_path / "ops.log"
    with flag_gems.use_gems(include=["add.Tensor"]):
        assert eager._registered[aten.add.Tensor].cpp is not None
        with flag_gems.use_gems(include=["add.Tensor"], record=True, path=str(path)):
            assert eager._registered[aten.add.Tensor].cpp is None
            a + a
        assert eager._registered[aten.add.Tensor].cpp is not None
    assert "GEMS ADD_TENSOR" in path.read_text()


def test_inplace_wrappers_bump_versions(cpp_cpu):
    x, r, w = torch.randn(4, 32, device=cpp_cpu), torch.randn(4, 32, device=cpp_cpu), torch.randn(32, device=cpp_cpu)
    vx, vr = x._version, r._version
    flag_gems.fused_add_rms_norm(x, r, [32], w, 1e-6)  # the public function: straight to the C++ kernel
    assert x._version > vx and r._version > vr


def test_threads_share_the_wrappers(cpp_cpu):
    """Several threads call the C++ ops at once (the cache, the hook and the registration are
    shared); each gets its own correct result."""
    inputs = [(torch.randn(3, 40, device=cpp_cpu), torch.randn(40, device=cpp_cpu)) for _ in range(6)]
    results, errors = [None] * len(inputs), []

    def work(i):
        try:
            x, w = inputs[i]
            for _ in range(3):
                results[i] = torch.ops.flag_gems.rms_norm(x, w, 1e-6)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (x, w), y in zip(inputs, results):
        xd = x.double()
        ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
        torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1.3e-5)
