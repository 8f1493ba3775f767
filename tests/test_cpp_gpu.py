"""The C++ launch path on a GPU: no Python after the first call, streams, CUDA graphs, threads, devices.

"No Python on the path" is counted: every launch that goes through Triton's Python path
passes the hook (``c_runtime.python_launches()``); a repeated call of a specialization must
add none, while the launcher's C++ counter grows by the launches the op makes and the result,
read after the call, is right.
"""

import threading

import pytest
import torch
import torch.nn.functional as F

import flag_gems
from flag_gems import c_runtime
from accuracy import TOLERANCES, rand

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not c_runtime.available, reason=f"C++ runtime unavailable: {c_runtime.reason}"),
]
fg = torch.ops.flag_gems
DEV = "cuda"


def close(out, ref, what):
    atol, rtol = TOLERANCES[out.dtype]
    torch.testing.assert_close(out.double(), ref.double(), atol=atol, rtol=rtol, msg=lambda m: f"[{what}] {m}")


def rms_ref(x, w, eps=1e-6):
    xd = x.double()
    return xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * w.double()


# Each case: (name, make inputs, call, reference, C++ launches per call).
def _cases():
    bf = torch.bfloat16

    def rms():
        return (rand(4, 4096, dtype=bf, device=DEV), rand(4096, dtype=bf, device=DEV))

    def qk():
        q, k = rand(8, 1, 32, 128, dtype=bf, device=DEV), rand(8, 1, 8, 128, dtype=bf, device=DEV)
        cos, sin = rand(64, 64, device=DEV), rand(64, 64, device=DEV)
        return q, k, cos, sin, torch.randint(0, 64, (8, 1), device=DEV)

    def rope_ref(args):  # rotate-half of q with half tables, float64
        q, _, cos, sin, pos = args
        half = cos.shape[-1]
        c, s = cos.double()[pos].unsqueeze(-2), sin.double()[pos].unsqueeze(-2)
        x1, x2 = q.double()[..., :half], q.double()[..., half:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)

    return [
        ("rms_norm", rms, lambda a: fg.rms_norm(a[0], a[1], 1e-6), lambda a: rms_ref(*a), 1),
        ("rms_norm(public)", rms, lambda a: flag_gems.rms_norm(a[0], [4096], a[1], 1e-6), lambda a: rms_ref(*a), 1),
        ("silu_and_mul", lambda: (rand(4, 14336, dtype=bf, device=DEV), rand(4, 14336, dtype=bf, device=DEV)),
         lambda a: flag_gems.silu_and_mul(*a), lambda a: F.silu(a[0].double()) * a[1].double(), 1),
        ("rotary_embedding", qk, lambda a: fg.rotary_embedding(*a, False)[0], rope_ref, 1),
        ("add_tensor", lambda: (rand(8, 4096, dtype=bf, device=DEV), rand(4096, dtype=bf, device=DEV)),
         lambda a: fg.add_tensor(*a), lambda a: a[0].double() + a[1].double(), 1),
        ("mm", lambda: (rand(8, 512, dtype=bf, device=DEV), rand(512, 256, dtype=bf, device=DEV)),
         lambda a: fg.mm(*a), None, 1),
        ("bmm", lambda: (rand(2, 8, 64, dtype=bf, device=DEV), rand(2, 64, 32, dtype=bf, device=DEV)),
         lambda a: fg.bmm(*a), None, 1),
        ("cat", lambda: (rand(4, 100, device=DEV), rand(4, 28, device=DEV)),
         lambda a: fg.cat(list(a), 1), lambda a: torch.cat(a, 1).double(), 2),
        ("sum", lambda: (rand(16, 4096, device=DEV),), lambda a: fg.sum(a[0], [-1]), lambda a: a[0].double().sum(-1), 1),
        ("nonzero", lambda: (rand(1000, device=DEV) > 0,), lambda a: fg.nonzero(a[0]),
         lambda a: torch.nonzero(a[0]), 2),
    ]


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_second_call_of_a_specialization_does_not_enter_python(case):
    name, make, call, ref, launches = case
    call(make())  # the first call compiles (through Python) and fills the C++ cache
    torch.cuda.synchronize()
    py0, cpp0 = c_runtime.python_launches(), c_runtime.stats()["cpp_launches"]
    args = make()  # fresh inputs, same specialization
    out = call(args)
    torch.cuda.synchronize()
    assert c_runtime.python_launches() == py0, f"[op={name}] a repeated call went through Python"
    assert c_runtime.stats()["cpp_launches"] - cpp0 == launches, f"[op={name}]"
    if ref is None:  # GEMMs: against the float64 product, GEMM bound
        a, b = args
        exact = a.double() @ b.double()
        bound = 8e-3 * a.shape[-1] ** 0.5 * (a.double().abs() @ b.double().abs()) + 1e-6
        assert bool(((out.double() - exact).abs() <= bound).all()), f"[op={name}]"
    elif out.dtype in TOLERANCES:
        close(out, ref(args), f"op={name}")
    else:
        assert torch.equal(out, ref(args)), f"[op={name}]"


def test_current_stream_and_cuda_graph_capture():
    """The wrapper launches on the current stream of the tensor's device: under CUDA-graph
    capture a launch anywhere else would break the capture; the replay computes new inputs."""
    x, w = rand(8, 4096, dtype=torch.bfloat16, device=DEV), rand(4096, dtype=torch.bfloat16, device=DEV)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y = fg.rms_norm(x, w, 1e-6)  # warm up (compile) on the side stream
        y = fg.rms_norm(x, w, 1e-6)
    s.synchronize()
    close(y, rms_ref(x, w), "op=rms_norm side stream")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = fg.rms_norm(x, w, 1e-6)
    x.copy_(rand(8, 4096, dtype=torch.bfloat16, device=DEV))
    g.replay()
    torch.cuda.synchronize()
    close(y, rms_ref(x, w), "op=rms_norm graph replay")


def test_threads_with_their_own_streams():
    n = 8
    inputs = [(rand(16, 4096, dtype=torch.bfloat16, device=DEV), rand(4096, dtype=torch.bfloat16, device=DEV))
              for _ in range(n)]
    fg.rms_norm(*inputs[0], 1e-6)  # compiled once
    results, errors = [None] * n, []

    def work(i):
        try:
            s = torch.cuda.Stream()
            with torch.cuda.stream(s):
                for _ in range(20):
                    results[i] = fg.rms_norm(inputs[i][0], inputs[i][1], 1e-6)
            s.synchronize()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (x, w), y in zip(inputs, results):
        close(y, rms_ref(x, w), "op=rms_norm threads")


@pytest.mark.multigpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_devices_and_threads_as_in_the_seeds_use_case():
    """Use case 1 of the seeds: add_tensor on each GPU, from another thread, and in torch.compile."""
    for d in range(min(torch.cuda.device_count(), 4)):
        x = torch.randn(10, device=f"cuda:{d}")
        out = fg.add_tensor(x, x)
        out = fg.add_tensor(x, x)  # the C++ launch, on the tensor's device (not the current one)
        assert out.device == x.device
        torch.testing.assert_close(out, 2 * x)
    results = {}

    def f(x):
        results["t"] = fg.add_tensor(x, x)

    x = torch.randn(10, device="cuda:1")
    t = threading.Thread(target=f, args=(x,))
    t.start()
    t.join()
    torch.testing.assert_close(results["t"], 2 * x)
    x = torch.randn(2, 1, 3, device="cuda:1", requires_grad=True)
    y = torch.randn(4, 1, device="cuda:1", requires_grad=True)
    out = torch.compile(lambda a, b: fg.add_tensor(a, b))(x, y)
    torch.testing.assert_close(out, x + y)
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 4.0))


def test_compile_and_autograd_through_the_wrapped_op():
    x = torch.randn(2, 1, 3, device=DEV, requires_grad=True)
    y = torch.randn(4, 1, device=DEV, requires_grad=True)
    out = torch.compile(lambda a, b: fg.add_tensor(a, b))(x, y)
    torch.testing.assert_close(out, x + y)
    out.sum().backward()
    torch.testing.assert_close(y.grad, torch.full_like(y, 6.0))
