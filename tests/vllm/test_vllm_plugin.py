"""The ``vllm.general_plugins`` entry point: discovered and loaded by vLLM's own plugin loader,
filtered by ``VLLM_PLUGINS``, doing what ``GEMS_VLLM`` asks in a fresh vLLM process."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from vllm_helpers import import_vllm_or_skip

vllm = import_vllm_or_skip()

import flag_gems  # noqa: E402
from flag_gems.vllm import parse_modes  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_entry_point_is_installed():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "flag_gems"]
    assert ep.value == "flag_gems.vllm:register"
    assert ep.load() is flag_gems.vllm.register


@pytest.mark.parametrize("allowed,loaded", [(None, True), ("flag_gems", True), ("some_other_plugin", False)])
def test_vllms_loader_finds_it_and_vllm_plugins_filters_it(monkeypatch, allowed, loaded):
    from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_plugins_by_group

    if allowed is None:
        monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    else:
        monkeypatch.setenv("VLLM_PLUGINS", allowed)
    plugins = load_plugins_by_group(DEFAULT_PLUGINS_GROUP)
    assert ("flag_gems" in plugins) is loaded
    if loaded:
        assert plugins["flag_gems"] is flag_gems.vllm.register


@pytest.mark.parametrize("value,modes", [(None, ()), ("", ()), ("none", ()), ("enable", ("enable",)),
                                         ("pass, patches", ("patches", "pass")), ("all", ("enable", "patches", "pass")),
                                         ("ALL", ("enable", "patches", "pass"))])
def test_gems_vllm_values(value, modes):
    assert parse_modes(value) == modes


def test_an_unknown_gems_vllm_word_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("GEMS_VLLM", "enable,patch")
    with pytest.raises(ValueError, match="GEMS_VLLM='enable,patch': unknown 'patch'; expected .*enable, patches, pass"):
        flag_gems.vllm.register()


def test_install_vllm_pass_wraps_the_pass_manager_and_comes_off(vllm_config):
    from vllm.compilation.passes.pass_manager import PostGradPassManager

    original = PostGradPassManager.configure
    assert flag_gems.vllm.install_vllm_pass()
    assert flag_gems.vllm.install_vllm_pass()  # once
    try:
        manager = PostGradPassManager()
        manager.configure(vllm_config)
        assert sum(p is flag_gems.vllm_pass for p in manager.passes) == 1
    finally:
        flag_gems.vllm.uninstall_vllm_pass()
    assert PostGradPassManager.configure is original
    manager = PostGradPassManager()
    manager.configure(vllm_config)
    assert not any(p is flag_gems.vllm_pass for p in manager.passes)


_PROCESS = textwrap.dedent("""
    import json, sys
    import torch
    from vllm.plugins import load_general_plugins
    load_general_plugins()  # what vLLM's engine and each worker do at start
    import flag_gems, flag_gems.vllm
    from vllm.config import VllmConfig
    from vllm.compilation.passes.pass_manager import PostGradPassManager
    manager = PostGradPassManager()
    manager.configure(VllmConfig())
    print(json.dumps({
        "patched": {k: v[0] for k, v in flag_gems.vllm.patched().items()},
        "pass_installed": any(p is flag_gems.vllm_pass for p in manager.passes),
        "pass_resolvable": "vllm_pass" in flag_gems.__dict__,
        "enabled_ops": len(flag_gems.all_registered_ops()),
        "backend": "flag_gems" in torch._dynamo.list_backends(exclude_tags=()),
    }))
""")


def _fresh_vllm_process(env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_PLUGINS", "GEMS_VLLM")}
    env.update(VLLM_TARGET_DEVICE="cpu", **env_extra)
    proc = subprocess.run([sys.executable, "-c", _PROCESS], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_a_fresh_vllm_process_gets_everything_gems_vllm_asks_for():
    got, stderr = _fresh_vllm_process({"GEMS_VLLM": "all", "VLLM_PLUGINS": "flag_gems"})
    assert got["patched"] == {"rms_norm": "ir", "silu_and_mul": "custom", "gelu_and_mul": "custom",
                              "rotary_embedding": "custom", "deepseek_scaling_rope": "custom"}, got
    assert got["pass_installed"] and got["pass_resolvable"] and got["backend"], got
    assert got["enabled_ops"] > 0, got
    assert "Patched vllm.ir.ops.rms_norm with FLAGGEMS" in stderr  # the worker log the seeds' recipe checks


def test_by_default_the_plugin_only_registers():
    got, _ = _fresh_vllm_process({"GEMS_VLLM": ""})
    assert got["patched"] == {} and not got["pass_installed"] and got["enabled_ops"] == 0, got
    assert got["pass_resolvable"] and got["backend"], got
