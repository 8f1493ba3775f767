"""Options of the ``flag_gems`` torch.compile backend.

They arrive as ``torch.compile(m, backend="flag_gems", mode=..., options={...})``. An
unknown key or mode is a ``ValueError`` that lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any

from .kernels._autotune import POLICIES

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

FUSIONS = ("rms_norm", "act_and_mul", "rotary_embedding")


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """What the backend does with a graph.

    Attributes:
        strict: raise when a pass fails or a graph cannot be compiled, instead of warning
            and falling back to the unmodified graph (tests use it).
        dump_dir: write, per graph, the input and rewritten graphs and the report there
            (default: the ``GEMS_DUMP_DIR`` environment variable).
        cudagraphs: replay the compiled inference graph as CUDA graphs (``mode="reduce-overhead"``).
        inductor: hand the rewritten graph to Inductor for the rest, instead of running it as is.
        fusions: the pattern families to fuse (a subset of ``FUSIONS``).
        lower_aten: rewrite remaining aten nodes whose registry entry is on for graphs: its
            ``graph`` policy (device time) under ``cudagraphs``, else in a graph estimated
            host-bound its ``graph_host`` policy (host time per call counts too). ``"device"``:
            the ``graph`` policy always (a caller that replays the graph in its own CUDA
            graphs); ``"all"``: also the entries that are only on for the eager mode.
        max_autotune: with ``inductor``, let Inductor autotune (``mode="max-autotune"``); and
            our kernels tune missing keys at their first call (``autotune="on"``).
        fuse_pointwise: after autograd, group the remaining pointwise and indexing aten ops into
            generated Triton kernels (``passes.pointwise_fusion``). Off by default with
            ``lower_aten="all"``, which asks for one registry kernel per aten op.
        wrapper: run each compiled graph as one generated flat Python function that launches its
            kernels directly (``flag_gems.wrapper``), instead of the FX GraphModule's forward.
        autotune: the tuning policy of the compiled graphs' kernels (``kernels/_autotune.py``):
            ``"cache"`` (the default: the shipped table and the user's cache, else the heuristic;
            the first call never waits for tuning, as with Inductor's default mode), ``"on"``
            (tune missing keys at their first call; the default with ``mode="max-autotune"``) or
            ``"off"`` (heuristics only). ``GEMS_AUTOTUNE``, when set, wins. Kernels called outside
            compiled graphs (``enable()``, the public functions) keep ``GEMS_AUTOTUNE``'s default
            ``"on"``, as FlagGems tunes at run time; ``python -m flag_gems.pretune`` fills the cache.
        fuse_linear: in inference graphs, run the linears that read one input (q/k/v, gate/up) as
            one GEMM (``passes.linear_group``). Off by default because it moves the grouped
            weights, once, into one buffer each group (the parameters become views of it: same
            values and objects, no extra memory), which ``safetensors`` then refuses to save as
            separate tensors.
        precompile: before a CUDA graph's first run, compile the Triton kernels that run will
            launch in worker processes, in parallel, so that it finds them in Triton's disk cache
            instead of compiling them one after the other (``graph_precompile.py``, ``kernels/_precompile.py``).
            ``GEMS_PRECOMPILE=0`` turns it off too.
    """

    strict: bool = False
    dump_dir: str | None = None
    cudagraphs: bool = False
    inductor: bool = False
    fusions: tuple[str, ...] = FUSIONS
    lower_aten: bool | str = True
    max_autotune: bool = False
    fuse_pointwise: bool = True
    wrapper: bool = True
    autotune: str | None = None
    fuse_linear: bool = False
    precompile: bool = True

    @property
    def graph_autotune(self) -> str:
        """The tuning policy compiled graphs run under (see ``autotune``)."""
        return self.autotune or ("on" if self.max_autotune else "cache")

    @classmethod
    def from_user(cls, mode: str | None = None, options: dict[str, Any] | None = None) -> "CompileOptions":
        """Build options from ``torch.compile``'s ``mode`` and ``options``.

        Raises:
            ValueError: an unknown mode, option key, or fusion name.
            TypeError: an option of the wrong type.
        """
        if mode not in MODES:
            raise ValueError(f"flag_gems backend: unknown mode {mode!r}; valid modes: {', '.join(map(str, MODES[1:]))}")
        options = dict(options or {})
        valid = {f.name: f for f in dataclasses.fields(cls)}
        unknown = [k for k in options if k not in valid]
        if unknown:
            hints = {k: difflib.get_close_matches(k, valid, n=1) for k in unknown}
            detail = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
            raise ValueError(f"flag_gems backend: unknown option {detail}; valid options: {', '.join(valid)}")
        if "lower_aten" in options and options["lower_aten"] not in (True, False, "all", "device"):
            raise TypeError("flag_gems backend: option 'lower_aten' must be True, False, 'device' or 'all', "
                            f"got {options['lower_aten']!r}")
        if options.get("autotune") is not None and options["autotune"] not in POLICIES:
            raise ValueError(f"flag_gems backend: option 'autotune' must be one of {', '.join(map(repr, POLICIES))}, "
                             f"got {options['autotune']!r}")
        for key in ("strict", "cudagraphs", "inductor", "max_autotune", "fuse_pointwise", "wrapper", "fuse_linear",
                    "precompile"):
            if key in options and not isinstance(options[key], bool):
                raise TypeError(f"flag_gems backend: option {key!r} must be a bool, got {options[key]!r}")
        if "fusions" in options:
            fusions = tuple(options["fusions"])
            bad = [f for f in fusions if f not in FUSIONS]
            if bad:
                raise ValueError(f"flag_gems backend: unknown fusions {bad}; valid: {', '.join(FUSIONS)}")
            options["fusions"] = fusions
        if options.get("lower_aten") == "all":
            options.setdefault("fuse_pointwise", False)
        if mode == "reduce-overhead":
            options.setdefault("cudagraphs", True)
        if mode in ("max-autotune", "max-autotune-no-cudagraphs"):
            options.setdefault("max_autotune", True)
            options.setdefault("cudagraphs", mode == "max-autotune")
        options.setdefault("dump_dir", os.environ.get("GEMS_DUMP_DIR") or None)
        return cls(**options)
