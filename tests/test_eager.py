"""Eager dispatcher mode: ``enable`` / ``only_enable`` / ``disable`` / ``use_gems``, presets, record logs,
vendor detection, the warning when no kernel can run.

Most tests run on a registry table of their own (the ``table`` fixture: a few counting
entries plus the real ``add.Tensor`` entry), so they test the mechanism whatever the
default table holds; the tests marked "real table" run on the package's registry. The
counting entries count a call after their implementation returned.
"""

import dataclasses
import logging
import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch

import flag_gems
from accuracy import assert_close, ref64, tag
from accuracy import rand as _rand
from flag_gems import eager, runtime
from flag_gems.lowerings import registry
from flag_gems.lowerings.registry import REGISTRY, Lowering, Policy, preset_targets

aten = torch.ops.aten
ON, OFF = Policy(True, "test entry"), Policy(False, "test entry")
# The real entry (Triton add, through the interpreter on CPU), off by default for the test table.
ADD_ENTRY = dataclasses.replace(REGISTRY[aten.add.Tensor], eager=OFF, fast=OFF)


# The overrides sit on the device's dispatch key (CUDA with a GPU, CPU under the interpreter):
# every tensor of these tests is made there, factories included.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rand(*shape, **kwargs):
    return _rand(*shape, device=DEVICE, **kwargs)


@pytest.fixture(autouse=True)
def _off():
    eager.disable()
    with torch.device(DEVICE):
        yield
    eager.disable()


class Entries:
    """Test-only registry entries that count the calls their ``impl`` serves."""

    def __init__(self):
        self.calls = {}
        self.lock = threading.Lock()

    def count(self, name):
        with self.lock:
            self.calls[name] = self.calls.get(name, 0) + 1

    def n(self, name):
        return self.calls.get(name, 0)

    def lowering(self, target, impl, supports=lambda *a, **k: None, default=True, fast=False):
        name = str(target)

        def counted(*args, **kwargs):
            out = impl(*args, **kwargs)
            self.count(name)  # after the work: a call that raised is not counted
            return out

        return Lowering(target, counted, f"test.{name}", supports, eager=ON if default else OFF, graph=OFF,
                        fast=ON if fast else OFF)


def _float_only(self, *args, **kwargs):
    return None if self.is_floating_point() else f"dtype {self.dtype}"


def _boom(self):
    raise RuntimeError("kernel bug")


@pytest.fixture
def table():
    """REGISTRY replaced by test entries + the real add.Tensor entry; restored afterwards."""
    e = Entries()
    saved = dict(REGISTRY)
    REGISTRY.clear()
    # Inside an impl, aten calls go to the native kernels: these are plain-torch implementations.
    entries = [
        e.lowering(aten.abs.default, lambda self: torch.where(self < 0, -self, self), _float_only, fast=True),
        e.lowering(aten.abs_.default, lambda self: self.copy_(torch.abs(self)), _float_only),
        e.lowering(aten.fill_.Scalar, lambda self, value: aten.fill_.Scalar(self, value)),
        e.lowering(aten.exp.default, lambda self: torch.exp(self), default=False),
        e.lowering(aten.sin.default, _boom, default=False),
        e.lowering(aten.mul.Tensor, lambda *a: None, lambda *a, **k: "never", default=False),
        e.lowering(aten.div.Tensor, lambda *a: None, lambda *a, **k: "never", default=False),
        e.lowering(aten.mul_.Tensor, lambda *a: None, lambda *a, **k: "never", default=False),
        e.lowering(aten.mul.out, lambda *a, **k: None, lambda *a, **k: "never", default=False),
        ADD_ENTRY,
    ]
    for entry in entries:
        REGISTRY[entry.target] = entry
    yield e
    eager.disable()
    REGISTRY.clear()
    REGISTRY.update(saved)


DEFAULTS = ["abs", "abs_", "fill_.Scalar"]


# --------------------------------------------------------------------------- enable / disable / use_gems


def test_enable_registers_the_default_entries_and_disable_restores(table):
    x = rand(5, 7)
    want = x.abs()
    flag_gems.enable()
    assert flag_gems.all_registered_ops() == DEFAULTS
    out = torch.abs(x)
    assert table.n("aten.abs.default") == 1
    flag_gems.disable()
    assert flag_gems.all_registered_ops() == []
    torch.abs(x)
    assert table.n("aten.abs.default") == 1
    assert torch.equal(out, want)


def test_second_enable_replaces_the_first(table):
    x = rand(4)
    flag_gems.enable()
    flag_gems.enable(unused=["abs"])
    assert flag_gems.all_registered_ops() == ["fill_.Scalar"]
    torch.abs(x)
    assert table.n("aten.abs.default") == 0
    flag_gems.enable()
    assert flag_gems.all_registered_ops() == DEFAULTS
    torch.abs(x)
    assert table.n("aten.abs.default") == 1


def test_only_enable_takes_opt_in_entries(table):
    flag_gems.only_enable(include=["exp", "add"])
    assert flag_gems.all_registered_ops() == ["add.Tensor", "exp"]
    x = rand(6)
    out = torch.exp(x)
    assert table.n("aten.exp.default") == 1
    flag_gems.disable()
    assert torch.equal(out, torch.exp(x))


def test_use_gems_restores_the_previous_state(table):
    with flag_gems.use_gems():
        assert flag_gems.all_registered_ops() == DEFAULTS
    assert flag_gems.all_registered_ops() == []
    flag_gems.enable(unused=["abs"])
    with flag_gems.use_gems():
        assert flag_gems.all_registered_ops() == DEFAULTS
        torch.abs(rand(3))
    assert flag_gems.all_registered_ops() == ["fill_.Scalar"]
    assert table.n("aten.abs.default") == 1
    with flag_gems.use_gems(include=["exp"]):
        assert flag_gems.all_registered_ops() == ["exp"]
    assert flag_gems.all_registered_ops() == ["fill_.Scalar"]


def test_nested_use_gems_blocks(table):
    with flag_gems.use_gems(include=["exp"]):
        with flag_gems.use_gems(include=["add", "abs_"]):
            with flag_gems.use_gems(unused=["abs"]):
                assert flag_gems.all_registered_ops() == ["fill_.Scalar"]
            assert flag_gems.all_registered_ops() == ["abs_", "add.Tensor"]
        with flag_gems.use_gems(include=["exp", "sin"], exclude=["sin"]):
            assert flag_gems.all_registered_ops() == ["exp"]
        assert flag_gems.all_registered_ops() == ["exp"]
    assert flag_gems.all_registered_ops() == []


def test_use_gems_restores_on_exception(table):
    flag_gems.enable(unused=["fill_"])
    with pytest.raises(KeyError):
        with flag_gems.use_gems(include=["exp"]):
            raise KeyError("in the block")
    assert flag_gems.all_registered_ops() == ["abs", "abs_"]
    with pytest.raises(ValueError, match="names no aten op"):
        with flag_gems.use_gems(include=["nope_op"]):
            pass
    assert flag_gems.all_registered_ops() == ["abs", "abs_"]


def test_use_gems_blocks_exiting_out_of_order(table):
    outer, inner = flag_gems.use_gems(include=["exp"]), flag_gems.use_gems(include=["abs.default"])
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # another thread's block ends first
    assert flag_gems.all_registered_ops() == ["abs"]
    inner.__exit__(None, None, None)
    assert flag_gems.all_registered_ops() == []


def test_disable_inside_a_block_turns_everything_off(table):
    with flag_gems.use_gems():
        flag_gems.disable()
        assert flag_gems.all_registered_ops() == []
    assert flag_gems.all_registered_ops() == []


def test_state_change_costs_only_the_ops_that_differ(table, monkeypatch):
    made = []
    real = eager._Registration.__init__

    def spy(self, entry, key):
        made.append(str(entry.target))
        real(self, entry, key)

    monkeypatch.setattr(eager._Registration, "__init__", spy)
    flag_gems.enable()
    assert len(made) == 3
    with flag_gems.use_gems():  # the same set: nothing to register
        pass
    with flag_gems.use_gems(include=["abs", "exp"]):
        pass
    assert made[3:] == ["aten.exp.default", "aten.fill_.Scalar"]  # "abs" covers abs_: kept


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "names, left",
    [
        (["abs"], ["fill_.Scalar"]),  # an op name covers its overloads and its in-place form
        (["abs_"], ["abs", "fill_.Scalar"]),
        (["abs.default"], ["abs_", "fill_.Scalar"]),
        (["aten::fill_.Scalar"], ["abs", "abs_"]),
        (["FILL_SCALAR_", "abs_"], ["abs"]),  # record-log names
        (["fill_scalar_"], ["abs", "abs_"]),
        (["Fill"], ["abs", "abs_"]),
        ([aten.abs.default], ["abs_", "fill_.Scalar"]),
        ([aten.abs], ["fill_.Scalar"]),
        ("abs", ["fill_.Scalar"]),
        (["sum", "mm"], DEFAULTS),  # aten ops without an entry: nothing to exclude
    ],
    ids=str,
)
def test_unused_names(table, names, left):
    flag_gems.enable(unused=names)
    assert flag_gems.all_registered_ops() == left
    flag_gems.enable(exclude=names)
    assert flag_gems.all_registered_ops() == left


def test_include_names(table, caplog):
    flag_gems.only_enable(include=["add.Tensor", "ABS_"])
    assert flag_gems.all_registered_ops() == ["abs_", "add.Tensor"]
    with caplog.at_level(logging.WARNING, logger="flag_gems.eager"):
        flag_gems.only_enable(include=["sum"])
    assert flag_gems.all_registered_ops() == []
    assert "sum has no flag_gems kernel" in caplog.text


def test_preset_fast(table):
    flag_gems.enable(preset="fast")
    assert flag_gems.all_registered_ops() == ["abs"]  # the table's one fast entry
    x = rand(4)
    out = torch.abs(x)
    assert table.n("aten.abs.default") == 1 and torch.equal(out, x.abs())
    flag_gems.enable(preset="fast", unused=["abs"])
    assert flag_gems.all_registered_ops() == []
    flag_gems.disable()
    with flag_gems.use_gems(preset="fast"):
        assert flag_gems.all_registered_ops() == ["abs"]
        with flag_gems.use_gems():  # every entry inside the fast block
            assert flag_gems.all_registered_ops() == DEFAULTS
        assert flag_gems.all_registered_ops() == ["abs"]
    assert flag_gems.all_registered_ops() == []


def test_preset_errors(table):
    with pytest.raises(ValueError, match=r"preset='fastest' is not a preset; expected None \(every entry\) or 'fast'"):
        flag_gems.enable(preset="fastest")
    with pytest.raises(TypeError, match="include= or preset=, not both"):
        flag_gems.use_gems(include=["abs"], preset="fast")
    assert flag_gems.all_registered_ops() == []


def test_real_table_enable_registers_every_entry_and_unused_removes_by_name(tmp_path):
    # FlagGems' semantics on the package's own registry: enable() replaces every op an entry
    # implements (less recorded exclusions); unused=["sum", "add"] removes every overload of both.
    every = {t for t, e in REGISTRY.items() if e.eager.on}
    assert preset_targets(None) == every and len(every) == len(REGISTRY) - sum(not e.eager.on for e in REGISTRY.values())
    flag_gems.enable()
    assert flag_gems.all_registered_ops() == sorted(eager._op_names(t).display for t in every)
    flag_gems.enable(unused=["sum", "add"])
    live = set(flag_gems.all_registered_ops())
    gone = {eager._op_names(t).display for t in every} - live
    assert gone == {eager._op_names(t).display for t in every if t._opname in ("sum", "add", "add_")}, sorted(gone)
    assert {"sum", "sum.dim_IntList", "add.Tensor", "add_.Tensor"} <= gone and "mul.Tensor" in live
    # By result: with every entry on, a plain add runs the Triton kernel (logged after it returned).
    log = tmp_path / "ops.log"
    flag_gems.enable(record=True, path=log)
    x, y = rand(3, 5), rand(3, 5)
    s = x + y
    flag_gems.disable()
    assert_close(s, ref64(x) + ref64(y), torch.float32, tag("enable() add", s.shape, s.dtype))
    assert "[DEBUG] flag_gems.ops.add: GEMS ADD_TENSOR" in _lines(log)


def test_registration_takes_the_implementation_it_is_given(table):
    # The one place an implementation is registered on a key (where a C++ wrapper plugs in):
    # the given function serves the op until destroy() puts the kernel before it back.
    def seven(self):
        return torch.full_like(self, 7.0)  # a marker result no exp gives

    x = rand(5)
    want = torch.exp(x)
    with eager._quiet_overrides():
        reg = eager._Registration(REGISTRY[aten.exp.default], runtime.dispatch_key, kernel=seven)
    try:
        got = torch.exp(x)
    finally:
        reg.destroy()
    assert reg.kernel is seven and torch.equal(got, torch.full_like(x, 7.0))
    assert torch.equal(torch.exp(x), want)


def test_unknown_name_lists_close_matches(table):
    with pytest.raises(ValueError, match=r"unused: 'abss' names no aten op; close matches: abs"):
        flag_gems.enable(unused=["abss"])
    with pytest.raises(ValueError, match=r"include: 'fill_scalr_' names no aten op; close matches: fill_scalar_"):
        flag_gems.only_enable(include=["fill_scalr_"])
    with pytest.raises(ValueError, match=r"'add.Tensr' names no aten op"):
        flag_gems.enable(unused=["add.Tensr"])
    with pytest.raises(TypeError, match="unused= or its alias exclude=, not both"):
        flag_gems.enable(unused=["abs"], exclude=["abs"])
    with pytest.raises(TypeError, match="expected op names"):
        flag_gems.enable(unused=[3])
    assert flag_gems.all_registered_ops() == []


# --------------------------------------------------------------------------- the override


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_results_equal_torch_and_the_override_runs(table, dtype):
    x = rand(3, 17, dtype=dtype)
    y = rand(3, 17, dtype=dtype)
    with flag_gems.use_gems():
        a = torch.abs(x)
        b = x.clone().abs_()
        c = torch.empty(3, 4, dtype=dtype).fill_(2.5)
    assert table.n("aten.abs.default") == 1 and table.n("aten.abs_.default") == 1
    assert table.n("aten.fill_.Scalar") == 1
    assert torch.equal(a, x.abs()) and torch.equal(b, x.abs()) and torch.equal(c, torch.full((3, 4), 2.5, dtype=dtype))
    with flag_gems.use_gems(include=["add"]):
        s = x + y  # the Triton kernel, through the interpreter
    assert_close(s, ref64(x) + ref64(y), dtype, tag("eager add", s.shape, dtype))


def test_in_place_override_returns_self(table):
    x = rand(4)
    with flag_gems.use_gems():
        y = x.fill_(1.5)
    assert y is x and torch.equal(x, torch.full((4,), 1.5))


def test_unsupported_input_falls_back_to_native(table, tmp_path):
    i = torch.randint(-9, 9, (5, 3))
    z = torch.randn(4, dtype=torch.complex64)
    with flag_gems.use_gems(include=["abs", "add"], record=True, path=tmp_path / "log"):
        a = torch.abs(i)  # the test entry takes floats only
        c = z + z  # no flag_gems kernel takes complex
        f = rand(4) + rand(4)
    assert _lines(tmp_path / "log") == ["[DEBUG] flag_gems.ops.add: GEMS ADD_TENSOR"]  # upstream's file: GEMS lines only
    with flag_gems.use_gems(include=["abs", "add"], record=True, fallbacks=True, path=tmp_path / "log"):
        a = torch.abs(i)
        c = z + z
        f = rand(4) + rand(4)
    assert table.n("aten.abs.default") == 0
    assert torch.equal(a, i.abs()) and torch.equal(c, z + z) and f.dtype == torch.float32
    assert (tmp_path / "log").read_text().splitlines() == [
        "[DEBUG] flag_gems.ops.abs: NATIVE ABS: dtype torch.int64",
        "[DEBUG] flag_gems.ops.add: NATIVE ADD_TENSOR: pointwise add: operand 0: dtype torch.complex64 is not supported",
        "[DEBUG] flag_gems.ops.add: GEMS ADD_TENSOR",
    ]


NUMBERS = [True, 3, 2.5, 0.1, 1 + 2j]
DTYPES_ALL = [torch.bool, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float64]
CALLS = [
    torch.add,
    torch.mul,
    torch.div,
    lambda x, n: x.clone().mul_(n),
    lambda x, n: torch.mul(x, n, out=torch.empty_like(x, dtype=torch.result_type(x, n))),
]


def _outcomes(xs, number):
    out = []
    for call in CALLS:
        for x in xs:
            try:
                out.append(call(x, number))
            except RuntimeError as exc:  # e.g. bool - bool: the same error with or without flag_gems
                out.append(type(exc))
    return out


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("number", NUMBERS, ids=repr)
def test_numbers_in_tensor_slots_promote_like_torch(table, number, monkeypatch):
    # x + number is aten.add.Tensor(x, number) with a "wrapped number" that Python kernels see
    # as a Python number. Entries that decline it send the native kernel a 0-dim tensor
    # instead: dtypes and values must equal plain torch's, 1-dim and 0-dim, every dtype.
    REGISTRY[aten.add.Tensor] = table.lowering(aten.add.Tensor, lambda *a: None, lambda *a, **k: "never")
    tensorized = []
    real = eager._tensorize_numbers
    monkeypatch.setattr(eager, "_tensorize_numbers", lambda *a: tensorized.append(1) or real(*a))
    xs = [(torch.randn(shape) * 4).to(dtype) for dtype in DTYPES_ALL for shape in [(5,), ()]]
    want = _outcomes(xs, number)
    with flag_gems.use_gems(include=["add", "mul", "div"]):
        got = _outcomes(xs, number)
    assert len(tensorized) >= sum(not isinstance(w, type) for w in want)  # every call that works went native
    for g, w in zip(got, want):
        if isinstance(w, type):
            assert g is w, f"[number={number!r}] {g} != {w}"
            continue
        assert g.dtype == w.dtype and g.shape == w.shape, f"[number={number!r}] {g.dtype} {g.shape} != {w.dtype} {w.shape}"
        if w.dtype == torch.complex32:  # no equal() kernel for it
            g, w = g.to(torch.complex64), w.to(torch.complex64)
        assert torch.equal(g, w), f"[number={number!r} dtype={w.dtype}] values differ"


def test_kernel_error_falls_back_with_one_warning(table, caplog, tmp_path):
    # A kernel that raises on every call: the native kernel gives the result, one warning
    # names the bug, and the record log never says GEMS for it (the line is written after the
    # kernel returned, which it never does).
    x = rand(6)
    log = tmp_path / "ops.log"
    with caplog.at_level(logging.WARNING, logger="flag_gems.eager"):
        with flag_gems.use_gems(include=["sin", "abs.default"], record=True, fallbacks=True, path=log):
            a, b = torch.sin(x), torch.sin(x)
            c = torch.abs(x)
    assert table.n("aten.sin.default") == 0 and table.n("aten.abs.default") == 1
    assert torch.equal(a, torch.sin(x)) and torch.equal(b, a) and torch.equal(c, x.abs())
    assert caplog.text.count("the flag_gems kernel test.aten.sin.default raised RuntimeError: kernel bug") == 1
    assert _lines(log) == [
        "[WARNING] flag_gems.ops.sin: NATIVE SIN: the flag_gems kernel raised RuntimeError",
        "[WARNING] flag_gems.ops.sin: NATIVE SIN: the flag_gems kernel raised RuntimeError",
        "[DEBUG] flag_gems.ops.abs: GEMS ABS",
    ]


@pytest.mark.parametrize("checks_in_impl", [False, True], ids=["supports", "checks_in_impl"])
def test_record_is_written_after_the_kernel_returned(table, tmp_path, checks_in_impl):
    # The record call sits after impl in the wrapper: a stub whose impl raises every time
    # (also a NotImplementedError-refusing one) leaves no GEMS line, whatever the path.
    seen = []

    def raises(self):
        seen.append(self.shape)
        raise (NotImplementedError("refused in impl") if checks_in_impl else ValueError("stub kernel raises"))

    entry = dataclasses.replace(table.lowering(aten.exp.default, raises, default=False), checks_in_impl=checks_in_impl)
    REGISTRY[aten.exp.default] = entry
    x = rand(3, 4)
    log = tmp_path / "ops.log"
    with flag_gems.use_gems(include=["exp"], record=True, once=True, fallbacks=True, path=log):
        out = torch.exp(x)
    assert seen == [x.shape] and table.n("aten.exp.default") == 0  # the stub was reached, never returned
    assert_close(out, torch.exp(ref64(x)), torch.float32, tag("exp (native after the stub)", x.shape, x.dtype))
    text = log.read_text()
    assert "GEMS" not in text and "NATIVE EXP" in text, text


def test_bad_input_raises_torchs_own_error(table, caplog):
    # The add launcher raises ValueError for shapes that do not broadcast; the native kernel
    # then raises what torch raises, and no kernel-bug warning is logged.
    with caplog.at_level(logging.WARNING, logger="flag_gems.eager"):
        with flag_gems.use_gems(include=["add"]), pytest.raises(RuntimeError, match="must match the size"):
            rand(3) + rand(4)
    assert "raised" not in caplog.text


def test_mutating_kernel_error_is_raised(table):
    REGISTRY[aten.abs_.default] = table.lowering(aten.abs_.default, lambda self: _boom(self))
    with flag_gems.use_gems(include=["abs_"]), pytest.raises(RuntimeError, match="kernel bug"):
        rand(3).abs_()


def test_aten_calls_inside_an_impl_go_native(table):
    # The abs impl calls torch.abs (in abs_'s impl) and aten.fill_ itself: no recursion.
    with flag_gems.use_gems():
        x = rand(5).fill_(-2.0)
        y = x.abs_()
    assert table.n("aten.fill_.Scalar") == 1 and table.n("aten.abs_.default") == 1 and table.n("aten.abs.default") == 0
    assert torch.equal(y, torch.full((5,), 2.0))


def test_inference_mode_and_no_grad(table):
    x = rand(4)
    with flag_gems.use_gems(), torch.inference_mode():
        a = torch.abs(x)
    with flag_gems.use_gems(), torch.no_grad():
        b = torch.abs(x)
    assert table.n("aten.abs.default") == 2 and torch.equal(a, b)


def test_registration_does_not_touch_warning_filters(table):
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flag_gems.enable()
        flag_gems.disable()
    assert list(warnings.filters) == before
    assert not [w for w in caught if "Overriding a previously registered kernel" in str(w.message)]


# --------------------------------------------------------------------------- record


def _lines(path):
    return path.read_text().splitlines()


def test_record_format(table, tmp_path):
    path = tmp_path / "sub" / "gems_debug.log"  # the directory is created
    flag_gems.enable(record=True, path=str(path))
    x = torch.empty(3)
    x.fill_(1.0)
    x.fill_(-2.0)
    torch.abs(x)
    x.abs_()
    flag_gems.disable()
    torch.abs(x)  # not recorded
    assert _lines(path) == [
        "[DEBUG] flag_gems.ops.fill: GEMS FILL_SCALAR_",
        "[DEBUG] flag_gems.ops.fill: GEMS FILL_SCALAR_",
        "[DEBUG] flag_gems.ops.abs: GEMS ABS",
        "[DEBUG] flag_gems.ops.abs: GEMS ABS_",
    ]
    ops_logger = logging.getLogger("flag_gems.ops")
    assert ops_logger.handlers == [] and ops_logger.propagate and ops_logger.level == logging.NOTSET


def test_record_once(table, tmp_path):
    path = tmp_path / "once.log"
    with flag_gems.use_gems(record=True, once=True, path=path):
        for _ in range(3):
            torch.abs(torch.empty(2).fill_(1.0))
    assert _lines(path) == ["[DEBUG] flag_gems.ops.fill: GEMS FILL_SCALAR_", "[DEBUG] flag_gems.ops.abs: GEMS ABS"]


def test_record_default_path(table, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    flag_gems.enable(record=True)
    torch.abs(rand(2))
    flag_gems.disable()
    assert _lines(tmp_path / ".flaggems" / "oplist.log") == ["[DEBUG] flag_gems.ops.abs: GEMS ABS"]


def test_record_names_bisect_with_unused(table, tmp_path):
    # The bisect loop: record which ops ran, then exclude them by the names the log shows.
    path = tmp_path / "ops.log"
    with flag_gems.use_gems(include=["abs.default", "fill_", "add"], record=True, once=True, path=path):
        torch.abs(torch.empty(2).fill_(1.0)) + rand(2)
    logged = [line.split("GEMS ")[1] for line in _lines(path)]
    assert logged == ["FILL_SCALAR_", "ABS", "ADD_TENSOR"]
    for name in logged:
        with flag_gems.use_gems(include=["abs.default", "fill_", "add"], unused=[name.lower()], record=True, path=path):
            torch.abs(torch.empty(2).fill_(1.0)) + rand(2)
        assert name not in path.read_text() and len(_lines(path)) == 2


def test_record_in_nested_blocks(table, tmp_path):
    path = tmp_path / "nested.log"
    x = rand(2)
    flag_gems.enable(record=True, path=path)
    torch.abs(x)
    with flag_gems.use_gems():  # record=False inside the block
        torch.abs(x)
    with flag_gems.use_gems(record=True, path=path):  # the same file: keeps logging into it
        x.fill_(1.0)
    torch.abs(x)
    flag_gems.disable()
    assert _lines(path) == [
        "[DEBUG] flag_gems.ops.abs: GEMS ABS",
        "[DEBUG] flag_gems.ops.fill: GEMS FILL_SCALAR_",
        "[DEBUG] flag_gems.ops.abs: GEMS ABS",
    ]
    assert table.n("aten.abs.default") == 3


def test_bad_record_path_leaves_the_state(table, tmp_path):
    flag_gems.enable(unused=["abs"])
    with pytest.raises(IsADirectoryError):
        flag_gems.enable(record=True, path=tmp_path)  # a directory
    assert flag_gems.all_registered_ops() == ["fill_.Scalar"]
    with pytest.raises(IsADirectoryError):
        with flag_gems.use_gems(record=True, path=tmp_path):
            pass
    assert flag_gems.all_registered_ops() == ["fill_.Scalar"]
    assert logging.getLogger("flag_gems.ops").handlers == []


# --------------------------------------------------------------------------- threads


def test_threads(table, tmp_path):
    path = tmp_path / "threads.log"
    errors = []
    results = {}
    n_threads, n_calls = 4, 20

    def work(seed):
        try:
            g = torch.Generator().manual_seed(seed)
            xs = [torch.randn(33, generator=g, device="cpu").to(DEVICE) for _ in range(n_calls)]
            y = torch.randn(40, generator=g, device="cpu").to(DEVICE)
            fills = [torch.empty(3, device=DEVICE).fill_(float(k)) for k in range(n_calls)]
            results[seed] = (xs, [torch.abs(x) for x in xs], fills, y, y + y)
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    with flag_gems.use_gems(include=["abs", "fill_", "add"], record=True, once=True, path=path):
        threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    assert table.n("aten.abs.default") == n_threads * n_calls
    assert table.n("aten.fill_.Scalar") == n_threads * n_calls
    for xs, abs_, fills, y, y2 in results.values():
        assert all(torch.equal(a, x.abs()) for a, x in zip(abs_, xs))
        assert all(torch.equal(f, torch.full((3,), float(k))) for k, f in enumerate(fills))
        assert torch.equal(y2, y + y)
    assert sorted(_lines(path)) == [
        "[DEBUG] flag_gems.ops.abs: GEMS ABS",
        "[DEBUG] flag_gems.ops.add: GEMS ADD_TENSOR",
        "[DEBUG] flag_gems.ops.fill: GEMS FILL_SCALAR_",
    ]


def test_blocks_in_threads(table):
    errors = []

    def work():
        try:
            for _ in range(10):
                with flag_gems.use_gems(include=["exp"]):
                    torch.exp(torch.zeros(2, device=DEVICE))
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and flag_gems.all_registered_ops() == []


# --------------------------------------------------------------------------- Megatron-style training step


class TinyBlock(torch.nn.Module):
    def __init__(self, d=12):
        super().__init__()
        self.fc1 = torch.nn.Linear(d, 2 * d)
        self.fc2 = torch.nn.Linear(2 * d, d)

    def forward(self, x):
        h = self.fc2(self.fc1(x).abs())
        return h + x  # residual add: add.Tensor forward; its backward accumulates x's grad with add


@pytest.mark.parametrize("which", ["test-table", "real-table"])
def test_megatron_style_forward_backward(request, which):
    e = request.getfixturevalue("table") if which == "test-table" else None
    torch.manual_seed(0)
    model = TinyBlock()
    ref_model = TinyBlock()
    ref_model.load_state_dict(model.state_dict())
    x = rand(3, 5, 12, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)

    include = ["abs", "add"] if e is not None else None
    with flag_gems.use_gems(include=include):
        loss = model(x).sum()
        loss.backward()
    assert flag_gems.all_registered_ops() == []
    if e is not None:
        assert e.n("aten.abs.default") == 1

    ref_loss = ref_model(x_ref).sum()
    ref_loss.backward()
    dtype = torch.float32
    assert_close(loss, ref_loss, dtype, tag("megatron loss", (), dtype))
    assert_close(x.grad, x_ref.grad, dtype, tag("megatron x.grad", x.shape, dtype), grad=True)
    for (name, p), p_ref in zip(model.named_parameters(), ref_model.parameters()):
        assert_close(p.grad, p_ref.grad, dtype, tag(f"megatron {name}.grad", p.shape, dtype), grad=True)


# --------------------------------------------------------------------------- vendor and import


@pytest.mark.parametrize(
    "env, want",
    [
        ({}, (runtime._detected_vendor(), runtime.VENDORS[runtime._detected_vendor()])),
        ({"GEMS_VENDOR": "cpu"}, ("cpu", "cpu")),
        ({"GEMS_VENDOR": " NVIDIA "}, ("nvidia", "cuda")),
        ({"GEMS_VENDOR": "amd"}, ("amd", "cuda")),
        ({"GEMS_VENDOR": ""}, (runtime._detected_vendor(), runtime.VENDORS[runtime._detected_vendor()])),
    ],
    ids=["detected", "cpu", "nvidia", "amd", "empty"],
)
def test_detect(env, want):
    assert runtime.detect(env) == want


def test_detect_unknown_vendor():
    with pytest.raises(ValueError, match=r"GEMS_VENDOR='cambricon' is not a vendor .* expected one of nvidia, amd, cpu"):
        runtime.detect({"GEMS_VENDOR": "cambricon"})


def test_public_device_and_vendor():
    assert (flag_gems.vendor_name, flag_gems.device) == runtime.detect()
    assert runtime.dispatch_key == ("CUDA" if flag_gems.device == "cuda" else "CPU")
    assert registry.REGISTRY is REGISTRY


def _python(code, **env):
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )


def test_unknown_gems_vendor_fails_at_import():
    r = _python("import flag_gems", GEMS_VENDOR="bogus")
    assert r.returncode != 0
    assert "ValueError: GEMS_VENDOR='bogus' is not a vendor" in r.stderr and "nvidia, amd, cpu" in r.stderr


IMPORT_CHECK = """
import os, subprocess, warnings
def refuse(*a, **k):
    raise AssertionError("import flag_gems started a subprocess")
subprocess.Popen.__init__ = refuse
os.posix_spawn = os.posix_spawnp = os.fork = os.system = refuse
import torch, flag_gems
assert not (torch.cuda.is_available() and torch.cuda.is_initialized()), "import initialized CUDA"
print(flag_gems.vendor_name, flag_gems.device)
"""


def test_import_is_cheap_and_honours_gems_vendor():
    # No subprocess, no CUDA context; GEMS_VENDOR overrides detection (with a warning when it disagrees).
    r = _python(IMPORT_CHECK, GEMS_VENDOR="nvidia")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["nvidia", "cuda"]


@pytest.mark.skipif(DEVICE != "cpu", reason="CUDA has a native _fused_rms_norm_backward")
def test_op_without_a_native_kernel_on_the_key():
    # _fused_rms_norm_backward has no CPU kernel: ours serves what it takes, and anything it
    # refuses is a clear NotImplementedError, not a failure to register.
    x = rand(3, 8, dtype=torch.float64)  # float64: refused by our entry
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    with flag_gems.use_gems(include=["_fused_rms_norm_backward"]):
        with pytest.raises(NotImplementedError, match="no native CPU kernel"):
            aten._fused_rms_norm_backward.default(x, x, [8], rstd, None, [True, False])
        dx, _ = aten._fused_rms_norm_backward.default(x.float(), x.float(), [8], rstd.float(), None, [True, False])
    ref = torch.func.vjp(lambda t: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6), x)[1](x)[0]
    torch.testing.assert_close(dx.double(), ref, atol=1e-4, rtol=1e-4)


def _sdpa_math(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    # Plain torch (below our kernel, aten calls go native): softmax(q k^T * scale) v.
    s = (q @ k.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


def _needs_grad(q, k, v, *args, **kwargs):
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return "inputs require grad"
    return None


@pytest.mark.parametrize("mode", ["plain", "no_grad", "inference_mode"])
def test_composite_implicit_op_is_reached_in_every_mode(table, mode):
    # scaled_dot_product_attention is CompositeImplicitAutograd (no kernel of its own below autograd).
    REGISTRY[aten.scaled_dot_product_attention.default] = table.lowering(
        aten.scaled_dot_product_attention.default, _sdpa_math, _needs_grad, default=False
    )
    q, k, v = rand(1, 2, 5, 8), rand(1, 2, 7, 8), rand(1, 2, 7, 8)
    ctx = {"plain": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    with flag_gems.use_gems(include=["scaled_dot_product_attention"]), ctx():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert table.n("aten.scaled_dot_product_attention.default") == 1
    ref = torch.softmax(ref64(q) @ ref64(k).transpose(-2, -1) / 8**0.5, -1) @ ref64(v)
    assert_close(out, ref, torch.float32, tag(f"sdpa[{mode}]", q.shape, q.dtype))


def test_composite_implicit_op_with_grad_falls_back_to_the_differentiable_native(table):
    REGISTRY[aten.scaled_dot_product_attention.default] = table.lowering(
        aten.scaled_dot_product_attention.default, _sdpa_math, _needs_grad, default=False
    )
    q, k, v = (rand(1, 2, 5, 8, requires_grad=True) for _ in range(3))
    want = torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(q, k, v).sum(), (q, k, v))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "autograd kernel was not registered" warning at backward
        with flag_gems.use_gems(include=["scaled_dot_product_attention"]):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            got = torch.autograd.grad(out.sum(), (q, k, v))
    assert table.n("aten.scaled_dot_product_attention.default") == 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    # After the block the decomposition is back in the Autograd slot.
    table_dump = torch._C._dispatch_dump_table("aten::scaled_dot_product_attention")
    autograd_line = next(l for l in table_dump.splitlines() if l.startswith(f"Autograd{DEVICE.upper()}:"))
    assert "fallthrough" not in autograd_line


def test_checks_in_impl_entry_skips_supports_and_falls_back_on_its_refusal(table, caplog):
    def never_called(*args, **kwargs):
        raise AssertionError("supports() called for a checks_in_impl entry")

    def impl(self):
        if not self.is_floating_point():
            raise NotImplementedError(f"dtype {self.dtype}")
        if self.dim() == 3:
            raise RuntimeError("kernel bug")
        return torch.exp(self)

    entry = dataclasses.replace(table.lowering(aten.exp.default, impl, never_called, default=False), checks_in_impl=True)
    REGISTRY[aten.exp.default] = entry
    x, i, bad = rand(4, 5), torch.arange(6), rand(2, 2, 2)
    with caplog.at_level(logging.DEBUG, logger="flag_gems.eager"), flag_gems.use_gems(include=["exp"]):
        y, yi, yb = torch.exp(x), torch.exp(i), torch.exp(bad)
    assert table.n("aten.exp.default") == 1  # only x's call returned from the entry
    assert_close(y, torch.exp(ref64(x)), torch.float32, tag("exp", x.shape, x.dtype))
    assert torch.equal(yi, torch.exp(i)) and torch.equal(yb, torch.exp(bad))  # native for both
    assert any("native kernel (dtype torch.int64)" in r.getMessage() for r in caplog.records)
    assert any("raised RuntimeError: kernel bug" in r.getMessage() for r in caplog.records)


def test_generated_pointwise_entries_check_in_impl():
    entries = [e for t, e in REGISTRY.items() if e.kernel.startswith("flag_gems.pointwise.")]
    assert entries and all(e.checks_in_impl for e in entries)


# --------------------------------------------------------------------------- no kernels in this process

UNAVAILABLE = """
{first}
import warnings, torch, flag_gems
x = torch.randn(4, 8)
if {eager}:
    with flag_gems.use_gems():
        y = x + x  # refused (no interpreter): the native kernel, and the warning
        z = x + x  # no second warning
    assert torch.equal(y, x * 2) and torch.equal(z, y)
report = flag_gems.explain(lambda t: torch.softmax(t, -1) * 2, x)
print("FIRST LINE:", str(report).splitlines()[0])
print("AVAILABLE:", flag_gems.availability.unavailable() is None)
"""


FIRST_IMPORTS = {
    "triton": "import triton",
    "transformers": "from transformers import LlamaForCausalLM  # its modeling code imports triton",
}


@pytest.mark.parametrize("first", list(FIRST_IMPORTS))
@pytest.mark.parametrize("path", ["eager", "compile"])
def test_kernels_unavailable_warn_once_on_stderr_and_explain_says_it(first, path):
    # A CPU process that imports triton (or a transformers model, which imports it) before
    # flag_gems, without TRITON_INTERPRET: no kernel can run. The first refused kernel warns
    # through `warnings` (stderr), once, and explain()'s report says it in its first line.
    if first == "transformers":
        pytest.importorskip("transformers")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU process on a GPU machine too
    code = UNAVAILABLE.format(first=FIRST_IMPORTS[first], eager=path == "eager")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    warned = [ln for ln in r.stderr.splitlines() if "KernelsUnavailableWarning" in ln]
    assert len(warned) == 1, r.stderr
    assert "triton was imported before flag_gems without TRITON_INTERPRET=1" in warned[0]
    assert "set TRITON_INTERPRET=1 at process start" in warned[0]
    first_line = next(ln for ln in r.stdout.splitlines() if ln.startswith("FIRST LINE:"))
    assert "KERNELS UNAVAILABLE" in first_line and "triton was imported before flag_gems" in first_line
    assert "AVAILABLE: False" in r.stdout


def test_kernels_available_no_warning():
    # The same program with triton imported after flag_gems: the interpreter runs the kernels,
    # nothing warns, and explain's first line is a graph.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    code = UNAVAILABLE.format(first="import flag_gems, triton", eager=True)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "KernelsUnavailableWarning" not in r.stderr
    assert "FIRST LINE: graph 0" in r.stdout and "AVAILABLE: True" in r.stdout
