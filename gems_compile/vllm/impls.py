"""flag_gems kernels in vLLM's calling conventions: what :mod:`flag_gems.vllm.patches` installs.

Three conventions, one per way vLLM reaches a kernel:

* **IR providers** (``vllm.ir.ops.<op>.register_impl``): the exact signature of vLLM's
  native implementation (vLLM compares the inferred schemas, names and defaults), plus a
  ``supports_args`` twin that says per call whether our kernel takes the arguments; vLLM
  falls back to the next provider in its priority list when it does not.
* **``_C`` kernels** (``torch.library`` implementations of ``torch.ops._C.*`` on the CUDA
  key): vLLM's out= / in-place schemas, e.g. ``rms_norm(Tensor! result, Tensor input,
  Tensor? weight, float epsilon) -> ()``. They run under the dispatcher with real tensors,
  so they call the kernel launchers directly (no second dispatch).
* **CustomOp forwards** (``forward_cuda`` of vLLM's layer classes): built by a factory that
  keeps vLLM's original method and calls it for inputs our kernels do not take (a dtype
  or device outside fp16/bf16/fp32 on CUDA, RMSNorm's ``var_hidden_size``).

Numerics follow vLLM's native implementations: RMSNorm rounds the normalized value to the
weight's dtype before the weight multiply (``x.to(weight.dtype) * weight``), which is our
``round_before_weight`` when the weight has the input's dtype and no rounding with an fp32
weight (Gemma's ``weight.float() + 1``); the CUDA ``_C`` kernels round before the weight.
The activations and the rotation compute in fp32 and round once.

No ``from __future__ import annotations`` here: vLLM infers the providers' schemas from
their annotations, which must be real types.
"""

import logging

import torch
from torch import Tensor

from ..kernels._common import FLOAT_DTYPES, interpreter_mode
from ..kernels.act_and_mul import act_and_mul_fused_fwd
from ..kernels.rms_norm import rms_norm_fwd
from ..kernels.rotary_embedding import rope_cache_fwd
from ..lowerings.act_and_mul import gelu_and_mul_fused, silu_and_mul_fused
from ..lowerings.rms_norm import fused_add_rms_norm as _fused_add_rms_norm
from ..lowerings.rms_norm import rms_norm as _rms_norm
from ..lowerings.rotary_embedding import rotary_embedding_cache

logger = logging.getLogger(__name__)

F32 = torch.float32


def kernels_run_on(t) -> bool:
    """Whether our kernels can run on ``t``'s device and dtype (metadata only: safe on fake tensors)."""
    if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
        return False
    dev = t.device.type
    return dev == "cuda" or (dev == "cpu" and interpreter_mode())


def platform_supported() -> bool:
    """The static capability vLLM asks of a provider: a CUDA device, or Triton's CPU interpreter."""
    return torch.cuda.is_available() or interpreter_mode()


def weight_rounding(x, weight) -> bool | None:
    """``round_before_weight`` reproducing vLLM's ``x.to(weight.dtype) * weight``; None when
    our kernel cannot reproduce it (a weight of another half dtype, or a half weight on fp32 x)."""
    if weight is None:
        return False
    if weight.dtype == x.dtype:
        return x.dtype != F32
    if weight.dtype == F32:
        return False
    return None


# ----------------------------------------------------------------- IR providers


def ir_rms_norm_supports(x, weight, epsilon, variance_size=None) -> bool:
    """``supports_args`` of :func:`ir_rms_norm` (also called with fake tensors when vLLM lowers)."""
    return (
        variance_size is None
        and kernels_run_on(x)
        and (weight is None or (kernels_run_on(weight) and weight.device == x.device and weight.is_contiguous()))
        and weight_rounding(x, weight) is not None
    )


def ir_rms_norm(x: Tensor, weight: Tensor | None, epsilon: float, variance_size: int | None = None) -> Tensor:
    """vLLM IR ``rms_norm`` on flag_gems' RMSNorm kernel (a new tensor of x's shape and dtype)."""
    return _rms_norm(x, x.shape[-1], weight, epsilon, round_before_weight=weight_rounding(x, weight))


def ir_fused_add_rms_norm_supports(x, x_residual, weight, epsilon, variance_size=None) -> bool:
    """``supports_args`` of :func:`ir_fused_add_rms_norm`."""
    return (
        ir_rms_norm_supports(x, weight, epsilon, variance_size)
        and isinstance(x_residual, torch.Tensor)
        and x_residual.dtype == x.dtype
        and x_residual.device == x.device
    )


def ir_fused_add_rms_norm(
    x: Tensor, x_residual: Tensor, weight: Tensor | None, epsilon: float, variance_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """vLLM IR ``fused_add_rms_norm`` in place (registered ``inplace=True``): ``x <- y``, ``x_residual <- x + x_residual``."""
    return _fused_add_rms_norm(x, x_residual, x.shape[-1], weight, epsilon,
                               round_before_weight=weight_rounding(x, weight))


IR_PROVIDERS = {
    # op name -> (implementation, supports_args, inplace)
    "rms_norm": (ir_rms_norm, ir_rms_norm_supports, False),
    "fused_add_rms_norm": (ir_fused_add_rms_norm, ir_fused_add_rms_norm_supports, True),
}


# ----------------------------------------------------------------- _C kernels


def c_rms_norm(result, input, weight, epsilon) -> None:
    """``_C::rms_norm(Tensor! result, Tensor input, Tensor? weight, float epsilon)``."""
    rms_norm_fwd(input, weight, epsilon, round_before_weight=True, out=result)


def c_fused_add_rms_norm(input, residual, weight, epsilon) -> None:
    """``_C::fused_add_rms_norm(Tensor! input, Tensor! residual, Tensor? weight, float epsilon)``."""
    rms_norm_fwd(input, weight, epsilon, residual=residual, round_before_weight=True, out=input,
                 residual_out=residual)


def c_silu_and_mul(result, input) -> None:
    """``_C::silu_and_mul(Tensor! result, Tensor input)``."""
    act_and_mul_fused_fwd(input, "silu", out=result)


def c_gelu_and_mul(result, input) -> None:
    """``_C::gelu_and_mul(Tensor! result, Tensor input)`` (erf GELU)."""
    act_and_mul_fused_fwd(input, "gelu", "none", out=result)


def c_gelu_tanh_and_mul(result, input) -> None:
    """``_C::gelu_tanh_and_mul(Tensor! result, Tensor input)``."""
    act_and_mul_fused_fwd(input, "gelu", "tanh", out=result)


def _heads(t, n_token_dims: int, head_size: int):
    # vLLM passes (*tokens, H * D) or (*tokens, H, D); splitting the last dim is always a view.
    return t if t.dim() == n_token_dims + 2 else t.view(*t.shape[:n_token_dims], -1, head_size)


def c_rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox, rope_dim_offset=0,
                       inverse=False) -> None:
    """``_C::rotary_embedding(Tensor positions, Tensor! query, Tensor!? key, int head_size,
    Tensor cos_sin_cache, bool is_neox, int rope_dim_offset=0, bool inverse=False)``, in place.

    ``rope_dim_offset`` rotates dims ``[offset, offset + rotary_dim)`` of each head (DeepSeek-V4's
    rope on the last dims): the kernel runs on that strided view of the heads.
    """
    if rope_dim_offset:
        nd, rot = positions.dim(), cos_sin_cache.shape[1]
        q = _heads(query, nd, head_size)[..., rope_dim_offset:rope_dim_offset + rot]
        k = None if key is None else _heads(key, nd, head_size)[..., rope_dim_offset:rope_dim_offset + rot]
        rope_cache_fwd(positions, q, k, rot, cos_sin_cache, is_neox, inverse=inverse, query_out=q, key_out=k)
        return
    rope_cache_fwd(positions, query, key, head_size, cos_sin_cache, is_neox, inverse=inverse, query_out=query,
                   key_out=key)


C_KERNELS = {
    # _C op name -> (implementation, the schema's leading arguments as (name, type) pairs)
    "rms_norm": (c_rms_norm, (("result", "Tensor"), ("input", "Tensor"), ("weight", "Tensor?"), ("epsilon", "float"))),
    "fused_add_rms_norm": (
        c_fused_add_rms_norm,
        (("input", "Tensor"), ("residual", "Tensor"), ("weight", "Tensor?"), ("epsilon", "float")),
    ),
    "silu_and_mul": (c_silu_and_mul, (("result", "Tensor"), ("input", "Tensor"))),
    "gelu_and_mul": (c_gelu_and_mul, (("result", "Tensor"), ("input", "Tensor"))),
    "gelu_tanh_and_mul": (c_gelu_tanh_and_mul, (("result", "Tensor"), ("input", "Tensor"))),
    "rotary_embedding": (
        c_rotary_embedding,
        (("positions", "Tensor"), ("query", "Tensor"), ("key", "Tensor?"), ("head_size", "int"),
         ("cos_sin_cache", "Tensor"), ("is_neox", "bool")),
    ),
}


# ----------------------------------------------------------------- CustomOp forwards


def _weight_of(layer):
    # RMSNorm keeps a ones tensor (not a Parameter) when has_weight is False.
    if not getattr(layer, "has_weight", True):
        return None
    w = getattr(layer, "weight", None)
    return w.data if isinstance(w, torch.nn.Parameter) else w


def make_rms_norm_forward(original):
    """``RMSNorm.forward_cuda`` on our kernels; vLLM's method for what they do not take."""

    def forward_cuda(self, x, residual=None):
        weight = _weight_of(self)
        rb = weight_rounding(x, weight) if kernels_run_on(x) else None
        if getattr(self, "variance_size_override", None) is not None or rb is None or (
            residual is not None and (residual.dtype != x.dtype or residual.device != x.device)
        ):
            return original(self, x, residual)
        if residual is None:
            return _rms_norm(x, x.shape[-1], weight, self.variance_epsilon, round_before_weight=rb)
        return _fused_add_rms_norm(x, residual, x.shape[-1], weight, self.variance_epsilon, round_before_weight=rb)

    forward_cuda.__qualname__ = "gems_rms_norm_forward_cuda"
    return forward_cuda


def make_silu_and_mul_forward(original):
    """``SiluAndMul.forward_cuda`` on ``flag_gems.silu_and_mul_fused``."""

    def forward_cuda(self, x):
        if not kernels_run_on(x) or x.dim() < 1 or x.shape[-1] % 2:
            return original(self, x)
        return silu_and_mul_fused(x)

    forward_cuda.__qualname__ = "gems_silu_and_mul_forward_cuda"
    return forward_cuda


def make_gelu_and_mul_forward(original):
    """``GeluAndMul.forward_cuda`` on ``flag_gems.gelu_and_mul_fused`` (erf and tanh GELU)."""

    def forward_cuda(self, x):
        approximate = getattr(self, "approximate", "none")
        if not kernels_run_on(x) or x.dim() < 1 or x.shape[-1] % 2 or approximate not in ("none", "tanh"):
            return original(self, x)
        return gelu_and_mul_fused(x, approximate)

    forward_cuda.__qualname__ = "gems_gelu_and_mul_forward_cuda"
    return forward_cuda


def _rope_cache(layer, query):
    cache = layer.cos_sin_cache
    match = getattr(layer, "_match_cos_sin_cache_dtype", None)  # vLLM's own move / cast, cached on the layer
    if match is not None:
        return match(query)
    return cache if cache.device == query.device else cache.to(query.device)


def _rope_ok(positions, query, key) -> bool:
    return (
        kernels_run_on(query)
        and (key is None or (key.dtype == query.dtype and key.device == query.device))
        and isinstance(positions, torch.Tensor)
        and positions.dtype in (torch.int32, torch.int64)
        and positions.device == query.device
    )


def make_rotary_embedding_forward(original):
    """``RotaryEmbedding.forward_cuda``: in place on query and key, as vLLM's CUDA op
    (neox or GPT-J pairs, partial ``rotary_dim``: the cache has ``rotary_dim`` columns)."""

    def forward_cuda(self, positions, query, key=None):
        if not _rope_ok(positions, query, key):
            return original(self, positions, query, key)
        cache = _rope_cache(self, query)
        return rotary_embedding_cache(positions, query, key, self.head_size, cache, self.is_neox_style, inplace=True)

    forward_cuda.__qualname__ = "gems_rope_forward_cuda"
    return forward_cuda


def make_deepseek_scaling_rope_forward(original):
    """``DeepseekScalingRotaryEmbedding.forward_cuda``: YaRN tables (``cos * mscale``, ``sin * mscale``
    in the layer's cache) through the same rotary kernel, out of place like vLLM's native path;
    query / key ``[tokens, heads, head_size]``, the first ``rotary_dim`` dims rotating."""

    def forward_cuda(self, positions, query, key=None, offsets=None):
        if not _rope_ok(positions, query, key) or query.dim() != positions.dim() + 2:
            return original(self, positions, query, key, offsets)
        if offsets is not None:
            positions = positions + offsets
        cache = self.cos_sin_cache
        if cache.device != query.device:
            cache = cache.to(query.device)
        return rotary_embedding_cache(positions, query, key, query.shape[-1], cache, self.is_neox_style)

    forward_cuda.__qualname__ = "gems_deepseek_rope_forward_cuda"
    return forward_cuda
