"""Registry entries for the indexing / data-movement aten ops LLMs run eagerly.

========================================  ==========================================
overload                                  kernel (``kernels/indexing.py``)
========================================  ==========================================
``embedding.default``                     row gather (``index_select`` on dim 0)
``embedding_dense_backward.default``      sorted ids, one fp32 sum per id run
``index_select.default``                  row gather
``gather.default``                        element gather, <= 4 dims, any strides
``cat.default``                           one copy launch per non-empty input
``cumsum.default``                        row scan over the last dim
``arange.default/.start/.start_step``     ``start + i * step``
========================================  ==========================================

Each ``impl`` takes exactly its overload's arguments; each ``supports`` looks only at
metadata (dtype, device, rank, sizes, Python scalars), so it runs on FakeTensors, and
gives a reason for everything the kernels do not take, which sends the call to the
native kernel (and so to torch's own error for bad input: a dim out of range, mismatched
shapes, an int32 ``gather`` index, mixed ``cat`` dtypes that torch would promote...).

Out-of-range index *values* are not checked (that needs the data, i.e. a device sync):
torch raises there (CPU ``IndexError``, CUDA a device-side assert); these kernels never
access memory out of bounds and produce zeros for such rows / elements (the embedding
backward ignores such ids).

Policies (``flag_gems.lowerings.registry``): on in the eager mode, as every entry; each
overload's benchmark rows decide ``preset="fast"``. ``cumsum`` (a row scan) is lowered in
compiled graphs on its eager-call data until graph-mode data exists; the data-movement entries
are not (no graph-mode data; there Inductor or the native kernels move the same bytes).
"""

from __future__ import annotations

import logging

import torch
from torch._prims_common import suggest_memory_format

from ..kernels import indexing as K
from ..kernels._common import interpreter_mode
from .registry import register

logger = logging.getLogger(__name__)

__all__: list[str] = []

aten = torch.ops.aten

# Dtypes the copy kernels move (Triton has a pointer type for each).
_DATA_DTYPES = (
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
)
_FLOAT_GRAD = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)
_ARANGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int16, torch.int32, torch.int64)
_SYM = (torch.SymInt, torch.SymFloat, torch.SymBool)


def _device_reason(*tensors) -> str | None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        return f"tensors on several devices ({', '.join(sorted(map(str, devices)))})"
    return _device_ok(next(iter(devices))) if devices else None


def _device_ok(device) -> str | None:
    kind = torch.device(device).type if device is not None else "cpu"
    if kind == "cuda" or (kind == "cpu" and interpreter_mode()):
        return None
    return f"device {kind} (the kernels run on CUDA, or on CPU in Triton's interpreter)"


def _tensor_reason(name: str, t, dtypes) -> str | None:
    if not isinstance(t, torch.Tensor):
        return f"{name} is a {type(t).__name__}, not a tensor"
    if t.dtype not in dtypes:
        return f"{name} dtype {t.dtype} is not supported"
    if t.layout != torch.strided:
        return f"{name} layout {t.layout}"
    return None


def _dim(dim, rank: int):
    """``dim`` wrapped into ``[0, rank)``, or None when out of range (torch raises)."""
    if isinstance(dim, _SYM) or not isinstance(dim, int):
        return None
    d = dim + rank if dim < 0 else dim
    return d if 0 <= d < max(rank, 1) else None


# --------------------------------------------------------------------------- embedding


def _embedding_supports(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    # padding_idx, scale_grad_by_freq and sparse change only the backward
    why = _tensor_reason("weight", weight, _DATA_DTYPES) or _tensor_reason("indices", indices, _INDEX_DTYPES)
    if why:
        return why
    if weight.dim() != 2:
        return f"weight is {weight.dim()}-D (expected 2-D)"
    return _device_reason(weight, indices)


@register(aten.embedding.default, kernel="flag_gems.indexing.embedding", supports=_embedding_supports)
def embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    """``aten.embedding``: ``weight[indices]`` (rows of out-of-range ids are zeros)."""
    rows = K.index_select(weight, 0, indices.reshape(-1))
    return rows.view(*indices.shape, weight.shape[1])


def _embedding_bwd_supports(grad_output, indices, num_weights, padding_idx, scale_grad_by_freq):
    why = _tensor_reason("grad_output", grad_output, _FLOAT_GRAD) or _tensor_reason("indices", indices, _INDEX_DTYPES)
    if why:
        return why
    if isinstance(num_weights, _SYM) or isinstance(padding_idx, _SYM):
        return "symbolic num_weights / padding_idx"
    if grad_output.dim() != indices.dim() + 1 or tuple(grad_output.shape[:-1]) != tuple(indices.shape):
        return f"grad_output shape {list(grad_output.shape)} is not indices' shape {list(indices.shape)} + [dim]"
    return _device_reason(grad_output, indices)


@register(aten.embedding_dense_backward.default, kernel="flag_gems.indexing.embedding_dense_backward",
          supports=_embedding_bwd_supports)
def embedding_dense_backward(grad_output, indices, num_weights, padding_idx, scale_grad_by_freq):
    """``aten.embedding_dense_backward``: deterministic per-id sums (see ``kernels/indexing.py``)."""
    return K.embedding_dense_backward(grad_output, indices, num_weights, padding_idx, scale_grad_by_freq)


# --------------------------------------------------------------------------- index_select / gather


def _index_select_supports(self, dim, index):
    why = _tensor_reason("self", self, _DATA_DTYPES) or _tensor_reason("index", index, _INDEX_DTYPES)
    if why:
        return why
    if self.dim() == 0:
        return "0-d self"
    if index.dim() > 1:
        return f"{index.dim()}-D index (torch expects 0-D or 1-D)"
    if _dim(dim, self.dim()) is None:
        return f"dim {dim} out of range for a {self.dim()}-D tensor"
    return _device_reason(self, index)


@register(aten.index_select.default, kernel="flag_gems.indexing.index_select", supports=_index_select_supports)
def index_select(self, dim, index):
    """``aten.index_select`` (rows of out-of-range indices are zeros)."""
    return K.index_select(self, _dim(dim, self.dim()), index)


def _gather_supports(self, dim, index, *, sparse_grad=False):
    # sparse_grad changes only the backward
    why = _tensor_reason("self", self, _DATA_DTYPES) or _tensor_reason("index", index, (torch.int64,))
    if why:
        return why
    if not 1 <= self.dim() <= K.MAX_DIMS:
        return f"{self.dim()}-D self (the kernel takes 1 to {K.MAX_DIMS} dims)"
    if index.dim() != self.dim():
        return f"index has {index.dim()} dims, self {self.dim()}"
    d = _dim(dim, self.dim())
    if d is None:
        return f"dim {dim} out of range for a {self.dim()}-D tensor"
    for k in range(self.dim()):
        if k != d and index.shape[k] > self.shape[k]:
            return f"index size {index.shape[k]} exceeds self's {self.shape[k]} in dim {k}"
    return _device_reason(self, index)


@register(aten.gather.default, kernel="flag_gems.indexing.gather", supports=_gather_supports)
def gather(self, dim, index, *, sparse_grad=False):
    """``aten.gather`` (elements at out-of-range indices are zeros)."""
    return K.gather(self, _dim(dim, self.dim()), index)


# --------------------------------------------------------------------------- cat


def _cat_supports(tensors, dim=0):
    if not isinstance(tensors, (list, tuple)) or not tensors:
        return "no tensors"
    first = tensors[0]
    for i, t in enumerate(tensors):
        why = _tensor_reason(f"tensors[{i}]", t, _DATA_DTYPES)
        if why:
            return why
        if t.dtype != first.dtype:
            return f"mixed dtypes ({first.dtype}, {t.dtype}): torch promotes"
        if t.dim() == 1 and t.shape[0] == 0 and first.dim() != 1:
            return "a legacy 1-D empty input (torch skips it)"
        if t.dim() != first.dim():
            return f"inputs of {first.dim()} and {t.dim()} dims"
        if t.dim() in (4, 5) and suggest_memory_format(t) != torch.contiguous_format:
            return "channels-last inputs (torch keeps that layout)"
    if first.dim() == 0:
        return "0-d inputs"
    d = _dim(dim, first.dim())
    if d is None:
        return f"dim {dim} out of range for {first.dim()}-D tensors"
    for t in tensors:
        if tuple(t.shape[:d]) != tuple(first.shape[:d]) or tuple(t.shape[d + 1:]) != tuple(first.shape[d + 1:]):
            return f"shapes {list(first.shape)} and {list(t.shape)} differ outside dim {d}"
    return _device_reason(*tensors)


@register(aten.cat.default, kernel="flag_gems.indexing.cat", supports=_cat_supports)
def cat(tensors, dim=0):
    """``aten.cat`` for inputs of one dtype (a contiguous result, as torch's)."""
    return K.cat(tensors, _dim(dim, tensors[0].dim()))


# --------------------------------------------------------------------------- cumsum


def _cumsum_dtype(self, dtype):
    if dtype is not None:
        return dtype
    return torch.int64 if not (self.dtype.is_floating_point or self.dtype.is_complex) else self.dtype


def _cumsum_supports(self, dim, *, dtype=None):
    why = _tensor_reason("self", self, _DATA_DTYPES)
    if why:
        return why
    if self.dim() == 0:
        return "0-d self"
    d = _dim(dim, self.dim())
    if d is None:
        return f"dim {dim} out of range for a {self.dim()}-D tensor"
    if any(s != 1 for s in self.shape[d + 1:]):
        return f"dim {d} is not the last dim (the kernel scans rows)"
    out = _cumsum_dtype(self, dtype)
    if out not in _DATA_DTYPES or out == torch.bool:
        return f"result dtype {out}"
    return _device_reason(self)


@register(aten.cumsum.default, graph_proxy=True, kernel="flag_gems.indexing.cumsum", supports=_cumsum_supports)
def cumsum(self, dim, *, dtype=None):
    """``aten.cumsum`` over the last non-trivial dim (fp32 / int64 / fp64 accumulation)."""
    d = _dim(dim, self.dim())
    x = self
    if d != self.dim() - 1:  # trailing size-1 dims: scan dim d as the last one
        x = self.reshape(*self.shape[: d + 1])
    return K.cumsum(x, _cumsum_dtype(self, dtype)).view(self.shape)


# --------------------------------------------------------------------------- arange


def _arange_plan(start, end, step, dtype, layout, device, pin_memory):
    """``(n, dtype)`` of an arange call, or a reason string."""
    if layout not in (None, torch.strided):
        return f"layout {layout}"
    if pin_memory:
        return "pin_memory=True"
    for name, v in (("start", start), ("end", end), ("step", step)):
        if isinstance(v, _SYM):
            return f"symbolic {name}"
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"{name} of type {type(v).__name__}"
        if isinstance(v, float) and not v == v or v in (float("inf"), float("-inf")):
            return f"non-finite {name}"
    all_int = all(isinstance(v, int) for v in (start, end, step))
    if dtype is None:
        dtype = torch.int64 if all_int else torch.get_default_dtype()
    if dtype not in _ARANGE_DTYPES:
        return f"dtype {dtype}"
    if not dtype.is_floating_point and not all_int:
        return "floating-point bounds with an integer dtype"
    if step == 0:
        return "step 0 (torch raises)"
    if (step > 0 and end < start) or (step < 0 and end > start):
        return "bounds inconsistent with the step sign (torch raises)"
    why = _device_ok(device)
    if why:
        return why
    if dtype == torch.int64:
        n = -((start - end) // step)  # ceil((end - start) / step) in integers, as torch's int64 path
    else:
        import math

        n = math.ceil((float(end) - float(start)) / float(step))
    return n, dtype


def _arange_impl(start, end, step, dtype, layout, device, pin_memory):
    plan = _arange_plan(start, end, step, dtype, layout, device, pin_memory)
    if isinstance(plan, str):
        raise NotImplementedError(f"flag_gems arange: {plan}")
    n, dtype = plan
    return K.arange(start, step, n, dtype, device if device is not None else "cpu")


def _arange_reason(*args):
    plan = _arange_plan(*args)
    return plan if isinstance(plan, str) else None


_A = dict(kernel="flag_gems.indexing.arange")


def _arange_default_supports(end, *, dtype=None, layout=None, device=None, pin_memory=None):
    return _arange_reason(0, end, 1, dtype, layout, device, pin_memory)


def _arange_start_supports(start, end, *, dtype=None, layout=None, device=None, pin_memory=None):
    return _arange_reason(start, end, 1, dtype, layout, device, pin_memory)


def _arange_start_step_supports(start, end, step=1, *, dtype=None, layout=None, device=None, pin_memory=None):
    return _arange_reason(start, end, step, dtype, layout, device, pin_memory)


@register(aten.arange.default, supports=_arange_default_supports, **_A)
def arange(end, *, dtype=None, layout=None, device=None, pin_memory=None):
    """``aten.arange(end)``."""
    return _arange_impl(0, end, 1, dtype, layout, device, pin_memory)


@register(aten.arange.start, supports=_arange_start_supports, **_A)
def arange_start(start, end, *, dtype=None, layout=None, device=None, pin_memory=None):
    """``aten.arange(start, end)``."""
    return _arange_impl(start, end, 1, dtype, layout, device, pin_memory)


@register(aten.arange.start_step, supports=_arange_start_step_supports, **_A)
def arange_start_step(start, end, step=1, *, dtype=None, layout=None, device=None, pin_memory=None):
    """``aten.arange(start, end, step)``."""
    return _arange_impl(start, end, step, dtype, layout, device, pin_memory)
