"""Rotary position embedding modules: ``GemsRope`` (standard RoPE) and ``GemsDeepseekYarnRoPE`` (DeepSeek's YaRN).

Both hold half tables ``cos_cached`` / ``sin_cached`` of shape ``[max_position_embeddings,
rotary_dim / 2]`` (non-persistent buffers, so they follow ``.to()`` and stay out of the
state dict) and rotate q and k in one launch of flag_gems' RoPE kernel through
:func:`flag_gems.apply_rotary_pos_emb`: q ``(*, Hq, D)``, k ``(*, Hk, D)``, ``position_ids (*)``
(or none for ``[B, S, H, D]`` inputs, row = s), rotate-half by default, GPT-J pairs with
``rotary_interleaved=True``, dims past ``rotary_dim`` copied unchanged, in place or not,
differentiable. Constructor arguments and ``forward(query, key, position_ids=None, inplace=False)``
are upstream FlagGems' (``flag_gems.modules.rotary_embedding``).

Tables are computed as HF transformers and vLLM do (fp32 inverse frequencies, fp32 angles),
so the modules reproduce their numerics, and are stored in ``dtype`` (fp32 by default: with
bf16 activations the kernel still rotates with fp32 tables).

YaRN (``GemsDeepseekYarnRoPE``), as DeepSeek-V2/V3 define it: with ``r = rotary_dim`` and
``f = scaling_factor``, each frequency ``base^(-2i/r)`` blends between itself
(extrapolation, high frequencies) and itself divided by ``f`` (interpolation, low
frequencies) along a linear ramp between the dims where a wavelength fits ``beta_fast`` and
``beta_slow`` times into ``original_max_position_embeddings``; cos and sin are scaled by
``yarn_get_mscale(f, mscale) / yarn_get_mscale(f, mscale_all_dim)`` (1.0 for DeepSeek-V3's
released config, whose attention applies ``yarn_get_mscale(f, mscale_all_dim)^2`` to the
softmax scale instead). One difference from transformers: with ``mscale_all_dim=0`` and
``mscale != 1`` this uses DeepSeek's formula, transformers ``0.1 ln f + 1``.

DeepSeek-V3 checkpoints lay the rotary dims out in interleaved pairs: use
``rotary_interleaved=True``. The output keeps the pair layout (vLLM's ``is_neox_style=False``);
transformers' ``apply_rotary_pos_emb_interleave`` returns the same values with the evens
first and the odds after. Attention scores ``q . k`` are the same either way.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..lowerings.rotary_embedding import apply_rotary_pos_emb

__all__ = [
    "GemsDeepseekYarnRoPE",
    "GemsRope",
    "gems_rope_forward",
    "yarn_find_correction_dim",
    "yarn_find_correction_range",
    "yarn_get_mscale",
    "yarn_linear_ramp_mask",
]


def gems_rope_forward(
    query: Tensor,
    key: Tensor,
    cos: Tensor,
    sin: Tensor,
    position_ids: Tensor | None = None,
    rotary_interleaved: bool = False,
    inplace: bool = False,
) -> tuple[Tensor, Tensor]:
    """Rotate query and key with half tables (upstream's helper; :func:`flag_gems.apply_rotary_pos_emb`).

    Args:
        query: ``(*, Hq, D)`` fp16/bf16/fp32.
        key: ``(*, Hk, D)``, query's dtype and token dims.
        cos, sin: ``[max_pos, r/2]`` half tables, ``r <= D``.
        position_ids: ``(*)`` integer table rows, or None for ``[B, S, H, D]`` inputs (row = s).
        rotary_interleaved: GPT-J pairs ``(x[2i], x[2i+1])`` instead of rotate-half.
        inplace: write into query and key and return them.

    Returns:
        ``(query_embed, key_embed)``.

    Raises:
        TypeError / ValueError / NotImplementedError: from the op (dtype, shape, device).
    """
    return apply_rotary_pos_emb(query, key, cos, sin, position_ids, rotary_interleaved, inplace)


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")


class GemsRope(nn.Module):
    """Standard rotary position embedding (RoPE) of query and key, one kernel launch.

    Args:
        rotary_dim: dims of each head that rotate (even; the head dim or less: partial rotary).
        max_position_embeddings: table rows; positions must be below it.
        base: frequency base (``rope_theta``): frequency ``i`` is ``base^(-2i/rotary_dim)``.
        rotary_interleaved: rotate GPT-J pairs ``(x[2i], x[2i+1])`` instead of halves.
        dtype: of the tables (fp32 default; fp32 tables with bf16 q are fine).
        device: of the tables.

    Raises:
        ValueError: ``rotary_dim`` not a positive even int, ``max_position_embeddings`` not a
            positive int, ``base`` not a positive number other than 1.
    """

    def __init__(
        self,
        rotary_dim: int,
        max_position_embeddings: int = 2048,
        base: float = 10000.0,
        rotary_interleaved: bool = False,
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int) or rotary_dim <= 0 or rotary_dim % 2:
            raise ValueError(f"rotary_dim: expected a positive even int, got {rotary_dim!r}")
        if (
            isinstance(max_position_embeddings, bool)
            or not isinstance(max_position_embeddings, int)
            or max_position_embeddings <= 0
        ):
            raise ValueError(f"max_position_embeddings: expected a positive int, got {max_position_embeddings!r}")
        _check_positive("base", base)
        if base == 1:
            raise ValueError("base: expected a number other than 1 (every frequency would be 1)")
        self.rotary_dim = rotary_dim
        self.max_position_embeddings = max_position_embeddings
        self.base = base
        self.rotary_interleaved = rotary_interleaved
        self.dtype = dtype
        self.device = device
        self._set_cos_sin_cache()

    def _pos_freqs(self) -> Tensor:
        """``base^(2i/rotary_dim)``, ``[rotary_dim / 2]`` fp32 (the wavelengths over 2 pi)."""
        exponent = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=self.device) / self.rotary_dim
        return self.base**exponent

    def _compute_inv_freq(self) -> Tensor:
        """Inverse frequencies ``base^(-2i/rotary_dim)``, ``[rotary_dim / 2]`` fp32."""
        return 1.0 / self._pos_freqs()

    def _attention_scaling(self) -> float:
        """Factor applied to cos and sin (1.0 for plain RoPE)."""
        return 1.0

    def _set_cos_sin_cache(self) -> None:
        """(Re)compute ``cos_cached`` / ``sin_cached``: ``[max_position_embeddings, rotary_dim / 2]``."""
        inv_freq = self._compute_inv_freq()
        positions = torch.arange(self.max_position_embeddings, dtype=torch.float32, device=inv_freq.device)
        angles = torch.outer(positions, inv_freq)  # fp32, as HF and vLLM compute them
        scale = self._attention_scaling()
        self.register_buffer("cos_cached", (angles.cos() * scale).to(self.dtype), persistent=False)
        self.register_buffer("sin_cached", (angles.sin() * scale).to(self.dtype), persistent=False)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        position_ids: Tensor | None = None,
        inplace: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Rotate query and key by their positions.

        Args:
            query: ``(*, Hq, D)`` fp16/bf16/fp32, ``D >= rotary_dim``, any strides.
            key: ``(*, Hk, D)``, query's dtype and token dims (GQA head counts may differ).
            position_ids: ``(*)`` int32/int64 positions below ``max_position_embeddings``;
                None for ``[B, S, H, D]`` inputs (positions ``0 .. S-1``).
            inplace: write into query and key and return them.

        Returns:
            ``(query_embed, key_embed)``: new tensors, or query and key when ``inplace``.
            Differentiable in query and key.

        Raises:
            TypeError / ValueError: dtypes, shapes (head dim below ``rotary_dim``), more than
                ``max_position_embeddings`` positions without ``position_ids``.
            IndexError / ValueError: a position out of range, when positions are on the CPU
                (on a GPU they are not read back: such tokens come out NaN).
            NotImplementedError: a CPU tensor outside Triton's interpreter mode.
        """
        if not isinstance(query, Tensor):
            raise TypeError(f"query: expected a torch.Tensor, got {type(query).__name__}")
        if query.dim() >= 1 and query.shape[-1] < self.rotary_dim:
            raise ValueError(f"query: head dim {query.shape[-1]} is below rotary_dim {self.rotary_dim}")
        if position_ids is None and query.dim() == 4 and query.shape[1] > self.max_position_embeddings:
            raise ValueError(
                f"query: {query.shape[1]} positions (dim 1 of [B, S, H, D]) exceed max_position_embeddings "
                f"{self.max_position_embeddings}"
            )
        return gems_rope_forward(
            query, key, self.cos_cached, self.sin_cached, position_ids, self.rotary_interleaved, inplace
        )

    def extra_repr(self) -> str:
        return (
            f"rotary_dim={self.rotary_dim}, max_position_embeddings={self.max_position_embeddings}, "
            f"base={self.base}, rotary_interleaved={self.rotary_interleaved}"
        )


# ------------------------------------------------------------------ YaRN (DeepSeek)


def yarn_find_correction_dim(
    num_rotations: float, dim: int, base: float = 10000, max_position_embeddings: int = 2048
) -> float:
    """The (fractional) rotary dim whose wavelength fits ``num_rotations`` times into the context.

    Args:
        num_rotations: full turns over ``max_position_embeddings`` positions.
        dim: the rotary dim.
        base: frequency base.
        max_position_embeddings: the original (pretraining) context length.

    Returns:
        ``dim * ln(max_pos / (2 pi num_rotations)) / (2 ln base)``.
    """
    return dim * math.log(max_position_embeddings / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_find_correction_range(
    low_rot: float, high_rot: float, dim: int, base: float = 10000, max_position_embeddings: int = 2048
) -> tuple[int, int]:
    """The ramp's integer bounds: dims below ``low`` extrapolate, above ``high`` interpolate.

    Args:
        low_rot, high_rot: ``beta_fast`` and ``beta_slow``.
        dim, base, max_position_embeddings: as :func:`yarn_find_correction_dim`.

    Returns:
        ``(low, high)``: floor and ceil of the two correction dims, clamped to ``[0, dim - 1]``.
    """
    low = math.floor(yarn_find_correction_dim(low_rot, dim, base, max_position_embeddings))
    high = math.ceil(yarn_find_correction_dim(high_rot, dim, base, max_position_embeddings))
    return max(low, 0), min(high, dim - 1)


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction ``0.1 * mscale * ln(scale) + 1`` (1.0 when ``scale <= 1``).

    Args:
        scale: the context scaling factor.
        mscale: its coefficient.

    Returns:
        The factor, a float.
    """
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_linear_ramp_mask(low: float, high: float, dim: int) -> Tensor:
    """``clamp((i - low) / (high - low), 0, 1)`` for ``i`` in ``0 .. dim-1``, fp32 (``high == low`` is nudged).

    Args:
        low, high: the ramp's bounds.
        dim: the number of entries (half the rotary dim).

    Returns:
        A ``[dim]`` fp32 tensor on the CPU.
    """
    if low == high:
        high += 0.001  # a step, not a division by zero
    return torch.clamp((torch.arange(dim, dtype=torch.float32) - low) / (high - low), 0, 1)


class GemsDeepseekYarnRoPE(GemsRope):
    """Rotary embedding with DeepSeek's YaRN context extension (DeepSeek-V2/V3, ``rope_scaling.type == "yarn"``).

    Args:
        rotary_dim, max_position_embeddings, base, rotary_interleaved, dtype, device: as
            :class:`GemsRope` (DeepSeek-V3: ``rotary_dim = qk_rope_head_dim = 64``,
            ``rotary_interleaved=True``).
        scaling_factor: YaRN's ``factor``, the context extension (40 for DeepSeek-V3).
        original_max_position_embeddings: the pretraining context length (4096).
        beta_fast: turns over that context above which a frequency is kept (32).
        beta_slow: turns below which a frequency is fully interpolated (1).
        mscale: coefficient of the cos/sin magnitude correction's numerator.
        mscale_all_dim: coefficient of its denominator (0: no division).

    Raises:
        ValueError: as :class:`GemsRope`, and a non-positive ``scaling_factor``,
            ``original_max_position_embeddings``, ``beta_fast`` or ``beta_slow``.
    """

    def __init__(
        self,
        rotary_dim: int,
        max_position_embeddings: int = 2048,
        base: float = 10000,
        rotary_interleaved: bool = False,
        dtype: torch.dtype = torch.float32,
        device=None,
        scaling_factor: float = 1.0,
        original_max_position_embeddings: int = 4096,
        beta_fast: float = 32.0,
        beta_slow: float = 1.0,
        mscale: float = 1.0,
        mscale_all_dim: float = 0.0,
    ):
        for name, value in (
            ("scaling_factor", scaling_factor),
            ("original_max_position_embeddings", original_max_position_embeddings),
            ("beta_fast", beta_fast),
            ("beta_slow", beta_slow),
        ):
            _check_positive(name, value)
        self.scaling_factor = scaling_factor
        self.original_max_position_embeddings = original_max_position_embeddings
        self.beta_fast = beta_fast
        self.beta_slow = beta_slow
        self.mscale = mscale
        self.mscale_all_dim = mscale_all_dim
        super().__init__(rotary_dim, max_position_embeddings, base, rotary_interleaved, dtype, device)

    def _compute_inv_freq(self) -> Tensor:
        """YaRN's blend of extrapolated (``freq``) and interpolated (``freq / scaling_factor``) frequencies."""
        pos_freqs = self._pos_freqs()
        extrapolated = 1.0 / pos_freqs
        interpolated = 1.0 / (self.scaling_factor * pos_freqs)
        low, high = yarn_find_correction_range(
            self.beta_fast, self.beta_slow, self.rotary_dim, self.base, self.original_max_position_embeddings
        )
        # 1 where a dim keeps its frequency (below the ramp), 0 where it is fully interpolated.
        keep = 1.0 - yarn_linear_ramp_mask(low, high, self.rotary_dim // 2).to(extrapolated.device)
        return interpolated * (1.0 - keep) + extrapolated * keep

    def _attention_scaling(self) -> float:
        return float(
            yarn_get_mscale(self.scaling_factor, self.mscale) / yarn_get_mscale(self.scaling_factor, self.mscale_all_dim)
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, scaling_factor={self.scaling_factor}, "
            f"original_max_position_embeddings={self.original_max_position_embeddings}, beta_fast={self.beta_fast}, "
            f"beta_slow={self.beta_slow}, mscale={self.mscale}, mscale_all_dim={self.mscale_all_dim}"
        )
