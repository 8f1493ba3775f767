"""Eager mode on a model (issue 10): eager PyTorch vs ``use_gems()`` (every entry) vs ``use_gems(preset="fast")``.

Model: the 4-layer Llama-3-8B-shaped model of ``bench_model.py`` (bf16, random weights,
``use_cache=False``); inputs: prefill ``[1, 2048]`` and decode ``[8, 1]`` token ids. Per input and mode,
in one run:

- ``ms``: ms per forward, the median over ``--rounds`` alternating rounds (eager, all, fast, eager,
  ...; each round the median of ``--iters`` CUDA-event-timed forwards), since the host's speed
  drifts by tens of percent within a run (``benchmarks/NOTES.md``, session 3); ``vs_eager``: eager's
  median / this mode's; ``first_call_s``; ``cosine_vs_eager`` of the logits;
- ``ops_registered``; ``gems_calls`` / ``native_calls``: calls per forward that ran a flag_gems
  kernel / fell back to the native one (from a record log of one extra forward), per op in the
  ``served`` rows;
- host time per op: ``torch.profiler`` CPU events of one forward per mode, for the
  ``--top-ops`` (20) most frequent aten ops of the eager forward: calls per forward and host µs
  per call (the op's CPU time, our Python wrapper and launch included; ``self`` without its
  children).

Rows (long format, every row with GPU, versions, git sha, date) go to ``--out`` as
``eager_model_<GPU>_<date>.json`` plus a Markdown table. ``--cpu-smoke`` runs a tiny config on the
CPU (Triton interpreter) so the script cannot rot. On an H200 the full run takes about 1-2 minutes
(most of it the first calls' JIT compiles)::

    python benchmarks/bench_eager.py --out $OUT
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time

if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_model as bm  # noqa: E402
from _bench_utils import file_tag, run_meta, write_rows  # noqa: E402

import flag_gems  # noqa: E402

MODES = {
    "eager": None,
    "use_gems": {},
    "use_gems_fast": {"preset": "fast"},
}
INPUTS = {"prefill_1x2048": (1, 2048), "decode_8x1": (8, 1)}
SMOKE_INPUTS = {"prefill_1x16": (1, 16), "decode_2x1": (2, 1)}


def _mode(name, **extra):
    kw = MODES[name]
    if kw is None:
        import contextlib

        return contextlib.nullcontext()
    return flag_gems.use_gems(**kw, **extra)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def served(fn, mode: str) -> dict:
    """Per op, (GEMS, NATIVE) calls of one forward, from a record log written after each call."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ops.log")
        with _mode(mode, record=True, fallbacks=True, path=path):
            fn()
        counts: dict = collections.defaultdict(lambda: [0, 0])
        with open(path) as f:
            for line in f:
                what = line.split(": ", 1)[1].strip()
                kind, name = what.split(" ", 1)
                counts[name.split(":")[0]][0 if kind == "GEMS" else 1] += 1
    return dict(counts)


def profile_ops(fn, device: str) -> dict:
    """aten op -> (calls, host µs per call, self host µs per call) of one forward (torch.profiler, CPU events)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
        _sync(device)
    out = {}
    for e in prof.key_averages():
        if e.key.startswith("aten::") and e.count:
            out[e.key] = (e.count, e.cpu_time_total / e.count, e.self_cpu_time_total / e.count)
    return out


def bench(args, meta, device, inputs) -> list[dict]:
    """The model rows (see the module docstring)."""
    cfg = bm.TINY if args.cpu_smoke else bm.LLAMA3_8B_4L
    model = bm.build_model(cfg, device)
    rows = []

    def row(op, provider, shape, metric, value):
        rows.append(dict(meta, op=op, provider=provider, shape=shape, metric=metric, value=value))

    for name, (b, s) in inputs.items():
        torch.manual_seed(1)
        ids = torch.randint(0, cfg["vocab_size"], (b, s), device=device)
        run = lambda: model(ids, use_cache=False)  # noqa: E731
        with torch.no_grad():
            ref = run().logits.float()
            for mode in MODES:
                with _mode(mode):
                    _sync(device)
                    t0 = time.perf_counter()
                    out = run().logits.float()
                    _sync(device)
                    row("llama_4layer", mode, name, "first_call_s", time.perf_counter() - t0)
                    row("llama_4layer", mode, name, "cosine_vs_eager", bm.cosine(out, ref))
                    row("llama_4layer", mode, name, "ops_registered", len(flag_gems.all_registered_ops()))
            times = {mode: [] for mode in MODES}
            for _ in range(args.rounds):
                for mode in MODES:
                    with _mode(mode):
                        times[mode].append(bm.time_ms(run, device, args.warmup, args.iters))
            med = {mode: statistics.median(v) for mode, v in times.items()}
            for mode in MODES:
                row("llama_4layer", mode, name, "ms", med[mode])
                row("llama_4layer", mode, name, "vs_eager", med["eager"] / med[mode])
            print(f"model {name:<16} " + "  ".join(f"{m} {med[m]:.3f} ms ({med['eager'] / med[m]:.2f}x)" for m in MODES)
                  + "  rounds " + " | ".join("/".join(f"{times[m][i]:.2f}" for m in MODES) for i in range(args.rounds)),
                  flush=True)
            for mode in MODES:
                if MODES[mode] is None:
                    continue
                counts = served(run, mode)
                row("llama_4layer", mode, name, "gems_calls", sum(c[0] for c in counts.values()))
                row("llama_4layer", mode, name, "native_calls", sum(c[1] for c in counts.values()))
                for op, (g, n) in sorted(counts.items()):
                    row(f"served:{op}", mode, name, "gems_calls", g)
                    row(f"served:{op}", mode, name, "native_calls", n)
            prof = {}
            for mode in MODES:
                with _mode(mode):
                    prof[mode] = profile_ops(run, device)
        top = sorted(prof["eager"].items(), key=lambda kv: (-kv[1][0], kv[0]))[: args.top_ops]
        for op, _ in top:
            for mode in MODES:
                calls, total, self_us = prof[mode].get(op, (0, 0.0, 0.0))
                row(op, mode, name, "calls_per_forward", calls)
                row(op, mode, name, "host_us_per_call", total)
                row(op, mode, name, "self_host_us_per_call", self_us)
    return rows


def markdown(rows) -> str:
    cell = {}
    for r in rows:
        cell[(r["op"], r["provider"], r["shape"], r["metric"])] = r["value"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    r0 = rows[0]
    lines = [f"GPU: {r0['gpu']} · torch {r0['torch']} · triton {r0['triton']} · {r0['date']} · git {r0['git']}", "",
             "| input | mode | ms (median of rounds) | vs eager | first call s | cosine vs eager | ops registered | "
             "flag_gems calls / native calls per forward |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for shape in shapes:
        for mode in MODES:
            g = lambda m: cell.get(("llama_4layer", mode, shape, m))  # noqa: B023,E731
            if g("ms") is None:
                continue
            served_ = f"{g('gems_calls')} / {g('native_calls')}" if g("gems_calls") is not None else "-"
            lines.append(f"| {shape} | {mode} | {g('ms'):.3f} | {g('vs_eager'):.2f}x | {g('first_call_s'):.2f} | "
                         f"{g('cosine_vs_eager'):.6f} | {g('ops_registered')} | {served_} |")
    lines += ["", "Targets (issue 10): use_gems >= 0.9x eager on prefill; use_gems_fast >= 1.0x eager on both."]
    for shape in shapes:
        for mode, bar in (("use_gems", 0.9 if "prefill" in shape else None), ("use_gems_fast", 1.0)):
            v = cell.get(("llama_4layer", mode, shape, "vs_eager"))
            if bar is not None and v is not None:
                lines.append(f"- {shape} {mode}: {v:.2f}x ({'met' if v >= bar else 'NOT met'}, bar {bar:.1f}x)")
    for shape in shapes:
        ops = [k[0] for k in cell if k[1] == "eager" and k[2] == shape and k[3] == "calls_per_forward"]
        if not ops:
            continue
        lines += ["", f"Host µs per call of the most frequent aten ops, {shape} (torch.profiler CPU time incl. children; "
                      "self in brackets):", "",
                  "| aten op | calls | eager µs | use_gems µs | fast µs | use_gems extra ms per forward |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for op in ops:
            c = lambda mode, m: cell.get((op, mode, shape, m), 0)  # noqa: B023,E731
            calls = c("eager", "calls_per_forward")
            extra = (c("use_gems", "host_us_per_call") - c("eager", "host_us_per_call")) * calls / 1e3
            lines.append(f"| {op} | {calls} | " + " | ".join(
                f"{c(mode, 'host_us_per_call'):.1f} ({c(mode, 'self_host_us_per_call'):.1f})" for mode in MODES)
                + f" | {extra:+.3f} |")
    for shape in shapes:
        ops = sorted({k[0] for k in cell if k[0].startswith("served:") and k[1] == "use_gems" and k[2] == shape})
        if ops:
            lines += ["", f"Calls per forward under use_gems(), {shape}: flag_gems kernel / native fallback", "",
                      ", ".join(f"{op.removeprefix('served:')} {cell[(op, 'use_gems', shape, 'gems_calls')]}/"
                                f"{cell[(op, 'use_gems', shape, 'native_calls')]}" for op in ops)]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds of the three modes (medians)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--top-ops", type=int, default=20)
    p.add_argument("--inputs", nargs="*", choices=list(INPUTS))
    p.add_argument("--quick", action="store_true", help="3 rounds of 5 forwards")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny config on the CPU: checks the script, measures nothing")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    if args.quick:
        args.rounds, args.iters = 3, 5
    if args.cpu_smoke:
        args.rounds, args.warmup, args.iters, args.top_ops = 1, 0, 1, 5
    inputs = SMOKE_INPUTS if args.cpu_smoke else {k: v for k, v in INPUTS.items() if not args.inputs or k in args.inputs}
    meta = run_meta(device)
    rows = bench(args, meta, device, inputs)
    text = markdown(rows)
    write_rows(rows, args.out, f"eager_model_{'cpu-smoke' if args.cpu_smoke else file_tag(meta)}", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
