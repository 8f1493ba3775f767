"""Kernel benchmark (issue 2): eager PyTorch, Inductor, flag_gems and Liger-Kernel side by side in one run.

Ops, at Llama-3-8B shapes (hidden 4096, intermediate 14336, 32 q / 8 kv heads, head_dim 128),
bf16, tokens M in {1, 64, 512, 4096, 16384}; every contender in its native layout, moving
the same bytes:

- ``add_rms_norm``: x, residual ``[M, 4096]``, weight ``[4096]``, eps 1e-6 -> ``(y, h)``.
  eager: the HF / vLLM-native formula; inductor: ``torch.compile`` of it; flag_gems:
  ``flag_gems.add_rms_norm``; liger: ``LigerFusedAddRMSNormFunction`` (casting mode "llama").
- ``silu_and_mul``: x ``[M, 2 * 14336]`` -> ``[M, 14336]``. eager: ``silu(x[:, :d]) * x[:, d:]``;
  inductor: compiled; flag_gems: ``silu_and_mul_fused(x)``; flag_gems_ab: ``silu_and_mul(a, b)``
  on separate ``[M, d]`` halves; liger: ``LigerSiLUMulFunction`` (a, b); liger_fused:
  ``LigerFusedGateUpSiLUMulFunction`` (x).
- ``rope``: vLLM token layout, positions ``[M]`` int64 (random rows of a ``[32768, 128]`` fp32
  cos|sin cache), q ``[M, 32 * 128]``, k ``[M, 8 * 128]``, out of place. eager: vLLM
  forward_native-style torch (index the cache, split cos / sin, rotate halves of q and k);
  inductor: compiled; flag_gems: ``rotary_embedding_cache``; flag_gems_inplace: the same with
  ``inplace=True`` (vLLM's own op is in place); liger: ``LigerRopeFunction`` on HF's layout (q
  ``[1, 32, M, 128]`` as the transposed view of ``[1, M, 32, 128]``, cos / sin ``[1, M, 128]``
  bf16; in place). ``vs_best_other`` compares in-place contenders only with each other
  (``IN_PLACE``): at M = 4096 the 40 MiB an in-place call touches stay in the H200's L2 between
  replays, the 80 MiB of an out-of-place one do not.

Bytes per call (one figure per op and M, for every contender): each input read once and each
output written once; for rope q and k in and out, the positions, and the cos / sin actually
needed (``M * 128 * 4`` bytes: one fp32 cache row per token, or Liger's two bf16 rows).

Metrics (long-format rows, see ``benchmarks/README.md``): ``device_us`` (CUDA-graph replay of
N back-to-back calls, see ``_bench_utils.device_time_us``), ``host_us`` (wall clock per eager
call issued without syncs; not for inductor), ``gbps`` and ``pct_copy`` (of a measured 1 GiB
bf16 ``copy_``), ``max_rel_diff`` (vs eager, a sanity check), ``first_call_s``; for flag_gems
rows ``vs_best_other`` (best other contender's time / ours) and ``vs_anchor`` (the target time
of issue 2 / ours). Skipped contenders are rows with metric ``skipped`` and the reason.

Usage::

    python benchmarks/bench_kernels.py [--ops rope ...] [--ms 1 4096] [--providers eager flag_gems] [--quick]
    python benchmarks/bench_kernels.py --cpu-smoke      # tiny shapes, CPU interpreter, checks the script only
"""

from __future__ import annotations

import argparse
import os
import sys
import time

_T0 = time.perf_counter()

if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (see flag_gems/__init__.py)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_utils as bu  # noqa: E402

DTYPE = torch.bfloat16
EPS = 1e-6
LLAMA3_8B = dict(hidden=4096, inter=14336, n_q=32, n_kv=8, head_dim=128, max_pos=32768)
SMOKE = dict(hidden=64, inter=128, n_q=4, n_kv=2, head_dim=16, max_pos=64)
MS = [1, 64, 512, 4096, 16384]
SMOKE_MS = [1, 3]

# Target times of issue 2 (µs per call, H100): the best known implementation at each M.
ANCHORS_US = {
    "add_rms_norm": {1: 1.85, 64: 2.09, 512: 3.94, 4096: 47.3, 16384: 180.7},
    "silu_and_mul": {1: 1.47, 64: 2.51, 512: 14.4, 4096: 116.9, 16384: 460.6},
    "rope": {1: 1.56, 64: 3.19, 512: 5.87, 4096: 32.0, 16384: 136.0},
}

# Provider -> family (what --providers may name); "ours" are the flag_gems family.
FAMILY = {
    "eager": "eager", "inductor": "inductor", "flag_gems": "flag_gems", "flag_gems_ab": "flag_gems",
    "flag_gems_inplace": "flag_gems", "liger": "liger", "liger_fused": "liger",
}
# Providers that write into their inputs, per op: compared only with each other. An in-place
# kernel of a working set under the L2's size (rope at M = 4096: 40 MiB on the H200's 50 MB)
# is re-read from L2 between CUDA-graph replays, which an out-of-place one is not.
IN_PLACE = {"rope": {"liger", "flag_gems_inplace"}}
OURS_PRIMARY = "flag_gems"


# ----------------------------------------------------------------- reference (eager) functions


def add_rms_norm_eager(x, residual, weight, eps: float):
    """HF / vLLM-native residual add + RMSNorm: statistics in fp32, normalized value cast, then weight."""
    h = x + residual
    hf = h.float()
    y = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype) * weight
    return y, h


def silu_and_mul_eager(x):
    d = x.shape[-1] // 2
    return F.silu(x[:, :d]) * x[:, d:]


def rope_eager(positions, query, key, cos_sin_cache, head_size: int):
    """vLLM forward_native-style NeoX RoPE: rows of the cos|sin cache, halves of each head rotated."""
    cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)  # [M, r/2] each
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads

    def rotate(x):
        x = x.view(x.shape[0], -1, head_size)
        x1, x2 = x.chunk(2, dim=-1)
        c, s = cos.to(x.dtype), sin.to(x.dtype)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(1)

    return rotate(query), rotate(key)


_COMPILED: dict = {}


def _compiled(fn):
    """One torch.compile wrapper per function (default mode, static shapes: one compile per M)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


# ----------------------------------------------------------------- ops: inputs, bytes, contenders
#
# setup(M, dims, device) -> (inputs dict, bytes per call, shape text); each builder takes the
# inputs and returns (fn, canon): fn() runs one call, canon(out) gives the outputs as a tuple
# in the eager layout (for the sanity check). A builder that raises is a recorded skip.


def _tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def setup_add_rms_norm(M, dims, device):
    n = dims["hidden"]
    inputs = dict(
        x=torch.randn(M, n, device=device, dtype=DTYPE),
        r=torch.randn(M, n, device=device, dtype=DTYPE),
        w=(1 + 0.1 * torch.randn(n, device=device)).to(DTYPE),
    )
    return inputs, 4 * M * n * 2 + n * 2, f"x, residual [M, {n}] -> (y, h)"


def _liger_add_rms_norm(t):
    from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction

    return lambda: LigerFusedAddRMSNormFunction.apply(t["x"], t["r"], t["w"], EPS, 0.0, "llama", False), _tuple


def _flag_gems_add_rms_norm(t):
    import flag_gems

    return lambda: flag_gems.add_rms_norm(t["x"], t["r"], t["w"], EPS), _tuple


ADD_RMS_NORM = dict(
    setup=setup_add_rms_norm,
    providers=dict(
        eager=lambda t: (lambda: add_rms_norm_eager(t["x"], t["r"], t["w"], EPS), _tuple),
        inductor=lambda t: (lambda: _compiled(add_rms_norm_eager)(t["x"], t["r"], t["w"], EPS), _tuple),
        flag_gems=_flag_gems_add_rms_norm,
        liger=_liger_add_rms_norm,
    ),
)


def setup_silu_and_mul(M, dims, device):
    d = dims["inter"]
    x = torch.randn(M, 2 * d, device=device, dtype=DTYPE)
    inputs = dict(x=x, a=x[:, :d].contiguous(), b=x[:, d:].contiguous())
    return inputs, 3 * M * d * 2, f"x [M, 2*{d}] -> [M, {d}]"


def _flag_gems_silu_fused(t):
    import flag_gems

    return lambda: flag_gems.silu_and_mul_fused(t["x"]), _tuple


def _flag_gems_silu_ab(t):
    import flag_gems

    return lambda: flag_gems.silu_and_mul(t["a"], t["b"]), _tuple


def _liger_silu(t):
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return lambda: LigerSiLUMulFunction.apply(t["a"], t["b"]), _tuple


def _liger_silu_fused(t):
    from liger_kernel.ops.swiglu import LigerFusedGateUpSiLUMulFunction

    return lambda: LigerFusedGateUpSiLUMulFunction.apply(t["x"]), _tuple


SILU_AND_MUL = dict(
    setup=setup_silu_and_mul,
    providers=dict(
        eager=lambda t: (lambda: silu_and_mul_eager(t["x"]), _tuple),
        inductor=lambda t: (lambda: _compiled(silu_and_mul_eager)(t["x"]), _tuple),
        flag_gems=_flag_gems_silu_fused,
        flag_gems_ab=_flag_gems_silu_ab,
        liger=_liger_silu,
        liger_fused=_liger_silu_fused,
    ),
)


def setup_rope(M, dims, device):
    hd, nq, nkv, max_pos = dims["head_dim"], dims["n_q"], dims["n_kv"], dims["max_pos"]
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    inputs = dict(
        positions=torch.randint(0, max_pos, (M,), device=device, dtype=torch.int64),
        q=torch.randn(M, nq * hd, device=device, dtype=DTYPE),
        k=torch.randn(M, nkv * hd, device=device, dtype=DTYPE),
        cache=torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device),  # [max_pos, hd] fp32: cos | sin
        dims=dims,
    )
    nbytes = 2 * M * (nq + nkv) * hd * 2 + M * hd * 4 + M * 8
    return inputs, nbytes, f"q [M, {nq}*{hd}], k [M, {nkv}*{hd}], cos|sin cache [{max_pos}, {hd}] fp32"


def _flag_gems_rope(t):
    import flag_gems

    hd = t["dims"]["head_dim"]
    return lambda: flag_gems.rotary_embedding_cache(t["positions"], t["q"], t["k"], hd, t["cache"], is_neox=True), _tuple


def _flag_gems_rope_inplace(t):
    import flag_gems

    hd = t["dims"]["head_dim"]
    q, k = t["q"].clone(), t["k"].clone()  # written in place, like Liger's
    return lambda: flag_gems.rotary_embedding_cache(t["positions"], q, k, hd, t["cache"], is_neox=True,
                                                    inplace=True), _tuple


def _liger_rope(t):
    from liger_kernel.ops.rope import LigerRopeFunction

    dims = t["dims"]
    hd, M = dims["head_dim"], t["q"].shape[0]
    # HF layout: projections are [1, M, heads, hd] in memory, seen as [1, heads, M, hd]; cos/sin are the
    # per-token rows in the model dtype with the half table repeated ([1, M, hd]). Clones: Liger writes in place.
    q = t["q"].clone().view(1, M, dims["n_q"], hd).transpose(1, 2)
    k = t["k"].clone().view(1, M, dims["n_kv"], hd).transpose(1, 2)
    cos, sin = t["cache"].index_select(0, t["positions"]).to(DTYPE).chunk(2, dim=-1)
    cos, sin = cos.repeat(1, 2).unsqueeze(0).contiguous(), sin.repeat(1, 2).unsqueeze(0).contiguous()

    def canon(out):
        return tuple(o.transpose(1, 2).reshape(M, -1) for o in out)

    return lambda: LigerRopeFunction.apply(q, k, cos, sin), canon


ROPE = dict(
    setup=setup_rope,
    providers=dict(
        eager=lambda t: (lambda: rope_eager(t["positions"], t["q"], t["k"], t["cache"], t["dims"]["head_dim"]), _tuple),
        inductor=lambda t: (
            lambda: _compiled(rope_eager)(t["positions"], t["q"], t["k"], t["cache"], t["dims"]["head_dim"]), _tuple),
        flag_gems=_flag_gems_rope,
        flag_gems_inplace=_flag_gems_rope_inplace,
        liger=_liger_rope,
    ),
)

OPS = {"add_rms_norm": ADD_RMS_NORM, "silu_and_mul": SILU_AND_MUL, "rope": ROPE}


# ----------------------------------------------------------------- measuring


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _rel_diff(out, ref) -> float:
    """max |out - ref| / max |ref| over all outputs (both in the eager layout)."""
    if len(out) != len(ref):
        return float("inf")
    num = den = 0.0
    for o, r in zip(out, ref):
        if o.shape != r.shape:
            return float("inf")
        num = max(num, (o.float() - r.float()).abs().max().item())
        den = max(den, r.float().abs().max().item())
    return num / max(den, 1e-30)


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:200]


class Runner:
    """Runs the (op, M, provider) grid and collects long-format rows."""

    def __init__(self, args, device: str, meta: dict):
        self.args, self.device, self.meta = args, device, meta
        self.rows: list[dict] = []
        self._said: set = set()
        self.shapes: dict = {}  # op -> shape text for the table heading
        self.dims = SMOKE if args.cpu_smoke else LLAMA3_8B
        self.anchors = {} if args.cpu_smoke else ANCHORS_US  # targets are for the Llama shapes only
        self.t0 = _T0 if __name__ == "__main__" else time.perf_counter()  # budget counts the imports when run as a script
        if args.quick:
            self.timing = dict(min_replay_ms=0.5, replays=5)
        else:
            self.timing = dict(min_replay_ms=1.0, replays=12)

    def row(self, op, provider, M, metric, value, **extra):
        self.rows.append(dict(op=op, provider=provider, M=M, metric=metric, value=value, **extra, **self.meta))

    def skip(self, op, provider, M, reason):
        self.row(op, provider, M, "skipped", reason)
        if (op, provider, reason) not in self._said:
            self._said.add((op, provider, reason))
            print(f"  {op:<13} {provider:<13} M={M:<6} skipped: {reason}", flush=True)

    def copy_bandwidth(self):
        nbytes = (1 << 20) if self.args.cpu_smoke else (1 << 30)
        gb, us = bu.copy_bandwidth(self.device, nbytes, **(self.timing if self.device == "cuda" else {}))
        self.copy_gbps = gb
        self.row("copy", "torch", nbytes, "device_us", us)
        self.row("copy", "torch", nbytes, "gbps", gb)
        print(f"copy_ of {nbytes >> 20} MiB bf16: {us:.1f} us, {gb:.0f} GB/s (read + write)", flush=True)

    def host_calls(self, M) -> dict:
        calls = 200 if M <= 512 else 50  # short batches at large M: the launch queue must not fill
        if self.args.quick:
            calls //= 2
        if self.args.cpu_smoke:
            return dict(calls=2, batches=2, warmup=0)
        return dict(calls=calls, batches=5)

    def run_op(self, op: str, providers: list[str]):
        spec = OPS[op]
        for M in self.args.ms:
            if time.perf_counter() - self.t0 > self.args.time_budget:
                for p in providers:
                    self.skip(op, p, M, f"time budget of {self.args.time_budget:.0f} s spent")
                continue
            torch.manual_seed(0)
            inputs, nbytes, shape = spec["setup"](M, self.dims, self.device)
            self.shapes[op] = shape
            ref = None
            for p in providers:
                ref = self.run_one(op, p, M, spec["providers"][p], inputs, nbytes, shape, ref)
            del inputs, ref
            if self.device == "cuda":
                torch.cuda.empty_cache()
            self.derive(op, M, providers)

    def run_one(self, op, p, M, builder, inputs, nbytes, shape, ref):
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        if p == "inductor" and len(self.args.ms) + 2 > getattr(torch._dynamo.config, limit, 8):
            setattr(torch._dynamo.config, limit, len(self.args.ms) + 2)  # one compile per M
        try:
            fn, canon = builder(inputs)
        except Exception as e:  # missing contender (not installed / not written yet)
            self.skip(op, p, M, _short(e))
            return ref
        try:
            _sync(self.device)
            t0 = time.perf_counter()
            out = canon(fn())
            _sync(self.device)
            first = time.perf_counter() - t0
            diff = 0.0 if ref is None else _rel_diff(out, ref)
            if p == "eager":
                ref = out
            del out
            if self.device == "cuda":
                dev = bu.device_time_us(fn, **self.timing)
            else:
                dev = bu.DeviceTime(bu.wall_time_us(fn, iters=1 if self.args.cpu_smoke else 3), "wall_clock", 1)
            host = None if p == "inductor" else bu.host_time_us(fn, **self.host_calls(M))
        except Exception as e:
            try:
                _sync(self.device)
            except Exception:  # a sticky device error: the remaining cells will be skips too
                pass
            self.skip(op, p, M, _short(e))
            return ref
        gb = bu.gbps(nbytes, dev)
        pct = 100.0 * gb / self.copy_gbps
        extra = dict(shape=shape, bytes=nbytes, timing=dev.method)
        self.row(op, p, M, "device_us", float(dev), calls_per_replay=dev.calls, **extra)
        if host is not None:
            self.row(op, p, M, "host_us", host, **extra)
        self.row(op, p, M, "gbps", gb, **extra)
        self.row(op, p, M, "pct_copy", pct, **extra)
        self.row(op, p, M, "first_call_s", first, **extra)
        if ref is not None and p != "eager":
            self.row(op, p, M, "max_rel_diff", diff, **extra)
        host_txt = f"host {host:8.1f} us" if host is not None else " " * 16
        flag = "  CHECK OUTPUT" if diff > 1e-2 else ""
        print(f"  {op:<13} {p:<13} M={M:<6} device {float(dev):9.2f} us ({dev.method}, {dev.calls} calls) {host_txt}"
              f"  {gb:7.0f} GB/s {pct:5.1f}% copy  first {first:6.2f} s  diff {diff:.1e}{flag}", flush=True)
        return ref

    def derive(self, op, M, providers):
        """vs_best_other and vs_anchor rows for our providers at this M."""
        dev = {r["provider"]: r["value"] for r in self.rows
               if r["op"] == op and r["M"] == M and r["metric"] == "device_us"}
        in_place = IN_PLACE.get(op, set())
        anchor = self.anchors.get(op, {}).get(M)
        for p, t in dev.items():
            if FAMILY.get(p) != "flag_gems":
                continue
            others = {o: u for o, u in dev.items() if FAMILY.get(o) != "flag_gems" and (o in in_place) == (p in in_place)}
            best = min(others, key=others.get) if others else None
            if best is not None:
                self.row(op, p, M, "vs_best_other", others[best] / t, best_other=best)
            if anchor is not None:
                self.row(op, p, M, "vs_anchor", anchor / t, anchor_us=anchor)


# ----------------------------------------------------------------- report


def _fmt_us(v) -> str:
    if v is None:
        return "—"
    return f"{v:.2f}" if v < 10 else (f"{v:.1f}" if v < 1000 else f"{v:.0f}")


def _fmt_x(v) -> str:
    return "—" if v is None else f"{v:.2f}x"


def markdown(rows: list[dict], ops: list[str], ms: list[int], providers_by_op: dict, copy_gbps: float,
             anchors: dict, shapes: dict) -> str:
    """The report: one table per op (device µs per contender, our bandwidth and ratios, host µs)."""
    meta = rows[0]
    val = {(r["op"], r["provider"], r["M"], r["metric"]): r for r in rows}

    def get(op, p, M, metric):
        r = val.get((op, p, M, metric))
        return None if r is None or isinstance(r["value"], str) else r["value"]

    timing = sorted({r.get("timing") for r in rows if r.get("timing")})
    lines = [
        f"## Kernel benchmark — {meta['gpu']} · torch {meta['torch']} · triton {meta['triton']} · "
        f"liger {meta['liger']} · git {meta['git']} · {meta['date']}",
        "",
        f"Device µs per call ({', '.join(timing)}; median). Copy bandwidth {copy_gbps:.0f} GB/s "
        "(bf16 copy_, read + write). vs best = best other contender / flag_gems, vs anchor = "
        "issue-2 target / flag_gems (> 1: flag_gems faster). bf16.",
    ]
    for op in ops:
        provs = providers_by_op[op]
        ours = OURS_PRIMARY if OURS_PRIMARY in provs else next((p for p in provs if FAMILY[p] == "flag_gems"), None)
        hosted = [p for p in provs if p != "inductor"]
        lines += ["", f"### {op} — {shapes.get(op, '')}", ""]
        head = ["M"] + provs + ["best other"]
        if ours:
            head += [f"{ours} GB/s", "% copy", "vs best", "anchor µs", "vs anchor"]
        head += ["host µs " + " / ".join(hosted)]
        lines += ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        for M in ms:
            cells = [str(M)] + [_fmt_us(get(op, p, M, "device_us")) for p in provs]
            vb = val.get((op, ours, M, "vs_best_other"))
            cells.append(vb["best_other"] if vb else "—")
            if ours:
                g, pc = get(op, ours, M, "gbps"), get(op, ours, M, "pct_copy")
                cells += ["—" if g is None else f"{g:.0f}" if g >= 10 else f"{g:.2f}", "—" if pc is None else f"{pc:.0f}%",
                          _fmt_x(get(op, ours, M, "vs_best_other")), _fmt_us(anchors.get(op, {}).get(M)),
                          _fmt_x(get(op, ours, M, "vs_anchor"))]
            cells.append(" / ".join(_fmt_us(get(op, p, M, "host_us")) for p in hosted))
            lines.append("| " + " | ".join(cells) + " |")
        notes = []
        for p in provs:
            diffs = [get(op, p, M, "max_rel_diff") for M in ms]
            diffs = [d for d in diffs if d is not None]
            if diffs and max(diffs) > 1e-2:
                notes.append(f"{p} max rel diff vs eager {max(diffs):.1e} (CHECK)")
            skips = sorted({r["value"] for r in rows if r["op"] == op and r["provider"] == p and r["metric"] == "skipped"})
            if skips:
                notes.append(f"{p} skipped: {skips[0][:120]}" + (f" (+{len(skips) - 1} other reasons)" if len(skips) > 1 else ""))
            fb = [r["M"] for r in rows if r["op"] == op and r["provider"] == p and r.get("timing") == "cuda_events"
                  and r["metric"] == "device_us"]
            if fb:
                notes.append(f"{p} not capturable at M={fb}: event timing with launch overhead")
        for p in provs:  # our variants other than the one in the ratio columns
            vs = [f"M={M}: {_fmt_x(get(op, p, M, 'vs_best_other'))}" for M in ms
                  if get(op, p, M, "vs_best_other") is not None]
            if FAMILY[p] == "flag_gems" and p != ours and vs:
                notes.append(f"{p} vs best " + ", ".join(vs))
        lines += [f"- {n}" for n in notes]
    return "\n".join(lines)


# ----------------------------------------------------------------- main


def _providers_for(op: str, args) -> list[str]:
    names = list(OPS[op]["providers"])
    if args.providers:
        return [p for p in names if p in args.providers or FAMILY[p] in args.providers]
    if args.cpu_smoke:
        return [p for p in names if FAMILY[p] in ("eager", "flag_gems")]
    return names


def main(argv=None) -> int:
    """Run the benchmark; returns the process exit code (0 also when contenders were skipped)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="folder for the JSON and Markdown files (default: $OUT, else benchmarks/results/)")
    p.add_argument("--ops", nargs="+", choices=list(OPS), default=list(OPS))
    p.add_argument("--ms", nargs="+", type=int, help=f"token counts (default {MS}; smoke {SMOKE_MS})")
    p.add_argument("--providers", nargs="+", choices=sorted(set(FAMILY) | set(FAMILY.values())),
                   help="contenders or families (flag_gems, liger include their variants); default all")
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--time-budget", type=float, default=330.0,
                   help="seconds from the start after which the remaining (op, M) cells are skipped (default 330)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny shapes, eager and flag_gems, no Inductor; on the CPU (Triton interpreter) unless a GPU "
                        "is usable: checks the script, measures nothing")
    args = p.parse_args(argv)
    args.ms = args.ms or (SMOKE_MS if args.cpu_smoke else MS)
    if args.cpu_smoke:
        args.quick = True
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    device = "cuda" if torch.cuda.is_available() and not interp else "cpu"
    if device == "cpu" and not args.cpu_smoke:
        print("no usable CUDA device (or TRITON_INTERPRET=1): use --cpu-smoke", file=sys.stderr)
        return 2

    meta = bu.run_meta(device)
    print(f"kernel benchmark on {meta['gpu']}: torch {meta['torch']}, triton {meta['triton']}, liger {meta['liger']}, "
          f"git {meta['git']}; ops {args.ops}, M {args.ms}", flush=True)
    runner = Runner(args, device, meta)
    providers_by_op = {op: _providers_for(op, args) for op in args.ops}
    args.ops = [op for op in args.ops if providers_by_op[op]]  # an op none of the named contenders has
    stem = "kernels_" + ("smoke_" if args.cpu_smoke else "") + bu.file_tag(meta)
    with torch.no_grad():
        runner.copy_bandwidth()
        for op in args.ops:
            t0 = time.perf_counter()
            runner.run_op(op, providers_by_op[op])
            print(f"{op}: {time.perf_counter() - t0:.1f} s (total {time.perf_counter() - runner.t0:.1f} s)", flush=True)
            bu.write_rows(runner.rows, args.out, stem)  # partial results survive a kill
    text = markdown(runner.rows, args.ops, args.ms, providers_by_op, runner.copy_gbps, runner.anchors, runner.shapes)
    paths = bu.write_rows(runner.rows, args.out, stem, text)
    print(f"\nwrote {', '.join(paths)} ({len(runner.rows)} rows) in {time.perf_counter() - runner.t0:.0f} s\n")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
