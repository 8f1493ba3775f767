"""Host time of each line of a compiled graph's generated function: ours and Inductor's.

``cProfile`` cannot see the C++ callables our wrappers and Inductor's call (an ``OpOverload``'s
``_op``, a C++ runtime wrapper, a Triton launcher), and its per-call overhead inflates Python
launch paths several times over. This times lines instead: the wall clock between two line
events of the generated function is the cost of the first line, callees included. Only
the generated functions raise events (``sys.monitoring`` local events, Python >= 3.12;
``sys.settrace`` before that, which also costs every nested Python call a little), so the
rest of the program runs at full speed.

Which functions: ours are compiled from sources named ``<flag_gems wrapper ...>``
(``backend.py``); Inductor's are the ``call`` functions of the modules in its cache directory.

Usage (a library for ``profile_model.py --lines``)::

    timer = LineTimer(is_generated)
    with timer:
        for _ in range(n): fn()
    print(timer.report(n))
"""

from __future__ import annotations

import linecache
import re
import sys
import time
from collections import defaultdict

__all__ = ["LineTimer", "is_generated", "line_kind"]

_TOOL = 4  # sys.monitoring tool id (0-5; 0-2 and 5 are taken by debuggers, coverage, profilers)


def is_generated(code) -> bool:
    """A compiled graph's generated function: ours or Inductor's ``call``."""
    name = code.co_filename
    if name.startswith("<flag_gems wrapper"):
        return True
    return code.co_name == "call" and ("torchinductor" in name or "/inductor" in name)


_KINDS = [  # (kind, pattern on the line's text), first match wins
    ("del", re.compile(r"^\s*del\b")),
    ("triton launch", re.compile(r"\.run\(|\[\w*grid\w*\]\(|\.launch\(")),
    ("C++ runtime op", re.compile(r"\b_?cpp_\w+\(")),
    ("mm / GEMM", re.compile(r"\b_?(aten_)?(mm|addmm|bmm|linear|matmul)\w*\(|extern_kernels\.(mm|addmm|bmm)")),
    ("allocation", re.compile(r"empty|_strided_cuda|\bempty\(")),
    ("view (reinterpret)", re.compile(r"reinterpret")),
    ("view (method)", re.compile(r"\.(view|reshape|expand|permute|transpose|t|unsqueeze|squeeze|select|as_strided)\(")),
    ("attention", re.compile(r"scaled_dot|flash|efficient_attention|cudnn_attention|attention")),
    ("aten op", re.compile(r"\baten\w*\(|torch\.ops\.aten")),
    ("python op", re.compile(r"\w+\(")),
]


def line_kind(text: str) -> str:
    """The kind of work a generated line does, from its text (see ``_KINDS``)."""
    for kind, pat in _KINDS:
        if pat.search(text):
            return kind
    return "other"


class LineTimer:
    """Wall-clock µs per line of the functions ``select`` accepts, over the calls made inside ``with``.

    Args:
        select: ``code -> bool``; the functions whose lines are timed.
    """

    def __init__(self, select=is_generated):
        self.select = select
        self.total = defaultdict(float)  # (filename, line) -> seconds
        self.hits = defaultdict(int)
        self._codes = set()
        self._last = None  # (code, line, t)
        self._mon = getattr(sys, "monitoring", None)

    # -- sys.monitoring (3.12+)
    def _start(self, code, offset):
        if code not in self._codes:
            if not self.select(code):
                return self._mon.DISABLE
            self._codes.add(code)
            self._mon.set_local_events(_TOOL, code, self._mon.events.LINE | self._mon.events.PY_RETURN)
        self._last = None
        return None

    def _line(self, code, line):
        now = time.perf_counter()
        last = self._last
        if last is not None and last[0] is code:
            key = (code.co_filename, last[1])
            self.total[key] += now - last[2]
            self.hits[key] += 1
        self._last = (code, line, time.perf_counter())

    def _return(self, code, offset, retval):
        self._line(code, -1)
        self._last = None

    # -- sys.settrace (before 3.12)
    def _trace(self, frame, event, arg):
        if event != "call" or not self.select(frame.f_code):
            return None
        self._last = None

        def local(frame, event, arg):
            if event == "line":
                self._line(frame.f_code, frame.f_lineno)
            elif event == "return":
                self._line(frame.f_code, -1)
                self._last = None
            return local

        return local

    def __enter__(self):
        if self._mon is not None:
            m = self._mon
            m.use_tool_id(_TOOL, "gems line timer")
            m.register_callback(_TOOL, m.events.PY_START, self._start)
            m.register_callback(_TOOL, m.events.LINE, self._line)
            m.register_callback(_TOOL, m.events.PY_RETURN, self._return)
            m.set_events(_TOOL, m.events.PY_START)
        else:
            sys.settrace(self._trace)
        return self

    def __exit__(self, *exc):
        if self._mon is not None:
            m = self._mon
            m.set_events(_TOOL, 0)
            for code in self._codes:
                m.set_local_events(_TOOL, code, 0)
            for ev in (m.events.PY_START, m.events.LINE, m.events.PY_RETURN):
                m.register_callback(_TOOL, ev, None)
            m.free_tool_id(_TOOL)
        else:
            sys.settrace(None)
        return False

    def rows(self, calls: int) -> list[tuple[float, int, str, str]]:
        """``(µs per call, lines hit per call, kind, text)`` per line, the costliest first."""
        out = []
        for (filename, line), secs in self.total.items():
            text = linecache.getline(filename, line).strip() if line > 0 else "<return>"
            out.append((secs / calls * 1e6, self.hits[(filename, line)] // max(calls, 1), line_kind(text), text))
        out.sort(key=lambda r: -r[0])
        return out

    def report(self, calls: int, top: int = 25) -> str:
        """The costliest lines and the time by kind, per call."""
        rows = self.rows(calls)
        total = sum(r[0] for r in rows)
        by_kind = defaultdict(lambda: [0.0, 0])
        for us, n, kind, _ in rows:
            by_kind[kind][0] += us
            by_kind[kind][1] += n
        lines = [f"  generated code: {total:8.1f} us/call over {sum(r[1] for r in rows)} line executions"
                 " (timer overhead included: ~0.1-0.3 us per line)", "  by kind:"]
        for kind, (us, n) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
            lines.append(f"    {us:8.1f} us  {n:4d} lines  {us / max(n, 1):6.2f} us/line  {kind}")
        lines.append("  costliest lines:")
        for us, n, kind, text in rows[:top]:
            lines.append(f"    {us:8.1f} us  x{n:<3d} {kind:20s} {text[:120]}")
        return "\n".join(lines)
