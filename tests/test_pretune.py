"""``python -m flag_gems.pretune`` and ``flag_gems.warmup``: the model shape tables, shapes files, and
tuning end to end at tiny shapes on the test device (Triton's interpreter on the CPU, else the current
GPU). Each test sets the tuning policy it relies on (``GEMS_AUTOTUNE``)."""

import json
import os
import subprocess
import sys

import pytest
import torch

import flag_gems
from accuracy import DEVICE, assert_close, poison, rand, ref64, tag
from flag_gems import pretune
from flag_gems.kernels import _autotune as at
from flag_gems.kernels import _tune_cache as cache
from flag_gems.kernels import matmul as km

DEV = torch.cuda.current_device() if DEVICE == "cuda" else -1  # where the kernels run (-1: the interpreter)
LLAMA_NK = {(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)}


class CountingTimer:
    """Deterministic fake timer: runs each candidate once, prefers fewer warps (a non-heuristic choice)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, run, cfg):
        run()
        self.calls += 1
        return 10.0 if cfg is None else 5.0 + cfg.get("num_warps", 1) + 0.01 * sum(
            v for v in cfg.values() if isinstance(v, int))


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A private cache folder, the ``on`` policy, no shipped tables."""
    monkeypatch.setenv("GEMS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("GEMS_AUTOTUNE", "on")
    monkeypatch.setattr(cache, "_SHIPPED", {})
    at.clear_memory()
    yield tmp_path
    at.clear_memory()


def _mm_items(items):
    return [it for it in items if it.kernel == "matmul"]


def test_llama_plan_covers_the_projection_shapes():
    items = pretune.plan("llama", dtype=torch.bfloat16, max_tokens=16384, max_reqs=1024, dev=-1)
    mm = _mm_items(items)
    nk = {(it.key[2], it.key[3]) for it in mm}
    assert nk == LLAMA_NK
    for n, k in nk:
        m_list = sorted(it.key[1] for it in mm if (it.key[2], it.key[3]) == (n, k))
        top = 1024 if n == 128256 else 16384  # the logits GEMM: one row per request
        assert m_list == [1 << i for i in range(top.bit_length())], (n, k, m_list)
    assert all(it.key[6] and it.key[4] == torch.bfloat16 and not it.key[5] for it in mm)  # nn.Linear weights, no bias
    kernels = {it.kernel for it in items}
    assert kernels == {"matmul", "rms_norm", "act_and_mul", "rope"}
    assert {it.key[3] for it in items if it.kernel == "rms_norm"} == {True, False}
    assert {it.key[1] for it in items if it.kernel == "act_and_mul"} == {14336}
    rope = [it.key for it in items if it.kernel == "rope"]
    assert {k[1:5] for k in rope} == {(32, 8, 64, 128)} and {k[8] for k in rope} == {True, False}
    assert len(items) == len({(it.kernel, it.key) for it in items})  # unique keys


def test_model_tables():
    qwen = pretune.plan("qwen", max_tokens=8, max_reqs=4, dev=-1)
    qkv = [it for it in _mm_items(qwen) if it.key[2] == (28 + 2 * 4) * 128]
    assert qkv and all(it.key[5] for it in qkv)  # Qwen2's q/k/v projections carry a bias (addmm)
    seventy = pretune.plan("llama3-70b", max_tokens=8, max_reqs=4, dev=-1)
    assert {(it.key[2], it.key[3]) for it in _mm_items(seventy)} == {
        (10240, 8192), (8192, 8192), (57344, 8192), (8192, 28672), (128256, 8192)}
    for name in ("mistral", "deepseek", "llama3-8b", "qwen2.5-7b"):
        assert pretune.plan(name, max_tokens=4, max_reqs=2, dev=-1)
    with pytest.raises(ValueError, match="unknown model 'gpt5'"):
        pretune.plan("gpt5", dev=-1)
    with pytest.raises(ValueError, match="unknown op"):
        pretune.plan("llama", ops=("mm", "softmax"), dev=-1)


def test_tensor_parallel_shards():
    items = pretune.plan("llama", max_tokens=2, max_reqs=2, tp=2, dev=-1)
    assert {(it.key[2], it.key[3]) for it in _mm_items(items)} == {
        (3072, 4096), (4096, 2048), (14336, 4096), (4096, 7168), (64128, 4096)}
    assert {it.key[1:3] for it in items if it.kernel == "rope"} == {(16, 4)}
    with pytest.raises(ValueError, match="tp: 3 does not divide"):
        pretune.plan("llama", tp=3, dev=-1)


def test_hf_config_gives_the_builtin_table():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                   num_key_value_heads=8, vocab_size=128256)
    assert pretune.plan(cfg, max_tokens=64, max_reqs=8, dev=-1) == pretune.plan("llama", max_tokens=64, max_reqs=8,
                                                                                 dev=-1)


def test_shapes_file(tmp_path):
    doc = {"dtype": "float16", "shapes": [
        {"op": "mm", "n": 256, "k": 128, "m": [1, 8]},
        {"op": "addmm", "n": 64, "k": 32, "m": [3]},
        {"op": "rms_norm", "n_cols": 96, "residual": False, "m": [2]},
        {"op": "act_and_mul", "d": 80, "m": [5]},
        {"op": "rope", "n_q_heads": 4, "n_kv_heads": 1, "head_dim": 32, "rotary_dim": 16, "layout": "vllm", "m": [2]},
        {"op": "attention", "n_heads": 2, "head_dim": 64, "m": [16, 256]},
        {"op": "layer_norm", "n_cols": 48, "m": [1]},
        {"op": "pointwise", "n_cols": 48, "m": [4]},
        {"op": "reduction", "n_cols": 48, "m": [4]},
    ], "mm": [[512, 64]]}
    path = tmp_path / "shapes.json"
    path.write_text(json.dumps(doc))
    items = pretune.plan(str(path), max_tokens=2, dev=-1)
    by = {}
    for it in items:
        by.setdefault(it.kernel, []).append(it.key)
    assert sorted(k[1] for k in by["matmul"] if k[2] == 256) == [1, 8]
    assert [k[5] for k in by["matmul"] if k[2] == 64] == [True]
    assert sorted(k[1] for k in by["matmul"] if k[2] == 512) == [1, 2]  # upstream's [N, K] table: default buckets
    assert all(k[4] == torch.float16 for k in by["matmul"])
    assert by["rope"] == [(2, 4, 1, 8, 32, torch.float16, False, False, False)]
    assert len(by["attention"]) == 3  # prefill 16 and 256, decode against 256 keys
    assert {"layer_norm", "pointwise", "reduction", "rms_norm", "act_and_mul"} <= set(by)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"shapes": [{"op": "mm", "n": 4}]}))
    with pytest.raises(ValueError, match="missing 'k'"):
        pretune.plan(str(bad), dev=-1)


def test_shape_key_matches_the_launchers_key():
    for m, n, k, kmajor, bias in ((1, 64, 32, True, False), (33, 48, 16, False, True), (7, 40, 24, True, True)):
        a = torch.randn(m, k, dtype=torch.bfloat16)
        b = torch.randn(n, k, dtype=torch.bfloat16).t() if kmajor else torch.randn(k, n, dtype=torch.bfloat16)
        x = torch.randn(n, dtype=torch.bfloat16) if bias else None
        want = km.shape_key(1, m, n, k, torch.bfloat16, bias, kmajor, km.tma_possible(1, m, n, k, torch.bfloat16, -1))
        assert km.tune_key(a, b, x) == want


def test_pretune_end_to_end_in_process(env, capsys):
    timer = CountingTimer()
    argv = ["--model", "tiny", "--max_tokens", "4", "--max_reqs", "2", "--dtype", "float32", "--quiet",
            "--device", str(DEV), "--json", str(env / "res.json"), "--export", str(env / "table.json")]
    with at.use_timer(timer):
        assert pretune.main(argv) == 0
    out = capsys.readouterr().out
    n = len(pretune.plan("tiny", dtype=torch.float32, max_tokens=4, max_reqs=2, dev=DEV))
    name = at.device_name(DEV)
    assert f"{n} keys on {name}: {n} tuned, 0 already cached" in out and "cache: " in out
    folder = env / "cache" / "autotune" / at.device_slug(name)
    assert len(list(folder.glob("*.json"))) == n and timer.calls >= 2 * n
    table = json.loads((env / "table.json").read_text())
    assert len(table["entries"]) == n and table["device"] == name
    # A second run (a new process: empty table) reads everything, tunes nothing.
    at.clear_memory()
    timer2 = CountingTimer()
    with at.use_timer(timer2):
        assert pretune.main(argv[:-4]) == 0
    assert f"0 tuned, {n} already cached" in capsys.readouterr().out and timer2.calls == 0
    # The kernels now launch with the cached configs and compute the right thing.
    a, b = rand(3, 96, device=DEVICE), rand(3, 96, device=DEVICE)
    from flag_gems.kernels import act_and_mul as am

    out_t = poison(torch.empty_like(a))
    am.act_and_mul_fwd(a, b, "silu", out=out_t)
    assert am.TUNABLE.origin(am.tune_key(3, 96, torch.float32), DEV).origin == "cache"
    assert_close(out_t, torch.nn.functional.silu(ref64(a)) * ref64(b), torch.float32, tag("silu cached", a.shape,
                                                                                         torch.float32))


def test_pretune_module_entry_point(tmp_path):
    """``python -m flag_gems.pretune`` in a fresh process: tiny shapes through the interpreter (real timer)."""
    env = dict(os.environ, GEMS_CACHE_DIR=str(tmp_path / "c"), TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "flag_gems.pretune", "--model", "tiny", "--max_tokens", "2", "--max_reqs", "1",
           "--dtype", "float32", "--ops", "act_and_mul", "rms_norm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "6 keys on cpu: 6 tuned" in proc.stdout, proc.stdout
    assert "pretune [" in proc.stderr and "6/6" in proc.stderr  # the progress bar
    assert "Warning" not in proc.stderr, proc.stderr
    assert len(list((tmp_path / "c" / "autotune" / "cpu").glob("*.json"))) == 6
    dry = subprocess.run(cmd + ["--dry-run"], capture_output=True, text=True, timeout=300, env=env)
    assert dry.returncode == 0 and dry.stdout.count("key=") == 6
    bad = subprocess.run(cmd[:3] + ["--model", "nope"], capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 2 and "unknown model 'nope'" in bad.stderr


def test_warmup(env):
    timer = CountingTimer()
    with at.use_timer(timer):
        summary = flag_gems.warmup("tiny", tokens=[1, 3], dtype=torch.float32, device=DEV, ops=("act_and_mul", "rope"))
    assert summary.items == 6 and summary.tuned == 6 and summary.failed == 0 and timer.calls > 0
    from flag_gems.kernels import act_and_mul as am

    key = am.tune_key(3, 96, torch.float32)
    assert am.TUNABLE.origin(key, DEV).origin == "tuned"
    # Again: nothing tuned, every kernel still launched once (compiled).
    at.clear_memory()
    with at.use_timer(CountingTimer()) as t2:
        again = flag_gems.warmup("tiny", tokens=[1, 3], dtype=torch.float32, device=DEV, ops=("act_and_mul", "rope"))
    assert again.cached == 6 and again.failed == 0 and t2.calls == 0


def test_warmup_without_tuning_and_under_capture(env, monkeypatch):
    with at.use_timer(CountingTimer()) as timer:
        summary = flag_gems.warmup("tiny", tokens=[2], dtype=torch.float32, device=DEV, ops=("rms_norm",), tune=False)
    assert summary.items == 2 and summary.tuned == 0 and summary.failed == 0 and timer.calls == 0
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="outside CUDA-graph capture"):
        flag_gems.warmup("tiny", tokens=[2], device=DEV)


def test_warmup_respects_off_pretune_does_not(env, monkeypatch, capsys):
    monkeypatch.setenv("GEMS_AUTOTUNE", "off")
    with at.use_timer(CountingTimer()) as timer:
        s = flag_gems.warmup("tiny", tokens=[2], dtype=torch.float32, device=DEV, ops=("act_and_mul",))
    assert s.items == 1 and s.tuned == 0 and s.failed == 0 and timer.calls == 0
    with at.use_timer(CountingTimer()) as timer:
        assert pretune.main(["--model", "tiny", "--tokens", "2", "--dtype", "float32", "--ops", "act_and_mul",
                             "--device", str(DEV), "--quiet"]) == 0
    assert timer.calls > 0 and "1 tuned" in capsys.readouterr().out
