"""Kernel launches that skip Triton's per-call Python work once a kernel is compiled.

``kernel[grid](*args, **kwargs)`` on a ``triton.jit`` function binds the arguments,
specializes each one, builds a cache key from the specialization and the options, looks the
compiled kernel up, checks the globals the kernel read, and only then launches. For the
small tensors of decode steps and eager calls that Python work is most of the call.
:func:`jit` wraps a kernel so that, after Triton's own path has compiled and launched it
once, later calls with the same specialization go straight to the compiled kernel's
launcher (a C function)::

    @jit                      # instead of @triton.jit, on kernels launched from Python
    def _my_kernel(x_ptr, n, BLOCK: tl.constexpr): ...

    _my_kernel[(grid,)](x, n, BLOCK=1024, num_warps=4)   # unchanged call sites

The key is at least as fine as Triton's specialization (``native_specialize_impl``): per
tensor its dtype and whether its address is 16-byte aligned; per int whether it is 1,
whether it is a multiple of 16 and whether it needs 32, 64 or unsigned 64 bits; floats,
bools and None by type; constexpr parameters and launch options (``num_warps`` ...) by
value. Two calls with one key get one compiled kernel from Triton, so reusing it is what
Triton would do. Anything else (an argument of another type, ``warmup=True``, a launch
hook such as proton's, the Triton interpreter) takes Triton's path unchanged, as does every
call when ``GEMS_FAST_LAUNCH=0`` is set. A launcher that rejects the direct call (a Triton whose
launcher takes other arguments; the rejection comes before any launch) turns the fast path off
for the process with one warning, and that call goes through Triton's path.

Two modes change what a launch does, per thread: :func:`traced_launches` (the launch becomes a
``wrap_triton`` node of a trace) and :func:`recorded_launches` (nothing is compiled or launched:
the kernel and its specialization key go to a recorder, which ``kernels/_precompile.py`` uses to
compile a graph's kernels in worker processes before its first run). Both live in one
thread-local slot that ``kernel[grid]`` already reads; ``run`` (called directly by generated
launchers) reads it only while some thread records.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import threading

import torch
import triton

from ._common import interpreter_mode

logger = logging.getLogger(__name__)

__all__ = ["FastKernel", "compiled_kernel", "fast_launch_enabled", "jit", "recorded_launches", "spec_code",
           "traced_launches"]

_ENABLED = os.environ.get("GEMS_FAST_LAUNCH", "1") != "0"
_I32 = (-(2**31), 2**31)
_I64_MAX = 2**63


def _hooks_active() -> bool:
    """Whether a launch hook is set (proton, a user's): then every launch takes Triton's path.

    Triton 3.4+ keeps a ``HookChain`` there, empty unless a hook was added; older versions a
    callable or None."""
    runtime = triton.knobs.runtime
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def compiled_kernel(kernel):
    """What ``JITFunction.run`` returned, as a ``CompiledKernel``: under Triton's asynchronous
    compilation it returns a future, resolved here."""
    return kernel.result() if hasattr(kernel, "result") else kernel


def _disable(exc: Exception) -> None:
    """Turn the fast path off for the process: this Triton's launcher takes other arguments."""
    global _ENABLED
    _ENABLED = False
    logger.warning("flag_gems: Triton's compiled-kernel launcher rejected a direct call (%s); kernels take "
                   "Triton's own launch path from now on", exc)


# ``on``: False, True (traced_launches) or a recorder (recorded_launches).
_tracing = threading.local()
_recording = 0  # threads inside recorded_launches (FastKernel.run reads the thread-local slot only when > 0)
_recording_lock = threading.Lock()


@contextlib.contextmanager
def traced_launches():
    """Inside, ``kernel[grid](...)`` of :func:`jit` kernels goes through ``torch.library.wrap_triton``.

    Under a tracer (make_fx, AOT autograd's functionalization) the launch is then recorded as a
    ``triton_kernel_wrapper`` node that Inductor compiles and launches from its own code, instead
    of running; the launcher's Python around it (checks, configs, allocations) runs as it is on the
    traced tensors. ``flag_gems.lowerings.inductor_ops`` uses it; compiled Triton only (the
    interpreter's kernels cannot be traced).
    """
    previous = getattr(_tracing, "on", False)
    _tracing.on = True
    try:
        yield
    finally:
        _tracing.on = previous


def launches_traced() -> bool:
    """Whether this thread is inside :func:`traced_launches` or :func:`recorded_launches` (the
    autotuner then never tunes: a config chosen there is baked into a compiled graph, and tuning
    would launch under the tracer; a recorded launch runs nothing)."""
    return bool(getattr(_tracing, "on", False))


@contextlib.contextmanager
def recorded_launches(recorder):
    """Inside, launches of :func:`jit` kernels on this thread compile and launch nothing: each one
    calls ``recorder(kernel, values, key)`` and returns None.

    ``kernel`` is the :class:`FastKernel`; ``values`` every parameter's value in order (defaults
    filled, tensors as given: fake tensors are fine); ``key`` the specialization key
    :meth:`FastKernel.run` computes for the same call, except that a tensor's alignment is read
    from its storage offset (``storage_offset() * element_size() % 16 == 0``, the base assumed
    aligned: the caching allocator's blocks are), so fake tensors have one. Launch options
    (``num_warps``...) are the key's last element, as sorted ``(name, value)`` pairs. An argument
    the key does not describe raises from the launch. Compiled Triton only (the interpreter's
    kernels are plain ``triton.jit`` functions, which launch).
    """
    global _recording
    previous = getattr(_tracing, "on", False)
    with _recording_lock:
        _recording += 1
    _tracing.on = recorder
    try:
        yield
    finally:
        _tracing.on = previous
        with _recording_lock:
            _recording -= 1


def fast_launch_enabled() -> bool:
    """Whether :func:`jit` kernels may skip Triton's launch path (``GEMS_FAST_LAUNCH`` not 0)."""
    return _ENABLED


class _Unkeyed(Exception):
    """An argument the key does not describe: take Triton's path."""


def _spec(arg):
    """What Triton's specialization may depend on for one runtime argument."""
    cls = arg.__class__
    if cls is int:
        width = 0 if _I32[0] <= arg < _I32[1] else 1 if arg < _I64_MAX else 2
        return (arg == 1, arg % 16 == 0, width)
    if cls is float:
        return "fp32"  # never specialized
    if cls is bool or arg is None:
        return arg
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.data_ptr() & 15 == 0)
    raise _Unkeyed


def spec_code(arg) -> int:
    """:func:`_spec` as one integer: the C++ launcher's key unit (``csrc/runtime.cpp``, which
    computes the same codes; tests compare them). Two arguments with one code specialize a
    kernel alike: tensors ``1000 + 2 * dtype id + aligned``, ints ``2000 + (==1) + 2 * (%16==0)
    + 4 * width`` (0 int32, 1 int64, 2 uint64), floats 3000, bools ``4000 + value``, None 5000.

    Raises:
        TypeError: an argument the key does not describe.
    """
    cls = arg.__class__
    if cls is bool:
        return 4000 + int(arg)
    if arg is None:
        return 5000
    if cls is float:
        return 3000
    if cls is int:
        eq1, div16, width = _spec(arg)
        return 2000 + int(eq1) + 2 * int(div16) + 4 * width
    if isinstance(arg, torch.Tensor):
        return 1000 + 2 * _SCALAR_TYPE_IDS[arg.dtype] + int(arg.data_ptr() & 15 == 0)
    raise TypeError(f"spec_code: no specialization code for {type(arg).__name__}")


def _record_spec(arg):
    """:func:`_spec` without a data pointer: a tensor's alignment from its storage offset (fake
    tensors have no address; their storage is assumed 16-byte aligned, as allocations are)."""
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.storage_offset() * arg.element_size() % 16 == 0)
    return _spec(arg)


# c10::ScalarType's ids (c10/core/ScalarType.h), for the dtypes our kernels take.
_SCALAR_TYPE_IDS = {
    torch.uint8: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.int64: 4, torch.float16: 5,
    torch.float32: 6, torch.float64: 7, torch.bool: 11, torch.bfloat16: 15,
}


class FastKernel:
    """A ``triton.jit`` function whose repeated launches skip Triton's Python launch path.

    Launch it as the JIT function (``kernel[grid](*args, **kwargs)``); every other attribute
    is the JIT function's.

    Args:
        fn: the ``triton.jit`` function (a ``JITFunction``).
    """

    def __init__(self, fn):
        self.fn = fn
        self._names = tuple(p.name for p in fn.params)
        self._bind = _make_binder(fn.params)
        self._compiled: dict = {}  # (device, key) -> (launcher, function, packed metadata)
        self._uncached: set = set()  # (device, key) Triton compiled but that has no fast launcher
        self._record_bind = None  # the binder of recorded launches (recorded_launches), made on first use
        self._device = self._stream = None

    def __getattr__(self, name):
        return getattr(self.fn, name)

    def __repr__(self):
        return f"FastKernel({self.fn!r})"

    def __getitem__(self, grid):
        mode = getattr(_tracing, "on", False)
        if mode:
            if mode is not True:  # recorded_launches: the recorder
                return lambda *args, **kwargs: self._record(mode, args, kwargs)
            from torch.library import wrap_triton

            return wrap_triton(self.fn)[grid]
        return lambda *args, **kwargs: self.run(*args, grid=grid, warmup=False, **kwargs)

    def run(self, *args, grid, warmup, **kwargs):
        """Launch (Triton's ``JITFunction.run`` contract); returns the compiled kernel, or
        None after a fast launch or a recorded one (:func:`recorded_launches`)."""
        if _recording and not warmup:  # some thread records: is it this one?
            mode = getattr(_tracing, "on", False)
            if mode and mode is not True:
                return self._record(mode, args, kwargs)
        if warmup or not _ENABLED or _hooks_active():
            return self.fn.run(*args, grid=grid, warmup=warmup, **kwargs)
        if self._device is None:
            self._device, self._stream = _current_device_and_stream()
        try:
            values, key = self._bind(*args, **kwargs)
            device = self._device()
            launch = self._compiled.get((device, key))
        except (_Unkeyed, TypeError):  # TypeError: a missing or doubled argument, an unhashable constexpr
            return self.fn.run(*args, grid=grid, warmup=warmup, **kwargs)
        if launch is None:
            if (device, key) not in self._uncached:
                check_not_capturing(self.fn)
            kernel = self.fn.run(*args, grid=grid, warmup=False, **kwargs)  # compiles, launches
            self._remember(device, key, kernel)
            return kernel
        if callable(grid):
            grid = grid(dict(zip(self._names, values)))
        size = len(grid)
        run, function, metadata = launch
        try:
            run(grid[0], grid[1] if size > 1 else 1, grid[2] if size > 2 else 1, self._stream(device), function,
                metadata, None, None, None, *values)
        except TypeError as exc:  # a launcher with another signature rejects the call before launching
            _disable(exc)
            return self.fn.run(*args, grid=grid, warmup=warmup, **kwargs)
        return None

    def _record(self, recorder, args, kwargs) -> None:
        """A launch under :func:`recorded_launches`: hand the kernel, the values and the key to ``recorder``."""
        if self._record_bind is None:
            self._record_bind = _make_binder(self.fn.params, spec=_record_spec)
        values, key = self._record_bind(*args, **kwargs)
        recorder(self, values, key)
        return None

    def _remember(self, device, key, kernel) -> None:
        kernel = compiled_kernel(kernel)
        try:
            launch = (kernel.run, kernel.function, kernel.packed_metadata)
        except AttributeError as exc:  # another Triton: keep its path for this kernel
            logger.debug("%s: no fast launch (%s)", self._names and self.fn, exc)
            self._uncached.add((device, key))
            return
        self._compiled[(device, key)] = launch


def check_not_capturing(fn) -> None:
    """Fail loudly when a kernel's first call with a new specialization happens inside a CUDA
    graph capture: Triton would compile and load it there, which breaks or silently corrupts
    the capture. Warm-up (one eager call per shape before capturing, as vLLM and
    ``torch.cuda.graphs`` prescribe) compiles it.

    Raises:
        RuntimeError: the current stream is capturing.
    """
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        name = getattr(getattr(fn, "fn", fn), "__qualname__", repr(fn))
        raise RuntimeError(
            f"flag_gems: Triton kernel {name} is called for the first time with these argument types, sizes or "
            "alignments while a CUDA graph is being captured, so it would be compiled inside the capture. Run the "
            "same call once before capturing (a warm-up run per captured shape)."
        )


def _current_device_and_stream():
    """Triton's current-device and current-stream functions; for the device, torch's C call
    under ``torch.cuda.current_device`` when that is what Triton uses (CUDA is initialized
    once a kernel ran, which its lazy-init wrapper only re-checks)."""
    active = triton.runtime.driver.active
    device = active.get_current_device
    if device is torch.cuda.current_device and hasattr(torch._C, "_cuda_getDevice"):
        device = torch._C._cuda_getDevice
    return device, active.get_current_stream


def _make_binder(params, spec=None):
    """``bind(*args, **kwargs) -> (values, key)`` for a kernel's parameters, generated once
    (plain code, no signature binding per call). ``values``: every parameter in order,
    defaults filled; ``key``: the specialization key (module docstring); keyword arguments
    that are no parameter (``num_warps``...) are launch options, keyed by value. A missing or
    doubled argument raises TypeError, an undescribed one :class:`_Unkeyed`. ``spec``: the
    function that keys every runtime argument (default: :func:`_spec`, with plain tensors
    keyed inline)."""
    names = [p.name for p in params]
    signature, key = [], []
    namespace = {"_gems_spec": spec or _spec, "_GEMS_MISSING": _MISSING, "_gems_Tensor": torch.Tensor}
    for i, p in enumerate(params):
        if p.default is inspect.Parameter.empty:
            signature.append(f"{p.name}=_GEMS_MISSING")
        else:
            namespace[f"_gems_default{i}"] = p.default
            signature.append(f"{p.name}=_gems_default{i}")
        if p.is_constexpr:
            key.append(p.name)
        elif spec is not None:
            key.append(f"_gems_spec({p.name})")
        else:  # _spec, with a plain tensor's case inline (most arguments)
            key.append(f"(({p.name}.dtype, {p.name}.data_ptr() & 15 == 0) if {p.name}.__class__ is _gems_Tensor "
                       f"else _gems_spec({p.name}))")
    # Trailing commas throughout: a kernel without parameters binds to ((), (options,)).
    src = (
        f"def bind({''.join(s + ', ' for s in signature)}**_gems_options):\n"
        + "".join(f"    if {p.name} is _GEMS_MISSING: raise TypeError('missing {p.name}')\n" for p in params
                  if p.default is inspect.Parameter.empty)
        + f"    return ({''.join(n + ', ' for n in names)}), ({''.join(k + ', ' for k in key)}"
        + "tuple(sorted(_gems_options.items())) if _gems_options else (),)\n"
    )
    exec(compile(src, "<flag_gems.kernels._launch binder>", "exec"), namespace)
    return namespace["bind"]


_MISSING = object()


def jit(fn=None, **kwargs):
    """``triton.jit`` for kernels launched from Python, with :class:`FastKernel` launches.

    Used bare (``@jit``) or with ``triton.jit``'s keyword arguments
    (``@jit(do_not_specialize=["n"])``). In the Triton interpreter it is ``triton.jit``.

    Returns:
        A :class:`FastKernel` (the interpreter: the ``triton.jit`` result itself). With
        ``GEMS_FAST_LAUNCH=0`` it is still one, taking Triton's path on every launch, so that
        :func:`traced_launches` reaches it.
    """

    def wrap(f):
        jitted = triton.jit(f, **kwargs)
        if interpreter_mode():
            return jitted
        return FastKernel(jitted)

    return wrap(fn) if fn is not None else wrap
