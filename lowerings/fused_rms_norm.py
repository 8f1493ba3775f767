"""Registry entries for aten's fused RMSNorm, served by ``kernels/rms_norm.py``.

Overloads (each ``impl`` takes exactly the overload's arguments)::

    _fused_rms_norm(Tensor input, int[] normalized_shape, Tensor? weight, float? eps) -> (Tensor, Tensor)
    _fused_rms_norm_backward(Tensor grad_out, Tensor input, int[] normalized_shape, Tensor rstd,
                             Tensor? weight, bool[2] output_mask) -> (Tensor, Tensor)

``torch.nn.RMSNorm`` / ``F.rms_norm`` reach the forward on CUDA (``aten::rms_norm`` calls it
there; on the CPU it decomposes into pointwise ops and never calls it), and autograd's
formula for it calls the backward. The backward exists from torch 2.9; each entry is
registered only when this torch has the op.

torch's contract, matched (the CUDA kernel's and the CPU composite's, which agree):

- the norm is over the trailing ``k = len(normalized_shape)`` dims, seen as one row of
  ``N`` elements: ``out = x * rsqrt(mean(x * x) + eps) * w`` in fp32, rounded once to the
  input's dtype (the weight multiply happens before the rounding), contiguous;
- ``eps=None`` is the *accumulate* type's epsilon, ``torch.finfo(torch.float32).eps`` for
  fp16/bf16/fp32 inputs (not ``finfo(input.dtype)``: bf16's would be 7.8e-3);
- ``rstd`` is fp32 with shape ``input.shape[:-k] + (1,) * k``, contiguous;
- the backward uses the ``rstd`` it is given (its schema has no eps): ``dx`` has the
  input's dtype and shape (contiguous), ``dw`` the weight's; None where ``output_mask`` is
  False; with 0 rows ``dx`` is empty and ``dw`` zeros.

Scope: fp16/bf16/fp32 inputs whose trailing ``k`` dims are contiguous among themselves (the
token dims may have any strides: the launcher reads strided rows, or copies), ``N > 0``,
weight None or contiguous with the input's dtype. Everything else is a ``supports`` reason,
so the eager mode runs the native kernel (and torch's errors): float64, a weight of another
dtype (torch casts; what CUDA's kernel then returns was not checked against ours), trailing
dims that are not one row, shapes that do not match ``normalized_shape``, an empty
normalized shape, symbolic sizes or strides, an ``output_mask`` asking for the weight
gradient without a weight, devices the kernels do not run on.

``supports`` reads metadata only, so it works on FakeTensors and adds no guards; ``impl``
re-checks and raises NotImplementedError for the same reasons.

Policies (``flag_gems.lowerings.registry``): on in the eager mode, as every entry. A row
kernel with the native kernel's bytes (one read, one write; the backward reads x, dy and
rstd); the forward's benchmark rows decide ``preset="fast"``. Not lowered in compiled graphs:
the ``rms_norm`` fusion pass already rewrites ``aten._fused_rms_norm`` there.
"""

from __future__ import annotations

import logging

import torch

from ..kernels.rms_norm import rms_norm_bwd, rms_norm_fwd
from ._utils import normalized_shape_reason, row_tensor_reason
from .registry import register

logger = logging.getLogger(__name__)

__all__ = ["TARGETS"]

aten = torch.ops.aten

# torch's eps=None: the accumulate type's epsilon (fp32 for every dtype the kernels take).
DEFAULT_EPS = torch.finfo(torch.float32).eps


def _strided_tensor_reason(t, name: str) -> str | None:
    return row_tensor_reason(t, name, strided=True)


def _trailing_rows_reason(t, k: int, name: str) -> str | None:
    """Why ``t``'s trailing ``k`` dims are not one unit-stride row (size-1 dims aside)."""
    expected = 1
    for size, stride in zip(reversed(t.shape[t.dim() - k:]), reversed(t.stride()[t.dim() - k:])):
        if size != 1 and stride != expected:
            return f"{name}'s trailing {k} dim(s) are not contiguous (strides {list(t.stride())}): not one row"
        expected *= size
    return None


def _input_reason(input, normalized_shape, name: str = "input") -> str | None:
    return (
        _strided_tensor_reason(input, name)
        or normalized_shape_reason(input, normalized_shape)
        or _trailing_rows_reason(input, len(normalized_shape), name)
    )


def _weight_reason(input, normalized_shape, weight) -> str | None:
    """Why the weight does not fit (shape, dtype, device, layout); None for no weight."""
    if weight is None:
        return None
    why = row_tensor_reason(weight, "weight")
    if why is not None:
        return why
    if list(weight.shape) != list(normalized_shape):
        return f"weight shape {list(weight.shape)} != normalized_shape {list(normalized_shape)}"
    if weight.device != input.device:
        return f"weight on {weight.device}, input on {input.device}"
    if weight.dtype != input.dtype:
        return f"weight dtype {weight.dtype} with a {input.dtype} input (mixed dtypes: left to the native kernel)"
    return None


def _rows(input, normalized_shape) -> tuple[list[int], int, int]:
    """(leading dims, rows, N)."""
    k = len(normalized_shape)
    lead = list(input.shape[: input.dim() - k])
    n = 1
    for s in normalized_shape:
        n *= s
    m = 1
    for s in lead:
        m *= s
    return lead, m, n


def _refuse(reason: str | None) -> None:
    if reason is not None:
        raise NotImplementedError(f"flag_gems _fused_rms_norm: {reason}")


# --------------------------------------------------------------------------- forward


def _supports_fused_rms_norm(input, normalized_shape, weight, eps):
    why = _input_reason(input, normalized_shape) or _weight_reason(input, normalized_shape, weight)
    if why is not None:
        return why
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float))):
        return f"eps {eps!r} is not a number or None"
    return None


def _fused_rms_norm(input, normalized_shape, weight, eps):
    """``aten::_fused_rms_norm``: ``(out, rstd)`` over the trailing normalized dims."""
    _refuse(_supports_fused_rms_norm(input, normalized_shape, weight, eps))
    k = len(normalized_shape)
    lead, _, n = _rows(input, normalized_shape)
    rstd = torch.empty(lead + [1] * k, dtype=torch.float32, device=input.device)
    y, _ = rms_norm_fwd(
        input.view(*lead, n),
        weight.view(n) if weight is not None else None,
        DEFAULT_EPS if eps is None else float(eps),
        rstd_out=rstd,
    )
    return y.view(input.shape), rstd


# --------------------------------------------------------------------------- backward


def _supports_fused_rms_norm_backward(grad_out, input, normalized_shape, rstd, weight, output_mask):
    why = _input_reason(input, normalized_shape)
    if why is not None:
        return why
    why = _strided_tensor_reason(grad_out, "grad_out")
    if why is not None:
        return why
    if list(grad_out.shape) != list(input.shape) or grad_out.device != input.device:
        return f"grad_out shape {list(grad_out.shape)} on {grad_out.device} differs from input {list(input.shape)}"
    if grad_out.dtype != input.dtype:
        return f"grad_out dtype {grad_out.dtype} differs from input dtype {input.dtype}"
    why = row_tensor_reason(rstd, "rstd", dtypes=(torch.float32,))
    if why is not None:
        return why
    _, m, _ = _rows(input, normalized_shape)
    if rstd.numel() != m or rstd.device != input.device:
        return f"rstd has {rstd.numel()} values on {rstd.device} for {m} rows on {input.device}"
    why = _weight_reason(input, normalized_shape, weight)
    if why is not None:
        return why
    mask = list(output_mask) if isinstance(output_mask, (list, tuple)) else None
    if mask is None or len(mask) != 2:
        return f"output_mask {output_mask!r} is not 2 bools"
    if mask[1] and weight is None:
        return "output_mask asks for the weight gradient without a weight"
    return None


def _fused_rms_norm_backward(grad_out, input, normalized_shape, rstd, weight, output_mask):
    """``aten::_fused_rms_norm_backward``: ``(dx, dw)``, None where ``output_mask`` is False."""
    _refuse(_supports_fused_rms_norm_backward(grad_out, input, normalized_shape, rstd, weight, output_mask))
    want_dx, want_dw = (bool(b) for b in output_mask)
    if not (want_dx or want_dw):
        return None, None
    lead, m, n = _rows(input, normalized_shape)
    dx, dw = rms_norm_bwd(
        grad_out.reshape(*lead, n),  # a view unless grad_out's trailing dims are not one row
        input.view(*lead, n),
        weight.view(n) if weight is not None else None,
        0.0,  # unused: the forward's rstd is given
        compute_dw=want_dw,
        rstd=rstd.view(m),
    )
    return (dx.view(input.shape) if want_dx else None), (dw.view(weight.shape) if want_dw else None)


# --------------------------------------------------------------------------- registration

_targets = []
if hasattr(aten, "_fused_rms_norm"):
    register(aten._fused_rms_norm.default, kernel="flag_gems.rms_norm.fwd", supports=_supports_fused_rms_norm,
             checks_in_impl=True)(_fused_rms_norm)
    _targets.append(aten._fused_rms_norm.default)
if hasattr(aten, "_fused_rms_norm_backward"):  # torch >= 2.9
    register(aten._fused_rms_norm_backward.default, kernel="flag_gems.rms_norm.bwd",
             supports=_supports_fused_rms_norm_backward, checks_in_impl=True)(_fused_rms_norm_backward)
    _targets.append(aten._fused_rms_norm_backward.default)

TARGETS = tuple(_targets)
