"""The fused ops as ``torch.library.triton_op`` twins, whose kernels Inductor launches itself.

The published ``torch.ops.flag_gems.*`` ops are ``custom_op``s: inside an Inductor graph each
one is an opaque call (a ``FallbackKernel``) through the dispatcher into our Python launcher.
Each functional op listed in ``_TWIN_NAMES`` gets a twin (:func:`twins`) in the graph-only namespace
``flag_gems_inductor``, with the same schema and the same launcher (the published op's own
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


_twins: dict | None = None


def twins() -> dict:
    """Published op overload (``torch.ops.flag_gems.X.default``) -> its twin
    (``torch.ops.flag_gems_inductor.X.default``). The twins are registered at the first call
    (about a second: ``triton_op`` reads the implementations' source)."""
    global _twins
    if _twins is None:
        made = {}
        for name in _TWIN_NAMES:
            if _make_twin(name) is not None:
                made[getattr(torch.ops.flag_gems, name).default] = getattr(getattr(torch.ops, NAMESPACE), name).default
        _twins = made
    return _twins


def has_twin(target) -> bool:
    """Whether ``target`` is a published op that has a twin (without registering the twins)."""
    return (
        isinstance(target, torch._ops.OpOverload)
        and target.namespace == "flag_gems"
        and target._overloadname == "default"
        and target._opname in _TWIN_NAMES
    )


def twin_of(target):
    """The twin of a published op overload (registering the twins if needed), or None."""
    return twins().get(target) if has_twin(target) else None
