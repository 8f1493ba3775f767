"""vLLM mode 3 with ``flag_gems.vllm_pass`` vs Inductor alone, same run (issue 9).

The model is tests/vllm_harness.py's Llama-style decoder (Llama-3-8B layers: hidden 4096, 32 q /
8 kv heads of 128, intermediate 14336, vocab 128256; 4 layers, ``--layers``; bf16), in the forms
vLLM's layers reach its compiler. Each contender goes through the harness's copy of vLLM's
pipeline: one Dynamo capture with a symbolic token count, split at attention, every piece
compiled by Inductor (``--compile-sizes`` below), the post-grad custom pass being ``flag_gems.vllm_pass``
(contender ``flag_gems_pass``: fused ops as custom-op calls; ``flag_gems_pass_inline``: their Triton
kernels inlined into Inductor's code) or nothing (``inductor``), piecewise CUDA graphs captured per
size into one pool.

Measured per contender, alternating the contenders over ``--rounds`` rounds:

* ``decode_b{1,8,64}``: one decode step by CUDA-graph replay (attention eager between the
  pieces, as in vLLM), contexts of up to 512 tokens; ms per step (median), and weight bytes
  read per step over that time (GB/s, % of a measured device copy);
* ``prefill_2048``: one 2048-token sequence through the symbolic-size pieces without graphs
  (vLLM does not capture prefill sizes); ms per step;
* ``compile_s`` (the first run: Dynamo, split, all Inductor compiles, and the capture) and the
  logits' cosine similarity with an fp32 eager reference of the same weights, per input.

Each piece is compiled once for the symbolic size, which every size runs, as with vLLM's default
``compile_sizes`` (none); ``--compile-sizes`` adds per-size compiles.

Rows (long format, with GPU, versions, git sha and date) go to ``--out`` as JSON and a Markdown
table. ``--quick``: 2 layers, fewer timed steps. ``--cpu-smoke``: a tiny decoder on the CPU
(post-grad graphs, no code generation or CUDA graphs; checks the script, measures nothing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

if "--keep-caches" not in sys.argv:  # cold caches for the whole run, before torch / triton read them
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor_"))
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton_"))
if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "tests")]
import vllm_harness as H  # noqa: E402
from _bench_utils import (copy_bandwidth, file_tag, median_call_ms, profile_calls, run_meta,  # noqa: E402
                          write_rows)

# flag_gems_pass_inline: the pass with inline_kernels=True (our kernels launched from Inductor's code)
CONTENDERS = ("inductor", "flag_gems_pass", "flag_gems_pass_inline")




class Contender:
    """One contender's runner: compiled and captured once, then stepped with fresh inputs."""

    def __init__(self, name, model, args, device):
        from flag_gems.vllm.fusion_pass import GemsVllmPass

        self.name = name
        self.gems = GemsVllmPass(inline_kernels=name.endswith("_inline")) if name.startswith("flag_gems_pass") else None
        gpu = device == "cuda"
        self.sizes = args.sizes
        self.runner = H.GraphRunner(model, max_tokens=max(args.prefill, max(args.sizes)), post_pass=self.gems,
                                    capture_sizes=args.sizes if gpu else (), compile_sizes=args.compile_sizes,
                                    codegen=gpu,
                                    n_seqs=max(args.sizes), max_len=max(args.prefill, args.context) + 1)
        self.runner.ctx.context_len = args.context
        self.device = device

    def first_run(self, batch) -> float:
        t0 = time.perf_counter()
        self.runner.set_batch(*batch, prefill=True)
        self.runner.run(batch[0].shape[0])
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.runner.capture()
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def decode(self, batch) -> torch.Tensor:
        t = self.runner.set_batch(*batch)
        if self.device == "cuda":
            self.runner.mode = "replay"
            return self.runner.run(t)
        return self.runner.run(t)

    def prefill(self, batch) -> torch.Tensor:
        self.runner.mode = "eager"  # no graph for this size: the compiled pieces run
        t = self.runner.set_batch(*batch, prefill=True)
        out = self.runner.run(t)
        self.runner.mode = "replay"
        return out


def run(args) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    if args.cpu_smoke:
        shape = H.LLAMA_TINY
        args.sizes, args.compile_sizes, args.prefill, args.context, args.rounds, args.iters = (2,), (2,), 16, 16, 1, 1
    else:
        shape = H.Shape(**{**H.LLAMA3_8B.__dict__, "layers": args.layers})
    meta = run_meta(device)
    torch.manual_seed(0)
    model = H.Decoder(shape, dtype=torch.bfloat16, device=device)
    ref = H.fp32_copy(model)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    copy_gbps = copy_bandwidth(device)[0] if device == "cuda" else None
    gen = torch.Generator().manual_seed(1)
    prefill = H.prefill_batch(shape, args.prefill, device, gen)
    contenders = {name: Contender(name, model, args, device) for name in args.contenders}
    rows = []

    def add(c, shape_name, metric, value):
        rows.append(dict(meta, op="decoder_step", provider=c, shape=shape_name, metric=metric, value=value,
                         model=f"llama3-8b-shaped x{shape.layers} layers" if not args.cpu_smoke else "tiny"))

    for name, c in contenders.items():
        seconds = c.first_run(prefill)
        add(name, "all", "compile_s", seconds)
        if c.gems is not None:
            for family, count in sorted(c.gems.report().fused.items()):
                add(name, "all", f"fused_{family}", count)
        print(f"{name:<16} compiled{' and captured' if device == 'cuda' else ''} in {seconds:.1f} s", flush=True)

    inputs = {f"decode_b{b}": ("decode", b) for b in args.sizes}
    inputs[f"prefill_{args.prefill}"] = ("prefill", args.prefill)
    times = {(n, i): [] for n in contenders for i in inputs}
    for rnd in range(args.rounds):
        for inp, (kind, n) in inputs.items():
            order = list(contenders.items())
            if rnd % 2:
                order.reverse()
            for name, c in order:
                batches = [H.decode_batch(shape, n, args.context, max(args.sizes), device, gen) if kind == "decode"
                           else prefill for _ in range(args.iters)]
                it = iter(batches)

                def step(c=c, kind=kind, it=it):
                    batch = next(it)
                    return c.decode(batch) if kind == "decode" else c.prefill(batch)

                times[(name, inp)].append(median_call_ms(step, args.iters, device))
    for (name, inp), ms in times.items():
        value = statistics.median(ms)
        add(name, inp, "ms", value)
        if inp.startswith("decode") and device == "cuda":
            gbps = weight_bytes / (value * 1e-3) / 1e9
            add(name, inp, "weights_GBps", gbps)
            add(name, inp, "pct_of_copy", 100 * gbps / copy_gbps)
    # Accuracy: one step per input against fp32 eager with the same weights and KV-cache contents.
    for inp, (kind, n) in inputs.items():
        batch = H.decode_batch(shape, n, args.context, max(args.sizes), device, gen) if kind == "decode" else prefill
        for name, c in contenders.items():
            ref_ctx = ref.new_context(c.runner.input_ids.shape[0], max(args.sizes), c.runner.ctx.k_cache[0].shape[1])
            ref_ctx.context_len = args.context
            if kind == "decode":
                H.fill_caches(c.runner.ctx, ref_ctx, gen)
            out = (c.decode(batch) if kind == "decode" else c.prefill(batch)).float()
            exp = H.reference_logits(model, ref, ref_ctx, *batch, prefill=kind == "prefill")
            add(name, inp, "cosine_vs_fp32", H.cosine(out, exp))
    for r in rows:
        if r["metric"] == "ms":
            print(f"{r['shape']:<14}{r['provider']:<16}{r['value']:>10.3f} ms", flush=True)
    if args.profile:
        for name, c in contenders.items():
            rows.extend(profile_prefill(name, c, prefill, device, args))
    return rows


def profile_prefill(name: str, c: Contender, batch, device: str, args) -> list[dict]:
    """Per-kernel time of ``args.profile`` prefill steps of one contender (``torch.profiler``):
    rows ``prefill_kernel_us`` (total per step) and ``prefill_kernel_calls`` (per step) by kernel
    name, and the profiler's table, top 30, printed. Where the prefill gap lives."""
    events = profile_calls(lambda: c.prefill(batch), args.profile, cuda=device == "cuda")
    time_of = (lambda e: e.device_time_total) if device == "cuda" else (lambda e: e.self_cpu_time_total)
    kernels = [e for e in events if time_of(e) > 0 and (device != "cuda" or e.device_type.name == "CUDA")]
    kernels.sort(key=time_of, reverse=True)
    print(f"== prefill profile: {name} ({args.profile} steps)")
    print(events.table(sort_by="device_time_total" if device == "cuda" else "self_cpu_time_total", row_limit=30))
    rows = []
    meta = run_meta(device)
    for e in kernels[:60]:
        for metric, value in (("prefill_kernel_us", time_of(e) / args.profile), ("prefill_kernel_calls", e.count / args.profile)):
            rows.append(dict(meta, op="decoder_step", provider=name, shape=f"prefill_{args.prefill}", metric=metric,
                             value=value, kernel=e.key[:200]))
    return rows


def markdown(rows: list[dict]) -> str:
    table = {}
    for r in rows:
        table.setdefault((r["shape"], r["provider"]), {})[r["metric"]] = r["value"]
    head = rows[0]
    lines = [f"GPU: {head['gpu']} · torch {head['torch']} · triton {head['triton']} · {head['date']} · git {head['git']}"
             f" · {head['model']}", "",
             "| input | contender | ms | vs inductor | weights GB/s | % of copy | cosine vs fp32 |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for (inp, prov), m in table.items():
        if "ms" not in m:
            continue
        base = table.get((inp, "inductor"), {}).get("ms")
        ratio = f"{base / m['ms']:.2f}x" if base else ""

        def fmt(key, spec):
            return format(m[key], spec) if key in m else ""

        lines.append(f"| {inp} | {prov} | {m['ms']:.3f} | {ratio} | {fmt('weights_GBps', '.0f')} | "
                     f"{fmt('pct_of_copy', '.0f')} | {fmt('cosine_vs_fp32', '.6f')} |")
    lines += ["", "| contender | compile + capture s | fused (per compile, all pieces and sizes) |", "| --- | ---: | --- |"]
    for prov in dict.fromkeys(r["provider"] for r in rows):
        m = table.get(("all", prov), {})
        fused = ", ".join(f"{k[6:]} {v}" for k, v in m.items() if k.startswith("fused_"))
        lines.append(f"| {prov} | {m.get('compile_s', float('nan')):.1f} | {fused} |")
    kernels = [r for r in rows if r["metric"] == "prefill_kernel_us"]
    if kernels:
        calls = {(r["provider"], r["kernel"]): r["value"] for r in rows if r["metric"] == "prefill_kernel_calls"}
        lines += ["", "Prefill, per step, by kernel (`--profile`; the 15 longest per contender):", "",
                  "| contender | kernel | µs | calls |", "| --- | --- | ---: | ---: |"]
        for prov in dict.fromkeys(r["provider"] for r in kernels):
            mine = sorted((r for r in kernels if r["provider"] == prov), key=lambda r: -r["value"])
            lines.append(f"| {prov} | (all kernels) | {sum(r['value'] for r in mine):.1f} | "
                         f"{sum(calls.get((prov, r['kernel']), 0) for r in mine):.0f} |")
            for r in mine[:15]:
                name = r["kernel"].replace("|", "/")[:90]
                lines.append(f"| {prov} | `{name}` | {r['value']:.1f} | {calls.get((prov, r['kernel']), 0):.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"))
    p.add_argument("--contenders", nargs="*", choices=CONTENDERS, default=list(CONTENDERS))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--sizes", type=int, nargs="*", default=[1, 8, 64], help="decode batch sizes (captured)")
    p.add_argument("--compile-sizes", type=int, nargs="*", default=[],
                   help="sizes also compiled on their own (vLLM's compile_sizes; default none: every size runs "
                        "the symbolic-size compile, as vLLM does by default)")
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--context", type=int, default=512, help="decode context length bound")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds over the contenders")
    p.add_argument("--iters", type=int, default=20, help="timed steps per round")
    p.add_argument("--quick", action="store_true", help="2 layers, 2 rounds of 10 steps")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU: checks the script, measures nothing")
    p.add_argument("--keep-caches", action="store_true", help="do not point Inductor/Triton at empty cache folders")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after the timings, profile STEPS prefill steps per contender: per-kernel time rows")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.rounds, args.iters = 2, 2, 10
    args.sizes, args.compile_sizes = tuple(args.sizes), tuple(args.compile_sizes)
    rows = run(args)
    text = markdown(rows)
    write_rows(rows, args.out, f"vllm_{'cpu-smoke' if args.cpu_smoke else file_tag(rows[0])}", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
