"""The flat wrapper: one generated Python function per compiled graph (flag_gems.wrapper)."""

import json
import weakref

import pytest
import torch
import torch._dynamo.testing
from torch.fx.experimental.proxy_tensor import make_fx

import flag_gems
from flag_gems import wrapper as wrapper_mod
from flag_gems.passes import pointwise_fusion as pf
from accuracy import assert_close, rand, tag

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

# Two probe ops: ``remember`` keeps a weak reference to its input, ``alive`` says (as a tensor)
# whether that input still exists when it runs, so a graph reports its own buffer lifetimes.
_REFS: list = []


@torch.library.custom_op("gems_wrapper_test::remember", mutates_args=())
def remember(x: torch.Tensor) -> torch.Tensor:
    _REFS.append(weakref.ref(x))
    return x * 1


@remember.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("gems_wrapper_test::alive", mutates_args=())
def alive(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor([r() is not None for r in _REFS], device=x.device)


@alive.register_fake
def _(x):
    return torch.empty(len(_REFS), dtype=torch.bool, device=x.device)


def build(gm):
    src, ns = wrapper_mod.generate_wrapper(gm)
    exec(compile(src, "<test wrapper>", "exec"), ns)
    return ns["call"], src


def test_generated_function_matches_the_graph(device):
    def f(x, y, w):
        a = (x @ w).view(4, 2, 3).transpose(1, 2)  # aten op, views
        b = ((a * y).sigmoid() + 1).tanh()  # a fused group
        parts = torch.split(b, 1, dim=2)  # a multi-output op, getitems
        return parts[0].sum(-1), b.contiguous(), (a.shape[0] * 2)

    x, y, w = rand(4, 5, device=device), rand(3, 2, device=device), rand(5, 6, device=device)
    gm = make_fx(f, tracing_mode="fake")(x, y, w)
    assert pf.fuse_pointwise(gm) == 1
    call, src = build(gm)
    assert "def call(args):" in src and "args.clear()" in src and ".run(" in src
    want = gm(x, y, w)
    got = call([x, y, w])
    assert len(got) == len(want)
    for g, e in zip(got, want):
        if isinstance(e, torch.Tensor):
            assert g.shape == e.shape and g.stride() == e.stride() and torch.equal(g, e)
        else:
            assert g == e


def test_buffers_and_inputs_are_freed_after_last_use(device):
    def f(x):
        a = x.sin()
        b = remember(a)  # a is dead after this call
        c = remember(x)  # so is the input x
        return alive(b.cos() + c)

    _REFS.clear()
    gm = make_fx(f, tracing_mode="fake")(rand(8, device=device))
    call, src = build(gm)
    _REFS.clear()
    args = [rand(8, device=device)]  # the caller keeps no other reference to its input
    flags = call(args)
    assert args == [] and flags.tolist() == [False, False], src
    # The graph's own forward cannot free the caller's input.
    _REFS.clear()
    x = rand(8, device=device)
    assert gm(x).tolist() == [False, True]


def test_compiled_training_runs_the_wrapper_forward_and_backward(device, tmp_path):
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(12, 12)

        def forward(self, x):
            h = self.lin(x)
            return (h.sigmoid() * h + 0.5 * h.tanh()).pow(2).mean()

    m = M().to(device)
    x = rand(5, 12, device=device, requires_grad=True)
    loss = torch.compile(m, backend="flag_gems", options={"strict": True, "dump_dir": str(tmp_path)})(x)
    loss.backward()
    (bw,) = tmp_path.glob("graph_*_backward_wrapper.py")
    (fw,) = [p for p in tmp_path.glob("graph_*_wrapper.py") if p != bw]
    for path in (fw, bw):
        assert "def call(args):" in path.read_text()
    (rep,) = tmp_path.glob("graph_*_forward+backward_report.json")
    assert not any("wrapper off" in n for n in json.loads(rep.read_text())["notes"])
    x64 = x.detach().double().requires_grad_()
    m64 = M().to(device).double()
    m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    ref = m64(x64)
    ref.backward()
    assert_close(loss, ref, torch.float32, "[op=wrapper loss]")
    assert_close(x.grad, x64.grad, torch.float32, "[op=wrapper dx]", grad=True)
    assert_close(m.lin.weight.grad, m64.lin.weight.grad, torch.float32, "[op=wrapper dW]", grad=True)


def test_dynamic_shapes_through_the_wrapper(device, tmp_path):
    def f(x, y):
        return (x * y).exp().t().contiguous().sum(0) + x.shape[0]

    counter = torch._dynamo.testing.CompileCounterWithBackend("flag_gems")
    g = torch.compile(f, backend=counter, dynamic=True)
    for n in (3, 7, 12):
        x, y = rand(n, 4, device=device), rand(4, device=device)
        assert_close(g(x, y), f(x.double(), y.double()), torch.float32, tag("wrapper dynamic", x.shape, torch.float32))
    assert counter.frame_count == 1
    torch._dynamo.reset()
    torch.compile(f, backend="flag_gems", options={"dump_dir": str(tmp_path), "strict": True}, dynamic=True)(
        rand(5, 4, device=device), rand(4, device=device))
    (path,) = tmp_path.glob("graph_*_wrapper.py")
    assert "args.clear()" in path.read_text()


def test_codegen_failure_falls_back_with_a_note(device, monkeypatch):
    def broken(gm, name="call"):
        raise NotImplementedError("a node the generator does not handle")

    monkeypatch.setattr(wrapper_mod, "generate_wrapper", broken)
    x = rand(6, device=device)
    f = lambda a: (a * 3).exp() - 1  # noqa: E731
    report = flag_gems.explain(f, x)
    assert any("flat wrapper off" in n for n in report.graphs[0].notes), str(report)
    torch._dynamo.reset()
    assert_close(torch.compile(f, backend="flag_gems")(x), f(x.double()), torch.float32, "[op=wrapper fallback]")
    torch._dynamo.reset()
    with pytest.raises(Exception, match="does not handle"):
        torch.compile(f, backend="flag_gems", options={"strict": True})(x)


def test_option_turns_the_wrapper_off(device, tmp_path):
    x = rand(6, device=device)
    f = lambda a: (a * 3).exp() - 1  # noqa: E731
    out = torch.compile(f, backend="flag_gems", options={"wrapper": False, "dump_dir": str(tmp_path)})(x)
    assert not list(tmp_path.glob("graph_*_wrapper.py"))
    assert_close(out, f(x.double()), torch.float32, "[op=no wrapper]")


@pytest.mark.gpu
def test_wrapper_under_cuda_graphs():
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.SiLU()).cuda()
    m64 = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.SiLU()).cuda().double()
    m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    f = torch.compile(lambda x: (m(x) * 2).sigmoid() + x, backend="flag_gems", mode="reduce-overhead")
    outs = []
    with torch.no_grad():
        for _ in range(4):  # warm-up, record, replays with fresh inputs; earlier outputs stay valid
            x = rand(8, 64, device="cuda")
            outs.append((f(x), x))
    for out, x in outs:
        ref = (m64(x.double()) * 2).sigmoid() + x.double()
        assert_close(out, ref, torch.float32, "[op=wrapper+cudagraphs]", grad=True)


def test_flag_gems_ops_call_the_cpp_runtime_when_it_serves_the_device(device, tmp_path):
    from flag_gems import c_runtime

    if not c_runtime.available:
        pytest.skip(f"C++ runtime not built: {c_runtime.reason}")
    key = "CUDA" if device == "cuda" else "CPU"
    installed = key in c_runtime.installed_keys()
    c_runtime.install(key)
    try:
        def f(x, r, w):
            h = x + r
            hf = h.float()
            return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype) * w, h

        x, r = rand(4, 64, dtype=torch.bfloat16, device=device), rand(4, 64, dtype=torch.bfloat16, device=device)
        w = rand(64, dtype=torch.bfloat16, device=device)
        with torch.no_grad():
            y, h = torch.compile(f, backend="flag_gems", options={"strict": True, "dump_dir": str(tmp_path)})(x, r, w)
        (path,) = tmp_path.glob("graph_*_wrapper.py")
        assert "_cpp_add_rms_norm(" in path.read_text()  # the C++ wrapper, not the Python function
        h64 = x.double() + r.double()
        assert_close(h, h64, torch.bfloat16, tag("cpp add_rms_norm h", h.shape, torch.bfloat16))
        ref = (h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + 1e-6)) * w.double()
        assert_close(y, ref, torch.bfloat16, tag("cpp add_rms_norm y", y.shape, torch.bfloat16), grad=True)
    finally:
        if not installed:
            c_runtime.uninstall(key)
