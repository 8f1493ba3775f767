"""Helpers shared by every kernel family: input checks, device guard, launch heuristics.

Launchers in this package take and return tensors. They check what they are
given and raise errors that name the argument and what was expected; they know
nothing about autograd, the dispatcher or FX.

Triton runs on CPU tensors only through its interpreter (``TRITON_INTERPRET=1``,
read when a kernel is decorated, so it must be set before ``flag_gems`` is
imported). Outside interpreter mode a CPU tensor is an error, never a launch.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Largest row (in elements) kept in registers by the one-pass row kernels.
# Above it the row kernels loop over the row in chunks of MAX_FUSED_BLOCK.
MAX_FUSED_BLOCK = 16384


# Read once: Triton picks the interpreter when it decorates the kernels (at import), so the
# mode cannot change afterwards, and an os.environ lookup on every launch showed in host profiles.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if _INTERPRET:
    # Triton <= 3.6's interpreter: loops up to a runtime bound (NumPy >= 2.4) and bool arguments fail.
    from ._interpreter_compat import install as _install_interpreter_fix

    _install_interpreter_fix()


def interpreter_mode() -> bool:
    """True when Triton kernels run through the CPU interpreter (fixed when flag_gems is imported)."""
    return _INTERPRET


def check_tensor(name: str, t, dtypes=FLOAT_DTYPES) -> None:
    """Raise a clear error unless ``t`` is a tensor our kernels can run on.

    Args:
        name: argument name used in the message.
        t: the value to check.
        dtypes: accepted dtypes.

    Raises:
        TypeError: not a tensor, or an unsupported dtype.
        NotImplementedError: a device the kernels cannot run on.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: dtype {str(t.dtype).replace('torch.', '')} is not supported; expected one of {names}")
    dev = t.device.type
    if dev == "cuda":
        return
    if dev == "cpu" and interpreter_mode():
        return
    if dev == "cpu":
        raise NotImplementedError(
            f"{name}: CPU tensors need Triton's interpreter; set TRITON_INTERPRET=1 before "
            "importing flag_gems, or move the tensor to a CUDA device"
        )
    raise NotImplementedError(f"{name}: device {t.device} is not supported; expected a CUDA tensor")


def check_same_device(**tensors) -> None:
    """Raise ValueError unless every non-None tensor lives on one device."""
    devices = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device; got {desc}")


# Triton's CPU interpreter patches module-level state while a kernel runs, so two threads
# interpreting kernels at once corrupt each other; launches are serialized in that mode.
_INTERPRETER_LOCK = threading.RLock()


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host. Plain Python: ``triton.cdiv`` is jit-wrapped in recent
    Triton and costs microseconds per call on a launch path (measured: 7 such calls were
    most of an eager ``mean`` call's host time)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for n <= 1), without ``triton.next_power_of_2``'s jit wrapper."""
    return 1 << max(n - 1, 0).bit_length()


_NULL_CONTEXT = contextlib.nullcontext()  # reusable: it holds no state


def device_guard(t: torch.Tensor):
    """Context for one launch: makes ``t``'s CUDA device current (no-op when it already is);
    in interpreter mode, holds the lock that serializes interpreted kernels across threads."""
    if t.device.type == "cuda":
        # torch._C._cuda_getDevice: torch.cuda.current_device() without its lazy-init check
        # (CUDA is initialized: t lives there); a third of this function's time otherwise.
        if t.device.index is not None and t.device.index != torch._C._cuda_getDevice():
            return torch.cuda.device(t.device)
        return _NULL_CONTEXT
    return _INTERPRETER_LOCK


@functools.lru_cache(maxsize=None)
def row_config(n_cols: int, elem_bytes: int) -> tuple[int, int]:
    """Block size and warp count for kernels that give one row to each program.

    A row of up to MAX_FUSED_BLOCK elements is held whole in registers; longer rows
    are walked in MAX_FUSED_BLOCK chunks. Warps scale with the bytes a row moves so
    that each thread keeps 16-byte accesses in flight: about one warp per 1 KiB of
    row, between 1 and 16. H100 sweep (benchmarks/NOTES.md, add+RMSNorm at hidden 4096 and
    7168, M = 1..16384): no other warp count was faster beyond the run-to-run spread.

    Returns:
        (BLOCK_N, num_warps)
    """
    block = min(next_pow2(n_cols), MAX_FUSED_BLOCK)
    row_bytes = block * elem_bytes
    warps = max(1, min(16, row_bytes // 1024))
    return block, warps


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a small fixed number in interpreter mode."""
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# --------------------------------------------------------------------------- warnings

_WARNED: set = set()  # keys already warned about in this process (tests reset it)
_WARNED_LOCK = threading.Lock()


def warn_once(key, message: str, category: type = RuntimeWarning, stacklevel: int = 2) -> None:
    """Warn through Python's ``warnings`` (stderr unless filtered) the first time ``key`` comes up.

    What cannot run (a kernel, a pass, a tuning run) says so once per process and condition,
    never only to a logger nobody configured.

    Args:
        key: a hashable naming the condition, prefixed by the caller's module (``("autotune", ...)``).
        message: the warning text.
        category: the warning class.
        stacklevel: as ``warnings.warn``'s, counted from the caller of this function.
    """
    with _WARNED_LOCK:
        if key in _WARNED:
            return
        _WARNED.add(key)
    warnings.warn(message, category, stacklevel=stacklevel + 1)
