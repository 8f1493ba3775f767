"""Entries excluded from the eager mode's default set, each with the finding behind it.

``flag_gems.enable()`` / ``use_gems()`` register every registry entry, as FlagGems does: an
entry's ``supports`` sends every input its kernel does not take to the native kernel, so the
bar for the default set is correctness, not speed (``preset="fast"`` is the speed choice).
An entry goes here only when it gives a wrong result or breaks a caller for an input its
``supports`` accepts, until the kernel is fixed; ``include=[...]`` still reaches it.

Each record is data: the overload, what was observed, on which input, the test that shows
it, and the date. The registry turns a record into the entry's ``eager`` policy (off, with
this finding as its evidence), and ``describe()`` prints it.
"""

from __future__ import annotations

import dataclasses

__all__ = ["EXCLUSIONS", "Exclusion"]


@dataclasses.dataclass(frozen=True)
class Exclusion:
    """One correctness finding that keeps an entry out of the default set.

    Attributes:
        op: the aten overload, as ``str(aten.x.y)`` (``"aten.cat.default"``).
        finding: what goes wrong, one line.
        input: the input that shows it.
        test: the test (node id) that fails with the entry on.
        date: ``YYYY-MM-DD`` it was found.
    """

    op: str
    finding: str
    input: str
    test: str
    date: str

    def __str__(self) -> str:
        return f"{self.finding} ({self.input}; {self.test}, {self.date})"


EXCLUSIONS: tuple[Exclusion, ...] = ()
