"""First call of ``torch.compile(model, backend="flag_gems")`` with and without precompile (issue 11).

Model and inputs as ``bench_model.py``'s: a 4-layer Llama-3-8B-shaped HF model, bf16, prefill
``[1, 2048]`` and decode ``[8, 1]``. Each (input, precompile on / off) runs in a child process of its
own, with empty Triton and Inductor cache folders, so that Triton's caches (in memory and on disk)
are cold for each; precompile is switched by the backend option (``options={"precompile": ...}``).

Per run: the first call's seconds, the backend's stage timings from its graph reports
(``GraphReport.timings``: trace, fusions, AOT autograd with the passes, the wrapper and the precompile
inside, each graph's first run), the precompile notes, and how many Triton compiles the main process
made during the first call and how many of them Triton found in its disk cache (with precompile on, a
compile that is not a hit is a kernel the precompile missed). A checksum of the logits tells whether
both runs computed the same thing.

    python3 benchmarks/precompile_check.py --out DIR          # H200: 4 children, about 2 minutes
    python3 benchmarks/precompile_check.py --cpu-smoke --out DIR   # tiny model, CPU interpreter (a no-op there)

Rows (long format) go to ``DIR/precompile_<GPU>_<date>.json`` with a markdown table next to them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
INPUTS = {"prefill_1x2048": (1, 2048), "decode_8x1": (8, 1)}
SMOKE_INPUTS = {"prefill_1x16": (1, 16), "decode_2x1": (2, 1)}
CHILD_TIMEOUT_S = 200


# --------------------------------------------------------------------------- child: one cold first call


def child(args) -> dict:
    """One first call in this process (its caches cold: the parent set TRITON_CACHE_DIR and
    TORCHINDUCTOR_CACHE_DIR to empty folders before this process started)."""
    import torch

    sys.path.insert(0, HERE)
    import bench_model  # noqa: E402  (sets nothing: the cache folders are in the environment already)
    import triton

    from flag_gems.backend import _collect
    from flag_gems.report import CompileReport

    device = "cpu" if args.cpu_smoke else "cuda"
    cfg = bench_model.TINY if args.cpu_smoke else bench_model.LLAMA3_8B_4L
    b, s = (SMOKE_INPUTS if args.cpu_smoke else INPUTS)[args.child]
    model = bench_model.build_model(cfg, device)
    torch.manual_seed(1)
    ids = torch.randint(0, cfg["vocab_size"], (b, s), device=device)

    compiles = []  # Triton compiles in this process: cache hit or not (workers set their own listener)

    def listen(*, cache_hit=None, **_):
        compiles.append(bool(cache_hit))

    try:
        triton.knobs.compilation.listener = listen
    except AttributeError:  # a Triton without it: no compile counts
        pass

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    fn = torch.compile(model, backend="flag_gems", options={"precompile": args.precompile == "on"})
    with torch.no_grad():
        sync()
        t0 = time.perf_counter()
        with _collect(CompileReport()) as report:
            out = fn(ids, use_cache=False).logits
        sync()
        first = time.perf_counter() - t0
        n_first = len(compiles)
        t0 = time.perf_counter()
        fn(ids, use_cache=False)
        sync()
        second = time.perf_counter() - t0
    logits = out.float()
    return {
        "input": args.child,
        "precompile": args.precompile,
        "first_call_s": first,
        "second_call_s": second,
        "triton_compiles": n_first,
        "triton_cache_hits": sum(compiles[:n_first]),
        "logits_sum": logits.sum().item(),
        "logits_abs_sum": logits.abs().sum().item(),
        "graphs": [{"id": g.graph_id, "kind": g.kind, "timings": dict(g.timings),
                    "notes": [n for n in g.notes if "precompile" in n]} for g in report.graphs],
    }


# --------------------------------------------------------------------------- parent: the children, the table


def _run_child(name: str, mode: str, cpu_smoke: bool) -> dict:
    env = dict(os.environ)
    caches = [tempfile.mkdtemp(prefix="triton_precompile_check_"), tempfile.mkdtemp(prefix="inductor_precompile_check_")]
    env["TRITON_CACHE_DIR"], env["TORCHINDUCTOR_CACHE_DIR"] = caches
    env.pop("GEMS_PRECOMPILE", None)  # the backend option decides
    if cpu_smoke:
        env["TRITON_INTERPRET"] = "1"
    try:
        got = _child_process(name, mode, cpu_smoke, env)
    finally:
        for d in caches:
            shutil.rmtree(d, ignore_errors=True)
    return got


def _child_process(name: str, mode: str, cpu_smoke: bool, env: dict) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--precompile", mode, "--json", out.name]
        if cpu_smoke:
            cmd.append("--cpu-smoke")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout)[-2000:]
            raise RuntimeError(f"child {name} precompile={mode} failed (exit {proc.returncode}):\n{tail}")
        got = json.load(open(out.name))
    got["process_s"] = time.perf_counter() - t0
    return got


def _stage_sums(got: dict) -> dict:
    """Per run: the backend's stages (trace, fusions, AOT autograd: the precompile runs inside AOT autograd),
    the precompile alone and the graphs' first runs, summed over the graphs."""
    out = {"backend_stages_s": 0.0, "precompile_s": 0.0, "graph_first_run_s": 0.0}
    for g in got["graphs"]:
        for stage, secs in g["timings"].items():
            if stage.endswith("first call"):
                out["graph_first_run_s"] += secs
            elif stage.endswith("precompile"):
                out["precompile_s"] += secs
            elif stage in ("pre-dispatch trace", "fusions", "AOT autograd"):
                out["backend_stages_s"] += secs
    return out


def markdown(results: list[dict], meta: dict) -> str:
    lines = [f"GPU: {meta['gpu']} · torch {meta['torch']} · triton {meta['triton']} · {meta['date']} · git {meta['git']}",
             "", "| input | precompile | first call s | our stages s (incl. precompile) | precompile s | graphs' first run s "
             "| Triton compiles at the first call (disk hits) | logits sum |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        st = _stage_sums(r)
        lines.append(f"| {r['input']} | {r['precompile']} | {r['first_call_s']:.2f} | {st['backend_stages_s']:.2f} | "
                     f"{st['precompile_s']:.2f} | {st['graph_first_run_s']:.2f} | {r['triton_compiles']} "
                     f"({r['triton_cache_hits']}) | {r['logits_sum']:.6g} |")
    lines += ["", "Stage timings per graph:", ""]
    for r in results:
        for g in r["graphs"]:
            stages = ", ".join(f"{k} {v:.2f}" for k, v in g["timings"].items())
            lines.append(f"- {r['input']} precompile {r['precompile']}, graph {g['id']} ({g['kind']}): {stages}"
                         + (f"; {'; '.join(g['notes'])}" if g["notes"] else ""))
    by = {(r["input"], r["precompile"]): r for r in results}
    lines += [""]
    for name in dict.fromkeys(r["input"] for r in results):
        on, off = by.get((name, "on")), by.get((name, "off"))
        if on and off:
            same = on["logits_sum"] == off["logits_sum"] and on["logits_abs_sum"] == off["logits_abs_sum"]
            lines.append(f"- {name}: first call {on['first_call_s']:.2f} s with precompile, {off['first_call_s']:.2f} s "
                         f"without ({on['first_call_s'] / off['first_call_s']:.2f}x); logits "
                         f"{'identical' if same else 'DIFFER'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"))
    p.add_argument("--inputs", nargs="*", choices=[*INPUTS, *SMOKE_INPUTS], help="input names (default: all)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU (interpreter): checks the script")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--precompile", choices=("on", "off"), help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        got = child(args)
        with open(args.json, "w") as f:
            json.dump(got, f)
        return 0

    sys.path.insert(0, HERE)
    from _bench_utils import file_tag, run_meta, write_rows

    names = args.inputs or list(SMOKE_INPUTS if args.cpu_smoke else INPUTS)
    results = []
    for name in names:
        for mode in ("on", "off"):  # alternating per input; each child starts cold
            got = _run_child(name, mode, args.cpu_smoke)
            st = _stage_sums(got)
            print(f"{name:<16} precompile {mode:<3} first call {got['first_call_s']:6.2f} s  precompile "
                  f"{st['precompile_s']:5.2f} s  graphs' first run {st['graph_first_run_s']:5.2f} s  Triton compiles "
                  f"{got['triton_compiles']} ({got['triton_cache_hits']} from disk)", flush=True)
            results.append(got)
    meta = run_meta("cpu" if args.cpu_smoke else "cuda")
    rows = []
    for r in results:
        prov = f"flag_gems_precompile_{r['precompile']}"
        metrics = {k: r[k] for k in ("first_call_s", "second_call_s", "triton_compiles", "triton_cache_hits",
                                     "logits_sum", "process_s")}
        metrics.update(_stage_sums(r))
        for metric, value in metrics.items():
            rows.append(dict(meta, input=r["input"], provider=prov, metric=metric, value=value))
        rows.append(dict(meta, input=r["input"], provider=prov, metric="graphs", value=r["graphs"]))
    text = markdown(results, meta)
    tag = "cpu-smoke" if args.cpu_smoke else file_tag(meta)
    write_rows(rows, args.out, f"precompile_{tag}", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
