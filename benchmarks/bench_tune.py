"""Autotuning benchmark (issue 13, issue 11 item 5): tuning cost, first-call latency, tuned kernels vs
the other contenders, the tuned GEMM vs cuBLAS; one GPU run that also leaves the tuned table.

Phases, in this order, each skipped (and recorded as skipped) once ``--time-budget`` is spent:

1. **first call before tuning**: a fresh cache, the default policy (``GEMS_AUTOTUNE=on``): wall time of
   the first call of SiLU·mul ``[4096, 2·14336]`` and of ``mm`` ``[1024, 4096] @ [4096, 4096]``
   (compile + tuning on first sight, capped by ``GEMS_AUTOTUNE_BUDGET_S``);
2. **tuning** (what ``python -m flag_gems.pretune`` does, forced): SiLU·mul d=14336, RoPE q32/k8x128 in
   vLLM's and HF's layouts, add+RMSNorm 4096 at M in ``--ms``; per key the time spent, the candidates
   tried, the heuristic's and the best device µs;
3. **kernels vs contenders** (``bench_kernels.py``'s runner: eager, Inductor, Liger when importable),
   with ``flag_gems_tuned`` (our launcher, tuned config; the ratio columns), ``flag_gems_untuned`` (the
   heuristic forced) and ``flag_gems`` (the public function: through the C++ wrappers, which use the
   heuristics, when the C++ runtime is built) side by side;
4. **GEMM**: the Llama-3-8B projections ``(N, K)`` in (6144, 4096), (4096, 4096), (28672, 4096),
   (4096, 14336), (128256, 4096), bf16, ``x [M, K] @ W[N, K]^T`` for M in ``--gemm-ms``: tuning (with
   cuBLAS timed per key: the ``NATIVE`` decision), then CUDA-graph device time of the tuned Triton
   kernel, the untuned one and ``torch.mm`` (cuBLAS), TFLOP/s and ratios;
5. **first call after tuning**: the in-process table dropped (as in a new process whose kernels are
   compiled), first call of the same shapes (a cache-file read + launch; target < 1 ms); and a fresh
   Python process (import, then first calls; includes Triton loading the compiled kernels).

Writes into ``--out``: ``tune_<gpu>_<date>.json`` (long-format rows), ``tune_<gpu>_<date>.md`` (tables)
and ``tuned_<gpu>.json``: the tuned configs as a shipped table; commit it as
``kernels/tuned/<gpu>.json`` to make them the defaults of every user of that GPU kind who never
runs pretune. The user cache of the run goes to ``--cache-dir`` (default a fresh temporary folder).

Usage::

    python benchmarks/bench_tune.py --out DIR                   # about 6 min (--time-budget 360)
    python benchmarks/bench_tune.py --out DIR --quick           # fewer M, smaller budgets
    python benchmarks/bench_tune.py --cpu-smoke --out DIR       # tiny shapes through the interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

_T0 = time.perf_counter()
if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_utils as bu  # noqa: E402

DTYPE = torch.bfloat16
MS = [1, 64, 512, 4096, 16384]
GEMM_MS = [1, 16, 128, 1024, 4096, 16384]
GEMM_NK = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]
SMOKE_MS = [1, 3]
SMOKE_NK = [(48, 32), (40, 64)]


class Budget:
    def __init__(self, seconds: float):
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - _T0)

    def spent(self) -> bool:
        return self.left() <= 0


def _sync(dev):
    if dev >= 0:
        torch.cuda.synchronize()


def _wall(fn, dev) -> float:
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    return time.perf_counter() - t0


class Bench:
    def __init__(self, args, dev, meta):
        self.args, self.dev, self.meta = args, dev, meta
        self.rows: list[dict] = []
        self.budget = Budget(args.time_budget)
        self.device = "cuda" if dev >= 0 else "cpu"
        self.dims = dict(hidden=64, inter=128, n_q=4, n_kv=2, head_dim=16) if args.cpu_smoke else dict(
            hidden=4096, inter=14336, n_q=32, n_kv=8, head_dim=128)

    def row(self, section, op, provider, shape, metric, value, **extra):
        self.rows.append(dict(section=section, op=op, provider=provider, shape=shape, metric=metric, value=value,
                              **extra, **self.meta))

    def skip(self, section, what):
        self.row(section, what, "-", "-", "skipped", f"time budget of {self.args.time_budget:.0f} s spent")
        print(f"  {section}: {what} skipped (time budget)", flush=True)

    # ------------------------------------------------------------------ ops used by several phases

    def silu_call(self, m):
        import flag_gems

        x = torch.randn(m, 2 * self.dims["inter"], device=self.device, dtype=DTYPE)
        return lambda: flag_gems.silu_and_mul_fused(x)

    def mm_call(self, m, n, k):
        import flag_gems

        a = torch.randn(m, k, device=self.device, dtype=DTYPE)
        w = torch.randn(n, k, device=self.device, dtype=DTYPE)
        return lambda: flag_gems.mm(a, w.t())

    def rope_call(self, m):
        import flag_gems

        d = self.dims
        pos = torch.randint(0, 4096, (m,), device=self.device)
        q = torch.randn(m, d["n_q"] * d["head_dim"], device=self.device, dtype=DTYPE)
        k = torch.randn(m, d["n_kv"] * d["head_dim"], device=self.device, dtype=DTYPE)
        cache = torch.randn(4096, d["head_dim"], device=self.device)
        return lambda: flag_gems.rotary_embedding_cache(pos, q, k, d["head_dim"], cache, is_neox=True)

    def first_calls(self):
        m_big = 3 if self.args.cpu_smoke else 4096
        m_mm, (n, k) = (3, SMOKE_NK[0]) if self.args.cpu_smoke else (1024, (4096, 4096))
        return [
            (f"silu_and_mul [{m_big}, 2*{self.dims['inter']}]", self.silu_call(m_big)),
            (f"rope vllm [{m_big}] q{self.dims['n_q']}/k{self.dims['n_kv']}", self.rope_call(m_big)),
            (f"mm [{m_mm}, {k}] @ [{k}, {n}]", self.mm_call(m_mm, n, k)),
        ]

    # ------------------------------------------------------------------ phase 1 and 5

    def phase_first_call(self, when: str):
        from flag_gems.kernels import _autotune as at

        if self.budget.spent():
            return self.skip("first_call", when)
        print(f"== first call {when} tuning", flush=True)
        at.clear_memory()
        for label, fn in self.first_calls():
            first = _wall(fn, self.dev)
            second = _wall(fn, self.dev)
            self.row("first_call", label, "flag_gems", label, f"first_call_{when}_ms", first * 1e3)
            self.row("first_call", label, "flag_gems", label, f"second_call_{when}_ms", second * 1e3)
            print(f"  {label:<40} first call {first * 1e3:10.2f} ms, second {second * 1e3:8.3f} ms", flush=True)

    def phase_fresh_process(self):
        if self.args.cpu_smoke or self.args.no_subprocess:
            return None
        if self.budget.left() < 40:
            return self.skip("first_call", "fresh process")
        print("== first call in a fresh process (tuned cache)", flush=True)
        code = r"""
import json, time, sys
t0 = time.perf_counter()
import torch, flag_gems
imp = time.perf_counter() - t0
res = {"import_s": imp}
x = torch.randn(4096, 2 * 14336, device="cuda", dtype=torch.bfloat16)
a = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16)
w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
pos = torch.randint(0, 4096, (4096,), device="cuda")
q = torch.randn(4096, 32 * 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(4096, 8 * 128, device="cuda", dtype=torch.bfloat16)
cache = torch.randn(4096, 128, device="cuda")
for name, fn in (("silu_and_mul", lambda: flag_gems.silu_and_mul_fused(x)), ("mm", lambda: flag_gems.mm(a, w.t())),
                 ("rope", lambda: flag_gems.rotary_embedding_cache(pos, q, k, 128, cache, is_neox=True))):
    torch.cuda.synchronize(); t = time.perf_counter(); fn(); torch.cuda.synchronize()
    res[name + "_first_ms"] = (time.perf_counter() - t) * 1e3
    t = time.perf_counter(); fn(); torch.cuda.synchronize()
    res[name + "_second_ms"] = (time.perf_counter() - t) * 1e3
print("RESULT " + json.dumps(res))
"""
        env = dict(os.environ, GEMS_CACHE_DIR=self.args.cache_dir)
        try:
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                  timeout=max(30, self.budget.left() - 5))
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            res = json.loads(line[-1][7:]) if line else {"error": proc.stderr[-500:]}
        except subprocess.TimeoutExpired:
            res = {"error": "timeout"}
        for k_, v in res.items():
            self.row("first_call", "fresh process", "flag_gems", "silu [4096], rope [4096], mm [1024, 4096, 4096]", k_, v)
        print(f"  {res}", flush=True)

    # ------------------------------------------------------------------ phase 2 and 4a: tuning

    def tune_items(self, section, entries, ms, key_budget):
        from flag_gems import pretune

        items = pretune.plan_shapes(entries, dtype=DTYPE, m_tokens=ms, dev=self.dev)
        done = []
        for it in items:
            if self.budget.spent():
                self.skip(section, it.label)
                continue
            s = pretune.run([it], dev=self.dev, force=True, budget_s=key_budget, progress=False)
            for r in s.results:
                if "error" in r:
                    self.row(section, it.kernel, "flag_gems", it.label, "error", r["error"])
                    print(f"  {it.label:<44} ERROR {r['error'][:100]}", flush=True)
                    continue
                extra = dict(key=r["key"], config=r["config"], tried=r["tried"])
                self.row(section, it.kernel, "flag_gems", it.label, "tune_s", r["tune_s"], **extra)
                if r["best_us"] is not None:
                    self.row(section, it.kernel, "flag_gems", it.label, "tuned_us", r["best_us"], **extra)
                if r["default_us"] is not None:
                    self.row(section, it.kernel, "flag_gems", it.label, "heuristic_us", r["default_us"], **extra)
                if r["baseline_us"] is not None:
                    self.row(section, it.kernel, "native", it.label, "native_us", r["baseline_us"], **extra)
                gain = (r["default_us"] / r["best_us"]) if r["best_us"] and r["default_us"] else float("nan")
                nat = f" native {r['baseline_us']:.2f}" if r["baseline_us"] else ""
                print(f"  {it.label:<44} {r['tune_s']:6.1f} s {r['tried']:3d} tried  heuristic "
                      f"{r['default_us'] or float('nan'):9.2f} us -> {r['best_us'] or float('nan'):9.2f} us "
                      f"({gain:.3f}x){nat}  {r['config']}", flush=True)
                done.append((it, r))
        return done

    def phase_tune_memory_bound(self):
        print("== tuning: SiLU·mul, RoPE (vLLM and HF layouts), add+RMSNorm", flush=True)
        d = self.dims
        entries = [
            dict(op="act_and_mul", d=d["inter"]),
            dict(op="rope", n_q_heads=d["n_q"], n_kv_heads=d["n_kv"], head_dim=d["head_dim"], layout="both"),
            dict(op="rms_norm", n_cols=d["hidden"], residual=True),
        ]
        self.tune_items("tune", entries, self.args.ms, self.args.key_budget)

    # ------------------------------------------------------------------ phase 3: contenders

    def phase_contenders(self):
        import bench_kernels as bk

        if self.budget.spent():
            return self.skip("kernels", "contenders")
        print("== kernels vs contenders (tuned and untuned flag_gems)", flush=True)
        saved = {op: dict(spec["providers"]) for op, spec in bk.OPS.items()}, dict(bk.FAMILY), bk.OURS_PRIMARY
        try:
            self._contenders(bk)
        finally:  # bench_kernels' tables as they were
            for op, provs in saved[0].items():
                bk.OPS[op]["providers"] = provs
            bk.FAMILY.clear()
            bk.FAMILY.update(saved[1])
            bk.OURS_PRIMARY = saved[2]

    def _contenders(self, bk):
        self._add_untuned_providers(bk)
        ns = argparse.Namespace(ms=self.args.ms, quick=self.args.quick or self.args.cpu_smoke,
                                cpu_smoke=self.args.cpu_smoke, time_budget=max(0.0, self.budget.left() - self.args.reserve),
                                providers=None)
        runner = bk.Runner(ns, self.device, self.meta)
        runner.t0 = time.perf_counter()
        runner.copy_bandwidth()
        ops = ["silu_and_mul", "rope", "add_rms_norm"]
        provs = {}
        for op in ops:
            names = list(bk.OPS[op]["providers"])
            if self.args.cpu_smoke:
                names = [p for p in names if bk.FAMILY[p] in ("eager", "flag_gems")]
            provs[op] = names
            runner.run_op(op, names)
        for r in runner.rows:
            self.rows.append(dict(r, section="kernels", shape=r.get("shape", "")))
        self.kernel_md = bk.markdown(runner.rows, ops, self.args.ms, provs, runner.copy_gbps, runner.anchors,
                                     runner.shapes)

    def _add_untuned_providers(self, bk):
        """``flag_gems_tuned`` / ``flag_gems_untuned``: our Python launchers with the tuned config, and with the
        heuristic forced (what users got before tuning). The public functions (``flag_gems`` rows) may go
        through the C++ wrappers (issue 12), which use the heuristics; device time of one kernel and config
        does not depend on who launches it."""
        from flag_gems.kernels import act_and_mul as am
        from flag_gems.kernels import rms_norm as rn
        from flag_gems.kernels import rotary_embedding as kr

        dev = self.dev

        def variants(tunable, key, call):
            cfg = tunable.default(key, dev)

            def untuned():
                with tunable.forcing(cfg):
                    return call()

            return call, untuned

        def silu(t):
            x = t["x"]
            key = am.tune_key(x.shape[0], x.shape[1] // 2, x.dtype)
            return variants(am.TUNABLE, key, lambda: am.act_and_mul_fused_fwd(x, "silu"))

        def rope(t):
            dims = t["dims"]
            m = t["q"].shape[0]
            key = kr.tune_key(m, dims["n_q"], dims["n_kv"], dims["head_dim"] // 2, dims["head_dim"], t["q"].dtype,
                              False, False, False)
            return variants(kr.TUNABLE, key, lambda: kr.rope_cache_fwd(t["positions"], t["q"], t["k"], dims["head_dim"],
                                                                     t["cache"], True))

        def norm(t):
            x = t["x"]
            key = rn.tune_key(x.shape[0], x.shape[1], x.dtype, True)
            return variants(rn.TUNABLE, key, lambda: rn.rms_norm_fwd(x, t["w"], bk.EPS, residual=t["r"]))

        for op, fn in (("silu_and_mul", silu), ("rope", rope), ("add_rms_norm", norm)):
            bk.OPS[op]["providers"]["flag_gems_tuned"] = lambda t, fn=fn: (fn(t)[0], bk._tuple)
            bk.OPS[op]["providers"]["flag_gems_untuned"] = lambda t, fn=fn: (fn(t)[1], bk._tuple)
        bk.FAMILY["flag_gems_tuned"] = bk.FAMILY["flag_gems_untuned"] = "flag_gems"
        bk.OURS_PRIMARY = "flag_gems_tuned"

    # ------------------------------------------------------------------ phase 4: GEMM

    def phase_gemm(self):
        from flag_gems.kernels import matmul as km

        print("== GEMM: tuning (cuBLAS timed per key), then tuned / untuned Triton vs torch.mm", flush=True)
        nk = SMOKE_NK if self.args.cpu_smoke else GEMM_NK
        entries = [dict(op="mm", n=n, k=k, bias=False) for n, k in nk]
        done = self.tune_items("gemm_tune", entries, self.args.gemm_ms, self.args.gemm_key_budget)
        self.gemm = []
        for it, r in done:
            if self.budget.spent():
                self.skip("gemm", it.label)
                continue
            dims = dict(it.dims)
            m, n, k = dims["m"], dims["n"], dims["k"]
            a = torch.randn(m, k, device=self.device, dtype=DTYPE)
            w = torch.randn(n, k, device=self.device, dtype=DTYPE)
            b = w.t()
            out = torch.empty(m, n, device=self.device, dtype=DTYPE)
            tuned = km.TUNABLE.as_tuple(dict(r["config"], NATIVE=0))
            default = km.TUNABLE.as_tuple(km.TUNABLE.default(it.key, self.dev))
            calls = dict(
                cublas=lambda: torch.mm(a, b, out=out),
                flag_gems=lambda: km.matmul(a, b, out=out, config=tuned),
                flag_gems_untuned=lambda: km.matmul(a, b, out=out, config=default),
            )
            ref = torch.mm(a, b).float()
            times = {}
            for p, fn in calls.items():
                try:
                    fn()
                    err = ((out.float() - ref).norm() / ref.norm().clamp_min(1e-12)).item()
                    us = float(bu.device_time_us(fn, replays=5, min_replay_ms=0.5)) if self.dev >= 0 else \
                        bu.wall_time_us(fn, iters=1)
                except Exception as exc:  # noqa: BLE001 - a failing provider is a row
                    self.row("gemm", "mm", p, it.label, "error", f"{type(exc).__name__}: {exc}"[:200])
                    continue
                times[p] = us
                shape = f"{m}x{n}x{k}"
                self.row("gemm", "mm", p, shape, "device_us", us, m=m, n=n, k=k, rel_err=err)
                self.row("gemm", "mm", p, shape, "tflops", 2 * m * n * k / us / 1e6, m=m, n=n, k=k)
            if "cublas" in times and "flag_gems" in times:
                ratio = times["cublas"] / times["flag_gems"]
                self.row("gemm", "mm", "flag_gems", f"{m}x{n}x{k}", "vs_cublas", ratio, m=m, n=n, k=k,
                         native_chosen=bool(r["config"].get("NATIVE")), config=r["config"])
                self.gemm.append((m, n, k, times, bool(r["config"].get("NATIVE")), r["config"]))
                print(f"  mm {m:>6} x {n:>6} x {k:>6}: cuBLAS {times['cublas']:9.2f} us, tuned "
                      f"{times['flag_gems']:9.2f} us ({ratio:.3f}x), untuned {times.get('flag_gems_untuned', float('nan')):9.2f} us"
                      f"{'  -> cuBLAS kept' if r['config'].get('NATIVE') else ''}", flush=True)

    # ------------------------------------------------------------------ report

    def markdown(self) -> str:
        meta = self.meta
        lines = [f"## Autotuning — {meta['gpu']} · torch {meta['torch']} · triton {meta['triton']} · git {meta['git']} "
                 f"· {meta['date']}", "", f"Cache: `{self.args.cache_dir}`; bf16.", "", "### First call", "",
                 "| call | metric | value |", "|---|---|---:|"]
        for r in self.rows:
            if r["section"] == "first_call" and r["metric"] != "skipped":
                v = r["value"]
                lines.append(f"| {r['op']} | {r['metric']} | {v:.3f} |" if isinstance(v, float) else
                             f"| {r['op']} | {r['metric']} | {v} |")
        lines += ["", "### Tuning per key (device µs per call by the tuner's timer)", "",
                  "| kernel | key | tried | tune s | heuristic µs | tuned µs | gain | native µs | config |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        by = {}
        for r in self.rows:
            if r["section"] in ("tune", "gemm_tune") and r["metric"] in ("tune_s", "tuned_us", "heuristic_us",
                                                                          "native_us"):
                e = by.setdefault((r["op"], r["shape"]), dict(tried=r.get("tried"), config=r.get("config")))
                e[r["metric"]] = r["value"]
        for (kernel, label), e in by.items():
            h, t = e.get("heuristic_us"), e.get("tuned_us")
            gain = f"{h / t:.3f}x" if h and t else "—"
            f = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
            lines.append(f"| {kernel} | {label} | {e.get('tried')} | {f(e.get('tune_s'))} | {f(h)} | {f(t)} | {gain} | "
                         f"{f(e.get('native_us'))} | `{json.dumps(e.get('config'))}` |")
        if getattr(self, "kernel_md", None):
            lines += ["", self.kernel_md.replace("## Kernel benchmark", "### Kernels vs contenders")]
        if getattr(self, "gemm", None):
            lines += ["", "### GEMM: tuned Triton vs cuBLAS (`x [M, K] @ W[N, K]^T`, CUDA-graph device µs)", "",
                      "| M | N | K | cuBLAS µs | tuned µs | vs cuBLAS | untuned µs | TFLOP/s tuned | decision |",
                      "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
            for m, n, k, times, native, cfg in self.gemm:
                c, t = times["cublas"], times["flag_gems"]
                u = times.get("flag_gems_untuned")
                decision = "cuBLAS (NATIVE=1)" if native else f"Triton {cfg['KIND']}"
                lines.append(f"| {m} | {n} | {k} | {c:.2f} | {t:.2f} | {c / t:.3f}x | "
                             f"{'—' if u is None else f'{u:.2f}'} | {2 * m * n * k / t / 1e6:.1f} | {decision} |")
            wins = sum(1 for *_, native, _ in self.gemm if not native)
            lines += ["", f"Triton kept for {wins} of {len(self.gemm)} shapes (faster than cuBLAS in the tuner's "
                          "measurement); the rest stay on cuBLAS when the GEMM entries are enabled."]
        skipped = [r for r in self.rows if r["metric"] == "skipped"]
        if skipped:
            lines += ["", f"Skipped for the time budget: {', '.join(sorted({r['section'] + ':' + r['op'] for r in skipped}))}"]
        return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                           "results"))
    p.add_argument("--cache-dir", help="the run's autotune cache (default: a fresh temporary folder)")
    p.add_argument("--ms", nargs="+", type=int, help=f"token counts of the memory-bound kernels (default {MS})")
    p.add_argument("--gemm-ms", nargs="+", type=int, help=f"GEMM M values (default {GEMM_MS})")
    p.add_argument("--key-budget", type=float, default=6.0,
                   help="tuning seconds per memory-bound key (default 6; compiled candidates are reused across keys)")
    p.add_argument("--gemm-key-budget", type=float, default=8.0, help="tuning seconds per GEMM key (default 8)")
    p.add_argument("--time-budget", type=float, default=360.0,
                   help="seconds from the start after which remaining phases / keys are skipped (default 360)")
    p.add_argument("--reserve", type=float, default=170.0,
                   help="seconds the contender phase leaves for GEMM and the last phase (default 170)")
    p.add_argument("--skip", nargs="*", default=[], choices=["first", "tune", "contenders", "gemm", "fresh"],
                   help="phases to leave out")
    p.add_argument("--no-subprocess", action="store_true", help="no fresh-process first-call measurement")
    p.add_argument("--quick", action="store_true", help="M in {1, 4096} and {1, 1024}, smaller budgets")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes through the interpreter: checks the script")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.ms = args.ms or SMOKE_MS
        args.gemm_ms = args.gemm_ms or SMOKE_MS
        args.key_budget, args.gemm_key_budget, args.reserve = 2.0, 2.0, 0.0
    if args.quick:
        args.ms = args.ms or [1, 4096]
        args.gemm_ms = args.gemm_ms or [1, 1024]
        args.key_budget, args.gemm_key_budget = min(args.key_budget, 2.5), min(args.gemm_key_budget, 3.0)
    args.ms = args.ms or MS
    args.gemm_ms = args.gemm_ms or GEMM_MS
    args.cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="gems_tune_cache_")
    os.environ["GEMS_CACHE_DIR"] = args.cache_dir  # before the first lookup
    os.environ.pop("GEMS_AUTOTUNE", None)  # the default policy
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if not args.cpu_smoke and (interp or not torch.cuda.is_available()):
        print("bench_tune.py needs a CUDA device (or --cpu-smoke)", file=sys.stderr)
        return 2
    import flag_gems  # noqa: F401
    from flag_gems import pretune
    from flag_gems.kernels import _autotune as at

    dev = -1 if args.cpu_smoke and (interp or not torch.cuda.is_available()) else torch.cuda.current_device()
    meta = bu.run_meta("cuda" if dev >= 0 else "cpu")
    bench = Bench(args, dev, meta)
    print(f"bench_tune on {meta['gpu']}: torch {meta['torch']}, triton {meta['triton']}, git {meta['git']}; "
          f"cache {args.cache_dir}; budget {args.time_budget:.0f} s", flush=True)
    stem = "tune_" + ("smoke_" if args.cpu_smoke else "") + bu.file_tag(meta)
    phases = [
        ("first", lambda: bench.phase_first_call("before")),
        ("tune", bench.phase_tune_memory_bound),
        ("contenders", bench.phase_contenders),
        ("gemm", bench.phase_gemm),
        ("first", lambda: bench.phase_first_call("after")),
        ("fresh", bench.phase_fresh_process),
    ]
    for name, fn in phases:
        if name in args.skip:
            continue
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - a broken phase is a row; the others still run
            bench.row(name, name, "-", "-", "error", f"{type(exc).__name__}: {exc}"[:300])
            print(f"== {name}: {type(exc).__name__}: {exc}", flush=True)
        print(f"== {name}: {time.perf_counter() - t0:.1f} s (total {time.perf_counter() - _T0:.1f} s)", flush=True)
        bu.write_rows(bench.rows, args.out, stem)  # partial results survive a kill
    table = os.path.join(args.out, f"tuned_{at.device_slug(at.device_name(dev))}.json")
    n = pretune.export_table(table, dev)
    text = bench.markdown()
    paths = bu.write_rows(bench.rows, args.out, stem, text)
    print(f"\nwrote {', '.join(paths)} and {table} ({n} tuned entries) in {time.perf_counter() - _T0:.0f} s\n")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
