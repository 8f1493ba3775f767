"""Where the host time of one eager op call goes: native vs ``use_gems``, and a cProfile of ours.

For each op (small decode-like shapes, where host time is the whole cost): host µs per call of
the native op, of ours under ``use_gems(include=[op])``, and of ours through Triton's own
launch path (``flag_gems.kernels._launch`` off), then the top functions by own time::

    python benchmarks/host_profile_ops.py [--ops add.Tensor mean.dim] [--top 15]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_utils import host_time_us  # noqa: E402

import flag_gems  # noqa: E402
from flag_gems.kernels import _launch  # noqa: E402

aten = torch.ops.aten


def _cases(device):
    def t(*shape, dtype=torch.bfloat16):
        return torch.randn(shape, dtype=dtype, device=device)

    return {
        "add.Tensor": (aten.add.Tensor, (t(8, 4096), t(8, 4096)), {}),
        "mul.Tensor": (aten.mul.Tensor, (t(8, 4096), t(8, 4096)), {}),
        "masked_fill.Scalar": (aten.masked_fill.Scalar, (t(8, 4096), t(8, 4096) > 0, -1e4), {}),
        "mean.dim": (aten.mean.dim, (t(8, 4096, dtype=torch.float32), [-1], True), {}),
        "_softmax.default": (aten._softmax.default, (t(8, 4096), -1, False), {}),
        "_to_copy.default": (aten._to_copy.default, (t(8, 4096),), {"dtype": torch.float32}),
        "embedding.default": (aten.embedding.default,
                              (t(128256, 4096), torch.randint(0, 128256, (8, 1), device=device)), {}),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", nargs="*")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--calls", type=int, default=2000)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name, (op, a, kw) in _cases(device).items():
        if args.ops and name not in args.ops:
            continue
        native = host_time_us(lambda: op(*a, **kw), calls=200, batches=5)
        with flag_gems.use_gems(include=[name]):
            ours = host_time_us(lambda: op(*a, **kw), calls=200, batches=5)
            saved, _launch._ENABLED = _launch._ENABLED, False
            try:
                triton_path = host_time_us(lambda: op(*a, **kw), calls=200, batches=5)
            finally:
                _launch._ENABLED = saved
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.calls):
                op(*a, **kw)
            prof.disable()
        if device == "cuda":
            torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.top)
        body = "\n".join(ln for ln in s.getvalue().splitlines() if ln.strip() and not ln.startswith("   Ordered"))
        print(f"== {name}: native {native:.1f} us, use_gems {ours:.1f} us ({ours / native:.2f}x), "
              f"Triton's launch path {triton_path:.1f} us\n{body}\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
