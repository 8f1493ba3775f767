"""Whether flag_gems kernels can run in this process, and the one loud warning when they cannot.

Without a CUDA device the kernels run only through Triton's CPU interpreter, which Triton
reads when it decorates a function. ``import flag_gems`` switches it on unless triton was
imported first (``import transformers`` imports it) or ``TRITON_INTERPRET`` says otherwise;
then no kernel can run, and every op falls back to PyTorch. That state is recorded here at
import, and the first refusal of a kernel (an eager call sent to the native kernel, a graph
node left to aten) raises :class:`KernelsUnavailableWarning` through :mod:`warnings`, so it
reaches stderr; ``flag_gems.explain()`` says it in its first line.
"""

from __future__ import annotations

import threading
import warnings

__all__ = ["KernelsUnavailableWarning", "unavailable", "warn_refused"]


class KernelsUnavailableWarning(RuntimeWarning):
    """No flag_gems kernel can run in this process (see the message for what to do)."""


_reason: str | None = None
_warned = False
_lock = threading.Lock()


def set_unavailable(reason: str | None) -> None:
    """Record why kernels cannot run here (None: they can). Called by ``flag_gems/__init__``."""
    global _reason, _warned
    _reason, _warned = reason, False


def unavailable() -> str | None:
    """Why no flag_gems kernel can run in this process, or None when they can."""
    return _reason


def warn_refused(what: str, stacklevel: int = 3) -> None:
    """Note that a kernel was refused (``what``: the op); the first one in a process without
    kernels warns, once.

    Args:
        what: the op whose kernel was refused, for the message.
        stacklevel: as for :func:`warnings.warn`, counted from this function.
    """
    global _warned
    if _reason is None or _warned:
        return
    with _lock:
        if _warned:
            return
        _warned = True
    warnings.warn(f"flag_gems: {_reason} (first refused: {what})", KernelsUnavailableWarning, stacklevel=stacklevel)
