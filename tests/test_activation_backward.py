"""tanh / sigmoid / silu backward on the pointwise generator: against float64 autograd, layouts, eager training."""

import copy

import pytest
import torch

import flag_gems
from accuracy import DTYPE_IDS, DTYPES, assert_close, rand, reason, ref64, run, tag

aten = torch.ops.aten

# op -> (forward used to make the saved tensor, whether the op takes the forward's output)
CASES = {
    aten.tanh_backward.default: (torch.tanh, True),
    aten.sigmoid_backward.default: (torch.sigmoid, True),
    aten.silu_backward.default: (torch.nn.functional.silu, False),
}


def _reference(target, grad, x):
    """float64 autograd of the forward at x: the gradient the op must give."""
    fwd, _ = CASES[target]
    x64 = ref64(x).requires_grad_(True)
    (g,) = torch.autograd.grad(fwd(x64), x64, ref64(grad))
    return g


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "broadcast_grad"])
@pytest.mark.parametrize("target", list(CASES), ids=lambda t: str(t).removeprefix("aten."))
def test_matches_float64_autograd(target, layout, dtype, device):
    fwd, takes_output = CASES[target]
    x = rand(7, 13, dtype=dtype, device=device, scale=3.0)
    grad = rand(7, 13, dtype=dtype, device=device)
    if layout == "transposed":
        x, grad = rand(13, 7, dtype=dtype, device=device, scale=3.0).t(), rand(13, 7, dtype=dtype, device=device).t()
    elif layout == "broadcast_grad":
        grad = rand(13, dtype=dtype, device=device).expand(7, 13)
    saved = fwd(x) if takes_output else x
    out = run(target, grad, saved)
    # The op sees the forward's rounded output (tanh, sigmoid): the reference is the formula at that value.
    if takes_output:
        y = ref64(saved)
        ref = ref64(grad) * ((1 - y * y) if target is aten.tanh_backward.default else (1 - y) * y)
    else:
        ref = _reference(target, grad, x)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, ref, dtype, tag(target, x.shape, dtype))


def test_mixed_dtypes_promote_as_torch_and_complex_is_refused(device):
    x = rand(3, 4, device=device)
    for target in CASES:
        for other in (x.bfloat16(), torch.ones(3, 4, dtype=torch.int64, device=device)):
            want = target(x, other)  # torch promotes
            out = run(target, x, other)
            assert out.dtype == want.dtype
            assert_close(out, ref64(want), want.dtype, tag(f"{target}[mixed]", x.shape, want.dtype))
    assert "complex" in reason(aten.tanh_backward.default, x.to(torch.complex64), x.to(torch.complex64))


def test_eager_training_step_uses_them(device, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.SiLU(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 4), torch.nn.Sigmoid()).to(device)
    ref_model = torch.nn.Sequential(*[m for m in model]).to(device)
    x = rand(5, 12, device=device)
    model64 = copy.deepcopy(ref_model).to(device="cpu", dtype=torch.float64)
    (want,) = torch.autograd.grad(model64(ref64(x)).sum(), model64[0].weight)
    log = tmp_path / "ops.log"
    with flag_gems.use_gems(include=["tanh_backward", "sigmoid_backward", "silu_backward"], record=True, once=True,
                            path=log):
        (got,) = torch.autograd.grad(model(x).sum(), model[0].weight)
    assert_close(got, want, torch.float32, tag("training step dW0", got.shape, torch.float32), grad=True)
    logged = {line.split("GEMS ")[1] for line in log.read_text().splitlines()}
    assert {"TANH_BACKWARD", "SIGMOID_BACKWARD", "SILU_BACKWARD"} <= logged, logged
