"""The op registry: what each aten overload may become, where, and on what evidence.

One table, two consumers: the compile backend reads it to rewrite aten nodes (with FX
``meta["val"]`` fake tensors as arguments), the eager dispatcher mode reads it to
register implementations (with real tensors). Both call the same ``supports``.

Entries are added only through :func:`register` on an explicit overload
(``aten.add.Tensor``, never the packet ``aten.add``). Ops left to PyTorch on purpose are
declared in :data:`FALLBACKS` with their reason; no op is both. The ``torch.ops.flag_gems``
ops the fusion passes and the public functions call are listed through
:func:`register_fused` in :data:`FUSED`, with their kernels.

Policies: each entry carries three decisions, each a :class:`Policy` (on/off, a short
reason, the records it rests on), each with one meaning:

==========  ======================================================================
``eager``   registered by ``enable()`` / ``use_gems()`` without ``include=``. On for every
            entry (``supports`` sends each input it does not take to the native kernel);
            off only for an op with a recorded correctness finding
            (:data:`~flag_gems.lowerings.exclusions.EXCLUSIONS`).
``fast``    in ``preset="fast"``: eager-call measurements show a call at least
            :data:`FAST_MIN_SPEEDUP` x native's speed at every measured shape, a call
            costing ``max(host µs, device µs)`` (the larger is what a stream of calls
            waits for: host time at decode sizes, device time at prefill sizes).
``graph``   rewritten by ``lower_aten`` in compiled graphs replayed as CUDA graphs
            (``mode="reduce-overhead"``), where only device time counts: graph-mode
            measurements (``bench_ops.py --parts graph``) at least :data:`FAST_MIN_SPEEDUP` x
            native device time at every measured shape. Until an entry has graph data, only
            entries declared ``graph_proxy=True`` are lowered, on the strength of the same
            rule applied to their eager-call data (the same kernel, without the dispatcher
            wrapper).
``graph_host`` the same for compiled graphs run without CUDA graphs, where every call's host
            time counts too: on ``graph`` only, with the per-call rule (a call costs
            ``max(host µs, device µs)``) on the same data. A Python-launched kernel that saves
            2 µs of device time but costs 40 µs more host time per call than native made a
            host-bound decode step slower (embedding on the H200, benchmarks/NOTES.md).
==========  ======================================================================

Measurements are data (:class:`Measurement`: op, shape, dtype, device, ratio, date),
generated into :mod:`flag_gems.lowerings.measurements` by ``benchmarks/make_measurements.py``
from the JSON rows in ``benchmarks/results/``; reasons and :func:`describe` render them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import torch

from . import exclusions as _exclusions
from . import measurements as _measurements

aten = torch.ops.aten

# A measured ratio within 3% of 1.0 is inside the spread between runs of the same benchmark
# (mean.dim at [8, 4096] measured 2.91x, 2.84x and 2.76x in three runs of one session), so a
# "faster" decision needs at least this much.
FAST_MIN_SPEEDUP = 1.03


# --------------------------------------------------------------------------- evidence


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One benchmark figure: ``ratio`` = the baseline's device time / ours (> 1: ours faster).

    Attributes:
        op: what was measured: an aten overload (``"aten.add.Tensor"``) or a flag_gems op
            (``"flag_gems::add_rms_norm"``).
        case: the benchmark's case name (``"add.Tensor[bcast]"``).
        shape: the benchmark's shape label (``"decode_8x4096"``, ``"M=4096"``).
        dtype: the input dtype (``"bfloat16"``).
        device: the GPU.
        mode: ``"eager"`` (the entry's implementation vs the native op, each called alone),
            ``"graph"`` (the op lowered in a compiled graph vs native in the same graph) or
            ``"fused"`` (a fused kernel vs the ops it replaces).
        baseline: ``"native"`` (the aten kernel), ``"eager"`` (unfused PyTorch ops) or ``"inductor"``.
        ratio: baseline device time / ours.
        ours_us, base_us: device µs per call, ours and the baseline's.
        ours_host_us, base_host_us: host µs per call (None where not measured).
        date: ``YYYY-MM-DD`` of the run.
        source: the results file (stem) in ``benchmarks/results/``.
    """

    op: str
    case: str
    shape: str
    dtype: str
    device: str
    mode: str
    baseline: str
    ratio: float
    ours_us: float
    base_us: float
    ours_host_us: float | None
    base_host_us: float | None
    date: str
    source: str

    def __str__(self) -> str:
        dtype = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(self.dtype, self.dtype)
        return f"{self.case} {self.shape} {dtype} {self.ratio:.2f}x {self.baseline}"

    @property
    def call_ratio(self) -> float:
        """The baseline's per-call cost over ours, a call costing ``max(host µs, device µs)``;
        the device ratio where host time was not measured."""
        if self.ours_host_us is None or self.base_host_us is None:
            return self.ratio
        return max(self.base_us, self.base_host_us) / max(self.ours_us, self.ours_host_us)


MEASUREMENTS: tuple[Measurement, ...] = tuple(
    Measurement(**dict(zip(_measurements.FIELDS, row))) for row in _measurements.ROWS
)


@dataclasses.dataclass(frozen=True)
class Policy:
    """One decision about an entry: ``on``, why (short), and the records it rests on."""

    on: bool
    reason: str
    evidence: tuple = ()

    def __str__(self) -> str:
        return f"{'on' if self.on else 'off'} ({self.reason})"


def _natural(text: str) -> tuple:
    """Sort key reading digit runs as numbers (``M=64`` before ``M=512``)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def _newest(data, mode: str) -> list[Measurement]:
    """The newest figure per (case, shape, baseline) among ``data`` of ``mode`` (a later run,
    or another GPU's, supersedes)."""
    best: dict = {}
    for m in data:
        if m.mode == mode:
            key = (m.case, m.baseline, m.shape)
            if key not in best or (m.date, m.source) > (best[key].date, best[key].source):
                best[key] = m
    return [best[k] for k in sorted(best, key=lambda k: (k[0], k[1], _natural(k[2])))]


def _speedup_rule(data, mode: str, what: str, per_call: bool = False) -> Policy:
    """On iff every newest ``mode`` figure is >= FAST_MIN_SPEEDUP (and there is one): the device
    ratio, or with ``per_call`` :attr:`Measurement.call_ratio`."""
    figures = _newest(data, mode)
    if not figures:
        return Policy(False, f"no {mode}-mode measurement")
    ratio = (lambda m: m.call_ratio) if per_call else (lambda m: m.ratio)
    slow = [m for m in figures if ratio(m) < FAST_MIN_SPEEDUP]
    where = f"{figures[0].device}, {figures[0].date}"
    if slow:
        at = ", ".join(f"{m.case} {m.shape} {ratio(m):.2f}x" for m in slow)
        return Policy(False, f"{what} below {FAST_MIN_SPEEDUP:.2f}x native at {at} ({where})", tuple(figures))
    return Policy(True, f"{what} >= {FAST_MIN_SPEEDUP:.2f}x native at every measured shape ({where})", tuple(figures))


EAGER_ON = Policy(True, "correct for every input supports() accepts; native kernel for the rest")


def eager_policy(op: str) -> Policy:
    """Off only for an op with a recorded correctness finding (``lowerings/exclusions.py``)."""
    found = tuple(e for e in _exclusions.EXCLUSIONS if e.op == op)
    if found:
        return Policy(False, "excluded: " + "; ".join(e.finding for e in found), found)
    return EAGER_ON


def fast_policy(data, eager: Policy) -> Policy:
    """Membership of ``preset="fast"``: the eager-call per-call rule, max(host, device) (and on in eager).

    Device time alone chose entries whose Python host path (60-120 µs a call against native's
    15-60 on the H200) made a decode step slower (benchmarks/results/eager_model_*: the
    device-time set ran decode [8, 1] at 0.73x eager)."""
    if not eager.on:
        return Policy(False, "excluded from eager mode", eager.evidence)
    return _speedup_rule(data, "eager", "eager-call max(host, device) time", per_call=True)


def graph_policy(data, proxy: bool) -> Policy:
    """Whether ``lower_aten`` rewrites the node: graph-mode data, else the declared eager-data proxy."""
    if _newest(data, "graph"):
        return _speedup_rule(data, "graph", "device time in a compiled graph")
    if not proxy:
        return Policy(False, "no graph-mode measurement (benchmarks/bench_ops.py --parts graph)")
    return _speedup_rule(data, "eager", "eager-call device time (proxy until graph-mode data)")


def graph_host_policy(data, graph: Policy) -> Policy:
    """Whether ``lower_aten`` rewrites the node in a graph run without CUDA graphs: ``graph``,
    and the per-call rule (max(host, device)) on the same data where it has host times."""
    if not graph.on:
        return graph
    mode = "graph" if _newest(data, "graph") else "eager"
    figures = _newest(data, mode)
    if not any(m.ours_host_us is not None and m.base_host_us is not None for m in figures):
        return graph
    return _speedup_rule(data, mode, f"{mode}-mode max(host, device) time per call (no CUDA graphs)", per_call=True)


# --------------------------------------------------------------------------- entries


@dataclasses.dataclass(frozen=True)
class Lowering:
    """One registry entry.

    Attributes:
        target: the aten overload.
        impl: what replaces it: a function taking exactly the aten overload's arguments
            (called only after ``supports`` returned None), usually a kernel launcher.
        kernel: the name reports show.
        supports: ``(*args, **kwargs) -> None | reason``: None when ``impl`` handles the call.
        eager: registered by ``enable()`` / ``use_gems()`` by default (module docstring).
        graph: rewritten in compiled graphs by ``lower_aten``.
        fast: in ``preset="fast"``.
        graph_host: rewritten in compiled graphs run without CUDA graphs.
        data: the measurements of this entry (or of the overloads it was measured as).
        checks_in_impl: ``impl`` itself raises NotImplementedError, before any side effect,
            exactly when ``supports`` gives a reason (the generated pointwise entries), so the
            eager mode calls ``impl`` alone and falls back on that error: one check per call.
    """

    target: torch._ops.OpOverload
    impl: Callable
    kernel: str
    supports: Callable[..., str | None]
    eager: Policy
    graph: Policy
    fast: Policy
    data: tuple = ()
    checks_in_impl: bool = False
    graph_host: Policy | None = None  # None: as ``graph``

    def graph_policy(self, cudagraphs: bool) -> Policy:
        """The policy ``lower_aten`` follows: ``graph`` under CUDA graphs, else ``graph_host``."""
        return self.graph if cudagraphs or self.graph_host is None else self.graph_host


@dataclasses.dataclass(frozen=True)
class FusedOp:
    """A ``torch.ops.flag_gems`` op: not an aten override, reached through a pass or a call.

    Attributes:
        op: the qualified name (``"flag_gems::add_rms_norm"``).
        kernel: the kernel (family) it launches.
        fused_by: the fusion pass that emits it in compiled graphs (a name in
            ``flag_gems.options.FUSIONS``), or None when only calls reach it (public
            functions, modules, autograd of another fused op).
        graph: whether compiled graphs get it (the pass, on with ``options={"fusions": ...}``).
        data: measurements of the fused kernel against the ops it replaces.
    """

    op: str
    kernel: str
    fused_by: str | None
    graph: Policy
    data: tuple = ()


REGISTRY: dict = {}
FUSED: dict = {}

# Ops deliberately left to PyTorch, with the reason (one place; a test checks no overlap).
FALLBACKS: dict = {
    aten._scaled_dot_product_flash_attention.default: "native flash attention",
    aten._scaled_dot_product_efficient_attention.default: "native memory-efficient attention",
    aten._scaled_dot_product_flash_attention_backward.default: "native flash attention (training: backward)",
    aten._scaled_dot_product_efficient_attention_backward.default: "native memory-efficient attention (backward)",
    aten.native_dropout.default: "random draws: the native RNG stream, so seeded runs reproduce",
}
for _name in ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward"):
    if hasattr(aten, _name):  # cuDNN attention (torch >= 2.5)
        FALLBACKS[getattr(aten, _name).default] = "native cuDNN attention" + (" (backward)" if "backward" in _name else "")


def measurements_of(*ops) -> tuple[Measurement, ...]:
    """The measurements whose ``op`` is one of ``ops`` (overloads or qualified names)."""
    names = {o if isinstance(o, str) else str(o) for o in ops}
    return tuple(m for m in MEASUREMENTS if m.op in names)


def register(target, *, kernel: str, supports: Callable[..., str | None], checks_in_impl: bool = False,
             measured_as=None, graph_proxy: bool = False):
    """Decorator registering ``impl`` as the lowering of one aten overload.

    Args:
        target: the aten overload.
        kernel: the kernel name reports show.
        supports: ``(*args, **kwargs) -> None | reason`` (metadata only: runs on FakeTensors).
        checks_in_impl: see :class:`Lowering`.
        measured_as: the overloads whose measurements stand for this one (the functional
            overload for its in-place and ``out=`` forms, which run the same kernel);
            default: ``target`` itself.
        graph_proxy: lower it in graphs on its eager-call data until graph-mode data exists
            (see the module docstring); the data must still pass the rule.

    Raises:
        TypeError: ``target`` is an op packet (name the overload) or not an aten op.
        ValueError: the overload is already registered or declared a fallback.
    """
    if isinstance(target, torch._ops.OpOverloadPacket):
        overloads = ", ".join(f"{target._qualified_op_name}.{o}" for o in target.overloads())
        raise TypeError(f"register: name an overload, not the packet {target._qualified_op_name} (one of: {overloads})")
    if not isinstance(target, torch._ops.OpOverload):
        raise TypeError(f"register: expected an aten OpOverload, got {target!r}")
    if target in REGISTRY or target in FALLBACKS:
        raise ValueError(f"register: {target} is already {'registered' if target in REGISTRY else 'a declared fallback'}")
    data = measurements_of(*(measured_as or (target,)))
    eager = eager_policy(str(target))

    def deco(impl):
        graph = graph_policy(data, graph_proxy)
        REGISTRY[target] = Lowering(target, impl, kernel, supports, eager=eager, graph=graph,
                                    fast=fast_policy(data, eager), data=data, checks_in_impl=checks_in_impl,
                                    graph_host=graph_host_policy(data, graph))
        return impl

    return deco


def register_fused(op: str, *, kernel: str, fused_by: str | None = None, measured_as=None) -> FusedOp:
    """List a ``torch.ops.flag_gems`` op with its kernel (and the pass that emits it).

    Args:
        op: ``"flag_gems::name"``; the op must be defined.
        kernel: the kernel (family) it launches.
        fused_by: the fusion pass emitting it (``"rms_norm"``, ``"act_and_mul"``,
            ``"rotary_embedding"``), or None.
        measured_as: ops whose fused-kernel measurements stand for this one (default: ``op``).

    Raises:
        ValueError: not a ``flag_gems::`` name, not defined, or already listed.
    """
    ns, _, name = op.partition("::")
    if ns != "flag_gems" or not name:
        raise ValueError(f"register_fused: expected 'flag_gems::<name>', got {op!r}")
    if not hasattr(torch.ops.flag_gems, name):
        raise ValueError(f"register_fused: {op} is not defined (define the op first)")
    if op in FUSED:
        raise ValueError(f"register_fused: {op} is already listed")
    graph = (Policy(True, f"emitted by the {fused_by} fusion pass (options fusions)") if fused_by
             else Policy(False, "no pass emits it: reached by calls (public functions, modules, autograd)"))
    FUSED[op] = entry = FusedOp(op, kernel, fused_by, graph, measurements_of(*(measured_as or (op,))))
    return entry


def lookup(target) -> Lowering | None:
    """The entry for an aten overload, or None."""
    return REGISTRY.get(target)


def preset_targets(name: str | None) -> frozenset:
    """The overloads of a preset: None (every entry on in eager mode) or ``"fast"``.

    Raises:
        ValueError: an unknown preset name.
    """
    if name is None:
        return frozenset(t for t, e in REGISTRY.items() if e.eager.on)
    if name == "fast":
        return frozenset(t for t, e in REGISTRY.items() if e.fast.on)
    raise ValueError(f"preset={name!r} is not a preset; expected None (every entry) or 'fast'")


def _figures(data) -> str:
    """``case dtype: shape ratio, shape ratio vs baseline; ... [GPU, date]`` of the newest figures."""
    groups: dict = {}
    where = None
    for mode in ("eager", "graph", "fused"):
        for m in _newest(data, mode):
            label = str(m).rsplit(" ", 2)[0].split(" ")  # case shape dtype
            key = (mode, m.case, label[2], m.baseline)
            groups.setdefault(key, []).append(f"{m.shape} {m.ratio:.2f}x")
            where = (m.device, m.date)
    if not groups:
        return "-"
    parts = [f"{'' if mode == 'eager' else mode + ' '}{case} {dtype}: {', '.join(v)} vs {base}"
             for (mode, case, dtype, base), v in groups.items()]
    return "; ".join(parts) + f" [{where[0]}, {where[1]}]"


def describe() -> str:
    """The coverage table: every entry with its three policies and its measurements, every
    declared fallback, every ``torch.ops.flag_gems`` op with its kernel and pass."""
    onoff = lambda p: "on" if p.on else "off"  # noqa: E731
    rows = [(str(t), e.kernel, onoff(e.eager), onoff(e.fast), onoff(e.graph), onoff(e.graph_policy(False)),
             _figures(e.data)) for t, e in REGISTRY.items()]
    rows += [(str(t), "-", "native", "-", "native", "native", r) for t, r in FALLBACKS.items()]
    head = ("aten op", "kernel", "eager", "fast", "graph", "graph_host", "measured (ratio vs baseline)")
    w = [max(len(r[i]) for r in [head, *rows]) for i in range(6)]
    fmt = lambda r: "  ".join(f"{c:<{w[i]}}" for i, c in enumerate(r[:6])) + "  " + r[6]  # noqa: E731
    lines = [fmt(head), *map(fmt, sorted(rows))]
    off = sorted((str(t), e) for t, e in REGISTRY.items() if not e.eager.on)
    lines += [f"  {t}: eager {e.eager}" for t, e in off]
    lines += ["", f"eager: every entry unless excluded; fast: >= {FAST_MIN_SPEEDUP:.2f}x native per call, max(host, device) "
                  f"time, at every measured shape; graph: >= {FAST_MIN_SPEEDUP:.2f}x native device time at every measured "
                  "shape in a compiled graph (or the eager data of graph_proxy entries), under CUDA graphs; graph_host: graph and "
                  "max(host, device) time per call on the same data, in graphs run without CUDA graphs", ""]
    frows = [(f.op, f.kernel, f.fused_by or "-", _figures(f.data)) for f in FUSED.values()]
    fhead = ("flag_gems op", "kernel", "fused by", "measured (ratio vs baseline)")
    fw = [max(len(r[i]) for r in [fhead, *frows]) for i in range(3)]
    lines += ["  ".join(f"{c:<{fw[i]}}" for i, c in enumerate(r[:3])) + "  " + r[3] for r in [fhead, *sorted(frows)]]
    return "\n".join(lines)
