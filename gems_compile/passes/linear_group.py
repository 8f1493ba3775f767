"""Group the linears that read one input into one GEMM (``options={"fuse_linear": True}``).

Before / after, in the pre-dispatch aten graph (HF Llama, Qwen2, Mistral, Gemma attention and
gated MLP)::

    q = linear(h, wq); k = linear(h, wk); v = linear(h, wv)
 -> qkv = flag_gems.linear_group(h, [wq, wk, wv], []); q = qkv[..., :Nq]; k = qkv[..., Nq:Nq+Nk]; ...

The weights must lie back to back in memory for the group to be one GEMM
(``lowerings/linear_group.py``). Once, at the compiled graph's first call, each group's weights are
moved into one new buffer and the parameters pointed at their row blocks (``p.data = buf[a:b]``):
values, shapes, strides, dtypes and the ``Parameter`` objects stay as they were, and the memory
does not grow (each old storage is freed). vLLM's models hold such stacked weights already
(``QKVParallelLinear``, ``MergedColumnParallelLinear``); Inductor concatenates copies of them
under ``freezing``. Why at decode sizes it pays: the step reads every weight once, and three
GEMMs of ``N = 4096, 1024, 1024`` (plus cuBLAS's split-K reductions) read them more slowly than
one of ``N = 6144``.

The move is a visible side effect on the model, so the option is off by default: afterwards
the grouped parameters share one storage, which ``safetensors`` (``save_pretrained``) refuses
to save as separate tensors (save before compiling, or ``.clone()`` the state dict). A weight
re-assigned later (``p.data = other``) still gives right results: the op then runs one GEMM
per weight.

Grouped: two or more ``aten.linear`` nodes with the same input node whose weights (and biases,
all or none) are the model's parameters (graph inputs holding plain ``nn.Parameter`` s,
contiguous, of one dtype and device), each
the sole owner of its storage (or already stacked), when autograd is off at compile time
(inference: Dynamo then guards the graph on it), and at most ``MAX_ROWS`` rows of input (decode
sizes; larger GEMMs are faster apart). Left alone, with a note: anything else.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import fx

from ..lowerings.linear_group import stacked_rows
from .matching import set_fake_val, static_int, val

logger = logging.getLogger(__name__)

__all__ = ["group_linears", "stack_in_place", "stack_problem"]

aten = torch.ops.aten

_PLAIN = (torch.Tensor, torch.nn.Parameter)

# Rows (tokens) above which a group stays separate GEMMs. H200, bf16, K = 4096
# (benchmarks/bench_linear_group.py, 2026-12-03): one GEMM for q/k/v took 0.46-0.54x the time of
# three at 1-64 rows, gate/up 0.92-0.94x; at 2048 rows 1.06x and 1.02x (cuBLAS's kernels for
# the separate shapes win once the GEMMs are compute bound). Symbolic row counts are grouped
# (decode is where the gain is).
MAX_ROWS = 512


def _plain(t) -> bool:
    return type(t) in _PLAIN and not t.is_meta and t.layout == torch.strided


def _own_storage(t) -> bool:
    """``t`` is contiguous and alone in its storage (moving it leaves no other tensor behind)."""
    return (t.is_contiguous() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def stack_problem(tensors: list[torch.Tensor]) -> str | None:
    """Why :func:`stack_in_place` would leave ``tensors`` as they are, or None (stacked or movable)."""
    return None if stacked_rows(tensors) is not None else _move_problem(tensors)


def _move_problem(tensors: list[torch.Tensor]) -> str | None:
    """Why ``tensors`` (not stacked) cannot be moved into one buffer, or None."""
    if len({id(t) for t in tensors}) != len(tensors):
        return "the same tensor twice"
    first = tensors[0]
    for t in tensors:
        if not _plain(t):
            return f"a {type(t).__name__} (only plain tensors and Parameters are moved)"
        if t.dtype != first.dtype or t.device != first.device or t.shape[1:] != first.shape[1:]:
            return "dtypes, devices or trailing shapes differ"
        if not _own_storage(t):
            return "a tensor that shares its storage or is not contiguous"
    return None


def stack_in_place(tensors: list[torch.Tensor]) -> str | None:
    """Move ``tensors`` (each ``[N_i, *tail]``) back to back into one new buffer, in place.

    Each tensor becomes a view of its row block (``t.data = buf[a:b]``): same values, shape,
    strides, dtype, device and Python object. Nothing is moved when they are stacked already.

    Returns:
        None when the tensors are stacked afterwards, else why they are left as they are.
    """
    if stacked_rows(tensors) is not None:
        return None
    why = _move_problem(tensors)
    if why is not None:
        return why
    first = tensors[0]
    # Outside inference mode, or the buffer would be an inference tensor the model cannot use
    # outside it; without autograd, so that .data moves record nothing.
    with torch.inference_mode(False), torch.no_grad():
        buf = torch.empty((sum(t.shape[0] for t in tensors), *first.shape[1:]), dtype=first.dtype, device=first.device)
        row = 0
        for t in tensors:
            n = t.shape[0]
            buf[row:row + n].copy_(t)
            t.data = buf[row:row + n]
            row += n
    return None


def _linears(gm: fx.GraphModule):
    """``aten.linear`` nodes by (input node, has bias), in graph order."""
    groups: dict = {}
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is not aten.linear.default:
            continue
        x, w = n.args[0], n.args[1]
        b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        if not isinstance(w, fx.Node) or w.op != "placeholder":
            continue
        if b is not None and (not isinstance(b, fx.Node) or b.op != "placeholder"):
            continue
        groups.setdefault((x, b is not None), []).append((n, w, b))
    return [g for g in groups.values() if len(g) >= 2]


def group_linears(gm: fx.GraphModule, example_inputs, report) -> int:
    """Rewrite groups of linears of one input into ``flag_gems.linear_group`` and stack their weights.

    Args:
        gm: the pre-dispatch aten graph (placeholders in ``example_inputs``' order).
        example_inputs: the graph's real inputs (the model's parameters among them); the
            grouped weights among them are moved in place (module docstring) at the compiled
            graph's first call (``report.at_first_call``).
        report: the graph's report (matches under ``fused["linear_group"]``, the rest in notes).

    Returns:
        Number of groups rewritten.
    """
    if torch.is_grad_enabled():
        report.notes.append("fuse_linear: autograd is on (a training graph): linears left separate")
        return 0
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        report.notes.append("fuse_linear: graph inputs and example inputs differ in number: linears left separate")
        return 0
    real = dict(zip(placeholders, example_inputs))
    done, stacks = 0, []
    for group in _linears(gm):
        weights = [real[w] for _, w, _ in group]
        biases = [real[b] for _, _, b in group if b is not None]
        if not all(isinstance(t, torch.nn.Parameter) for t in weights + biases):
            # Tensors passed in by the caller may differ at every call, and moving them would move
            # the caller's data: only the model's parameters are stacked.
            report.notes.append(f"fuse_linear: {len(group)} linears of one input left separate: "
                                "weights that are not the model's parameters")
            continue
        x_val = val(group[0][0].args[0])
        if x_val is None or any(w.dim() != 2 or w.dtype != x_val.dtype for w in weights):
            report.notes.append("fuse_linear: a group with weights that are not 2-D or not of the input's dtype")
            continue
        rows = static_int(x_val.numel() // x_val.shape[-1]) if x_val.shape[-1] else None
        if rows is not None and rows > MAX_ROWS:
            report.notes.append(f"fuse_linear: {len(group)} linears of {rows} rows left separate "
                                f"(one GEMM per weight measured faster above {MAX_ROWS} rows)")
            continue
        why = stack_problem(weights) or (stack_problem(biases) if biases else None)
        if why is not None:
            report.notes.append(f"fuse_linear: {len(group)} linears of one input left separate: {why}")
            continue
        _rewrite(gm, group)
        report.fuse("linear_group", f"{len(group)}")
        stacks.append(weights)
        if biases:
            stacks.append(biases)
        done += 1
    if stacks:
        report.at_first_call.append(functools.partial(_stack_all, stacks, report))
    if done:
        gm.graph.eliminate_dead_code()
    return done


def _stack_all(stacks, report) -> None:
    """At the compiled graph's first call: stack each group's weights (not at compile time, where
    AOT autograd still reads the inputs' layouts as Dynamo saw them)."""
    for tensors in stacks:
        why = stack_in_place(tensors)
        if why is not None:  # changed since compile time: the op runs one GEMM per weight
            report.notes.append(f"fuse_linear: weights not stacked at the first call: {why}")
    stacks.clear()


def _rewrite(gm: fx.GraphModule, group) -> None:
    graph = gm.graph
    first = group[0][0]
    x = first.args[0]
    ws = [w for _, w, _ in group]
    bs = [b for _, _, b in group if b is not None]
    with graph.inserting_before(first):
        fused = graph.call_function(torch.ops.flag_gems.linear_group.default, (x, ws, bs))
    set_fake_val(fused, torch.ops.flag_gems.linear_group.default, x, ws, bs)
    col = 0
    for node, w, _ in group:
        n_out = val(w).shape[0] if val(w) is not None else None
        if n_out is None:
            n_out = w.meta["example_value"].shape[0]
        with graph.inserting_before(node):
            part = graph.call_function(aten.slice.Tensor, (fused, -1, col, col + n_out))
        set_fake_val(part, aten.slice.Tensor, fused, -1, col, col + n_out)
        node.replace_all_uses_with(part)
        graph.erase_node(node)
        col += n_out
