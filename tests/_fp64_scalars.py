"""Run as a script (TRITON_INTERPRET=0, no GPU needed): generate the Triton IR (TTIR, the front end,
for an sm_90 target) of each of our kernels that takes float scalars, once with them typed fp32
(what Triton's launcher passes for a Python float) and once fp64 (what Inductor's wrapper passes
when it launches a kernel inlined into its code). Prints ``RESULT {json}``: per kernel variant,
whether each compiled (or the front end's error), the f64 lines of the fp64 IR other than its
function signature and the casts of the scalars, and the IR line counts.
test_kernel_scalars.py checks it."""

import json
import os
import re

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402,F401
from triton._C.libtriton import ir  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402

from flag_gems.kernels import attention, indexing, layer_norm, matmul, reduction, rms_norm  # noqa: E402
from flag_gems.kernels.matmul import tl  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
F32 = "*fp32"


def _desc(block):
    return f"tensordesc<bf16{list(block)}>"


# (name, kernel, float scalar parameters, pointer / descriptor types (others *bf16, ints i32), constexprs)
CASES = []
for one_pass in (True, False):
    tag = "one_pass" if one_pass else "two_pass"
    CASES.append((f"rms_norm_fwd[{tag}]", rms_norm._rms_norm_fwd_kernel, ("eps", "weight_offset"), {"rstd_ptr": F32},
                  dict(HAS_RESIDUAL=True, HAS_WEIGHT=True, ROUND_BEFORE_WEIGHT=False, HAS_RSTD=True, BLOCK_N=64,
                       ONE_PASS=one_pass)))
    CASES.append((f"rms_norm_bwd[{tag}]", rms_norm._rms_norm_bwd_kernel, ("eps", "weight_offset"),
                  {"dw_ptr": F32, "rstd_ptr": F32},
                  dict(HAS_WEIGHT=True, HAS_DH=True, ROUND_BEFORE_WEIGHT=False, COMPUTE_DW=True, HAS_RSTD=False,
                       BLOCK_N=64, ONE_PASS=one_pass)))
    CASES.append((f"layer_norm_fwd[{tag}]", layer_norm._layer_norm_fwd_kernel, ("eps",),
                  {"mean_ptr": F32, "rstd_ptr": F32},
                  dict(HAS_WEIGHT=True, HAS_BIAS=True, BLOCK_N=64, ONE_PASS=one_pass)))
CASES += [
    ("matmul", matmul._matmul_kernel, ("alpha", "beta"), {},
     dict(HAS_BIAS=True, UPCAST=False, PRECISION="tf32", BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)),
    ("matmul_tma", matmul._matmul_tma_kernel, ("alpha", "beta"),
     {"a_desc": _desc([64, 32]), "b_desc": _desc([32, 64]), "c_desc": _desc([64, 64])},
     dict(HAS_BIAS=True, B_KMAJOR=False, UPCAST=False, PERSISTENT=True, BLOCK_M=64, BLOCK_N=64,
          BLOCK_K=32, GROUP_M=8)),
    ("matmul_ws", matmul._matmul_ws_kernel, ("alpha", "beta"), {},
     dict(HAS_BIAS=True, B_KMAJOR=False, UPCAST=False, PERSISTENT=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32,
          GROUP_M=8)),
    ("attention", attention._attn_fwd_kernel, ("qk_scale",), {"mask_ptr": "*u8"},
     dict(HEAD_DIM=64, HEAD_DIM_V=64, MASK_KIND=1, IS_CAUSAL=True, UPCAST=False, PRECISION="tf32", BLOCK_M=64,
          BLOCK_N=64, BLOCK_D=64, BLOCK_DV=64)),
    ("reduce_sum", reduction._reduce_kernel, ("scale",), {"out_ptr": F32}, dict(OP=0, FINAL=True, BLOCK_M=4, BLOCK_N=128)),
    ("arange", indexing._arange_kernel, ("start", "step"), {"out_ptr": F32, "params_ptr": F32},
     dict(ACC=tl.float32, PARAMS_IN_MEMORY=False, VIA_FP32=False, BLOCK=1024)),
]


def _jit(kernel):
    """The JITFunction (a FastKernel wraps one)."""
    return kernel if isinstance(kernel, triton.runtime.jit.JITFunction) else kernel.fn


def ttir(kernel, floats, pointers, constexprs, float_type: str) -> str:
    """The TTIR of ``kernel`` with its float scalars typed ``float_type``."""
    jit = _jit(kernel)
    sig = {}
    for p in jit.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in floats:
            sig[p.name] = float_type
        elif p.name in pointers:
            sig[p.name] = pointers[p.name]
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*bf16"
        else:
            sig[p.name] = "i32"
    backend = make_backend(TARGET)
    options = backend.parse_options({"num_warps": 4})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = ASTSource(jit, sig, constexprs).make_ir(
        TARGET, options, backend.get_codegen_implementation(options), backend.get_module_map(), context)
    return str(module)


def body(text: str) -> list:
    """The IR's operation lines (no blank lines, no location records)."""
    return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#loc")]


def main() -> int:
    out = {}
    for name, kernel, floats, pointers, constexprs in CASES:
        got = {}
        covered = {"kernel": _jit(kernel).__name__, "floats": list(floats)}
        for float_type in ("fp32", "fp64"):
            try:
                got[float_type] = body(ttir(kernel, floats, pointers, constexprs, float_type))
            except Exception as e:  # the front end's complaint (a loop-carried type changing to fp64...)
                got[float_type] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
        if any(isinstance(v, str) for v in got.values()):
            out[name] = {**covered, **{k: v if isinstance(v, str) else "ok" for k, v in got.items()}}
            continue
        lines32, lines64 = got["fp32"], got["fp64"]
        casts = [ln for ln in lines64 if "arith.truncf" in ln and re.search(r"f64 to f32", ln)]
        stray = [ln.strip() for ln in lines64 if "f64" in ln and "tt.func" not in ln and ln not in casts]
        out[name] = {**covered, "fp32": "ok", "fp64": "ok", "f64_lines": stray[:5], "casts": len(casts),
                     "extra_lines": len(lines64) - len(lines32), "fp32_f64": sum("f64" in ln for ln in lines32)}
    print("RESULT " + json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
