"""Run as a script (TRITON_INTERPRET=0, no GPU needed): trace a few graphs on fake CUDA tensors,
run the pointwise fusion pass, and compile every generated kernel for sm_90 with Triton.
Prints ``compiled N`` (test_pointwise_fusion.py checks it); a kernel that does not compile raises."""

import os

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import flag_gems  # noqa: E402,F401
from flag_gems.passes import pointwise_fusion as pf  # noqa: E402

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
        torch.int64: "*i64", torch.int32: "*i32", torch.bool: "*i1", torch.int8: "*i8", torch.uint8: "*u8"}


def compile_generated(gm) -> int:
    n = 0
    for node in gm.graph.nodes:
        launch = getattr(node.target, "gems_launch", None)
        if launch is None:
            continue
        ptrs = [a.meta["val"].dtype for a in node.args[:launch.n_inputs]] + [o.dtype for o in node.meta["val"]]
        for index64 in launch.kernel.sources:
            fn = launch.kernel.kernel(index64)
            jit = getattr(fn, "fn", fn)  # FastKernel wraps the JITFunction
            sig, consts, k = {}, {}, 0
            for p in jit.params:
                if p.is_constexpr:
                    consts[p.name] = 1024
                elif p.name.endswith("_ptr"):
                    sig[p.name], k = _PTR[ptrs[k]], k + 1
                else:
                    sig[p.name] = "i64" if index64 else "i32"
            triton.compile(ASTSource(jit, sig, consts), target=GPUTarget("cuda", 90, 32))
            n += 1
    return n


def graphs():
    def chain(x, y, w):
        return ((x * y + w).sigmoid() * 2.0 - x).tanh(), x.to(torch.float16).to(torch.int32), (x > 0).to(torch.bfloat16)

    def rope(pos):
        inv = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.int64, device=pos.device).float() / 16))
        fr = (inv.unsqueeze(0).unsqueeze(-1).float() * pos.unsqueeze(1).float()).transpose(1, 2)
        emb = torch.cat((fr, fr), -1)
        return (emb.cos() * 1.0).to(torch.bfloat16), (emb.sin() * 1.0).to(torch.bfloat16)

    def mask(pos, keep):
        q, kv = torch.arange(5, device=pos.device), torch.arange(7, device=pos.device) - 2
        allowed = (kv.unsqueeze(0) <= q.unsqueeze(1)).unsqueeze(0) & keep.unsqueeze(1)
        idx = pos.ne(1).cumsum(-1).unsqueeze(-1).expand(2, 5, 7) % 5
        picked = torch.ops.aten.index.Tensor(allowed, [torch.arange(2, device=pos.device).view(2, 1, 1), idx,
                                                       torch.arange(7, device=pos.device)])
        bias = torch.where(picked, torch.scalar_tensor(0.0, device=pos.device),
                           torch.scalar_tensor(float("-inf"), device=pos.device))
        return torch.constant_pad_nd(bias, (0, 3), -1.0).to(torch.bfloat16)

    def kv_heads(k, v, g):
        rep = k.unsqueeze(2).expand(2, 8, 4, 3, 128).clone().view(2, 32, 3, 128)
        return rep, v.unsqueeze(2).expand(2, 8, 4, 3, 128).clone(), g.view(2, 8, 4, 3, 128).sum(2) * 0.5

    B, F, L = torch.bfloat16, torch.float32, torch.int64
    yield chain, [((5, 33), B), ((5, 33), B), ((33,), F)]
    yield rope, [((2, 9), L)]
    yield mask, [((2, 5), L), ((2, 7), torch.bool)]
    yield kv_heads, [((2, 8, 3, 128), B), ((2, 8, 3, 128), B), ((2, 32, 3, 128), B)]


def main() -> int:
    total = 0
    for f, specs in graphs():
        mode = FakeTensorMode()
        with mode:
            args = [torch.empty(s, dtype=d, device="cuda") for s, d in specs]
            gm = make_fx(f, tracing_mode="fake")(*args)
        assert pf.fuse_pointwise(gm) >= 1, f.__name__
        total += compile_generated(gm)
    print(f"compiled {total}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
