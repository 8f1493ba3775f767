"""The fused ops as ``torch.library.triton_op`` twins, whose kernels Inductor launches itself.

The published ``torch.ops.flag_gems.*`` ops are ``custom_op``s: inside an Inductor graph each
one is an opaque call (a ``FallbackKernel``) through the dispatcher into our Python launcher.
Each functional op listed in ``_TWIN_NAMES`` gets a twin (:func:`twins`) in the graph-only namespace
``flag_gems_inductor`` (registered at the first look-up of a twin, by :func:`twin_of` or by name in
``torch.ops.flag_gems_inductor``), with the same schema and the same launcher (the published op's own
implementation), run under :func:`~flag_gems.kernels._launch.traced_launches`: its kernel
launches go through ``torch.library.wrap_triton``. Under functionalization (AOT autograd, or
``flag_gems.inductor``'s post-grad rewrite) a twin therefore decomposes into the launcher's
allocations and ``triton_kernel_wrapper_functional`` nodes, which Inductor compiles and
launches from its generated wrapper like its own kernels (CUDA-graph trees included)::

    rms_norm = torch.ops.flag_gems.rms_norm.default(x, w, 1e-6)           # opaque call
        ->  empty = aten.empty_like(x); view = aten.view(empty, [1, n, 4096])
            out = triton_kernel_wrapper_functional(kernel_idx=.., grid=[(n, 1, 1)],
                                                   kwargs={"x_ptr": .., "y_ptr": view, ..})

The published ops, their schemas and definitions are untouched (other implementations, e.g.
C++ ones on the CUDA key, register on them). A twin called eagerly runs the launcher as the
published op does.

Compiled Triton only: the interpreter's kernels (``TRITON_INTERPRET=1``, the CPU) cannot be
traced, so :func:`kernels_traceable` is False there and the rewrite leaves the published ops.
"""

from __future__ import annotations

import functools
import logging
import threading

import torch
from torch import Tensor  # noqa: F401  (the twins' schemas are inferred from string annotations in this module)

from ..kernels._common import interpreter_mode
from ..kernels._launch import traced_launches

logger = logging.getLogger(__name__)

__all__ = ["NAMESPACE", "has_twin", "kernels_traceable", "twin_of", "twins"]

NAMESPACE = "flag_gems_inductor"

# The functional published ops the passes emit, and their backward ops (in training graphs).
_TWIN_NAMES = (
    "rms_norm",
    "add_rms_norm",
    "rms_norm_backward",
    "silu_and_mul",
    "gelu_and_mul",
    "silu_and_mul_backward",
    "gelu_and_mul_backward",
    "silu_and_mul_fused",
    "gelu_and_mul_fused",
    "silu_and_mul_fused_backward",
    "gelu_and_mul_fused_backward",
    "rotary_embedding",
    "rotary_embedding_backward",
    "rotary_embedding_hf",
    "rotary_embedding_hf_backward",
    "rotary_embedding_cache",
    "rotary_embedding_cache_q",
    "rotary_embedding_cache_backward",
)


def kernels_traceable() -> bool:
    """Whether our kernels can be recorded into graphs (compiled Triton, not the interpreter)."""
    return not interpreter_mode()


def _implementation(name: str):
    """The Python implementation of the published op ``flag_gems::name`` (the launcher call)."""
    from torch._library.custom_ops import OPDEFS

    opdef = OPDEFS.get(f"flag_gems::{name}")
    return getattr(opdef, "_init_fn", None)


def _wrap_triton_enabled() -> bool:
    """False inside ``triton_op``'s eager call (real tensors: launch directly). A torch without
    the switch always traces, which still launches correctly on real tensors, through the
    kernel-wrapper op."""
    import torch._library.triton as library_triton

    return getattr(library_triton, "is_wrap_triton_enabled", lambda: True)()


def _make_twin(name: str):
    impl = _implementation(name)
    if impl is None:
        logger.warning("flag_gems: no Python implementation found for flag_gems::%s; no Inductor twin", name)
        return None

    @functools.wraps(impl)
    def launch_traced(*args, **kwargs):
        if not _wrap_triton_enabled():  # an eager call of the twin: launch as the published op does
            return impl(*args, **kwargs)
        with traced_launches():
            return impl(*args, **kwargs)

    return torch.library.triton_op(f"{NAMESPACE}::{name}", launch_traced, mutates_args=())


_lock = threading.RLock()
_by_name: dict | None = None  # published op name ("rms_norm") -> its twin overload, once registered
_registering = False


def _registered() -> dict:
    """Register the twins once per process; ``{name: twin overload}`` (empty while registering:
    the namespace hook below asks again from inside the registration)."""
    global _by_name, _registering
    if _by_name is not None:
        return _by_name
    with _lock:
        if _by_name is None and not _registering:
            _registering = True
            try:
                made = {}
                for name in _TWIN_NAMES:
                    if _make_twin(name) is not None:
                        made[name] = getattr(getattr(torch.ops, NAMESPACE), name).default
                _by_name = made
            finally:
                _registering = False
    return _by_name if _by_name is not None else {}


def twins() -> dict:
    """Published op overload (``torch.ops.flag_gems.X.default``) -> its twin
    (``torch.ops.flag_gems_inductor.X.default``), registering the twins at the first call (about
    a second: ``triton_op`` reads the implementations' source).

    A new dict at each call. To find the twin of an op, use :func:`twin_of`, which looks it up by
    name: an ``OpOverload`` hashes by its ``_op`` attribute, so a dict keyed by overloads misses
    whenever ``_op`` is not what it was at insertion (a test that wraps ``op._op`` to record calls).
    """
    published = torch.ops.flag_gems
    return {getattr(published, name).default: twin for name, twin in _registered().items()}


def has_twin(target) -> bool:
    """Whether ``target`` is a published op that has a twin (without registering the twins)."""
    return (
        isinstance(target, torch._ops.OpOverload)
        and target.namespace == "flag_gems"
        and target._overloadname == "default"
        and target._opname in _TWIN_NAMES
    )


def twin_of(target):
    """The twin of a published op overload (registering the twins if needed), or None.

    Looked up by the op's name, not by the overload object (see :func:`twins`)."""
    return _registered().get(target._opname) if has_twin(target) else None


# ------------------------------------------------------------------ the namespace, registered on first use


class _TwinNamespace(torch._ops._OpNamespace):
    """``torch.ops.flag_gems_inductor``: the first look-up of a twin's name registers the twins.

    Whoever reads ``torch.ops.flag_gems_inductor.X`` by name (a user, the dispatcher's Python-op
    cache while tracing, a pickled graph being loaded) gets the op whether or not
    :func:`twins` ran before in this process; ``import flag_gems`` itself registers nothing
    (registration costs about a second).
    """

    def __getattr__(self, op_name: str):
        if op_name in _TWIN_NAMES:
            _registered()
        return super().__getattr__(op_name)


def _install_namespace() -> None:
    """Put :class:`_TwinNamespace` at ``torch.ops.flag_gems_inductor`` (once; an existing plain
    namespace object, made by an earlier look-up, becomes one and keeps what it cached)."""
    ops = torch.ops
    current = vars(ops).get(NAMESPACE)
    if isinstance(current, _TwinNamespace):
        return
    try:
        if current is None:
            setattr(ops, NAMESPACE, _TwinNamespace(NAMESPACE))
            ops._dir.append(NAMESPACE)
        else:
            current.__class__ = _TwinNamespace
    except (AttributeError, TypeError) as exc:  # another torch's internals: twins() still registers them
        logger.debug("flag_gems: torch.ops.%s registers on first use only through twins() (%s)", NAMESPACE, exc)


_install_namespace()
