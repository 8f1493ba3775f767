"""Registry entries for reductions over the last dims and softmax, served by ``kernels/reduction.py``.

Overloads (each ``impl`` takes exactly the overload's arguments)::

    sum.dim_IntList  sum.default  mean.dim  amax.default  max.dim  all.default  all.dim
    _softmax.default  _log_softmax.default  _softmax_backward_data.default
    _log_softmax_backward_data.default

Scope: a contiguous input reduced over its trailing dims ``k..ndim-1`` (the last dim,
``-1`` or ``ndim-1``, is the common case; every dim, as ``dim=None``/``[]``/``sum()``,
is the same with ``k = 0``); the softmax family over the last dim only. Floating inputs
(fp16/bf16/fp32) with fp32 accumulation and torch's output dtypes; ``all`` also takes bool
and integer inputs. Everything else is a ``supports`` reason, so the eager mode runs the
native kernel: other dim sets, a non-contiguous input, integer sums, ``float64``, a
``dtype=`` that narrows, a 0-dim input to the dim overloads, an empty row for a maximum
(torch raises), symbolic sizes (the compile backend leaves these to aten/Inductor),
``half_to_float`` with a non-fp16 input, devices the kernels do not run on.

``supports`` reads metadata only (dtype, shape, contiguity, device), so it works on
FakeTensors; ``impl`` re-checks and raises NotImplementedError exactly for those reasons
(``checks_in_impl``: the eager mode calls ``impl`` alone).

Policies (``flag_gems.lowerings.registry``): every entry is on in the eager mode; the benchmark
rows of each overload decide ``preset="fast"``. ``_softmax``, ``_log_softmax`` and ``mean.dim`` are
lowered in compiled graphs on their eager-call data (``graph_proxy``) until graph-mode data exists:
one read of each row where the native kernels measured slower at both benchmark shapes.
"""

from __future__ import annotations

import logging

import torch

from ..kernels import reduction as kr
from ..kernels._common import FLOAT_DTYPES
from ._utils import row_tensor_reason
from .registry import register

logger = logging.getLogger(__name__)

__all__ = ["TARGETS"]

aten = torch.ops.aten

_FLOAT_NAMES = "float16, bfloat16, float32"


# --------------------------------------------------------------------------- metadata checks


def _input_reason(x, dtypes=FLOAT_DTYPES, name: str = "self") -> str | None:
    """Why the kernels cannot read ``x`` (None when they can). Metadata only."""
    return row_tensor_reason(x, name, dtypes)


def _trailing(x: torch.Tensor, dim) -> tuple[int, list[int]] | str:
    """``(n_cols, reduced dims)`` when ``dim`` names the trailing dims of ``x``, else a reason.

    ``dim`` None or ``[]`` is every dim (torch's full reduction).
    """
    ndim = x.dim()
    if dim is None or (not isinstance(dim, int) and len(dim) == 0):
        dims = list(range(ndim))
    else:
        if ndim == 0:
            return "a 0-dim input with a dim list"
        raw = [dim] if isinstance(dim, int) else list(dim)
        if not all(isinstance(d, int) and not isinstance(d, bool) for d in raw):
            return f"dim {dim!r} is not a list of ints"
        if any(d < -ndim or d >= ndim for d in raw):
            return f"dim {dim!r} out of range for {ndim} dims"
        dims = sorted(d % ndim for d in raw)
        if len(set(dims)) != len(dims):
            return f"dim {dim!r} repeats a dim"
        if dims != list(range(ndim - len(dims), ndim)):
            return f"dim {dim!r} is not the last dim(s) of a {ndim}-dim input"
    n_cols = 1
    for d in dims:
        n_cols *= x.shape[d]
    return n_cols, dims


def _out_shape(x: torch.Tensor, dims: list[int], keepdim: bool) -> list[int]:
    if keepdim:
        return [1 if d in dims else s for d, s in enumerate(x.shape)]
    return [s for d, s in enumerate(x.shape) if d not in dims]


def _sum_dtype_reason(x: torch.Tensor, dtype) -> str | None:
    if dtype is None or dtype == x.dtype:
        return None
    if dtype == torch.float32:
        return None  # widening: exact, the fp32 accumulation is the same
    return f"dtype={dtype} with a {x.dtype} input (only the input's dtype or float32)"


def _refuse(reason: str | None) -> None:
    if reason is not None:
        raise NotImplementedError(f"flag_gems reduction: {reason}")


# --------------------------------------------------------------------------- sum / mean


def _sum_plan(self, dim, dtype) -> tuple[int, list[int]] | str:
    """``(n_cols, reduced dims)`` (see :func:`_trailing`), or the reason the kernels refuse."""
    return _input_reason(self) or _sum_dtype_reason(self, dtype) or _trailing(self, dim)


def _sum_reason(self, dim, keepdim=False, dtype=None) -> str | None:
    t = _sum_plan(self, dim, dtype)
    return t if isinstance(t, str) else None


def _sum(self, dim, keepdim, dtype, mean):
    t = _sum_plan(self, dim, dtype)
    if isinstance(t, str):
        _refuse(t)
    n_cols, dims = t
    shape = _out_shape(self, dims, keepdim)
    if n_cols == 0:  # empty rows: 0 for a sum, NaN for a mean, as torch
        return torch.full(shape, float("nan") if mean else 0.0, dtype=dtype or self.dtype, device=self.device)
    return kr.row_sum(self, n_cols, out_dtype=dtype, mean=mean).view(shape)


def _supports_sum_dim(self, dim, keepdim=False, *, dtype=None):
    return _sum_reason(self, dim, keepdim, dtype)


@register(aten.sum.dim_IntList, checks_in_impl=True, kernel="flag_gems.reduction.sum", supports=_supports_sum_dim)
def sum_dim_IntList(self, dim, keepdim=False, *, dtype=None):  # noqa: N802  (the overload's name)
    """``aten::sum.dim_IntList`` over the trailing dims of a contiguous float tensor."""
    return _sum(self, dim, keepdim, dtype, mean=False)


def _supports_sum(self, *, dtype=None):
    return _sum_reason(self, None, False, dtype)


@register(aten.sum.default, checks_in_impl=True, kernel="flag_gems.reduction.sum", supports=_supports_sum)
def sum_default(self, *, dtype=None):
    """``aten::sum`` of every element of a contiguous float tensor."""
    return _sum(self, None, False, dtype, mean=False)


def _supports_mean_dim(self, dim, keepdim=False, *, dtype=None):
    return _sum_reason(self, dim, keepdim, dtype)


@register(aten.mean.dim, checks_in_impl=True, graph_proxy=True, kernel="flag_gems.reduction.mean", supports=_supports_mean_dim)
def mean_dim(self, dim, keepdim=False, *, dtype=None):
    """``aten::mean.dim`` over the trailing dims of a contiguous float tensor."""
    return _sum(self, dim, keepdim, dtype, mean=True)


# --------------------------------------------------------------------------- amax / max.dim


def _max_reason(self, dim) -> str | None:
    why = _input_reason(self)
    if why is not None:
        return why
    t = _trailing(self, dim)
    if isinstance(t, str):
        return t
    if t[0] == 0:
        return "an empty reduced dim (torch raises: no maximum of nothing)"
    return None


def _supports_amax(self, dim=(), keepdim=False):
    return _max_reason(self, dim)


@register(aten.amax.default, checks_in_impl=True, kernel="flag_gems.reduction.amax", supports=_supports_amax)
def amax_default(self, dim=(), keepdim=False):
    """``aten::amax`` over the trailing dims (NaN propagates, as torch)."""
    _refuse(_supports_amax(self, dim, keepdim))
    n_cols, dims = _trailing(self, dim)
    return kr.row_max(self, n_cols).view(_out_shape(self, dims, keepdim))


def _supports_max_dim(self, dim, keepdim=False):
    if isinstance(self, torch.Tensor) and self.dim() == 0:
        return "a 0-dim input"
    return _max_reason(self, dim)


@register(aten.max.dim, checks_in_impl=True, kernel="flag_gems.reduction.max", supports=_supports_max_dim)
def max_dim(self, dim, keepdim=False):
    """``aten::max.dim`` over the last dim: (values, indices); the first NaN, else the first maximum."""
    _refuse(_supports_max_dim(self, dim, keepdim))
    n_cols, dims = _trailing(self, dim)
    shape = _out_shape(self, dims, keepdim)
    values, indices = kr.row_max_index(self, n_cols)
    return values.view(shape), indices.view(shape)


# --------------------------------------------------------------------------- all


def _supports_all(self):
    return _input_reason(self, kr.ALL_DTYPES)


@register(aten.all.default, checks_in_impl=True, kernel="flag_gems.reduction.all", supports=_supports_all)
def all_default(self):
    """``aten::all`` of a contiguous bool/integer/float tensor (bool result)."""
    _refuse(_supports_all(self))
    if self.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=self.device)
    return kr.row_all(self, self.numel()).view(())


def _supports_all_dim(self, dim, keepdim=False):
    why = _input_reason(self, kr.ALL_DTYPES)
    if why is not None:
        return why
    if self.dim() == 0:
        return "a 0-dim input"
    t = _trailing(self, dim)
    return t if isinstance(t, str) else None


@register(aten.all.dim, checks_in_impl=True, kernel="flag_gems.reduction.all", supports=_supports_all_dim)
def all_dim(self, dim, keepdim=False):
    """``aten::all.dim`` over the last dim (bool result)."""
    _refuse(_supports_all_dim(self, dim, keepdim))
    n_cols, dims = _trailing(self, dim)
    shape = _out_shape(self, dims, keepdim)
    if n_cols == 0:
        return torch.ones(shape, dtype=torch.bool, device=self.device)
    return kr.row_all(self, n_cols).view(shape)


# --------------------------------------------------------------------------- softmax


def _softmax_reason(self, dim, half_to_float) -> str | None:
    why = _input_reason(self)
    if why is not None:
        return why
    if self.dim() == 0:
        return "a 0-dim input"
    t = _trailing(self, dim)
    if isinstance(t, str) or len(t[1]) != 1:
        return t if isinstance(t, str) else f"dim {dim!r}"
    if half_to_float and self.dtype != torch.float16:
        return f"half_to_float with a {self.dtype} input (torch takes fp16 only)"
    return None


def _softmax(self, dim, half_to_float, log):
    _refuse(_softmax_reason(self, dim, half_to_float))
    return kr.softmax_fwd(self, log=log, out_dtype=torch.float32 if half_to_float else self.dtype)


def _supports_softmax(self, dim, half_to_float):
    return _softmax_reason(self, dim, half_to_float)


@register(aten._softmax.default, checks_in_impl=True, graph_proxy=True, kernel="flag_gems.reduction.softmax", supports=_supports_softmax)
def _softmax_default(self, dim, half_to_float):
    """``aten::_softmax`` over the last dim (max-subtracted, fp32; half_to_float gives fp32)."""
    return _softmax(self, dim, half_to_float, log=False)


def _supports_log_softmax(self, dim, half_to_float):
    return _softmax_reason(self, dim, half_to_float)


@register(aten._log_softmax.default, checks_in_impl=True, graph_proxy=True, kernel="flag_gems.reduction.log_softmax", supports=_supports_log_softmax)
def _log_softmax_default(self, dim, half_to_float):
    """``aten::_log_softmax`` over the last dim (max-subtracted, fp32)."""
    return _softmax(self, dim, half_to_float, log=True)


def _softmax_bwd_reason(grad_output, output, dim, input_dtype) -> str | None:
    why = _input_reason(output, name="output") or _input_reason(grad_output, name="grad_output")
    if why is not None:
        return why
    if grad_output.shape != output.shape or grad_output.dtype != output.dtype:
        return "grad_output and output differ in shape or dtype"
    if grad_output.device != output.device:
        return "grad_output and output on several devices"
    if output.dim() == 0:
        return "a 0-dim input"
    t = _trailing(output, dim)
    if isinstance(t, str) or len(t[1]) != 1:
        return t if isinstance(t, str) else f"dim {dim!r}"
    if input_dtype != output.dtype and not (input_dtype == torch.float16 and output.dtype == torch.float32):
        return f"input_dtype {input_dtype} with a {output.dtype} output (only equal, or fp16 from half_to_float)"
    return None


def _supports_softmax_bwd(grad_output, output, dim, input_dtype):
    return _softmax_bwd_reason(grad_output, output, dim, input_dtype)


@register(aten._softmax_backward_data.default, checks_in_impl=True, kernel="flag_gems.reduction.softmax_backward",
          supports=_supports_softmax_bwd)
def _softmax_backward_data_default(grad_output, output, dim, input_dtype):
    """``aten::_softmax_backward_data``: ``output * (grad_output - sum(grad_output * output))``."""
    _refuse(_softmax_bwd_reason(grad_output, output, dim, input_dtype))
    return kr.softmax_bwd(grad_output, output, log=False, out_dtype=input_dtype)


@register(aten._log_softmax_backward_data.default, checks_in_impl=True, kernel="flag_gems.reduction.log_softmax_backward",
          supports=_supports_softmax_bwd)
def _log_softmax_backward_data_default(grad_output, output, dim, input_dtype):
    """``aten::_log_softmax_backward_data``: ``grad_output - exp(output) * sum(grad_output)``."""
    _refuse(_softmax_bwd_reason(grad_output, output, dim, input_dtype))
    return kr.softmax_bwd(grad_output, output, log=True, out_dtype=input_dtype)


TARGETS = (
    aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.amax.default, aten.max.dim,
    aten.all.default, aten.all.dim, aten._softmax.default, aten._log_softmax.default,
    aten._softmax_backward_data.default, aten._log_softmax_backward_data.default,
)
