"""Where a cold process's first Triton launches go: compile, launcher build, module load.

Three tiny kernels of distinct signatures, in a process with an empty Triton cache folder: each
kernel's compile (``warmup``), its first launch (Triton <= 3.6 builds the launcher then: a C
module per signature, compiled by the host compiler, then the module load), its second launch,
and for the third kernel the launcher built alone (``driver.active.launcher_cls``) before its first
launch. What ``kernels/_precompile.py``'s workers build ahead of a graph's first run.

Run on a GPU: ``python3 benchmarks/launcher_probe.py`` (prints seconds and the cache folder's entries).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time


def main() -> int:
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()  # before Triton is imported: a cold cache
    import torch
    import triton
    import triton.language as tl

    if not torch.cuda.is_available():
        print("launcher_probe: needs a CUDA device", file=sys.stderr)
        return 1

    @triton.jit
    def k1(x, n, B: tl.constexpr):
        o = tl.arange(0, B)
        tl.store(x + o, tl.load(x + o, mask=o < n) + 1, mask=o < n)

    @triton.jit
    def k2(x, y, n, s, B: tl.constexpr):
        o = tl.arange(0, B)
        tl.store(y + o, tl.load(x + o, mask=o < n) * s, mask=o < n)

    @triton.jit
    def k3(x, y, z, n, B: tl.constexpr):
        o = tl.arange(0, B)
        tl.store(z + o, tl.load(x + o, mask=o < n) + tl.load(y + o, mask=o < n), mask=o < n)

    def now():
        torch.cuda.synchronize()
        return time.perf_counter()

    x, y, z = (torch.randn(1024, device="cuda") for _ in range(3))
    t0 = now()
    k1.warmup(x, 1000, B=1024, grid=(1,))
    t1 = now()
    k1[(1,)](x, 1000, B=1024)
    t2 = now()
    k1[(1,)](x, 1000, B=1024)
    t3 = now()
    print(f"k1 compile {t1 - t0:.3f} s (the process's first), first launch {t2 - t1:.3f} s, second {t3 - t2:.4f} s")
    k2.warmup(x, y, 1000, 2.0, B=1024, grid=(1,))
    t4 = now()
    k2[(1,)](x, y, 1000, 2.0, B=1024)
    t5 = now()
    print(f"k2 compile {t4 - t3:.3f} s, first launch {t5 - t4:.3f} s")
    c3 = k3.warmup(x, y, z, 1000, B=1024, grid=(1,))
    t6 = now()
    triton.runtime.driver.active.launcher_cls(c3.src, c3.metadata)
    t7 = now()
    k3[(1,)](x, y, z, 1000, B=1024)
    t8 = now()
    print(f"k3 compile {t6 - t5:.3f} s, launcher built alone {t7 - t6:.3f} s, first launch after it {t8 - t7:.3f} s")
    cache = os.environ["TRITON_CACHE_DIR"]
    for d in sorted(os.listdir(cache)):
        print(d, sorted(os.listdir(os.path.join(cache, d))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
