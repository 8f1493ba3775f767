"""Graph passes of the flag_gems backend, one module per pattern family.

Each fusion pass is a function ``(gm, report) -> int`` that rewrites matches in place
and records them in the report. ``FUSION_PASSES`` lists them in the order they run:
RMSNorm first (it consumes residual adds), then the activations, then rotary embedding.

The pass modules are imported unconditionally: a pass that fails to import is an error at
``import flag_gems``, never a fusion that silently stops happening.
"""

from __future__ import annotations

from .act_and_mul import fuse_act_and_mul
from .rms_norm import fuse_rms_norm
from .rotary_embedding import fuse_rotary_embedding

FUSION_PASSES = {
    "rms_norm": fuse_rms_norm,
    "act_and_mul": fuse_act_and_mul,
    "rotary_embedding": fuse_rotary_embedding,
}

__all__ = ["FUSION_PASSES"]
