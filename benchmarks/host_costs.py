"""Host µs per call of the statements a compiled graph's flat wrapper is made of, side by side.

What one decode step's host time is built from (``wrapper.py``'s generated ``call``): GEMMs
through aten (allocating their output, or into a reused buffer with ``out=``), allocations and
frees, views, our C++ ops (through the boxed redispatch the wrapper uses, and through the
full dispatcher), and generated Triton kernels through ``FastKernel``. Each row times one
statement kind alone, issued back to back without synchronizing (``host_time_us``), at
decode sizes (Llama-3-8B, 8 tokens).

Run: ``python3 benchmarks/host_costs.py [--out DIR] [--calls N]`` (on a GPU; ``--cpu-smoke`` only
checks that the script works: tiny shapes, through Triton's interpreter without a GPU).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_utils import host_time_us, run_meta, write_rows  # noqa: E402


def _cases(device: str, tokens: int, hidden: int, inter: int, dtype):
    """(name, callable) pairs: each callable is one statement of a generated wrapper."""
    from torch._C._dynamo.guards import _reinterpret_tensor as rt

    from flag_gems import c_runtime  # main() imported flag_gems first (torch.ops.flag_gems)

    aten = torch.ops.aten

    empty_cuda = getattr(torch._C._dynamo.guards, "_empty_strided_cuda", None)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    w = torch.randn(hidden, hidden, device=device, dtype=dtype)
    wt = w.t()
    buf = torch.empty(tokens, hidden, device=device, dtype=dtype)
    a = torch.randn(tokens, inter, device=device, dtype=dtype)
    b = torch.randn(tokens, inter, device=device, dtype=dtype)
    res = torch.randn(tokens, hidden, device=device, dtype=dtype)
    nw = torch.randn(hidden, device=device, dtype=dtype)
    mm, mm_out = aten.mm.default, aten.mm.out

    cases = [
        ("mm (allocates its output)", lambda: mm(x, wt)),
        ("mm out= (a reused buffer)", lambda: mm_out(x, wt, out=buf)),
        ("reinterpret_tensor (a view)", lambda: rt(w, (hidden, hidden), (1, hidden), 0)),
        ("torch.empty_strided + free", lambda: torch.empty_strided((tokens, hidden), (hidden, 1), device=device,
                                                                    dtype=dtype)),
    ]
    if empty_cuda is not None and device == "cuda":
        cases.append(("_empty_strided_cuda + free (Inductor's allocation)",
                      lambda: empty_cuda((tokens, hidden), (hidden, 1), dtype)))
    fast = c_runtime.fast_ops(torch.device(device).type) if c_runtime.available else None
    ops = torch.ops.flag_gems
    cases.append(("silu_and_mul: torch.ops.flag_gems (dispatcher)", lambda: ops.silu_and_mul(a, b)))
    cases.append(("add_rms_norm: torch.ops.flag_gems (dispatcher)",
                  lambda: ops.add_rms_norm(x, res, nw, 1e-5)))
    if fast is not None:
        cases.append(("silu_and_mul: fast_ops (boxed redispatch, the wrapper's call)",
                      lambda: fast.silu_and_mul(a, b)))
        cases.append(("add_rms_norm: fast_ops (boxed redispatch, the wrapper's call)",
                      lambda: fast.add_rms_norm(x, res, nw, 1e-5)))
    add_k = _fused_add_kernel() if device == "cuda" else None  # FastKernel needs a compiled kernel
    if add_k is None:
        return cases
    n = tokens * hidden
    out = torch.empty_like(x)
    cases.append(("generated pointwise kernel: FastKernel.run",
                  lambda: add_k.run(x, res, out, n, grid=((n + 1023) // 1024,), warmup=False, BLOCK=1024,
                                    num_warps=4)))
    cases.append(("generated pointwise kernel: triton JITFunction.run",
                  lambda: add_k.fn.run(x, res, out, n, grid=((n + 1023) // 1024,), warmup=False, BLOCK=1024,
                                       num_warps=4)))
    return cases


def _fused_add_kernel():
    import triton
    import triton.language as tl

    from flag_gems.kernels._launch import FastKernel

    @triton.jit
    def _add(x_ptr, y_ptr, o_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(o_ptr + offs, tl.load(x_ptr + offs, mask=m) + tl.load(y_ptr + offs, mask=m), mask=m)

    return FastKernel(_add)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes (the interpreter without a GPU): checks the script")
    args = p.parse_args(argv)
    import flag_gems  # noqa: F401  (first: without CUDA it switches Triton's interpreter on)

    if args.cpu_smoke:  # tiny shapes: on the GPU when one is usable, else through the interpreter
        device = "cuda" if torch.cuda.is_available() else "cpu"
        hidden, inter, dtype, calls = 64, 128, torch.float32, 20
    else:
        if not torch.cuda.is_available():
            p.error("needs a CUDA device (or --cpu-smoke)")
        device, hidden, inter, dtype, calls = "cuda", 4096, 14336, torch.bfloat16, args.calls
    meta = run_meta(device)
    rows = []
    lines = [f"host µs per call, {meta.get('gpu', device)} (torch {torch.__version__}), tokens {args.tokens}",
             "", "| statement | host µs |", "| --- | ---: |"]
    for name, fn in _cases(device, args.tokens, hidden, inter, dtype):
        us = host_time_us(fn, calls=calls, batches=5, warmup=20 if not args.cpu_smoke else 2)
        rows.append({**meta, "statement": name, "tokens": args.tokens, "host_us": round(us, 3)})
        lines.append(f"| {name} | {us:.2f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    write_rows(rows, args.out, "host_costs_cpu-smoke" if args.cpu_smoke else "host_costs", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
