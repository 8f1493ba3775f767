"""``torch.ops.flag_gems.add_tensor``: broadcasting, promotion, autograd, fallback (seeds' use cases 1 and 8)."""

import threading

import pytest
import torch
from torch.library import opcheck

import flag_gems  # noqa: F401
from accuracy import DTYPES, DTYPE_IDS, OPCHECK_UTILS, assert_close, rand, ref64, tag

SHAPE_PAIRS = [
    ((10,), (10,)),
    ((2, 1, 3), (4, 1)),
    ((2, 8, 4), (4,)),
    ((3, 8, 4), (3, 1, 4)),
    ((2, 1, 4), (2, 8, 1)),
    ((), (5, 3)),
    ((7, 1, 5, 1, 3), (1, 6, 1, 2, 3)),
    ((0, 3), (3,)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shapes", SHAPE_PAIRS, ids=str)
def test_add_broadcast(shapes, dtype, device):
    a = rand(*shapes[0], dtype=dtype, device=device)
    b = rand(*shapes[1], dtype=dtype, device=device)
    out = torch.ops.flag_gems.add_tensor(a, b)
    assert out.dtype == dtype
    assert_close(out, ref64(a) + ref64(b), dtype, tag("add_tensor", out.shape, dtype))


def test_add_strided_and_promotion(device):
    a = rand(6, 10, dtype=torch.bfloat16, device=device).t()[::2]
    b = rand(5, 6, dtype=torch.float32, device=device)
    out = torch.ops.flag_gems.add_tensor(a, b)
    assert out.dtype == torch.float32
    assert_close(out, ref64(a) + ref64(b), torch.float32, tag("add_tensor[promote]", out.shape, torch.float32))


def test_add_integer_fp64_and_complex_fallback(device):
    """Integers and fp64 run on the pointwise kernel; complex falls back to torch.add."""
    a = torch.randint(-5, 5, (4, 3), device=device)
    b = torch.randint(-5, 5, (3,), device=device, dtype=torch.int32)
    out = torch.ops.flag_gems.add_tensor(a, b)
    assert out.dtype == torch.int64 and torch.equal(out, a + b)
    c = torch.randn(3, dtype=torch.float64, device=device)
    torch.testing.assert_close(torch.ops.flag_gems.add_tensor(c, c), c + c)
    z = torch.randn(3, dtype=torch.complex64, device=device)
    torch.testing.assert_close(torch.ops.flag_gems.add_tensor(z, z), z + z)


def test_add_shape_mismatch_is_an_error(device):
    with pytest.raises(ValueError, match="other: shape \\[4\\] does not broadcast"):
        torch.ops.flag_gems.add_tensor(rand(3, device=device), rand(4, device=device))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_add_autograd(dtype, device):
    x = rand(2, 1, 3, dtype=dtype, device=device, requires_grad=True)
    y = rand(4, 1, dtype=dtype, device=device, requires_grad=True)
    g = rand(2, 4, 3, dtype=dtype, device=device)
    torch.ops.flag_gems.add_tensor(x, y).backward(g)
    x64, y64 = ref64(x).requires_grad_(), ref64(y).requires_grad_()
    (x64 + y64).backward(ref64(g))
    assert_close(x.grad, x64.grad, dtype, tag("add_tensor.dself", x.shape, dtype), grad=True)
    assert_close(y.grad, y64.grad, dtype, tag("add_tensor.dother", y.shape, dtype), grad=True)


def test_add_opcheck_seed_inputs(device):
    """The seeds' use case 8, on this machine's device."""
    inputs = [
        (torch.randn(2, 8, 4, device=device), torch.randn(4, device=device)),
        (torch.randn(3, 8, 4, device=device, requires_grad=True), torch.randn(3, 1, 4, device=device)),
        (torch.randn(2, 8, 4, device=device), torch.randn(1, 4, device=device, requires_grad=True)),
        (
            torch.randn(2, 1, 4, device=device, requires_grad=True),
            torch.randn(2, 8, 1, device=device, requires_grad=True),
        ),
    ]
    for args in inputs:
        opcheck(torch.ops.flag_gems.add_tensor.default, args, test_utils=OPCHECK_UTILS)


def test_add_compile_and_threads(device):
    """The seeds' use case 1: threads, and torch.compile (fullgraph) with autograd."""
    results = {}

    def f(i, x):
        results[i] = torch.ops.flag_gems.add_tensor(x, x)

    xs = [rand(10, device=device) for _ in range(3)]
    threads = [threading.Thread(target=f, args=(i, x)) for i, x in enumerate(xs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, x in enumerate(xs):
        assert_close(results[i], 2 * ref64(x), torch.float32, tag("add_tensor[thread]", x.shape, torch.float32))

    fn = torch.compile(lambda x, y: torch.ops.flag_gems.add_tensor(x, y), backend="aot_eager", fullgraph=True)
    x = rand(2, 1, 3, device=device, requires_grad=True)
    y = rand(4, 1, device=device, requires_grad=True)
    out = fn(x, y)
    assert_close(out, ref64(x) + ref64(y), torch.float32, tag("add_tensor[compile]", out.shape, torch.float32))
    out.sum().backward()
    assert_close(x.grad, torch.full((2, 1, 3), 4.0, dtype=torch.float64), torch.float32, tag("add_tensor[compile].dx", x.shape, torch.float32))
