"""Registry entries for ``mm``, ``bmm`` and ``addmm``, served by ``kernels/matmul.py``.

Overloads (each ``impl`` takes exactly the overload's arguments)::

    mm.default  bmm.default  addmm.default

Scope: fp16/bf16/fp32 operands of one dtype, any strides, on CUDA (or the CPU under
Triton's interpreter); ``addmm``'s ``self`` broadcastable to ``[M, N]`` with at most 2 dims;
real scalars ``beta``/``alpha``. Everything else (integer or complex dtypes, mixed dtypes,
shapes that do not multiply, symbolic sizes, batches above 65535) is a ``supports`` reason,
so the eager mode runs cuBLAS and torch raises its own errors.

Policies (``flag_gems.lowerings.registry``): on in the eager mode, as every entry (a fixed tile
table, no autotuning: the H100 rows in ``lowerings/measurements.py`` put it below cuBLAS, so it is
not in ``preset="fast"``). Not rewritten in compiled graphs (no graph-mode data; cuBLAS or
Inductor's templates do that work there).
"""

from __future__ import annotations

import logging

import torch

from ..kernels import matmul as km
from ._utils import row_tensor_reason
from .registry import register

logger = logging.getLogger(__name__)

__all__ = ["TARGETS"]

aten = torch.ops.aten


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


@register(aten.mm.default, checks_in_impl=True, kernel="flag_gems.matmul", supports=_supports_mm)
def mm(self, mat2):
    """``aten::mm``: ``self [M, K] @ mat2 [K, N]``."""
    _refuse(_supports_mm(self, mat2))
    return km.matmul(self, mat2)


@register(aten.bmm.default, checks_in_impl=True, kernel="flag_gems.matmul", supports=_supports_bmm)
def bmm(self, mat2):
    """``aten::bmm``: ``self [B, M, K] @ mat2 [B, K, N]``."""
    _refuse(_supports_bmm(self, mat2))
    return km.matmul(self, mat2)


@register(aten.addmm.default, checks_in_impl=True, kernel="flag_gems.matmul", supports=_supports_addmm)
def addmm(self, mat1, mat2, *, beta=1, alpha=1):
    """``aten::addmm``: ``beta * self + alpha * (mat1 @ mat2)``; ``self`` is ignored when ``beta == 0``."""
    _refuse(_supports_addmm(self, mat1, mat2, beta=beta, alpha=alpha))
    return km.matmul(mat1, mat2, self, beta=beta, alpha=alpha)


TARGETS = (aten.mm.default, aten.bmm.default, aten.addmm.default)
