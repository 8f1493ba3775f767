"""Where the model's time goes: torch.profiler over the bench_model model, per contender and input.

Prints, per (input, contender), the device kernels by total time (top N), the number of kernel
launches per call and the device / host time per call, plus the flag_gems report of the
prefill graph. A diagnosis aid for benchmarks/NOTES.md, not a benchmark (the profiler adds
host overhead).

Usage (GPU)::

    python benchmarks/profile_model.py [--top 12] [--contenders eager inductor flag_gems] [--host]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_model as bm  # noqa: E402
from _bench_utils import profile_calls  # noqa: E402

import flag_gems  # noqa: E402


def _device_us(evt) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, name):
            return getattr(evt, name)
    return 0.0


def profile_one(fn, calls: int, top: int) -> str:
    kernels = [e for e in profile_calls(fn, calls, warmup=3) if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels.sort(key=_device_us, reverse=True)
    total = sum(_device_us(e) for e in kernels)
    launches = sum(e.count for e in kernels)
    lines = [f"  device {total / calls:9.1f} us/call, {launches / calls:.0f} kernels/call"]
    for e in kernels[:top]:
        lines.append(f"    {_device_us(e) / calls:9.1f} us  x{e.count // calls:<4d} {e.key[:110]}")
    return "\n".join(lines)


def host_view(fn, calls: int, top: int, profiled: int = 50) -> str:
    """Host µs per call issued without syncs (median of ``calls``), and a cProfile of ``profiled``
    calls as µs per call of each function (own time and with callees), the largest own times first."""
    import cProfile
    import pstats
    import statistics
    import time

    for _ in range(3):
        fn()
    samples = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(profiled):
        fn()
        torch.cuda.synchronize()
    pr.disable()
    stats = pstats.Stats(pr).stats  # (file, line, name) -> (primitive calls, calls, own s, cumulative s, callers)
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    lines = [f"  host {statistics.median(samples):9.1f} us/call (no sync); cProfile of {profiled} calls "
             "(profiler overhead included), per call:",
             f"    {'own us':>8} {'cum us':>8} {'calls':>6}  function"]
    for (file, line, name), (_, n, own, cum, _) in rows:
        where = name if file == "~" else f"{os.path.basename(file)}:{line}({name})"
        if "synchronize" in name:
            continue
        lines.append(f"    {own / profiled * 1e6:8.1f} {cum / profiled * 1e6:8.1f} {n / profiled:6.1f}  {where}")
    return "\n".join(lines)


def lines_view(fn, calls: int, top: int) -> str:
    """Host µs per line of the generated functions (``line_timer.LineTimer``) over ``calls`` calls."""
    from line_timer import LineTimer

    for _ in range(3):
        fn()
    timer = LineTimer()
    with timer:
        for _ in range(calls):
            fn()
            torch.cuda.synchronize()
    return timer.report(calls, top)


# The eager model under the dispatcher mode: every entry, the fast preset, and one entry the model
# never calls (the cost of having a registration at all).
EAGER_MODES = {
    "use_gems": lambda: flag_gems.use_gems(),
    "use_gems_fast": lambda: flag_gems.use_gems(preset="fast"),
    "use_gems_idle": lambda: flag_gems.use_gems(include=["_log_softmax.default"]),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--host", action="store_true", help="host time per call and a cProfile instead of kernels")
    p.add_argument("--lines", action="store_true",
                   help="host time per line of the compiled graphs' generated functions (line_timer.py)")
    p.add_argument("--contenders", nargs="+", default=["eager", "inductor", "flag_gems"],
                   choices=[*bm.CONTENDERS, *EAGER_MODES])
    p.add_argument("--inputs", nargs="+", default=["prefill_1x2048", "decode_8x1"])
    args = p.parse_args(argv)
    model = bm.build_model(bm.LLAMA3_8B_4L, "cuda")
    inputs = {"prefill_1x2048": (1, 2048), "decode_8x1": (8, 1)}
    for name, (b, s) in inputs.items():
        if name not in args.inputs:
            continue
        ids = torch.randint(0, bm.LLAMA3_8B_4L["vocab_size"], (b, s), device="cuda")
        if name.startswith("prefill") and not (args.host or args.lines):
            with torch.no_grad():
                torch._dynamo.reset()
                print(flag_gems.explain(model, ids, use_cache=False), flush=True)
        for contender in args.contenders:
            torch._dynamo.reset()
            kw = bm.CONTENDERS.get(contender)
            fn = model if kw is None else torch.compile(model, **kw)
            mode = EAGER_MODES[contender]() if contender in EAGER_MODES else contextlib.nullcontext()
            with torch.no_grad(), mode:
                print(f"== {name} {contender}", flush=True)
                call = lambda: fn(ids, use_cache=False)  # noqa: E731
                if args.lines:
                    print(lines_view(call, 20, args.top), flush=True)
                elif args.host:
                    print(host_view(call, 10, args.top), flush=True)
                else:
                    print(profile_one(call, args.calls, args.top), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
