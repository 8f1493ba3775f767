"""Launch-heuristic sweep (benchmarks/NOTES.md): device time of each candidate config, one run.

For every heuristic listed in NOTES.md this patches the one function that picks the launch
config, times the kernel at the issue-2 shapes (bf16, Llama-3-8B) over a grid of candidates,
checks each candidate's output against the current heuristic's, and prints, per M, the
current choice's time and the best candidate's. Nothing here changes the library: the
outcome is read by a person and folded into the heuristic.

Usage (GPU)::

    python benchmarks/sweep.py --out DIR [--only rms_norm act_and_mul rope pointwise]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_utils as bu  # noqa: E402

DTYPE = torch.bfloat16
MS = [1, 64, 512, 4096, 16384]


def _time(fn):
    return float(bu.device_time_us(fn, replays=7))


def _sweep(family, ms, make, candidates, patch, rows, rel_tol=2e-2):
    """Time ``make(M)()`` under the current heuristic and under each candidate config.

    Args:
        family: name for the rows.
        ms: token counts.
        make: M -> zero-argument fn returning the outputs (tuple or tensor).
        candidates: configs (tuples) to try.
        patch: config -> context manager that makes the library use that config.
        rows: list the result rows are appended to.
    """
    for m in ms:
        fn = make(m)
        ref = fn()
        ref = ref if isinstance(ref, tuple) else (ref,)
        base = _time(fn)
        rows.append(dict(family=family, M=m, config="current", us=base))
        best = ("current", base)
        for cfg in candidates:
            try:
                with patch(cfg):
                    out = fn()
                    out = out if isinstance(out, tuple) else (out,)
                    for a, b in zip(out, ref):
                        if a is None:
                            continue
                        err = ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()
                        if not err <= rel_tol:
                            raise AssertionError(f"rel err {err:.2e}")
                    us = _time(fn)
            except Exception as e:  # noqa: BLE001 - a failing candidate is a row, not a stop
                rows.append(dict(family=family, M=m, config=str(cfg), error=f"{type(e).__name__}: {e}"[:200]))
                continue
            rows.append(dict(family=family, M=m, config=str(cfg), us=us))
            if us < best[1]:
                best = (str(cfg), us)
        print(f"{family:14s} M={m:6d} current {base:9.2f} us | best {best[0]:>24s} {best[1]:9.2f} us "
              f"({base / best[1]:.3f}x)", flush=True)


def sweep_rms_norm(rows, ms):
    import flag_gems
    from flag_gems.kernels import rms_norm as mod

    for hidden in (4096, 7168):
        def make(m, hidden=hidden):
            x = torch.randn(m, hidden, device="cuda", dtype=DTYPE)
            r = torch.randn_like(x)
            w = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(DTYPE)
            return lambda: flag_gems.add_rms_norm(x, r, w, 1e-6)

        block = mod.row_config(hidden, 2)[0]
        cands = [(block, w) for w in (2, 4, 8, 16, 32) if block // (w * 32) >= 1]
        _sweep(f"add_rms_norm{hidden}", ms, make, cands,
               lambda cfg: mock.patch.object(mod, "row_config", lambda n, e, cfg=cfg: cfg), rows)


def sweep_act_and_mul(rows, ms):
    import flag_gems
    from flag_gems.kernels import act_and_mul as mod

    d = 14336

    def make(m):
        x = torch.randn(m, 2 * d, device="cuda", dtype=DTYPE)
        return lambda: flag_gems.silu_and_mul_fused(x)

    cands = [(1, bn, w) for bn, w in itertools.product((512, 1024, 2048, 4096, 8192), (2, 4, 8, 16))
             if bn // (w * 32) >= 4]
    _sweep("silu_and_mul", ms, make, cands,
           lambda cfg: mock.patch.object(mod, "_config", lambda r, c, t, cfg=cfg: cfg), rows)


def sweep_rope(rows, ms):
    import flag_gems
    from flag_gems.kernels import rotary_embedding as mod

    n_q, n_kv, hd, max_pos = 32, 8, 128, 32768

    def make(m):
        pos = torch.randint(0, max_pos, (m,), device="cuda")
        q = torch.randn(m, n_q * hd, device="cuda", dtype=DTYPE)
        k = torch.randn(m, n_kv * hd, device="cuda", dtype=DTYPE)
        cache = torch.randn(max_pos, hd, device="cuda", dtype=torch.float32)
        return lambda: flag_gems.rotary_embedding_cache(pos, q, k, hd, cache, is_neox=True)

    cands = [(bq, bk, 64, 1, w) for bq, bk, w in itertools.product((4, 8, 16, 32), (2, 4, 8), (1, 2, 4, 8))
             if bq >= bk and bq * 64 // (w * 32) >= 2]
    _sweep("rope", ms, make, cands,
           lambda cfg: mock.patch.object(mod, "rope_config", lambda *a, cfg=cfg: cfg), rows)


def sweep_pointwise(rows, ms):
    from flag_gems.kernels import pointwise as mod

    def make(m):
        a = torch.randn(m, 4096, device="cuda", dtype=DTYPE)
        b = torch.randn(m, 4096, device="cuda", dtype=DTYPE)
        return lambda: torch.ops.flag_gems.add_tensor(a, b)

    @contextlib.contextmanager
    def patch(cfg):  # launch plans are cached: drop them on the way in and out
        mod._PLANS.clear()
        with mock.patch.object(mod, "launch_config", lambda n, cfg=cfg: cfg):
            yield
        mod._PLANS.clear()

    cands = [(bl, w) for bl, w in itertools.product((512, 1024, 2048, 4096, 8192), (2, 4, 8, 16))
             if bl // (w * 32) >= 4]
    _sweep("add_tensor", ms, make, cands, patch, rows, rel_tol=1e-6)


def sweep_attention(rows, ms):
    """Flash attention at Llama-3-8B's heads (32 x 128, HF's [B, L, H, D] layout): M = 1 is a decode
    step of 8 sequences against 1024 keys, any other M a causal prefill of M tokens."""
    import flag_gems
    from flag_gems.kernels import attention as mod

    def make(m):
        b, lq, lk = (8, 1, 1024) if m == 1 else (1, m, m)
        q, k, v = (torch.randn(b, n, 32, 128, device="cuda", dtype=DTYPE).transpose(1, 2) for n in (lq, lk, lk))
        return lambda: flag_gems.scaled_dot_product_attention(q, k, v, is_causal=m > 1)

    for m in ms:
        if m == 1:
            cands = [(16, bn, w, st) for bn, w, st in itertools.product((64, 128), (4, 8), (2, 3))]
        else:
            cands = [(bm, bn, w, st) for bm, bn, w, st in itertools.product((64, 128), (64, 128), (4, 8), (2, 3))]
        _sweep("attention", [m], make, cands,
               lambda cfg: mock.patch.object(mod, "attention_config", lambda *a, cfg=cfg: cfg), rows)


SWEEPS = dict(rms_norm=sweep_rms_norm, act_and_mul=sweep_act_and_mul, rope=sweep_rope, pointwise=sweep_pointwise,
              attention=sweep_attention)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--only", nargs="+", choices=sorted(SWEEPS), default=list(SWEEPS))
    p.add_argument("--ms", nargs="+", type=int, default=MS)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("sweep.py needs a CUDA device")
    torch.manual_seed(0)
    meta = bu.run_meta("cuda")
    rows = []
    for name in args.only:
        SWEEPS[name](rows, args.ms)
    rows = [dict(meta, **r) for r in rows]
    for path in bu.write_rows(rows, args.out, "sweep_" + bu.file_tag(meta)):
        print("wrote", path)


if __name__ == "__main__":
    main()
