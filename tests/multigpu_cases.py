"""The ops tests/test_multigpu.py runs on several GPUs, the probes it reads, and its child process.

``CASES``: ``torch.ops.flag_gems.add_tensor`` and every fused op (rms_norm, add_rms_norm,
fused_add_rms_norm, silu_and_mul, rotary_embedding, rotary_embedding_) and the public functions
over them, each as (fresh inputs on a device, the call, a float64 reference). In-place ops return
the tensors they wrote.

Probes: :func:`has_context` asks the driver whether a device holds a primary context
(``cuDevicePrimaryCtxGetState``: torch's binding, else libcuda through ctypes; no NVML needed);
:class:`Compiles` records every Triton compilation with its device and thread (Triton's
``jit_post_compile_hook``, called after a compile, never on a cache hit).

Run as a script (``python tests/multigpu_cases.py``) it is the child process of
``test_multigpu.py::test_fresh_process_*``: a process that has compiled nothing, whose current
device stays 0, works on ``cuda:1`` only (C++ wrappers, Python launchers, another thread), then
on ``cuda:0`` and ``cuda:1`` from two threads at once. It checks every result against float64
(an AssertionError ends it with status 1) and prints one JSON line of what the probes saw.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accuracy import assert_close, tag  # noqa: E402

import flag_gems  # noqa: E402

fg = torch.ops.flag_gems
EPS = 1e-6
DTYPE = torch.bfloat16
T, N, I = 37, 1000, 1376  # tokens (a prime), hidden and MLP widths (not powers of two)
HQ, HK, D, MAXPOS = 8, 2, 128, 64  # rope: GQA heads, head dim, table rows


@dataclasses.dataclass(frozen=True)
class Case:
    """One op call: ``make(device)`` fresh inputs, ``call(args)`` its outputs (tuple),
    ``ref(args64)`` float64 references from the inputs' CPU float64 copies (:func:`to64`)."""

    name: str
    make: Callable[[str], tuple]
    call: Callable[[tuple], tuple]
    ref: Callable[[tuple], tuple]


def rand(*shape, device, dtype=DTYPE):
    return torch.randn(shape, device=device, dtype=torch.float32).to(dtype)


def to64(args: tuple) -> tuple:
    """CPU copies of the inputs, floats in float64 (taken before an in-place op writes them)."""
    return tuple(a.detach().cpu().double() if a.is_floating_point() else a.cpu() for a in args)


def rms64(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def rope64(x, cos, sin, pos):
    """Rotate-half with half tables ``[max_pos, D/2]``, rows ``pos``; x ``[T, H, D]``."""
    half = cos.shape[-1]
    c, s = cos[pos].unsqueeze(-2), sin[pos].unsqueeze(-2)
    x1, x2 = x[..., :half], x[..., half:2 * half]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, x[..., 2 * half:]], -1)


def _norm_in(dev):
    return rand(T, N, device=dev), rand(N, device=dev)


def _res_in(dev):
    return rand(T, N, device=dev), rand(T, N, device=dev), rand(N, device=dev)


def _pair_in(dev):
    return rand(T, I, device=dev), rand(T, I, device=dev)


def _rope_in(dev):
    return (rand(T, HQ, D, device=dev), rand(T, HK, D, device=dev), rand(MAXPOS, D // 2, device=dev, dtype=torch.float32),
            rand(MAXPOS, D // 2, device=dev, dtype=torch.float32), torch.randint(0, MAXPOS, (T,), device=dev))


def _res_ref(a):
    h = a[0] + a[1]
    return rms64(h, a[2]), h


def _rope_ref(a):
    q, k, cos, sin, pos = a
    return rope64(q, cos, sin, pos), rope64(k, cos, sin, pos)


CASES = [
    Case("add_tensor", lambda d: (rand(T, N, device=d), rand(N, device=d)), lambda a: (fg.add_tensor(*a),),
         lambda a: (a[0] + a[1],)),
    Case("rms_norm", _norm_in, lambda a: (fg.rms_norm(a[0], a[1], EPS),), lambda a: (rms64(*a),)),
    Case("flag_gems.rms_norm", _norm_in, lambda a: (flag_gems.rms_norm(a[0], [N], a[1], EPS),), lambda a: (rms64(*a),)),
    Case("add_rms_norm", _res_in, lambda a: fg.add_rms_norm(*a, EPS), _res_ref),
    Case("flag_gems.add_rms_norm", _res_in, lambda a: flag_gems.add_rms_norm(*a, EPS), _res_ref),
    Case("fused_add_rms_norm", _res_in, lambda a: (fg.fused_add_rms_norm(*a, EPS), a[0], a[1])[1:], _res_ref),
    Case("flag_gems.fused_add_rms_norm", _res_in, lambda a: flag_gems.fused_add_rms_norm(a[0], a[1], [N], a[2], EPS),
         _res_ref),
    Case("silu_and_mul", _pair_in, lambda a: (fg.silu_and_mul(*a),), lambda a: (F.silu(a[0]) * a[1],)),
    Case("flag_gems.silu_and_mul", _pair_in, lambda a: (flag_gems.silu_and_mul(*a),), lambda a: (F.silu(a[0]) * a[1],)),
    Case("flag_gems.silu_and_mul_fused", lambda d: (rand(T, 2 * I, device=d),),
         lambda a: (flag_gems.silu_and_mul_fused(a[0]),), lambda a: (F.silu(a[0][:, :I]) * a[0][:, I:],)),
    Case("flag_gems.gelu_and_mul", _pair_in, lambda a: (flag_gems.gelu_and_mul(*a, approximate="tanh"),),
         lambda a: (F.gelu(a[0], approximate="tanh") * a[1],)),
    Case("rotary_embedding", _rope_in, lambda a: fg.rotary_embedding(*a, False), _rope_ref),
    Case("rotary_embedding_", _rope_in, lambda a: (fg.rotary_embedding_(*a, False), a[0], a[1])[1:], _rope_ref),
    Case("flag_gems.apply_rotary_pos_emb", _rope_in, lambda a: flag_gems.apply_rotary_pos_emb(*a[:4], position_ids=a[4]),
         _rope_ref),
]
CASE_IDS = [c.name for c in CASES]


def run_case(case: Case, device: str, what: str = "") -> tuple:
    """One call of ``case`` on ``device`` with fresh inputs, checked against float64 (raises on a
    mismatch); returns the outputs."""
    args = case.make(device)
    refs = case.ref(to64(args))
    outs = case.call(args)
    torch.cuda.synchronize(device)
    for n, (out, ref) in enumerate(zip(outs, refs, strict=True)):
        assert out.device == torch.device(device), f"[op={case.name}] output {n} on {out.device}, inputs on {device}"
        assert_close(out, ref, out.dtype, tag(f"{case.name}[{device}{what}] output {n}", out.shape, out.dtype))
    return outs


# --------------------------------------------------------------------------- probes


def has_context(index: int) -> bool:
    """Whether CUDA device ``index`` holds an active primary context (the driver's
    ``cuDevicePrimaryCtxGetState``; creates none). Every CUDA user in this stack (torch's
    runtime, Triton's loader, our C++ launcher) works in primary contexts."""
    probe = getattr(torch._C, "_cuda_hasPrimaryContext", None)
    if probe is not None:
        return bool(probe(index))
    import ctypes

    cuda = ctypes.CDLL("libcuda.so.1")
    dev, flags, active = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
    for rc in (cuda.cuInit(0), cuda.cuDeviceGet(ctypes.byref(dev), index),
               cuda.cuDevicePrimaryCtxGetState(dev, ctypes.byref(flags), ctypes.byref(active))):
        if rc != 0:
            raise RuntimeError(f"has_context({index}): CUDA driver error {rc}")
    return bool(active.value)


def compile_hook_available() -> bool:
    import triton

    return hasattr(getattr(getattr(triton, "knobs", None), "runtime", None), "jit_post_compile_hook")


class Compiles:
    """Inside the block, every Triton compilation as ``(device, thread name, kernel, specialization)``
    in :attr:`events` (Triton's ``jit_post_compile_hook``; a previous hook is still called)."""

    def __enter__(self):
        import triton

        self.events: list = []
        self._lock = threading.Lock()
        self._runtime = triton.knobs.runtime
        self._prev = self._runtime.jit_post_compile_hook

        def hook(*args, **kwargs):
            compile_ = kwargs.get("compile") or {}
            fn = kwargs.get("fn")
            name = getattr(fn, "name", None) or str(fn)
            with self._lock:
                self.events.append((int(compile_.get("device", -1)), threading.current_thread().name, name,
                                    str(kwargs.get("key"))))
            return self._prev(*args, **kwargs) if self._prev is not None else None

        self._runtime.jit_post_compile_hook = hook
        return self

    def __exit__(self, *exc):
        self._runtime.jit_post_compile_hook = self._prev

    def take(self, thread: str | None = None) -> list:
        """The events so far (of one thread), cleared."""
        with self._lock:
            mine = [e for e in self.events if thread is None or e[1] == thread]
            self.events = [e for e in self.events if e not in mine]
        return mine


# --------------------------------------------------------------------------- the child process


def _python_launches() -> int:
    from flag_gems import c_runtime

    return c_runtime.python_launches() if c_runtime.available else 0


def _first_and_repeats(case: Case, device: str, compiles: Compiles, thread: str, what: str) -> dict:
    """First call, then two more with fresh inputs: compile events of each, Python launches of the repeats."""
    run_case(case, device, what)
    first = compiles.take(thread)
    py0 = _python_launches()
    run_case(case, device, what)
    run_case(case, device, what)
    return {"first": first, "repeat": compiles.take(thread), "repeat_python_launches": _python_launches() - py0}


def child_main() -> dict:
    """What the test reads (module docstring). Device 1 first: nothing may reach device 0."""
    from flag_gems import c_runtime

    assert torch.cuda.device_count() >= 2, "the child needs 2 CUDA devices"
    out = {"cpp": bool(c_runtime.available), "ctx0": {"after import": has_context(0)}, "cuda1": {}, "python1": {},
           "threads": {}}
    with Compiles() as compiles:
        main = threading.current_thread().name
        for case in CASES:  # the C++ wrappers where they are installed (the default)
            out["cuda1"][case.name] = _first_and_repeats(case, "cuda:1", compiles, main, "")
        out["ctx0"]["after cuda:1 (C++ wrappers)"] = has_context(0)
        if c_runtime.available:  # the Python launchers on the same device
            c_runtime.uninstall("CUDA")
            try:
                for case in CASES:
                    out["python1"][case.name] = _first_and_repeats(case, "cuda:1", compiles, main, " python")
            finally:
                c_runtime.install("CUDA")
            out["ctx0"]["after cuda:1 (Python launchers)"] = has_context(0)
        errors: list = []

        def work(device, name):
            try:
                for case in CASES:
                    out["threads"].setdefault(name, {})[case.name] = _first_and_repeats(case, device, compiles, name,
                                                                                       f" {name}")
            except BaseException as exc:  # noqa: BLE001  (re-raised in the main thread)
                errors.append(exc)

        # A new thread starts on device 0 as current: the launches must still go to cuda:1.
        t = threading.Thread(target=work, args=("cuda:1", "thread-cuda1-alone"), name="thread-cuda1-alone")
        t.start()
        t.join()
        if errors:
            raise errors[0]
        out["ctx0"]["after cuda:1 (another thread)"] = has_context(0)
        out["ctx1"] = has_context(1)
        out["memory0"] = {"reserved": torch.cuda.memory_reserved(0), "allocated": torch.cuda.memory_allocated(0)}
        out["memory1"] = {"reserved": torch.cuda.memory_reserved(1)}
        # Two threads at once, each on its own device: first calls on cuda:0, repeats on cuda:1.
        barrier = threading.Barrier(2)

        def together(device, name):
            barrier.wait()
            work(device, name)

        threads = [threading.Thread(target=together, args=(f"cuda:{d}", f"thread-cuda{d}"), name=f"thread-cuda{d}")
                   for d in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        out["ctx0"]["after cuda:0 (its thread)"] = has_context(0)  # the probe sees a context once one is made
        out["unattributed"] = compiles.take()
    return out


if __name__ == "__main__":
    print(json.dumps(child_main()))
