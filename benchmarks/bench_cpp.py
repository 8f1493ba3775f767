"""C++ runtime benchmark: host time per call, native vs our Python path vs our C++ path; a model under use_gems.

Ops (FlagGems' C++-runtime list plus the public functions' fused ops), Llama-3-8B shapes,
bf16, at M = 1 and 4096 tokens. Per op and M, each provider's host time per call (calls
issued back to back, ``_bench_utils.host_time_us``), and device time by CUDA-graph replay
for native and the C++ path:

- ``native``: the plain-torch equivalent (one aten op where there is one: ``torch.add``,
  ``F.rms_norm``, ``torch.mm``...; for the fused ops their unfused torch code);
- ``python``: our op with the C++ wrappers uninstalled (the public function's direct
  launch, or the custom op's Python implementation);
- ``cpp``: the same call with the C++ wrappers (``flag_gems.c_operators``);
- ``cpp_dispatcher``: for the fused ops, ``torch.ops.flag_gems.*`` called through the whole
  dispatcher (custom_op's Python autograd layer included), with the C++ wrappers;
- ``eager_python`` / ``eager_cpp``: the aten op under ``use_gems(include=[op])`` with the
  Python kernel / the C++ wrapper registered.

Ratios: ``cpp`` over ``native`` host time (target <= 1.2), and over ``one_aten_op`` (one
``torch.add`` of the op's output size: the native cost of one aten call, for fused ops
whose native equivalent is several calls).

Model: a 4-layer Llama-3-8B-shaped HF model, decode ``[8, 1]`` and prefill ``[1, 2048]``,
eager vs ``use_gems(preset="fast")`` (mode ``use_gems``) and ``use_gems()`` (every entry, mode
``use_gems_all``), each with
the C++ wrappers and without; alternating rounds, medians (the host's speed drifts within a
run). Targets: decode under use_gems >= 0.95x eager, prefill >= 1.0x.

Rows: long format (op, provider, shape, metric, value, GPU, versions, git sha, date) into
``--out`` as JSON plus a markdown table. ``--quick``: fewer calls and rounds (under a
minute); ``--cpu-smoke``: tiny shapes through Triton's interpreter (checks the script).

    python benchmarks/bench_cpp.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flag_gems  # noqa: E402
from flag_gems import c_runtime  # noqa: E402
from flag_gems.lowerings.registry import REGISTRY  # noqa: E402
from _bench_utils import device_time_us, file_tag, host_time_us, run_meta, wall_time_us, write_rows  # noqa: E402

fg = torch.ops.flag_gems
aten = torch.ops.aten


@contextlib.contextmanager
def cpp_off(key: str):
    """The C++ wrappers uninstalled from ``key`` for the block (the Python path)."""
    on = key in c_runtime.installed_keys()
    if on:
        c_runtime.uninstall(key)
    try:
        yield
    finally:
        if on:
            c_runtime.install(key)


def rope_torch(q, k, cos, sin, pos):
    """Rotate-half RoPE in plain torch (the unfused code HF models run)."""
    c, s = cos[pos].unsqueeze(-2), sin[pos].unsqueeze(-2)
    c, s = torch.cat([c, c], -1), torch.cat([s, s], -1)

    def rot(x):
        x1, x2 = x.chunk(2, -1)
        return torch.cat([-x2, x1], -1)

    return q * c + rot(q) * s, k * c + rot(k) * s


def cases(m: int, device: str, small: bool):
    """(name, native call, our call or None, dispatcher call or None, aten overload or None, one-op call).

    ``our call`` None: an aten op served only in the eager mode (``mul.Tensor``): its rows are the
    eager columns."""
    bf = torch.bfloat16
    h, inter, nq, nk, d = (64, 96, 4, 2, 16) if small else (4096, 14336, 32, 8, 128)
    r = lambda *s, dtype=bf: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    x, res, w = r(m, h), r(m, h), r(h)
    a, b = r(m, inter), r(m, inter)
    ab = r(m, 2 * inter)  # vLLM's SiluAndMul input, fuse_linear's gate/up output
    q, k = r(m, nq, d), r(m, nk, d)
    cos, sin = r(8 * 1024 if not small else 64, d // 2, dtype=torch.float32), r(8 * 1024 if not small else 64, d // 2,
                                                                                    dtype=torch.float32)
    pos = torch.randint(0, cos.shape[0], (m,), device=device)
    qf, kf, cache = q.view(m, nq * d), k.view(m, nk * d), torch.cat((cos, sin), -1)  # vLLM's layout
    wm = r(h, h)
    bx, bw = r(nq, m, d), r(nq, d, d)
    x2 = r(m, h // 4)
    mask = r(m, h) > 0
    pos_x = x.abs() + 0.5
    xf = x.float()  # HF RMSNorm's variance: the mean of an fp32 row
    return [
        ("add_tensor", lambda: torch.add(x, res), lambda: fg.add_tensor(x, res), None, aten.add.Tensor,
         lambda: torch.add(x, res)),
        ("rms_norm", lambda: F.rms_norm(x, [h], w, 1e-5), lambda: flag_gems.rms_norm(x, [h], w, 1e-5),
         lambda: fg.rms_norm(x, w, 1e-5), aten._fused_rms_norm.default, lambda: torch.add(x, x)),
        ("fused_add_rms_norm", lambda: F.rms_norm(torch.add(x, res), [h], w, 1e-5),
         lambda: flag_gems.fused_add_rms_norm(x, res, [h], w, 1e-5),
         lambda: fg.fused_add_rms_norm(x, res, w, 1e-5), None, lambda: torch.add(x, x)),
        ("rotary_embedding", lambda: rope_torch(q, k, cos, sin, pos),
         lambda: flag_gems.apply_rotary_pos_emb(q, k, cos, sin, pos),
         lambda: fg.rotary_embedding(q, k, cos, sin, pos), None, lambda: torch.add(q, q)),
        ("rotary_embedding_cache", lambda: rope_torch(q, k, cos, sin, pos),
         lambda: flag_gems.rotary_embedding_cache(pos, qf, kf, d, cache),
         lambda: fg.rotary_embedding_cache(pos, qf, kf, d, cache, True), None, lambda: torch.add(q, q)),
        ("silu_and_mul", lambda: F.silu(a) * b, lambda: flag_gems.silu_and_mul(a, b), lambda: fg.silu_and_mul(a, b),
         None, lambda: torch.add(a, a)),
        ("silu_and_mul_fused", lambda: F.silu(ab[:, :inter]) * ab[:, inter:], lambda: flag_gems.silu_and_mul_fused(ab),
         lambda: fg.silu_and_mul_fused(ab), None, lambda: torch.add(ab, ab)),
        ("mm", lambda: torch.mm(x, wm), lambda: fg.mm(x, wm), None, aten.mm.default, lambda: torch.add(x, x)),
        ("bmm", lambda: torch.bmm(bx, bw), lambda: fg.bmm(bx, bw), None, aten.bmm.default, lambda: torch.add(bx, bx)),
        ("cat", lambda: torch.cat([x, x2], 1), lambda: fg.cat([x, x2], 1), None, aten.cat.default,
         lambda: torch.add(x, x)),
        ("sum", lambda: torch.sum(x, -1), lambda: fg.sum(x, [-1]), None, aten.sum.dim_IntList,
         lambda: torch.add(x, x)),
        ("nonzero", lambda: torch.nonzero(mask), lambda: fg.nonzero(mask), None, aten.nonzero.default,
         lambda: torch.add(x, x)),
        ("mul.Tensor", lambda: torch.mul(x, res), None, None, aten.mul.Tensor, lambda: torch.mul(x, res)),
        ("neg", lambda: torch.neg(x), None, None, aten.neg.default, lambda: torch.neg(x)),
        ("rsqrt", lambda: torch.rsqrt(pos_x), None, None, aten.rsqrt.default, lambda: torch.rsqrt(pos_x)),
        ("silu", lambda: F.silu(a), None, None, aten.silu.default, lambda: F.silu(a)),
        ("mean.dim", lambda: xf.mean(-1, keepdim=True), None, None, aten.mean.dim, lambda: xf.mean(-1, keepdim=True)),
        ("_to_copy", lambda: x.float(), None, None, aten._to_copy.default, lambda: x.float()),
        ("pow.Tensor_Scalar", lambda: xf.pow(2), None, None, aten.pow.Tensor_Scalar, lambda: xf.pow(2)),
    ]


def _host(fn, device, args) -> float:
    if device == "cuda":
        return host_time_us(fn, calls=args.calls, batches=5, warmup=args.warmup)
    return wall_time_us(fn, iters=1, warmup=0)


def _device(fn, device, args) -> float | None:
    if device != "cuda" or args.quick:
        return None
    return float(device_time_us(fn, min_replay_ms=0.5, replays=5))


def bench_ops(args, meta, device, key) -> list[dict]:
    rows = []
    ms = (1, 4096) if not args.cpu_smoke else (1, 8)
    for m in ms:
        for name, native, ours, dispatcher, target, one_op in cases(m, device, args.cpu_smoke):
            if args.ops and name not in args.ops:
                continue
            shape = f"M={m}"
            got = {}
            got["native"] = _host(native, device, args)
            got["one_aten_op"] = _host(one_op, device, args)
            with torch.no_grad():
                if ours is not None:
                    with cpp_off(key):
                        ours()
                        got["python"] = _host(ours, device, args)
                    ours()  # the C++ path's first call: compiles or finds the kernel, fills its cache
                    got["cpp"] = _host(ours, device, args)
                if dispatcher is not None:
                    got["cpp_dispatcher"] = _host(dispatcher, device, args)
                if target is not None and target in REGISTRY:
                    run = native
                    with cpp_off(key), flag_gems.use_gems(include=[target]):
                        run()
                        got["eager_python"] = _host(run, device, args)
                    with flag_gems.use_gems(include=[target]):
                        run()
                        got["eager_cpp"] = _host(run, device, args)
                dev_native = _device(native, device, args)
                dev_cpp = _device(ours, device, args) if ours is not None else None
            for provider, value in got.items():
                rows.append(dict(meta, op=name, provider=provider, shape=shape, metric="host_us", value=value))
            for provider, value in (("native", dev_native), ("cpp", dev_cpp)):
                if value is not None:
                    rows.append(dict(meta, op=name, provider=provider, shape=shape, metric="device_us", value=value))
            cpp = got["cpp"] if "cpp" in got else got["eager_cpp"]  # eager-only ops: the eager mode's C++ path
            ratio = cpp / got["native"]
            rows.append(dict(meta, op=name, provider="cpp", shape=shape, metric="host_vs_native", value=ratio))
            rows.append(dict(meta, op=name, provider="cpp", shape=shape, metric="host_vs_one_aten_op",
                             value=cpp / got["one_aten_op"]))
            print(f"{name:<20}{shape:<8}" + "  ".join(f"{p} {v:7.1f}" for p, v in got.items())
                  + f"  us host; cpp/native {ratio:.2f}", flush=True)
    return rows


def bench_model(args, meta, device, key) -> list[dict]:
    import bench_model as bm

    cfg = bm.TINY if args.cpu_smoke else bm.LLAMA3_8B_4L
    inputs = {"decode_8x1": (8, 1), "prefill_1x2048": (1, 2048)} if not args.cpu_smoke else {"decode_2x1": (2, 1)}
    model = bm.build_model(cfg, device)
    every = sorted(REGISTRY, key=str)
    modes = {
        "use_gems": lambda: flag_gems.use_gems(preset="fast"),  # the measured-faster entries
        "use_gems_all": lambda: flag_gems.use_gems(include=every),  # = use_gems(): every entry
    }
    rows = []
    for name, (b, s) in inputs.items():
        ids = torch.randint(0, cfg["vocab_size"], (b, s), device=device)
        run = lambda: model(ids, use_cache=False)  # noqa: E731
        timed = lambda: bm.time_ms(run, device, args.warmup, args.iters)  # noqa: E731
        runs: dict = {"eager": []}
        with torch.no_grad():
            ref = run().logits.float()
            cos = {}
            for mode, ctx in modes.items():
                for cpp in (True, False):
                    with contextlib.ExitStack() as st:
                        if not cpp:
                            st.enter_context(cpp_off(key))
                        st.enter_context(ctx())
                        cos[(mode, cpp)] = bm.cosine(run().logits.float(), ref)
            for _ in range(args.rounds):
                runs["eager"].append(timed())
                for mode, ctx in modes.items():
                    for cpp in (True, False):
                        provider = mode + ("_cpp" if cpp else "_python")
                        with contextlib.ExitStack() as st:
                            if not cpp:
                                st.enter_context(cpp_off(key))
                            st.enter_context(ctx())
                            runs.setdefault(provider, []).append(timed())
        med = {p: statistics.median(v) for p, v in runs.items()}
        for provider, value in med.items():
            rows.append(dict(meta, op="llama_4layer", provider=provider, shape=name, metric="ms", value=value))
            if provider != "eager":
                rows.append(dict(meta, op="llama_4layer", provider=provider, shape=name, metric="speed_vs_eager",
                                 value=med["eager"] / value))
        for (mode, cpp), value in cos.items():
            rows.append(dict(meta, op="llama_4layer", provider=mode + ("_cpp" if cpp else "_python"), shape=name,
                             metric="cosine_vs_eager", value=value))
        print(f"model {name:<16}" + "  ".join(f"{p} {v:.3f} ms ({med['eager'] / v:.2f}x)" for p, v in med.items()),
              flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    meta = rows[0] if rows else {}
    lines = [f"# C++ runtime: host µs per call ({meta.get('gpu')}, torch {meta.get('torch')}, triton "
             f"{meta.get('triton')}, {meta.get('git')}, {meta.get('date')})", "",
             "| op | M | native | one aten op | python | cpp | cpp via dispatcher | eager python | eager cpp | "
             "cpp/native | native dev µs | cpp dev µs |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    table: dict = {}
    for r in rows:
        if r["op"] != "llama_4layer":
            table.setdefault((r["op"], r["shape"]), {})[(r["provider"], r["metric"])] = r["value"]
    fmt = lambda v: "" if v is None else f"{v:.1f}"  # noqa: E731
    for (op, shape), v in table.items():
        h = lambda p: v.get((p, "host_us"))  # noqa: E731
        lines.append(f"| {op} | {shape[2:]} | {fmt(h('native'))} | {fmt(h('one_aten_op'))} | {fmt(h('python'))} | "
                     f"{fmt(h('cpp'))} | {fmt(h('cpp_dispatcher'))} | {fmt(h('eager_python'))} | {fmt(h('eager_cpp'))} "
                     f"| {v[('cpp', 'host_vs_native')]:.2f} | {fmt(v.get(('native', 'device_us')))} | "
                     f"{fmt(v.get(('cpp', 'device_us')))} |")
    model = [r for r in rows if r["op"] == "llama_4layer"]
    if model:
        lines += ["", "| model input | provider | ms | speed vs eager | cosine vs eager |", "|---|---|---|---|---|"]
        by = {}
        for r in model:
            by.setdefault((r["shape"], r["provider"]), {})[r["metric"]] = r["value"]
        for (shape, provider), v in by.items():
            speed = v.get("speed_vs_eager")
            cos = v.get("cosine_vs_eager")
            lines.append(f"| {shape} | {provider} | {v['ms']:.3f} | {'' if speed is None else f'{speed:.3f}'} | "
                         f"{'' if cos is None else f'{cos:.6f}'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--ops", nargs="*", help="op names (default: all)")
    p.add_argument("--no-model", action="store_true")
    p.add_argument("--calls", type=int, default=400, help="host-timed calls per provider (5 batches)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=10, help="model forwards per timing")
    p.add_argument("--rounds", type=int, default=7, help="alternating model rounds (medians)")
    p.add_argument("--quick", action="store_true", help="fewer calls and rounds, no device times (under a minute)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes through the interpreter: checks the script")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    if not c_runtime.available:
        print(f"flag_gems C++ runtime unavailable: {c_runtime.reason}", file=sys.stderr)
        return 1
    if args.quick:
        args.calls, args.rounds, args.iters = 100, 3, 5
    if args.cpu_smoke:
        args.calls, args.warmup, args.iters, args.rounds = 1, 0, 1, 1
    key = "CUDA" if device == "cuda" else "CPU"
    installed_here = key not in c_runtime.installed_keys()
    if installed_here:  # the CPU smoke run: the wrappers as the CPU kernels (launches through the interpreter)
        c_runtime.install(key)
    meta = run_meta(device)
    t0 = time.perf_counter()
    try:
        rows = bench_ops(args, meta, device, key)
        if not args.no_model:
            try:
                rows += bench_model(args, meta, device, key)
            except ImportError as e:
                rows.append(dict(meta, op="llama_4layer", provider="use_gems", shape="-", metric="skipped",
                                 value=str(e)))
    finally:
        if installed_here:
            c_runtime.uninstall(key)
    rows = [r for r in rows if r.get("metric") != "skipped"] + [r for r in rows if r.get("metric") == "skipped"]
    text = markdown([r for r in rows if r.get("metric") != "skipped"])
    write_rows(rows, args.out, f"cpp_{'cpu-smoke' if args.cpu_smoke else file_tag(meta)}", text)
    print(text)
    print(f"bench_cpp: {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
