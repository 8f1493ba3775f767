"""Replay a compiled inference graph as CUDA graphs (``mode="reduce-overhead"``).

For decode-sized inputs the GPU finishes each kernel faster than Python launches the
next, so a graph's time is its launch overhead. :class:`CUDAGraphRunner` records the
compiled function once per input signature (shapes, dtypes, devices, int arguments)
and replays it:

- static inputs (what AOT autograd reports, plus every ``nn.Parameter`` and input Dynamo
  marked static) are read where they live; every other input is copied into a static
  buffer before each replay;
- inputs the graph mutates (a KV cache updated in place) are copied back after replay
  when the caller's tensor is not the static buffer itself;
- outputs are cloned out of the graph's memory pool, so a later replay never overwrites
  a tensor the caller holds.

Anything else (CPU tensors, inputs needing grad, a capture that fails) runs the
function as it is. Without a CUDA device (a CPU-only build or machine) the backend
does not wrap the graph at all: :func:`cuda_graphs_available` says why, once, as a
Python warning, and the graph runs without CUDA graphs.
"""

from __future__ import annotations

import logging

import torch

from .kernels._common import warn_once

logger = logging.getLogger(__name__)

WARMUP_CALLS = 1


def cuda_graphs_available() -> bool:
    """True when CUDA graphs can be recorded in this process.

    Otherwise (torch built without CUDA, or no CUDA device) it warns once per process
    with a Python ``UserWarning`` that says what runs instead, and returns False.

    Returns:
        Whether a :class:`CUDAGraphRunner` can record anything here.
    """
    if torch.cuda.is_available():
        return True
    why = "this torch is built without CUDA" if not torch.backends.cuda.is_built() else "no CUDA device is visible"
    warn_once(("cudagraphs", "unavailable"),
              f"flag_gems: CUDA graphs (mode='reduce-overhead' or options={{'cudagraphs': True}}) need a CUDA "
              f"device, and {why}: compiled graphs run without CUDA graphs", UserWarning, stacklevel=2)
    return False


class _Recorded:
    def __init__(self, graph, static_inputs, static_outputs):
        self.graph = graph
        self.static_inputs = static_inputs
        self.static_outputs = static_outputs


class CUDAGraphRunner:
    """Boxed callable replaying ``fn`` (a boxed compiled graph) through CUDA graphs.

    Args:
        fn: the compiled graph, called as ``fn(list_of_args)``.
        static_indices: argument positions that keep their address across calls.
        mutated_indices: argument positions the graph writes in place.
    """

    _boxed_call = True

    def __init__(self, fn, static_indices=(), mutated_indices=()):
        self.fn = fn
        self.static = frozenset(static_indices)
        self.mutated = tuple(mutated_indices)
        self.recorded: dict = {}
        self.calls: dict = {}
        self.pool = None
        self.disabled_reason: str | None = None
        self.static_all: frozenset | None = None  # self.static + parameters, set at the first call
        # Argument positions by kind, set at the first call (one compiled graph always takes the
        # same kinds of arguments): static tensors, other tensors, non-tensors (SymInt values).
        self._static_pos: tuple = ()
        self._dynamic_pos: tuple = ()
        self._scalar_pos: tuple = ()

    def _static_positions(self, args) -> frozenset:
        """AOT autograd's static inputs plus every parameter and Dynamo-marked static input.

        AOT autograd does not always list the parameters that Dynamo lifts into graph
        inputs (measured on the 4-layer Llama benchmark: all 3.9 GB of weights were
        copied into static buffers before each replay). A parameter keeps its address
        between calls; the key holds that address, so a moved one records a new graph.
        """
        extra = {
            i for i, a in enumerate(args)
            if isinstance(a, torch.nn.Parameter) or getattr(a, "_dynamo_static_input_type", None) is not None
        }
        return self.static | frozenset(extra)

    def _positions(self, args) -> None:
        self.static_all = self._static_positions(args)
        tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        self._static_pos = tuple(i for i in tensors if i in self.static_all)
        self._dynamic_pos = tuple(i for i in tensors if i not in self.static_all)
        self._scalar_pos = tuple(i for i, a in enumerate(args) if not isinstance(a, torch.Tensor))

    def _key(self, args):
        """The recording's key: non-tensor arguments by value, static tensors by address, other
        tensors by shape, strides, dtype and device.

        A static tensor's shape, strides, dtype and device are not in the key: Dynamo's guards
        already fix them for the compiled graph (with dynamic shapes its sizes are among the
        SymInt arguments, keyed by value); its address is, so a moved parameter records anew.
        This is the per-call host cost of a replay, so it reads as little as it can.
        """
        if self.static_all is None:
            self._positions(args)
        return (
            tuple([args[i] for i in self._scalar_pos]),
            tuple([args[i].data_ptr() for i in self._static_pos]),
            tuple([(args[i].shape, args[i].stride(), args[i].dtype, args[i].device) for i in self._dynamic_pos]),
        )

    def _eligible(self, args) -> bool:
        if self.disabled_reason is not None:
            return False
        if self.static_all is None:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if not tensors:
                return False
        else:  # static tensors: their device is checked when a graph is recorded for their addresses
            tensors = [args[i] for i in self._dynamic_pos]
            if not self._dynamic_pos and not self._static_pos:
                return False
        # Device check first: torch.cuda's stream query raises in a CPU-only build.
        if any(t.device.type != "cuda" for t in tensors) or torch.cuda.is_current_stream_capturing():
            return False
        return not (torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args))

    def __call__(self, args):
        if not self._eligible(args):
            return self.fn(list(args))
        key = self._key(args)
        rec = self.recorded.get(key)
        if rec is None:
            n = self.calls.get(key, 0)
            self.calls[key] = n + 1
            if n < WARMUP_CALLS:
                return self.fn(list(args))
            try:
                rec = self._record(args)
            except Exception as e:  # a graph that cannot be captured runs eagerly from now on
                self.disabled_reason = f"CUDA graph capture failed: {e}"
                logger.warning("flag_gems: %s; running without CUDA graphs", self.disabled_reason)
                return self.fn(list(args))
            self.recorded[key] = rec
        static_inputs = rec.static_inputs
        for i in self._dynamic_pos:
            s, a = static_inputs[i], args[i]
            if s.data_ptr() != a.data_ptr():
                s.copy_(a)
        rec.graph.replay()
        for i in self.mutated:
            if args[i].data_ptr() != rec.static_inputs[i].data_ptr():
                args[i].copy_(rec.static_inputs[i])
        return [o.clone() if isinstance(o, torch.Tensor) else o for o in rec.static_outputs]

    def _record(self, args):
        if any(args[i].device.type != "cuda" for i in self._static_pos):
            raise RuntimeError("a static input is not on a CUDA device")
        static_inputs = [
            a if (not isinstance(a, torch.Tensor) or i in self.static_all) else a.clone() for i, a in enumerate(args)
        ]
        # No side-stream warm-up here: the same signature already ran eagerly (WARMUP_CALLS),
        # which compiled the kernels and created library handles; capture itself runs nothing,
        # so a graph that mutates its inputs mutates them once per replay only.
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            static_outputs = self.fn(list(static_inputs))
        logger.info("flag_gems: recorded a CUDA graph for %d inputs", len(args))
        return _Recorded(graph, static_inputs, list(static_outputs))
