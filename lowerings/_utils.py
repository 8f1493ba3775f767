"""Helpers shared by the op modules of this package."""

from __future__ import annotations

import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)

_functorch_active = getattr(torch._C._functorch, "peek_interpreter_stack", lambda: None)


def eager_fast_path(*tensors) -> bool:
    """True when a public function may launch its kernel directly, skipping the dispatcher.

    The direct launch saves the custom-op dispatch cost (host time per call matters for
    decode). It is taken only when nothing could observe the difference: no autograd
    (grad mode off, or no input requiring grad), no tracing (Dynamo, FX proxy or fake
    tensors, functionalization, functorch transforms) and plain tensors only.

    Args:
        tensors: the call's tensor arguments (None entries are ignored).

    Returns:
        Whether the launcher may be called directly.
    """
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    if _functorch_active() is not None:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN:
            return False
        if grad and t.requires_grad:
            return False
    return True
