"""The ``flag_gems`` backend's graphs as serializable artifacts, for ahead-of-time compilation.

``torch.compile(fn, backend="flag_gems").aot_compile(...)`` (what vLLM's modes 1/2 do by
default with torch >= 2.10, ``VLLM_USE_AOT_COMPILE``) pickles the compiled function: AOT
autograd bundles the forward graph each compiler returned, which must then be an Inductor
``OutputCode``. Under that compilation the backend hands back its rewritten aten graph as
Inductor's ``RegionalOutputCode`` (a GraphModule serialized node by node with
``torch.fx._graph_pickler``): the ``torch.ops.flag_gems`` ops are saved by name, so a process
that loads the artifact needs ``import flag_gems`` first (vLLM's plugin does that in every
process). The graph keeps the dispatcher calls (no direct calls) and no CUDA-graph wrapper.

A torch without ``RegionalOutputCode`` cannot save such a graph: the compile then fails
with a message that names the setting to turn off.
"""

from __future__ import annotations

import torch

__all__ = ["precompiling", "serializable_graph"]


def precompiling() -> bool:
    """True while Dynamo compiles ahead of time (``aot_compile``): AOT autograd then bundles
    the compiled graphs into a saved artifact (the flags ``aot_compile_fullgraph`` sets)."""
    cfg = torch._functorch.config
    return bool(getattr(cfg, "bundled_autograd_cache", False) and getattr(cfg, "force_autograd_cache", False))


def _ops_filter(name: str) -> bool:
    # Any registered operator is saved by name (ours, aten, vLLM's): the loading process has them.
    return name.startswith("torch.ops.")


def serializable_graph(gm: torch.fx.GraphModule):
    """``gm`` as an ``OutputCode`` that AOT autograd can bundle and pickle.

    Args:
        gm: the compiled (rewritten) aten graph.

    Returns:
        An Inductor ``RegionalOutputCode`` running ``gm``.

    Raises:
        RuntimeError: this torch has no ``RegionalOutputCode``; the message says how to
            compile without saving (``VLLM_USE_AOT_COMPILE=0`` in vLLM).
    """
    try:
        from torch._inductor.output_code import RegionalOutputCode
    except ImportError as e:
        raise RuntimeError(
            f"flag_gems backend: torch {torch.__version__} cannot save a flag_gems graph in an ahead-of-time "
            "compiled artifact (no torch._inductor.output_code.RegionalOutputCode). Compile without saving: in "
            "vLLM set VLLM_USE_AOT_COMPILE=0 (on by default with torch >= 2.10); with torch.compile, call the "
            "compiled function instead of .aot_compile(); or use backend='inductor' with flag_gems.vllm_pass"
        ) from e
    code = RegionalOutputCode(gm, ops_filter=_ops_filter)
    code._time_taken_ns = 0  # AOT autograd's cache sums it on a hit (None breaks the sum)
    return code
