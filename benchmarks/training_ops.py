"""Inventory: the aten ops one training step of each model runs, and which have no registry entry.

Builds Llama, Qwen2, Gemma, Mistral (``*ForCausalLM``) and BERT (``BertForMaskedLM``) from tiny
``transformers`` configs with random weights (2 layers, hidden 64, vocab 128, as
``tests/test_eager_models.py``), runs one training step (``model.train()``, forward with labels
-> loss, ``loss.backward()``) under a ``TorchDispatchMode`` that records every aten overload
called, forward and backward, and prints per model and attention implementation:

- the compute ops with no entry in ``flag_gems.lowerings.registry.REGISTRY`` (views and
  metadata ops, listed in ``_METADATA``, and pure allocations are not compute ops), with
  their call counts per phase, whether CUDA runs a kernel of their own or a composite
  (``native_functions.yaml``), and one example call;
- for composites without an entry (``CompositeExplicitAutograd``, e.g. ``slice_backward``,
  ``constant_pad_nd``, or an implicit one called below autograd): the ops they run underneath, which is what the eager mode sees on the
  GPU when the composite itself stays native; the ops left without an entry at that level;
- registered entries whose ``supports()`` refused some calls, with the reasons (the eager
  mode runs the native kernel for those);
- registered ops the mode cannot see (``CompositeImplicitAutograd``: decomposed above it).

Usage (CPU; the entries' ``supports()`` run on CPU tensors through Triton's interpreter)::

    python benchmarks/training_ops.py [--models llama bert] [--attn sdpa eager] [--out FILE]

The committed output is ``benchmarks/results/training_ops_cpu.txt``.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import io
import os
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before flag_gems: supports() accepts CPU tensors

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import flag_gems  # noqa: E402, F401  (fills the registry)
from flag_gems.lowerings.registry import REGISTRY  # noqa: E402

MODELS = ("llama", "qwen2", "gemma", "mistral", "bert")
ATTN = ("sdpa", "eager")

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
EXTRA = {"llama": {}, "qwen2": {}, "mistral": {}, "gemma": {"head_dim": 16}}
BERT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, type_vocab_size=2)
BATCH, SEQ = 2, 12

# Not compute: views and metadata-only ops (is_view covers view, t, transpose, expand, permute, slice,
# select, unsqueeze, squeeze, as_strided, detach, alias...; these return new tensors sharing storage
# or nothing computed), and pure allocations (their values come from a later fill_/copy_/kernel).
_METADATA = {"_unsafe_view.default", "lift_fresh.default", "_reshape_alias.default", "detach.default",
             "alias.default", "_local_scalar_dense.default"}
_ALLOC = {"empty.memory_format", "empty_strided.default", "empty_like.default", "new_empty.default",
          "new_empty_strided.default"}

_DK = torch._C.DispatchKey


def op_name(func) -> str:
    return f"{func._opname}.{func._overloadname}"


def kind(func) -> str:
    name = op_name(func)
    if func.is_view or name in _METADATA:
        return "view"
    if name in _ALLOC:
        return "alloc"
    return "compute"


def composite_key(func):
    """The composite kernel ``func`` runs on the CPU (no CPU kernel of its own), or None: it runs other aten
    ops, which a dispatch mode sees only when that kernel is called with the mode on."""
    name = func.name()
    if torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"):
        return None
    for key in ("CompositeExplicitAutograd", "CompositeImplicitAutograd"):
        if torch._C._dispatch_has_kernel_for_dispatch_key(name, key):
            return getattr(_DK, key)
    return None


_YAML = None


def cuda_kind(func) -> str:
    """What CUDA runs for ``func`` according to ``native_functions.yaml``: its own kernel, or a composite."""
    global _YAML
    if _YAML is None:
        import torchgen
        import yaml

        path = os.path.join(os.path.dirname(torchgen.__file__), "packaged", "ATen", "native", "native_functions.yaml")
        _YAML = {}
        try:
            with open(path) as f:
                for entry in yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
                    _YAML[entry["func"].split("(")[0]] = entry
        except OSError:
            pass
    key = func._opname if func._overloadname == "default" else op_name(func)
    entry = _YAML.get(key)
    if entry is None:
        return "?"
    if "structured_delegate" in entry:
        entry = _YAML.get(entry["structured_delegate"], entry)
    keys = {k.strip() for ks in (entry.get("dispatch") or {}) for k in ks.split(",")}
    if "CUDA" in keys:
        return "CUDA kernel"
    if "CompositeExplicitAutograd" in keys or "CompositeExplicitAutogradNonFunctional" in keys:
        return "composite"
    return "CPU-only" if "CPU" in keys else "?"


def _describe(v) -> str:
    if isinstance(v, torch.Tensor):
        dt = str(v.dtype).replace("torch.", "")
        layout = "" if v.is_contiguous() or v.numel() <= 1 else " strided"
        return f"{dt}{list(v.shape)}{layout}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_describe(x) for x in v) + "]"
    return repr(v)


def example(args, kwargs) -> str:
    parts = [_describe(a) for a in args] + [f"{k}={_describe(v)}" for k, v in kwargs.items()]
    text = ", ".join(parts)
    return text if len(text) <= 110 else text[:107] + "..."


class Recorder(TorchDispatchMode):
    """Counts every aten overload per phase; expands composites that have no entry; asks entries' supports()."""

    def __init__(self):
        super().__init__()
        self.phase = "fwd"
        self.calls = collections.Counter()  # (func, phase) -> top-level calls
        self.below = collections.defaultdict(collections.Counter)  # composite -> ops it ran
        self.leaf_calls = collections.Counter()  # (func, phase) -> calls inside expanded composites
        self.examples = {}
        self.asked = collections.Counter()  # func -> supports() calls
        self.refused = collections.defaultdict(collections.Counter)  # func -> reason -> count
        self._stack = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._stack:
            self.below[self._stack[-1]][func] += 1
            self.leaf_calls[(func, self.phase)] += 1
        else:
            self.calls[(func, self.phase)] += 1
        self.examples.setdefault(func, example(args, kwargs))
        entry = REGISTRY.get(func)
        if entry is not None:
            self.asked[func] += 1
            try:
                why = entry.supports(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001  (the eager mode falls back to native, with a warning)
                why = f"supports() raised {type(exc).__name__}: {exc}"
            if why is not None:
                self.refused[func][why] += 1
        elif kind(func) == "compute" and composite_key(func) is not None:
            self._stack.append(func)
            try:
                with self:  # the composite's own aten calls are recorded too
                    return func._op_dk(composite_key(func), *args, **kwargs)
            finally:
                self._stack.pop()
        return func(*args, **kwargs)


def build(model_type: str, attn: str):
    """(model in train mode, forward kwargs with labels)."""
    import transformers

    torch.manual_seed(0)
    ids = torch.randint(3, 128, (BATCH, SEQ))
    if model_type == "bert":
        cfg = transformers.BertConfig(**BERT, attn_implementation=attn)
        model = transformers.BertForMaskedLM(cfg)
        labels = torch.full_like(ids, -100)
        labels[:, ::4] = ids[:, ::4]  # masked-LM: a few positions carry a label, the rest are ignored
        mask = torch.ones_like(ids)
        mask[1, -3:] = 0  # padding
        inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    else:
        cfg = transformers.AutoConfig.for_model(model_type, **BASE, **EXTRA[model_type], attn_implementation=attn)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        inputs = dict(input_ids=ids, labels=ids)
    return model.train(), inputs


def record(model_type: str, attn: str) -> tuple[Recorder, float]:
    model, inputs = build(model_type, attn)
    rec = Recorder()
    with rec:
        loss = model(**inputs).loss
        rec.phase = "bwd"
        loss.backward()
    return rec, loss.item()


def _phases(counter, func) -> str:
    f, b = counter.get((func, "fwd"), 0), counter.get((func, "bwd"), 0)
    return " ".join(p for p in (f"fwd {f}" if f else "", f"bwd {b}" if b else "") if p)


def report(model_type: str, attn: str, rec: Recorder, loss: float, missing_all: dict) -> str:
    out = io.StringIO()
    funcs = sorted({f for f, _ in rec.calls}, key=op_name)
    n_fwd = sum(c for (f, p), c in rec.calls.items() if p == "fwd")
    n_bwd = sum(c for (f, p), c in rec.calls.items() if p == "bwd")
    compute = [f for f in funcs if kind(f) == "compute"]
    served = [f for f in compute if f in REGISTRY]
    missing = [f for f in compute if f not in REGISTRY]
    print(f"== {model_type}, attn_implementation={attn}: loss {loss:.4f}; {n_fwd} forward + {n_bwd} backward aten calls, "
          f"{len(funcs)} overloads ({len(compute)} compute, {len(served)} with an entry)", file=out)
    print("  compute ops without an entry:", file=out)
    if not missing:
        print("    (none)", file=out)
    for f in missing:
        print(f"    {op_name(f):<58} {_phases(rec.calls, f):<14} {cuda_kind(f):<12} e.g. ({rec.examples[f]})", file=out)
        missing_all.setdefault(op_name(f), set()).add(f"{model_type}/{attn}")
    expanded = sorted(rec.below, key=op_name)  # the composites above, and composites they ran
    if expanded:
        print("  composites without an entry, and what they run (what the eager mode sees below them):", file=out)
        for f in expanded:
            inner = ", ".join(f"{op_name(g)} x{c}" for g, c in sorted(rec.below[f].items(), key=lambda x: op_name(x[0])))
            print(f"    {op_name(f)} -> {inner}", file=out)
        leaves = sorted({g for (g, _p) in rec.leaf_calls if kind(g) == "compute" and g not in REGISTRY
                         and g not in rec.below}, key=op_name)
        top = [f for f in missing if f not in rec.below]
        left = sorted(set(top) | set(leaves), key=op_name)
        print("  left without an entry once composites are expanded: "
              + (", ".join(op_name(f) for f in left) if left else "(none)"), file=out)
    refused = sorted(rec.refused, key=op_name)
    if refused:
        print("  entries whose supports() refused calls (those run natively):", file=out)
        for f in refused:
            n = sum(rec.refused[f].values())
            for why, c in rec.refused[f].most_common(3):
                print(f"    {op_name(f):<40} {c}/{rec.asked[f]} calls: {why}", file=out)
            if len(rec.refused[f]) > 3:
                print(f"    {op_name(f):<40} ({n} refused in all)", file=out)
    skipped = sorted(op_name(f) for f in funcs if kind(f) != "compute")
    print(f"  not compute (views, metadata, allocations): {', '.join(skipped)}", file=out)
    return out.getvalue()


def _implicit_entries() -> list[str]:
    """Registered ops with no CPU kernel but a CompositeImplicitAutograd one: on the CPU they decompose
    before a dispatch mode sees them."""
    return sorted(op_name(t) for t in REGISTRY if composite_key(t) == _DK.CompositeImplicitAutograd)


# Why an op is left without an entry (the summary's last column).
WHY_LEFT = {
    "_scaled_dot_product_flash_attention_for_cpu.default": "CPU-only kernel; CUDA runs flash/efficient attention",
    "_scaled_dot_product_flash_attention_for_cpu_backward.default": "CPU-only kernel; CUDA runs flash/efficient "
                                                                    "attention's backward (native)",
    "_safe_softmax.default": "CPU math-sdpa path (masked rows to 0); runs softmax/where below (entries)",
    "bernoulli_.float": "RNG of the CPU dropout path; CUDA runs native_dropout (RNG: native) + its backward (entry)",
    "index.Tensor": "bool advanced indexing in transformers' mask construction (forward, [batch, seq]): not pointwise",
    "scalar_tensor.default": "a 0-d constant (the CPU builds it without dispatch; CUDA: empty + fill_, an entry)",
    "constant_pad_nd.default": "composite: fill_ + copy_ below (entries)",
    "ones_like.default": "composite: fill_ below (entry); the loss's seed gradient",
    "new_ones.default": "composite: fill_ below (entry)",
    "zeros.default": "composite: zero_ below (entry)",
    "slice_backward.default": "composite: zeros (zero_) + copy_ below (entries)",
}


def header() -> str:
    import transformers

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               cwd=here).stdout.strip()
        sha += " + uncommitted changes" if dirty else ""
    except OSError:
        sha = "?"
    implicit = ", ".join(_implicit_entries()) or "(none)"
    return f"""\
# Training-step aten inventory (benchmarks/training_ops.py): compute ops without a flag_gems registry entry
# {datetime.date.today()}  git {sha}  torch {torch.__version__}  transformers {transformers.__version__}  CPU, fp32
# Models: tiny configs, random weights (2 layers, hidden 64, vocab 128), batch {BATCH} x {SEQ} tokens, model.train();
# causal LMs: labels = input_ids (transformers' shifted cross-entropy, ignore_index -100 on the padded last
# position); BERT: BertForMaskedLM, labels on every 4th position (-100 elsewhere), one padded row, dropout 0.1.
# Recorded: every aten overload the forward (loss included) and loss.backward() dispatch, through a
# TorchDispatchMode (below autograd, so the backward's ops are aten ops too). The optimizer step is not included.
#
# What differs on the GPU (this run is the CPU's aten path):
# - attention: sdpa runs the CUDA flash / memory-efficient (or cuDNN) kernels and their backward
#   (_scaled_dot_product_flash_attention[_backward], _scaled_dot_product_efficient_attention[_backward])
#   instead of the CPU's _scaled_dot_product_flash_attention_for_cpu[_backward] or its math path (_safe_softmax,
#   bmm...); attn_implementation="eager" runs the same matmul/softmax ops on both devices.
# - dropout (BERT, p > 0 in training): CUDA runs the fused native_dropout / native_dropout_backward; the CPU runs
#   bernoulli_ + div_ + mul (dropout's CompositeImplicit path for non-CUDA tensors).
# - so on CUDA expect, beyond this list: native_dropout.default (RNG: left native), and the attention kernels
#   (forward ones are declared fallbacks; _scaled_dot_product_{{flash,efficient}}_attention_backward have no entry).
# - registered ops with no CPU kernel but a CompositeImplicitAutograd one decompose on the CPU before a dispatch
#   mode sees them (their decomposition is what is listed; CUDA may run them whole): {implicit}.
# "CUDA kernel" / "composite" is what CUDA registers for the op (native_functions.yaml); a composite without an
# entry runs the ops listed under it, which the eager mode may serve one by one.
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--attn", nargs="+", default=list(ATTN), choices=ATTN)
    parser.add_argument("--out", help="also write the report to this file")
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float32)
    parts = [header()]
    missing_all: dict = {}
    for attn in args.attn:
        for model_type in args.models:
            rec, loss = record(model_type, attn)
            parts.append(report(model_type, attn, rec, loss, missing_all))
    parts.append("== summary: compute ops without an entry, and the runs that call them")
    for name in sorted(missing_all):
        parts.append(f"  {name:<58} {', '.join(sorted(missing_all[name]))}")
        parts.append(f"  {'':<58} why: {WHY_LEFT.get(name, '?')}")
    text = "\n".join(parts) + "\n"
    sys.stdout.write(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
