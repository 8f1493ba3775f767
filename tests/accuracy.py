"""The one tolerance table, and helpers to compare against a higher-precision reference.

Every accuracy test draws fresh random inputs (never zeros), poisons outputs before the
call so unwritten elements fail, and compares with a reference computed in float64 (on
the CPU) through plain torch.
"""

import torch

# (atol, rtol) per output dtype, for an output rounded once from an fp32 computation
# and compared with a float64 reference.
TOLERANCES = {
    torch.float32: (1e-5, 1.3e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
}

# Gradients go through one more reduction (row sums, weight sums over tokens): looser.
GRAD_TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}

# Logits of a whole (tiny, random-weight) model run through fused kernels vs the same model in
# eager PyTorch, same dtype: cosine similarity of the flattened logits at least this (bf16: the
# kernels round once where eager rounds at every op, and errors add up over layers).
LOGITS_COSINE = {torch.float32: 0.99999, torch.bfloat16: 0.9995}

# Whole models under flag_gems vs without (FlagGems' documented use cases, seeds/use-cases.md):
# allclose at these, else cosine similarity of the flattened outputs at least SEEDS_COSINE.
SEEDS_ATOL_RTOL = (1e-3, 1e-3)
SEEDS_COSINE = 0.99

# GEMMs: |out - ref| <= rtol * sqrt(K) * (|a| @ |b|) elementwise (fp32 accumulation, one
# rounding to the output dtype; the bound scales with the summed magnitudes, not the result).
GEMM_RTOL = {
    torch.float32: 1e-6,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}

# torch.library.opcheck utilities every functional op passes (the seeds' use case 8);
# mutable ops skip the autograd-registration check (torch.library has no autograd for them).
OPCHECK_UTILS = (
    "test_schema",
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_static",
    "test_aot_dispatch_dynamic",
)
OPCHECK_UTILS_MUTABLE = ("test_schema", "test_faketensor", "test_aot_dispatch_static", "test_aot_dispatch_dynamic")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


# The test device: the GPU when there is one, else the CPU (kernels through the interpreter).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rand(*shape, dtype=torch.float32, device="cpu", scale=1.0, requires_grad=False):
    """Fresh normal random tensor (never zeros)."""
    t = (torch.randn(shape, dtype=torch.float32) * scale).to(dtype=dtype, device=device)
    return t.requires_grad_(requires_grad)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN in place so that any element a kernel fails to write shows up."""
    return t.fill_(float("nan"))


def ref64(t: torch.Tensor) -> torch.Tensor:
    """Detached float64 CPU copy, the reference's precision."""
    return t.detach().to(device="cpu", dtype=torch.float64)


def assert_close(out, ref, dtype, what: str, grad: bool = False):
    """Compare ``out`` with a float64 reference using the dtype's tolerance.

    Args:
        out: tensor produced by the code under test.
        ref: float64 reference (any device).
        dtype: dtype whose tolerance applies.
        what: prefix for the failure message, e.g. ``"[op=rms_norm shape=(3, 5) dtype=bf16]"``.
        grad: use the gradient tolerance table.
    """
    atol, rtol = (GRAD_TOLERANCES if grad else TOLERANCES)[dtype]
    out64 = out.detach().to(device="cpu", dtype=torch.float64)
    ref64_ = ref.detach().to(device="cpu", dtype=torch.float64)
    assert out64.shape == ref64_.shape, f"{what} shape {tuple(out64.shape)} != reference {tuple(ref64_.shape)}"
    assert not torch.isnan(out64).any() or torch.isnan(ref64_).any(), f"{what} output has NaN (unwritten or wrong)"
    torch.testing.assert_close(out64, ref64_, atol=atol, rtol=rtol, msg=lambda m: f"{what} {m}")


def tag(op, shape, dtype) -> str:
    """Message prefix ``[op=.. shape=.. dtype=..]``."""
    return f"[op={op} shape={tuple(shape)} dtype={str(dtype).replace('torch.', '')}]"


def run(target, *args, **kwargs):
    """A registry entry's impl, after asserting that its supports() accepts the call."""
    from flag_gems.lowerings.registry import REGISTRY

    entry = REGISTRY[target]
    why = entry.supports(*args, **kwargs)
    assert why is None, f"[op={target}] supports() refused: {why}"
    return entry.impl(*args, **kwargs)


def reason(target, *args, **kwargs):
    """A registry entry's supports() answer: None, or why it declines the call."""
    from flag_gems.lowerings.registry import REGISTRY

    return REGISTRY[target].supports(*args, **kwargs)


def aten_calls(fn) -> list:
    """Run ``fn()`` and return the aten calls it made, as ``(func, args, kwargs)`` (exceptions propagate).

    The OpInfo tests use it to find which registered overloads torch's sample inputs reach.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class _Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append((func, args, kwargs or {}))
            return func(*args, **(kwargs or {}))

    with _Record():
        fn()
    return calls


def opinfo_samples(names, dtypes, per_dtype: int, device, variants=None):
    """``(info, dtype, sample)``: the first ``per_dtype`` sample inputs, per dtype the op supports on
    ``device``, of PyTorch's OpInfo entries named in ``names`` (``variants``: the accepted
    ``variant_test_name`` values; None takes all). Needs ``expecttest`` (importorskip it first)."""
    from torch.testing._internal.common_methods_invocations import op_db

    for info in op_db:
        if info.name not in names or (variants is not None and info.variant_test_name not in variants):
            continue
        for dtype in dtypes:
            if dtype not in info.supported_dtypes(device):
                continue
            for k, sample in enumerate(info.sample_inputs(device, dtype)):
                if k >= per_dtype:
                    break
                yield info, dtype, sample


def assert_masked_grads(outs, refs, names, mask, dtype, what: str):
    """Gradients of a backward op with an ``output_mask``: None where the mask is off, else the
    dtype and shape of the float64 reference and within the gradient tolerance.

    Args:
        outs, refs, names: per output: the op's result, the float64 reference, its name ("dx").
        mask: the op's output_mask.
        dtype: the input dtype (outputs have it).
        what: message prefix; the output's name and the mask are appended.
    """
    for k, (name, out, ref) in enumerate(zip(names, outs, refs)):
        where = f"{what} {name} mask={mask}"
        if not mask[k]:
            assert out is None, where
            continue
        assert out.dtype == dtype and out.shape == ref.shape, f"{where} {out.dtype} {tuple(out.shape)}"
        assert_close(out, ref, dtype, where, grad=True)
