"""Fix-ups for Triton <= 3.6's interpreter, applied only where a probe shows the bug.

Both are fixed upstream (Triton 3.9 has neither); compiled Triton never reaches this module.

- ``range(..., n, ...)`` on a scalar kernel argument, under NumPy >= 2.4. The interpreter holds
  every scalar argument as a one-element 1-D array, and a loop such as
  ``for start in range(0, n_cols, BLOCK)`` asks it for ``__index__``, which Triton 3.6 answers
  with ``int(self.handle.data)``. NumPy 2.4 made ``int()`` of an array with ``ndim > 0`` a
  ``TypeError`` ("only 0-dimensional arrays can be converted to Python scalars"), so every kernel
  that loops up to a runtime bound failed (index_select, the chunked rms_norm / layer_norm /
  reduction paths, matmul's K loop, ...). Upstream: triton-lang/triton#9171, ``.squeeze()`` first.
- A Python ``bool`` kernel argument (not constexpr): Triton 3.6 converts it as an ``int``, an
  int32 array typed ``int1``, which its own ``TensorHandle`` check rejects ("numpy data itemsize
  (32 bits) exceeds dtype primitive_bitwidth (1 bits)"); the pointwise kernels' bool flags hit it.
  Triton 3.9 converts a bool to an ``np.bool_`` array first.

:func:`install` wraps the interpreter's module-level functions (``_patch_lang_tensor``, whose
per-launch patches Triton undoes after each launch, and ``_implicit_cvt``).
"""

from __future__ import annotations

import logging
import operator
import types

import numpy as np

log = logging.getLogger(__name__)


def _index(self) -> int:
    return int(self.handle.data.squeeze())


def _index_rejects_one_element_array(interp) -> bool:
    class Probe:
        pass

    scope = interp._LangPatchScope()
    try:
        interp._patch_lang_tensor(Probe, scope)
        probe = Probe.__new__(Probe)
        probe.handle = types.SimpleNamespace(data=np.array([3], dtype=np.int64))
        try:
            operator.index(probe)
        except TypeError:
            return True
        return False
    finally:
        scope.restore()


def _bool_arg_rejected(interp) -> bool:
    try:
        interp._implicit_cvt(True)
    except ValueError:
        return True
    return False


def _fix_index(interp) -> None:
    orig = interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", _index)  # in Triton's scope: undone after the launch

    interp._patch_lang_tensor = _patch_lang_tensor


def _fix_bool_arg(interp) -> None:
    orig = interp._implicit_cvt
    tl = interp.tl

    def _implicit_cvt(arg):
        if isinstance(arg, bool):
            return tl.tensor(interp.TensorHandle(np.array([arg], dtype=np.bool_), tl.int1), tl.int1)
        return orig(arg)

    interp._implicit_cvt = _implicit_cvt


_FIXES = (
    ("__index__ of a one-element array (NumPy >= 2.4, triton-lang/triton#9171)", _index_rejects_one_element_array,
     _fix_index),
    ("bool kernel arguments", _bool_arg_rejected, _fix_bool_arg),
)
_applied: list[str] | None = None  # None: not probed yet


def install() -> list[str]:
    """Apply each fix the installed interpreter needs, once per process.

    Returns:
        The names of the fixes applied (empty on Triton >= 3.9 or without an interpreter).
    """
    global _applied
    if _applied is not None:
        return list(_applied)
    _applied = []
    try:
        import triton.runtime.interpreter as interp
    except ImportError:  # no interpreter module: nothing to fix
        return []
    for name, needed, fix in _FIXES:
        try:
            if not needed(interp):
                continue
            fix(interp)
        except AttributeError as e:  # an interpreter laid out differently: leave it alone
            log.debug("Triton interpreter: fix for %s not applied: %s", name, e)
            continue
        _applied.append(name)
        log.debug("Triton interpreter: applied the fix for %s", name)
    return list(_applied)
