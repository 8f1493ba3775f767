"""What the backend did to each graph, and why: the data behind ``flag_gems.explain`` and the dumps.

A :class:`GraphReport` is filled by the passes while they run on one graph: each fusion
match, each aten node lowered to a kernel, each node left to PyTorch with its reason,
and a fallback of the whole graph when a pass failed. :class:`CompileReport` collects
the graphs of one compiled function and prints them as a table.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import os
import re
import time

from . import availability

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class GraphReport:
    """Decisions taken on one compiled graph.

    Attributes:
        graph_id: sequence number of the graph in this process.
        kind: ``"inference"``, ``"forward"`` or ``"backward"`` (or ``"dynamo"`` before AOT).
        fused: pattern name -> number of matches rewritten.
        lowered: ``"aten op -> kernel"`` -> count.
        kept: aten op -> {reason: count}: nodes left to PyTorch and why.
        fallback: set when the whole graph ran unmodified (the reason).
        notes: other per-graph remarks (one line each).
        generated: generated kernel name -> how many launches of it one call makes (the pointwise
            fusion pass's kernels; identical groups share a name).
        kernels: graph kind -> ``(before, after)``: CUDA kernels one call launches, counted from
            the graph's nodes before and after the post-autograd passes (pointwise fusion, aten
            lowering); see ``passes.pointwise_rules.native_kernels``.
        layers: decoder layers (repeated submodules of one module list) the graph holds, or None.
        timings: compile stage -> seconds of host time (``"pre-dispatch trace"``, ``"fusions"``,
            ``"AOT autograd"`` with the post-autograd stages inside it, ``"<kind> passes"``,
            ``"<kind> wrapper"``, and ``"<kind> first call"``: the compiled graph's first run,
            where its Triton kernels compile and, under ``autotune="on"``, tune).
        at_first_call: callables the compiled graph runs once, before its first run (a pass's
            side effects on the model that must wait until compiling is over: ``fuse_linear``'s
            weight stacking). Not part of the report's data.
    """

    graph_id: int
    kind: str = "dynamo"
    fused: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    lowered: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    kept: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(collections.Counter))
    fallback: str | None = None
    notes: list = dataclasses.field(default_factory=list)
    generated: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    kernels: dict = dataclasses.field(default_factory=dict)
    layers: int | None = None
    timings: dict = dataclasses.field(default_factory=dict)
    at_first_call: list = dataclasses.field(default_factory=list, repr=False, compare=False)

    @contextlib.contextmanager
    def timed(self, stage: str):
        """Add the host seconds spent inside to ``timings[stage]``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t0

    def timing_line(self) -> str | None:
        """``compile time: pre-dispatch trace 0.37 s, ...``, or None."""
        if not self.timings:
            return None
        return "compile time: " + ", ".join(f"{k} {v:.2f} s" for k, v in self.timings.items())

    def count_kernels(self, kind: str, before: int, after: int) -> None:
        """Record the static kernel count of the ``kind`` graph before and after the passes."""
        self.kernels[kind] = (before, after)

    def kernel_line(self) -> str | None:
        """``kernels per call: inference 131 -> 80 (32.8 -> 20.0 per layer, 4 layers)``, or None."""
        if not self.kernels:
            return None
        parts = []
        for kind, (before, after) in self.kernels.items():
            part = f"{kind} {before} -> {after}"
            if self.layers:
                part += f" ({before / self.layers:.1f} -> {after / self.layers:.1f} per layer, {self.layers} layers)"
            parts.append(part)
        return "kernels per call: " + "; ".join(parts)

    def fuse(self, pattern: str, variant: str | None = None) -> None:
        """Record one rewritten match of ``pattern`` (``variant`` names the matched form)."""
        self.fused[pattern if variant is None else f"{pattern}[{variant}]"] += 1
        logger.debug("graph %d: fused %s (%s)", self.graph_id, pattern, variant)

    def lower(self, op: str, kernel: str) -> None:
        self.lowered[f"{op} -> {kernel}"] += 1

    def keep(self, op: str, reason: str) -> None:
        """Record an aten node left to PyTorch, with its reason (in a process where no kernel
        can run, the first one warns: ``flag_gems.availability``)."""
        if op != "views":
            availability.warn_refused(op)
        self.kept[op][reason] += 1
        logger.debug("graph %d: kept %s: %s", self.graph_id, op, reason)

    def to_dict(self) -> dict:
        return {
            "graph_id": self.graph_id,
            "kind": self.kind,
            "fused": dict(self.fused),
            "lowered": dict(self.lowered),
            "kept": {op: dict(r) for op, r in self.kept.items()},
            "fallback": self.fallback,
            "notes": list(self.notes),
            "generated": dict(self.generated),
            "kernels": {k: {"before": b, "after": a} for k, (b, a) in self.kernels.items()},
            "layers": self.layers,
            "timings": dict(self.timings),
        }

    def table(self) -> str:
        """The report as readable text: fusions, lowerings, then the kept ops grouped by reason."""
        lines = [f"graph {self.graph_id} ({self.kind})"]
        if self.fallback:
            lines.append(f"  FALLBACK to the unmodified graph: {self.fallback}")
        for title, counts in (("fused", self.fused), ("lowered", self.lowered)):
            if counts:
                lines.append(f"  {title}: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
        by_reason = collections.defaultdict(list)
        for op, reasons in sorted(self.kept.items()):
            for reason, n in reasons.items():
                by_reason[reason].append(f"{op} x{n}")
        if by_reason:
            lines.append("  kept as aten, by reason:")
            lines += [f"    - {reason}: {', '.join(ops)}" for reason, ops in sorted(by_reason.items())]
        if self.generated:
            lines.append(f"  generated kernels: {sum(self.generated.values())} launches of {len(self.generated)} "
                         f"kernels: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.generated.items())))
        if not (self.fused or self.lowered or by_reason or self.generated):
            lines.append("  (nothing fused or lowered)")
        kernels = self.kernel_line()
        if kernels:
            lines.append(f"  {kernels}")
        timing = self.timing_line()
        if timing:
            lines.append(f"  {timing}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclasses.dataclass
class CompileReport:
    """The graphs of one compiled function (``flag_gems.explain``'s return value)."""

    graphs: list = dataclasses.field(default_factory=list)

    def totals(self) -> collections.Counter:
        """Pattern / lowering counts summed over the graphs."""
        total = collections.Counter()
        for g in self.graphs:
            total.update({f"fused {k}": v for k, v in g.fused.items()})
            total.update({f"lowered {k}": v for k, v in g.lowered.items()})
        return total

    @property
    def fused(self) -> collections.Counter:
        """Fusions by pattern name (variants folded), summed over graphs."""
        out = collections.Counter()
        for g in self.graphs:
            for k, v in g.fused.items():
                out[k.split("[")[0]] += v
        return out

    @property
    def generated(self) -> collections.Counter:
        """Generated (pointwise fusion) kernel launches by kernel name, summed over graphs."""
        out = collections.Counter()
        for g in self.graphs:
            out.update(g.generated)
        return out

    @property
    def fallbacks(self) -> list:
        return [(g.graph_id, g.fallback) for g in self.graphs if g.fallback]

    def to_dict(self) -> dict:
        return {"kernels_unavailable": availability.unavailable(), "graphs": [g.to_dict() for g in self.graphs]}

    def __str__(self) -> str:
        """The graphs' tables; the first line says so when no kernel can run in this process."""
        lines = []
        if availability.unavailable():
            lines.append(f"flag_gems: KERNELS UNAVAILABLE: {availability.unavailable()}")
        if not self.graphs:
            lines.append("flag_gems: no graph was compiled")
        lines += [g.table() for g in self.graphs]
        return "\n".join(lines)

    __repr__ = __str__


def dump_graph(dump_dir: str, graph_id: int, stage: str, gm) -> str:
    """Write ``gm``'s readable code to ``dump_dir/graph_<id>_<stage>.py`` and return the path."""
    os.makedirs(dump_dir, exist_ok=True)
    path = os.path.join(dump_dir, f"graph_{graph_id:03d}_{stage}.py")
    with open(path, "w") as f:
        f.write(gm.print_readable(print_output=False))
    return path


def dump_text(dump_dir: str, graph_id: int, stage: str, text: str) -> str:
    """Write ``text`` (generated source) to ``dump_dir/graph_<id>_<stage>.py`` and return the path."""
    os.makedirs(dump_dir, exist_ok=True)
    path = os.path.join(dump_dir, f"graph_{graph_id:03d}_{stage}.py")
    with open(path, "w") as f:
        f.write(text)
    return path


_LAYER_PATH = re.compile(r"^(.*?)(?:\[(\d+)\]|\.(\d+))$")


def count_layers(gm) -> int | None:
    """Decoder layers in a Dynamo graph: the most indices seen under one module-list path in
    the nodes' ``nn_module_stack`` (``model.layers[0]`` .. ``model.layers[31]`` -> 32); None
    when no module list repeats."""
    seen = collections.defaultdict(set)
    for node in gm.graph.nodes:
        for entry in (node.meta.get("nn_module_stack") or {}).values():
            path = entry[0] if isinstance(entry, tuple) else str(entry)
            m = _LAYER_PATH.match(str(path))
            if m:
                seen[m.group(1)].add(m.group(2) or m.group(3))
    best = max((len(v) for v in seen.values()), default=0)
    return best if best > 1 else None


def dump_report(dump_dir: str, report: GraphReport) -> None:
    """Write the report of one graph as JSON and text beside its graph dumps."""
    os.makedirs(dump_dir, exist_ok=True)
    base = os.path.join(dump_dir, f"graph_{report.graph_id:03d}_{report.kind}_report")
    with open(base + ".json", "w") as f:
        json.dump(report.to_dict(), f, indent=2)
    with open(base + ".txt", "w") as f:
        f.write(report.table() + "\n")
