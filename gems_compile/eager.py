"""Eager dispatcher mode: ``flag_gems.enable()`` / ``use_gems()`` / ``only_enable()`` / ``disable()``.

Mechanism
---------
Each active entry of the op registry (``flag_gems.lowerings.registry.REGISTRY``, the table
the compile backend also reads) becomes a ``torch.library`` implementation of its aten
overload on the device's dispatch key (``CUDA`` on NVIDIA and AMD; ``CPU`` without a GPU,
where Triton runs in its interpreter, so CI exercises this very path)::

    native = torch._C._dispatch_get_computed_kernel_for_dispatch_key("aten::add.Tensor", "CUDA")
    lib = torch.library.Library("aten", "IMPL"); lib.impl(aten.add.Tensor, gems_kernel, "CUDA")
    ...
    lib._destroy()          # undo: the previous kernel is back

The registration sits below autograd, so aten's derivative formulas still apply and their
backward ops reach the overridden kernels too. Per call, ``gems_kernel`` asks the entry's
``supports(*args, **kwargs)``; None runs ``impl``, a reason runs the captured native kernel
(entries with ``checks_in_impl``, whose ``impl`` refuses by NotImplementedError before any
side effect, skip ``supports``: the refusal is the reason).
So an input an entry does not take (dtype, layout, size) costs one Python check, never an
error or a wrong answer. If ``impl`` itself raises on a non-mutating op, the native kernel
redoes the call (a warning once per op and error type names the kernel bug); mutating ops
re-raise, since a half-written output cannot be redone.

Each op has its own ``Library`` object, so a change of the active set touches only the ops
that differ: ``use_gems()`` inside ``enable()`` with the same op set registers nothing, and
entering/leaving a block costs tens of microseconds per op that changes.

Details the kernels and their ``supports`` must expect:

- A Python number passed where the schema says ``Tensor`` (``x + 1.5`` is
  ``aten.add.Tensor(x, 1.5)``, a "wrapped number" in C++) reaches ``supports``/``impl`` as a
  Python number. The native fallback turns it back into a 0-dim tensor that gives the same
  dtype and the same bits (torch's boxed call cannot make wrapped numbers; see
  :func:`_tensorize_numbers`).
- While an implementation runs, aten calls it makes on the same thread (a launcher's
  ``.contiguous()``, the interpreter's copies) go to the native kernels: no recursion.

State
-----
Process-wide, as the dispatcher is: ``enable()``/``only_enable()`` set the base state (a
second call replaces the first), ``disable()`` turns everything off (including open
``use_gems`` blocks), and each ``use_gems()`` block pushes a state that applies until it
exits, when the state from before it is back (also on exceptions, also when blocks exit
out of order from different threads). State changes take a lock.

Names (``unused=`` / ``exclude=`` / ``include=``), case-insensitive
--------------------------------------------------------------------
==================  ==========================================================
``"add"``           every registered overload of ``add`` and of ``add_``
``"add_"``          the in-place overloads only
``"add.Tensor"``    one overload (also ``"aten::add.Tensor"``, ``aten.add.Tensor``)
``"add_tensor"``    the record log's name (``GEMS ADD_TENSOR``), lower or upper case
``"mm"``            ``mm.default`` (plus any other ``mm`` overloads)
==================  ==========================================================

A default overload's log name is its op name (``GEMS ABS`` is ``"abs"``), so it also
covers the in-place form; name ``"abs.default"`` to keep ``abs_``.

An aten op with no flag_gems entry is accepted (``unused=["sum"]`` excludes nothing;
``include=["sum"]`` warns that it stays native); a name that is no aten op at all is a
ValueError listing close matches.

What is registered
------------------
``enable()`` / ``use_gems()`` register every registry entry whose ``eager`` policy is on: all of
them, as FlagGems replaces every op it implements, unless a correctness finding is recorded
against one (``flag_gems.lowerings.exclusions``). Speed is not the bar: a GEMM slower than
cuBLAS is registered too. ``preset="fast"`` registers only the entries measured faster than
the native kernel at every benchmark shape (``flag_gems.lowerings.registry``'s ``fast``
policy, from ``flag_gems.lowerings.measurements``); ``unused=`` removes ops from either set,
``only_enable(include=...)`` / ``use_gems(include=...)`` register exactly the named ones.

Record
------
``record=True`` appends one line per call to ``path`` (default ``~/.flaggems/oplist.log``),
through a ``logging.FileHandler`` on the ``flag_gems.ops`` logger (not propagated while
recording), written after the work, so it never claims what did not happen:
``[DEBUG] flag_gems.ops.fill: GEMS FILL_SCALAR_`` once the flag_gems kernel returned (a kernel
that raises is never logged). With ``fallbacks=True`` the calls that ran the native kernel
are logged too, distinguishable from the GEMS lines (upstream's file has GEMS lines only, and
parsers of it expect that, so these are opt-in):

- ``[DEBUG] flag_gems.ops.add: NATIVE ADD_TENSOR: <reason>`` when the entry's ``supports``
  refused the input;
- ``[WARNING] flag_gems.ops.sin: NATIVE SIN: the flag_gems kernel raised RuntimeError`` when
  the kernel failed and the native kernel redid the call.

The logger is ``flag_gems.ops.<op without in-place underscore>``, the name is the op
upper-cased, then ``_<OVERLOAD>`` unless it is ``default``, then ``_`` for in-place ops:
``fill_.Scalar`` -> ``FILL_SCALAR_``, ``add.Tensor`` -> ``ADD_TENSOR``, ``mm.default`` -> ``MM``.
``once=True`` logs each op (and each fallback reason) once. The file is rewritten when
recording starts (appended to when an inner block hands it back); with recording off the
per-call cost is one call of a no-op.

Cost (CPU, torch 2.13, 16-element tensors): the Python kernel boundary costs about 1 µs a
call, this wrapper about 0.2 µs more; a fallback about 2.5 µs over the native call;
``record=True`` about 10 µs (a file write), ``once=True`` nothing measurable after the
first call. Entering and leaving a ``use_gems`` block costs about 20-40 µs per op whose state
changes: 5-7 ms for a block of every entry (159 overloads) outside ``enable()``, nothing inside
an ``enable()`` with the same set. Wrap a generation loop or a training step, not each op.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import os
import threading
import warnings

import torch

from . import availability, c_runtime, runtime
from .lowerings.registry import REGISTRY, Lowering, preset_targets

logger = logging.getLogger(__name__)

__all__ = ["all_registered_ops", "disable", "enable", "only_enable", "use_gems"]

DEFAULT_RECORD_PATH = os.path.join("~", ".flaggems", "oplist.log")
RECORD_LOGGER = "flag_gems.ops"
RECORD_FORMAT = "[%(levelname)s] %(name)s: %(message)s"

_OpOverload = torch._ops.OpOverload
_OpOverloadPacket = torch._ops.OpOverloadPacket


# --------------------------------------------------------------------------- names


@dataclasses.dataclass(frozen=True)
class _OpNames:
    """The names one aten overload answers to, and its record-log identity."""

    display: str  # "add.Tensor", "mm" (default overload: bare name)
    base: str  # "fill_"
    stem: str  # "fill" (base without the in-place underscore)
    log_name: str  # "FILL_SCALAR_"
    exact: tuple[str, ...]  # lower-cased forms naming this overload only


def _op_names(target: _OpOverload) -> _OpNames:
    base = target._schema.name.split("::", 1)[1]
    overload = target._schema.overload_name
    inplace = base.endswith("_") and not base.endswith("__")
    stem = base[:-1] if inplace else base
    log_name = stem.upper() + (f"_{overload.upper()}" if overload else "") + ("_" if inplace else "")
    display = f"{base}.{overload}" if overload else base
    exact = {display.lower(), f"{base}.{overload or 'default'}".lower(), log_name.lower()}
    return _OpNames(display, base, stem, log_name, tuple(sorted(exact)))


def _name_index() -> dict[str, set]:
    """Lower-cased name -> registry targets it covers."""
    index: dict[str, set] = {}
    for target in REGISTRY:
        names = _op_names(target)
        for form in (*names.exact, names.base.lower(), names.stem.lower()):
            index.setdefault(form, set()).add(target)
    return index


def _is_aten_op(name: str) -> bool:
    """Whether ``name`` ("sum", "sum.dim_IntList", case-insensitive overload) is an aten op."""
    base, _, overload = name.partition(".")
    packet = getattr(torch.ops.aten, base, None) if base.isidentifier() else None
    if not isinstance(packet, _OpOverloadPacket):
        return False
    return not overload or overload in ("default", *(o.lower() for o in packet.overloads()))


def _close_matches(name: str, index) -> list[str]:
    ours = difflib.get_close_matches(name, list(index), n=5, cutoff=0.6)
    if ours:
        return ours
    aten = {n.split("::", 1)[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith("aten::")}
    return difflib.get_close_matches(name, sorted(aten), n=5, cutoff=0.7)


def _resolve(names, argname: str) -> frozenset:
    """The registry targets that ``names`` (see the module docstring) cover.

    Raises:
        TypeError: ``names`` is not a string, an aten op or a list of those.
        ValueError: a name that is no aten op (the message lists close matches).
    """
    if names is None:
        return frozenset()
    if isinstance(names, (str, _OpOverload, _OpOverloadPacket)):
        names = [names]
    try:
        names = list(names)
    except TypeError:
        raise TypeError(f"{argname}: expected a list of op names, got {type(names).__name__}") from None
    index = None
    out: set = set()
    for name in names:
        if isinstance(name, _OpOverload):
            if name in REGISTRY:
                out.add(name)
            else:
                _note_not_registered(str(name), argname)
            continue
        if isinstance(name, _OpOverloadPacket):
            name = name._qualified_op_name
        if not isinstance(name, str):
            raise TypeError(f"{argname}: expected op names (str) or aten ops, got {name!r}")
        key = name.strip().lower()
        for prefix in ("torch.ops.aten.", "aten::", "aten."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        index = _name_index() if index is None else index
        if key in index:
            out |= index[key]
        elif _is_aten_op(key):
            _note_not_registered(name, argname)
        else:
            close = _close_matches(key, index)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise ValueError(
                f"{argname}: {name!r} names no aten op{hint}. "
                "Use an op name ('add'), an overload ('add.Tensor') or a record-log name ('add_tensor'); "
                "flag_gems.all_registered_ops() lists the active ones"
            )
    return frozenset(out)


def _note_not_registered(name: str, argname: str) -> None:
    if argname == "include":
        logger.warning("include: %s has no flag_gems kernel; it stays native", name)
    else:
        logger.debug("%s: %s has no flag_gems kernel; nothing to exclude", argname, name)


# --------------------------------------------------------------------------- record


class _Recorder:
    """One ``record=True`` configuration: the file, ``once``, ``fallbacks``, and the ops logged so far."""

    def __init__(self, path: str | None, once: bool, fallbacks: bool = False):
        self.path = os.path.abspath(os.path.expanduser(path if path else DEFAULT_RECORD_PATH))
        self.once = once
        self.fallbacks = fallbacks
        self._logged: set[str] = set()
        self._lock = threading.Lock()
        self._started = False

    def same_as(self, other: _Recorder | None) -> bool:
        return other is not None and (self.path, self.once, self.fallbacks) == (other.path, other.once, other.fallbacks)

    def open(self) -> logging.Handler:
        """A handler on the file: rewritten on the first open, appended to when an outer
        state gets it back after an inner block."""
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        handler = logging.FileHandler(self.path, mode="a" if self._started else "w", encoding="utf-8")
        handler.setFormatter(logging.Formatter(RECORD_FORMAT))
        handler.setLevel(logging.DEBUG)
        self._started = True
        return handler

    def _first(self, key) -> bool:
        """With ``once``, whether ``key`` is logged for the first time (and mark it)."""
        if key in self._logged:
            return False
        with self._lock:
            if key in self._logged:
                return False
            self._logged.add(key)
            return True

    def log(self, info: _KernelInfo) -> None:
        """A flag_gems kernel returned: ``GEMS <NAME>``."""
        if self.once and not self._first(info.message):
            return
        info.logger.debug(info.message)

    def log_native(self, info: _KernelInfo, reason: str, failure: Exception | None) -> None:
        """The call ran the native kernel: ``NATIVE <NAME>: <reason>`` (WARNING after a kernel error)."""
        if failure is not None:
            reason = f"the flag_gems kernel raised {type(failure).__name__}"
        reason = str(reason).split("\n", 1)[0][:_MAX_REASON]
        if self.once and not self._first((info.native_message, reason)):
            return
        info.logger.log(logging.WARNING if failure is not None else logging.DEBUG, "%s: %s", info.native_message, reason)


_MAX_REASON = 200  # characters of a fallback reason in the record file


def _no_record(info) -> None:
    pass


def _no_record_native(info, reason, failure) -> None:
    pass


# The hot path calls these after each call (a kernel that returned, a native fallback): no-ops unless recording.
_record = _no_record
_record_native = _no_record_native


# --------------------------------------------------------------------------- the kernel wrapper


class _Busy(threading.local):
    active = False  # True while this thread runs a flag_gems supports()/impl


_BUSY = _Busy()
_NUMBERS = (bool, int, float, complex)


@dataclasses.dataclass
class _KernelInfo:
    entry: Lowering
    names: _OpNames
    logger: logging.Logger
    message: str  # "GEMS ADD_TENSOR"
    native_message: str  # "NATIVE ADD_TENSOR"
    mutable: bool
    tensor_slots: tuple[tuple[int, str], ...]  # (position, name) of Tensor-typed inputs (out= excluded)
    out_slots: tuple[tuple[int, str], ...]  # (position, name) of out= tensors
    return_aliases: tuple  # per return: (position, name) of the argument it aliases, or None
    noted: set = dataclasses.field(default_factory=set)  # _note_once keys already logged
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


def _category(x) -> int:
    """Type-promotion category: bool 0, integer 1, floating 2, complex 3."""
    if isinstance(x, torch.dtype):
        return 3 if x.is_complex else 2 if x.is_floating_point else 0 if x == torch.bool else 1
    return 0 if isinstance(x, bool) else 1 if isinstance(x, int) else 2 if isinstance(x, float) else 3


_NATURAL = {0: torch.bool, 1: torch.int64, 2: torch.float64, 3: torch.complex128}


def _tensorize_numbers(info: _KernelInfo, args: tuple, kwargs: dict):
    """Python numbers in Tensor slots as 0-dim tensors that promote like wrapped numbers.

    A wrapped number ranks below every tensor in type promotion, and kernels read its value
    in double precision. A plain 0-dim tensor of the number's wide dtype (float64, int64,
    ...) does the same whenever a dimensioned tensor of at least its category is present
    (the common ``x + 1.5``). When every tensor is 0-dim (``loss * 0.5``) they are viewed
    as shape [1] to make that so (see :func:`_restore_outputs`). Otherwise the number takes
    the call's promoted dtype, which leaves promotion unchanged.

    Returns:
        ``(args, kwargs, squeeze)``; ``squeeze``: the outputs need :func:`_restore_outputs`.
    """
    values = [args[i] if i < len(args) else kwargs.get(n) for i, n in info.tensor_slots]
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    outs = [args[i] if i < len(args) else kwargs.get(n) for i, n in info.out_slots]
    kinds = [_category(v) for v in values if type(v) in _NUMBERS]
    squeeze = (
        bool(tensors)
        and all(t.dim() == 0 for t in tensors)
        and max(_category(t.dtype) for t in tensors) >= max(kinds)
        and all(isinstance(o, torch.Tensor) and o.dim() == 0 for o in outs)
    )
    args, kwargs = list(args), dict(kwargs)
    if squeeze:
        values = [v.reshape(1) if isinstance(v, torch.Tensor) else v for v in values]
        tensors = [t.reshape(1) for t in tensors]
        for (i, name), o in zip(info.out_slots, outs):
            if i < len(args):
                args[i] = o.reshape(1)
            else:
                kwargs[name] = o.reshape(1)
    promoted = None
    for (i, name), v in zip(info.tensor_slots, values):
        if type(v) in _NUMBERS:
            kind = _category(v)
            if any(t.dim() > 0 and _category(t.dtype) >= kind for t in tensors):
                dtype = _NATURAL[kind]
            else:
                if promoted is None:
                    from torch._prims_common import ELEMENTWISE_TYPE_PROMOTION_KIND, elementwise_dtypes

                    present = [x for x in values if x is not None]
                    promoted = elementwise_dtypes(*present, type_promotion_kind=ELEMENTWISE_TYPE_PROMOTION_KIND.DEFAULT)[1]
                dtype = promoted
            v = torch.scalar_tensor(v, dtype=dtype)
        elif not squeeze:
            continue
        if i < len(args):
            args[i] = v
        else:
            kwargs[name] = v
    return args, kwargs, squeeze


def _restore_outputs(info: _KernelInfo, out, args: tuple, kwargs: dict):
    """Undo the shape-[1] views: outputs aliasing an argument (in-place, out=) are that
    argument itself; new tensors are viewed back to shape []."""

    def restore(o, alias):
        if alias is not None:
            i, name = alias
            return args[i] if i < len(args) else kwargs[name]
        if isinstance(o, torch.Tensor):
            return o.reshape(())
        if isinstance(o, (tuple, list)):
            return type(o)(restore(x, None) for x in o)
        return o

    aliases = info.return_aliases
    if len(aliases) == 1:
        return restore(out, aliases[0])
    return tuple(restore(o, a) for o, a in zip(out, aliases))


_MAX_NOTES = 64  # per op: reasons may name shapes; the log stays bounded


def _note_once(info: _KernelInfo, key: tuple, level: int, fmt: str, *fmt_args) -> None:
    """Log once per op and ``key`` (a fallback reason, an error type)."""
    if key in info.noted or len(info.noted) >= _MAX_NOTES:
        return
    with info.lock:
        if key in info.noted:
            return
        info.noted.add(key)
    logger.log(level, fmt, *fmt_args)


def _make_kernel(info: _KernelInfo, native, keyset):
    """The function registered for one aten overload (see the module docstring)."""
    supports = info.entry.supports
    impl = info.entry.impl
    call_boxed = native.call_boxed
    busy = _BUSY

    slots = info.tensor_slots

    def call_native(args, kwargs):
        n = len(args)
        for i, name in slots:
            if type(args[i] if i < n else kwargs.get(name)) in _NUMBERS:
                new_args, new_kwargs, squeeze = _tensorize_numbers(info, args, kwargs)
                out = call_boxed(keyset, *new_args, **new_kwargs)
                return _restore_outputs(info, out, args, kwargs) if squeeze else out
        return call_boxed(keyset, *args, **kwargs)

    def fallback(args, kwargs, reason, failure):
        if failure is None:
            _note_once(info, ("fallback", reason), logging.DEBUG, "%s: native kernel (%s)", info.names.display, reason)
            availability.warn_refused(info.names.display, stacklevel=4)  # the caller of the aten op
            out = call_native(args, kwargs)
            _record_native(info, reason, None)
            return out
        out = call_native(args, kwargs)  # raises torch's own error when the input is bad
        _note_once(
            info,
            ("error", type(failure)),
            logging.WARNING,
            "%s: the flag_gems kernel %s raised %s: %s; the native kernel handled the call",
            info.names.display,
            info.entry.kernel,
            type(failure).__name__,
            failure,
        )
        _record_native(info, None, failure)
        return out

    # The record line is written after impl returned: a kernel that raises is never logged as GEMS.
    def gems_kernel(*args, **kwargs):
        if busy.active:  # an aten call made by our own supports()/impl: native
            return call_native(args, kwargs)
        busy.active = True
        reason = failure = None
        try:
            reason = supports(*args, **kwargs)
            if reason is None:
                out = impl(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001  (the native kernel decides: it raises for bad input)
            if info.mutable:
                raise
            failure = exc
        finally:
            busy.active = False
        if reason is None and failure is None:
            _record(info)
            return out
        return fallback(args, kwargs, reason, failure)

    def gems_kernel_checked(*args, **kwargs):  # checks_in_impl: the impl's refusal is the reason
        if busy.active:
            return call_native(args, kwargs)
        busy.active = True
        reason = failure = None
        try:
            out = impl(*args, **kwargs)
        except NotImplementedError as exc:
            reason = str(exc)
        except Exception as exc:  # noqa: BLE001
            if info.mutable:
                raise
            failure = exc
        finally:
            busy.active = False
        if reason is None and failure is None:
            _record(info)
            return out
        return fallback(args, kwargs, reason, failure)

    kernel = gems_kernel_checked if info.entry.checks_in_impl else gems_kernel
    kernel.__name__ = kernel.__qualname__ = f"gems_{info.names.display.replace('.', '_')}"
    return kernel


# --------------------------------------------------------------------------- registration


_NATIVE: dict = {}  # (target, key) -> the kernel our registration replaces, captured once
_KERNELS: dict = {}  # (entry, key) -> the function registered for it, built once


class _NoNative:
    """Stands in for a native kernel an op does not have on a key: a fallback to it raises."""

    def __init__(self, qualname: str, key: str):
        self.what = f"{qualname} has no native {key} kernel"

    def call_boxed(self, *args, **kwargs):
        raise NotImplementedError(f"{self.what} and flag_gems' kernel does not take these inputs")


def _native_kernel(target: _OpOverload, key: str):
    """The kernel ``target`` runs on ``key`` without us, captured on the first registration.

    Captured only while no flag_gems registration of ``target`` is active (there is at most
    one, and it is destroyed before the next is made), then reused: our own wrapper is never
    taken for the native kernel.
    """
    native = _NATIVE.get((target, key))
    if native is None:
        qualname = target.name()
        if torch._C._dispatch_has_computed_kernel_for_dispatch_key(qualname, key):
            native = torch._C._dispatch_get_computed_kernel_for_dispatch_key(qualname, key)
        else:  # e.g. _fused_rms_norm_backward on the CPU: ours is the only kernel there
            native = _NoNative(qualname, key)
        _NATIVE[(target, key)] = native
    return native


def _decomposes_above(target: _OpOverload, key: str) -> bool:
    """Whether ``target`` is CompositeImplicitAutograd with no autograd kernel of its own
    (``scaled_dot_product_attention``): it differentiates through the ops it decomposes into."""
    qualname = target.name()
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    own_autograd = has(qualname, "Autograd") or has(qualname, f"Autograd{key}")
    return has(qualname, "CompositeImplicitAutograd") and not own_autograd


def _kernel_for(entry: Lowering, key: str):
    """The function registered for ``entry`` on ``key`` (built once per entry and key)."""
    kernel = _KERNELS.get((entry, key))
    if kernel is None:
        target = entry.target
        schema = target._schema
        names = _op_names(target)
        info = _KernelInfo(
            entry=entry,
            names=names,
            logger=logging.getLogger(f"{RECORD_LOGGER}.{names.stem}"),
            message=f"GEMS {names.log_name}",
            native_message=f"NATIVE {names.log_name}",
            mutable=schema.is_mutable,
            tensor_slots=tuple(
                (i, a.name) for i, a in enumerate(schema.arguments) if _is_tensor_type(a.type) and not _is_out(a)
            ),
            out_slots=tuple((i, a.name) for i, a in enumerate(schema.arguments) if _is_out(a)),
            return_aliases=tuple(_aliased_argument(schema, r) for r in schema.returns),
        )
        keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
        kernel = _KERNELS[(entry, key)] = _make_kernel(info, _native_kernel(target, key), keyset)
    return kernel


# The implementations the registry was built with (flag_gems imports lowerings/ before this
# module): a C++ wrapper stands in for one of these only, never for an entry replaced later.
_BUILTIN_IMPLS = {target: entry.impl for target, entry in REGISTRY.items()}


class _Registration:
    """The one place an implementation is registered: ``entry``'s aten overload overridden on a
    dispatch key; ``destroy()`` restores the kernel before it.

    What is registered, in order: ``kernel`` when given; with ``allow_cpp`` and a C++ wrapper
    for the overload on a key the C++ runtime serves (``flag_gems.c_runtime``: ``CUDA``), that
    wrapper (it checks each call in C++ and runs the native kernel for what it does not take);
    otherwise the Python wrapper of :func:`_kernel_for` (``supports``/``impl``, native
    fallback, record).

    Args:
        entry: the registry entry.
        key: the dispatch key (``"CUDA"``, ``"CPU"``).
        allow_cpp: whether the C++ wrapper may serve it (off while recording: C++ kernels
            write no record lines).
        kernel: a function of the same contract to register instead.

    Create under ``_quiet_overrides()``.
    """

    def __init__(self, entry: Lowering, key: str, allow_cpp: bool = True, kernel=None):
        self.entry = entry
        self.kernel = kernel
        self.lib = torch.library.Library("aten", "IMPL")
        self.cpp = None  # the C++ registration's handle
        self.allow_cpp = allow_cpp
        if (
            kernel is None
            and allow_cpp
            and entry.impl is _BUILTIN_IMPLS.get(entry.target)  # the C++ wrapper ports this impl, not a replacement
            and c_runtime.has_aten(entry.target)
            and key in c_runtime.installed_keys()
        ):
            self.cpp = c_runtime.register_aten(entry.target, key)
        else:
            self.kernel = _kernel_for(entry, key) if kernel is None else kernel
            self.lib.impl(entry.target, self.kernel, key)
        if _decomposes_above(entry.target, key):
            # A device-key kernel takes the op's Autograd<key> slot from the decomposition;
            # torch then fills it with its autograd backend fallback, which warns at backward
            # (deprecated, "may lead to silently incorrect behavior"). A fallthrough instead
            # reaches our kernel with autograd still on, so a fallback to the differentiable
            # native composite records its graph as before. supports() refuses inputs needing grad.
            self.lib.impl(entry.target, torch.library.fallthrough_kernel, f"Autograd{key}")
        _forget_dispatch_cache(entry.target)

    def destroy(self) -> None:
        if self.cpp is not None:
            c_runtime.deregister_aten(self.cpp)
        self.lib._destroy()
        _forget_dispatch_cache(self.entry.target)


def _forget_dispatch_cache(target: _OpOverload) -> None:
    """Drop the Python dispatcher's per-key resolutions of ``target`` (torch's ``_dispatch_cache``).

    Tracing (AOT autograd, ``make_fx``, ``opcheck``) caches which dispatch key serves each key of
    an op: with our kernel registered, ``clone``'s ``CPU`` resolves to ``CPU`` (natively it is
    ``CompositeExplicitAutograd``). Kept after the registration is gone, a later trace calls a
    kernel slot that no longer exists: a segmentation fault (seen: ``opcheck`` inside a
    ``use_gems`` block, then ``torch.compile`` after it). torch's ``Library`` does not reset it.
    """
    cache = getattr(target, "_dispatch_cache", None)
    if cache is not None:
        cache.clear()


@contextlib.contextmanager
def _quiet_overrides():
    """Silence the dispatcher's "Overriding a previously registered kernel" warning for our registrations."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*Overriding a previously registered kernel")
        yield


def _aliased_argument(schema, ret):
    """(position, name) of the argument a return aliases (``Tensor(a!)``), or None."""
    if ret.alias_info is None or not ret.alias_info.before_set:
        return None
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.before_set == ret.alias_info.before_set:
            return i, a.name
    return None


def _is_out(arg) -> bool:
    """An ``out=`` argument: written, keyword-only, not an input of type promotion."""
    return arg.kwarg_only and arg.alias_info is not None and arg.alias_info.is_write


def _is_tensor_type(t) -> bool:
    if isinstance(t, torch.OptionalType):
        t = t.getElementType()
    return isinstance(t, torch.TensorType)


# --------------------------------------------------------------------------- state


@dataclasses.dataclass(frozen=True)
class _Config:
    ops: frozenset
    recorder: _Recorder | None


_LOCK = threading.RLock()
_base: _Config | None = None
_frames: list = []  # [(token, _Config)], innermost last
_registered: dict = {}  # target -> _Registration
_recorder: _Recorder | None = None
_handler: logging.Handler | None = None
_ops_logger_saved: tuple | None = None  # (level, propagate) of flag_gems.ops before recording


def _switch_recorder(new: _Recorder | None) -> None:
    """Point the ``flag_gems.ops`` logger at ``new``'s file (None: stop recording)."""
    global _record, _record_native, _recorder, _handler, _ops_logger_saved
    if new is _recorder:
        return
    handler = new.open() if new is not None else None  # may raise (bad path): nothing changed yet
    ops_logger = logging.getLogger(RECORD_LOGGER)
    if _handler is not None:
        ops_logger.removeHandler(_handler)
        _handler.close()
    if handler is not None:
        if _ops_logger_saved is None:
            _ops_logger_saved = (ops_logger.level, ops_logger.propagate)
        ops_logger.addHandler(handler)
        ops_logger.setLevel(logging.DEBUG)
        ops_logger.propagate = False  # the record file only, not the application's handlers
    elif _ops_logger_saved is not None:
        ops_logger.setLevel(_ops_logger_saved[0])
        ops_logger.propagate = _ops_logger_saved[1]
        _ops_logger_saved = None
    _handler, _recorder = handler, new
    _record = new.log if new is not None else _no_record
    _record_native = new.log_native if new is not None and new.fallbacks else _no_record_native


def _apply() -> None:
    """Make the dispatcher and the record file match the innermost state (hold ``_LOCK``)."""
    config = _frames[-1][1] if _frames else _base
    _switch_recorder(config.recorder if config else None)
    want = {t: REGISTRY[t] for t in (config.ops if config else ()) if t in REGISTRY}
    allow_cpp = config is None or config.recorder is None  # C++ kernels write no record lines
    for target in [t for t, reg in _registered.items() if want.get(t) is not reg.entry or reg.allow_cpp != allow_cpp]:
        _registered.pop(target).destroy()
    key = runtime.dispatch_key
    added = sorted(set(want) - set(_registered), key=str)
    if added:
        only_python = {} if allow_cpp else {"allow_cpp": False}
        with _quiet_overrides():
            for target in added:
                _registered[target] = _Registration(want[target], key, **only_python)


def _set_base(config: _Config | None) -> None:
    """Replace the state outside ``use_gems`` blocks; on failure the previous one stays."""
    global _base
    previous, _base = _base, config
    try:
        _apply()
    except BaseException:
        _base = previous
        _apply()
        raise


def _config(ops: frozenset, record: bool, path, once: bool, fallbacks: bool = False) -> _Config:
    recorder = None
    if record:
        recorder = _Recorder(path, once, fallbacks)
        if recorder.same_as(_recorder):  # the same file and mode: keep logging into it
            recorder = _recorder
    return _Config(ops, recorder)


def _unused_arg(unused, exclude):
    if unused is not None and exclude is not None:
        raise TypeError("pass unused= or its alias exclude=, not both")
    return unused if unused is not None else exclude


def _default_ops(unused, preset: str | None = None) -> frozenset:
    """The preset's entries (None: every entry on in eager mode) minus ``unused``."""
    base = preset_targets(preset)  # ValueError for an unknown preset, before any name is resolved
    return base - _resolve(unused, "unused")


def enable(unused=None, record: bool = False, path: str | None = None, once: bool = False, *, exclude=None,
           preset: str | None = None, fallbacks: bool = False) -> None:
    """Run aten ops through flag_gems kernels from now on: every registered entry, as FlagGems does.

    Each entry's ``supports`` sends the inputs its kernel does not take to the native kernel, so
    every op a flag_gems kernel implements is replaced (an entry with a recorded correctness
    finding excepted: ``flag_gems.lowerings.exclusions``). A second call replaces the first;
    ``disable()`` undoes it. ``flag_gems.all_registered_ops()`` lists what is live.

    Args:
        unused: op names to leave to PyTorch (``["sum", "add"]``; see the module docstring).
        record: log each call that ran a flag_gems kernel to ``path``, once the kernel
            returned: ``[DEBUG] flag_gems.ops.add: GEMS ADD_TENSOR`` (upstream's format).
        path: the record file (default ``~/.flaggems/oplist.log``; its directory is created).
        once: with ``record``, log each op (and each fallback reason) only once.
        exclude: alias of ``unused``.
        fallbacks: with ``record``, also log each call that ran the native kernel:
            ``NATIVE <NAME>: <reason>`` (WARNING after a kernel error), so the file shows
            what did not go through flag_gems and why.
        preset: None (every entry) or ``"fast"``: only the entries measured faster than the
            native kernel at every benchmark shape (``flag_gems.lowerings.registry.describe()``
            shows the figures).

    Raises:
        TypeError: both ``unused`` and ``exclude``, or names of the wrong type.
        ValueError: a name that is no aten op (the message lists close matches), an unknown preset.
    """
    with _LOCK:
        _set_base(_config(_default_ops(_unused_arg(unused, exclude), preset), record, path, once, fallbacks))
        logger.info("flag_gems eager mode: %d aten ops on the %s key", len(_registered), runtime.dispatch_key)


def only_enable(include, record: bool = False, path: str | None = None, once: bool = False, *,
                fallbacks: bool = False) -> None:
    """Like :func:`enable`, for the listed ops only (any registered entry, excluded ones too).

    Args:
        include: op names to run through flag_gems kernels (``["add", "fill_.Scalar"]``).
        record, path, once, fallbacks: as for :func:`enable`.

    Raises:
        TypeError, ValueError: as for :func:`enable`.
    """
    with _LOCK:
        _set_base(_config(_resolve(include, "include"), record, path, once, fallbacks))
        logger.info("flag_gems eager mode: %d aten ops on the %s key", len(_registered), runtime.dispatch_key)


def disable() -> None:
    """Back to PyTorch's kernels for every op, also inside open ``use_gems`` blocks; stops recording."""
    global _base
    with _LOCK:
        _base = None
        _frames.clear()
        _apply()


def all_registered_ops() -> list[str]:
    """The aten overloads flag_gems kernels serve now (registered on the dispatcher), e.g.
    ``["add.Tensor", "mm"]``.

    Returns:
        Sorted display names (a default overload by its op name), each one ``unused=`` accepts.
    """
    with _LOCK:
        return sorted(_op_names(t).display for t in _registered)


class use_gems:  # noqa: N801  (upstream's name: a context manager used like a function)
    """Context manager: flag_gems kernels inside the block, the previous state restored after it.

    ``with flag_gems.use_gems(): loss = model(x).sum(); loss.backward()``. Blocks nest, may
    sit inside ``enable()``, and restore the state on exceptions too.

    Args:
        unused: op names to leave to PyTorch (see the module docstring).
        include: op names to use instead of every entry (minus ``unused``).
        record, once, path, fallbacks: as for :func:`enable`, for the block.
        exclude: alias of ``unused``.
        preset: as for :func:`enable` (not with ``include``).

    Raises:
        TypeError: as for :func:`enable`, and ``include`` together with ``preset``.
        ValueError: as for :func:`enable`, when the block is entered.
    """

    def __init__(self, unused=None, include=None, record: bool = False, once: bool = False, path=None, *, exclude=None,
                 preset: str | None = None, fallbacks: bool = False):
        if include is not None and preset is not None:
            raise TypeError("use_gems: pass include= or preset=, not both")
        self._unused = _unused_arg(unused, exclude)
        self._include = include
        self._preset = preset
        self._record, self._once, self._path, self._fallbacks = record, once, path, fallbacks
        self._tokens: list = []

    def __enter__(self):
        with _LOCK:
            if self._include is not None:
                ops = _resolve(self._include, "include") - _resolve(self._unused, "unused")
            else:
                ops = _default_ops(self._unused, self._preset)
            token = object()
            _frames.append((token, _config(ops, self._record, self._path, self._once, self._fallbacks)))
            try:
                _apply()
            except BaseException:
                _frames.pop()
                _apply()
                raise
            self._tokens.append(token)
        return self

    def __exit__(self, exc_type, exc, tb):
        with _LOCK:
            token = self._tokens.pop()
            for i, (t, _) in enumerate(_frames):
                if t is token:
                    del _frames[i]
                    break
            _apply()
        return False
