"""Graph passes of the flag_gems backend, one module per pattern family.

Each fusion pass is a function ``(gm, report) -> int`` that rewrites matches in place
and records them in the report. ``FUSION_PASSES`` lists them in the order they run:
RMSNorm first (it consumes residual adds), then the activations, then rotary embedding.

The pass modules are imported unconditionally: a pass that fails to import is an error at
``import flag_gems``, never a fusion that silently stops happening.
"""

from __future__ import annotations

from .act_and_mul import fuse_act_and_mul
from .linear_group import group_linears
from .rms_norm import fuse_rms_norm
from .rotary_embedding import fuse_rotary_embedding

FUSION_PASSES = {
    "rms_norm": fuse_rms_norm,
    "act_and_mul": fuse_act_and_mul,
    "rotary_embedding": fuse_rotary_embedding,
}

# Passes an option turns on (off by default), each ``(gm, example_inputs, report) -> int``: they
# act on the model's parameters, so they take the graph's real inputs. They run after the fusions.
OPTION_PASSES = {
    "fuse_linear": group_linears,  # options={"fuse_linear": True}: stacks the grouped weights in place
}



def fuse_post_grad(gm, report, fusions) -> None:
    """Run the pattern fusions ``fusions`` on an Inductor post-grad graph (``flag_gems.inductor_pass``,
    ``flag_gems.vllm_pass``): Inductor's decompositions the matchers do not read (SiLU, GELU,
    stack) are respelled first and put back after where nothing fused; the report notes both,
    and any fusion name this build does not have."""
    from .canonicalize import respell

    respelled = respell(gm)
    for name in fusions:
        fn = FUSION_PASSES.get(name)
        if fn is None:
            report.notes.append(f"fusion {name!r} is not available in this build")
            continue
        fn(gm, report)
    restored = respelled.restore()
    if respelled.count:
        report.notes.append(f"{respelled.count} decomposed op(s) respelled for the matchers, "
                            f"{restored} unfused one(s) restored")


__all__ = ["FUSION_PASSES", "OPTION_PASSES", "fuse_post_grad"]
