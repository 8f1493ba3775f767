"""Registry entries for LayerNorm, served by ``kernels/layer_norm.py``.

Overloads (each ``impl`` takes exactly the overload's arguments)::

    native_layer_norm.default  native_layer_norm_backward.default

Scope: a contiguous fp16/bf16/fp32 input normalized over its trailing
``len(normalized_shape)`` dims (flattened to one row of ``N > 0`` elements), any number of
rows (0 included), weight/bias optional and contiguous, fp32 math. Parameter dtypes follow
torch: the input's dtype, or (on the CPU only; CUDA's kernel raises) fp32 parameters with
an fp16/bf16 input. ``mean``/``rstd`` have shape ``input.shape[:-k] + (1,) * k`` and
torch's dtype: fp32 on CUDA; on the CPU the input's dtype, fp32 with mixed parameters.
Everything else is a ``supports`` reason, so the eager mode runs the native kernel (and
torch's errors): float64, a non-contiguous tensor, shapes that do not match
``normalized_shape``, an empty normalized shape, symbolic sizes, an ``output_mask``
asking for the gradient of an absent parameter, devices the kernels do not run on.

``supports`` reads metadata only, so it works on FakeTensors; ``impl`` re-checks and
raises NotImplementedError for the same reasons.

Policies (``flag_gems.lowerings.registry``): on in the eager mode, as every entry. A row
kernel that reads the input once and writes the output once, as the native kernel; not in
the GPU ops benchmark yet, so neither in ``preset="fast"`` nor lowered in compiled graphs.
"""

from __future__ import annotations

import logging

import torch

from ..kernels import layer_norm as kl
from ._utils import normalized_shape_reason, row_tensor_reason
from .registry import register

logger = logging.getLogger(__name__)

__all__ = ["TARGETS"]

aten = torch.ops.aten


_REDUCED = (torch.float16, torch.bfloat16)


def _tensor_reason(t, name: str, optional: bool = False) -> str | None:
    """Why the kernels cannot read ``t`` (None when they can). Metadata only."""
    return row_tensor_reason(t, name, optional=optional)


def _params_reason(input, normalized_shape, weight, bias) -> str | None:
    """Why the parameters do not fit torch's rules (shape, dtype, device)."""
    dtypes = set()
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        why = _tensor_reason(p, name)
        if why is not None:
            return why
        if list(p.shape) != list(normalized_shape):
            return f"{name} shape {list(p.shape)} != normalized_shape {list(normalized_shape)}"
        if p.device != input.device:
            return f"{name} on {p.device}, input on {input.device}"
        dtypes.add(p.dtype)
    if not dtypes or dtypes == {input.dtype}:
        return None
    if dtypes == {torch.float32} and input.dtype in _REDUCED:
        if input.device.type == "cpu":
            return None
        return "fp32 parameters with a reduced-precision input on CUDA (the native kernel raises)"
    return f"parameter dtypes {sorted(str(d) for d in dtypes)} with a {input.dtype} input (torch raises)"


def _stats_dtype(input, weight, bias) -> torch.dtype:
    """torch's dtype for mean/rstd: fp32 on CUDA; on the CPU the input's, fp32 when mixed."""
    if input.device.type != "cpu":
        return torch.float32
    mixed = any(p is not None and p.dtype != input.dtype for p in (weight, bias))
    return torch.float32 if mixed else input.dtype


def _rows(input, normalized_shape) -> tuple[int, int]:
    n = 1
    for s in normalized_shape:
        n *= s
    return input.numel() // n, n


def _stat_shape(input, normalized_shape) -> list[int]:
    k = len(normalized_shape)
    return list(input.shape[: input.dim() - k]) + [1] * k


def _refuse(reason: str | None) -> None:
    if reason is not None:
        raise NotImplementedError(f"flag_gems layer_norm: {reason}")


# --------------------------------------------------------------------------- forward


def _supports_native_layer_norm(input, normalized_shape, weight, bias, eps):
    return (
        _tensor_reason(input, "input")
        or normalized_shape_reason(input, normalized_shape)
        or _params_reason(input, normalized_shape, weight, bias)
    )


@register(aten.native_layer_norm.default, checks_in_impl=True, kernel="flag_gems.layer_norm.fwd", supports=_supports_native_layer_norm)
def native_layer_norm(input, normalized_shape, weight, bias, eps):
    """``aten::native_layer_norm``: ``(out, mean, rstd)`` over the trailing normalized dims."""
    _refuse(_supports_native_layer_norm(input, normalized_shape, weight, bias, eps))
    m, n = _rows(input, normalized_shape)
    y, mean, rstd = kl.layer_norm_fwd(
        input.view(m, n),
        weight.view(n) if weight is not None else None,
        bias.view(n) if bias is not None else None,
        eps,
        stats_dtype=_stats_dtype(input, weight, bias),
    )
    stat_shape = _stat_shape(input, normalized_shape)
    return y.view(input.shape), mean.view(stat_shape), rstd.view(stat_shape)


# --------------------------------------------------------------------------- backward


def _supports_native_layer_norm_backward(grad_out, input, normalized_shape, mean, rstd, weight, bias, output_mask):
    why = _tensor_reason(input, "input") or normalized_shape_reason(input, normalized_shape)
    if why is not None:
        return why
    why = _tensor_reason(grad_out, "grad_out")
    if why is not None:
        return why
    if list(grad_out.shape) != list(input.shape) or grad_out.device != input.device:
        return f"grad_out shape {list(grad_out.shape)} differs from input {list(input.shape)}"
    m, _ = _rows(input, normalized_shape)
    for name, s in (("mean", mean), ("rstd", rstd)):
        why = _tensor_reason(s, name)
        if why is not None:
            return why
        if s.numel() != m or s.device != input.device:
            return f"{name} has {s.numel()} values for {m} rows"
    why = _params_reason(input, normalized_shape, weight, bias)
    if why is not None:
        return why
    mask = list(output_mask)
    if len(mask) != 3:
        return f"output_mask {output_mask!r} is not 3 bools"
    if mask[1] and weight is None:
        return "output_mask asks for the weight gradient without a weight (torch raises)"
    if mask[2] and bias is None:
        return "output_mask asks for the bias gradient without a bias (torch raises)"
    return None


@register(aten.native_layer_norm_backward.default, checks_in_impl=True, kernel="flag_gems.layer_norm.bwd",
          supports=_supports_native_layer_norm_backward)
def native_layer_norm_backward(grad_out, input, normalized_shape, mean, rstd, weight, bias, output_mask):
    """``aten::native_layer_norm_backward``: ``(dx, dw, db)``, None where ``output_mask`` is False."""
    _refuse(_supports_native_layer_norm_backward(grad_out, input, normalized_shape, mean, rstd, weight, bias,
                                                 output_mask))
    m, n = _rows(input, normalized_shape)
    want_dx, want_dw, want_db = (bool(b) for b in output_mask)
    dx, dw, db = kl.layer_norm_bwd(
        grad_out.view(m, n),
        input.view(m, n),
        mean.reshape(m),
        rstd.reshape(m),
        weight.view(n) if weight is not None else None,
        compute_dx=want_dx,
        compute_dw=want_dw,
        compute_db=want_db,
        param_dtype=weight.dtype if weight is not None else (bias.dtype if bias is not None else input.dtype),
    )
    if dx is not None:
        dx = dx.view(input.shape)
    if dw is not None:
        dw = dw.view(weight.shape)
    if db is not None:
        db = db.to(bias.dtype).view(bias.shape)
    return dx, dw, db


TARGETS = (aten.native_layer_norm.default, aten.native_layer_norm_backward.default)
