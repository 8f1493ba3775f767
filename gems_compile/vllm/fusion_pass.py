"""``flag_gems.vllm_pass``: flag_gems' fusions inside vLLM's compiler (mode 3, ``VLLM_COMPILE``).

vLLM compiles each piece of the model with Inductor and runs its ``PostGradPassManager``
as Inductor's post-grad custom pass; the manager runs the passes it is given, then its own
cleanup, the lowering of the IR ops that are left, and the de-functionalization. This pass
is one of those: per graph it

1. rewrites vLLM's own kernel calls (IR ops, functionalized ``_C`` ops) into flag_gems ops
   (:mod:`flag_gems.vllm.op_forms`);
2. respells two of Inductor's decompositions (SiLU, ``stack``) into what the matchers read
   (:mod:`flag_gems.passes.canonicalize`; restored where nothing was fused);
3. runs flag_gems' pattern fusions on the decomposed native math (the same matchers as the
   ``flag_gems`` backend and ``flag_gems.inductor_pass``): residual add + RMSNorm,
   SiLU/GELU·mul, rotary embedding of q and k.

Install it with ``compilation_config={"inductor_passes": {"post_grad_custom_post_pass":
"flag_gems.vllm_pass"}}`` (or ``inductor_compile_config={"post_grad_custom_post_pass":
flag_gems.vllm_pass}``), or let the plugin do it (``GEMS_VLLM=pass``). ``uuid()`` hashes the
sources of every module the rewrite depends on, so vLLM's and Inductor's caches see a
changed pass as a changed compilation. What it did: ``flag_gems.vllm_pass.report()`` (a
:class:`~flag_gems.report.CompileReport`, printable like ``flag_gems.explain``), one INFO
line per graph, and with ``GEMS_DUMP_DIR`` set, per graph the code before and after and the
report in ``$GEMS_DUMP_DIR/vllm_pass_pid<pid>/``.

Without vLLM installed the pass is a plain Inductor ``CustomGraphPass``
(``torch.compile(m, options={"post_grad_custom_post_pass": flag_gems.vllm_pass})``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import itertools
import logging
import os
import sys
import threading

from torch import fx

from ..options import FUSIONS
from ..passes import fuse_post_grad
from ..report import CompileReport, GraphReport, dump_graph, dump_report
from .op_forms import rewrite_vllm_ops

logger = logging.getLogger(__name__)

_MARK = "_flag_gems_vllm_pass_done"


def _pass_base():
    """vLLM's ``InductorPass`` when vLLM is installed (its pass manager only takes those),
    else Inductor's ``CustomGraphPass``."""
    if importlib.util.find_spec("vllm") is not None:
        for module in ("vllm.compilation.passes.inductor_pass", "vllm.compilation.inductor_pass"):
            try:
                return importlib.import_module(module).InductorPass
            except Exception:  # noqa: BLE001 - a vLLM that does not import is no vLLM here
                continue
    from torch._inductor.custom_graph_pass import CustomGraphPass

    return CustomGraphPass


def _source_modules():
    """The modules whose code decides what the pass rewrites (hashed into ``uuid()``)."""
    from .. import passes, report
    from ..passes import canonicalize, matching
    from . import impls, op_forms

    mods = [sys.modules[__name__], canonicalize, impls, op_forms, matching, report]
    pkg = os.path.dirname(passes.__file__)
    for name in sorted(os.listdir(pkg)):
        if name.endswith(".py"):
            mod = sys.modules.get(f"{passes.__name__}.{name[:-3]}")
            if mod is not None:
                mods.append(mod)
    return mods


class GemsVllmPass(_pass_base()):
    """The post-grad pass behind ``flag_gems.vllm_pass`` (see the module docstring).

    Args:
        fusions: the generic pattern families to run (default: all of ``FUSIONS``).
        vllm_ops: rewrite vLLM's IR and ``_C`` op calls too.
        strict: raise when a rewrite fails instead of leaving the graph to Inductor with a
            warning (tests use it).
        dump_dir: where to write per-graph dumps (default: ``GEMS_DUMP_DIR``).
        inline_kernels: turn the fused ops into the Triton kernel nodes Inductor launches from its
            own code (:func:`flag_gems.inductor.inline_triton_kernels`, as ``flag_gems.inductor_pass``
            does) instead of opaque custom-op calls. Off by default until measured inside vLLM's
            piecewise compile (``benchmarks/bench_vllm.py``, contender ``flag_gems_pass_inline``);
            ``GEMS_VLLM_INLINE=1`` turns it on for ``flag_gems.vllm_pass``.
    """

    def __init__(self, fusions=FUSIONS, vllm_ops: bool = True, strict: bool = False, dump_dir: str | None = None,
                 inline_kernels: bool | None = None):
        self.fusions = tuple(fusions)
        self.vllm_ops = vllm_ops
        self.strict = strict
        self.dump_dir = dump_dir
        if inline_kernels is None:
            inline_kernels = os.environ.get("GEMS_VLLM_INLINE", "0").strip().lower() in ("1", "true", "on", "yes")
        self.inline_kernels = bool(inline_kernels)
        self._init_state()

    def _init_state(self):
        self.reports: list = []
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._warned: set = set()

    # pickled with vLLM's config into worker processes: settings travel, reports do not
    def __getstate__(self):
        return {"fusions": self.fusions, "vllm_ops": self.vllm_ops, "strict": self.strict, "dump_dir": self.dump_dir,
                "inline_kernels": self.inline_kernels}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_state()

    def _dump_root(self):
        root = self.dump_dir or os.environ.get("GEMS_DUMP_DIR") or None
        return os.path.join(root, f"vllm_pass_pid{os.getpid()}") if root else None

    def __call__(self, graph: fx.Graph) -> None:
        if getattr(graph, _MARK, False):  # installed twice (plugin and config): one run
            return
        gm = graph.owning_module
        with self._lock:
            report = GraphReport(next(self._ids), kind="vllm post-grad")
            self.reports.append(report)
        dump = self._dump_root()
        if dump:
            dump_graph(dump, report.graph_id, "before", gm)
        try:
            if self.vllm_ops:
                rewrite_vllm_ops(gm, report)
            fuse_post_grad(gm, report, self.fusions)
            if self.inline_kernels:
                from ..inductor import inline_triton_kernels

                inline_triton_kernels(gm, report)
            graph.lint()
        except Exception as e:
            if self.strict:
                raise
            report.fallback = f"{type(e).__name__}: {e}"
            key = f"{type(e).__name__}: {e}"
            if key not in self._warned:
                self._warned.add(key)
                logger.warning("flag_gems vllm_pass: a rewrite failed (%s); the graph goes on to Inductor as it is now",
                               report.fallback)
            graph.lint()  # a graph Inductor cannot compile must fail here, not later
        setattr(graph, _MARK, True)
        if dump:
            dump_graph(dump, report.graph_id, "after", gm)
            dump_report(dump, report)
        logger.info("flag_gems vllm_pass: graph %d: %s", report.graph_id, dict(report.fused) or "nothing fused")

    def uuid(self) -> str:
        """A hash of the pass's settings and of the sources of every module that decides its rewrites."""
        from .. import __version__

        h = hashlib.sha256(f"flag_gems.vllm_pass:{__version__}:{self.fusions}:{self.vllm_ops}".encode())
        for mod in _source_modules():
            path = getattr(mod, "__file__", None)
            if path and os.path.exists(path):
                with open(path, "rb") as f:
                    h.update(f.read())
        if self.inline_kernels:  # the kernels' source goes into Inductor's code
            from ..inductor import source_digest

            h.update(f"inline:{source_digest()}".encode())
        return h.hexdigest()

    def is_applicable_for_range(self, compile_range) -> bool:
        """vLLM asks per compile range (batch sizes); the rewrites hold for all."""
        return True

    def report(self) -> CompileReport:
        """What the pass did to each graph it saw in this process."""
        with self._lock:
            return CompileReport(list(self.reports))

    def reset(self) -> None:
        """Forget the reports."""
        with self._lock:
            self.reports.clear()


vllm_pass = GemsVllmPass()
