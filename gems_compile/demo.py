"""The main job: run a small Llama-style decoder layer with and without flag_gems' fused kernels.

``python -m flag_gems.demo`` builds one decoder layer (residual add + RMSNorm, rotary
embedding of q and k, attention, SiLU-gated MLP) in plain torch, then runs the same
layer with each fusible piece replaced by a ``flag_gems`` kernel, and prints how the two
compare (and, on a GPU, how long each takes). Last, it compiles the plain-torch layer
with ``torch.compile(backend="flag_gems")`` and shows what the backend fused. Without a
GPU the kernels run through Triton's CPU interpreter, at small sizes.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
import torch.nn.functional as F

import flag_gems

logger = logging.getLogger(__name__)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Layer(torch.nn.Module):
    """One Llama decoder layer (no KV cache), written as HF transformers writes it."""

    def __init__(self, hidden, heads, kv_heads, inter, eps=1e-6):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.eps = heads, kv_heads, hidden // heads, eps
        self.q = torch.nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.k = torch.nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v = torch.nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o = torch.nn.Linear(heads * self.head_dim, hidden, bias=False)
        self.gate_up = torch.nn.Linear(hidden, 2 * inter, bias=False)
        self.down = torch.nn.Linear(inter, hidden, bias=False)
        self.norm1 = torch.nn.Parameter(1 + 0.1 * torch.randn(hidden))
        self.norm2 = torch.nn.Parameter(1 + 0.1 * torch.randn(hidden))

    def _norm(self, x, w):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * xf.to(x.dtype)

    def _attend(self, q, k, v):
        b, s, _ = q.shape
        q = q.view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def _finish(self, q, k, v):
        b, _, s, _ = q.shape
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o(out.transpose(1, 2).reshape(b, s, -1))

    def forward(self, x, residual, cos, sin):
        """Plain torch."""
        residual = x + residual
        h = self._norm(residual, self.norm1)
        q, k, v = self._attend(self.q(h), self.k(h), self.v(h))
        q = q * cos.unsqueeze(1) + _rotate_half(q) * sin.unsqueeze(1)
        k = k * cos.unsqueeze(1) + _rotate_half(k) * sin.unsqueeze(1)
        x = self._finish(q, k, v)
        residual = x + residual
        h = self._norm(residual, self.norm2)
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up), residual

    def forward_gems(self, x, residual, cos, sin):
        """The same layer with flag_gems' fused kernels."""
        h, residual = flag_gems.add_rms_norm(x, residual, self.norm1, self.eps, round_before_weight=True)
        q, k, v = self._attend(self.q(h), self.k(h), self.v(h))
        q, k = flag_gems.apply_rotary_pos_emb_hf(q, k, cos, sin)
        x = self._finish(q, k, v)
        h, residual = flag_gems.add_rms_norm(x, residual, self.norm2, self.eps, round_before_weight=True)
        return self.down(flag_gems.silu_and_mul_fused(self.gate_up(h))), residual


def _rope_tables(seq, dim, device, dtype, base=10000.0):
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[None].to(dtype), emb.sin()[None].to(dtype)


def _time(fn, iters):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def main(argv=None) -> int:
    """Run the demo and print the comparison. Returns a process exit code."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=None, help="sequence length (default: 512 on GPU, 8 on CPU)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = p.parse_args(argv)

    gpu = torch.cuda.is_available()
    device = flag_gems.device
    dtype = getattr(torch, args.dtype)
    if gpu:
        seq, hidden, heads, kv_heads, inter = args.tokens or 512, 4096, 32, 8, 14336
    else:
        seq, hidden, heads, kv_heads, inter = args.tokens or 8, 256, 4, 2, 512
    torch.manual_seed(0)
    layer = Layer(hidden, heads, kv_heads, inter).to(device=device, dtype=dtype).eval()
    x = torch.randn(1, seq, hidden, device=device, dtype=dtype)
    residual = torch.randn(1, seq, hidden, device=device, dtype=dtype)
    cos, sin = _rope_tables(seq, hidden // heads, device, dtype)

    with torch.no_grad():
        ref_out, ref_res = layer(x, residual, cos, sin)
        out, res = layer.forward_gems(x, residual, cos, sin)
        report = flag_gems.explain(layer, x, residual, cos, sin)
        torch._dynamo.reset()
        compiled = torch.compile(layer, backend="flag_gems")
        comp_out, _ = compiled(x, residual, cos, sin)
        # float64 reference of the whole layer, to judge both against.
        layer64 = Layer(hidden, heads, kv_heads, inter).to(device=device, dtype=torch.float64)
        layer64.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
        out64, _ = layer64(x.double(), residual.double(), cos.double(), sin.double())

    def cos_sim(a, b):
        return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()

    print(f"flag_gems demo: one Llama-style decoder layer, {seq} tokens, hidden {hidden}, {args.dtype}, on {device}"
          + ("" if gpu else " (Triton CPU interpreter)"))
    print(f"{'version':<24}{'cosine vs fp64':>16}{'max |err| vs fp64':>20}")
    for name, o in (("plain torch", ref_out), ("flag_gems kernels", out), ("torch.compile flag_gems", comp_out)):
        print(f"{name:<24}{cos_sim(o, out64):>16.6f}{(o.double() - out64).abs().max().item():>20.4g}")
    print(f"residual stream: max |flag_gems - torch| = {(res.double() - ref_res.double()).abs().max().item():.3g}")
    print("backend fusions: " + ", ".join(f"{k} x{v}" for k, v in sorted(report.fused.items())))
    if gpu:
        with torch.no_grad():
            t_ref = _time(lambda: layer(x, residual, cos, sin), 20)
            t_gems = _time(lambda: layer.forward_gems(x, residual, cos, sin), 20)
            t_comp = _time(lambda: compiled(x, residual, cos, sin), 20)
        print(f"time per layer: plain torch {t_ref:.3f} ms, flag_gems kernels {t_gems:.3f} ms ({t_ref / t_gems:.2f}x), "
              f"torch.compile flag_gems {t_comp:.3f} ms ({t_ref / t_comp:.2f}x)")
    ok = min(cos_sim(out, out64), cos_sim(comp_out, out64)) >= 0.999
    print("OK" if ok else "MISMATCH: flag_gems output differs from the float64 reference")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
