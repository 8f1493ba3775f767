"""The Triton <= 3.6 interpreter fix-ups (``kernels/_interpreter_compat.py``), on any Triton.

The suite's kernels exercise the fixes only under an old Triton; here each fix runs against a
stand-in interpreter that has the old behaviour (Triton 3.6's code for ``__index__`` and for a
bool argument), built from the installed interpreter's own classes.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

interp = pytest.importorskip("triton.runtime.interpreter")
from flag_gems.kernels import _interpreter_compat as compat  # noqa: E402


def _old_interpreter():
    def _patch_lang_tensor(tensor, scope):  # Triton 3.6: no squeeze
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))

    def _implicit_cvt(arg):  # Triton 3.6: a bool goes down the int path
        if isinstance(arg, int):
            ty = interp.tl.int1 if isinstance(arg, bool) else interp.tl.int32  # mangle_type: i1 / i32
            return interp.tl.tensor(interp.TensorHandle(np.array([arg], dtype=np.int32), ty), ty)
        return arg

    return types.SimpleNamespace(_LangPatchScope=interp._LangPatchScope, _patch_lang_tensor=_patch_lang_tensor,
                                 _implicit_cvt=_implicit_cvt, TensorHandle=interp.TensorHandle, tl=interp.tl)


def _numpy_rejects_one_element_int() -> bool:
    try:
        int(np.array([1]))
    except TypeError:
        return True
    return False


def test_index_squeezes_a_one_element_array():
    if not _numpy_rejects_one_element_int():
        pytest.skip(f"NumPy {np.__version__} still converts a one-element array with int()")
    old = _old_interpreter()
    assert compat._index_rejects_one_element_array(old)
    compat._fix_index(old)
    assert not compat._index_rejects_one_element_array(old)

    class T:
        pass

    scope = old._LangPatchScope()
    old._patch_lang_tensor(T, scope)
    t = T.__new__(T)
    t.handle = types.SimpleNamespace(data=np.array([7], dtype=np.int32))
    assert list(range(0, t, 3)) == [0, 3, 6]
    scope.restore()
    assert "__index__" not in T.__dict__, "the patch outlived its launch's scope"


def test_bool_argument_becomes_a_bool_array():
    old = _old_interpreter()
    assert compat._bool_arg_rejected(old)
    compat._fix_bool_arg(old)
    assert not compat._bool_arg_rejected(old)
    t = old._implicit_cvt(True)
    assert t.handle.data.dtype == np.bool_ and bool(t.handle.data[0]) and t.dtype == interp.tl.int1
    assert old._implicit_cvt(5).handle.data.dtype == np.int32  # other ints as before


def test_install_probes_once_and_leaves_a_fixed_interpreter_alone():
    first = compat.install()
    assert compat.install() == first
    assert not compat._index_rejects_one_element_array(interp)
    assert not compat._bool_arg_rejected(interp)
