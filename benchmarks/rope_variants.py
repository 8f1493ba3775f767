"""Where RoPE's gap to Liger comes from: probe kernels that change one thing at a time.

Session 8 measured our rope at 1.30x Liger's time at M = 4096 tokens (H200, both in place), even
with one program per token like Liger's. Liger's kernel differs from ours in three ways, and
each probe here (one program per token, all q and k heads, rotate-half, in place) toggles one:

- ``pos``: the token's table row comes from a loaded position (our vLLM path: a dependent load
  before the table row) or is the token's own row of pre-gathered tables (Liger, our HF path);
- ``order``: the q / k tiles are loaded before the table row (``xfirst``) or after it (``tfirst``;
  with ``pos`` that puts two dependent loads ahead of the q / k loads in program order);
- ``math``: fp32 (ours: tables read as fp32) or the input dtype (Liger: bf16 tables and math).

Next to them: our shipped launchers as the product calls them (``rotary_embedding_cache`` on
vLLM's layout; ``apply_rotary_pos_emb_hf``'s kernel on Liger's exact inputs, in place) and Liger.
Every probe's result is checked against an fp32 reference of the same rotation.

Usage (GPU; on a machine without one, tiny shapes through the interpreter check the script)::

    python benchmarks/rope_variants.py [--ms 1 64 4096 16384] [--warps 4 8] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_utils as bu  # noqa: E402
import bench_kernels as bk  # noqa: E402

import flag_gems  # noqa: E402
from flag_gems.kernels import _autotune as at  # noqa: E402
from flag_gems.kernels import rotary_embedding as kr  # noqa: E402


@triton.jit
def _probe_table(cos_ptr, sin_ptr, pos_ptr, t, stride_t, j, HAS_POS: tl.constexpr, F32: tl.constexpr,
                 FULL: tl.constexpr, HALF: tl.constexpr):
    if HAS_POS:
        row = tl.load(pos_ptr + t).to(tl.int64)
    else:
        row = t
    c = tl.load(cos_ptr + row * stride_t + j)
    s = tl.load(sin_ptr + row * stride_t + j)
    if F32:
        c = c.to(tl.float32)
        s = s.to(tl.float32)
    if FULL:
        # HF's full tables: the second half's entries loaded too (equal here), averaged in so the
        # loads stay live: what our HF path pays for exactness on any table.
        c2 = tl.load(cos_ptr + row * stride_t + HALF + j).to(c.dtype)
        s2 = tl.load(sin_ptr + row * stride_t + HALF + j).to(s.dtype)
        c = (c + c2) * 0.5
        s = (s + s2) * 0.5
    return c, s


@triton.jit
def _probe_tiles(q_ptr, k_ptr, t, stride_q, stride_k, j, HALF: tl.constexpr, NQ: tl.constexpr, NK: tl.constexpr):
    hq = tl.arange(0, NQ)[:, None] * (2 * HALF) + j[None, :]
    hk = tl.arange(0, NK)[:, None] * (2 * HALF) + j[None, :]
    qp = q_ptr + t * stride_q + hq
    kp = k_ptr + t * stride_k + hk
    return qp, kp, tl.load(qp), tl.load(qp + HALF), tl.load(kp), tl.load(kp + HALF)


@triton.jit
def _probe_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, pos_ptr, stride_q, stride_k, stride_t, n_inner,
                  HALF: tl.constexpr, NQ: tl.constexpr, NK: tl.constexpr,
                  HAS_POS: tl.constexpr, X_FIRST: tl.constexpr, F32: tl.constexpr,
                  FULL: tl.constexpr, DIV: tl.constexpr):
    if DIV == 0:
        t = tl.program_id(0).to(tl.int64)
    else:
        # The token as our kernel finds it: (outer, inner) from the program id, then rebuilt
        # (``n_inner`` is the token count, so t is unchanged): int64 (ours) or int32 division.
        if DIV == 1:
            pid = tl.program_id(0).to(tl.int64)
        else:
            pid = tl.program_id(0)
        o = pid // n_inner
        i = pid - o * n_inner
        t = o.to(tl.int64) * n_inner + i.to(tl.int64)
    j = tl.arange(0, HALF)
    if X_FIRST:
        qp, kp, q1, q2, k1, k2 = _probe_tiles(q_ptr, k_ptr, t, stride_q, stride_k, j, HALF, NQ, NK)
        c, s = _probe_table(cos_ptr, sin_ptr, pos_ptr, t, stride_t, j, HAS_POS, F32, FULL, HALF)
    else:
        c, s = _probe_table(cos_ptr, sin_ptr, pos_ptr, t, stride_t, j, HAS_POS, F32, FULL, HALF)
        qp, kp, q1, q2, k1, k2 = _probe_tiles(q_ptr, k_ptr, t, stride_q, stride_k, j, HALF, NQ, NK)
    dt = q_ptr.dtype.element_ty
    q1, q2, k1, k2 = q1.to(c.dtype), q2.to(c.dtype), k1.to(c.dtype), k2.to(c.dtype)
    tl.store(qp, (q1 * c[None, :] - q2 * s[None, :]).to(dt))
    tl.store(qp + HALF, (q2 * c[None, :] + q1 * s[None, :]).to(dt))
    tl.store(kp, (k1 * c[None, :] - k2 * s[None, :]).to(dt))
    tl.store(kp + HALF, (k2 * c[None, :] + k1 * s[None, :]).to(dt))


def _reference(q, k, cos_rows, sin_rows, half):
    """fp32 rotate-half of ``q [M, Hq*D]`` / ``k`` with per-token half rows ``[M, half]``."""
    def rot(x):
        x = x.float().view(x.shape[0], -1, 2 * half)
        x1, x2 = x[..., :half], x[..., half:]
        c, s = cos_rows.float()[:, None], sin_rows.float()[:, None]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1).flatten(1)
    return rot(q), rot(k)


# (BLOCK_HQ, BLOCK_HK, num_warps) forced on our kernel through its Python launchers
FORCED = [(16, 8, 2), (16, 8, 4), (32, 8, 4), (32, 8, 8), (32, 8, 2), (8, 8, 2), (8, 4, 2), (8, 8, 1)]


def _probes(m, half, nq, nk, pos, cache, cos32, sin32, ref32, ref16, warps):
    """The probe contenders: name -> (make(q, k) -> call, reference)."""
    cos16, sin16 = cos32.to(torch.bfloat16), sin32.to(torch.bfloat16)
    full = {True: (torch.cat((cos32, cos32), -1), torch.cat((sin32, sin32), -1)),
            False: (torch.cat((cos16, cos16), -1), torch.cat((sin16, sin16), -1))}
    # (label, has_pos, f32, x_first, full, div)
    specs = [("pos fp32 tfirst", True, True, False, False, 0), ("pos fp32 xfirst", True, True, True, False, 0),
             ("rows fp32 tfirst", False, True, False, False, 0), ("rows fp32 xfirst", False, True, True, False, 0),
             ("rows bf16 tfirst", False, False, False, False, 0), ("rows bf16 xfirst", False, False, True, False, 0),
             ("rows fp32 full", False, True, True, True, 0), ("rows bf16 full", False, False, True, True, 0),
             ("pos fp32 xfirst div64", True, True, True, False, 1),
             ("pos fp32 xfirst div32", True, True, True, False, 2)]
    out = {}
    for label, has_pos, f32, x_first, full_t, div in specs:
        if has_pos:
            c_, s_, stride_t = cache, cache[:, half:], cache.stride(0)
        elif full_t:
            c_, s_ = full[f32]
            stride_t = 2 * half
        else:
            c_, s_, stride_t = (cos32, sin32, half) if f32 else (cos16, sin16, half)
        for w in warps:
            def make(q, k, c_=c_, s_=s_, stride_t=stride_t, has_pos=has_pos, x_first=x_first, f32=f32,
                     full_t=full_t, div=div, w=w):
                return lambda: _probe_kernel[(m,)](
                    q, k, c_, s_, pos, q.stride(0), k.stride(0), stride_t, m,
                    HALF=half, NQ=nq, NK=nk, HAS_POS=has_pos, X_FIRST=x_first, F32=f32, FULL=full_t, DIV=div,
                    num_warps=w)
            out[f"probe {label} w{w}"] = (make, ref32 if f32 else ref16)
    return out


def _forced(config, fn):
    """``fn`` with our rope kernel's launch config forced to ``(BLOCK_HQ, BLOCK_HK, num_warps)``."""
    bhq, bhk, w = config

    def call():
        saved = kr.TUNABLE.chosen
        kr.TUNABLE.chosen = at._Forced(saved, (bhq, bhk, 64, 1, w))
        try:
            return fn()
        finally:
            kr.TUNABLE.chosen = saved
    return call


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ms", type=int, nargs="+", default=[1, 64, 4096, 16384])
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the interpreter, a check of the script only
    dims = bk.LLAMA3_8B if device == "cuda" else bk.SMOKE
    hd, nq, nk = dims["head_dim"], dims["n_q"], dims["n_kv"]
    half = hd // 2
    meta = bu.run_meta(device)
    rows, lines = [], [f"rope probes on {meta['gpu']} (torch {meta['torch']}, triton {meta['triton']})",
                       "| M | variant | us | vs Liger | GB/s | max abs err |", "|---:|---|---:|---:|---:|---:|"]
    for m in args.ms:
        t, nbytes, _ = bk.setup_rope(m, dims, device)
        pos, q0, k0, cache = t["positions"], t["q"], t["k"], t["cache"]
        rows32 = cache.index_select(0, pos)
        cos32, sin32 = rows32[:, :half].contiguous(), rows32[:, half:].contiguous()
        cos16, sin16 = cos32.to(q0.dtype), sin32.to(q0.dtype)
        ref32 = _reference(q0, k0, cos32, sin32, half)
        ref16 = _reference(q0, k0, cos16, sin16, half)
        contenders = _probes(m, half, nq, nk, pos, cache, cos32, sin32, ref32, ref16, args.warps)
        full_c = torch.cat((cos16, cos16), -1).unsqueeze(0)
        full_s = torch.cat((sin16, sin16), -1).unsqueeze(0)

        def public_in_place(q, k):
            return lambda: flag_gems.rotary_embedding_cache(pos, q, k, hd, cache, is_neox=True, inplace=True)

        def out_of_place(fn):
            """``fn(q, k, qo, ko)`` into fresh outputs, copied back into q and k on the first call only
            (so the check reads them); the timed call writes the outputs alone."""
            def make(q, k):
                qo, ko = torch.empty_like(q), torch.empty_like(k)
                call = lambda: fn(q, k, qo, ko)  # noqa: E731

                def first():
                    call()
                    q.copy_(qo)
                    k.copy_(ko)
                first.timed = call
                return first
            return make

        def hf_views(q, k):
            return q.view(1, m, nq, hd).transpose(1, 2), k.view(1, m, nk, hd).transpose(1, 2)

        cache_oop = out_of_place(lambda q, k, qo, ko: kr.rope_cache_fwd(pos, q, k, hd, cache, True, query_out=qo,
                                                                          key_out=ko))
        hf_oop = out_of_place(lambda q, k, qo, ko: kr.rope_hf_fwd(*hf_views(q, k), full_c, full_s,
                                                                  q_out=hf_views(qo, ko)[0], k_out=hf_views(qo, ko)[1]))

        def cache_in_place(q, k):
            return lambda: kr.rope_cache_fwd(pos, q, k, hd, cache, True, query_out=q, key_out=k)

        def hf_in_place(q, k):
            qv = q.view(1, m, nq, hd).transpose(1, 2)
            kv = k.view(1, m, nk, hd).transpose(1, 2)
            return lambda: kr.rope_hf_fwd(qv, kv, full_c, full_s, q_out=qv, k_out=kv)

        contenders["ours rotary_embedding_cache inplace (public, vLLM layout)"] = (public_in_place, ref32)
        contenders["ours rope_cache_fwd out of place (resolved)"] = (cache_oop, ref32)
        contenders["ours rope_hf_fwd out of place (resolved)"] = (hf_oop, ref16)
        contenders["ours rope_hf_fwd in place (Liger's inputs, resolved)"] = (hf_in_place, ref16)
        for cfg in FORCED:
            tag = f"hq{cfg[0]} hk{cfg[1]} w{cfg[2]}"
            contenders[f"ours vLLM in place {tag}"] = (
                lambda q, k, cfg=cfg: _forced(cfg, cache_in_place(q, k)), ref32)
            contenders[f"ours HF in place {tag}"] = (lambda q, k, cfg=cfg: _forced(cfg, hf_in_place(q, k)), ref16)
            for label, make_oop, ref in (("vLLM", cache_oop, ref32), ("HF", hf_oop, ref16)):
                def forced_oop(q, k, cfg=cfg, make_oop=make_oop):
                    first = make_oop(q, k)
                    call = _forced(cfg, first)
                    call.timed = _forced(cfg, first.timed)
                    return call
                contenders[f"ours {label} out of place {tag}"] = (forced_oop, ref)
        results = {}
        for name, (make, ref) in contenders.items():
            q, k = q0.clone(), k0.clone()
            try:
                make(q, k)()
                err = max((q.float() - ref[0]).abs().max().item(), (k.float() - ref[1]).abs().max().item())
                timed = make(q0.clone(), k0.clone())
                timed = getattr(timed, "timed", timed)
                results[name] = (bu.device_time_us(timed) if device == "cuda" else bu.wall_time_us(timed, iters=1), err)
            except Exception as exc:  # noqa: BLE001 - a probe that fails is reported, not fatal
                lines.append(f"| {m} | {name} | failed: {type(exc).__name__}: {str(exc)[:80]} | | | |")
        try:
            lig = bk._liger_rope(t)[0]
            results["liger"] = (bu.device_time_us(lig), float("nan"))
        except (ImportError, RuntimeError):
            results["liger"] = (float("nan"), float("nan"))
        liger_us = results["liger"][0]
        for name, (us, err) in results.items():
            rows.append(dict(op="rope_probe", M=m, variant=name, us=float(us), vs_liger=float(us) / liger_us,
                             gbps=bu.gbps(nbytes, us), max_abs_err=err, **meta))
            lines.append(f"| {m} | {name} | {us:.2f} | {us / liger_us:.2f} | {bu.gbps(nbytes, us):.0f} | {err:.3g} |")
        print("\n".join(lines[-len(results):]), flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        bu.write_rows(rows, args.out, f"rope_probes_{bu.file_tag(meta)}", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
