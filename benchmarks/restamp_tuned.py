"""Re-stamp a shipped tuning table's entries of one family with the family's current source hash.

A shipped entry is ignored once its kernel family's source hash changes (``kernels/_tune_cache.py``),
which is right after a kernel edit and wrong after a change that leaves every launch the same (a
refactor of the candidate generator, a docstring): the table then silently stops serving, and each
key is tuned again at its first call. Use this only after such a change, when re-tuning on the GPU
is not possible; each entry's config must still be the heuristic or one of the candidates.
``tests/test_autotune.py`` fails while a committed table holds stale entries.

Usage::

    python3 benchmarks/restamp_tuned.py --family act_and_mul [--table kernels/tuned/NVIDIA_H200.json] [--sms 132]

``--sms``: the table's GPU's multiprocessor count, for heuristics that read it, when run without that GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import flag_gems  # noqa: F401  (registers every family)
from flag_gems.kernels import _autotune as at


def restamp(path: str, family: str) -> int:
    """Rewrite ``path`` with ``family``'s stale entries stamped with its current source hash.

    Returns:
        The number of entries re-stamped.

    Raises:
        KeyError: no such family.
        ValueError: a stale entry's config is no longer a valid config of its key.
    """
    tunable = at.TUNABLES[family]
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    changed = 0
    for e in doc["entries"]:
        if e["kernel"] != family or e["source"] == tunable.source_hash:
            continue
        key = at.key_from_json(e["key"])
        if not tunable._valid(e["config"], key, 0):
            raise ValueError(f"{family} {e['key']}: config {e['config']} is not a candidate any more; re-tune it")
        e["source"] = tunable.source_hash
        changed += 1
    if changed:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
    return changed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", required=True, choices=sorted(at.TUNABLES))
    p.add_argument("--table", default=os.path.join(at._SHIPPED_DIR, "NVIDIA_H200.json"))
    p.add_argument("--sms", type=int, default=None, help="the GPU's SM count when it is not this machine's")
    args = p.parse_args(argv)
    if args.sms is not None:
        from flag_gems.kernels import _common

        _common._cuda_sms = lambda index: args.sms
    n = restamp(args.table, args.family)
    print(f"{args.table}: {n} {args.family} entries re-stamped with source {at.TUNABLES[args.family].source_hash}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
