"""FastKernel: launches that skip Triton's Python path once a kernel is compiled.

On the CPU (no compiled kernels) the wrapper is driven through a stand-in JIT function that
records what Triton's path and the compiled launcher receive; on the GPU the real kernels
run through it (every kernel test does) and the specialization switches are checked against
torch.
"""

import inspect

import pytest
import torch
import triton
import triton.language as tl

from accuracy import DEVICE, assert_close, poison, rand, ref64, tag
from flag_gems.kernels import _launch
from flag_gems.kernels._launch import FastKernel


def _kernel(x_ptr, y_ptr, n, scale, flag, BLOCK: tl.constexpr, MODE: tl.constexpr = 0):
    pass


class _Compiled:
    """A compiled kernel's launch surface: ``run(grid0, grid1, grid2, stream, function, metadata, hooks.., *args)``."""

    def __init__(self, log):
        self.log = log
        self.function, self.packed_metadata = "function", "metadata"

    def run(self, g0, g1, g2, stream, function, metadata, launch_metadata, enter, exit_, *args):
        self.log.append(("fast", (g0, g1, g2), stream, function, metadata, args))


class _FakeJIT:
    """Stands in for a JITFunction: Triton's path records the call and returns a compiled kernel."""

    def __init__(self, compiled_cls=_Compiled):
        self.params = triton.runtime.jit.JITFunction(_kernel).params  # Triton's own parameter objects
        self.log = []
        self.compiled_cls = compiled_cls

    def run(self, *args, grid, warmup, **kwargs):
        self.log.append(("triton", grid, args, kwargs))
        return self.compiled_cls(self.log)


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(_launch, "_ENABLED", True)
    jit_fn = _FakeJIT()
    kernel = FastKernel(jit_fn)
    kernel._device, kernel._stream = (lambda: 0), (lambda device: 7)
    return kernel, jit_fn.log


def _bound(*args, **kwargs):
    sig = inspect.signature(_kernel)
    options = {k: kwargs.pop(k) for k in list(kwargs) if k not in sig.parameters}
    b = sig.bind(*args, **kwargs)
    b.apply_defaults()
    return tuple(b.arguments.values()), options


def test_second_call_goes_to_the_compiled_launcher_with_every_parameter_in_order(fake):
    kernel, log = fake
    x, y = torch.randn(64), torch.randn(64)
    kernel[(3,)](x, y, 64, 0.5, True, BLOCK=32, num_warps=4)
    assert log[-1][0] == "triton"
    kernel[(5, 2)](x, y, 48, 0.25, True, BLOCK=32, num_warps=4)
    want, _ = _bound(x, y, 48, 0.25, True, BLOCK=32)
    kind, grid, stream, function, metadata, args = log[-1]
    assert (kind, grid, stream, function, metadata) == ("fast", (5, 2, 1), 7, "function", "metadata")
    assert len(args) == len(want) and all(a is b or a == b for a, b in zip(args, want))
    assert len(log) == 2


@pytest.mark.parametrize(
    "change",
    ["misaligned pointer", "dtype", "int 1", "int not multiple of 16", "int 64-bit", "constexpr", "default constexpr",
     "num_warps", "bool", "None"],
)
def test_a_different_specialization_takes_tritons_path(fake, change):
    kernel, log = fake
    x, y = torch.randn(64), torch.randn(64)
    base = dict(args=[x, y, 32, 0.5, True], kwargs=dict(BLOCK=32, num_warps=4))
    kernel[(1,)](*base["args"], **base["kwargs"])
    kernel[(1,)](*base["args"], **base["kwargs"])
    assert [e[0] for e in log] == ["triton", "fast"]
    args, kwargs = list(base["args"]), dict(base["kwargs"])
    if change == "misaligned pointer":
        args[0] = x[1:]
    elif change == "dtype":
        args[1] = y.double()
    elif change == "int 1":
        args[2] = 1
    elif change == "int not multiple of 16":
        args[2] = 33
    elif change == "int 64-bit":
        args[2] = 2**32
    elif change == "constexpr":
        kwargs["BLOCK"] = 64
    elif change == "default constexpr":
        kwargs["MODE"] = 1
    elif change == "num_warps":
        kwargs["num_warps"] = 8
    elif change == "bool":
        args[4] = False
    elif change == "None":
        args[1] = None
    kernel[(1,)](*args, **kwargs)
    assert log[-1][0] == "triton", change
    kernel[(1,)](*args, **kwargs)
    assert log[-1][0] == "fast", change


def test_same_specialization_reuses_the_kernel(fake):
    kernel, log = fake
    x = torch.randn(64)
    for n in (32, 48, 64, 2**20):  # all multiples of 16 that fit in 32 bits
        kernel[(1,)](x, x, n, 1.5, True, BLOCK=16)
    assert [e[0] for e in log] == ["triton", "fast", "fast", "fast"]
    assert log[-1][-1][2] == 2**20


def test_unkeyed_arguments_always_take_tritons_path(fake):
    kernel, log = fake
    x = torch.randn(8)
    for _ in range(2):
        kernel[(1,)](x, x, [8], 1.0, True, BLOCK=8)  # a list: not described by the key
    for _ in range(2):
        kernel[(1,)](x, x, 8, 1.0, True, BLOCK=[8])  # unhashable constexpr
    assert [e[0] for e in log] == ["triton"] * 4


def test_warmup_launch_hooks_and_the_switch_take_tritons_path(fake, monkeypatch):
    kernel, log = fake
    x = torch.randn(8)
    kernel.run(x, x, 8, 1.0, True, BLOCK=8, grid=(1,), warmup=True)
    kernel[(1,)](x, x, 8, 1.0, True, BLOCK=8)
    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", lambda *a: None)  # a hook: Triton's path
    kernel[(1,)](x, x, 8, 1.0, True, BLOCK=8)
    monkeypatch.undo()
    chain = triton.knobs.runtime.launch_exit_hook
    if hasattr(chain, "add"):  # Triton 3.4+: a HookChain, empty unless a profiler added a hook
        hook = lambda *a: None  # noqa: E731
        chain.add(hook)
        try:
            kernel[(1,)](x, x, 8, 1.0, True, BLOCK=8)
        finally:
            chain.remove(hook)
    kernel[(1,)](x, x, 8, 1.0, True, BLOCK=8)  # hooks gone: fast again
    assert log[-1][0] == "fast"
    del log[-1]
    monkeypatch.setattr(_launch, "_ENABLED", True)
    monkeypatch.setattr(_launch, "_ENABLED", False)
    kernel[(1,)](x, x, 8, 1.0, True, BLOCK=8)
    assert [e[0] for e in log] == ["triton"] * (5 if hasattr(chain, "add") else 4)


def test_callable_grid_sees_the_bound_arguments(fake):
    kernel, log = fake
    x = torch.randn(8)
    grid = lambda meta: (triton.cdiv(meta["n"], meta["BLOCK"]), meta["MODE"] + 1)  # noqa: E731
    kernel[grid](x, x, 40, 1.0, True, BLOCK=16)
    kernel[grid](x, x, 40, 1.0, True, BLOCK=16)
    assert log[-1][0] == "fast" and log[-1][1] == (3, 1, 1)


def test_missing_or_doubled_arguments_get_tritons_error_path(fake):
    kernel, log = fake
    x = torch.randn(8)
    kernel[(1,)](x, x, 8, 1.0, True)  # BLOCK missing: Triton's path raises for real kernels
    kernel[(1,)](x, x, 8, 1.0, True, 16, n=8)  # n given twice
    assert [e[0] for e in log] == ["triton", "triton"]


def test_a_compiled_kernel_without_the_launch_surface_keeps_tritons_path(monkeypatch):
    class Bare:
        def __init__(self, log):
            pass

    monkeypatch.setattr(_launch, "_ENABLED", True)
    jit_fn = _FakeJIT(Bare)
    kernel = FastKernel(jit_fn)
    kernel._device, kernel._stream = (lambda: 0), (lambda device: 7)
    x = torch.randn(8)
    for _ in range(3):
        kernel[(1,)](x, x, 8, 1.0, True, BLOCK=8)
    assert [e[0] for e in jit_fn.log] == ["triton"] * 3


def test_attributes_are_the_jit_functions(fake):
    kernel, _ = fake
    assert kernel.params is kernel.fn.params


def test_interpreter_gets_plain_triton_jit():
    if not _launch.interpreter_mode():
        pytest.skip("compiled Triton: kernels are FastKernels")
    from flag_gems.kernels import rms_norm

    assert not isinstance(rms_norm._rms_norm_fwd_kernel, FastKernel)


@pytest.mark.gpu
def test_gpu_kernels_are_fast_kernels():
    from flag_gems.kernels import reduction, rms_norm

    assert isinstance(rms_norm._rms_norm_fwd_kernel, FastKernel)
    assert isinstance(reduction._softmax_fwd_kernel, FastKernel)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_alternating_specializations_give_torchs_results(dtype):
    # Aligned and misaligned views, sizes that are and are not multiples of 16, and n == 1,
    # in turns: each launch must use the kernel compiled for its own specialization.
    from flag_gems.kernels.pointwise import OPS

    base = rand(4096 + 1, dtype=dtype, device=DEVICE)
    other = rand(4096 + 1, dtype=dtype, device=DEVICE)
    for offset, n in [(0, 4096), (1, 4096), (0, 4095), (1, 1), (0, 1), (1, 4095), (0, 4096), (1, 4096)] * 2:
        a, b = base[offset:offset + n], other[:n]
        out = poison(torch.empty(n, dtype=dtype, device=DEVICE))
        OPS["add"](a, b, out=out)
        assert_close(out, ref64(a) + ref64(b), dtype, tag(f"add offset={offset}", (n,), dtype))


def test_a_launcher_rejecting_the_direct_call_turns_the_fast_path_off(monkeypatch, caplog):
    class Rejecting(_Compiled):
        def run(self, *args):
            raise TypeError("function takes exactly 12 arguments")

    monkeypatch.setattr(_launch, "_ENABLED", True)
    jit_fn = _FakeJIT(Rejecting)
    kernel = FastKernel(jit_fn)
    kernel._device, kernel._stream = (lambda: 0), (lambda device: 7)
    x = torch.randn(8)
    with caplog.at_level("WARNING", logger="flag_gems.kernels._launch"):
        for _ in range(3):
            kernel[(1,)](x, x, 8, 1.0, True, BLOCK=8)
    assert [e[0] for e in jit_fn.log] == ["triton"] * 3  # the rejected call was redone by Triton's path
    assert not _launch.fast_launch_enabled()
    assert sum("rejected a direct call" in r.getMessage() for r in caplog.records) == 1


def _no_params():
    pass


def _one_param(x_ptr):
    pass


@pytest.mark.parametrize("fn, args", [(_no_params, ()), (_one_param, (3,))], ids=["no parameters", "one parameter"])
def test_binder_for_kernels_with_few_parameters(fn, args):
    """The generated binder is valid code for any parameter count (zero gave a SyntaxError)."""
    bind = _launch._make_binder(triton.runtime.jit.JITFunction(fn).params)
    values, key = bind(*args, num_warps=4)
    assert values == args
    assert key[-1] == (("num_warps", 4),) and len(key) == len(args) + 1
    values, key = bind(*args)
    assert values == args and key[-1] == ()
    with pytest.raises(TypeError):
        bind(*args, 1)
