"""Helpers shared by the op modules of this package."""

from __future__ import annotations

import torch

from ..kernels._common import FLOAT_DTYPES, interpreter_mode

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


def row_tensor_reason(t, name: str, dtypes=FLOAT_DTYPES, optional: bool = False, strided: bool = False) -> str | None:
    """Why the row kernels cannot read ``t`` (None when they can), from metadata only.

    Shared by the registry entries' ``supports()``: safe on FakeTensors, adds no guards.

    Args:
        t: the argument.
        name: its name in the reason.
        dtypes: accepted dtypes.
        optional: None is acceptable.
        strided: the kernel reads ``t`` through its strides: any layout, but symbolic
            strides are refused too.

    Returns:
        None, or a reason naming the argument: not a tensor, dtype, device, symbolic sizes
        (or strides), non-contiguous.
    """
    if t is None and optional:
        return None
    if not isinstance(t, torch.Tensor):
        return f"{name} is a {type(t).__name__}, not a tensor"
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        return f"{name} dtype {t.dtype} (the kernels take {names})"
    dev = t.device.type
    if not (dev == "cuda" or (dev == "cpu" and interpreter_mode())):
        return f"device {t.device} is not supported (CUDA, or CPU through Triton's interpreter)"
    if strided:
        if any(isinstance(s, torch.SymInt) for s in (*t.shape, *t.stride())):
            return f"{name} has symbolic sizes or strides (left to aten/Inductor)"
        return None
    if any(isinstance(s, torch.SymInt) for s in t.shape):
        return f"{name} has symbolic sizes (left to aten/Inductor)"
    if not t.is_contiguous():
        return f"a non-contiguous {name} (the kernels read contiguous rows)"
    return None


def normalized_shape_reason(input, normalized_shape) -> str | None:
    """Why ``normalized_shape`` is not a trailing part of ``input`` with ``N > 0`` elements
    (the norm entries' shared check: a non-empty list of ints matching input's last dims)."""
    if not isinstance(normalized_shape, (list, tuple)):
        return f"normalized_shape {normalized_shape!r} is not a list of ints"
    ns = list(normalized_shape)
    if not ns or not all(isinstance(s, int) and not isinstance(s, bool) for s in ns):
        return f"normalized_shape {normalized_shape!r} is not a non-empty list of ints"
    k = len(ns)
    if input.dim() < k or list(input.shape[input.dim() - k:]) != ns:
        return f"normalized_shape {ns} does not match the trailing dims of input {list(input.shape)}"
    n = 1
    for s in ns:
        n *= s
    if n == 0:
        return "an empty normalized shape (N = 0)"
    return None
