"""Merge tuned entries (``pretune --export`` output) into a shipped table.

Entries of the exported file replace the table's entries of the same kernel and key; the
table's other entries and its header stay. Use it to re-tune some keys of a shipped table
(after a change to the tuner's timer, say) without re-tuning all of them.

Usage::

    python3 benchmarks/merge_tuned.py --into kernels/tuned/NVIDIA_H200.json tuned_small.json [...]
"""

from __future__ import annotations

import argparse
import json
import sys


def merge(table: dict, exported: list[dict]) -> tuple[int, int]:
    """Merge ``exported`` entries into ``table`` (a shipped-table document) in place.

    Returns:
        (replaced, added) entry counts.

    Raises:
        ValueError: an exported entry was tuned on another device than the table's.
    """
    index = {(e["kernel"], json.dumps(e["key"])): i for i, e in enumerate(table["entries"])}
    replaced = added = 0
    for e in exported:
        k = (e["kernel"], json.dumps(e["key"]))
        if k in index:
            table["entries"][index[k]] = e
            replaced += 1
        else:
            index[k] = len(table["entries"])
            table["entries"].append(e)
            added += 1
    table["entries"].sort(key=lambda e: (e["kernel"], json.dumps(e["key"])))
    return replaced, added


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--into", required=True, help="the shipped table to update")
    p.add_argument("exports", nargs="+", help="files written by `python -m flag_gems.pretune --export`")
    args = p.parse_args(argv)
    with open(args.into, encoding="utf-8") as f:
        table = json.load(f)
    for path in args.exports:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if doc.get("device") != table.get("device"):
            print(f"merge_tuned: {path} was tuned on {doc.get('device')!r}, the table is for {table.get('device')!r}",
                  file=sys.stderr)
            return 2
        replaced, added = merge(table, doc["entries"])
        print(f"merge_tuned: {path}: {replaced} replaced, {added} added")
    with open(args.into, "w", encoding="utf-8") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
