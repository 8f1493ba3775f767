"""``from flag_gems import c_operators``: the C++ runtime, when it is available (FlagGems' API).

As upstream documents it, the import itself tells whether the C++ wrappers are there::

    try:
        from flag_gems import c_operators
        has_c_extension = True
    except Exception:
        c_operators = None
        has_c_extension = False

It raises ImportError, with the one-line reason, when the extension is missing (installed
without it, or ``GEMS_CPP=0``). When it imports, ``torch.ops.flag_gems.*`` run the C++
wrappers on CUDA tensors, the public functions (``flag_gems.rms_norm`` ...) route through
them, and the eager mode registers them as the aten kernels of the ops they cover.

Attributes and functions (see ``flag_gems.c_runtime`` for the design):

- ``available``: True here (a module that imports is one that is available).
- ``stats()``: the launcher's counters; ``python_launches()``: launches through Triton's path.
- ``install(key)`` / ``uninstall(key)`` / ``installed_keys()``: where the wrappers serve the flag_gems ops.
- ``set_launch_cache(on)``: False sends every launch through Triton's path (a profiler's launch
  hook sees them all); returns the previous setting.
"""

from __future__ import annotations

import torch

from .c_runtime import available, installed_keys, install, python_launches, reason, stats, uninstall

__all__ = ["available", "install", "installed_keys", "python_launches", "reason", "set_launch_cache", "stats",
           "uninstall", "wrapped_ops"]

if not available:
    raise ImportError(f"flag_gems C++ runtime unavailable: {reason}")


def set_launch_cache(on: bool) -> bool:
    """Whether launches after the first of a specialization skip Python (default True).

    Args:
        on: False makes every launch go through Triton's own path.

    Returns:
        The previous setting.
    """
    return bool(torch.ops.flag_gems_cpp.set_launch_cache(bool(on)))


def wrapped_ops() -> list[str]:
    """The ops with a C++ wrapper: ``flag_gems::*`` and the aten overloads the eager mode can use."""
    return list(torch.ops.flag_gems_cpp.wrapper_names())
