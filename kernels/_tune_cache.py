"""The autotuner's persistent stores: the user cache (one file per key) and the shipped tables.

User cache layout (``cache_dir()``, see :mod:`._autotune`)::

    <root>/autotune/<device slug>/<kernel>-<hash>.json

``<hash>`` is a sha1 of (kernel, key, device name, Triton version, the kernel's source hash,
FORMAT), so a new Triton or an edited kernel never reads an old choice: it finds no file
and tunes again. A file holds one JSON record (the fields of :class:`._autotune.TuneResult`
plus those of the name), checked field by field when read. Writes go to a unique temporary
file in the same folder, then ``os.replace`` (atomic on POSIX and Windows): readers see the
old file or the new one, never a partial one, and concurrent writers of one key (tensor
parallel ranks tuning together) simply leave the last complete record. No locks, so none
can fail or go stale. Anything unreadable is ignored (DEBUG log) and tuned again; a
folder that cannot be written keeps the choices in memory with one warning.

Shipped tables: ``kernels/tuned/<device slug>.json``, one per device kind, written by
``benchmarks/bench_tune.py`` (``tuned_<device>.json`` in its ``--out``) from a tuning run on that
GPU and committed. Entries whose source hash differs from the kernel's current one are
ignored (the kernel changed since); the Triton version is not checked there (a config tuned
under another Triton beats a heuristic tuned on another card).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile

from . import _autotune as at

logger = logging.getLogger(__name__)

__all__ = ["entry_path", "export", "load", "read_shipped", "shipped", "store"]


def entry_path(tunable, key: tuple, dev_name: str) -> str:
    """Where the user cache keeps ``key`` of ``tunable`` for device ``dev_name``."""
    ident = json.dumps([tunable.name, at.key_text(key), dev_name, at.triton_version(), tunable.source_hash, at.FORMAT])
    digest = hashlib.sha1(ident.encode()).hexdigest()[:20]
    return os.path.join(at.cache_dir(), "autotune", at.device_slug(dev_name), f"{tunable.name}-{digest}.json")


def load(tunable, key: tuple, dev_name: str) -> dict | None:
    """The user cache's record for ``key``, or None (missing, unreadable, corrupt or stale: DEBUG log)."""
    path = entry_path(tunable, key, dev_name)
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        logger.debug("autotune cache: %s unreadable (%s); tuning again", path, exc)
        return None
    expect = dict(format=at.FORMAT, kernel=tunable.name, key=at.key_text(key), device=dev_name,
                  triton=at.triton_version(), source=tunable.source_hash)
    if not isinstance(rec, dict) or any(rec.get(k) != v for k, v in expect.items()):
        logger.debug("autotune cache: %s is stale or not ours (%s); tuning again", path,
                     {k: rec.get(k) if isinstance(rec, dict) else None for k in expect})
        return None
    rec["_path"] = path
    return rec


_WRITE_WARNED: set = set()


def store(tunable, key: tuple, dev_name: str, result) -> str | None:
    """Write ``result`` as the record of ``key`` atomically; returns the path, None when the folder is not writable."""
    path = entry_path(tunable, key, dev_name)
    rec = dict(
        format=at.FORMAT, kernel=tunable.name, key=at.key_text(key), device=dev_name, triton=at.triton_version(),
        source=tunable.source_hash, config=result.config, best_us=result.best_us, default_us=result.default_us,
        baseline_us=result.baseline_us, seconds=round(result.seconds, 4), tried=result.tried,
        trials=[[cfg, us, err] for cfg, us, err in result.trials], tuned_at=at.now_iso(), pid=os.getpid(),
    )
    folder = os.path.dirname(path)
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(rec, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path
    except OSError as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if folder not in _WRITE_WARNED:
            _WRITE_WARNED.add(folder)
            at._warn_once(("write", folder), f"flag_gems autotune: cannot write the cache in {folder} ({exc}); "
                          "tuned configs stay in this process only (set GEMS_CACHE_DIR to a writable folder)")
        return None


_SHIPPED: dict = {}  # device slug -> {(kernel, key text): record}


def read_shipped(dev_name: str, folder: str | None = None) -> dict:
    """The shipped table of device ``dev_name`` as ``{(kernel, key text): record}`` (empty when none)."""
    slug = at.device_slug(dev_name)
    if folder is None and slug in _SHIPPED:
        return _SHIPPED[slug]
    path = os.path.join(folder or at._SHIPPED_DIR, f"{slug}.json")
    table = {}
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        for e in doc.get("entries", []):
            table[(e["kernel"], json.dumps(e["key"], separators=(",", ":")))] = e
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        logger.warning("autotune: shipped table %s unreadable (%s); ignored", path, exc)
    if folder is None:
        _SHIPPED[slug] = table
    return table


def shipped(tunable, key: tuple, dev_name: str) -> dict | None:
    """The shipped record of ``key``, when it exists and was tuned from the kernel's current source."""
    rec = read_shipped(dev_name).get((tunable.name, at.key_text(key)))
    if rec is None:
        return None
    if rec.get("source") != tunable.source_hash:
        logger.debug("autotune: shipped %s %s was tuned for another kernel source; ignored", tunable.name, key)
        return None
    return rec


def export(dev_name: str) -> list:
    """Every record in the user cache for ``dev_name`` written by this Triton for the current source of a
    registered family, as shipped-table entries (unreadable or stale files are left out)."""
    folder = os.path.join(at.cache_dir(), "autotune", at.device_slug(dev_name))
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    out = []
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                rec = json.load(f)
            tunable = at.TUNABLES.get(rec.get("kernel"))
            if (tunable is None or rec.get("format") != at.FORMAT or rec.get("device") != dev_name
                    or rec.get("triton") != at.triton_version() or rec.get("source") != tunable.source_hash):
                continue
            out.append(dict(kernel=rec["kernel"], key=json.loads(rec["key"]), source=rec["source"], config=rec["config"],
                            best_us=rec.get("best_us"), default_us=rec.get("default_us"),
                            baseline_us=rec.get("baseline_us")))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            logger.debug("autotune export: %s skipped (%s)", name, exc)
    return sorted(out, key=lambda e: (e["kernel"], json.dumps(e["key"])))
