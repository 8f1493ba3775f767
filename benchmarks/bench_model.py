"""Model benchmark of the flag_gems torch.compile backend against eager and Inductor (issue 11's table).

Model: a 4-layer Llama-3-8B-shaped ``transformers`` LlamaForCausalLM (hidden 4096, intermediate
14336, 32 q heads / 8 kv heads, vocab 128256), random weights, bf16, ``use_cache=False``.
Inputs: prefill ``[1, 2048]`` and decode ``[1, 1]``, ``[8, 1]``, ``[64, 1]`` token ids.

Contenders (the issue's seven columns): eager; Inductor; Inductor ``mode="reduce-overhead"``;
flag_gems; flag_gems ``mode="reduce-overhead"``; flag_gems ``options={"inductor": True}``;
flag_gems ``options={"inductor": True, "cudagraphs": True}``.

Per (input, contender):

- ``ms``: the median over ``--rounds`` alternating rounds (every contender once per round, the
  order rotated each round) of the median CUDA-event time of ``--iters`` calls;
- ``ms_spread_pct``: (slowest - fastest round) / ``ms``, the within-run noise a ratio must beat;
- ``host_ms``: the median host time to issue one call (no synchronization; above ``ms``'s
  device share, the call is launch-bound);
- ``first_call_s``: the first call, compile included, with cold caches (Inductor's and Triton's
  cache folders are empty temporary folders for the whole run; each input starts from a
  ``torch._dynamo.reset()``);
- ``backend_compile_s`` / ``graph_first_run_s`` (flag_gems contenders without Inductor): the
  backend's share of the first call from its graph reports (``GraphReport.timings``): tracing,
  fusions and AOT autograd; the compiled graphs' first runs (Triton compiles, tuning). The rest is
  Dynamo's;
- ``cosine_vs_eager``: cosine similarity of the logits with eager's;
- ``kernels_per_call`` / ``kernels_per_layer``: CUDA kernels one forward launches (torch.profiler,
  memcpy/memset excluded), and that over the number of layers;
- ``static_kernels_per_layer`` (flag_gems contenders without Inductor): the backend's own count
  from the compiled graphs (``GraphReport.kernels``), to compare with the profiler's.

The markdown has the issue's table (rows: inputs and metrics, columns: contenders), the
issue's targets as measured ratios, and the long table. Rows (long format) go to JSON.
A full run compiles 28 graphs (Inductor's take 5-22 s each) and takes about 4-5 minutes on an
H200; ``--quick`` (prefill and decode [8, 1], 3 rounds) about 2; ``--contenders`` and
``--inputs`` pick subsets. ``--cpu-smoke`` runs a tiny config on the CPU (Triton interpreter),
eager and flag_gems only, so the script itself is exercised in CI.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

# Cold caches for the whole run, before torch/triton read their cache locations.
if "--keep-caches" not in sys.argv:
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor_"))
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton_"))

if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (see flag_gems/__init__.py)

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_utils import file_tag, median_call_times, profile_calls, run_meta, write_rows  # noqa: E402

LLAMA3_8B_4L = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
)
TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
)
CONTENDERS = {
    "eager": None,
    "inductor": dict(),
    "inductor_reduce_overhead": dict(mode="reduce-overhead"),
    "flag_gems": dict(backend="flag_gems"),
    "flag_gems_reduce_overhead": dict(backend="flag_gems", mode="reduce-overhead"),
    "flag_gems_inductor": dict(backend="flag_gems", options={"inductor": True}),
    "flag_gems_inductor_cudagraphs": dict(backend="flag_gems", options={"inductor": True, "cudagraphs": True}),
    # options={"fuse_linear": True} stacks the grouped weights in place: these two run on their own copy of
    # the model (same seed, same weights), so the others' compiled graphs never see moved parameters.
    "flag_gems_fuse_linear": dict(backend="flag_gems", options={"fuse_linear": True}),
    # (torch.compile takes mode or options, not both: options cudagraphs is what mode="reduce-overhead" sets)
    "flag_gems_fuse_linear_reduce_overhead": dict(backend="flag_gems", options={"fuse_linear": True, "cudagraphs": True}),
}
ALIASES = {"flag_gems_cudagraphs": "flag_gems_reduce_overhead"}  # the name earlier results used
INPUTS = {"prefill_1x2048": (1, 2048), "decode_8x1": (8, 1), "decode_1x1": (1, 1), "decode_64x1": (64, 1)}
QUICK_INPUTS = ("prefill_1x2048", "decode_8x1")
SMOKE_INPUTS = {"prefill_1x16": (1, 16), "decode_2x1": (2, 1)}


def build_model(cfg: dict, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**cfg)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return model


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: str, warmup: int, iters: int) -> float:
    """Median ms per call (CUDA events on GPU, wall clock on CPU)."""
    return time_ms_host(fn, device, warmup, iters)[0]


def time_ms_host(fn, device: str, warmup: int, iters: int) -> tuple[float, float]:
    """``(ms, host_ms)``: median ms per call and median host ms to issue one call
    (``_bench_utils.median_call_times``)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    return median_call_times(fn, iters, device)


def cosine(a, b) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def count_cuda_kernels(fn, calls: int = 3) -> float:
    """CUDA kernels launched per call of ``fn`` (torch.profiler, as ``profile_model.py`` counts them;
    memcpy and memset excluded)."""
    n = sum(e.count for e in profile_calls(fn, calls)
            if e.device_type == torch.autograd.DeviceType.CUDA and not e.key.startswith(("Memcpy", "Memset")))
    return n / calls


def _static_kernels(report, layers: int) -> float | None:
    """Kernels per layer from the backend's reports of one compiled call (after its passes)."""
    total = 0
    for g in report.graphs:
        kind = "inference" if "inference" in g.kernels else "forward"
        if kind not in g.kernels:
            return None
        total += g.kernels[kind][1]
    return total / layers if report.graphs else None


def _stage_seconds(report) -> dict:
    """The backend's share of a first call, from its graph reports: ``backend_compile_s`` (the
    pre-dispatch trace, the fusions and AOT autograd with our post-autograd passes inside) and
    ``graph_first_run_s`` (the compiled graphs' first runs: Triton compiles, tuning). The rest of
    ``first_call_s`` is Dynamo's."""
    compile_s = run_s = 0.0
    for g in report.graphs:
        for stage, secs in g.timings.items():
            if stage.endswith("first call"):
                run_s += secs
            elif stage in ("pre-dispatch trace", "fusions", "AOT autograd"):
                compile_s += secs
    return {"backend_compile_s": compile_s, "graph_first_run_s": run_s}


def _compile(contender: str, model, ids, device: str):
    """(callable, first-call seconds, logits, static kernels per layer or None, stage seconds or None)."""
    kw = CONTENDERS[contender]
    fn = model if kw is None else torch.compile(model, **kw)
    report = None
    with torch.no_grad():
        _sync(device)
        t0 = time.perf_counter()
        if kw is not None and kw.get("backend") == "flag_gems" and not (kw.get("options") or {}).get("inductor"):
            from flag_gems.backend import _collect
            from flag_gems.report import CompileReport

            with _collect(CompileReport()) as report:
                out = fn(ids, use_cache=False).logits
        else:
            out = fn(ids, use_cache=False).logits
        _sync(device)
        first = time.perf_counter() - t0
    static = _static_kernels(report, model.config.num_hidden_layers) if report is not None else None
    stages = _stage_seconds(report) if report is not None else None
    return fn, first, out.float(), static, stages


def run(args) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    cfg = TINY if args.cpu_smoke else LLAMA3_8B_4L
    layers = cfg["num_hidden_layers"]
    if args.cpu_smoke:
        inputs = SMOKE_INPUTS
    else:
        names = args.inputs or (QUICK_INPUTS if args.quick else list(INPUTS))
        inputs = {n: INPUTS[n] for n in names}
    contenders = [ALIASES.get(c, c) for c in (args.contenders or (["eager", "flag_gems"] if args.cpu_smoke else list(CONTENDERS)))]
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(CONTENDERS))
    model = build_model(cfg, device)
    own_copy = None  # the fuse_linear contenders' model (see CONTENDERS)

    def model_of(contender):
        nonlocal own_copy
        if not ((CONTENDERS[contender] or {}).get("options") or {}).get("fuse_linear"):
            return model
        if own_copy is None:
            own_copy = build_model(cfg, device)
        return own_copy

    meta = run_meta(device)
    rows = []
    start = time.perf_counter()

    def row(inp, prov, metric, value):
        rows.append(dict(meta, input=inp, provider=prov, metric=metric, value=value))

    for name, (b, s) in inputs.items():
        torch._dynamo.reset()
        torch.manual_seed(1)
        ids = torch.randint(0, cfg["vocab_size"], (b, s), device=device)
        with torch.no_grad():
            ref = model(ids, use_cache=False).logits.float()
        fns = {}
        for contender in contenders:
            if time.perf_counter() - start > args.budget_s:
                row(name, contender, "error", f"skipped: past the {args.budget_s:.0f} s budget")
                continue
            try:
                fn, first, out, static, stages = _compile(contender, model_of(contender), ids, device)
            except Exception as e:  # a contender that fails is a recorded row, not a crash
                row(name, contender, "error", f"{type(e).__name__}: {e}"[:300])
                print(f"{name:<16}{contender:<32} FAILED: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            fns[contender] = fn
            row(name, contender, "first_call_s", first)
            row(name, contender, "cosine_vs_eager", cosine(out, ref))
            if static is not None:
                row(name, contender, "static_kernels_per_layer", static)
            for metric, value in (stages or {}).items():
                row(name, contender, metric, value)
            del out
        # Alternating rounds: every contender once per round, the order rotated each round.
        times = {c: [] for c in fns}
        host = {c: [] for c in fns}
        order = list(fns)
        for r in range(args.rounds if order else 0):
            for contender in order[r % len(order):] + order[:r % len(order)]:
                fn = fns[contender]
                with torch.no_grad():
                    ms, host_ms = time_ms_host(lambda: fn(ids, use_cache=False), device, args.warmup, args.iters)
                times[contender].append(ms)
                host[contender].append(host_ms)
        for contender, ts in times.items():
            row(name, contender, "ms", statistics.median(ts))
            # Within-call noise: how far the rounds of one contender spread around their median.
            row(name, contender, "ms_spread_pct", 100.0 * (max(ts) - min(ts)) / statistics.median(ts) if ts else None)
            row(name, contender, "host_ms", statistics.median(host[contender]))
            if device == "cuda":
                with torch.no_grad():
                    k = count_cuda_kernels(lambda: fns[contender](ids, use_cache=False))
                row(name, contender, "kernels_per_call", k)
                row(name, contender, "kernels_per_layer", k / layers)
            got = {r["metric"]: r["value"] for r in rows if r["input"] == name and r["provider"] == contender}
            print(f"{name:<16}{contender:<32}{got['ms']:>9.3f} ms (rounds spread {got['ms_spread_pct']:.0f} %)  "
                  f"host {got['host_ms']:>7.3f} ms  first {got['first_call_s']:>6.2f} s  "
                  f"cos {got['cosine_vs_eager']:.6f}  kernels/layer {got.get('kernels_per_layer', float('nan')):.1f}"
                  f"  (static {got.get('static_kernels_per_layer', float('nan')):.1f})", flush=True)
        fns.clear()
        _sync(device)
    return rows


# --------------------------------------------------------------------------- tables

_LABELS = {
    "eager": "eager", "inductor": "Inductor", "inductor_reduce_overhead": "Inductor `reduce-overhead`",
    "flag_gems": "ours", "flag_gems_reduce_overhead": "ours `reduce-overhead`",
    "flag_gems_inductor": 'ours `options={"inductor": True}`', "flag_gems_inductor_cudagraphs": "ours inductor + cudagraphs",
    "flag_gems_fuse_linear": "ours `fuse_linear`", "flag_gems_fuse_linear_reduce_overhead": "ours `fuse_linear` `reduce-overhead`",
}


def _table(rows):
    t = {}
    for r in rows:
        t.setdefault((r["input"], r["provider"]), {})[r["metric"]] = r["value"]
    return t


def _fmt(v, spec):
    return "–" if v is None else format(v, spec)


def markdown(rows: list[dict]) -> str:
    t = _table(rows)
    inputs = list(dict.fromkeys(r["input"] for r in rows))
    provs = [p for p in CONTENDERS if any(r["provider"] == p for r in rows)]
    m0 = rows[0]
    lines = [
        f"GPU: {m0['gpu']} · torch {m0['torch']} · triton {m0['triton']} · {m0['date']} · git {m0['git']}",
        "",
        "| input | " + " | ".join(_LABELS[p] for p in provs) + " |",
        "|---|" + "---|" * len(provs),
    ]
    for metric, label, spec in (("ms", "ms", ".3f"), ("ms_spread_pct", "ms spread over rounds %", ".0f"),
                                ("host_ms", "host ms to issue", ".3f"),
                                ("first_call_s", "first call s", ".1f"),
                                ("backend_compile_s", "first call: our trace, fusions, AOT s", ".2f"),
                                ("graph_first_run_s", "first call: graphs' first run s", ".2f"),
                                ("kernels_per_layer", "kernels / layer", ".1f"),
                                ("static_kernels_per_layer", "kernels / layer (static count)", ".1f"),
                                ("cosine_vs_eager", "logits cosine vs eager", ".5f")):
        for inp in inputs:
            vals = [t.get((inp, p), {}).get(metric) for p in provs]
            if all(v is None for v in vals):
                continue
            cells = [("failed" if "error" in t.get((inp, p), {}) else _fmt(v, spec)) for p, v in zip(provs, vals)]
            lines.append(f"| {inp} {label} | " + " | ".join(cells) + " |")
    lines += ["", "Targets (issue 11), measured:", ""]
    lines += _targets(t, inputs)
    lines += ["", "| input | contender | ms | vs eager | vs Inductor | vs Inductor reduce-overhead | first call s | "
              "kernels/layer | cosine vs eager |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (inp, prov), m in t.items():
        if "error" in m:
            lines.append(f"| {inp} | {prov} | failed: {m['error']} | | | | | | |")
            continue
        if "ms" not in m:
            continue
        ratios = []
        for base in ("eager", "inductor", "inductor_reduce_overhead"):
            b = t.get((inp, base), {}).get("ms")
            ratios.append(f"{m['ms'] / b:.2f}x" if b else "")
        lines.append(f"| {inp} | {prov} | {m['ms']:.3f} | {' | '.join(ratios)} | {m['first_call_s']:.2f} | "
                     f"{_fmt(m.get('kernels_per_layer'), '.1f')} | {m['cosine_vs_eager']:.6f} |")
    lines.append("")
    lines.append("Ratios are time / the other's time (below 1: faster).")
    return "\n".join(lines)


def _targets(t, inputs) -> list[str]:
    """The issue's targets as ratios (ours / theirs), each with its bound."""
    out = []

    def ratio(inp, a, b, metric="ms"):
        x, y = t.get((inp, a), {}).get(metric), t.get((inp, b), {}).get(metric)
        return None if x is None or not y else x / y

    checks = []
    for inp in inputs:
        if inp.startswith("prefill"):
            checks.append((f"{inp}: ours / Inductor <= 0.95", ratio(inp, "flag_gems", "inductor"), 0.95))
            checks.append((f"{inp}: ours fuse_linear / Inductor <= 0.95", ratio(inp, "flag_gems_fuse_linear", "inductor"), 0.95))
        else:
            checks.append((f"{inp}: ours reduce-overhead / Inductor reduce-overhead <= 0.95",
                           ratio(inp, "flag_gems_reduce_overhead", "inductor_reduce_overhead"), 0.95))
            checks.append((f"{inp}: ours fuse_linear reduce-overhead / Inductor reduce-overhead <= 0.95",
                           ratio(inp, "flag_gems_fuse_linear_reduce_overhead", "inductor_reduce_overhead"), 0.95))
            checks.append((f"{inp}: ours / Inductor (no CUDA graphs) <= 1", ratio(inp, "flag_gems", "inductor"), 1.0))
            checks.append((f"{inp}: ours fuse_linear / Inductor (no CUDA graphs) <= 1",
                           ratio(inp, "flag_gems_fuse_linear", "inductor"), 1.0))
            checks.append((f"{inp}: kernels per layer ours / Inductor <= 1",
                           ratio(inp, "flag_gems", "inductor", "kernels_per_layer"), 1.0))
        checks.append((f"{inp}: first call ours / Inductor <= 1/3",
                       ratio(inp, "flag_gems", "inductor", "first_call_s"), 1 / 3))
        cos = t.get((inp, "flag_gems"), {}).get("cosine_vs_eager")
        checks.append((f"{inp}: ours logits cosine >= 0.9995", cos, None))
    for label, value, bound in checks:
        if value is None:
            continue
        ok = value >= 0.9995 if bound is None else value <= bound
        out.append(f"- {label}: {value:.4f} {'(met)' if ok else '(NOT met)'}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--contenders", nargs="*", choices=[*CONTENDERS, *ALIASES])
    p.add_argument("--inputs", nargs="*", choices=list(INPUTS))
    p.add_argument("--quick", action="store_true", help="prefill and decode [8, 1] only, 3 rounds")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 7, --quick 3)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=330.0, help="contenders not compiled by then are skipped")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU: checks the script, measures nothing")
    p.add_argument("--keep-caches", action="store_true", help="do not point Inductor/Triton at empty cache folders")
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 7
    if args.cpu_smoke:
        args.warmup, args.iters, args.rounds = 0, 1, 2
    rows = run(args)
    tag = "cpu-smoke" if args.cpu_smoke else file_tag(rows[0])
    text = markdown(rows)
    write_rows(rows, args.out, f"model_{tag}", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
