"""Graph passes of the flag_gems backend, one module per pattern family.

Each fusion pass is a function ``(gm, report) -> int`` that rewrites matches in place
and records them in the report. ``FUSION_PASSES`` lists them in the order they run:
RMSNorm first (it consumes residual adds), then the activations, then rotary embedding.
"""

from __future__ import annotations

from .rms_norm import fuse_rms_norm

FUSION_PASSES = {"rms_norm": fuse_rms_norm}

try:  # written in parallel; present once their families land
    from .act_and_mul import fuse_act_and_mul

    FUSION_PASSES["act_and_mul"] = fuse_act_and_mul
except ImportError:  # pragma: no cover
    pass
try:
    from .rotary_embedding import fuse_rotary_embedding

    FUSION_PASSES["rotary_embedding"] = fuse_rotary_embedding
except ImportError:  # pragma: no cover
    pass

__all__ = ["FUSION_PASSES"]
