"""vLLM's mode 3 reproduced without vLLM (tests/vllm_harness.py): graph split at attention, per-size
compilation with fake inputs, a symbolic batch size, ``flag_gems.vllm_pass`` in the post-grad
passes; on the GPU also warm-up, piecewise CUDA-graph capture into a shared pool, and replays
with new data under ``torch.cuda.set_sync_debug_mode("error")``, for a Llama-style and a
DeepSeek-style (YaRN rope on interleaved pairs) decoder. Logits against an fp32 eager
reference. On the CPU the pieces run as post-grad graphs (no code generation, no CUDA graphs)."""

import threading

import pytest
import torch

import vllm_harness as H
from accuracy import DEVICE
from flag_gems.vllm.fusion_pass import GemsVllmPass

SHAPES = {"llama": H.LLAMA_TINY, "deepseek": H.DEEPSEEK_TINY}
EXPECTED_OPS = {
    "llama": {"flag_gems.rms_norm.default", "flag_gems.add_rms_norm.default", "flag_gems.silu_and_mul_fused.default",
              "flag_gems.rotary_embedding_cache.default"},
    "deepseek": {"flag_gems.rms_norm.default", "flag_gems.add_rms_norm.default",
                 "flag_gems.silu_and_mul_fused.default", "flag_gems.rotary_embedding_hf.default"},
}


def _step(runner, ref, ref_ctx, batch, what):
    ids, pos, seq = batch
    prefill = bool((seq == 0).all()) and bool((pos == torch.arange(len(pos), device=pos.device)).all())
    t = runner.set_batch(ids, pos, seq, prefill)
    out = runner.run(t).float()
    expected = H.reference_logits(runner.model, ref, ref_ctx, ids, pos, seq, prefill)
    cos = H.cosine(out, expected)
    assert cos >= H.LOGITS_COSINE, f"[{what} tokens={t}] logits cosine {cos:.6f} < {H.LOGITS_COSINE}"
    assert not torch.isnan(out).any(), what
    return out


@pytest.mark.parametrize("post_pass", ["vllm_pass", "inductor_alone"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_split_per_size_compile_and_logits_without_cuda_graphs(name, post_pass, fresh_dynamo):
    """Post-grad graphs run as they are (no code generation): on the CPU through Triton's interpreter."""
    shape = SHAPES[name]
    gen = torch.Generator().manual_seed(1)
    model = H.Decoder(shape, dtype=torch.bfloat16, device=DEVICE)
    ref = H.fp32_copy(model)
    gems = GemsVllmPass(strict=True) if post_pass == "vllm_pass" else None
    runner = H.GraphRunner(model, max_tokens=16, post_pass=gems, compile_sizes=(4,), codegen=False, n_seqs=8,
                           max_len=32)
    ref_ctx = ref.new_context(16, 8, 32)
    what = f"{name} {post_pass}"
    # Prefill of one sequence (the symbolic-size compile), then decode steps: 4 tokens (compiled
    # for that size) and 3 (the symbolic one again).
    _step(runner, ref, ref_ctx, H.prefill_batch(shape, 8, DEVICE, gen), what + " prefill")
    H.fill_caches(runner.ctx, ref_ctx, gen)
    _step(runner, ref, ref_ctx, H.decode_batch(shape, 4, 32, 8, DEVICE, gen), what + " decode")
    _step(runner, ref, ref_ctx, H.decode_batch(shape, 3, 32, 8, DEVICE, gen), what + " decode")

    # One Dynamo graph, split at each layer's attention: layers + 1 compiled pieces.
    assert len(runner.pieces) == shape.layers + 1
    assert all(set(p.compiled) == {None, 4} for _, p in runner.pieces)
    symbolic = [g for g in runner.compiler.graphs if "Sym(" in g.print_readable(False)]
    assert symbolic, "the general compile keeps the batch size symbolic"
    ops = runner.fused_ops()
    if gems is None:
        assert ops == set(), ops
    else:
        assert EXPECTED_OPS[name] <= ops, ops
        fused = gems.report().fused  # per pattern family, over the pieces and sizes
        # one launch for q and k per layer, in each of the two compiles (symbolic size, size 4)
        assert fused["rotary_embedding"] == 2 * shape.layers, fused


# ------------------------------------------------------------------ GPU: the full mode-3 mimic


@pytest.mark.gpu
@pytest.mark.parametrize("inline", [False, True], ids=["calls", "inlined_kernels"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_piecewise_cuda_graphs_warmup_capture_and_replay(name, inline, fresh_dynamo):
    shape = SHAPES[name]
    gen = torch.Generator().manual_seed(2)
    model = H.Decoder(shape, dtype=torch.bfloat16, device="cuda")
    ref = H.fp32_copy(model)
    gems = GemsVllmPass(strict=True, inline_kernels=inline)
    sizes = (1, 4, 8)
    runner = H.GraphRunner(model, max_tokens=64, post_pass=gems, capture_sizes=sizes, codegen=True, n_seqs=16,
                           max_len=64)
    ref_ctx = ref.new_context(64, 16, 64)
    # vLLM's profile run at the largest size compiles (symbolic size + every capture size).
    runner.set_batch(*H.prefill_batch(shape, 64, "cuda", gen), prefill=True)
    runner.run(64)
    runner.capture()
    assert all(set(p.graphs) == set(sizes) for _, p in runner.pieces)
    for size in sizes:
        for replay in range(2):  # new data each time: persistent buffers, same graphs
            H.fill_caches(runner.ctx, ref_ctx, gen)
            ids, pos, seq = H.decode_batch(shape, size, 64, 16, "cuda", gen)
            runner.set_batch(ids, pos, seq)
            out = runner.replay(size).float()
            expected = H.reference_logits(model, ref, ref_ctx, ids, pos, seq, False)
            cos = H.cosine(out, expected)
            assert cos >= H.LOGITS_COSINE, f"[{name} decode {size} replay {replay}] cosine {cos:.6f}"
    fused = {k.split("[")[0] for r in gems.report().graphs for k in r.fused}
    assert {"rms_norm", "add_rms_norm", "act_and_mul", "rotary_embedding"} <= fused, fused
    inlined = sum(n for r in gems.report().graphs for k, n in r.lowered.items() if "inductor triton kernels" in k)
    assert (inlined > 0) == inline, gems.report()


# ------------------------------------------------------------------ the capture guard


def test_a_first_kernel_call_inside_a_capture_fails_loudly(monkeypatch):
    import triton

    from flag_gems.kernels import _launch

    def _kernel(x_ptr, n):
        pass

    class _JIT:  # stands in for a JITFunction: records what Triton's path would launch
        params = triton.runtime.jit.JITFunction(_kernel).params
        calls = []

        def run(self, *args, grid, warmup, **kwargs):
            self.calls.append(args)

    kernel = _launch.FastKernel(_JIT())
    kernel._device, kernel._stream = (lambda: 0), (lambda device: 0)
    monkeypatch.setattr(_launch, "_ENABLED", True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    x = torch.empty(4)
    with pytest.raises(RuntimeError, match="first time .* while a CUDA graph is being captured"):
        kernel[(1,)](x, 3)
    assert _JIT.calls == []  # nothing was compiled or launched
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    kernel[(1,)](x, 3)  # outside a capture the same call goes through
    assert len(_JIT.calls) == 1


class _CachingJIT:
    """Stands in for a JITFunction in the C++ runtime's Python hook: asks Triton's compile hook
    (``knobs.runtime.jit_cache_hook``) before compiling a specialization it has not cached, as
    Triton's ``run`` does, and records what it compiled and launched."""

    __qualname__ = "_CachingJIT"

    def __init__(self):
        self.cached, self.compiled, self.launched, self.other_thread = set(), [], [], []

    def run(self, *args, grid, warmup, **kwargs):
        import triton

        key = tuple(type(a).__name__ for a in args)
        if key not in self.cached:
            hook = triton.knobs.runtime.jit_cache_hook
            # Another thread compiling meanwhile gets Triton's own answer (no hook: compile).
            other = threading.Thread(target=lambda: self.other_thread.append(hook and hook(key=("other",))))
            other.start()
            other.join()
            if hook is not None and hook(key=key):
                return None  # the hook said skip: nothing compiled, nothing launched
            self.compiled.append(key)
            self.cached.add(key)
        self.launched.append(args)
        return "kernel"


@pytest.mark.parametrize("capturing", [False, True])
def test_the_cpp_hook_compiles_nothing_inside_a_capture(monkeypatch, capturing):
    import triton

    from flag_gems import c_runtime

    if not hasattr(triton.knobs.runtime, "jit_cache_hook"):
        pytest.skip("this Triton has no compile hook")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    before = triton.knobs.runtime.jit_cache_hook
    fn = _CachingJIT()
    x = torch.empty(4)
    if capturing:
        with pytest.raises(RuntimeError, match="first time .* while a CUDA graph is being captured"):
            c_runtime._run_outside_capture(fn, [x, 3], (1, 1, 1), {"num_warps": 4})
        assert fn.compiled == [] and fn.launched == []  # refused before compiling anything
        assert fn.other_thread == [None]  # only the capturing thread's compile was refused
        fn.cached.add(("Tensor", "int"))  # compiled before the capture (the warm-up)
    assert c_runtime._run_outside_capture(fn, [x, 3], (1, 1, 1), {"num_warps": 4}) == "kernel"
    assert len(fn.launched) == 1 and fn.compiled == ([] if capturing else [("Tensor", "int")])
    assert triton.knobs.runtime.jit_cache_hook is before  # the hook is Triton's again


@pytest.mark.gpu
def test_a_real_kernel_compiled_inside_a_capture_fails_loudly():
    import flag_gems

    x = torch.randn(3, 2 * 1237, device="cuda", dtype=torch.float16)  # a shape nothing ran before
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="while a CUDA graph is being captured"):
        with torch.cuda.graph(graph):
            flag_gems.silu_and_mul_fused(x)
