"""RoPE launch variants side by side: the kernel's head blocks, warps and q/k pairing against Liger.

For each token count, vLLM's token layout as ``bench_kernels.py`` sets it up (q [M, 32*128],
k [M, 8*128] bf16, in place, positions into an fp32 cos|sin cache): ``rotary_embedding_cache``
with the config the launcher resolves, the same call with each forced config, and Liger's
rope on pre-gathered rows. ``paired``: program (token, b) rotates q head block b and k head
block b (one table load per token for both; grid ``max`` of the block counts instead of
their sum). Each variant's result is checked against the resolved config's first.

Usage (GPU)::

    python benchmarks/rope_variants.py [--ms 1 64 4096 16384] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_utils as bu  # noqa: E402
import bench_kernels as bk  # noqa: E402

import flag_gems  # noqa: E402
from flag_gems.kernels import _autotune as at  # noqa: E402
from flag_gems.kernels import rotary_embedding as kr  # noqa: E402

# (BLOCK_HQ, BLOCK_HK, num_warps, paired)
VARIANTS = [
    (16, 8, 2, False), (32, 8, 4, False), (16, 4, 4, False),
    (32, 8, 4, True), (32, 8, 8, True), (32, 8, 2, True),
    (16, 4, 2, True), (16, 4, 4, True), (8, 2, 2, True), (8, 2, 1, True), (4, 1, 1, True),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ms", type=int, nargs="+", default=[1, 64, 4096, 16384])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dims = bk.LLAMA3_8B
    hd = dims["head_dim"]
    meta = bu.run_meta("cuda")
    rows, lines = [], [f"rope variants on {meta['gpu']} (torch {meta['torch']}, triton {meta['triton']})",
                       "| M | variant | us | vs Liger | GB/s |", "|---:|---|---:|---:|---:|"]
    for m in args.ms:
        t, nbytes, _ = bk.setup_rope(m, dims, "cuda")
        pos, q0, k0, cache = t["positions"], t["q"], t["k"], t["cache"]

        def ours(q, k):
            return lambda: flag_gems.rotary_embedding_cache(pos, q, k, hd, cache, is_neox=True)

        q, k = q0.clone(), k0.clone()
        ours(q, k)()
        ref = (q.clone(), k.clone())
        results = {"resolved": bu.device_time_us(ours(q0.clone(), k0.clone()))}
        key = kr.tune_key(m, dims["n_q"], dims["n_kv"], hd // 2, hd, q0.dtype, False, False, False)
        for bhq, bhk, w, paired in VARIANTS:
            name = f"hq{bhq} hk{bhk} w{w}{' paired' if paired else ''}"
            saved = kr.TUNABLE.chosen
            kr.TUNABLE.chosen = at._Forced(saved, (bhq, bhk, 64, 1, w, paired))
            try:
                q, k = q0.clone(), k0.clone()
                ours(q, k)()
                torch.testing.assert_close((q, k), ref, atol=0, rtol=0)
                results[name] = bu.device_time_us(ours(q0.clone(), k0.clone()))
            except Exception as exc:  # noqa: BLE001 - a variant that fails is reported, not fatal
                results[name] = float("nan")
                lines.append(f"| {m} | {name} | failed: {type(exc).__name__}: {str(exc)[:80]} | | |")
            finally:
                kr.TUNABLE.chosen = saved
        lig = bk._liger_rope(t)[0] if _has_liger() else None
        liger_us = bu.device_time_us(lig) if lig else float("nan")
        results["liger"] = liger_us
        print(f"M={m} key={key} resolved={kr.TUNABLE.chosen.get((0, key))}", flush=True)
        for name, us in results.items():
            rows.append(dict(op="rope", M=m, variant=name, us=float(us), vs_liger=float(us) / liger_us,
                             gbps=bu.gbps(nbytes, us), **meta))
            lines.append(f"| {m} | {name} | {us:.2f} | {us / liger_us:.2f} | {bu.gbps(nbytes, us):.0f} |")
        print("\n".join(lines[-len(results):]), flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        bu.write_rows(rows, args.out, f"rope_variants_{bu.file_tag(meta)}", text)
    return 0


def _has_liger() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
