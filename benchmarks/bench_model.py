"""Model benchmark of the flag_gems torch.compile backend (issue 3), every contender side by side in one run.

Model: a 4-layer Llama-3-8B-shaped ``transformers`` LlamaForCausalLM (hidden 4096, intermediate
14336, 32 q heads / 8 kv heads, vocab 128256), random weights, bf16, ``use_cache=False``.
Inputs: prefill ``[1, 2048]`` and decode-like ``[8, 1]`` token ids.

Contenders: eager; Inductor (default); Inductor ``mode="reduce-overhead"``; flag_gems; flag_gems
with CUDA graphs (``mode="reduce-overhead"``); flag_gems handing the rest to Inductor.

Metrics per (contender, input): steady-state ms (median of CUDA-event-timed calls after warm-up),
first-call seconds with cold caches (each contender is compiled fresh, Inductor's and Triton's
caches point at empty temporary folders for the whole run), and the cosine similarity of the
logits with eager's. Rows go to JSON and a Markdown table in ``--out``.

``--cpu-smoke`` runs a tiny config on the CPU (Triton interpreter), eager and flag_gems only,
so the script itself is exercised in CI.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

# Cold caches for the whole run, before torch/triton read their cache locations.
if "--keep-caches" not in sys.argv:
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor_"))
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton_"))

if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (see flag_gems/__init__.py)

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_utils import file_tag, run_meta, write_rows  # noqa: E402

LLAMA3_8B_4L = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
)
TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
)
CONTENDERS = {
    "eager": None,
    "inductor": dict(),
    "inductor_reduce_overhead": dict(mode="reduce-overhead"),
    "flag_gems": dict(backend="flag_gems"),
    "flag_gems_cudagraphs": dict(backend="flag_gems", mode="reduce-overhead"),
    "flag_gems_inductor": dict(backend="flag_gems", options={"inductor": True}),
}


def build_model(cfg: dict, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**cfg)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return model


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: str, warmup: int, iters: int) -> float:
    """Median ms per call (CUDA events on GPU, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cosine(a, b) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def run(args) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    cfg = TINY if args.cpu_smoke else LLAMA3_8B_4L
    inputs = {"prefill_1x2048": (1, 2048), "decode_8x1": (8, 1)} if not args.cpu_smoke else {"prefill_1x16": (1, 16), "decode_2x1": (2, 1)}
    contenders = args.contenders or (["eager", "flag_gems"] if args.cpu_smoke else list(CONTENDERS))
    model = build_model(cfg, device)
    meta = run_meta(device)
    rows = []
    for name, (b, s) in inputs.items():
        torch.manual_seed(1)
        ids = torch.randint(0, cfg["vocab_size"], (b, s), device=device)
        with torch.no_grad():
            ref = model(ids, use_cache=False).logits.float()
        for contender in contenders:
            torch._dynamo.reset()
            kw = CONTENDERS[contender]
            fn = model if kw is None else torch.compile(model, **kw)
            try:
                with torch.no_grad():
                    _sync(device)
                    t0 = time.perf_counter()
                    out = fn(ids, use_cache=False).logits.float()
                    _sync(device)
                    first = time.perf_counter() - t0
                    cos = cosine(out, ref)
                    ms = time_ms(lambda: fn(ids, use_cache=False), device, args.warmup, args.iters)
            except Exception as e:  # a contender that fails is a recorded row, not a crash
                rows.append(dict(meta, input=name, provider=contender, metric="error", value=f"{type(e).__name__}: {e}"[:300]))
                print(f"{name:<16}{contender:<28} FAILED: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            for metric, value in (("ms", ms), ("first_call_s", first), ("cosine_vs_eager", cos)):
                rows.append(dict(meta, input=name, provider=contender, metric=metric, value=value))
            print(f"{name:<16}{contender:<28}{ms:>10.3f} ms  first call {first:>7.2f} s  cosine {cos:.6f}", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    table = {}
    for r in rows:
        table.setdefault((r["input"], r["provider"]), {})[r["metric"]] = r["value"]
    lines = [
        f"GPU: {rows[0]['gpu']} · torch {rows[0]['torch']} · triton {rows[0]['triton']} · {rows[0]['date']} · git {rows[0]['git']}",
        "",
        "| input | contender | steady ms | vs eager | vs inductor | first call s | cosine vs eager |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (inp, prov), m in table.items():
        if "error" in m:
            lines.append(f"| {inp} | {prov} | failed: {m['error']} | | | | |")
            continue
        ratios = []
        for base in ("eager", "inductor"):
            t = table.get((inp, base), {}).get("ms")
            ratios.append(f"{t / m['ms']:.2f}x" if t else "")
        lines.append(f"| {inp} | {prov} | {m['ms']:.3f} | {ratios[0]} | {ratios[1]} | {m['first_call_s']:.2f} | {m['cosine_vs_eager']:.6f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--contenders", nargs="*", choices=list(CONTENDERS))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU: checks the script, measures nothing")
    p.add_argument("--keep-caches", action="store_true", help="do not point Inductor/Triton at empty cache folders")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.warmup, args.iters = 0, 1
    rows = run(args)
    tag = "cpu-smoke" if args.cpu_smoke else file_tag(rows[0])
    text = markdown(rows)
    write_rows(rows, args.out, f"model_{tag}", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
