"""``apply_gems_patches_to_vllm``: route vLLM's own kernels to flag_gems, found by feature detection.

vLLM changes how a layer reaches its kernel from release to release; patches that name
private functions break each time (upstream FlagGems' #1155 on vLLM 0.11.2). Here each
op has a list of **routes**, tried in order, each checking that what it needs exists
(never a version string):

==========  =============================================================  ===========================
route       what it changes                                                 effect
==========  =============================================================  ===========================
``ir``      registers a ``flag_gems`` provider on ``vllm.ir.ops.<op>`` and  every RMSNorm, eager and
            keeps it first in the op's priority (``set_default`` /         compiled (vLLM lowers IR
            ``set_priority`` of that op prepend it: vLLM's worker init      ops by that priority)
            sets the priority from ``IrOpPriorityConfig`` later)
``c_ops``   ``torch.library`` implementation of ``torch.ops._C.<op>`` on    every caller of the op, also
            the CUDA key (vLLM's own kernel is restored on removal)        layers built before
``custom``  the ``forward_cuda`` of the CustomOp class                      layers built from now on
                                                                            (vLLM binds the forward
                                                                            when it builds a layer)
==========  =============================================================  ===========================

========================  =======================  ==============================================
op                        routes (in this order)   vLLM 0.33: GPU build / CPU build (no ``_C``)
========================  =======================  ==============================================
``rms_norm``              ir, c_ops, custom        ir / ir (plain and residual-add RMSNorm)
``silu_and_mul``          c_ops, custom            c_ops / custom
``gelu_and_mul``          c_ops, custom            c_ops / custom (erf and tanh)
``rotary_embedding``      c_ops, custom            c_ops / custom (neox, GPT-J, partial rotary)
``deepseek_scaling_rope`` custom                   custom / custom (YaRN; its forward never
                                                   calls ``_C``)
========================  =======================  ==============================================

An op is patched all or nothing: a route applies all its changes or, if one fails, undoes
the ones it made and the next route is tried. An op no route can patch is left to vLLM with
one warning naming what was missing. Applying twice changes nothing
(:func:`remove_gems_patches_from_vllm` restores vLLM's state).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import threading
import warnings
from typing import Callable

import torch

from . import impls

logger = logging.getLogger(__name__)

PROVIDER = "flag_gems"  # the IR provider name


@dataclasses.dataclass
class Change:
    """One reversible change: ``apply()`` makes it and returns the function that undoes it."""

    target: str  # what is replaced, as the log names it ("RMSNorm.forward_cuda")
    replacement: str  # what replaces it ("flag_gems.vllm.impls.gems_rms_norm_forward_cuda")
    apply: Callable[[], Callable[[], None]]
    note: str = ""


@dataclasses.dataclass
class Route:
    """One way of routing an op: ``plan()`` returns the changes, or why this route is not available."""

    name: str
    plan: Callable[[], "list[Change] | str"]


# ------------------------------------------------------------------ route: vLLM IR providers


def _ir_ops():
    try:
        return importlib.import_module("vllm.ir").ops
    except (ImportError, AttributeError) as e:
        return f"no vllm.ir.ops ({type(e).__name__})"


def _keep_first(priority) -> list:
    prio = [p for p in (priority or []) if p != PROVIDER]
    return [PROVIDER, *(prio or ["native"])]


def _provider_change(op, name: str) -> Change:
    fn, supports, inplace = impls.IR_PROVIDERS[name]

    def apply():
        cls = type(op)
        saved = getattr(op, "_priority_impls", None)
        saved = list(saved) if saved is not None else None
        before = op.get_priority()
        if PROVIDER not in op.impls:
            op.register_impl(PROVIDER, supported=impls.platform_supported(), supports_args=supports, inplace=inplace)(fn)
        # vLLM sets each op's priority at worker init from IrOpPriorityConfig, and scopes it in
        # compilation: the op's own setters keep our provider first (instance attributes; the
        # class's methods do the work).
        op.set_default = lambda priority: cls.set_default(op, _keep_first(priority))
        op.set_priority = lambda priority: cls.set_priority(op, _keep_first(priority))
        op.set_default(before)

        def undo():
            for attr in ("set_default", "set_priority"):
                op.__dict__.pop(attr, None)
            op.impls.pop(PROVIDER, None)
            if saved is not None:
                op._priority_impls = saved
            else:
                cls.set_default(op, before or ["native"])

        return undo

    return Change(f"vllm.ir.ops.{name}", f"provider {PROVIDER!r} ({fn.__module__}.{fn.__name__}), first in priority",
                  apply)


def _plan_ir(names):
    def plan():
        ops = _ir_ops()
        if isinstance(ops, str):
            return ops
        changes = []
        for name in names:
            op = getattr(ops, name, None)
            if op is None:
                return f"no vllm.ir.ops.{name}"
            missing = [a for a in ("register_impl", "set_default", "set_priority", "get_priority", "impls")
                       if not hasattr(op, a)]
            if missing:
                return f"vllm.ir.ops.{name} has no {', '.join(missing)}"
            changes.append(_provider_change(op, name))
        return changes

    return plan


# ------------------------------------------------------------------ route: _C kernels


def _schema_args(op) -> list:
    return [(a.name, str(a.type).replace("Optional[Tensor]", "Tensor?")) for a in op._schema.arguments]


def _schema_reason(namespace: str, name: str) -> str | None:
    """Why ``torch.ops.<namespace>.<name>`` is not the op our kernel implements (None: it is)."""
    try:
        op = getattr(getattr(torch.ops, namespace), name).default
    except (AttributeError, RuntimeError):
        return f"no torch.ops.{namespace}.{name}"
    want = impls.C_KERNELS[name][1]
    got = _schema_args(op)
    extra = op._schema.arguments[len(want):]
    if got[: len(want)] != list(want) or any(not a.has_default_value() for a in extra):
        return f"torch.ops.{namespace}.{name} has schema {op._schema}, not the expected one"
    return None


def _c_change(namespace: str, names, dispatch_key: str) -> list:
    changes = []
    for name in names:
        fn = impls.C_KERNELS[name][0]

        def apply(name=name, fn=fn):
            lib = torch.library.Library(namespace, "IMPL")
            with warnings.catch_warnings():  # "Overriding a previously registered kernel": that is the point
                warnings.simplefilter("ignore", UserWarning)
                lib.impl(name, fn, dispatch_key)
            return lib._destroy  # restores vLLM's kernel

        changes.append(Change(f"torch.ops.{namespace}.{name} ({dispatch_key} kernel)", f"{fn.__module__}.{fn.__name__}",
                              apply))
    return changes


def _plan_c(names, namespace: str = "_C", dispatch_key: str = "CUDA"):
    def plan():
        if dispatch_key == "CUDA" and not torch.cuda.is_available():
            return "no CUDA device"
        for name in names:
            reason = _schema_reason(namespace, name)
            if reason:
                return reason
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{namespace}::{name}", dispatch_key):
                return f"torch.ops.{namespace}.{name} has no {dispatch_key} kernel"
        return _c_change(namespace, names, dispatch_key)

    return plan


# ------------------------------------------------------------------ route: CustomOp forwards


def _find_class(module: str, cls: str):
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        return f"no {module}.{cls} ({type(e).__name__}: {e})"


def _plan_custom(module: str, cls_name: str, factory, method: str = "forward_cuda"):
    def plan():
        cls = _find_class(module, cls_name)
        if isinstance(cls, str):
            return cls
        if method not in vars(cls):
            return f"{cls_name} defines no {method}"
        original = vars(cls)[method]
        replacement = factory(original)

        def apply():
            setattr(cls, method, replacement)
            return lambda: setattr(cls, method, original)

        return [Change(f"{cls_name}.{method}", f"{factory.__module__}.{replacement.__qualname__}", apply,
                       note="layers built from now on")]

    return plan


_LAYERNORM = "vllm.model_executor.layers.layernorm"
_ACTIVATION = "vllm.model_executor.layers.activation"
_ROPE = "vllm.model_executor.layers.rotary_embedding"


def routes(c_namespace: str = "_C", c_dispatch_key: str = "CUDA") -> dict:
    """The routes of each op, in the order they are tried.

    Args:
        c_namespace, c_dispatch_key: where the ``c_ops`` routes look for vLLM's compiled ops
            (``_C`` on ``CUDA``; tests point them at a stand-in library on the CPU).

    Returns:
        op name -> list of :class:`Route`.
    """
    c = lambda *names: Route("c_ops", _plan_c(names, c_namespace, c_dispatch_key))  # noqa: E731
    return {
        "rms_norm": [
            Route("ir", _plan_ir(("rms_norm", "fused_add_rms_norm"))),
            c("rms_norm", "fused_add_rms_norm"),
            Route("custom", _plan_custom(_LAYERNORM, "RMSNorm", impls.make_rms_norm_forward)),
        ],
        "silu_and_mul": [
            c("silu_and_mul"),
            Route("custom", _plan_custom(_ACTIVATION, "SiluAndMul", impls.make_silu_and_mul_forward)),
        ],
        "gelu_and_mul": [
            c("gelu_and_mul", "gelu_tanh_and_mul"),
            Route("custom", _plan_custom(_ACTIVATION, "GeluAndMul", impls.make_gelu_and_mul_forward)),
        ],
        "rotary_embedding": [
            c("rotary_embedding"),
            Route("custom", _plan_custom(_ROPE, "RotaryEmbedding", impls.make_rotary_embedding_forward)),
        ],
        "deepseek_scaling_rope": [
            Route("custom", _plan_custom(_ROPE, "DeepseekScalingRotaryEmbedding",
                                         impls.make_deepseek_scaling_rope_forward)),
        ],
    }


# ------------------------------------------------------------------ applying


@dataclasses.dataclass
class Applied:
    """An op patched through one route: its changes and how to undo them."""

    route: str
    changes: list
    undo: list


_lock = threading.RLock()
_applied: dict = {}  # op -> Applied
_warned: set = set()


def _verbose_handler() -> None:
    """``verbose=True`` asks for visible output: without any logging configured, give this
    package's logger a stderr handler (once) so the INFO lines show."""
    pkg = logging.getLogger("flag_gems")
    if logging.getLogger().handlers or any(not isinstance(h, logging.NullHandler) for h in pkg.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    pkg.addHandler(handler)
    if pkg.level == logging.NOTSET or pkg.level > logging.INFO:
        pkg.setLevel(logging.INFO)


def _apply_route(route: Route, plan: list) -> Applied:
    undo = []
    try:
        for change in plan:
            undo.append(change.apply())
    except Exception:
        for u in reversed(undo):
            u()
        raise
    return Applied(route.name, plan, undo)


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            "flag_gems.apply_gems_patches_to_vllm: vLLM is not installed in this environment "
            f"(import vllm failed: {e}); install vllm, or leave this call out"
        ) from e
    if getattr(vllm, "__file__", None) is None:  # a folder named vllm on sys.path, not the package
        raise ImportError(
            "flag_gems.apply_gems_patches_to_vllm: vLLM is not installed in this environment "
            f"('import vllm' found the directory {list(getattr(vllm, '__path__', []))}, not the package)"
        )
    return getattr(vllm, "__version__", "?")


def apply_gems_patches_to_vllm(verbose: bool = False, *, ops=None, _routes=None) -> dict:
    """Route vLLM's RMSNorm, SiLU·mul, GELU·mul and rotary embedding kernels to flag_gems.

    Call it before building the engine (``LLM(...)``), in every process that runs the model:
    the ``vllm.general_plugins`` entry point (``GEMS_VLLM=patches``) does that in each vLLM
    worker. The module docstring lists the routes tried per op.

    Args:
        verbose: log each replaced function with its replacement at INFO
            (``Patched RMSNorm.forward_cuda with FLAGGEMS ...``); with no logging configured a
            stderr handler is added so they show.
        ops: the ops to patch (default: all of ``rms_norm``, ``silu_and_mul``,
            ``gelu_and_mul``, ``rotary_embedding``, ``deepseek_scaling_rope``).

    Returns:
        op name -> the route that patched it (``"ir"``, ``"c_ops"``, ``"custom"``), or None for
        an op left to vLLM; ops patched by an earlier call keep their route.

    Raises:
        ImportError: vLLM is not installed.
        ValueError: an unknown op name in ``ops``.
    """
    version = _import_vllm()
    table = _routes if _routes is not None else routes()
    names = list(table) if ops is None else list(ops)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"apply_gems_patches_to_vllm: unknown ops {unknown}; valid: {', '.join(table)}")
    if verbose:
        _verbose_handler()
    level = logging.INFO if verbose else logging.DEBUG
    result = {}
    with _lock:
        for name in names:
            if name in _applied:
                result[name] = _applied[name].route
                logger.log(level, "flag_gems: vLLM %s already routed to flag_gems (%s)", name, _applied[name].route)
                continue
            tried = []
            for route in table[name]:
                plan = route.plan()
                if isinstance(plan, str):
                    tried.append(f"{route.name}: {plan}")
                    continue
                try:
                    _applied[name] = _apply_route(route, plan)
                except Exception as e:  # the route's changes were undone
                    tried.append(f"{route.name}: failed ({type(e).__name__}: {e})")
                    continue
                for ch in plan:
                    logger.log(level, "Patched %s with FLAGGEMS %s%s", ch.target, ch.replacement,
                               f" ({ch.note})" if ch.note else "")
                break
            result[name] = _applied[name].route if name in _applied else None
            if name not in _applied:
                key = (name, tuple(tried))
                msg = (f"flag_gems: vLLM {version}: {name} is left to vLLM, no known way to route it "
                       f"({'; '.join(tried)})")
                if key not in _warned:
                    _warned.add(key)
                    warnings.warn(msg, RuntimeWarning, stacklevel=2)
                logger.warning("%s", msg)
    return result


def remove_gems_patches_from_vllm(ops=None) -> list:
    """Undo :func:`apply_gems_patches_to_vllm` (all ops, or those named), restoring vLLM's kernels.

    Layers built while a ``custom`` route was active keep the forward they were built with.

    Args:
        ops: op names (default: every patched op).

    Returns:
        The ops whose patches were removed.
    """
    removed = []
    with _lock:
        for name in list(_applied) if ops is None else [n for n in ops if n in _applied]:
            applied = _applied.pop(name)
            for u in reversed(applied.undo):
                u()
            removed.append(name)
    return removed


def patched() -> dict:
    """op name -> ``(route, [targets])`` of the patches in effect."""
    with _lock:
        return {name: (a.route, [c.target for c in a.changes]) for name, a in _applied.items()}
