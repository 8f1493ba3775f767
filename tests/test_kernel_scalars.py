"""Our kernels compile alike whichever launcher types their float scalars.

Triton's launcher passes a Python float (``eps``, ``weight_offset``, ``alpha``/``beta``, a scale,
``arange``'s start and step) as fp32; Inductor's wrapper, which launches our kernels once they are
inlined into its code, passes it as fp64. Before the casts, fp64 scalars turned the row math fp64
and the RMSNorm backward did not compile ("Loop-carried variable dw_acc has initial type fp32 but is
re-assigned to fp64", on an H200 under ``options={"inductor": True}``). The front end (TTIR for
sm_90) needs no GPU: ``_fp64_scalars.py`` generates it in a compiled-Triton subprocess."""

import ast
import glob
import json
import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
# kernel variant -> its float scalar parameters (as _fp64_scalars.CASES lists them)
FLOATS = {
    "rms_norm_fwd[one_pass]": 2, "rms_norm_fwd[two_pass]": 2,
    "rms_norm_bwd[one_pass]": 2, "rms_norm_bwd[two_pass]": 2,
    "layer_norm_fwd[one_pass]": 1, "layer_norm_fwd[two_pass]": 1,
    "matmul": 2, "matmul_tma": 2, "matmul_ws": 2, "attention": 1, "reduce_sum": 1, "arange": 2,
}


@pytest.fixture(scope="module")
def front_end(tmp_path_factory):
    env = {**os.environ, "TRITON_INTERPRET": "0", "GEMS_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_fp64_scalars.py")], capture_output=True, text=True,
                          env=env, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


# Parameter names our kernels give float scalars (an int parameter never has one of these names).
FLOAT_NAMES = re.compile(r"eps|.*_offset|alpha|beta|.*scale|start|step|value|slope|threshold|momentum")


def _jit_kernel_params():
    """(kernel, parameter) for every runtime parameter of a ``jit`` kernel in kernels/*.py."""
    found = set()
    for path in glob.glob(os.path.join(HERE, os.pardir, "kernels", "*.py")):
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and any(
                    "jit" in ast.unparse(d) for d in node.decorator_list):
                found.update((node.name, a.arg) for a in node.args.args
                             if not (a.annotation is not None and "constexpr" in ast.unparse(a.annotation)))
    return found


def test_every_kernel_with_float_scalars_is_covered(front_end):
    assert sorted(front_end) == sorted(FLOATS)
    covered = {(v["kernel"], f) for v in front_end.values() for f in v["floats"]}
    named = {(k, p) for k, p in _jit_kernel_params() if FLOAT_NAMES.fullmatch(p)}
    assert named, "no kernel parameter found: the scan is broken"
    assert named <= covered, f"float scalars no case compiles as fp64: {sorted(named - covered)}"


@pytest.mark.parametrize("kernel", sorted(FLOATS))
def test_fp64_scalars_compile_to_the_fp32_kernel(front_end, kernel):
    got = front_end[kernel]
    assert got["fp32"] == "ok", f"[kernel={kernel}] fp32 scalars (Triton's launcher): {got['fp32']}"
    assert got["fp64"] == "ok", f"[kernel={kernel}] fp64 scalars (Inductor's wrapper): {got['fp64']}"
    assert got["fp32_f64"] == 0, f"[kernel={kernel}] fp64 math with fp32 scalars"
    # The fp64 IR is the fp32 IR plus one fp64 -> fp32 cast per float scalar, and no other fp64 value.
    assert got["f64_lines"] == [], f"[kernel={kernel}] fp64 math from an fp64 scalar: {got['f64_lines']}"
    assert got["casts"] == got["extra_lines"] == FLOATS[kernel], f"[kernel={kernel}] {got}"
