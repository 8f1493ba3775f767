"""Where a cold process's first Triton launch goes: compile, launcher build, module load (probe)."""
import os
import tempfile
import time

os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


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


def t():
    torch.cuda.synchronize()
    return time.perf_counter()


x = torch.randn(1024, device="cuda")
y = torch.randn(1024, device="cuda")
z = torch.randn(1024, device="cuda")
t0 = t()
c1 = k1.warmup(x, 1000, B=1024, grid=(1,))
t1 = t()
k1[(1,)](x, 1000, B=1024)
t2 = t()
k1[(1,)](x, 1000, B=1024)
t3 = t()
print(f"k1 compile {t1 - t0:.3f} s, first launch {t2 - t1:.3f} s, second {t3 - t2:.4f} s")
c2 = k2.warmup(x, y, 1000, 2.0, B=1024, grid=(1,))
t4 = t()
k2[(1,)](x, y, 1000, 2.0, B=1024)
t5 = t()
print(f"k2 compile {t4 - t3:.3f} s, first launch {t5 - t4:.3f} s")
c3 = k3.warmup(x, y, z, 1000, B=1024, grid=(1,))
t6 = t()
drv = triton.runtime.driver.active
launcher = drv.launcher_cls(c3.src, c3.metadata)
t7 = t()
k3[(1,)](x, y, z, 1000, B=1024)
t8 = t()
print(f"k3 compile {t6 - t5:.3f} s, launcher_cls alone {t7 - t6:.3f} s, first launch after it {t8 - t7:.3f} s")
print("cache files:", sorted(os.listdir(os.environ["TRITON_CACHE_DIR"]))[:40])
for d in os.listdir(os.environ["TRITON_CACHE_DIR"]):
    print(d, os.listdir(os.path.join(os.environ["TRITON_CACHE_DIR"], d)))
