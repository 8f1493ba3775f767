"""Launch-config sweep (benchmarks/NOTES.md): every autotuner candidate of a family timed at the issue-2
shapes, one run; the full table behind what the tuner picks.

For each family this builds the autotuner's key at each M, times the heuristic and every
candidate (``kernels/_autotune.py``: the family's own bench and timer, no time budget), checks
each candidate's output against the heuristic's, and prints per M the heuristic's time and
the best candidate's. Nothing is written to the autotune cache (a private one is used); use
``python -m flag_gems.pretune`` or ``bench_tune.py`` to keep tuned configs.

Usage (GPU)::

    python benchmarks/sweep.py --out DIR [--only rms_norm act_and_mul rope pointwise attention matmul] [--ms 1 4096]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_utils as bu  # noqa: E402

DTYPE = torch.bfloat16
MS = [1, 64, 512, 4096, 16384]


def _time(fn):
    return float(bu.device_time_us(fn, replays=7))


def _rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


def _sweep(family, rows, ms, make, rel_tol=2e-2):
    """Time ``make(M) -> (tunable, key, fn)`` under the heuristic and under each candidate.

    ``fn()`` returns the outputs (a tensor or a tuple); a candidate whose outputs differ from the
    heuristic's by more than ``rel_tol`` (relative norm) is an error row.
    """
    for m in ms:
        tunable, key, fn = make(m)
        dev = torch.cuda.current_device()
        default = tunable.default(key, dev)
        with tunable.forcing(default):
            ref = fn()
            base = _time(fn)
        ref = ref if isinstance(ref, tuple) else (ref,)
        rows.append(dict(family=family, M=m, key=str(key), config="heuristic", cfg=default, us=base))
        best = ("heuristic", base)
        for cfg in tunable.candidates(key, dev):
            try:
                with tunable.forcing(cfg):
                    out = fn()
                    out = out if isinstance(out, tuple) else (out,)
                    for a, b in zip(out, ref):
                        if a is not None and not _rel_err(a, b) <= rel_tol:
                            raise AssertionError(f"rel err {_rel_err(a, b):.2e}")
                    us = _time(fn)
            except Exception as e:  # noqa: BLE001 - a failing candidate is a row, not a stop
                rows.append(dict(family=family, M=m, key=str(key), config=str(cfg), cfg=cfg,
                                 error=f"{type(e).__name__}: {e}"[:200]))
                continue
            rows.append(dict(family=family, M=m, key=str(key), config=str(cfg), cfg=cfg, us=us))
            if us < best[1]:
                best = (str(cfg), us)
        print(f"{family:14s} M={m:6d} heuristic {base:9.2f} us | best {best[1]:9.2f} us ({base / best[1]:.3f}x) "
              f"{best[0]}", flush=True)


def sweep_rms_norm(rows, ms):
    import flag_gems
    from flag_gems.kernels import rms_norm as mod

    for hidden in (4096, 7168):
        def make(m, hidden=hidden):
            x = torch.randn(m, hidden, device="cuda", dtype=DTYPE)
            r = torch.randn_like(x)
            w = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(DTYPE)
            return mod.TUNABLE, mod.tune_key(m, hidden, DTYPE, True), lambda: flag_gems.add_rms_norm(x, r, w, 1e-6)

        _sweep(f"add_rms_norm{hidden}", rows, ms, make)


def sweep_act_and_mul(rows, ms):
    import flag_gems
    from flag_gems.kernels import act_and_mul as mod

    d = 14336

    def make(m):
        x = torch.randn(m, 2 * d, device="cuda", dtype=DTYPE)
        return mod.TUNABLE, mod.tune_key(m, d, DTYPE), lambda: flag_gems.silu_and_mul_fused(x)

    _sweep("silu_and_mul", rows, ms, make)


def sweep_rope(rows, ms):
    import flag_gems
    from flag_gems.kernels import rotary_embedding as mod

    n_q, n_kv, hd, max_pos = 32, 8, 128, 32768

    def make(m):
        pos = torch.randint(0, max_pos, (m,), device="cuda")
        q = torch.randn(m, n_q * hd, device="cuda", dtype=DTYPE)
        k = torch.randn(m, n_kv * hd, device="cuda", dtype=DTYPE)
        cache = torch.randn(max_pos, hd, device="cuda", dtype=torch.float32)
        key = mod.tune_key(m, n_q, n_kv, hd // 2, hd, DTYPE, False, False, False)
        return mod.TUNABLE, key, lambda: flag_gems.rotary_embedding_cache(pos, q, k, hd, cache, is_neox=True)

    _sweep("rope", rows, ms, make)


def sweep_pointwise(rows, ms):
    from flag_gems.kernels import pointwise as mod

    def make(m):
        a = torch.randn(m, 4096, device="cuda", dtype=DTYPE)
        b = torch.randn(m, 4096, device="cuda", dtype=DTYPE)
        # plans cache their launch config: build one per call so the forced config is the one launched
        return mod.TUNABLE, mod.tune_key(m * 4096), lambda: mod._build(mod.OPS["add"], (a, b), None,
                                                                       symbolic=False).run((a, b), None)

    _sweep("add_tensor", rows, ms, make, rel_tol=1e-6)


def sweep_attention(rows, ms):
    """Flash attention at Llama-3-8B's heads (32 x 128, HF's [B, L, H, D] layout): M = 1 is a decode
    step of 8 sequences against 1024 keys, any other M a causal prefill of M tokens."""
    import flag_gems
    from flag_gems.kernels import attention as mod

    def make(m):
        b, lq, lk = (8, 1, 1024) if m == 1 else (1, m, m)
        q, k, v = (torch.randn(b, n, 32, 128, device="cuda", dtype=DTYPE).transpose(1, 2) for n in (lq, lk, lk))
        key = mod.tune_key(lq, lk, b * 32, 128, DTYPE, m > 1, 0)
        return mod.TUNABLE, key, lambda: flag_gems.scaled_dot_product_attention(q, k, v, is_causal=m > 1)

    _sweep("attention", rows, [m for m in ms if m <= 8192], make)


def sweep_matmul(rows, ms):
    """``x [M, 4096] @ W[N, 4096]^T`` at two of Llama-3-8B's projections."""
    from flag_gems.kernels import matmul as mod

    for n in (4096, 28672):
        def make(m, n=n):
            a = torch.randn(m, 4096, device="cuda", dtype=DTYPE)
            w = torch.randn(n, 4096, device="cuda", dtype=DTYPE)
            return mod.TUNABLE, mod.tune_key(a, w.t(), None), lambda: mod.matmul(a, w.t())

        _sweep(f"mm_n{n}", rows, ms, make)


SWEEPS = dict(rms_norm=sweep_rms_norm, act_and_mul=sweep_act_and_mul, rope=sweep_rope, pointwise=sweep_pointwise,
              attention=sweep_attention, matmul=sweep_matmul)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--only", nargs="+", choices=sorted(SWEEPS), default=["rms_norm", "act_and_mul", "rope", "pointwise"])
    p.add_argument("--ms", nargs="+", type=int, default=MS)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("sweep.py needs a CUDA device")
    os.environ["GEMS_CACHE_DIR"] = tempfile.mkdtemp(prefix="gems_sweep_")  # the user's cache stays untouched
    os.environ["GEMS_AUTOTUNE"] = "off"  # the heuristic unless a candidate is forced
    torch.manual_seed(0)
    meta = bu.run_meta("cuda")
    rows = []
    for name in args.only:
        SWEEPS[name](rows, args.ms)
    rows = [dict(meta, **{k: (str(v) if k == "cfg" else v) for k, v in r.items()}) for r in rows]
    for path in bu.write_rows(rows, args.out, "sweep_" + bu.file_tag(meta)):
        print("wrote", path)


if __name__ == "__main__":
    main()
