"""``passes.noop_clones``: clones of intermediates already in their layout are dropped, and
only those (the graph computes the same values either way)."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from flag_gems.passes.noop_clones import drop_noop_clones
from accuracy import rand

aten = torch.ops.aten


def _clones(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is aten.clone.default)


def _check(f, args, dropped):
    gm = make_fx(f, tracing_mode="fake")(*args)
    before = _clones(gm)
    assert drop_noop_clones(gm) == dropped
    assert _clones(gm) == before - dropped
    want = f(*[a.clone() for a in args])
    got = gm(*args)
    for g, w in zip(got if isinstance(got, (list, tuple)) else [got], want if isinstance(want, (list, tuple)) else [want]):
        assert g.shape == w.shape and g.stride() == w.stride()
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    return gm


def test_transposed_attention_output_clone_is_dropped(device):
    # The HF pattern: an op writes [B, S, H, D] memory, the graph transposes to [B, H, S, D] and
    # back, then calls .contiguous() (a clone in the traced graph: make_fx keeps it as the
    # transposed view is not contiguous... until it is transposed back).
    def f(x, w):
        y = (x @ w).view(2, 3, 4, 5)  # [B, S, H, D]
        a = y.transpose(1, 2)  # [B, H, S, D] view
        c = torch.clone(a.transpose(1, 2), memory_format=torch.contiguous_format)  # same layout as y
        return c.view(2, 3, 20) * 2

    _check(f, (rand(6, 7, device=device), rand(7, 20, device=device)), dropped=1)


def test_kept_when_the_layout_changes(device):
    def f(x):
        y = x * 3
        return y.t().contiguous() + 1  # a real transposing copy

    _check(f, (rand(4, 6, device=device),), dropped=0)


def test_kept_for_graph_inputs_and_outputs(device):
    def from_input(x):
        return x.clone() + 1  # the caller owns x

    def returned(x):
        y = x * 2
        return y.clone(), y + 1  # returning it would alias y

    def returned_as_view(x):
        c = (x * 2).clone()
        return c.view(5, 1), c + 1  # a view of the clone is an output

    def unsafe_view_of_input(x):
        return torch.ops.aten._unsafe_view(x, [5]).clone() + 1  # _unsafe_view shares the input's storage

    _check(from_input, (rand(5, device=device),), dropped=0)
    _check(returned, (rand(5, device=device),), dropped=0)
    _check(returned_as_view, (rand(5, device=device),), dropped=0)
    _check(unsafe_view_of_input, (rand(5, 1, device=device),), dropped=0)


def test_kept_when_the_graph_mutates(device):
    def f(x):
        y = x * 2
        c = y.clone()
        y.add_(1)  # the clone's copy is what keeps c apart from this
        return c + y

    gm = make_fx(f, tracing_mode="fake", pre_dispatch=False)(rand(5, device=device))
    if not any(n.target is aten.add_.Tensor for n in gm.graph.nodes):
        pytest.skip("this make_fx functionalized the in-place add")
    _check(f, (rand(5, device=device),), dropped=0)


def test_compiled_graph_has_no_copy_and_same_values(device, tmp_path):
    torch._dynamo.reset()

    def f(x, w):
        y = (x @ w).view(2, 3, 4, 5).transpose(1, 2)
        z = y.sigmoid().transpose(1, 2).clone()  # sigmoid keeps y's [B, S, H, D] memory order
        return z.view(6, 20) @ w.t()

    x, w = rand(6, 7, device=device), rand(7, 20, device=device)
    ref = f(x.double(), w.double())
    out = torch.compile(f, backend="flag_gems", options={"dump_dir": str(tmp_path), "strict": True})(x, w)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    graphs = sorted(tmp_path.glob("graph_*_inference.py"))
    assert graphs and "aten.clone" not in graphs[0].read_text()
    assert "aten.clone" in sorted(tmp_path.glob("graph_*_aten.py"))[0].read_text()  # it was there before
