"""The autotune cache under concurrency: 8 processes tune the same keys at once (tensor-parallel
ranks starting together), on the CPU, with a deterministic fake timer.

The workers are fresh interpreters (the ``spawn`` start method, as with CUDA: a process that has
initialized CUDA, such as a pytest worker on a GPU machine, cannot fork workers that use it) that
see no GPU (``CUDA_VISIBLE_DEVICES`` empty): the stand-in family runs on a named fake device.

Each worker waits at a barrier, tunes every key (forcing a measurement, so all 8 write every
file) and after each key parses every file that exists (never a partial one), then drops its in-memory table and reads every key back from the files. Nothing may
raise; every file must be one complete, valid record; every process must read the config the
fake timer makes best; no temporary file may be left behind.
"""

import json
import multiprocessing as mp
import os
import random
import time

import pytest
import torch

from flag_gems.kernels import _autotune as at
from flag_gems.kernels import _tune_cache as cache

N_PROCS = 8
BARRIER_S = 300  # fresh interpreters import torch at once: slow on a small shared machine
KEYS = [(1 << i, torch.bfloat16) for i in range(6)]
DEV = 0
GPU = "Fake GPU 9000"


def _family():
    return at.Tunable(
        "concurrency_fake",
        fields=("BLOCK", "num_warps"),
        key_fields=("n_bucket", "dtype"),
        default=lambda key, dev: {"BLOCK": 1024, "num_warps": 4},
        candidates=lambda key, dev: [{"BLOCK": b, "num_warps": w} for b in (512, 1024, 2048) for w in (2, 4, 8)],
        make_bench=lambda key, dev, dims: (lambda: None),
    )


def _best(key):
    """The config the fake timer ranks first for ``key`` (differs per key)."""
    return {"BLOCK": (512, 1024, 2048)[key[0] % 3], "num_warps": (2, 4, 8)[key[0] % 5 % 3]}


def _worker(rank, barrier, queue, cache_root):
    try:
        os.environ["GEMS_CACHE_DIR"] = cache_root
        os.environ["GEMS_AUTOTUNE"] = "on"
        at._DEVICE_NAMES[DEV] = GPU
        rng = random.Random(rank)
        fam = _family()

        def timer(run, cfg):
            run()
            time.sleep(rng.uniform(0, 0.004))  # interleave the writers
            best = _best(current[0])
            return 1.0 if cfg == best else 2.0 + rng.random()

        current = [None]
        barrier.wait(timeout=BARRIER_S)  # every worker has imported torch and flag_gems: start together
        paths = [cache.entry_path(fam, key, GPU) for key in KEYS]
        with at.use_timer(timer):
            for key in KEYS:
                current[0] = key
                fam.tune(key, DEV, force=True)
                for path in paths:  # while others write: a file that exists is always complete
                    try:
                        with open(path) as f:
                            rec = json.load(f)
                    except FileNotFoundError:
                        continue
                    assert rec["kernel"] == "concurrency_fake" and "config" in rec, path
        barrier.wait(timeout=BARRIER_S)  # every process has written every key
        fam._table.clear()
        with at.use_timer(lambda run, cfg: (_ for _ in ()).throw(AssertionError("tuned again"))):
            read = [fam.as_dict(fam.lookup(key, DEV)) for key in KEYS]
            origins = [fam.origin(key, DEV).origin for key in KEYS]
        queue.put((rank, read, origins, None))
    except BaseException as exc:  # noqa: BLE001 - report to the parent
        queue.put((rank, None, None, f"{type(exc).__name__}: {exc}"))


def test_eight_processes_tune_the_same_keys(tmp_path, monkeypatch):
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(N_PROCS)
    queue = ctx.Queue()
    root = str(tmp_path / "cache")
    procs = [ctx.Process(target=_worker, args=(r, barrier, queue, root)) for r in range(N_PROCS)]
    with monkeypatch.context() as m:  # what the workers inherit: no GPU, Triton's interpreter
        m.setenv("CUDA_VISIBLE_DEVICES", "")
        m.setenv("TRITON_INTERPRET", "1")
        for p in procs:
            p.start()
    try:
        results = [queue.get(timeout=2 * BARRIER_S) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    errors = [(r, e) for r, _, _, e in results if e is not None]
    assert not errors, errors
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    for rank, read, origins, _ in results:
        assert read == [_best(k) for k in KEYS], f"rank {rank} read {read}"
        assert origins == ["cache"] * len(KEYS)
    fam = _family()
    folder = os.path.join(root, "autotune", at.device_slug(GPU))
    names = sorted(os.listdir(folder))
    assert not [n for n in names if n.endswith(".tmp")], names  # no temporary file left
    assert len(names) == len(KEYS)
    monkeypatch.setenv("GEMS_CACHE_DIR", root)
    writers = set()
    for key in KEYS:
        path = cache.entry_path(fam, key, GPU)
        rec = json.loads(open(path).read())  # one complete record
        assert rec["config"] == _best(key) and rec["key"] == at.key_text(key) and rec["tried"] == 9
        writers.add(rec["pid"])
    assert writers <= {p.pid for p in procs}
