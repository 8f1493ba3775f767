"""Build of the optional C++ runtime ``flag_gems._C`` (sources in ``gems_compile/csrc/``).

Everything else about the package is declared in pyproject.toml; this file only adds the
extension. It is built with torch's C++ extension tooling, against the torch that is
importable at build time, and needs no CUDA toolkit: the CUDA driver is opened at run time
(dlopen) and the driver API's types come from the ``cuda.h`` that Triton's wheel carries.

torch must be importable while building, so install with ``--no-build-isolation`` after
torch (the README's commands do): an isolated build environment has no torch, and pulling
one into it would download a multi-GB CUDA build. Without torch, or when the compiler fails,
the package still installs and imports; ``flag_gems.c_operators`` then says why it is
unavailable and every op runs its Python path.

``GEMS_BUILD_CPP``: ``auto`` (default: build when torch is importable, warn on failure),
``1`` (a build failure fails the install), ``0`` (never build).
"""

from __future__ import annotations

import importlib.util
import os
import sys

from setuptools import setup

CSRC = os.path.join("gems_compile", "csrc")
SOURCES = [os.path.join(CSRC, "runtime.cpp"), os.path.join(CSRC, "ops.cpp")]


def triton_include_dir() -> str | None:
    """Triton's copy of the CUDA driver headers (``cuda.h``), without importing triton."""
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "backends", "nvidia", "include")
        if os.path.exists(os.path.join(path, "cuda.h")):
            return path
    return None


def compile_args() -> tuple[list[str], list[str]]:
    """(include dirs, compiler flags) shared with the first-import JIT build (c_runtime.py)."""
    include = triton_include_dir()
    # -O2 -g0: Python's CFLAGS carry -g, which doubles the compile time and the library size.
    flags = ["-O2", "-g0", "-fvisibility=hidden"]
    if include is not None:
        flags.append("-DGEMS_HAVE_CUDA_H")
    return ([include] if include else []), flags


def _extension_setup() -> dict:
    mode = os.environ.get("GEMS_BUILD_CPP", "auto")
    if mode == "0":
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        if mode == "1":
            raise
        print(
            "flag_gems: torch is not importable in this build environment, so the C++ runtime "
            "(flag_gems.c_operators) is not built; install torch first and then this package with "
            "`pip install --no-build-isolation ...`",
            file=sys.stderr,
        )
        return {}

    class Build(BuildExtension):
        """torch's BuildExtension; a failed build is a warning unless GEMS_BUILD_CPP=1."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001  (the package works without the extension)
                if mode == "1":
                    raise
                print(f"flag_gems: the C++ runtime was not built ({type(exc).__name__}: {exc}); "
                      "flag_gems.c_operators will be unavailable", file=sys.stderr)

    include, flags = compile_args()
    ext = CppExtension("flag_gems._C", SOURCES, include_dirs=include, extra_compile_args={"cxx": flags})
    return {"ext_modules": [ext], "cmdclass": {"build_ext": Build}}


setup(**_extension_setup())
