"""The op registry: what each aten overload may become, and when.

One table, two consumers: the compile backend reads it to rewrite aten nodes (with FX
``meta["val"]`` fake tensors as arguments), the eager dispatcher mode reads it to
register implementations (with real tensors). Both call the same ``supports``.

Entries are added only through :func:`register` on an explicit overload
(``aten.add.Tensor``, never the packet ``aten.add``). Ops left to PyTorch on purpose are
declared in :data:`FALLBACKS` with their reason; no op is both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class Lowering:
    """One registry entry.

    Attributes:
        target: the aten overload.
        impl: what replaces it: a function taking exactly the aten overload's arguments
            (called only after ``supports`` returned None), usually a kernel launcher.
        kernel: the name reports show.
        supports: ``(*args, **kwargs) -> None | reason``: None when ``impl`` handles the call.
        default: whether the eager mode uses it by default (False: only when asked for).
        reason: why it is (not) on by default: the measurement behind the choice.
        in_graphs: whether the compile backend rewrites the aten node in compiled graphs by
            default. False for single pointwise ops: in a graph the native kernel moves the
            same bytes and the Triton launch only adds host time (``lower_aten="all"`` forces it).
        checks_in_impl: ``impl`` itself raises NotImplementedError, before any side effect,
            exactly when ``supports`` gives a reason (the generated pointwise entries), so the
            eager mode calls ``impl`` alone and falls back on that error: one check per call.
    """

    target: torch._ops.OpOverload
    impl: Callable
    kernel: str
    supports: Callable[..., str | None]
    default: bool
    reason: str
    in_graphs: bool = False
    checks_in_impl: bool = False


REGISTRY: dict = {}

# Ops deliberately left to PyTorch, with the reason (one place; a test checks no overlap).
FALLBACKS: dict = {
    aten._scaled_dot_product_flash_attention.default: "native flash attention",
    aten._scaled_dot_product_efficient_attention.default: "native memory-efficient attention",
    aten._scaled_dot_product_flash_attention_backward.default: "native flash attention (training: backward)",
    aten._scaled_dot_product_efficient_attention_backward.default: "native memory-efficient attention (backward)",
    aten.native_dropout.default: "random draws: the native RNG stream, so seeded runs reproduce",
}
for _name in ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward"):
    if hasattr(aten, _name):  # cuDNN attention (torch >= 2.5)
        FALLBACKS[getattr(aten, _name).default] = "native cuDNN attention" + (" (backward)" if "backward" in _name else "")


def register(
    target,
    *,
    kernel: str,
    supports: Callable[..., str | None],
    default: bool,
    reason: str,
    in_graphs: bool = False,
    checks_in_impl: bool = False,
):
    """Decorator registering ``impl`` as the lowering of one aten overload.

    Raises:
        TypeError: ``target`` is an op packet (name the overload) or not an aten op.
        ValueError: the overload is already registered or declared a fallback.
    """
    if isinstance(target, torch._ops.OpOverloadPacket):
        overloads = ", ".join(f"{target._qualified_op_name}.{o}" for o in target.overloads())
        raise TypeError(f"register: name an overload, not the packet {target._qualified_op_name} (one of: {overloads})")
    if not isinstance(target, torch._ops.OpOverload):
        raise TypeError(f"register: expected an aten OpOverload, got {target!r}")
    if target in REGISTRY or target in FALLBACKS:
        raise ValueError(f"register: {target} is already {'registered' if target in REGISTRY else 'a declared fallback'}")

    def deco(impl):
        REGISTRY[target] = Lowering(target, impl, kernel, supports, default, reason, in_graphs, checks_in_impl)
        return impl

    return deco


def lookup(target) -> Lowering | None:
    """The entry for an aten overload, or None."""
    return REGISTRY.get(target)


def describe() -> str:
    """The coverage table: every registered op and declared fallback, with its reason."""
    rows = [(str(t), e.kernel, "default" if e.default else "opt-in", e.reason) for t, e in REGISTRY.items()]
    rows += [(str(t), "-", "fallback", r) for t, r in FALLBACKS.items()]
    w = max(len(r[0]) for r in rows)
    k = max(len(r[1]) for r in rows)
    return "\n".join(f"{op:<{w}}  {kern:<{k}}  {mode:<8}  {why}" for op, kern, mode, why in sorted(rows))
