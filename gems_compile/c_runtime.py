"""The C++ runtime's Python side: loading ``flag_gems._C``, the launch hook, and where its wrappers are registered.

What the C++ side is (``csrc/``): wrappers that check their inputs, allocate outputs and
launch our Triton kernels, registered as the ``CUDA`` kernels of ``torch.ops.flag_gems.*``
ops (and, for the eager mode, of aten ops); and a launcher that looks each launch's
specialization up in a C++ table and calls the CUDA driver directly. A launch it has not
seen (the first call of a specialization) comes here, to :func:`_triton_launch`: Triton's
own path compiles and launches the kernel, and we return what the C++ launcher needs to do
the next ones alone (the ``CUfunction``, launch metadata, how each parameter is packed).

Loading (at ``import flag_gems``): the library built by the install (``setup.py``), else,
with ``GEMS_CPP_JIT=1``, a build now into torch's extension cache; ``GEMS_CPP=0`` skips it.
Nothing fails when it is missing: :data:`available` is False, :data:`reason` says why in one
line, and every op keeps its Python path.

Launch configs: a wrapper launches with the config the op's Python launcher would use, the
autotuner's (``kernels/_autotune.py``). The C++ side keeps the configs by tuning key; a key it
has not seen comes here once, to :func:`_tuned_config`, which resolves it with the family's
own ``Tunable`` (caches, ``GEMS_AUTOTUNE``, capture rules) and says whether C++ may keep the
answer: a heuristic answered during CUDA-graph capture is not kept (the next call asks again,
as the Python launcher resolves again); under ``GEMS_AUTOTUNE=off`` the answer is "the
heuristic", which the C++ side computes itself. When the Python side's choices change
(``_autotune.clear_memory``, a key tuned again) the C++ copies are dropped.

Where wrappers are registered: the ``CUDA`` key, and with ``GEMS_CPP_CPU=1`` under Triton's
interpreter also the ``CPU`` key (there every launch goes through this hook to the
interpreter: it tests the C++ wrappers' logic without a GPU). :func:`install` /
:func:`uninstall` change that at run time. ``GEMS_CPP_LAUNCH=0``: wrappers stay, every launch
goes through Triton's path (what a launch hook such as proton's needs to see every launch).
"""

from __future__ import annotations

import functools
import glob
import importlib.machinery
import logging
import os
import threading

import torch
import triton

from .kernels import _launch
from .kernels._common import device_guard, interpreter_mode, warn_once

logger = logging.getLogger(__name__)

__all__ = [
    "available",
    "deregister_aten",
    "fast_ops",
    "has_aten",
    "install",
    "installed_keys",
    "kept_config",
    "last_launch",
    "python_launches",
    "reason",
    "register_aten",
    "start",
    "stats",
    "tune_queries",
    "uninstall",
]

available = False
reason: str | None = "not loaded yet"

_HERE = os.path.dirname(os.path.abspath(__file__))
_lock = threading.Lock()
_python_launches = 0
_hook_lib = None  # the torch.library.Library holding the hook implementation
_installed: dict = {}  # dispatch key -> {qualname: handle}
_fast: dict = {}  # device type -> _FastOps
_tune_queries = 0
_last_launch: dict = {}  # kernel name -> what the last launch through the hook ran (last_launch)


# --------------------------------------------------------------------------- the kernels the wrappers launch

# Constexpr strings the wrappers pass, by id (csrc/runtime.h: ConstStr).
_STRINGS = ("ieee", "tf32")
# Operand classes of the pointwise generator, by id (csrc/ops.cpp: pointwise_launch); "scalar" an argument.
_CLASSES = ("c", "s", "g", "scalar")
# The generator's ops the wrappers launch, by id: the kPointwise* constants of csrc/ops.cpp (the tests of
# each wrapper check its results, so a table out of step fails there).
_POINTWISE_OPS = ("add", "mul", "neg", "rsqrt", "silu", "exp", "sigmoid", "to_copy", "pow", "pow_zero", "pow_one",
                  "pow_square", "pow_cube", "pow_sqrt", "pow_rsqrt", "pow_reciprocal", "pow_inv_square", "cos", "sin",
                  "tanh", "sqrt", "log", "abs", "reciprocal", "gelu", "gelu_tanh", "sub")


def _pointwise_kernel(variant):
    """The generated kernel of a C++ pointwise launch: variant (op id, output class, rank,
    64-bit indexing, each operand's class), computing in fp32 (csrc/ops.cpp: pointwise_launch)."""
    from .kernels import pointwise

    op_id, out_cls, rank, index64, *classes = variant
    op = pointwise.OPS[_POINTWISE_OPS[op_id]]
    if len(classes) != op.arity:
        raise ValueError(f"flag_gems C++ pointwise {op.name}: {len(classes)} operand classes for arity {op.arity}")
    key = (op.name, op.expr, tuple(_CLASSES[c] for c in classes), op.bool_args, _CLASSES[out_cls], torch.float32,
           rank, bool(index64))
    return pointwise._get_kernel(key)


def _kernel_table():
    """Name (csrc/runtime.cpp: kKernelNames) -> ``resolve(variant) -> triton.jit function``."""
    from .kernels import act_and_mul, indexing, matmul, nonzero, reduction, rms_norm, rotary_embedding

    fixed = {
        "rms_norm_fwd": rms_norm._rms_norm_fwd_kernel,
        "rope": rotary_embedding._rope_kernel,
        "act_and_mul_fwd": act_and_mul._act_and_mul_fwd_kernel,
        "matmul": matmul._matmul_kernel,
        "copy_2d": indexing._copy_2d_kernel,
        "reduce": reduction._reduce_kernel,
        "nonzero_count": nonzero._nonzero_count_kernel,
        "nonzero_write": nonzero._nonzero_write_kernel,
    }
    table = {name: (lambda variant, k=k: k) for name, k in fixed.items()}
    table["pointwise"] = _pointwise_kernel
    return table


_resolvers: list = []  # by kernel id
_kernel_names: list = []  # by kernel id (csrc/runtime.cpp: kKernelNames)


# --------------------------------------------------------------------------- the hook

# How the compiled kernel takes a parameter (csrc/runtime.cpp: Pack).
_SKIP, _PTR, _F32, _F64 = 0, 1, 10, 11
_INT_PACK = {"int8_t": 2, "int16_t": 3, "int32_t": 4, "int64_t": 5, "uint8_t": 6, "uint16_t": 7, "uint32_t": 8,
             "uint64_t": 9}


def _pack_code(ty: str, ty_to_cpp) -> int | None:
    """The C++ packing of one signature type, or None for one the launcher does not take."""
    if ty == "constexpr":
        return _SKIP
    if ty.startswith("*"):
        return _PTR
    if ty in ("fp32", "f32"):
        return _F32  # the float's 4 bytes (Triton 3.6 stores them so; older ones passed a float)
    if ty == "fp64":
        return _F64
    try:
        return _INT_PACK.get(ty_to_cpp(ty))
    except (KeyError, TypeError):
        return None


def _launch_info(kernel, fn, n_params: int) -> list[int]:
    """What the C++ launcher needs to launch ``kernel`` (a CompiledKernel) by itself, or []
    when it must keep Triton's path (the interpreter, scratch buffers, tensor descriptors,
    16-bit float scalars, a launch hook that must see every launch, another Triton)."""
    if kernel is None or _launch._hooks_active():
        return []
    kernel = _launch.compiled_kernel(kernel)
    try:
        from triton.backends.nvidia.driver import ty_to_cpp

        md = kernel.metadata
        function = kernel.function
        signature = kernel.src.signature
        names = list(fn.arg_names)
    except (AttributeError, ImportError) as exc:
        logger.debug("flag_gems C++ launcher: no cached launch for %s (%s)", fn, exc)
        return []
    if function is None:
        return []
    if len(names) != n_params:
        # The C++ wrapper passes another parameter list than the kernel has: an extension built
        # from other sources than this package's kernels. It still runs (Triton's path binds by
        # name), but every launch pays Python's cost: say so once.
        name = getattr(fn, "__name__", None) or repr(fn)
        warn_once(("c_runtime", "params", name),
                  f"flag_gems C++ runtime: kernel {name} takes {len(names)} parameters but the C++ wrapper passes "
                  f"{n_params}, so each of its launches goes through Triton's Python path (tens of µs); the "
                  "extension was built from other sources: rebuild it (pip install --no-build-isolation -e .)",
                  RuntimeWarning, stacklevel=2)
        return []
    if getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0):
        return []
    codes = []
    for name in names:
        ty = signature.get(name)
        code = _pack_code(ty, ty_to_cpp) if isinstance(ty, str) else None
        if code is None:
            return []
        codes.append(code)
    # Trailing pointers every Triton 3.x kernel takes: global scratch (3.3+), profile scratch (3.5+).
    n_scratch = 2 if hasattr(md, "profile_scratch_size") else 1 if hasattr(md, "global_scratch_size") else 0
    return [int(function), int(md.num_warps), int(getattr(md, "num_ctas", 1)), int(md.shared),
            int(bool(getattr(md, "launch_cooperative_grid", False))), int(bool(getattr(md, "launch_pdl", False))),
            n_scratch, *codes]


_capture_hook_lock = threading.Lock()


def _run_outside_capture(fn, params, grid, options):
    """``fn.run(*params)``, except that inside a CUDA graph capture a specialization Triton would
    have to compile first raises (``_launch.check_not_capturing``'s error: compiling and loading
    a module there breaks the capture) instead of compiling; one compiled before runs as usual.

    Triton is asked through its compile hook (``knobs.runtime.jit_cache_hook``, which it calls
    only when the specialization is not in its cache; a truthy answer skips the compile and the
    launch), set for this call only and answering for this thread only. A Triton without that
    hook compiles as before.
    """
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if (runtime is None or not hasattr(runtime, "jit_cache_hook") or not torch.cuda.is_available()
            or not torch.cuda.is_current_stream_capturing()):
        return fn.run(*params, grid=grid, warmup=False, **options)
    would_compile, me = [], threading.get_ident()

    def refuse(*args, **kwargs):
        if threading.get_ident() != me:  # another thread's compile meanwhile: as without this hook
            return previous(*args, **kwargs) if previous is not None else None
        would_compile.append(True)
        return True  # Triton skips the compile and the launch

    with _capture_hook_lock:  # one at a time: each restores the hook it found
        previous, runtime.jit_cache_hook = runtime.jit_cache_hook, refuse
        try:
            compiled = fn.run(*params, grid=grid, warmup=False, **options)
        finally:
            runtime.jit_cache_hook = previous
    if would_compile:
        _launch.check_not_capturing(fn)  # raises: the stream is capturing
    return compiled


def _triton_launch(kernel, variant, tensors, kinds, ints, floats, launch, cacheable):
    """``flag_gems_cpp::triton_launch``: one launch through Triton's path (compiling on first use).

    Args:
        kernel: the kernel's id (its index in ``kernel_names()``); variant: which generated kernel.
        tensors, ints, floats: the parameters' values by kind, in order; kinds: per parameter,
            0 tensor, 1 int, 2 float, 3 bool, 4 None, 5 constexpr int, 6 constexpr bool,
            7 constexpr str (an id into ``_STRINGS``).
        launch: ``[grid0, grid1, grid2, num_warps, num_stages]`` (num_stages 0: Triton's default).
        cacheable: the caller will keep the answer for later launches.

    Returns:
        ``_launch_info``'s list when ``cacheable``, else [].
    """
    global _python_launches
    fn = _resolvers[kernel](list(variant))
    if isinstance(fn, _launch.FastKernel):
        fn = fn.fn  # its triton.jit function: Triton's own path
    params, it, iv, fl = [], iter(tensors), iter(ints), iter(floats)
    for k in kinds:
        if k == 0:
            params.append(next(it))
        elif k in (1, 5):
            params.append(next(iv))
        elif k == 2:
            params.append(next(fl))
        elif k in (3, 6):
            params.append(bool(next(iv)))
        elif k == 4:
            params.append(None)
        else:
            params.append(_STRINGS[next(iv)])
    g0, g1, g2, warps, stages = launch
    options = {"num_warps": warps}
    if stages:
        options["num_stages"] = stages
    from . import eager

    busy = eager._BUSY  # aten calls Triton makes meanwhile (the interpreter's copies) go native
    was, busy.active = busy.active, True
    try:
        with device_guard(tensors[0]):
            compiled = _run_outside_capture(fn, params, (g0, g1, g2), options)
    finally:
        busy.active = was
    with _lock:
        _python_launches += 1
    names = getattr(fn, "arg_names", None) or [f"arg{j}" for j in range(len(kinds))]
    _last_launch[_kernel_names[kernel]] = {
        "constexprs": {n: v for n, k, v in zip(names, kinds, params) if k >= 5},
        "grid": (g0, g1, g2), "num_warps": warps, "num_stages": stages,
    }
    if not cacheable or interpreter_mode():
        return []
    return _launch_info(compiled, fn, len(kinds))


def last_launch(kernel: str) -> dict | None:
    """What the last launch of ``kernel`` (a name of ``kernel_names()``: ``"rms_norm_fwd"``, ...)
    through the Python hook ran, recorded after Triton's launch returned: ``{"constexprs":
    {name: value}, "grid", "num_warps", "num_stages"}`` (num_stages 0: Triton's default); None
    when none went through it. On a GPU only first calls of a specialization pass the hook; on
    the CPU (``GEMS_CPP_CPU=1``) every launch does."""
    return _last_launch.get(kernel)


# --------------------------------------------------------------------------- the tuned-config hook

# Sizes of the real call each family's wrapper passes after its key (csrc/ops.cpp), by the
# names the family's Python launcher gives ``Tunable.resolve`` (what a tuning run benchmarks).
_TUNE_DIMS = {"rms_norm": ("n_rows",), "act_and_mul": ("n_rows",), "rope": ("n_tokens",), "pointwise": ("n",),
              "matmul": ("m", "n", "k", "batch"), "reduction": ("n_rows", "n_cols")}
# Key fields the C++ side sends as 0/1 that the Python keys hold as bools (cache files spell them so).
_BOOL_KEY_FIELDS = frozenset({"has_residual", "copy_pass", "interleaved", "full_table", "has_bias", "b_kmajor",
                              "tma_ok"})
# The hook's answer: [status, values...] (csrc/runtime.cpp: kTuneKeep, kTuneOnce, kTuneOff).
_KEEP, _ONCE, _OFF = 0, 1, 2
_families: list = []  # by family id (csrc/runtime.h: Family): the Tunable
_kinds: tuple = ()  # kernels/matmul.py:KINDS (matmul's KIND field as its index)


def _decode_key(tunable, key, dtype) -> tuple:
    """The Python key of ``tunable`` from the C++ key values (the dtype field given apart)."""
    values, it = [], iter(key)
    for field in tunable.key_fields:
        if field == "dtype":
            values.append(dtype)
        elif field in _BOOL_KEY_FIELDS:
            values.append(bool(next(it)))
        else:
            values.append(int(next(it)))
    return tuple(values)


def _encode_key(tunable, key) -> tuple[list, torch.dtype | None]:
    """The inverse of :func:`_decode_key`: (C++ key values, dtype)."""
    ints, dtype = [], None
    for field, v in zip(tunable.key_fields, key, strict=True):
        if field == "dtype":
            dtype = v
        else:
            ints.append(int(v))
    return ints, dtype


def _encode_config(tunable, values) -> list[int]:
    return [_kinds.index(v) if f == "KIND" else int(v) for f, v in zip(tunable.fields, values)]


def _tuned_config(family, device, key, dtype, dims):
    """``flag_gems_cpp::tuned_config``: the launch config the family's Python launcher uses for this key.

    The lookup is the launchers' own (``Tunable.chosen``, then ``Tunable.resolve``: caches,
    tuning policy, capture rules), so the C++ wrapper and the Python launcher agree.

    Args:
        family: index into ``tuned_family_names()``; device: CUDA index, -1 for the CPU.
        key, dtype: the family's key (csrc/ops.cpp's order, bools as 0/1) without and with its dtype.
        dims: the call's sizes (``_TUNE_DIMS``): what a tuning run benchmarks.

    Returns:
        ``[status, values...]``: ``_KEEP`` (the Python side remembered this config for the key),
        ``_ONCE`` (for this call only: a heuristic chosen during CUDA-graph capture, or a tuning
        run's forced config), ``_OFF`` (``GEMS_AUTOTUNE=off``: the C++ heuristic, no values).
    """
    global _tune_queries
    from .kernels import _autotune as at

    t = _families[family]
    full = _decode_key(t, key, dtype)
    table = t.chosen  # a _Forced view while a tuning run forces a config on this thread
    values = table.get((device, full))
    if values is not None:
        answer = [_ONCE if isinstance(table, at._Forced) else _KEEP, *_encode_config(t, values)]
    elif at.mode() == "off":
        t.resolve(full, device)  # what the Python launcher's call does: remember the heuristic
        answer = [_OFF]
    else:
        values = t.resolve(full, device, dict(zip(_TUNE_DIMS[t.name], dims)))
        kept = t._table.get((device, full)) == values  # not remembered: a capture-time heuristic
        answer = [_KEEP if kept else _ONCE, *_encode_config(t, values)]
    with _lock:
        _tune_queries += 1
    return answer


def tune_queries() -> int:
    """Configs the C++ wrappers asked from the Python side since the process started (one per
    tuning key the C++ table had not kept); a repeated call of a kept key adds none."""
    return _tune_queries


def kept_config(name: str, key: tuple, device: int = -1):
    """What the C++ table keeps for tuning key ``key`` of family ``name`` (read only, never asks).

    Args:
        name: a family of ``tuned_family_names()`` (``"rms_norm"``, ``"matmul"``, ...).
        key: the family's Python key (``kernels/<family>.py:tune_key``).
        device: CUDA device index, -1 for the CPU.

    Returns:
        None (nothing kept), ``"heuristic"`` (kept under ``GEMS_AUTOTUNE=off``: the C++
        heuristic), or the config as ``{field: value}``.
    """
    family = [t.name for t in _families].index(name)
    t = _families[family]
    ints, dtype = _encode_key(t, key)
    got = torch.ops.flag_gems_cpp.tuned_peek(family, device, ints, dtype)
    if not got:
        return None
    if got[0]:
        return "heuristic"
    values = got[1:1 + len(t.fields)]
    return {f: (_kinds[v] if f == "KIND" else v) for f, v in zip(t.fields, values)}


def _forget_tuned() -> None:
    torch.ops.flag_gems_cpp.clear_tuned()


def python_launches() -> int:
    """Launches that went through the Python hook since the process started (first calls of a
    specialization, CPU tensors, kernels the C++ cache does not take). A repeated call of a
    cached specialization adds none: that is the test of "no Python on the path"."""
    return _python_launches


def stats() -> dict:
    """The C++ launcher's counters: ``cpp_launches`` (cache hits), ``python_launches`` (through
    the hook), ``uncacheable`` (specializations that keep Triton's path), ``tune_queries``
    (launch configs asked from the Python side: tuning keys the C++ table had not kept)."""
    cpp, py, unc, tq = torch.ops.flag_gems_cpp.stats()
    return {"cpp_launches": cpp, "python_launches": py, "uncacheable": unc, "tune_queries": tq}


# --------------------------------------------------------------------------- loading


def _library_path() -> str | None:
    """The built library: the one named for this interpreter, else any ``_C.*.so`` (a build for
    another Python may still load: the library holds no Python code; :func:`_load` says which
    it tried when it does not)."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(_HERE, "_C" + suffix)
        if os.path.exists(path):
            return path
    found = sorted(glob.glob(os.path.join(_HERE, "_C.*.so")))
    return found[0] if found else None


def _foreign(path: str) -> bool:
    """``path`` is not named for this interpreter (built by another Python, likely another torch)."""
    return not any(path.endswith("_C" + s) for s in importlib.machinery.EXTENSION_SUFFIXES)


def _jit_build() -> str:
    """Build the library now (GEMS_CPP_JIT=1) into torch's extension cache; returns its path."""
    import importlib.util

    from torch.utils import cpp_extension

    csrc = os.path.join(_HERE, "csrc")
    flags = ["-O2", "-g0", "-fvisibility=hidden"]
    include = []
    spec = importlib.util.find_spec("triton")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, "backends", "nvidia", "include")
        if os.path.exists(os.path.join(path, "cuda.h")):
            include.append(path)
            flags.append("-DGEMS_HAVE_CUDA_H")
            break
    logger.warning("flag_gems: building the C++ runtime now (GEMS_CPP_JIT=1; about a minute, once per machine)")
    cpp_extension.load(
        name="flag_gems_C",
        sources=[os.path.join(csrc, "runtime.cpp"), os.path.join(csrc, "ops.cpp")],
        extra_cflags=flags,
        extra_include_paths=include,
        is_python_module=False,
    )
    return "<jit>"


def _load() -> None:
    """Load the library and register the hook; sets :data:`available` and :data:`reason`."""
    global available, reason, _hook_lib, _kinds
    if os.environ.get("GEMS_CPP", "1") == "0":
        reason = "disabled by GEMS_CPP=0"
        return
    path = _library_path()
    try:
        if path is not None:
            torch.ops.load_library(path)
        elif os.environ.get("GEMS_CPP_JIT") == "1":
            _jit_build()  # cpp_extension.load loads it
        else:
            reason = ("flag_gems was installed without its C++ extension (it is built when torch is importable "
                      "at install time: pip install --no-build-isolation ...; or set GEMS_CPP_JIT=1)")
            return
    except Exception as exc:  # noqa: BLE001  (a library for another torch, a failed build: Python path)
        reason = f"the C++ extension failed to load: {type(exc).__name__}: {exc}".splitlines()[0]
        if path is not None and _foreign(path):
            reason = (f"the C++ extension {os.path.basename(path)} was built for another Python (this one loads "
                      f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}) and failed to load; rebuild it in this "
                      "environment: pip install --no-build-isolation -e . (" + reason + ")")
        return
    table = _kernel_table()
    names = list(torch.ops.flag_gems_cpp.kernel_names())
    missing = [n for n in names if n not in table]
    if missing:
        reason = f"the C++ extension launches kernels this package does not have: {missing}"
        return
    _resolvers[:] = [table[n] for n in names]
    _kernel_names[:] = names
    from .kernels import _autotune, matmul, pointwise  # noqa: F401  (pointwise: its Tunable)

    families = list(torch.ops.flag_gems_cpp.tuned_family_names())
    missing = [n for n in families if n not in _autotune.TUNABLES or n not in _TUNE_DIMS]
    if missing:
        reason = f"the C++ extension asks for tuned configs of kernel families this package does not have: {missing}"
        return
    _families[:] = [_autotune.TUNABLES[n] for n in families]
    _kinds = tuple(matmul.KINDS)
    torch.ops.flag_gems_cpp.set_tma_available(bool(matmul.HAS_TMA))
    _hook_lib = torch.library.Library("flag_gems_cpp", "IMPL")
    _hook_lib.impl("triton_launch", _triton_launch, "CompositeExplicitAutograd")
    _hook_lib.impl("tuned_config", _tuned_config, "CompositeExplicitAutograd")
    _autotune.on_change(_forget_tuned)
    available, reason = True, None
    why = torch.ops.flag_gems_cpp.driver_unavailable_reason()
    if why:
        logger.info("flag_gems C++ runtime: launches go through Triton's path on this machine: %s", why)


# --------------------------------------------------------------------------- registration


def _wrapped_flag_gems_ops() -> list[str]:
    return [n for n in torch.ops.flag_gems_cpp.wrapper_names() if n.startswith("flag_gems::")]


class _FastOps:
    """The C++ kernels of the wrapped flag_gems ops, called straight at one dispatch key.

    The public functions use these when nothing can observe the difference (no autograd, no
    tracing: ``lowerings/_utils.py:eager_fast_path``): the dispatcher goes to the C++ wrapper
    directly, skipping the Python autograd layer of ``custom_op`` (several µs a call).
    In-place wrappers bump the version counters themselves.
    """

    def __init__(self, key: str):
        keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
        for qualname in _wrapped_flag_gems_ops():
            name = qualname.split("::", 1)[1]
            op = getattr(torch.ops.flag_gems, name).default
            setattr(self, name, functools.partial(op._handle.redispatch_boxed, keyset))


def install(key: str = "CUDA") -> None:
    """Register the C++ wrappers as the ``key`` kernels of the flag_gems ops they serve
    (``"CUDA"``; ``"CPU"`` under Triton's interpreter, for tests). Idempotent.

    Raises:
        RuntimeError: the C++ runtime is not available.
    """
    if not available:
        raise RuntimeError(f"flag_gems C++ runtime unavailable: {reason}")
    with _lock:
        if key in _installed:
            return
        handles = {}
        try:
            for qualname in _wrapped_flag_gems_ops():
                handles[qualname] = torch.ops.flag_gems_cpp.register_wrapper(qualname, key)
        except BaseException:
            for h in handles.values():
                torch.ops.flag_gems_cpp.deregister(h)
            raise
        _installed[key] = handles
        device = "cuda" if key == "CUDA" else key.lower()
        _fast[device] = _FastOps(key)


def uninstall(key: str = "CUDA") -> None:
    """Undo :func:`install` for ``key``: the ops' Python implementations serve it again."""
    with _lock:
        handles = _installed.pop(key, None)
        _fast.pop("cuda" if key == "CUDA" else key.lower(), None)
    for h in (handles or {}).values():
        torch.ops.flag_gems_cpp.deregister(h)


def installed_keys() -> list[str]:
    """Dispatch keys whose flag_gems ops are served by the C++ wrappers now."""
    return sorted(_installed)


def fast_ops(device_type: str):
    """The :class:`_FastOps` for tensors of ``device_type`` ("cuda"), or None when the C++
    wrappers do not serve it. Cheap: one dict lookup (the public functions' hot path)."""
    return _fast.get(device_type)


def _aten_qualname(target) -> str:
    return target.name()  # "aten::add.Tensor", "aten::mm"


def has_aten(target) -> bool:
    """Whether the C++ runtime has a wrapper for this aten overload (the eager mode's hook)."""
    return available and _aten_qualname(target) in _aten_wrappers()


@functools.lru_cache(maxsize=None)
def _aten_wrappers() -> frozenset:
    return frozenset(n for n in torch.ops.flag_gems_cpp.wrapper_names() if n.startswith("aten::"))


def register_aten(target, key: str) -> int:
    """Register the C++ wrapper of an aten overload on ``key``; returns a handle.

    The wrapper checks each call in C++ and runs the kernel that was on ``key`` before (the
    native one) for what it does not take.

    Raises:
        ValueError: there is no C++ wrapper for ``target``.
        RuntimeError: the C++ runtime is not available.
    """
    if not available:
        raise RuntimeError(f"flag_gems C++ runtime unavailable: {reason}")
    return torch.ops.flag_gems_cpp.register_wrapper(_aten_qualname(target), key)


def deregister_aten(handle: int) -> None:
    """Undo :func:`register_aten`: the kernel before it is back."""
    torch.ops.flag_gems_cpp.deregister(handle)


def start() -> None:
    """Load the library and register the wrappers (``import flag_gems`` calls it once, after
    the op layer has defined the flag_gems ops)."""
    if available or reason != "not loaded yet":
        return
    _load()
    if not available:
        logger.info("flag_gems C++ runtime unavailable: %s", reason)
        return
    try:
        install("CUDA")
        if os.environ.get("GEMS_CPP_CPU") == "1" and interpreter_mode():
            install("CPU")
    except Exception as exc:  # noqa: BLE001  (a torch whose dispatcher refuses: the Python path stays)
        _unavailable(f"registering the C++ wrappers failed: {type(exc).__name__}: {exc}".splitlines()[0])


def _unavailable(why: str) -> None:
    global available, reason
    for key in list(_installed):
        uninstall(key)
    available, reason = False, why
    logger.warning("flag_gems C++ runtime unavailable: %s", why)

