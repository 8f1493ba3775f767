"""The op layer: where a Triton kernel becomes a ``torch.ops.flag_gems`` op.

Each module defines, for one op family, the ``torch.library`` ops (implementation,
fake/meta implementation, autograd formula) and the public Python function with the
upstream FlagGems signature.

Why ``torch.library.custom_op`` rather than ``triton_op``: our ops are opaque units to
both consumers (the compile backend replaces whole patterns by them; the eager mode
calls them), the host launchers do shape-dependent Python work (stride analysis, block
heuristics, copies for unviewable layouts) that ``triton_op`` would have to trace, and
the same registration must also run on CPU tensors through Triton's interpreter in CI.
``custom_op`` gives schema, fake tensor, autograd and AOT support with none of that.
"""

from . import act_and_mul, add, fused_rms_norm, indexing, layer_norm, linear_group, matmul, pointwise, reduction, registry, rms_norm, rotary_embedding  # noqa: F401  (registers the ops)
from . import attention  # noqa: F401  (registers scaled_dot_product_attention)
from . import loss  # noqa: F401  (registers nll_loss_forward / nll_loss_backward)
from . import cpp_ops, nonzero  # noqa: F401  (flag_gems::mm / bmm / cat / sum / nonzero: the C++ runtime's op list)
from . import inductor_ops  # noqa: F401  (torch.ops.flag_gems_inductor: the twins register on first look-up)
