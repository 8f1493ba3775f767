"""Modes 1/2 (``compilation_config={"mode": 2, "backend": "flag_gems"}``) through vLLM's own
``VllmConfig``, compile decorator and wrapper: the backend resolves, compiles once for every
batch size (dim 0 dynamic), and vLLM's AOT compile (on by default with torch >= 2.10) saves an
artifact that a fresh process loads and runs."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vllm_helpers import import_vllm_or_skip

vllm = import_vllm_or_skip()

import flag_gems  # noqa: E402
from accuracy import TOLERANCES, tag  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _config(mode, backend="flag_gems"):
    from vllm.config import CompilationConfig, VllmConfig

    # custom_ops none: the layers' native math, which the backend fuses (on a GPU build custom ops
    # call vLLM's _C kernels, which the patches reroute instead).
    return VllmConfig(compilation_config=CompilationConfig(mode=mode, backend=backend, custom_ops=["none"]))


@pytest.mark.parametrize("mode", [1, 2])
def test_modes_1_and_2_resolve_the_backend_by_name_and_by_qualname(mode, c_ops):
    cfg = _config(mode)
    assert cfg.compilation_config.mode == mode
    backend = cfg.compilation_config.init_backend(cfg)
    assert backend == "flag_gems" and backend in torch._dynamo.list_backends(exclude_tags=())
    cfg = _config(mode, "flag_gems.flag_gems_backend")
    assert cfg.compilation_config.init_backend(cfg) is flag_gems.flag_gems_backend


def _models(cfg, decorated=True):
    import vllm_models as M
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(cfg):
        torch.manual_seed(0)
        model = (M.CompiledTinyBlock if decorated else M.TinyBlock)(vllm_config=cfg, dtype=torch.float32)
        ref = M.TinyBlock(vllm_config=cfg, dtype=torch.float64)
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    return M, model, ref


def _check(model, ref, M, tokens, what):
    args = M.inputs(tokens, torch.float32, seed=tokens)
    # A vLLM worker sets the IR ops' torch wrapping from the config (off for modes 1/2: Dynamo
    # traces the selected implementation, the native math here, which the backend fuses).
    wrap = model.vllm_config.compilation_config.ir_enable_torch_wrap if hasattr(model, "vllm_config") else False
    with torch.inference_mode(), vllm.ir.enable_torch_wrap(bool(wrap)):
        out = model(*[a.clone() for a in args])
        expected = ref(*[a.double() if a.is_floating_point() else a for a in args])
    atol, rtol = TOLERANCES[torch.float32]
    # Three small GEMMs (K <= 96) in fp32 before the output: their rounding is the float64 gap.
    torch.testing.assert_close(out.double(), expected, atol=atol * 96, rtol=rtol * 96,
                               msg=lambda m: f"{tag(what, args[1].shape, torch.float32)} {m}")


@pytest.fixture
def vllm_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "vllm_cache"))
    monkeypatch.setenv("GEMS_DUMP_DIR", str(tmp_path / "dumps"))
    return tmp_path


def test_mode_2_compiles_once_for_all_batch_sizes_and_saves_the_aot_artifact(vllm_cache, c_ops, fresh_dynamo):
    from vllm.compilation.counter import compilation_counter
    from vllm.config import set_current_vllm_config

    cfg = _config(2)
    M, model, ref = _models(cfg)
    before = compilation_counter.clone()
    with set_current_vllm_config(cfg):
        for tokens in (5, 9, 1):
            _check(model, ref, M, tokens, "vllm mode 2 flag_gems")
    diff = {k: v - getattr(before, k) for k, v in vars(compilation_counter).items() if v != getattr(before, k)}
    assert diff.get("num_aot_compiles") == 1 and diff.get("num_aot_artifacts_saved") == 1, diff
    # One graph for the three sizes, and it holds the fused ops (the dump is written after the passes).
    dumps = sorted(os.listdir(vllm_cache / "dumps"))
    assert [d for d in dumps if d.endswith("_fused.py")] == ["graph_000_fused.py"], dumps
    fused = (vllm_cache / "dumps" / "graph_000_fused.py").read_text()
    for op in ("flag_gems.add_rms_norm", "flag_gems.silu_and_mul_fused", "flag_gems.rotary_embedding_cache"):
        assert op in fused, op
    assert "Sym(" in fused  # dim 0 stayed symbolic
    artifacts = [os.path.join(d, f) for d, _, fs in os.walk(vllm_cache / "vllm_cache") for f in fs if f == "model"]
    assert len(artifacts) == 1, artifacts

    # A fresh process (another worker, or the next start) loads the artifact and runs it.
    script = textwrap.dedent(f"""
        import json, sys
        sys.path[:0] = [{HERE!r}, {os.path.dirname(HERE)!r}]
        import torch, flag_gems
        from vllm.config import set_current_vllm_config
        from test_vllm_compile import _config, _models
        cfg = _config(2)
        M, model, ref = _models(cfg)
        with open({artifacts[0]!r}, "rb") as f:
            loaded = torch.compiler.load_compiled_function(f, f_globals=model.forward.__globals__)
        args = M.inputs(7, torch.float32, seed=7)
        with set_current_vllm_config(cfg), torch.inference_mode():
            out = loaded(model, *args)
            exp = ref(*[a.double() if a.is_floating_point() else a for a in args])
        print(json.dumps({{"max_err": float((out.double() - exp).abs().max()), "scale": float(exp.abs().max())}}))
    """)
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu")
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=HERE, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    atol, rtol = TOLERANCES[torch.float32]
    assert got["max_err"] <= 96 * (atol + rtol * got["scale"]), got


def test_mode_2_without_aot_compile(vllm_cache, c_ops, fresh_dynamo, monkeypatch):
    from vllm.config import set_current_vllm_config

    monkeypatch.setenv("VLLM_USE_AOT_COMPILE", "0")
    cfg = _config(2)
    M, model, ref = _models(cfg)
    with set_current_vllm_config(cfg):
        for tokens in (4, 6):
            _check(model, ref, M, tokens, "vllm mode 2 flag_gems, no AOT")
    assert not os.path.exists(vllm_cache / "vllm_cache" / "torch_compile_cache" / "torch_aot_compile")


def test_mode_1_compiles_the_model_through_vllms_stock_torch_path(vllm_cache, c_ops, fresh_dynamo):
    from vllm.compilation.wrapper import compile_model_with_stock_torch
    from vllm.config import set_current_vllm_config

    cfg = _config(1)
    M, model, ref = _models(cfg, decorated=False)  # mode 1 compiles the model's top module (not decorated)
    with set_current_vllm_config(cfg):
        compile_model_with_stock_torch(model, cfg)
        for tokens in (3, 8):
            _check(model, ref, M, tokens, "vllm mode 1 flag_gems")
    assert any(d.endswith("_fused.py") for d in os.listdir(vllm_cache / "dumps"))
