"""Does the autotuner time small kernels as the benchmarks do? One row per shipped key.

For each small-token key of the row-wise families in the shipped table (``kernels/tuned/<gpu>.json``),
the family's own tuning bench (``make_bench``) under the heuristic config is timed by the tuner's
timer (``_autotune.cuda_time_us``) and by the benchmarks' (``_bench_utils.device_time_us``: a CUDA
graph of hundreds of calls); a capture that fails is reported with its error. Where the two
disagree, the tuner ranked candidates by something other than their device time.

Usage (GPU)::

    python benchmarks/tuner_timing_check.py [--max-tokens 64] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_utils as bu  # noqa: E402

import flag_gems  # noqa: E402, F401  (registers every family)
from flag_gems.kernels import _autotune as at  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--families", nargs="+", default=["rms_norm", "act_and_mul", "rope"])
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="only keys of these token buckets")
    p.add_argument("--candidates", action="store_true",
                   help="time every candidate of each key with both timers (the tuner's ranking against the benchmarks')")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    meta = bu.run_meta("cuda")
    path = os.path.join(os.path.dirname(at.__file__), "tuned", meta["gpu"].replace(" ", "_") + ".json")
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    entries = doc if isinstance(doc, list) else doc.get("entries", [])
    lines = [f"tuner timing vs benchmark timing on {meta['gpu']} (torch {meta['torch']}, triton {meta['triton']})",
             "| family | key | tuner us | bench us | ratio | capture |", "|---|---|---:|---:|---:|---|"]
    rows = []
    for e in entries:
        fam = e["kernel"]
        if fam not in args.families or e["key"][0] > args.max_tokens:
            continue
        if args.tokens and e["key"][0] not in args.tokens:
            continue
        tun = at.TUNABLES[fam]
        key = at.key_from_json(e["key"])
        run = tun.make_bench(key, 0, None)
        if args.candidates:
            configs = [tun._default(key, 0)] + [c for c in tun.candidates(key, 0) if c != tun._default(key, 0)]
            for cfg in configs:
                with tun.forcing(cfg):
                    tuner_us = at.cuda_time_us(run)
                    bench_us = float(bu.device_time_us(run))
                label = " ".join(f"{v}" for v in cfg.values())
                rows.append(dict(family=fam, key=str(e["key"]), config=cfg, tuner_us=tuner_us, bench_us=bench_us, **meta))
                lines.append(f"| {fam} | {e['key']} [{label}] | {tuner_us:.2f} | {bench_us:.2f} | "
                             f"{tuner_us / bench_us:.2f} | candidate |")
            best_t = min((r for r in rows if r.get("config") and r["key"] == str(e["key"])), key=lambda r: r["tuner_us"])
            best_b = min((r for r in rows if r.get("config") and r["key"] == str(e["key"])), key=lambda r: r["bench_us"])
            lines.append(f"| {fam} | {e['key']}: tuner's pick {best_t['config']} (bench {best_t['bench_us']:.2f} us); "
                         f"bench's pick {best_b['config']} ({best_b['bench_us']:.2f} us); shipped {e['config']} | | | | |")
            print(lines[-1], flush=True)
            continue
        capture = "ok"
        with tun.forcing(tun._default(key, 0)):
            run()
            torch.cuda.synchronize()
            try:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    run()
                g.replay()
                torch.cuda.synchronize()
                del g
            except Exception as exc:  # noqa: BLE001 - the point of the check
                capture = f"{type(exc).__name__}: {str(exc)[:120]}"
                torch.cuda.synchronize()
            tuner_us = at.cuda_time_us(run)
            bench = bu.device_time_us(run)
            bench_us = float(bench)
            if bench.method != "cuda_graph":
                capture += f" (bench timed by {bench.method})"
        rows.append(dict(family=fam, key=str(e["key"]), tuner_us=tuner_us, bench_us=bench_us, capture=capture, **meta))
        lines.append(f"| {fam} | {e['key']} | {tuner_us:.2f} | {bench_us:.2f} | {tuner_us / bench_us:.2f} | {capture} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        bu.write_rows(rows, args.out, f"tuner_timing_{bu.file_tag(meta)}", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
