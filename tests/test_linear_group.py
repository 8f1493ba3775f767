"""``flag_gems::linear_group`` and the ``fuse_linear`` option (``passes/linear_group.py``)."""

import pytest
import torch
import torch.nn.functional as F

import flag_gems
from flag_gems.lowerings.linear_group import linear_group, stacked_rows
from flag_gems.passes.linear_group import stack_in_place, stack_problem

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


def _reference(x, weights, biases):
    outs = [F.linear(x.double(), w.double(), b.double() if biases else None)
            for w, b in zip(weights, biases or [None] * len(weights))]
    return torch.cat(outs, dim=-1)


def _weights(sizes, k, dtype, stacked):
    if stacked:
        buf = torch.randn(sum(sizes), k, dtype=dtype)
        return list(buf.split(sizes)), buf
    return [torch.randn(n, k, dtype=dtype) for n in sizes], None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stacked", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_group_matches_separate_linears(dtype, stacked, bias):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, dtype=dtype)
    sizes = [8, 4, 4]
    weights, _ = _weights(sizes, 16, dtype, stacked)
    biases = [torch.randn(n, dtype=dtype) for n in sizes] if bias else []
    assert (stacked_rows(weights) is not None) == stacked
    out = linear_group(x, weights, biases)
    ref = _reference(x, weights, biases)
    assert out.shape == (2, 3, sum(sizes)) and out.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)


def test_stacked_rows_is_a_view_exactly_when_the_parts_are_back_to_back():
    buf = torch.randn(10, 4)
    a, b, c = buf[0:3], buf[3:7], buf[7:10]
    view = stacked_rows([a, b, c])
    assert view is not None and view.data_ptr() == buf.data_ptr() and torch.equal(view, buf)
    assert stacked_rows([a, c]) is None  # a gap
    assert stacked_rows([b, a]) is None  # out of order
    assert stacked_rows([a, torch.randn(4, 4)]) is None  # another storage
    assert stacked_rows([buf[:, :2], buf[:, 2:]]) is None  # not contiguous
    assert stacked_rows([buf[0:3], buf[3:7].double()]) is None  # another dtype


def _stacked_params(rows):
    """An input of ``rows`` rows and three parameters on one buffer (a stacked q/k/v group)."""
    torch.manual_seed(0)
    weights, _ = _weights([8, 4, 4], 16, torch.float32, stacked=True)
    return torch.randn(rows, 16), [torch.nn.Parameter(w, requires_grad=False) for w in weights]


def test_linear_group_sees_a_weight_reassigned_after_its_stacked_view_was_cached():
    # The stacked view is cached by the group's first weight; `param.data = ...` on any
    # weight must send the next call to the per-weight GEMMs with the new values.
    x, params = _stacked_params(3)
    with torch.no_grad():
        torch.testing.assert_close(linear_group(x, params, []), _reference(x, params, []).float())
        params[1].data = torch.randn(4, 16)
        out = linear_group(x, params, [])
        torch.testing.assert_close(out, _reference(x, params, []).float())
        params[0].data = torch.randn(6, 16)  # another shape, at another address
        out = linear_group(x, params, [])
        assert out.shape == (3, 14)
        torch.testing.assert_close(out, _reference(x, params, []).float())
        with pytest.raises(ValueError, match=r"weights\[0\]: expected \[N, 16\]"):
            linear_group(x, [torch.randn(4, 15), *params[1:]], [])


def test_linear_group_cache_does_not_keep_the_weights_alive():
    import gc
    import weakref

    from flag_gems.lowerings import linear_group as lg

    x, params = _stacked_params(2)
    with torch.no_grad():
        out = linear_group(x, params, [])
    torch.testing.assert_close(out, _reference(x, params, []).float())
    assert id(params[0]) in lg._STACKED
    alive = weakref.ref(params[0])
    key = id(params[0])
    del params
    gc.collect()
    assert alive() is None and key not in lg._STACKED


def test_linear_group_on_fake_tensors_reads_no_data_pointers():
    # Precompile records a graph's launches on fake tensors: the op gives the shape, silently
    # (a FakeTensor's data_ptr() warns), and still checks its arguments.
    import warnings

    from torch._subclasses.fake_tensor import FakeTensorMode
    from flag_gems.passes.direct_calls import direct_impl

    impl = direct_impl(torch.ops.flag_gems.linear_group.default)
    buf = torch.randn(16, 8)
    with FakeTensorMode() as mode, warnings.catch_warnings():
        warnings.simplefilter("error")
        x, fbuf = mode.from_tensor(torch.randn(3, 8)), mode.from_tensor(buf)
        out = impl(x, list(fbuf.split([8, 4, 4])), [])
        assert out.shape == (3, 16)
        with pytest.raises(ValueError, match=r"weights\[1\]: expected \[N, 8\]"):
            impl(x, [fbuf[:8], mode.from_tensor(torch.randn(4, 7))], [])


def test_linear_group_checks_its_arguments():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"weights\[1\]: expected \[N, 8\]"):
        linear_group(x, [torch.randn(4, 8), torch.randn(4, 7)], [])
    with pytest.raises(TypeError, match=r"weights\[0\]: expected x's dtype"):
        linear_group(x, [torch.randn(4, 8, dtype=torch.float64)], [])
    with pytest.raises(ValueError, match="biases: expected none or one per weight"):
        linear_group(x, [torch.randn(4, 8), torch.randn(2, 8)], [torch.randn(4)])
    with pytest.raises(ValueError, match="weights: expected at least one"):
        linear_group(x, [], [])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("stacked", [True, False])
def test_linear_group_backward_matches_separate_linears(bias, stacked):
    torch.manual_seed(0)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    if stacked:  # parameters on one buffer: the op's one-GEMM path (and its cached view)
        buf = torch.randn(6, 8, dtype=torch.float64)
        ws = [torch.nn.Parameter(w) for w in buf.split([4, 2])]
    else:
        ws = [torch.randn(n, 8, dtype=torch.float64, requires_grad=True) for n in (4, 2)]
    bs = [torch.randn(n, dtype=torch.float64, requires_grad=True) for n in (4, 2)] if bias else []
    g = torch.randn(3, 6, dtype=torch.float64)
    got = torch.autograd.grad(linear_group(x, ws, bs), [x, *ws, *bs], g)
    want = torch.autograd.grad(torch.cat([F.linear(x, w, b) for w, b in zip(ws, bs or [None, None])], -1),
                               [x, *ws, *bs], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_stack_in_place_keeps_objects_values_and_shapes():
    params = [torch.nn.Parameter(torch.randn(n, 6)) for n in (4, 2, 2)]
    before = [p.detach().clone() for p in params]
    ids = [id(p) for p in params]
    with torch.inference_mode():  # the buffer must still be a normal tensor
        assert stack_in_place(params) is None
    assert [id(p) for p in params] == ids
    for p, b in zip(params, before):
        assert isinstance(p, torch.nn.Parameter) and p.shape == b.shape and p.is_contiguous() and not p.is_inference()
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)
    view = stacked_rows(params)
    assert view is not None and view.shape == (8, 6)
    assert stack_in_place(params) is None and stacked_rows(params).data_ptr() == view.data_ptr()  # idempotent


def test_stack_problem_names_what_cannot_be_moved():
    shared = torch.randn(8, 4)
    assert "shares its storage" in stack_problem([shared[:4].clone()[::1], shared[4:6]])
    t = torch.randn(4, 4)
    assert "the same tensor twice" in stack_problem([t, t])
    assert "trailing shapes differ" in stack_problem([torch.randn(4, 4), torch.randn(4, 5)])


# --------------------------------------------------------------------------- the backend option


def _tiny(arch: str):
    transformers = pytest.importorskip("transformers")
    cfg_cls, model_cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}[arch]
    cfg = getattr(transformers, cfg_cls)(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(cfg).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v with biases
def test_fuse_linear_compiles_one_gemm_per_group_and_matches_eager(arch):
    from flag_gems.backend import _collect
    from flag_gems.report import CompileReport

    torch._dynamo.reset()
    model = _tiny(arch)
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        fn = torch.compile(model, backend="flag_gems", options={"fuse_linear": True, "strict": True})
        with _collect(CompileReport()) as report:
            out = fn(ids, use_cache=False).logits
        again = fn(ids, use_cache=False).logits
    (graph,) = report.graphs
    assert graph.fused["linear_group[3]"] == 2 and graph.fused["linear_group[2]"] == 2, graph.fused
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, ref, atol=1e-5, rtol=1e-5)
    for layer in model.model.layers:  # the first call stacked each group's weights
        at, mlp = layer.self_attn, layer.mlp
        assert stacked_rows([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight]) is not None
        assert stacked_rows([mlp.gate_proj.weight, mlp.up_proj.weight]) is not None
        if arch == "qwen2":
            assert stacked_rows([at.q_proj.bias, at.k_proj.bias, at.v_proj.bias]) is not None
    # A weight re-assigned after compiling: the op runs one GEMM per weight, still right.
    at = model.model.layers[0].self_attn
    with torch.no_grad():
        at.k_proj.weight.data = torch.randn_like(at.k_proj.weight)
        ref = model(ids, use_cache=False).logits
        out = fn(ids, use_cache=False).logits
    assert stacked_rows([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight]) is None
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_fuse_linear_with_inductor_for_the_rest():
    """options inductor: Inductor compiles the rewritten graph (linear_group a call it makes); the
    weights are stacked at its first call too."""
    torch._dynamo.reset()
    model = _tiny("llama")
    ids = torch.randint(0, 128, (1, 4))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        out = torch.compile(model, backend="flag_gems", options={"fuse_linear": True, "inductor": True})(ids, use_cache=False)
    torch.testing.assert_close(out.logits, ref, atol=1e-4, rtol=1e-4)
    at = model.model.layers[0].self_attn
    assert stacked_rows([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight]) is not None


def test_fuse_linear_is_off_by_default_and_under_autograd():
    from flag_gems.backend import _collect
    from flag_gems.report import CompileReport

    torch._dynamo.reset()
    model = _tiny("llama")
    ids = torch.randint(0, 128, (1, 4))
    at = model.model.layers[0].self_attn
    ptrs = [at.q_proj.weight.data_ptr(), at.k_proj.weight.data_ptr()]
    with torch.no_grad(), _collect(CompileReport()) as report:
        torch.compile(model, backend="flag_gems", options={"strict": True})(ids, use_cache=False)
    assert not any(k.startswith("linear_group") for g in report.graphs for k in g.fused)
    torch._dynamo.reset()
    with _collect(CompileReport()) as report:  # autograd on: a training graph keeps its linears
        out = torch.compile(model, backend="flag_gems", options={"fuse_linear": True, "strict": True})(ids, use_cache=False)
    out.logits.sum().backward()
    assert not any(k.startswith("linear_group") for g in report.graphs for k in g.fused)
    assert any("autograd is on" in n for g in report.graphs for n in g.notes)
    assert [at.q_proj.weight.data_ptr(), at.k_proj.weight.data_ptr()] == ptrs


def test_fuse_linear_leaves_prefill_sized_inputs_separate(monkeypatch):
    from flag_gems.backend import _collect
    from flag_gems.passes import linear_group as pass_module
    from flag_gems.report import CompileReport

    monkeypatch.setattr(pass_module, "MAX_ROWS", 8)
    torch._dynamo.reset()
    model = _tiny("llama")
    ids = torch.randint(0, 128, (2, 5))  # 10 rows > 8
    with torch.no_grad(), _collect(CompileReport()) as report:
        out = torch.compile(model, backend="flag_gems", options={"fuse_linear": True, "strict": True})(ids, use_cache=False)
        ref = model(ids, use_cache=False)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    assert not any(k.startswith("linear_group") for g in report.graphs for k in g.fused)
    assert any("of 10 rows left separate" in n for g in report.graphs for n in g.notes)


def test_fuse_linear_leaves_weights_passed_by_the_caller_alone():
    from flag_gems.backend import _collect
    from flag_gems.report import CompileReport

    def qkv(x, wq, wk):
        return F.linear(x, wq) * 2, F.linear(x, wk) + 1

    torch._dynamo.reset()
    x, wq, wk = torch.randn(3, 8), torch.randn(4, 8), torch.randn(2, 8)
    ptrs = (wq.data_ptr(), wk.data_ptr())
    with torch.no_grad(), _collect(CompileReport()) as report:
        got = torch.compile(qkv, backend="flag_gems", options={"fuse_linear": True, "strict": True})(x, wq, wk)
    for a, b in zip(got, qkv(x, wq, wk)):
        torch.testing.assert_close(a, b)
    assert (wq.data_ptr(), wk.data_ptr()) == ptrs
    assert not any(k.startswith("linear_group") for g in report.graphs for k in g.fused)
    assert any("not the model's parameters" in n for g in report.graphs for n in g.notes)


def test_fuse_linear_option_must_be_a_bool():
    from flag_gems.options import CompileOptions

    assert CompileOptions.from_user(options={"fuse_linear": True}).fuse_linear is True
    with pytest.raises(TypeError, match="'fuse_linear' must be a bool"):
        CompileOptions.from_user(options={"fuse_linear": "yes"})
