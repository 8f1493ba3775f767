"""Op benchmark: each registered aten op vs the native kernel, called alone (eager) and inside a
compiled graph, and a model forward eager vs ``flag_gems.use_gems()``, side by side in one run.

Cases (``op_cases.py``): decode-like ``[8, 4096]`` and prefill-like ``[4096, 4096]`` bf16 unless the
case says otherwise. Parts (``--parts``, default ``ops,model``):

``ops``: per case and shape
  - ``device_us``: the native op, and the registry entry's implementation called directly, each
    timed by CUDA-graph replay (``_bench_utils.device_time_us``);
  - ``host_us``: one eager call through the dispatcher, without flag_gems and under
    ``use_gems(include=[op])`` (wrapper + ``supports`` + launch), issued back to back;
  - ``first_call_s``: the first call of the implementation on a new shape (JIT included).
``graph``: per case and shape, the op alone in a ``torch.compile`` graph (flag_gems backend, no
  fusions), compiled twice: ``lower_aten=False`` (provider ``graph_native``: the aten kernel in the
  graph) and ``lower_aten="all"`` (``graph_flag_gems``: the node rewritten to the entry's
  implementation, checked in the graph's report). ``device_us`` by CUDA-graph replay of the compiled
  callable, ``host_us`` of back-to-back calls, and ``speed_vs_native``. These rows set the
  registry's graph policy (``make_measurements.py``).
``model``: the 4-layer Llama-3-8B-shaped model of ``bench_model.py``, prefill ``[1, 2048]`` and decode
  ``[8, 1]``: eager vs ``use_gems()`` (every entry), medians of alternating rounds, logits cosine
  (``bench_eager.py`` compares the presets and profiles the host time per op).

Rows carry the case's ``dtype``. ``--cpu-smoke`` runs tiny shapes on the CPU (Triton interpreter)
to exercise the script; ``--time-budget`` skips the remaining cases once spent.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_utils import device_time_us, file_tag, host_time_us, run_meta, wall_time_us, write_rows  # noqa: E402
from op_cases import CASES, Call, case_dtype, nbytes  # noqa: E402

import flag_gems  # noqa: E402
from flag_gems.kernels import _launch  # noqa: E402
from flag_gems.lowerings.registry import REGISTRY  # noqa: E402

aten = torch.ops.aten


def _shapes(args) -> dict:
    return {"decode_8x4096": (8, 4096), "prefill_4096x4096": (4096, 4096)} if not args.cpu_smoke else {"tiny_3x64": (3, 64)}


class _Budget:
    """``--time-budget`` seconds for the op parts; ``spent()`` once they are gone."""

    def __init__(self, seconds):
        self.end = time.perf_counter() + seconds if seconds else None

    def spent(self) -> bool:
        return self.end is not None and time.perf_counter() > self.end


def bench_ops(args, meta, device, budget) -> list[dict]:
    rows = []
    shapes = _shapes(args)
    for name, (op, build) in CASES.items():
        entry = REGISTRY.get(op)
        if args.ops and name not in args.ops:
            continue
        if budget.spent():
            rows.append(dict(meta, op=name, provider="flag_gems", shape="-", metric="skipped", value="time budget"))
            continue
        if entry is None:
            rows.append(dict(meta, op=name, provider="flag_gems", shape="-", metric="skipped", value="no registry entry"))
            continue
        for shape_name, (m, n) in shapes.items():
            torch.manual_seed(0)
            a = build(m, n, device)
            a, kw = a if isinstance(a, Call) else (a, {})
            reason = entry.supports(*a, **kw)
            if reason is not None:
                rows.append(dict(meta, op=name, provider="flag_gems", shape=shape_name, metric="skipped", value=reason))
                continue
            dtype = case_dtype(a)
            t0 = time.perf_counter()
            out = entry.impl(*a, **kw)
            if device == "cuda":
                torch.cuda.synchronize()
            first = time.perf_counter() - t0
            moved = nbytes(a, out)
            timer = device_time_us if device == "cuda" else (lambda f: wall_time_us(f))
            native_us = timer(lambda: op(*a, **kw))
            ours_us = timer(lambda: entry.impl(*a, **kw))
            host_native = host_time_us(lambda: op(*a, **kw), calls=50 if device == "cuda" else 5, batches=3)
            with flag_gems.use_gems(include=[str(op).removeprefix("aten.")]):
                host_ours = host_time_us(lambda: op(*a, **kw), calls=50 if device == "cuda" else 5, batches=3)
                with _triton_launch():
                    host_triton = host_time_us(lambda: op(*a, **kw), calls=50 if device == "cuda" else 5, batches=3)
            for provider, metric, value in (
                ("native", "device_us", native_us), ("flag_gems", "device_us", ours_us),
                ("native", "host_us", host_native), ("flag_gems", "host_us", host_ours),
                ("flag_gems", "host_us_triton_launch", host_triton),
                ("flag_gems", "first_call_s", first),
                ("flag_gems", "speed_vs_native", float(native_us) / float(ours_us)),
                ("flag_gems", "gbps", moved / float(ours_us) / 1e3), ("native", "gbps", moved / float(native_us) / 1e3),
            ):
                rows.append(dict(meta, op=name, provider=provider, shape=shape_name, dtype=dtype, metric=metric,
                                 value=float(value)))
            print(f"{name:<24}{shape_name:<20} native {float(native_us):9.2f} us  ours {float(ours_us):9.2f} us  "
                  f"host {host_native:6.1f} / {host_ours:6.1f} us (Triton's launch path {host_triton:6.1f})  "
                  f"first {first:5.2f} s", flush=True)
    return rows


def _graph_fn(op, args, kwargs):
    """``(fn, tensors)``: ``fn(*tensors)`` calls ``op`` with ``args``' tensors as graph inputs
    (lists of tensors too) and the other arguments as constants."""
    tensors, spec = [], []
    for a in args:
        if isinstance(a, torch.Tensor):
            spec.append(("t", len(tensors)))
            tensors.append(a)
        elif isinstance(a, (list, tuple)) and a and all(isinstance(x, torch.Tensor) for x in a):
            spec.append(("l", list(range(len(tensors), len(tensors) + len(a)))))
            tensors.extend(a)
        else:
            spec.append(("c", a))

    def fn(*ts):
        call = [ts[v] if k == "t" else [ts[i] for i in v] if k == "l" else v for k, v in spec]
        return op(*call, **kwargs)

    return fn, tensors


def bench_graph(args, meta, device, budget) -> list[dict]:
    """The op alone in a compiled graph: aten kernel vs the entry's implementation (module docstring)."""
    from flag_gems.backend import GemsCompiler, _collect
    from flag_gems.options import CompileOptions
    from flag_gems.report import CompileReport

    rows = []
    timer = device_time_us if device == "cuda" else (lambda f: wall_time_us(f))
    calls = 50 if device == "cuda" else 5
    # The entries a graph decision is pending on first (fast or graph policy on), then the rest.
    order = sorted(CASES, key=lambda c: not (REGISTRY.get(CASES[c][0]) and (REGISTRY[CASES[c][0]].fast.on
                                                                                or REGISTRY[CASES[c][0]].graph.on)))
    for name in order:
        op, build = CASES[name]
        entry = REGISTRY.get(op)
        if (args.ops and name not in args.ops) or entry is None:
            continue
        for shape_name, (m, n) in _shapes(args).items():
            if budget.spent():
                rows.append(dict(meta, op=name, provider="graph_flag_gems", shape=shape_name, metric="skipped",
                                 value="time budget"))
                continue
            torch.manual_seed(0)
            a = build(m, n, device)
            a, kw = a if isinstance(a, Call) else (a, {})
            fn, tensors = _graph_fn(op, a, kw)
            compiled, report = {}, CompileReport()
            try:
                for provider, lower in (("graph_native", False), ("graph_flag_gems", "all")):
                    torch._dynamo.reset()
                    # The registry's kernel for the op, not a generated pointwise kernel (as
                    # ``options={"lower_aten": "all"}`` gives): the graph policy is the entry's.
                    backend = GemsCompiler(CompileOptions(lower_aten=lower, fusions=(), fuse_pointwise=False,
                                                          strict=True))
                    compiled[provider] = torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)
                    with _collect(report) if lower else contextlib.nullcontext():
                        compiled[provider](*tensors)
            except Exception as e:  # a case Dynamo or the backend cannot compile is a row, not a crash
                rows.append(dict(meta, op=name, provider="graph_flag_gems", shape=shape_name, metric="skipped",
                                 value=f"{type(e).__name__}: {e}"[:300]))
                continue
            short = str(op).removeprefix("aten.")
            if not any(k.startswith(short + " ->") for g in report.graphs for k in g.lowered):
                kept = {r for g in report.graphs for r in g.kept.get(short, {})}
                if not kept and not any(short in k for g in report.graphs for k in g.kept):
                    kept = {"decomposed before lowering (AOT autograd's CompositeImplicitAutograd decomposition)"}
                rows.append(dict(meta, op=name, provider="graph_flag_gems", shape=shape_name, metric="skipped",
                                 value=f"not lowered: {'; '.join(sorted(kept)) or f'no {short} node in the graph'}"[:300]))
                continue
            us = {p: timer(lambda c=c: c(*tensors)) for p, c in compiled.items()}
            host = {p: host_time_us(lambda c=c: c(*tensors), calls=calls, batches=3) for p, c in compiled.items()}
            dtype = case_dtype(a)
            for provider in compiled:
                timing = getattr(us[provider], "method", "wall_clock")
                for metric, value in (("device_us", us[provider]), ("host_us", host[provider])):
                    rows.append(dict(meta, op=name, provider=provider, shape=shape_name, dtype=dtype, metric=metric,
                                     value=float(value), timing=timing))
            speed = float(us["graph_native"]) / float(us["graph_flag_gems"])
            rows.append(dict(meta, op=name, provider="graph_flag_gems", shape=shape_name, dtype=dtype,
                             metric="speed_vs_native", value=speed))
            print(f"graph {name:<24}{shape_name:<20} native {float(us['graph_native']):9.2f} us  "
                  f"lowered {float(us['graph_flag_gems']):9.2f} us ({speed:.2f}x)  host "
                  f"{host['graph_native']:6.1f} / {host['graph_flag_gems']:6.1f} us", flush=True)
    torch._dynamo.reset()
    return rows


@contextlib.contextmanager
def _triton_launch():
    """Every launch through Triton's own Python path (``flag_gems.kernels._launch`` off)."""
    saved, _launch._ENABLED = _launch._ENABLED, False
    try:
        yield
    finally:
        _launch._ENABLED = saved


def bench_model(args, meta, device) -> list[dict]:
    import bench_model as bm

    cfg = bm.TINY if args.cpu_smoke else bm.LLAMA3_8B_4L
    inputs = {"prefill_1x2048": (1, 2048), "decode_8x1": (8, 1)} if not args.cpu_smoke else {"prefill_1x16": (1, 16)}
    model = bm.build_model(cfg, device)
    rows = []
    for name, (b, s) in inputs.items():
        ids = torch.randint(0, cfg["vocab_size"], (b, s), device=device)
        run = lambda: model(ids, use_cache=False)  # noqa: E731
        timed = lambda: bm.time_ms(run, device, args.warmup, args.iters)  # noqa: E731
        with torch.no_grad():
            ref = run().logits.float()
            with flag_gems.use_gems():
                t0 = time.perf_counter()
                out = run().logits.float()
                first = time.perf_counter() - t0
            # Alternating rounds, medians: on the GPU machine the host's speed drifts by tens of
            # percent within one run (a host-bound decode step measured 4.8 -> 3.6 ms in a minute),
            # so back-to-back single measurements compare the drift, not the two modes.
            runs = {"eager": [], "use_gems": [], "use_gems_triton_launch": []}
            for _ in range(args.rounds):
                runs["eager"].append(timed())
                with flag_gems.use_gems():
                    runs["use_gems"].append(timed())
                    with _triton_launch():
                        runs["use_gems_triton_launch"].append(timed())
        eager_ms, gems_ms, slow_ms = (statistics.median(v) for v in runs.values())
        cos = bm.cosine(out, ref)
        for provider, metric, value in (("eager", "ms", eager_ms), ("use_gems", "ms", gems_ms),
                                         ("use_gems_triton_launch", "ms", slow_ms),
                                         ("use_gems", "first_call_s", first), ("use_gems", "cosine_vs_eager", cos)):
            rows.append(dict(meta, op="llama_4layer", provider=provider, shape=name, metric=metric, value=value))
        rounds = " ".join(f"{e:.2f}/{g:.2f}" for e, g in zip(runs["eager"], runs["use_gems"]))
        print(f"model {name:<16} rounds eager/use_gems ms: {rounds}", flush=True)
        print(f"model {name:<16} eager {eager_ms:8.3f} ms  use_gems {gems_ms:8.3f} ms ({eager_ms / gems_ms:.2f}x; "
              f"{slow_ms:.3f} ms through Triton's launch path)  "
              f"cosine {cos:.6f}  first call {first:.2f} s", flush=True)
    return rows


def markdown(rows) -> str:
    table = {}
    for r in rows:
        table.setdefault((r["op"], r["shape"]), {})[(r["provider"], r["metric"])] = r["value"]
    lines = [f"GPU: {rows[0]['gpu']} · torch {rows[0]['torch']} · triton {rows[0]['triton']} · {rows[0]['date']} · git {rows[0]['git']}", "",
             "| op | shape | native µs | ours µs | ours/native speed | native host µs | use_gems host µs | "
             "use_gems host µs, Triton's launch | first call s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (op, shape), m in table.items():
        if ("flag_gems", "skipped") in m:
            lines.append(f"| {op} | {shape} | skipped: {m[('flag_gems', 'skipped')]} | | | | | | |")
        elif ("native", "device_us") in m:
            lines.append(f"| {op} | {shape} | {m[('native', 'device_us')]:.2f} | {m[('flag_gems', 'device_us')]:.2f} | "
                         f"{m[('flag_gems', 'speed_vs_native')]:.2f}x | {m[('native', 'host_us')]:.1f} | "
                         f"{m[('flag_gems', 'host_us')]:.1f} | {m[('flag_gems', 'host_us_triton_launch')]:.1f} | "
                         f"{m[('flag_gems', 'first_call_s')]:.2f} |")
        elif ("eager", "ms") in m:
            e, g = m[("eager", "ms")], m[("use_gems", "ms")]
            slow = m[("use_gems_triton_launch", "ms")]
            lines.append(f"| {op} | {shape} | eager {e:.3f} ms | use_gems {g:.3f} ms | {e / g:.2f}x | | | "
                         f"{slow:.3f} ms | "
                         f"{m[('use_gems', 'first_call_s')]:.2f} (cosine {m[('use_gems', 'cosine_vs_eager')]:.6f}) |")
    graph = [(k, m) for k, m in table.items() if any(p.startswith("graph_") for p, _ in m)]
    if graph:
        lines += ["", "The op alone in a compiled graph (flag_gems backend): aten kernel vs the node lowered to our "
                      "implementation:", "",
                  "| op | shape | native in graph µs | lowered µs | speed | native host µs | lowered host µs |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for (op, shape), m in graph:
            if ("graph_flag_gems", "skipped") in m:
                lines.append(f"| {op} | {shape} | skipped: {m[('graph_flag_gems', 'skipped')]} | | | | |")
                continue
            lines.append(f"| {op} | {shape} | {m[('graph_native', 'device_us')]:.2f} | "
                         f"{m[('graph_flag_gems', 'device_us')]:.2f} | {m[('graph_flag_gems', 'speed_vs_native')]:.2f}x | "
                         f"{m[('graph_native', 'host_us')]:.1f} | {m[('graph_flag_gems', 'host_us')]:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--ops", nargs="*", help="case names (default: all)")
    p.add_argument("--parts", default="ops,model", help="comma-separated: ops, graph, model (default ops,model)")
    p.add_argument("--no-model", action="store_true", help="leave out the model part")
    p.add_argument("--time-budget", type=float, default=0, help="seconds for the ops and graph parts (0: no limit)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rounds", type=int, default=7, help="alternating eager / use_gems model timings (medians)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes (on the GPU when one is usable): checks the script")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    if args.cpu_smoke:
        args.warmup, args.iters, args.rounds = 0, 1, 1
    parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    unknown = parts - {"ops", "graph", "model"}
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; expected ops, graph, model")
    meta = run_meta(device)
    budget = _Budget(args.time_budget)
    rows = bench_ops(args, meta, device, budget) if "ops" in parts else []
    if "graph" in parts:
        rows += bench_graph(args, meta, device, budget)
    if "model" in parts and not args.no_model:
        try:
            rows += bench_model(args, meta, device)
        except ImportError as e:
            rows.append(dict(meta, op="llama_4layer", provider="use_gems", shape="-", metric="skipped", value=str(e)))
    text = markdown(rows)
    # The default parts keep the historical name; other runs name their parts, so a graph run
    # next to an ops run in one folder does not overwrite it (make_measurements reads ops_*.json).
    named = "" if parts == {"ops", "model"} else "_".join(x for x in ("ops", "graph", "model") if x in parts) + "_"
    write_rows(rows, args.out, f"ops_{named}{'cpu-smoke' if args.cpu_smoke else file_tag(meta)}", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
