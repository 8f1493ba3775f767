"""flag_gems' vLLM entry points where vLLM is not installed (the main test environment)."""

import subprocess
import sys

import pytest
import torch

import flag_gems


def test_import_flag_gems_imports_neither_vllm_nor_inductor():
    code = ("import sys, flag_gems, flag_gems.vllm; "
            "print(sorted(m for m in ('vllm', 'torch._inductor') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_patching_without_vllm_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` sees when it is not installed
    with pytest.raises(ImportError, match="apply_gems_patches_to_vllm: vLLM is not installed"):
        flag_gems.apply_gems_patches_to_vllm(verbose=True)


def test_the_pass_is_an_inductor_custom_pass_and_resolvable_by_name():
    from torch._inductor.custom_graph_pass import CustomGraphPass

    p = flag_gems.vllm_pass
    assert isinstance(p, CustomGraphPass) and len(p.uuid()) == 64
    assert __import__("flag_gems").__dict__["vllm_pass"] is p  # how vLLM resolves "flag_gems.vllm_pass"


def test_the_pass_fuses_under_plain_torch_compile(fresh_dynamo):
    """Without vLLM, Inductor users install it as a post-grad pass; checked here through the
    harness's post-grad pipeline (no CPU code generation): a gated MLP becomes one op."""
    import vllm_harness as H
    from flag_gems.vllm.fusion_pass import GemsVllmPass

    from accuracy import DEVICE, assert_close, rand, tag

    gems = GemsVllmPass(strict=True)
    compile_piece = H._post_grad_only(gems)
    x = rand(5, 64, dtype=torch.bfloat16, device=DEVICE)
    gm = torch.fx.symbolic_trace(lambda x: (H.silu_and_mul(x),))
    (out,) = compile_piece(gm, [x])(x)
    assert gems.report().fused["act_and_mul"] == 1, gems.report()
    ref = torch.nn.functional.silu(x[:, :32].double()) * x[:, 32:].double()
    assert_close(out, ref, torch.bfloat16, tag("vllm_pass silu_and_mul", x.shape, torch.bfloat16))


def test_inline_kernels_option(fresh_dynamo, monkeypatch):
    """``inline_kernels``: off by default, ``GEMS_VLLM_INLINE=1`` turns it on, it travels with
    the pickled config and changes ``uuid()``. Under the interpreter the fused op stays a call
    (a note says why) and computes the same; on a GPU the harness tests check Inductor's code."""
    import pickle

    import vllm_harness as H
    from flag_gems.kernels import _launch
    from flag_gems.vllm.fusion_pass import GemsVllmPass

    from accuracy import DEVICE, assert_close, rand, tag

    monkeypatch.delenv("GEMS_VLLM_INLINE", raising=False)
    assert GemsVllmPass().inline_kernels is False
    monkeypatch.setenv("GEMS_VLLM_INLINE", "1")
    on = GemsVllmPass(strict=True)
    assert on.inline_kernels is True and GemsVllmPass(inline_kernels=False).inline_kernels is False
    assert pickle.loads(pickle.dumps(on)).inline_kernels is True
    assert on.uuid() != GemsVllmPass(inline_kernels=False).uuid()

    compile_piece = H._post_grad_only(on)
    x = rand(5, 64, dtype=torch.bfloat16, device=DEVICE)
    gm = torch.fx.symbolic_trace(lambda x: (H.silu_and_mul(x),))
    (out,) = compile_piece(gm, [x])(x)
    report = on.report()
    assert report.fused["act_and_mul"] == 1, report
    if _launch.interpreter_mode():
        assert any("interpreter" in n for g in report.graphs for n in g.notes), report
    ref = torch.nn.functional.silu(x[:, :32].double()) * x[:, 32:].double()
    assert_close(out, ref, torch.bfloat16, tag("vllm_pass[inline] silu_and_mul", x.shape, torch.bfloat16))
