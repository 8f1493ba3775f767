"""Grouped linears (``flag_gems::linear_group``, ``options={"fuse_linear": True}``) against separate ones.

Llama-3-8B's two groups (K = 4096, bf16): q/k/v (N = 4096 + 1024 + 1024) and gate/up
(N = 14336 + 14336), at decode and prefill token counts. Contenders, in one process:

* ``separate``: one ``F.linear`` per weight (what the graph runs without the option);
* ``grouped``: the op on weights stacked in one buffer (one GEMM);
* ``grouped_unstacked``: the op on separate weights (its fallback: one GEMM per weight into
  column blocks of one output; should match ``separate``).

Device µs by CUDA-graph replay; weight GB/s (weights read once per call) and % of a measured
device-to-device copy; host µs to issue one call. ``--cpu-smoke``: tiny shapes on the CPU,
checks the script, measures nothing.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_utils import copy_bandwidth, device_time_us, file_tag, gbps, host_time_us, run_meta, wall_time_us, write_rows  # noqa: E402

GROUPS = {"qkv": (4096, [4096, 1024, 1024]), "gate_up": (4096, [14336, 14336])}
MS = (1, 8, 64, 2048)
SMOKE_GROUPS = {"qkv": (32, [32, 8, 8]), "gate_up": (32, [64, 64])}
SMOKE_MS = (1, 3)


def contenders(x, weights):
    from flag_gems.lowerings.linear_group import linear_group

    buf = torch.cat(weights)
    stacked = list(buf.split([w.shape[0] for w in weights]))
    return {
        "separate": lambda: [F.linear(x, w) for w in weights],
        "grouped": lambda: linear_group(x, stacked, []),
        "grouped_unstacked": lambda: linear_group(x, weights, []),
    }


def run(args) -> list[dict]:
    import flag_gems  # noqa: F401  (registers the op)

    device = "cpu" if args.cpu_smoke else "cuda"
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    groups, ms = (SMOKE_GROUPS, SMOKE_MS) if args.cpu_smoke else (GROUPS, args.ms)
    meta = run_meta(device)
    rows = []
    copy_gbps, _ = copy_bandwidth(device, nbytes=(1 << 20) if args.cpu_smoke else (1 << 30))
    rows.append(dict(meta, group="copy", m=0, provider="copy", metric="gbps", value=copy_gbps))
    for name, (k, sizes) in groups.items():
        torch.manual_seed(0)
        weights = [torch.randn(n, k, device=device, dtype=dtype) for n in sizes]
        wbytes = sum(w.numel() for w in weights) * weights[0].element_size()
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=dtype)
            fns = contenders(x, weights)
            ref = torch.cat(fns["separate"](), dim=-1).float()
            for prov, fn in fns.items():
                out = fn()
                out = torch.cat(out, -1) if isinstance(out, list) else out
                err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                us = wall_time_us(fn, iters=3) if args.cpu_smoke else float(device_time_us(fn))
                host = host_time_us(fn, calls=20 if args.cpu_smoke else 200)
                for metric, value in (("device_us", us), ("host_us", host), ("rel_err", err),
                                      ("weight_gbps", gbps(wbytes, us)), ("pct_of_copy", 100 * gbps(wbytes, us) / copy_gbps)):
                    rows.append(dict(meta, group=name, m=m, provider=prov, metric=metric, value=value))
                print(f"{name:<8} M={m:<5} {prov:<18} {us:9.2f} us  {gbps(wbytes, us):7.0f} GB/s  host {host:6.1f} us  "
                      f"err {err:.1e}", flush=True)
    return rows


def markdown(rows) -> str:
    t = {}
    for r in rows:
        t[(r["group"], r["m"], r["provider"], r["metric"])] = r["value"]
    m0 = rows[0]
    lines = [f"GPU: {m0['gpu']} · torch {m0['torch']} · triton {m0['triton']} · {m0['date']} · git {m0['git']}", "",
             f"copy: {t[('copy', 0, 'copy', 'gbps')]:.0f} GB/s", "",
             "| group | M | separate µs | grouped µs | grouped / separate | grouped GB/s (% copy) | unstacked µs | host µs separate / grouped |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for (g, m) in dict.fromkeys((r["group"], r["m"]) for r in rows if r["group"] != "copy"):
        s, gr, un = (t[(g, m, p, "device_us")] for p in ("separate", "grouped", "grouped_unstacked"))
        lines.append(f"| {g} | {m} | {s:.2f} | {gr:.2f} | {gr / s:.2f}x | {t[(g, m, 'grouped', 'weight_gbps')]:.0f} "
                     f"({t[(g, m, 'grouped', 'pct_of_copy')]:.0f} %) | {un:.2f} | "
                     f"{t[(g, m, 'separate', 'host_us')]:.1f} / {t[(g, m, 'grouped', 'host_us')]:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--ms", nargs="*", type=int, default=list(MS))
    p.add_argument("--cpu-smoke", action="store_true")
    args = p.parse_args(argv)
    rows = run(args)
    md = markdown(rows)
    print(md)
    stem = "linear_group_" + ("cpu-smoke" if args.cpu_smoke else file_tag(rows[0]))
    write_rows(rows, args.out, stem, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
