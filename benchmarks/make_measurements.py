"""Regenerate ``lowerings/measurements.py`` (the registry's measurement data) from benchmark results.

Reads the long-format rows of ``benchmarks/results/ops_*.json`` (``bench_ops.py``: each aten op's
kernel vs the native op, called alone, and with ``--parts graph`` inside a compiled graph) and
``kernels_*.json`` (``bench_kernels.py``: the fused kernels vs the unfused ops and Inductor), and
writes one row per (op, case, shape, mode, baseline, GPU), the newest run winning::

    python benchmarks/make_measurements.py                      # every results file
    python benchmarks/make_measurements.py path/to/ops_X.json   # add a new run to the committed ones

The output is plain data (a tuple of tuples) so the installed package carries it; the registry
renders it into its policies and ``describe()``. ``--check`` exits 1 when the committed file is
not what the results give (CI: the data stays traceable to the results).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from op_cases import CASES, Call, case_dtype  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "..", "lowerings", "measurements.py")
FIELDS = ("op", "case", "shape", "dtype", "device", "mode", "baseline", "ratio", "ours_us", "base_us",
          "ours_host_us", "base_host_us", "date", "source")

# bench_kernels.py: (op, our provider) -> the flag_gems op it ran; baselines compared against.
KERNEL_OPS = {
    ("add_rms_norm", "flag_gems"): "flag_gems::add_rms_norm",
    ("silu_and_mul", "flag_gems"): "flag_gems::silu_and_mul_fused",
    ("silu_and_mul", "flag_gems_ab"): "flag_gems::silu_and_mul",
    ("rope", "flag_gems"): "flag_gems::rotary_embedding_cache",
}
KERNEL_BASELINES = ("eager", "inductor")
# bench_ops.py: our provider -> (mode, baseline provider)
OP_MODES = {"flag_gems": ("eager", "native"), "graph_flag_gems": ("graph", "graph_native")}


def _dtype(case: str) -> str:
    args = CASES[case][1](8, 64, "meta")
    return case_dtype(args[0] if isinstance(args, Call) else args)


def _num(v, digits):
    return None if v is None else round(float(v), digits)


def op_rows(rows: list[dict], source: str) -> list[tuple]:
    """Rows of one ``bench_ops.py`` results file (model rows and unknown cases skipped)."""
    cells: dict = {}
    for r in rows:
        if r["gpu"].startswith("cpu") or r["op"] not in CASES or not isinstance(r["value"], (int, float)):
            continue
        cells.setdefault((r["op"], r["shape"]), {"meta": r})[(r["provider"], r["metric"])] = r["value"]
    out = []
    for (case, shape), m in cells.items():
        meta = m["meta"]
        for ours, (mode, base) in OP_MODES.items():
            if (ours, "device_us") not in m or (base, "device_us") not in m:
                continue
            ours_us, base_us = m[(ours, "device_us")], m[(base, "device_us")]
            out.append((str(CASES[case][0]), case, shape, meta.get("dtype") or _dtype(case), meta["gpu"], mode,
                        "native", _num(base_us / ours_us, 3), _num(ours_us, 2), _num(base_us, 2),
                        _num(m.get((ours, "host_us")), 1), _num(m.get((base, "host_us")), 1), meta["date"][:10], source))
    return out


def kernel_rows(rows: list[dict], source: str) -> list[tuple]:
    """Rows of one ``bench_kernels.py`` results file: each fused kernel vs eager and Inductor."""
    cells: dict = {}
    for r in rows:
        if r["gpu"].startswith("cpu") or r["metric"] not in ("device_us", "host_us"):
            continue
        cells.setdefault((r["op"], r["M"]), {"meta": r})[(r["provider"], r["metric"])] = r["value"]
    out = []
    for (case, M), m in cells.items():
        meta = m["meta"]
        for (kcase, provider), op in KERNEL_OPS.items():
            if kcase != case or (provider, "device_us") not in m:
                continue
            ours_us = m[(provider, "device_us")]
            for base in KERNEL_BASELINES:
                if (base, "device_us") not in m:
                    continue
                base_us = m[(base, "device_us")]
                out.append((op, f"{case}[{provider}]", f"M={M}", "bfloat16", meta["gpu"], "fused", base,
                            _num(base_us / ours_us, 3), _num(ours_us, 2), _num(base_us, 2),
                            _num(m.get((provider, "host_us")), 1), _num(m.get((base, "host_us")), 1),
                            meta["date"][:10], source))
    return out


def collect(paths: list[str]) -> list[tuple]:
    """Every row of ``paths``; the newest per (op, case, shape, mode, baseline, GPU)."""
    newest: dict = {}
    for path in sorted(paths):
        source = os.path.splitext(os.path.basename(path))[0]
        with open(path) as f:
            rows = json.load(f)
        if not rows:
            continue
        dates = {r["date"] for r in rows if "date" in r}
        stamp = max(dates) if dates else ""
        make = kernel_rows if "M" in rows[0] else op_rows
        for row in make(rows, source):
            key = (row[0], row[1], row[2], row[5], row[6], row[4])
            if key not in newest or stamp >= newest[key][0]:
                newest[key] = (stamp, row)
    return [row for _, row in sorted(newest.values(), key=lambda v: v[1][:7])]


def render(rows: list[tuple], sources: list[str]) -> str:
    """The text of ``lowerings/measurements.py``."""
    names = sorted({os.path.basename(p) for p in sources})
    lines = [
        '"""Benchmark measurements behind the registry\'s policies: GENERATED, do not edit.',
        "",
        "Regenerate with ``python benchmarks/make_measurements.py`` from ``benchmarks/results/``:",
        *[f"    {n}" for n in names],
        "Field meanings: ``flag_gems.lowerings.registry.Measurement``.",
        '"""',
        "",
        f"FIELDS = {FIELDS!r}",
        "",
        "ROWS = (",
        *[f"    {row!r}," for row in rows],
        ")",
        "",
    ]
    return "\n".join(lines)


def default_paths() -> list[str]:
    results = os.path.join(HERE, "results")
    return sorted(glob.glob(os.path.join(results, "ops_*.json")) + glob.glob(os.path.join(results, "kernels_*.json")))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="*", help="results files to add to the committed ones (default: only those)")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = p.parse_args(argv)
    paths = sorted(set(default_paths()) | {os.path.abspath(x) for x in args.paths})
    text = render(collect(paths), paths)
    if args.check:
        with open(args.out) as f:
            same = f.read() == text
        print("measurements up to date" if same else f"{args.out} differs from what the results give; regenerate it")
        return 0 if same else 1
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out} ({text.count(chr(10) + '    (')} rows from {len(paths)} files)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
