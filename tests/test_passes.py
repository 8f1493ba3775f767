"""The passes package: every pass module imports, and a broken one fails ``import flag_gems`` loudly."""

import importlib
import pkgutil
import re
import subprocess
import sys

import flag_gems.passes as passes
from flag_gems.options import FUSIONS


def test_every_pass_module_imports():
    names = sorted(m.name for m in pkgutil.iter_modules(passes.__path__))
    assert {"act_and_mul", "direct_calls", "lower_aten", "matching", "rms_norm", "rotary_embedding"} <= set(names)
    for name in names:
        importlib.import_module(f"flag_gems.passes.{name}")


def test_every_fusion_family_has_its_pass():
    assert list(passes.FUSION_PASSES) == list(FUSIONS)  # the order they run in is the options' order
    assert all(callable(fn) for fn in passes.FUSION_PASSES.values())


def test_a_pass_that_fails_to_import_fails_import_flag_gems():
    # A fresh interpreter in which the act_and_mul pass module cannot be imported.
    code = "import sys; sys.modules['flag_gems.passes.act_and_mul'] = None; import flag_gems"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert re.search(r"(ModuleNotFound|Import)Error: .*flag_gems.passes.act_and_mul", proc.stderr), proc.stderr
