"""CUDA-graph replay of compiled inference graphs (``mode="reduce-overhead"``). GPU only."""

import pytest
import torch

import flag_gems  # noqa: F401
import flag_gems.cudagraphs as cg
from flag_gems.cudagraphs import CUDAGraphRunner
from accuracy import assert_close, rand, ref64, tag
from test_backend import ResidualBlock


pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("fresh_dynamo")]


def test_replay_with_changing_inputs_and_held_outputs():
    m = ResidualBlock(256, "llama").cuda().to(torch.bfloat16)
    # torch.compile takes mode or options, not both: this is how users ask for CUDA graphs.
    f = torch.compile(m, backend="flag_gems", mode="reduce-overhead")
    held = []
    with torch.no_grad():
        for i in range(5):  # warm-up, record, then replays with new values each time
            x = rand(8, 1, 256, dtype=torch.bfloat16, device="cuda")
            r = rand(8, 1, 256, dtype=torch.bfloat16, device="cuda")
            out, res = f(x, r)
            held.append((out, x, r))
    # Earlier outputs were not overwritten by later replays: each matches the same compiled model
    # run without CUDA graphs (the same kernels, launched one by one) on its inputs.
    plain = torch.compile(m, backend="flag_gems", options={"strict": True})
    with torch.no_grad():
        for out, x, r in held:
            ref_out, _ = plain(x, r)
            assert_close(out, ref64(ref_out), torch.bfloat16, tag("cudagraphs.out", out.shape, torch.bfloat16))


def test_new_shape_records_a_new_graph_and_mutation_reaches_caller(monkeypatch):
    recorded, replays = [], []
    real_record, real_replay = CUDAGraphRunner._record, torch.cuda.CUDAGraph.replay

    def record(self, args):
        rec = real_record(self, args)
        recorded.append(tuple(a.shape for a in args if isinstance(a, torch.Tensor)))  # after the capture returned
        return rec

    def replay(self):
        real_replay(self)
        replays.append(1)

    monkeypatch.setattr(CUDAGraphRunner, "_record", record)
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", replay)

    def step(x, cache):
        cache.mul_(0.5).add_(x)
        return cache.sum(-1)

    f = torch.compile(step, backend="flag_gems", options={"strict": True, "cudagraphs": True})
    calls = (4, 4, 4, 6, 6, 6)
    for n in calls:
        x, cache = rand(n, 32, device="cuda"), rand(n, 32, device="cuda")
        expect_cache = cache * 0.5 + x
        with torch.no_grad():
            s = f(x, cache)
        torch.testing.assert_close(cache, expect_cache)
        torch.testing.assert_close(s, expect_cache.sum(-1))
    # One graph per shape, recorded after WARMUP_CALLS eager calls and replayed by every call after.
    assert len(recorded) == 2 and {shapes[0] for shapes in recorded} == {(4, 32), (6, 32)}, recorded
    assert len(replays) == len(calls) - 2 * cg.WARMUP_CALLS, replays


def test_runner_runs_eagerly_when_grad_is_needed():
    calls = []

    def fn(args):
        calls.append(1)
        return [args[0] * 2]

    runner = CUDAGraphRunner(fn, static_indices=(), mutated_indices=())
    x = rand(4, device="cuda", requires_grad=True)
    for _ in range(3):
        (y,) = runner([x])
    assert len(calls) == 3 and not runner.recorded


def test_parameters_are_read_in_place_not_copied():
    # AOT autograd may not list lifted parameters as static inputs; the runner still must
    # not copy them before each replay (a model's weights would be copied every call).
    calls = []

    def fn(args):
        calls.append(1)
        return [args[0] @ args[1]]

    w = torch.nn.Parameter(rand(8, 8, device="cuda"))
    runner = CUDAGraphRunner(fn, static_indices=(), mutated_indices=())
    with torch.no_grad():
        for _ in range(4):
            x = rand(4, 8, device="cuda")
            (y,) = runner([x, w])
            torch.testing.assert_close(y, x @ w.detach())
        assert len(runner.recorded) == 1 and runner.static_all == {1}
        (rec,) = runner.recorded.values()
        assert rec.static_inputs[1] is w  # the parameter itself, not a copy
        w.mul_(2)  # updated in place (an optimizer step): the replay sees the new values
        x = rand(4, 8, device="cuda")
        (y,) = runner([x, w])
    torch.testing.assert_close(y, x @ w.detach())
    assert len(calls) == 2  # one warm-up call and one capture; the rest were replays
