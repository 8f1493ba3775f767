"""The fusion passes as an Inductor post-grad custom pass.

Inductor users keep Inductor and add our fused kernels::

    torch.compile(model, options={"post_grad_custom_post_pass": flag_gems.inductor_pass})

or set ``torch._inductor.config.post_grad_custom_post_pass = flag_gems.inductor_pass``.
The pass runs the same matchers as the ``flag_gems`` backend on Inductor's post-grad
graphs (functional aten with ``prims.convert_element_type`` casts) and leaves the rest to
Inductor's own lowering and codegen. ``uuid()`` is stable across processes (derived from
the package version and the fusion list), so Inductor's FX graph cache stays valid.

In training graphs the forward's intermediates are saved for the backward, so a matched
norm is still computed for its saved values; the pass pays off in inference graphs.
The ``flag_gems`` backend's ``options={"inductor": True}`` instead fuses *before* autograd
and hands the rewritten graph to Inductor, which does use the fused backward kernels.
"""

from __future__ import annotations

import hashlib
import logging

from torch import fx

from .options import FUSIONS
from .passes import FUSION_PASSES
from .report import GraphReport

logger = logging.getLogger(__name__)

try:
    from torch._inductor.custom_graph_pass import CustomGraphPass
except ImportError:  # pragma: no cover - very old torch
    CustomGraphPass = object


class GemsFusionPass(CustomGraphPass):
    """Inductor post-grad pass running flag_gems' pattern fusions.

    Args:
        fusions: the pattern families to run (default: all).

    Attributes:
        reports: one :class:`~flag_gems.report.GraphReport` per graph the pass saw.
    """

    def __init__(self, fusions=FUSIONS):
        self.fusions = tuple(fusions)
        self.reports: list = []

    def __call__(self, graph: fx.Graph) -> None:
        gm = graph.owning_module
        report = GraphReport(len(self.reports), kind="inductor post-grad")
        self.reports.append(report)
        for name in self.fusions:
            fn = FUSION_PASSES.get(name)
            if fn is not None:
                fn(gm, report)
        logger.info("flag_gems inductor pass: %s", dict(report.fused) or "nothing fused")

    def uuid(self) -> str:
        from . import __version__

        return hashlib.sha256(f"flag_gems:{__version__}:{','.join(self.fusions)}".encode()).hexdigest()


inductor_pass = GemsFusionPass()
