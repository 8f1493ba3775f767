"""``GemsSiluAndMul``: the SwiGLU gate ``silu(x) * y`` in one flag_gems kernel (out of place).

Upstream FlagGems' module (``flag_gems.modules.activation``) takes the gate and the up
projection as two tensors, ``forward(x, y)``. This one also takes vLLM's single
``[..., 2d]`` tensor (``forward(x)``: gate in the first half, up in the second), which saves
the split when one fused projection produced both. Both forms run through the public ops of
``lowerings/act_and_mul.py``: differentiable, usable in ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..lowerings.act_and_mul import silu_and_mul, silu_and_mul_fused

__all__ = ["GemsSiluAndMul", "gems_silu_and_mul"]


def gems_silu_and_mul(x: Tensor, y: Tensor | None = None) -> Tensor:
    """``silu(x) * y``, or ``silu(x[..., :d]) * x[..., d:]`` without ``y`` (upstream's helper).

    Args:
        x: the gate ``[*, d]`` (or ``[*, 2d]`` holding gate and up when ``y`` is None),
            fp16/bf16/fp32, any strides.
        y: the up projection, x's shape and dtype, or None.

    Returns:
        A new ``[*, d]`` tensor of x's dtype. Differentiable.

    Raises:
        TypeError: unsupported or mismatched dtypes.
        ValueError: shapes differ (no broadcasting), an odd last dim without ``y``, different devices.
        NotImplementedError: a CPU tensor outside Triton's interpreter mode.
    """
    if y is None:
        return silu_and_mul_fused(x)
    return silu_and_mul(x, y)


class GemsSiluAndMul(nn.Module):
    """Fused ``silu(x) * y`` (SwiGLU), out of place; no parameters."""

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Apply the gate.

        Args:
            x: gate ``[*, d]``; or, with ``y`` None, ``[*, 2d]`` = ``cat([gate, up], -1)``.
            y: up projection of x's shape and dtype, or None.

        Returns:
            A new ``[*, d]`` tensor of x's dtype. Differentiable in x and y.

        Raises:
            TypeError / ValueError / NotImplementedError: as :func:`gems_silu_and_mul`.
        """
        return gems_silu_and_mul(x, y)
