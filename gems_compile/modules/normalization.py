"""``GemsRMSNorm``: ``torch.nn.RMSNorm``'s interface on flag_gems' RMSNorm kernels, with the fused residual add.

Upstream FlagGems' module (``flag_gems.modules.normalization``) takes the same constructor
arguments and ``forward(x, residual=None)``: without a residual it returns a new tensor;
with one it runs vLLM's fused residual add + RMSNorm in place (``x <- y``,
``residual <- x + residual``) and returns ``(x, residual)``. What this one adds:

- ``elementwise_affine=False`` (no weight) works on both paths (upstream reads
  ``weight.size()`` and fails);
- ``inplace=`` chooses either form explicitly: ``inplace=False`` with a residual returns new
  ``(y, x + residual)`` and leaves both inputs alone (what autograd on leaf tensors needs),
  ``inplace=True`` without one writes ``y`` into ``x``;
- ``eps=None`` means ``torch.finfo(x.dtype).eps``, as ``torch.nn.RMSNorm``;
- a multi-dim ``normalized_shape`` and any strides on the token dims, as the ops take them.

Everything runs through the public ops of ``lowerings/rms_norm.py``: differentiable, usable
in ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..kernels.rms_norm import rms_norm_fwd
from ..lowerings._utils import eager_fast_path
from ..lowerings.rms_norm import add_rms_norm, fused_add_rms_norm, rms_norm

__all__ = ["GemsRMSNorm", "gems_rms_forward"]


def _check_input(x, normalized_shape: tuple[int, ...]) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    k = len(normalized_shape)
    if x.dim() < k or tuple(x.shape[x.dim() - k:]) != normalized_shape:
        raise ValueError(
            f"x: expected trailing dims {list(normalized_shape)} (normalized_shape), got shape {list(x.shape)}"
        )


def gems_rms_forward(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    eps: float,
    *,
    normalized_shape: Sequence[int] | None = None,
    inplace: bool | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """RMSNorm of ``x``, or of ``x + residual`` with the sum returned too (upstream's helper).

    Args:
        x: input ``[*, *normalized_shape]``, fp16/bf16/fp32.
        residual: None, or a tensor of x's shape and dtype added to x before the norm.
        weight: scale of shape ``normalized_shape``, or None.
        eps: added to the mean square.
        normalized_shape: the trailing dims normalized over; default: weight's shape, or x's
            last dim without a weight.
        inplace: None: upstream's behaviour (in place with a residual, a new tensor without);
            True: write y into x (and the sum into residual); False: new tensors only.

    Returns:
        Without residual: y (``x`` itself when in place). With residual: ``(y, x + residual)``,
        which are ``(x, residual)`` when in place.

    Raises:
        TypeError / ValueError / NotImplementedError: from the ops (dtype, shape, device).
    """
    if normalized_shape is None:
        normalized_shape = tuple(weight.shape) if weight is not None else (x.shape[-1],)
    normalized_shape = tuple(normalized_shape)
    if residual is None:
        if inplace and len(normalized_shape) == 1 and eager_fast_path(x, weight):
            _check_input(x, tuple(normalized_shape))
            rms_norm_fwd(x, weight, eps, out=x)  # one pass: the kernel reads each row before writing it
            return x
        y = rms_norm(x, normalized_shape, weight, eps)
        if inplace:  # autograd records the write as for any torch in-place op
            x.copy_(y)
            return x
        return y
    if inplace is None or inplace:
        return fused_add_rms_norm(x, residual, normalized_shape, weight, eps)
    ns = tuple(normalized_shape)
    if len(ns) == 1:
        return add_rms_norm(x, residual, weight, eps)
    # add_rms_norm normalizes over the last dim: flatten a multi-dim normalized_shape into it.
    if residual.shape != x.shape:
        raise ValueError(f"residual: expected shape {list(x.shape)} (x's shape), got {list(residual.shape)}")
    flat = x.dim() - len(ns)
    w = weight.reshape(-1) if weight is not None else None
    y, h = add_rms_norm(x.flatten(flat), residual.flatten(flat), w, eps)
    return y.view(x.shape), h.view(x.shape)


class GemsRMSNorm(nn.Module):
    """Root-mean-square layer norm over the trailing ``normalized_shape`` dims, with the fused residual add.

    ``y = x / sqrt(mean(x^2) + eps) * weight``; with a residual, ``h = x + residual`` is
    normalized instead and returned beside ``y`` (a pre-norm decoder's residual stream).

    Args:
        normalized_shape: int or sequence: the trailing dims to normalize over.
        eps: added to the mean square; None: ``torch.finfo(x.dtype).eps`` (torch's default).
        elementwise_affine: learn a weight of shape ``normalized_shape`` (ones at init);
            False: no weight.
        device, dtype: of the weight.

    Raises:
        ValueError: an empty or non-positive ``normalized_shape``.
    """

    __constants__ = ["normalized_shape", "eps", "elementwise_affine"]

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = 1e-6,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (normalized_shape,)
        shape = tuple(int(s) for s in normalized_shape)
        if not shape or any(s <= 0 for s in shape):
            raise ValueError(f"normalized_shape: expected positive sizes, got {list(shape)}")
        self.normalized_shape = shape
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set the weight to ones (no-op without ``elementwise_affine``)."""
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(
        self, x: Tensor, residual: Tensor | None = None, *, inplace: bool | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Normalize ``x``, or ``x + residual``.

        Args:
            x: ``[*, *normalized_shape]`` fp16/bf16/fp32, any strides on the token dims.
            residual: None, or a tensor of x's shape and dtype.
            inplace: None (upstream's behaviour): in place with a residual, a new tensor
                without. True: write into x (and residual). False: new tensors only.

        Returns:
            Without residual: the normalized tensor (``x`` itself when in place). With
            residual: ``(y, x + residual)``; in place these are the updated ``x`` and ``residual``.

        Raises:
            TypeError: x is not a tensor, or an unsupported dtype.
            ValueError: x's trailing dims are not ``normalized_shape``, or residual's shape differs.
            NotImplementedError: a CPU tensor outside Triton's interpreter mode.
        """
        _check_input(x, self.normalized_shape)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return gems_rms_forward(x, residual, self.weight, eps, normalized_shape=self.normalized_shape, inplace=inplace)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
