"""Helpers of the tests against the real vLLM package: a stand-in for ``vllm._C``'s op schemas,
the post-grad pipeline without code generation, float64 references of vLLM's layers.

vLLM's CPU-only wheel has no ``vllm._C``, yet its ``FixFunctionalizationPass`` (run by every
``PostGradPassManager``) names ``torch.ops._C.*`` ops, and the ``_C`` forms our pass rewrites
exist only on GPU builds. :func:`define_c_ops` defines the ops vLLM names, with the schemas
of vLLM's CUDA build for the five our kernels implement (and plain-torch CPU kernels for them:
what a GPU build computes, written as vLLM's CUDA kernels do, in fp32 with one rounding), and
placeholder schemas for the ones vLLM only compares against.
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F

SKIP_REASON = "vLLM is not installed here; CI's vLLM step installs vllm 0.33.0 (CPU) and runs tests/vllm"


def import_vllm_or_skip():
    """The real vLLM, or skip the calling test module (each module here starts with this).

    ``tests/`` is on ``sys.path`` (tests/conftest.py), so without vLLM installed ``import vllm``
    finds this folder as a namespace package: the check imports ``vllm.config`` and, when that
    fails, takes the stand-in out of ``sys.modules`` again.
    """
    import pytest

    try:
        import vllm.config  # noqa: F401
    except ImportError as e:
        mod = sys.modules.get("vllm")
        if mod is not None and getattr(mod, "__file__", None) is None:
            del sys.modules["vllm"]
        pytest.skip(f"{SKIP_REASON} ({type(e).__name__}: {e})", allow_module_level=True)
    return sys.modules["vllm"]

# The five ops our kernels implement, as vLLM's csrc/torch_bindings.cpp declares them.
C_SCHEMAS = {
    "rms_norm": "rms_norm(Tensor! result, Tensor input, Tensor? weight, float epsilon) -> ()",
    "fused_add_rms_norm": "fused_add_rms_norm(Tensor! input, Tensor! residual, Tensor? weight, float epsilon) -> ()",
    "silu_and_mul": "silu_and_mul(Tensor! result, Tensor input) -> ()",
    "gelu_and_mul": "gelu_and_mul(Tensor! result, Tensor input) -> ()",
    "gelu_tanh_and_mul": "gelu_tanh_and_mul(Tensor! result, Tensor input) -> ()",
    "rotary_embedding": (
        "rotary_embedding(Tensor positions, Tensor! query, Tensor!? key, int head_size, Tensor cos_sin_cache, "
        "bool is_neox, int rope_dim_offset=0, bool inverse=False) -> ()"
    ),
}
# Named by vLLM's FixFunctionalizationPass, never called here: any schema will do.
C_PLACEHOLDERS = ("fused_add_rms_norm_static_fp8_quant", "rms_norm_dynamic_per_token_quant",
                  "rms_norm_static_fp8_quant", "silu_and_mul_quant", "fused_qk_norm_rope")


def _rms(x, w, eps):
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if w is None else (y.float() * w.float()).to(x.dtype)


def _cpu_rms_norm(result, input, weight, epsilon):
    result.copy_(_rms(input, weight, epsilon))


def _cpu_fused_add_rms_norm(input, residual, weight, epsilon):
    h = (input.float() + residual.float()).to(input.dtype)
    residual.copy_(h)
    input.copy_(_rms(h, weight, epsilon))


def _act(kind):
    def impl(result, input):
        d = input.shape[-1] // 2
        g, u = input[..., :d].float(), input[..., d:].float()
        a = F.silu(g) if kind == "silu" else F.gelu(g, approximate=kind)
        result.copy_((a * u).to(input.dtype))

    return impl


def rope_math(positions, x, head_size, cache, is_neox, offset=0, inverse=False, compute=torch.float64):
    """``x (*tokens, H * D)`` or ``(*tokens, H, D)`` rotated as vLLM's kernels define it (dims
    ``[offset, offset + rotary_dim)`` of each head, cache rows ``[cos | sin]``), computed in ``compute``
    from the values as given (no intermediate rounding); returns ``compute`` values of x's shape."""
    shape = x.shape
    t = x.reshape(positions.numel(), -1, head_size).to(compute)
    rot = cache.shape[1]
    cos, sin = cache[positions.flatten().long()].to(compute).chunk(2, -1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if inverse:
        sin = -sin
    part = t[..., offset:offset + rot]
    if is_neox:
        x1, x2 = part[..., : rot // 2], part[..., rot // 2:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)
    else:
        x1, x2 = part[..., 0::2], part[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).flatten(-2)
    return torch.cat((t[..., :offset], out, t[..., offset + rot:]), -1).reshape(shape)


def rms_math(x, weight, eps, residual=None):
    """float64 RMSNorm (of ``x + residual``): returns ``(y, h)``."""
    h = x.double() if residual is None else x.double() + residual.double()
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (y if weight is None else y * weight.double()), h


def act_math(x, kind):
    """float64 ``act(x[..., :d]) * x[..., d:]`` with kind ``silu``, ``none`` or ``tanh`` (GELU)."""
    d = x.shape[-1] // 2
    g, u = x[..., :d].double(), x[..., d:].double()
    return (F.silu(g) if kind == "silu" else F.gelu(g, approximate=kind)) * u


def _cpu_rope(positions, query, key, head_size, cos_sin_cache, is_neox, rope_dim_offset=0, inverse=False):
    for t in (query, key):
        if t is not None:
            t.copy_(rope_math(positions, t, head_size, cos_sin_cache, is_neox, rope_dim_offset, inverse, torch.float32))


CPU_KERNELS = {
    "rms_norm": _cpu_rms_norm,
    "fused_add_rms_norm": _cpu_fused_add_rms_norm,
    "silu_and_mul": _act("silu"),
    "gelu_and_mul": _act("none"),
    "gelu_tanh_and_mul": _act("tanh"),
    "rotary_embedding": _cpu_rope,
}


@contextlib.contextmanager
def define_c_ops(namespace: str = "_C"):
    """Define vLLM's ``_C`` op schemas (those not defined yet) with plain-torch CPU kernels and fakes."""
    lib = torch.library.Library(namespace, "FRAGMENT")
    ns = getattr(torch.ops, namespace)
    for name, schema in C_SCHEMAS.items():
        if hasattr(ns, name):
            continue
        lib.define(schema)
        lib.impl(name, CPU_KERNELS[name], "CPU")
        lib._register_fake(name, lambda *a, **k: None)
    for name in C_PLACEHOLDERS:
        if not hasattr(ns, name):
            lib.define(f"{name}(Tensor! result, Tensor input) -> ()")
    try:
        yield lib
    finally:
        lib._destroy()


def post_grad_backend(custom_post_pass, graphs: list | None = None, pre_grad_pass=None):
    """A torch.compile backend running Inductor's real pre-codegen pipeline (AOT autograd with
    Inductor's decompositions, then Inductor's post-grad passes, ``custom_post_pass`` among
    them, auto-functionalization v1 as vLLM configures) and then the post-grad graph as it is,
    eagerly: the graph our pass sees in vLLM, without CPU code generation (minutes on CI).

    Args:
        custom_post_pass: Inductor's ``post_grad_custom_post_pass`` (vLLM's pass manager).
        graphs: receives each post-grad GraphModule after the passes.
        pre_grad_pass: Inductor's ``pre_grad_custom_pass``, run on Dynamo's graph first (vLLM's
            IR in-place functionalization).
    """
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._guards import detect_fake_mode
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.fx_passes.post_grad import post_grad_passes
    from torch._inductor.virtualized import V

    patches = {"post_grad_custom_post_pass": custom_post_pass, "enable_auto_functionalized_v2": False}

    def inference(gm, example_inputs):
        with V.set_fake_mode(detect_fake_mode(example_inputs)), torch._inductor.config.patch(patches):
            post_grad_passes(gm, is_inference=True)
        gm.recompile()
        if graphs is not None:
            graphs.append(gm)
        return make_boxed_func(gm.forward)

    def backend(gm, example_inputs):
        if pre_grad_pass is not None:
            pre_grad_pass(gm.graph)
            gm.recompile()
        with torch._inductor.config.patch(patches):
            return aot_module_simplified(gm, example_inputs, fw_compiler=inference,
                                         decompositions=select_decomp_table())

    return backend


def targets(gm) -> set:
    """The call targets of ``gm`` as strings (``"flag_gems.rms_norm.default"``, ``"_C.silu_and_mul.default"``...);
    for ``auto_functionalized`` nodes, the functionalized op."""
    out = set()
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        t = n.args[0] if "auto_functionalized" in str(n.target) else n.target
        out.add(str(t))
    return out
