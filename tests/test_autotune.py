"""The autotuner (kernels/_autotune.py) and its cache (kernels/_tune_cache.py).

A stand-in family (``_fake``) whose bench is plain Python and whose timer is a deterministic
function of the config exercises the policy, the cache files and the key; the real families
are tuned on the test device (Triton's interpreter on the CPU, else the current GPU) with the
same fake timer, and each of their candidates is checked against a float64 reference. Every
test sets the tuning policy it relies on (``GEMS_AUTOTUNE``), so an outer setting does not
change what it checks.
"""

import json
import os
import statistics
import time

import pytest
import torch

from accuracy import DEVICE, assert_close, poison, rand, ref64, tag
from flag_gems.kernels import _autotune as at
from flag_gems.kernels import _common
from flag_gems.kernels import _tune_cache as cache

FAKE_DEV = 0  # the stand-in family "runs" on device 0, named below, even without a GPU
FAKE_GPU = "Fake GPU 9000"
DEV = torch.cuda.current_device() if DEVICE == "cuda" else -1  # where the real families' kernels run


def _bench_factory(log):
    def make_bench(key, dev, dims):
        log.append(("bench", key, dims))
        return lambda: None

    return make_bench


def _kernel_v1():
    return "the kernel's body, version 1"


def _kernel_v2():
    return "the kernel's body, version 2"


def make_fake(name="fake", sources=(_kernel_v1,), baseline=None, candidates=None):
    log = []
    fields = ("BLOCK", "num_warps") + (("NATIVE",) if baseline is not None else ())

    def default(key, dev):
        return {"BLOCK": 1024, "num_warps": 4, **({"NATIVE": 0} if baseline is not None else {})}

    def cands(key, dev):
        if candidates is not None:
            return candidates
        return [{"BLOCK": b, "num_warps": w, **({"NATIVE": 0} if baseline is not None else {})}
                for b in (512, 1024, 2048) for w in (2, 4, 8)]

    t = at.Tunable(name, fields=fields, key_fields=("n_bucket", "dtype"), default=default, candidates=cands,
                   make_bench=_bench_factory(log), sources=sources, baseline=baseline)
    t.log = log
    return t


def score(cfg):
    """Deterministic µs of a config: best at BLOCK=2048, 8 warps (12 µs); the heuristic 1024 / 4 is 20 µs."""
    if cfg is None:  # the native contender
        return 15.0
    return 10.0 + abs(cfg["BLOCK"] - 2048) / 128 + abs(cfg["num_warps"] - 8) / 2


class Timer:
    """A fake timer: runs the candidate once (so a real kernel does run) and returns ``fn(config)``."""

    def __init__(self, fn=score, run=True):
        self.fn, self.run, self.calls = fn, run, []

    def __call__(self, run, cfg):
        if self.run:
            run()
        self.calls.append(cfg)
        return self.fn(cfg)


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A private cache folder, the ``on`` policy, no shipped tables, a fake GPU name for device 0 (CPU),
    no warning given yet."""
    monkeypatch.setenv("GEMS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("GEMS_AUTOTUNE", "on")
    monkeypatch.delenv("GEMS_AUTOTUNE_MARGIN", raising=False)
    monkeypatch.setattr(_common, "_WARNED", set())
    monkeypatch.setattr(cache, "_SHIPPED", {})
    monkeypatch.setattr(at, "_SHIPPED_DIR", str(tmp_path / "shipped"))
    names = dict(at._DEVICE_NAMES)
    monkeypatch.setattr(at, "_DEVICE_NAMES", {**names, FAKE_DEV: FAKE_GPU} if DEVICE == "cpu" else names)
    monkeypatch.setattr(at, "_interpreter", lambda: False)  # the policy as on a GPU (the fake bench needs none)
    at.clear_memory()
    yield tmp_path
    at.clear_memory()


KEY = (4096, torch.bfloat16)


def test_tune_stores_and_next_process_reads(env):
    t = make_fake()
    timer = Timer()
    with at.use_timer(timer):
        res = t.tune(KEY, FAKE_DEV)
    assert res.origin == "tuned" and res.config == {"BLOCK": 2048, "num_warps": 8}
    assert res.best_us == 10.0 and res.default_us == score({"BLOCK": 1024, "num_warps": 4})
    assert len(timer.calls) == 9 and timer.calls[0] == {"BLOCK": 1024, "num_warps": 4}  # the heuristic first
    rec = json.loads(open(res.path).read())
    assert rec["config"] == res.config and rec["key"] == at.key_text(KEY) and rec["device"] == t_name()
    # A "new process": the in-memory table is empty, the file answers, nothing is measured.
    t._table.clear()
    with at.use_timer(Timer(lambda c: pytest.fail("tuned again"))):
        assert t.lookup(KEY, FAKE_DEV) == (2048, 8)
    assert t.origin(KEY, FAKE_DEV).origin == "cache"


def t_name():
    return at.device_name(FAKE_DEV)


def test_hit_is_the_table(env):
    t = make_fake()
    with at.use_timer(Timer()):
        t.resolve(KEY, FAKE_DEV)
    assert t.chosen.get((FAKE_DEV, KEY)) == (2048, 8)  # what the launchers read: one dict lookup
    n = len(t.log)
    assert t.lookup(KEY, FAKE_DEV) == (2048, 8) and len(t.log) == n  # no bench built on a hit


def test_first_sight_policy_tunes_outside_capture_only(env, monkeypatch):
    t = make_fake()
    timer = Timer()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with at.use_timer(timer):
        assert t.resolve(KEY, FAKE_DEV) == (1024, 4)  # the heuristic, no measuring, no sync
    assert timer.calls == [] and t.log == []
    assert (FAKE_DEV, KEY) not in t._table  # decided again after the capture
    assert not os.path.exists(cache.entry_path(t, KEY, t_name()))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    with at.use_timer(timer):
        assert t.resolve(KEY, FAKE_DEV) == (2048, 8)
    assert len(timer.calls) == 9


def test_fake_tensor_traces_never_tune(env):
    """A launcher run on fake tensors (a pass under AOT autograd) gets the heuristic, untimed and
    not remembered: the first real call tunes the key (before, every candidate 'failed' on the
    fake tensors, each with a warning, and the key kept the heuristic for the process)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    t = make_fake()
    timer = Timer()
    with at.use_timer(timer), FakeTensorMode():
        assert t.resolve(KEY, FAKE_DEV) == (1024, 4)
    assert timer.calls == [] and t.log == [] and (FAKE_DEV, KEY) not in t._table
    with at.use_timer(timer):
        assert t.resolve(KEY, FAKE_DEV) == (2048, 8)
    assert len(timer.calls) == 9


def test_capture_reads_the_cache_but_never_tunes(env, monkeypatch):
    t = make_fake()
    with at.use_timer(Timer()):
        t.tune(KEY, FAKE_DEV)
    t._table.clear()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with at.use_timer(Timer(lambda c: pytest.fail("measured inside capture"))):
        assert t.resolve(KEY, FAKE_DEV) == (2048, 8)
        with pytest.raises(RuntimeError, match="capture"):
            t.tune((8, torch.bfloat16), FAKE_DEV)


def test_modes(env, monkeypatch):
    t = make_fake()
    with at.use_timer(Timer()):
        t.tune(KEY, FAKE_DEV)
    never = Timer(lambda c: pytest.fail("tuned"))
    monkeypatch.setenv("GEMS_AUTOTUNE", "off")  # heuristics only, the cache is not even read
    t._table.clear()
    with at.use_timer(never):
        assert t.resolve(KEY, FAKE_DEV) == (1024, 4)
    monkeypatch.setenv("GEMS_AUTOTUNE", "cache")  # the cache, never tuning
    t._table.clear()
    with at.use_timer(never):
        assert t.resolve(KEY, FAKE_DEV) == (2048, 8)
        assert t.resolve((64, torch.bfloat16), FAKE_DEV) == (1024, 4)  # not cached: heuristic
    monkeypatch.setenv("GEMS_AUTOTUNE", "on")
    timer = Timer()
    with at.use_timer(timer):
        assert t.resolve((128, torch.bfloat16), FAKE_DEV) == (2048, 8)
    assert timer.calls
    assert at.mode() == "on"
    monkeypatch.setenv("GEMS_AUTOTUNE", "sometimes")
    with pytest.warns(UserWarning, match="GEMS_AUTOTUNE"):
        assert at.mode() == "on"


def test_interpreter_never_tunes_on_first_sight(env, monkeypatch):
    t = make_fake()
    monkeypatch.setattr(at, "_interpreter", lambda: True)
    with at.use_timer(Timer(lambda c: pytest.fail("tuned"))):
        assert t.resolve(KEY, FAKE_DEV) == (1024, 4)
        assert t.resolve(KEY, -1) == (1024, 4)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_config", "other_source", "not_a_dict"])
def test_corrupt_or_stale_entry_is_tuned_again(env, damage, caplog):
    t = make_fake()
    path = cache.entry_path(t, KEY, t_name())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    good = dict(format=at.FORMAT, kernel=t.name, key=at.key_text(KEY), device=t_name(), triton=at.triton_version(),
                source=t.source_hash, config={"BLOCK": 512, "num_warps": 2})
    text = {
        "garbage": "\x00\xff not json",
        "truncated": json.dumps(good)[:40],
        "wrong_config": json.dumps(dict(good, config={"BLOCK": 333, "num_warps": 2})),  # not a candidate
        "other_source": json.dumps(dict(good, source="0123456789abcdef")),
        "not_a_dict": json.dumps([1, 2, 3]),
    }[damage]
    with open(path, "w", encoding="latin-1") as f:
        f.write(text)
    timer = Timer()
    with caplog.at_level("DEBUG", logger="flag_gems.kernels"), at.use_timer(timer):
        assert t.resolve(KEY, FAKE_DEV) == (2048, 8)
    assert len(timer.calls) == 9  # tuned again, no error
    assert json.loads(open(path).read())["config"] == {"BLOCK": 2048, "num_warps": 8}  # and repaired
    assert any(path in r.getMessage() or "not valid" in r.getMessage() for r in caplog.records)


def test_key_changes_with_the_kernel_source(env):
    v1, v2 = make_fake(sources=(_kernel_v1,)), make_fake(sources=(_kernel_v2,))
    assert v1.source_hash != v2.source_hash
    assert cache.entry_path(v1, KEY, FAKE_GPU) != cache.entry_path(v2, KEY, FAKE_GPU)
    with at.use_timer(Timer()):
        v1.tune(KEY, FAKE_DEV)
    timer = Timer()
    with at.use_timer(timer):
        assert v2.tune(KEY, FAKE_DEV).origin == "tuned"  # v1's file is not v2's
    assert timer.calls
    # The key, the device and the Triton version are part of the file's identity too.
    assert cache.entry_path(v1, KEY, FAKE_GPU) != cache.entry_path(v1, (4096, torch.float16), FAKE_GPU)
    assert cache.entry_path(v1, KEY, FAKE_GPU) != cache.entry_path(v1, KEY, "NVIDIA H100 80GB HBM3")


def test_real_families_hash_their_kernels():
    from flag_gems.kernels import act_and_mul, matmul, rms_norm, rotary_embedding

    assert act_and_mul._act_and_mul_fwd_kernel in act_and_mul.TUNABLE.sources
    assert rotary_embedding._rope_kernel in rotary_embedding.TUNABLE.sources
    assert rms_norm._rms_norm_fwd_kernel in rms_norm.TUNABLE.sources
    assert matmul._matmul_tma_kernel in matmul.TUNABLE.sources
    assert "def _rope_heads" in at.source_text(rotary_embedding._rope_heads)
    hashes = {t.source_hash for t in at.TUNABLES.values()}
    assert len(hashes) == len(at.TUNABLES)


def test_margin_keeps_the_heuristic(env, monkeypatch):
    near = make_fake(candidates=[{"BLOCK": 2048, "num_warps": 8}])
    with at.use_timer(Timer(lambda c: 10.0 if c["BLOCK"] == 1024 else 9.9)):  # 1 % better: noise
        assert near.tune(KEY, FAKE_DEV).config == {"BLOCK": 1024, "num_warps": 4}
    monkeypatch.setenv("GEMS_AUTOTUNE_MARGIN", "0")
    with at.use_timer(Timer(lambda c: 10.0 if c["BLOCK"] == 1024 else 9.9)):
        assert near.tune(KEY, FAKE_DEV, force=True).config == {"BLOCK": 2048, "num_warps": 8}


def test_failing_candidates_are_skipped(env):
    t = make_fake(name="fake_flaky")

    def flaky(cfg):
        if cfg["num_warps"] == 8:
            raise RuntimeError("out of resources: shared memory")
        return score(cfg)

    with at.use_timer(Timer(flaky)), pytest.warns(UserWarning, match="skipped, never chosen") as caught:
        res = t.tune(KEY, FAKE_DEV)
    assert res.config == {"BLOCK": 2048, "num_warps": 4}  # the best of those that ran
    errors = [e for _, us, e in res.trials if us is None]
    assert len(errors) == 3 and all("out of resources" in e for e in errors)
    mine = [str(w.message) for w in caught if "fake_flaky" in str(w.message)]
    assert len(mine) == 3 and all("'num_warps': 8" in m and "out of resources" in m for m in mine)
    # One warning per (kernel, config): tuning another key with the same failures says nothing new.
    import warnings

    with at.use_timer(Timer(flaky)), warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        assert t.tune((8, torch.bfloat16), FAKE_DEV).config["num_warps"] != 8
    assert not [w for w in again if "fake_flaky" in str(w.message)]


def test_every_candidate_failing_gives_the_heuristic_and_no_file(env):
    t = make_fake()
    with at.use_timer(Timer(lambda c: 1 / 0)), pytest.warns(UserWarning, match="never chosen") as caught:
        res = t.tune(KEY, FAKE_DEV)
    assert res.origin == "default" and res.config == {"BLOCK": 1024, "num_warps": 4}
    assert len([w for w in caught if "ZeroDivisionError" in str(w.message)]) == 9  # one per config
    assert not os.path.exists(cache.entry_path(t, KEY, t_name()))


def test_budget_stops_early(env):
    t = make_fake()

    def slow(cfg):
        time.sleep(0.05)
        return score(cfg)

    with at.use_timer(Timer(slow)):
        res = t.tune(KEY, FAKE_DEV, budget_s=0.01)
    assert 1 <= res.tried < 9
    assert res.trials[0][0] == {"BLOCK": 1024, "num_warps": 4}


def test_native_contender(env):
    t = make_fake(name="fake_native", baseline=lambda key, dev, dims: (lambda: None))
    with at.use_timer(Timer()):  # native 15 us vs our best 10 us
        assert t.tune(KEY, FAKE_DEV).config == {"BLOCK": 2048, "num_warps": 8, "NATIVE": 0}
    with at.use_timer(Timer(lambda c: 5.0 if c is None else score(c))):  # native 5 us
        res = t.tune((8, torch.bfloat16), FAKE_DEV)
    assert res.config == {"BLOCK": 2048, "num_warps": 8, "NATIVE": 1} and res.baseline_us == 5.0
    t._table.clear()
    assert t.lookup((8, torch.bfloat16), FAKE_DEV) == (2048, 8, 1)  # read back from the file


def test_unwritable_cache_is_a_warning_not_an_error(env, monkeypatch):
    blocker = env / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("GEMS_CACHE_DIR", str(blocker))
    t = make_fake()
    with at.use_timer(Timer()), pytest.warns(UserWarning, match="cannot write the cache"):
        res = t.tune(KEY, FAKE_DEV)
    assert res.path is None and t.lookup(KEY, FAKE_DEV) == (2048, 8)


def test_shipped_table(env):
    t = make_fake(name="fake_shipped")
    folder = env / "shipped"
    folder.mkdir()
    entry = dict(kernel=t.name, key=json.loads(at.key_text(KEY)), source=t.source_hash,
                 config={"BLOCK": 512, "num_warps": 2}, best_us=1.0, default_us=2.0, baseline_us=None)
    stale = dict(entry, key=json.loads(at.key_text((8, torch.bfloat16))), source="feedfacefeedface")
    doc = dict(format=at.FORMAT, device=t_name(), entries=[entry, stale])
    (folder / f"{at.device_slug(t_name())}.json").write_text(json.dumps(doc))
    timer = Timer()
    with at.use_timer(timer):
        assert t.resolve(KEY, FAKE_DEV) == (512, 2)  # shipped: no tuning
        assert timer.calls == []
        assert t.resolve((8, torch.bfloat16), FAKE_DEV) == (2048, 8)  # stale shipped entry: tuned
    assert t.origin(KEY, FAKE_DEV).origin == "shipped"
    # A user-cache entry wins over the shipped one.
    with at.use_timer(Timer()):
        t.tune(KEY, FAKE_DEV, force=True)
    t._table.clear()
    assert t.lookup(KEY, FAKE_DEV) == (2048, 8)


def test_cache_policy_takes_the_nearest_shipped_bucket(env, monkeypatch):
    """Under ``cache``, a row-wise family's key in no cache takes the shipped config of the nearest
    size bucket with otherwise the same key (valid for the key, current source), not the heuristic;
    ``on`` tunes it, ``off`` and families without ``nearest_bucket`` keep the heuristic."""
    t = make_fake(name="fake_nearest")
    t.nearest_bucket = True
    folder = env / "shipped"
    folder.mkdir()

    def entry(n, dtype, config, source=None):
        return dict(kernel=t.name, key=json.loads(at.key_text((n, dtype))), source=source or t.source_hash,
                    config=config, best_us=1.0, default_us=2.0, baseline_us=None)

    entries = [entry(64, torch.bfloat16, {"BLOCK": 512, "num_warps": 2}),
               entry(4096, torch.bfloat16, {"BLOCK": 2048, "num_warps": 8}),
               entry(1024, torch.float16, {"BLOCK": 512, "num_warps": 8}),  # another dtype: never a neighbour
               entry(2048, torch.bfloat16, {"BLOCK": 1024, "num_warps": 2}, source="feedfacefeedface"),  # stale
               entry(8192, torch.bfloat16, {"BLOCK": 999, "num_warps": 8})]  # not a candidate: skipped
    (folder / f"{at.device_slug(t_name())}.json").write_text(
        json.dumps(dict(format=at.FORMAT, device=t_name(), entries=entries)))
    never = Timer(lambda c: pytest.fail("tuned"))
    monkeypatch.setenv("GEMS_AUTOTUNE", "cache")
    with at.use_timer(never):
        assert t.resolve((2048, torch.bfloat16), FAKE_DEV) == (2048, 8)  # 4096 (1 step) beats 64 (5 steps)
        assert t.resolve((8, torch.bfloat16), FAKE_DEV) == (512, 2)  # 64: 3 steps, 4096: 9
        assert t.resolve((16384, torch.bfloat16), FAKE_DEV) == (2048, 8)  # 8192's config is invalid
        assert t.resolve((256, torch.float32), FAKE_DEV) == (1024, 4)  # no such dtype shipped: heuristic
    assert t.origin((2048, torch.bfloat16), FAKE_DEV).origin == "shipped nearest"
    monkeypatch.setenv("GEMS_AUTOTUNE", "off")
    t._table.clear()
    with at.use_timer(never):
        assert t.resolve((2048, torch.bfloat16), FAKE_DEV) == (1024, 4)
    t.nearest_bucket = False
    monkeypatch.setenv("GEMS_AUTOTUNE", "cache")
    t._table.clear()
    with at.use_timer(never):
        assert t.resolve((2048, torch.bfloat16), FAKE_DEV) == (1024, 4)


def test_row_wise_families_take_nearest_buckets():
    assert {n for n, t in at.TUNABLES.items() if t.nearest_bucket} == {"rms_norm", "act_and_mul", "layer_norm", "rope"}


def test_committed_shipped_tables_are_well_formed():
    folder = at._SHIPPED_DIR
    files = [f for f in os.listdir(folder) if f.endswith(".json")] if os.path.isdir(folder) else []
    for name in files:
        doc = json.loads(open(os.path.join(folder, name)).read())
        assert name == at.device_slug(doc["device"]) + ".json", name
        stale = set()
        for e in doc["entries"]:
            t = at.TUNABLES[e["kernel"]]
            assert set(e["config"]) == set(t.fields), (name, e)
            assert len(e["key"]) == len(t.key_fields), (name, e)
            if e["source"] != t.source_hash:
                stale.add(e["kernel"])
        # A stale entry is ignored at run time (each of its keys tuned again at first sight): a kernel
        # edit needs a re-tune on that GPU; a change that launches the same (a refactor of the candidate
        # generator, session 5) is re-stamped with benchmarks/restamp_tuned.py.
        assert not stale, f"{name}: entries of {sorted(stale)} were tuned for another source of their kernels"


def test_config_for(env):
    t = at.TUNABLES["act_and_mul"]
    cfg = at.config_for("act_and_mul", (4, 24, "float32"), device=-1)
    assert list(cfg) == list(t.fields)
    assert tuple(cfg.values()) == t.chosen.get((-1, (4, 24, torch.float32)))
    with pytest.raises(KeyError, match="no tunable kernel 'nope'"):
        at.config_for("nope", (1,))
    with pytest.raises(ValueError, match="expected a key of 3 values"):
        at.config_for("act_and_mul", (4, 24))


def _act_candidate_apart(am, key, differs=lambda c, default: True):
    """``act_and_mul``'s heuristic for ``key`` on the test device, after checking that the candidate
    space there holds a config apart from it (and ``differs(config, heuristic)``). On a GPU the
    column blocks start at 128, so a row of at most 64 columns has only the heuristic to try and
    tuning it keeps the heuristic: the keys below (100 columns) have a few candidates everywhere."""
    default = am._tune_default(key, DEV)
    assert any(c != default and differs(c, default) for c in am.TUNABLE.candidates(key, DEV)), (
        f"act_and_mul key {key}: no candidate apart from the heuristic {default} on device {DEV}")
    return default


def test_export_entries(env):
    from flag_gems.kernels import act_and_mul as am

    key = am.tune_key(3, 100, torch.float32)
    assert key == (4, 100, torch.float32)  # rows bucketed to a power of two
    default = _act_candidate_apart(am, key)
    with at.use_timer(Timer(lambda c: 2.0 if c == default else 1.0 + c["BLOCK_N"] / 1e3)):
        assert am.TUNABLE.tune(key, DEV).origin == "tuned"
    at.clear_memory()  # the export reads the files, not this process's table
    entries = [e for e in at.export_entries(DEV) if e["kernel"] == "act_and_mul"]
    assert len(entries) == 1 and entries[0]["key"] == [4, 100, "float32"]
    assert entries[0]["source"] == am.TUNABLE.source_hash and set(entries[0]["config"]) == set(am.TUNABLE.fields)
    # Round trip: the exported entry, as a shipped table, is what a user without a cache gets.
    name = at.device_name(DEV)
    folder = env / "shipped"
    folder.mkdir()
    (folder / f"{at.device_slug(name)}.json").write_text(json.dumps(dict(format=at.FORMAT, device=name,
                                                                          entries=entries)))
    cache._SHIPPED.clear()  # the tables are read once per process
    import shutil

    shutil.rmtree(env / "cache")
    assert entries[0]["config"] != default
    assert am.TUNABLE.lookup(key, DEV) == am.TUNABLE.as_tuple(entries[0]["config"])
    assert am.TUNABLE.origin(key, DEV).origin == "shipped"


# --------------------------------------------------------------------------- real families, interpreter


def _cpu_timer():
    """Deterministic: larger configs measure faster, by more than the margin (a non-heuristic candidate wins)."""
    return Timer(lambda c: 100.0 / (1 + sum(v for v in c.values() if isinstance(v, int))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tuned_act_and_mul_is_used_and_correct(env, dtype):
    from flag_gems.kernels import act_and_mul as am

    key = am.tune_key(3, 100, dtype)
    default = _act_candidate_apart(am, key, lambda c, d: c["num_warps"] != d["num_warps"])
    with at.use_timer(Timer(lambda c: 1.0 if c["num_warps"] != default["num_warps"] else 2.0)):
        res = am.TUNABLE.tune(key, DEV)
    assert res.origin == "tuned" and res.config != default and res.config["num_warps"] != default["num_warps"]
    a, b = rand(3, 100, dtype=dtype, device=DEVICE), rand(3, 100, dtype=dtype, device=DEVICE)
    out = poison(torch.empty_like(a))
    am.act_and_mul_fwd(a, b, "silu", out=out)
    assert am.TUNABLE.origin(key, DEV).origin == "tuned"  # the launcher looked up the tuned key
    ref = torch.nn.functional.silu(ref64(a)) * ref64(b)
    assert_close(out, ref, dtype, tag("silu_and_mul tuned", a.shape, dtype))


def _family_cases(big: bool = False, dtype=torch.float32):
    """family -> case() -> (tunable, key, call, float64 reference), at a tiny shape (the interpreter) or,
    with ``big``, at Llama-3-8B-like sizes (each GPU candidate at sizes where it matters)."""
    from flag_gems.kernels import act_and_mul as am
    from flag_gems.kernels import attention as ka
    from flag_gems.kernels import layer_norm as ln
    from flag_gems.kernels import pointwise as pw
    from flag_gems.kernels import reduction as rd
    from flag_gems.kernels import rms_norm as rn
    from flag_gems.kernels import rotary_embedding as rope

    rows, hidden, inter = (64, 4096, 14336) if big else (3, 40, 48)
    nq, nk, hd = (32, 8, 128) if big else (4, 2, 16)
    r = lambda *shape: rand(*shape, dtype=dtype, device=DEVICE)  # noqa: E731

    def act():
        x = r(rows, 2 * inter)
        ref = torch.nn.functional.silu(ref64(x)[:, :inter]) * ref64(x)[:, inter:]
        return am.TUNABLE, am.tune_key(rows, inter, x.dtype), lambda: am.act_and_mul_fused_fwd(x, "silu"), ref

    def norm():
        x, res, w = r(rows, hidden), r(rows, hidden), r(hidden)
        h = ref64(x) + ref64(res)
        ref = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * ref64(w)
        return (rn.TUNABLE, rn.tune_key(rows, hidden, x.dtype, True),
                lambda: rn.rms_norm_fwd(x, w, 1e-6, residual=res)[0], ref)

    def layer():
        x, w, b = r(rows, hidden), r(hidden), r(hidden)
        ref = torch.nn.functional.layer_norm(ref64(x), (hidden,), ref64(w), ref64(b), 1e-5)
        return ln.TUNABLE, ln.tune_key(rows, hidden, x.dtype), lambda: ln.layer_norm_fwd(x, w, b, 1e-5)[0], ref

    def rotary():
        q, k = r(rows, nq * hd), r(rows, nk * hd)
        pos = torch.randint(0, 64, (rows,), device=DEVICE)
        cache_ = rand(64, hd, device=DEVICE)
        c, s = ref64(cache_)[pos.cpu(), : hd // 2], ref64(cache_)[pos.cpu(), hd // 2:]

        def ref_rot(x, h):
            x = ref64(x).view(rows, h, hd)
            x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
            return torch.cat((x1 * c[:, None] - x2 * s[:, None], x2 * c[:, None] + x1 * s[:, None]), -1).view(rows, -1)

        ref = torch.cat((ref_rot(q, nq), ref_rot(k, nk)), -1)
        key = rope.tune_key(rows, nq, nk, hd // 2, hd, q.dtype, False, False, False)
        return rope.TUNABLE, key, lambda: torch.cat(rope.rope_cache_fwd(pos, q, k, hd, cache_, True), -1), ref

    def reduce():
        x = r(rows + 2, hidden + 30)
        return rd.TUNABLE, rd.tune_key(rows + 2, hidden + 30, x.dtype), lambda: rd.row_sum(x, hidden + 30), ref64(
            x).sum(-1)

    def attn():
        lq, lk = (128, 200) if big else (5, 7)
        q, k, v = (r(1, 2, n, hd) for n in (lq, lk, lk))
        s_ = (ref64(q) @ ref64(k).transpose(-1, -2)) / hd ** 0.5
        ref = torch.softmax(s_, -1) @ ref64(v)
        key = ka.tune_key(lq, lk, 2, max(16, hd), q.dtype, False, 0)
        return ka.TUNABLE, key, lambda: ka.flash_attention(q, k, v), ref

    def point():
        n = rows * hidden + 1
        a, b = r(n), r(n)
        return pw.TUNABLE, pw.tune_key(n), lambda: pw._build(pw.OPS["add"], (a, b), None, symbolic=False).run(
            (a, b), None), ref64(a) + ref64(b)

    return dict(act_and_mul=act, rms_norm=norm, layer_norm=layer, rope=rotary, reduction=reduce, attention=attn,
                pointwise=point)


@pytest.mark.parametrize("family", sorted(_family_cases()))
def test_every_interpreter_candidate_is_correct(family):
    tunable, key, call, ref = _family_cases()[family]()
    configs = [tunable.default(key, -1)] + tunable.candidates(key, -1)
    assert len(configs) >= 2, "each family offers the interpreter at least one candidate beside the heuristic"
    for cfg in configs:
        with tunable.forcing(cfg):
            out = call()
        assert_close(out, ref, torch.float32, tag(f"{family} {cfg}", tuple(out.shape), torch.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("family", sorted(_family_cases()))
def test_every_gpu_candidate_is_correct_gpu(family):
    """Every config the tuner may pick on this GPU (all of them: each must compile, fit the device and be
    right), at Llama-3-8B-like sizes, bf16, vs float64."""
    tunable, key, call, ref = _family_cases(big=True, dtype=torch.bfloat16)[family]()
    dev = torch.cuda.current_device()
    configs = [tunable.default(key, dev)] + tunable.candidates(key, dev)
    assert len(configs) >= 4, configs
    for cfg in configs:
        with tunable.forcing(cfg):
            out = call()
        assert_close(out, ref, torch.bfloat16, tag(f"{family} {cfg}", tuple(out.shape), torch.bfloat16))


ATTN_COMPILED = [  # (BLOCK_M, BLOCK_N, warps, stages, head block, mask kind, shared bytes): Triton 3.6, sm_90
    (128, 64, 8, 3, 128, 0, 196608), (128, 128, 8, 3, 128, 0, 294912), (128, 128, 8, 2, 128, 0, 229376),
    (64, 128, 4, 3, 128, 0, 245760), (16, 128, 8, 3, 128, 0, 200704), (64, 64, 8, 3, 128, 0, 180224),
    (128, 128, 4, 2, 128, 1, 294912), (128, 64, 8, 3, 128, 2, 262144), (128, 128, 8, 3, 64, 2, 376832),
    (32, 128, 8, 3, 128, 2, 237568), (64, 32, 4, 2, 64, 0, 40960), (16, 32, 4, 2, 64, 0, 26624),
]


def test_attention_candidates_fit_shared_memory(monkeypatch):
    """The attention family offers no config whose shared memory exceeds the device's (an H100/H200 here):
    the estimate bounds the compiled sizes from above, and pruning drops exactly the configs it rules out."""
    from flag_gems.kernels import attention as ka

    for bm, bn, w, st, d, mask, compiled in ATTN_COMPILED:
        assert ka.smem_estimate(bm, bn, w, st, d, 2, mask) >= compiled, (bm, bn, w, st, d, mask)
    limit = 232448
    monkeypatch.setitem(at._SMEM, 7, limit)  # a fake device 7 with the H100's limit
    monkeypatch.setitem(at._DEVICE_NAMES, 7, "NVIDIA H100 80GB HBM3")
    for mask in (0, 1, 2):
        key = ka.tune_key(128, 200, 2, 128, torch.bfloat16, False, mask)
        cands = ka.TUNABLE.candidates(key, 7)
        assert len(cands) >= 4
        assert all(ka.smem_estimate(c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"], 128, 2, mask) <= limit
                   for c in cands)
        default = ka.TUNABLE.default(key, 7)
        assert ka.smem_estimate(default["BLOCK_M"], default["BLOCK_N"], default["num_warps"], default["num_stages"],
                                128, 2, mask) <= limit
    key = ka.tune_key(128, 200, 2, 128, torch.bfloat16, False, 0)
    assert {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3} not in ka.TUNABLE.candidates(key, 7)
    assert {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3} in ka.TUNABLE.candidates(key, 7)
    monkeypatch.setitem(at._SMEM, 7, 1 << 30)  # no limit: the whole space
    assert {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3} in ka.TUNABLE.candidates(key, 7)


def test_tuning_a_real_family_end_to_end(env):
    """On the test device: tune, file written, a fresh table reads it, the launch uses it."""
    from flag_gems.kernels import rms_norm as rn

    key = rn.tune_key(3, 40, torch.float32, False)
    with at.use_timer(_cpu_timer()):
        res = rn.TUNABLE.tune(key, DEV)
    assert res.origin == "tuned" and os.path.exists(res.path)
    at.clear_memory()
    x, w = rand(3, 40, device=DEVICE), rand(40, device=DEVICE)
    y, _ = rn.rms_norm_fwd(x, w, 1e-6)
    assert rn.TUNABLE.origin(key, DEV).origin == "cache"
    ref = ref64(x) * torch.rsqrt(ref64(x).pow(2).mean(-1, keepdim=True) + 1e-6) * ref64(w)
    assert_close(y, ref, torch.float32, tag("rms_norm from cache", x.shape, torch.float32))


def test_a_failing_tuning_never_fails_the_call(env):
    t = make_fake(name="fake_broken")

    def broken(key, dev, dims):
        raise ValueError("cannot build inputs")

    t.make_bench = broken
    with at.use_timer(Timer()), pytest.warns(UserWarning, match="tuning .* failed"):
        assert t.resolve(KEY, FAKE_DEV) == (1024, 4)
    assert t.lookup(KEY, FAKE_DEV) == (1024, 4)  # remembered: not retried on every call
    with pytest.raises(ValueError, match="cannot build inputs"):  # explicit tuning reports it
        t.tune((8, torch.bfloat16), FAKE_DEV)


# ------------------------------------------------ the compile backend's policy (options["autotune"])

_PROBE = {}


@torch.library.custom_op("gems_autotune_test::probe", mutates_args=())
def _probe(x: torch.Tensor) -> torch.Tensor:
    """Resolves the stand-in family's key where a kernel launcher would, recording the config."""
    _PROBE["configs"].append(_PROBE["tunable"].resolve(KEY, FAKE_DEV))
    return x * 2


@_probe.register_fake
def _(x):
    return torch.empty_like(x)


@pytest.mark.parametrize("how,expect", [
    (dict(), "cache"),
    (dict(options={"autotune": "on"}), "on"),
    (dict(mode="max-autotune-no-cudagraphs"), "on"),
    (dict(options={"autotune": "off"}), "off"),
    (dict(env="off"), "off"),
], ids=["default", "option_on", "max_autotune", "option_off", "env_wins"])
def test_compiled_graphs_tune_by_the_backend_policy(env, monkeypatch, how, expect):
    """A compiled graph's first call does not wait for tuning unless asked (Inductor's contract:
    only max-autotune tunes); ``GEMS_AUTOTUNE`` set in the environment wins; outside compiled
    graphs the environment's default ("on", as FlagGems) holds."""
    monkeypatch.delenv("GEMS_AUTOTUNE")
    if "env" in how:
        monkeypatch.setenv("GEMS_AUTOTUNE", how["env"])
    t = make_fake()
    with at.use_timer(Timer()):
        t.tune((8, torch.bfloat16), FAKE_DEV)  # another key in the cache: "cache" reads, "off" does not
    t._table.clear()
    monkeypatch.setitem(_PROBE, "tunable", t)
    monkeypatch.setitem(_PROBE, "configs", [])
    torch._dynamo.reset()
    kw = {k: v for k, v in how.items() if k != "env"}
    f = torch.compile(lambda x: torch.ops.gems_autotune_test.probe(x) + 1, backend="flag_gems", **kw)
    x = rand(8, 16)
    timer = Timer()
    with at.use_timer(timer):
        out = f(x)
    assert_close(out, ref64(x) * 2 + 1, torch.float32, tag("autotune.policy_probe", x.shape, torch.float32))
    tuned, heuristic = (2048, 8), (1024, 4)
    assert _PROBE["configs"] == [tuned if expect == "on" else heuristic], (expect, _PROBE["configs"])
    assert bool(timer.calls) == (expect == "on")
    assert at.mode() == (how.get("env") or "on")  # outside the graph: unchanged
    torch._dynamo.reset()


def test_autotune_option_is_checked():
    from flag_gems.options import CompileOptions

    with pytest.raises(ValueError, match="'autotune' must be one of 'on', 'cache', 'off'"):
        CompileOptions.from_user(None, {"autotune": "sometimes"})
    assert CompileOptions.from_user("max-autotune", None).graph_autotune == "on"
    assert CompileOptions.from_user("reduce-overhead", None).graph_autotune == "cache"


def test_restamp_tool_only_restamps_valid_configs(tmp_path, monkeypatch):
    import sys

    from flag_gems.kernels import _common

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import restamp_tuned

    monkeypatch.setattr(_common, "_cuda_sms", lambda index: 132)  # heuristics of an H200, without one
    t = at.TUNABLES["act_and_mul"]
    good = {"kernel": "act_and_mul", "key": [4096, 14336, "bfloat16"], "source": "0" * 16,
            "config": {"BLOCK_M": 1, "BLOCK_N": 8192, "num_warps": 16}}
    other = {"kernel": "rms_norm", "key": [1, 4096, "bfloat16", True], "source": "1" * 16,
             "config": {"BLOCK_N": 4096, "num_warps": 8}}
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"format": 1, "device": "NVIDIA H200", "entries": [good, other]}))
    assert restamp_tuned.restamp(str(path), "act_and_mul") == 1
    entries = json.loads(path.read_text())["entries"]
    assert entries[0]["source"] == t.source_hash and entries[1]["source"] == "1" * 16  # only that family
    bad = dict(good, source="0" * 16, config={"BLOCK_M": 3, "BLOCK_N": 100, "num_warps": 16})
    path.write_text(json.dumps({"format": 1, "device": "NVIDIA H200", "entries": [bad]}))
    with pytest.raises(ValueError, match="re-tune"):
        restamp_tuned.restamp(str(path), "act_and_mul")


class _FakeReplays:
    """Replays of graphs of k calls costing ``fixed(i) + k * per`` µs, ``i`` counting the replays
    timed so far (a drifting ``fixed`` models clocks that ramp during the measurement)."""

    def __init__(self, per_us, fixed):
        self.per_us, self.fixed, self.timed, self.sizes = per_us, fixed, 0, []

    def make_replay(self, k):
        self.sizes.append(k)
        return lambda: k

    def time_us(self, fn, reps):
        out = []
        for _ in range(reps):
            out.append(self.fixed(self.timed) + fn() * self.per_us)
            self.timed += 1
        return out


@pytest.mark.parametrize("fixed_us, per_us, guess", [(30.0, 1.4, 8), (5.0, 0.2, 200), (20.0, 95.0, 4), (0.0, 3.0, 1)])
def test_per_call_timing_cancels_the_replays_fixed_cost(fixed_us, per_us, guess):
    # A replay of k calls costs fixed + k * per (its launch plus its kernels): the timer must
    # report per, however few calls the host-bound first guess put in a graph. The old timer
    # (one graph, time / n) read fixed / n + per: 30 / 8 + 1.4 = 5.15 us for a 1.4 us kernel.
    fake = _FakeReplays(per_us, lambda i: fixed_us)
    got = at.per_call_us(fake.make_replay, fake.time_us, guess, replay_us=400.0, max_calls=1000)
    assert got == pytest.approx(per_us, rel=1e-9)
    assert fake.sizes[-1] == 2 * fake.sizes[-2] and fake.sizes[-2] >= guess
    if guess * per_us < 100.0:  # a short first graph grows toward the 400 us replay
        assert fake.sizes[-2] > guess


def test_per_call_timing_pairs_the_replays_against_drift():
    # The fixed cost falling while the graphs are timed (clocks ramping up): timing all replays
    # of one graph, then all of the other, would read (twice - once) low by the drift; paired
    # replays in alternation see nearly the same fixed cost.
    fake = _FakeReplays(1.5, lambda i: 100.0 - 2.0 * i)
    got = at.per_call_us(fake.make_replay, fake.time_us, 8, replay_us=400.0, max_calls=1000, replays=5)
    n = fake.sizes[-2]
    assert got == pytest.approx(1.5 - 2.0 / n, rel=1e-9)  # one replay's drift over n, not replays' worth


def test_per_call_timing_falls_back_to_an_upper_bound_on_noise():
    # Noise can make the longer replay read no longer than the shorter one: the longer replay's
    # mean is reported then (an upper bound), never zero or a negative time.
    fake = _FakeReplays(0.0, lambda i: 60.0 - i)
    got = at.per_call_us(fake.make_replay, fake.time_us, 10, replay_us=400.0, max_calls=1000)
    assert got > 0.0
    assert got == pytest.approx(statistics.median([60.0 - i for i in range(3, 13, 2)]) / (2 * fake.sizes[-2]))
