"""Registry entries for ``mm``, ``bmm`` and ``addmm``, served by ``kernels/matmul.py``.

Overloads (each ``impl`` takes exactly the overload's arguments)::

    mm.default  bmm.default  addmm.default

Scope: fp16/bf16/fp32 operands of one dtype, any strides, on CUDA (or the CPU under
Triton's interpreter); ``addmm``'s ``self`` broadcastable to ``[M, N]`` with at most 2 dims;
real scalars ``beta``/``alpha``. Everything else (integer or complex dtypes, mixed dtypes,
shapes that do not multiply, symbolic sizes, batches above 65535) is a ``supports`` reason,
so the eager mode runs cuBLAS and torch raises its own errors.

Per shape: the kernel's config comes from the autotuner (``kernels/_autotune.py``, family
``matmul``), which also times cuBLAS for the key; where cuBLAS was faster (the config's
``NATIVE`` field, measured per device kind) ``impl`` refuses with NotImplementedError, so the
eager mode runs cuBLAS. So an enabled GEMM entry only runs the Triton kernel where it measured
faster on this GPU (or where no measurement exists: the heuristic tiles).

Policies (``flag_gems.lowerings.registry``): on in the eager mode, as every entry (the H100 rows of the
untuned fixed-tile kernel in ``lowerings/measurements.py`` put it below cuBLAS, so it is
not in ``preset="fast"``). Not rewritten in compiled graphs (no graph-mode data; cuBLAS or
Inductor's templates do that work there).

Public functions with upstream's signatures: :func:`mm`, :func:`bmm`, :func:`addmm`.
"""

from __future__ import annotations

import logging

import torch

from ..kernels import matmul as km
from ._utils import row_tensor_reason
from .registry import register

logger = logging.getLogger(__name__)

__all__ = ["TARGETS", "addmm", "bmm", "mm"]

aten = torch.ops.aten

_NATIVE_REASON = "cuBLAS measured faster for this shape on this GPU (autotuner; GEMS_AUTOTUNE)"


def _operand_reason(t, name: str) -> str | None:
    return row_tensor_reason(t, name, strided=True)  # the kernel takes any strides


def _like_reason(t, ref, name: str, ref_name: str) -> str | None:
    """Why ``t`` cannot be multiplied with ``ref``: another dtype (torch raises) or device."""
    if t.dtype != ref.dtype:
        return f"mixed dtypes: {name} {t.dtype}, {ref_name} {ref.dtype} (torch raises)"
    if t.device != ref.device:
        return f"{name} on {t.device}, {ref_name} on {ref.device}"
    return None


def _pair_reason(a, b, rank: int, names=("self", "mat2")) -> str | None:
    why = _operand_reason(a, names[0]) or _operand_reason(b, names[1]) or _like_reason(b, a, names[1], names[0])
    if why is not None:
        return why
    if a.dim() != rank or b.dim() != rank:
        return f"expected two {rank}-D tensors, got {a.dim()}-D and {b.dim()}-D (torch raises)"
    if a.shape[-1] != b.shape[-2]:
        return f"shapes {list(a.shape)} and {list(b.shape)} do not multiply (torch raises)"
    if rank == 3:
        if a.shape[0] != b.shape[0]:
            return f"batch sizes {a.shape[0]} and {b.shape[0]} differ (torch raises)"
        if a.shape[0] > km.MAX_BATCH:
            return f"batch {a.shape[0]} above {km.MAX_BATCH}"
    return None


def _scalar_reason(name: str, v) -> str | None:
    if isinstance(v, torch.SymFloat | torch.SymInt):
        return f"symbolic {name}"
    if isinstance(v, bool) or not isinstance(v, int | float):
        return f"{name} of type {type(v).__name__}"
    return None


def _refuse(reason: str | None) -> None:
    if reason is not None:
        raise NotImplementedError(f"flag_gems matmul: {reason}")


def _supports_mm(self, mat2):
    return _pair_reason(self, mat2, 2)


def _supports_bmm(self, mat2):
    return _pair_reason(self, mat2, 3)


def _supports_addmm(self, mat1, mat2, *, beta=1, alpha=1):
    why = (_pair_reason(mat1, mat2, 2, ("mat1", "mat2")) or _operand_reason(self, "self")
           or _like_reason(self, mat1, "self", "mat1"))
    if why is not None:
        return why
    if self.dim() > 2:
        return f"self has {self.dim()} dims (torch raises above 2)"
    out = (mat1.shape[0], mat2.shape[1])
    for have, want in zip(reversed(self.shape), reversed(out)):
        if have not in (1, want):
            return f"self shape {list(self.shape)} does not broadcast to {list(out)} (torch raises)"
    return _scalar_reason("beta", beta) or _scalar_reason("alpha", alpha)


def _tuned(a, b, bias):
    """The tuned config; NotImplementedError (eager mode: cuBLAS runs) where cuBLAS measured faster."""
    cfg = km.matmul_config(a, b, bias)
    if cfg[-1]:
        raise NotImplementedError(f"flag_gems matmul: {_NATIVE_REASON}")
    return cfg


@register(aten.mm.default, checks_in_impl=True, kernel="flag_gems.matmul", supports=_supports_mm)
def mm_impl(self, mat2):
    """``aten::mm``: ``self [M, K] @ mat2 [K, N]``."""
    _refuse(_supports_mm(self, mat2))
    return km.matmul(self, mat2, config=_tuned(self, mat2, None))


@register(aten.bmm.default, checks_in_impl=True, kernel="flag_gems.matmul", supports=_supports_bmm)
def bmm_impl(self, mat2):
    """``aten::bmm``: ``self [B, M, K] @ mat2 [B, K, N]``."""
    _refuse(_supports_bmm(self, mat2))
    return km.matmul(self, mat2, config=_tuned(self, mat2, None))


@register(aten.addmm.default, checks_in_impl=True, kernel="flag_gems.matmul", supports=_supports_addmm)
def addmm_impl(self, mat1, mat2, *, beta=1, alpha=1):
    """``aten::addmm``: ``beta * self + alpha * (mat1 @ mat2)``; ``self`` is ignored when ``beta == 0``."""
    _refuse(_supports_addmm(self, mat1, mat2, beta=beta, alpha=alpha))
    bias = self if beta != 0 else None
    return km.matmul(mat1, mat2, self, beta=beta, alpha=alpha, config=_tuned(mat1, mat2, bias))


# --------------------------------------------------------------------------- public functions (upstream names)


def mm(a: torch.Tensor, b: torch.Tensor, *, allow_native: bool = True) -> torch.Tensor:
    """``a @ b`` for ``a [M, K]``, ``b [K, N]`` (upstream ``flag_gems.mm``), tuned per shape.

    Args:
        a, b: fp16/bf16/fp32 of one dtype, any strides, on one CUDA device (or the CPU under
            Triton's interpreter).
        allow_native: run ``torch.mm`` for shapes where the autotuner measured it faster on this
            GPU; False always runs the Triton kernel.

    Returns:
        ``[M, N]``, a's dtype.

    Raises:
        TypeError / ValueError / NotImplementedError: dtypes, shapes or devices the kernel does not
        take (``kernels.matmul.check_matmul_args``).
    """
    return _public(a, b, None, 1, 1, allow_native, 2)


def bmm(a: torch.Tensor, b: torch.Tensor, *, allow_native: bool = True) -> torch.Tensor:
    """``a @ b`` for ``a [B, M, K]``, ``b [B, K, N]`` (upstream ``flag_gems.bmm``), tuned per shape.

    Args:
        a, b, allow_native: as :func:`mm` (``torch.bmm`` is the native kernel).

    Returns:
        ``[B, M, N]``, a's dtype.

    Raises:
        TypeError / ValueError / NotImplementedError: as :func:`mm`.
    """
    return _public(a, b, None, 1, 1, allow_native, 3)


def addmm(bias: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, *, beta=1, alpha=1,
          allow_native: bool = True) -> torch.Tensor:
    """``beta * bias + alpha * (mat1 @ mat2)`` (upstream ``flag_gems.addmm``), tuned per shape.

    Args:
        bias: broadcastable to ``[M, N]`` (at most 2 dims), mat1's dtype; ignored when ``beta == 0``.
        mat1, mat2: ``[M, K]``, ``[K, N]``, as :func:`mm`.
        beta, alpha: real scalars.
        allow_native: as :func:`mm` (``torch.addmm`` is the native kernel).

    Returns:
        ``[M, N]``, mat1's dtype.

    Raises:
        TypeError / ValueError / NotImplementedError: as :func:`mm`, and a bias that does not broadcast.
    """
    return _public(mat1, mat2, bias, beta, alpha, allow_native, 2)


def _public(a, b, bias, beta, alpha, allow_native, rank):
    km.check_matmul_args(a, b, bias)
    if a.dim() != rank:
        raise ValueError(f"a: expected a {rank}-D tensor, got {a.dim()}-D (use {'bmm' if rank == 2 else 'mm'})")
    use_bias = bias if beta != 0 else None
    cfg = km.matmul_config(a, b, use_bias)
    if cfg[-1] and allow_native:
        if rank == 3:
            return torch.bmm(a, b)
        return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b, beta=beta, alpha=alpha)
    return km.matmul(a, b, bias, beta=beta, alpha=alpha, config=cfg)


TARGETS = (aten.mm.default, aten.bmm.default, aten.addmm.default)
