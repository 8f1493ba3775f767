"""``flag_gems.modules``: ``torch.nn`` modules for LLM layers built on flag_gems' fused kernels.

The modules FlagGems documents ("Build custom models using FlagGems operators"), with
upstream's constructor arguments and forward signatures:

==========================  ===================================================  ======================
module                      what                                                 forms
==========================  ===================================================  ======================
``GemsRMSNorm``             RMSNorm, optionally of ``x + residual`` (fused)      in place and out of place
``GemsRope``                standard rotary position embedding of q and k        in place and out of place
``GemsDeepseekYarnRoPE``    RoPE with DeepSeek's YaRN context extension          in place and out of place
``GemsSiluAndMul``          ``silu(x) * y`` (SwiGLU)                             out of place
==========================  ===================================================  ======================

Each is differentiable and works in ``torch.compile(fullgraph=True)``.
"""

from .activation import GemsSiluAndMul
from .normalization import GemsRMSNorm
from .rotary_embedding import GemsDeepseekYarnRoPE, GemsRope

__all__ = ["GemsDeepseekYarnRoPE", "GemsRMSNorm", "GemsRope", "GemsSiluAndMul"]
