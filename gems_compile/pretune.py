"""Pre-tuning and warm-up: tune the kernels a model will run, before it serves.

``python -m flag_gems.pretune`` (FlagGems' ``examples/pretune.py`` arguments)::

    python -m flag_gems.pretune --model llama --dtype bfloat16 --max_tokens 16384 --max_reqs 1024
    python -m flag_gems.pretune --model-config path/to/config.json --tp 2     # an HF config.json
    python -m flag_gems.pretune --shapes my_shapes.json --max_tokens 4096     # explicit shapes
    python -m flag_gems.pretune --model qwen --dry-run                        # list the keys only

For each op of the model (GEMMs of the projections and the logits, (add +) RMSNorm, SiLU·mul,
RoPE; attention, pointwise, reductions with ``--ops``) and each token-count bucket (powers of
two up to ``--max_tokens``; the logits GEMM up to ``--max_reqs``, the rows a server computes
logits for), the autotuner's key is tuned on the current GPU and written to the cache
(``$GEMS_CACHE_DIR``, default ``~/.cache/flag_gems``) that every later process reads. Keys
already cached are skipped (``--force`` tunes them again). A progress bar goes to stderr, a
summary (keys tuned, time, cache path) to stdout.

``flag_gems.warmup(model_or_shapes, tokens=...)`` does the same in-process for a model name,
an HF model or config, or a shapes file, then launches each kernel once with its chosen
config, so neither tuning nor compilation happens in a served request or inside a CUDA-graph
capture. Serving frameworks that warm up before capturing graphs (vLLM's dummy runs) need
nothing: under the default ``GEMS_AUTOTUNE=on`` a key is tuned the first time it is seen
outside a capture, and inside a capture the heuristic runs without a sync.

Shapes file (JSON)::

    {"dtype": "bfloat16",                                  # optional
     "model": {"hidden": 4096, "intermediate": 14336, "n_heads": 32, "n_kv_heads": 8,
               "head_dim": 128, "vocab": 128256, "qkv_bias": false},   # a model, or / and:
     "shapes": [
       {"op": "mm", "n": 6144, "k": 4096, "m": [1, 16, 128], "bias": false},   # m: default buckets
       {"op": "rms_norm", "n_cols": 4096, "residual": true},
       {"op": "act_and_mul", "d": 14336},
       {"op": "rope", "n_q_heads": 32, "n_kv_heads": 8, "head_dim": 128, "layout": "vllm"},
       {"op": "attention", "n_heads": 32, "head_dim": 128},
       {"op": "layer_norm", "n_cols": 1024}, {"op": "pointwise", "n_cols": 4096},
       {"op": "reduction", "n_cols": 4096}]}

Upstream's form ``{"mm": [[N, K], ...]}`` is read too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time

import torch

logger = logging.getLogger(__name__)

__all__ = ["MODELS", "ModelShapes", "WorkItem", "plan", "plan_shapes", "run", "warmup", "main"]

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
          "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_OPS = ("mm", "rms_norm", "act_and_mul", "rope")
ALL_OPS = ("mm", "rms_norm", "act_and_mul", "rope", "attention", "layer_norm", "pointwise", "reduction")


@dataclasses.dataclass(frozen=True)
class ModelShapes:
    """The sizes of a decoder-only transformer that decide its kernels' shapes."""

    name: str
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    qkv_bias: bool = False
    rotary_dim: int | None = None  # None: head_dim (full rotary)

    def sharded(self, tp: int) -> ModelShapes:
        """Per-rank shapes under tensor parallelism ``tp`` (vLLM's column/row split of the projections,
        heads and vocabulary; kv heads replicated when fewer than ``tp``)."""
        if tp == 1:
            return self
        for what, v in (("n_heads", self.n_heads), ("intermediate", self.intermediate), ("vocab", self.vocab)):
            if v % tp:
                raise ValueError(f"tp: {tp} does not divide {self.name}'s {what} ({v})")
        return dataclasses.replace(self, name=f"{self.name} tp={tp}", intermediate=self.intermediate // tp,
                                   n_heads=self.n_heads // tp, n_kv_heads=max(1, self.n_kv_heads // tp),
                                   vocab=self.vocab // tp)


MODELS = {
    "llama3-8b": ModelShapes("Llama-3-8B", 4096, 14336, 32, 8, 128, 128256),
    "llama3-70b": ModelShapes("Llama-3-70B", 8192, 28672, 64, 8, 128, 128256),
    "qwen2.5-7b": ModelShapes("Qwen2.5-7B", 3584, 18944, 28, 4, 128, 152064, qkv_bias=True),
    "mistral-7b": ModelShapes("Mistral-7B-v0.3", 4096, 14336, 32, 8, 128, 32768),
    "deepseek-7b": ModelShapes("DeepSeek-LLM-7B", 4096, 11008, 32, 32, 128, 102400),
    "tiny": ModelShapes("tiny (tests)", 64, 96, 4, 2, 16, 256),
}
ALIASES = {"llama": "llama3-8b", "qwen": "qwen2.5-7b", "mistral": "mistral-7b", "deepseek": "deepseek-7b"}


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One key of one tunable family, with the sizes its bench uses and a label for the progress bar."""

    kernel: str
    key: tuple
    dims: tuple = ()  # sorted (name, value) pairs: the bench's sizes (the key's representative ones when empty)
    label: str = ""


def buckets(hi: int, lo: int = 1) -> list:
    """Powers of two from ``lo`` up to the first one >= ``hi`` (the token-count buckets of the keys)."""
    out, m = [], 1
    while m < lo:
        m *= 2
    while True:
        out.append(m)
        if m >= hi:
            return out
        m *= 2


def _item(kernel, key, label, **dims):
    return WorkItem(kernel, key, tuple(sorted(dims.items())), label)


def plan_shapes(entries: list, *, dtype: torch.dtype, m_tokens: list, dev: int) -> list:
    """Work items of explicit shape entries (the ``shapes`` list of a shapes file).

    Raises:
        ValueError: an entry without its sizes, or an unknown op.
    """
    from .kernels import act_and_mul as am
    from .kernels import attention as ka
    from .kernels import layer_norm as ln
    from .kernels import matmul as km
    from .kernels import pointwise as pw
    from .kernels import reduction as rd
    from .kernels import rms_norm as rn
    from .kernels import rotary_embedding as re_

    items = []
    for e in entries:
        try:
            op = e["op"]
            ms = [int(m) for m in e.get("m", m_tokens)]
            if op in ("mm", "addmm", "linear"):
                n, k = int(e["n"]), int(e["k"])
                bias = bool(e.get("bias", op == "addmm"))
                kmajor = e.get("weight_layout", "nk") == "nk"  # nn.Linear's [N, K] weight
                for m in ms:
                    tma = km.tma_possible(1, m, n, k, dtype, dev)
                    items.append(_item("matmul", km.shape_key(1, m, n, k, dtype, bias, kmajor, tma),
                                       f"mm m={m} n={n} k={k}" + (" +bias" if bias else ""), m=m, n=n, k=k, batch=1))
            elif op == "rms_norm":
                n_cols, res = int(e["n_cols"]), bool(e.get("residual", True))
                items += [_item("rms_norm", rn.tune_key(m, n_cols, dtype, res),
                                f"{'add_' if res else ''}rms_norm m={m} n={n_cols}", n_rows=m) for m in ms]
            elif op == "layer_norm":
                n_cols = int(e["n_cols"])
                items += [_item("layer_norm", ln.tune_key(m, n_cols, dtype), f"layer_norm m={m} n={n_cols}", n_rows=m)
                          for m in ms]
            elif op == "act_and_mul":
                d = int(e["d"])
                items += [_item("act_and_mul", am.tune_key(m, d, dtype), f"silu_and_mul m={m} d={d}", n_rows=m)
                          for m in ms]
            elif op == "rope":
                nq, nk, hd = int(e["n_q_heads"]), int(e["n_kv_heads"]), int(e["head_dim"])
                rot = int(e.get("rotary_dim") or hd)
                layouts = {"vllm": (False,), "hf": (True,), "both": (False, True)}[e.get("layout", "both")]
                for full in layouts:
                    items += [_item("rope", re_.tune_key(m, nq, nk, rot // 2, hd, dtype, False,
                                                         bool(e.get("interleaved", False)), full),
                                    f"rope[{'hf' if full else 'vllm'}] m={m} q{nq}/k{nk}x{hd}", n_tokens=m)
                              for m in ms]
            elif op == "attention":
                nh, hd = int(e["n_heads"]), int(e["head_dim"])
                block_d = max(16, 1 << (hd - 1).bit_length())
                for m in (x for x in ms if x >= 16):  # prefill: causal, m tokens against m keys
                    items.append(_item("attention", ka.tune_key(m, m, nh, block_d, dtype, True, 0),
                                       f"attention prefill m={m} h={nh}x{hd}", seq_q=m, seq_k=m, heads=nh, head_dim=hd))
                for s in (x for x in ms if x >= 256):  # decode: one query row against s keys
                    items.append(_item("attention", ka.tune_key(1, s, nh, block_d, dtype, False, 0),
                                       f"attention decode s={s} h={nh}x{hd}", seq_q=1, seq_k=s, heads=nh, head_dim=hd))
            elif op == "pointwise":
                n_cols = int(e["n_cols"])
                items += [_item("pointwise", pw.tune_key(m * n_cols), f"pointwise n={m * n_cols}", n=m * n_cols)
                          for m in ms]
            elif op == "reduction":
                n_cols = int(e["n_cols"])
                items += [_item("reduction", rd.tune_key(m, n_cols, dtype), f"reduction m={m} n={n_cols}",
                                n_rows=m, n_cols=n_cols) for m in ms]
            else:
                raise ValueError(f"unknown op {op!r}; expected one of mm, addmm, {', '.join(ALL_OPS[1:])}")
        except KeyError as exc:
            raise ValueError(f"shapes entry {e}: missing {exc}") from None
    return items


def model_entries(spec: ModelShapes, *, max_reqs: int, ops=DEFAULT_OPS) -> list:
    """Shape entries (as in a shapes file) of one model's kernels; the logits GEMM's M goes up to ``max_reqs``."""
    q_out = (spec.n_heads + 2 * spec.n_kv_heads) * spec.head_dim
    entries = []
    if "mm" in ops:
        entries += [
            dict(op="mm", n=q_out, k=spec.hidden, bias=spec.qkv_bias),  # fused q/k/v projection
            dict(op="mm", n=spec.hidden, k=spec.n_heads * spec.head_dim),  # o_proj
            dict(op="mm", n=2 * spec.intermediate, k=spec.hidden),  # fused gate/up projection
            dict(op="mm", n=spec.hidden, k=spec.intermediate),  # down_proj
            dict(op="mm", n=spec.vocab, k=spec.hidden, m=buckets(max_reqs)),  # logits
        ]
    if "rms_norm" in ops:
        entries += [dict(op="rms_norm", n_cols=spec.hidden, residual=True),
                    dict(op="rms_norm", n_cols=spec.hidden, residual=False)]
    if "act_and_mul" in ops:
        entries.append(dict(op="act_and_mul", d=spec.intermediate))
    if "rope" in ops:
        entries.append(dict(op="rope", n_q_heads=spec.n_heads, n_kv_heads=spec.n_kv_heads, head_dim=spec.head_dim,
                            rotary_dim=spec.rotary_dim or spec.head_dim, layout="both"))
    if "attention" in ops:
        entries.append(dict(op="attention", n_heads=spec.n_heads, head_dim=spec.head_dim))
    if "layer_norm" in ops:
        entries.append(dict(op="layer_norm", n_cols=spec.hidden))
    if "pointwise" in ops:
        entries.append(dict(op="pointwise", n_cols=spec.hidden))
    if "reduction" in ops:
        entries.append(dict(op="reduction", n_cols=spec.hidden))
    return entries


def model_shapes(model) -> ModelShapes:
    """A :class:`ModelShapes` from a name in :data:`MODELS` (or an alias), an HF config / model, a dict of
    ModelShapes fields or of HF config fields, or a path to a JSON file holding either.

    Raises:
        ValueError: an unknown name or a config without the sizes.
    """
    if isinstance(model, ModelShapes):
        return model
    if isinstance(model, str):
        name = ALIASES.get(model.lower(), model.lower())
        if name in MODELS:
            return MODELS[name]
        if os.path.exists(model):
            with open(model, encoding="utf-8") as f:
                return model_shapes(json.load(f))
        raise ValueError(f"model: unknown model {model!r}; expected one of {', '.join(list(ALIASES) + list(MODELS))}, "
                         "a config.json path or a shapes file")
    cfg = getattr(model, "config", model)
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    if get("hidden") is not None:  # our own field names
        fields = {f.name for f in dataclasses.fields(ModelShapes)}
        return ModelShapes(**{"name": "custom", **{k: v for k, v in dict(cfg).items() if k in fields}})
    try:
        hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
        head_dim = int(get("head_dim") or hidden // heads)
        partial = get("partial_rotary_factor")
        return ModelShapes(
            name=str(get("_name_or_path") or get("model_type") or "hf-config"),
            hidden=hidden, intermediate=int(get("intermediate_size")), n_heads=heads,
            n_kv_heads=int(get("num_key_value_heads") or heads), head_dim=head_dim, vocab=int(get("vocab_size")),
            qkv_bias=bool(get("attention_bias") or get("model_type") in ("qwen2",)),
            rotary_dim=int(head_dim * partial) if partial else None,
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model: cannot read the sizes from {type(cfg).__name__} ({exc}); expected hidden_size, "
                         "intermediate_size, num_attention_heads, vocab_size") from None


def plan(model_or_shapes, *, dtype: torch.dtype = torch.bfloat16, max_tokens: int = 16384, max_reqs: int = 1024,
         tokens=None, tp: int = 1, ops=DEFAULT_OPS, dev: int | None = None) -> list:
    """The work items (unique keys, in order) for a model or a shapes document.

    Args:
        model_or_shapes: see :func:`model_shapes`; or a shapes document (dict with ``shapes`` / ``mm``)
            or a path to one.
        dtype: the activations' dtype.
        max_tokens: token-count buckets go up to it (prefill chunk / batched tokens).
        max_reqs: the logits GEMM's buckets go up to it (one row per request).
        tokens: explicit token counts instead of buckets up to ``max_tokens``.
        tp: tensor-parallel degree (per-rank shapes).
        ops: op families to include (a shapes document lists its own).
        dev: device index (the current one by default).

    Returns:
        A list of :class:`WorkItem`.

    Raises:
        ValueError: unknown model, op or malformed shapes.
    """
    from .kernels import _autotune as at

    dev = at.current_device() if dev is None else dev
    ops = tuple(ops)
    for op in ops:
        if op not in ALL_OPS:
            raise ValueError(f"ops: unknown op {op!r}; expected some of {', '.join(ALL_OPS)}")
    m_tokens = sorted({int(t) for t in tokens}) if tokens is not None else buckets(max_tokens)
    if tokens is not None:  # the logits GEMM never has more rows than the largest token count
        max_reqs = min(max_reqs, max(m_tokens))
    doc = model_or_shapes
    if isinstance(doc, str) and not (doc.lower() in MODELS or doc.lower() in ALIASES) and os.path.exists(doc):
        with open(doc, encoding="utf-8") as f:
            doc = json.load(f)
    entries = []
    if isinstance(doc, dict) and ("shapes" in doc or "mm" in doc or "model" in doc):
        if isinstance(doc.get("dtype"), str):
            dtype = DTYPES[doc["dtype"]]
        if "model" in doc:
            entries += model_entries(model_shapes(doc["model"]).sharded(tp), max_reqs=max_reqs, ops=ops)
        entries += list(doc.get("shapes", []))
        entries += [dict(op="mm", n=int(nk[0]), k=int(nk[1])) for nk in doc.get("mm", [])]  # upstream's table
    else:
        entries = model_entries(model_shapes(doc).sharded(tp), max_reqs=max_reqs, ops=ops)
    items, seen = [], set()
    for it in plan_shapes(entries, dtype=dtype, m_tokens=m_tokens, dev=dev):
        if (it.kernel, it.key) not in seen:
            seen.add((it.kernel, it.key))
            items.append(it)
    return items


# ------------------------------------------------------------------------------------ running


class _Progress:
    """A progress bar on stderr (rewritten in place on a terminal, one line per item otherwise)."""

    def __init__(self, total: int, stream=None, enabled: bool = True):
        self.total, self.stream, self.enabled = total, stream or sys.stderr, enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()

    def update(self, done: int, label: str, status: str = "") -> None:
        if not self.enabled:
            return
        width = 24
        fill = int(width * done / max(self.total, 1))
        secs = int(time.perf_counter() - self.t0)
        line = (f"pretune [{'#' * fill}{'-' * (width - fill)}] {done:>{len(str(self.total))}}/{self.total} "
                f"{secs // 60:02d}:{secs % 60:02d} {label[:60]:<60} {status}")
        if self.tty:
            self.stream.write("\r" + line)
            if done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line.rstrip() + "\n")
        self.stream.flush()


@dataclasses.dataclass
class Summary:
    """What :func:`run` did."""

    items: int = 0
    tuned: int = 0
    cached: int = 0
    shipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    device: str = ""
    cache_dir: str = ""
    by_kernel: dict = dataclasses.field(default_factory=dict)
    results: list = dataclasses.field(default_factory=list)

    def text(self) -> str:
        lines = [f"pretune: {self.items} keys on {self.device}: {self.tuned} tuned, {self.cached} already cached, "
                 f"{self.shipped} from the shipped table, {self.failed} failed, in {self.seconds:.1f} s",
                 f"  cache: {self.cache_dir}"]
        for k, v in sorted(self.by_kernel.items()):
            lines.append(f"  {k:<12} {v['items']:>4} keys, {v['tuned']:>4} tuned, {v['seconds']:8.1f} s")
        return "\n".join(lines)


def run(items: list, *, dev: int | None = None, force: bool = False, budget_s: float | None = None,
        warm: bool = True, progress: bool = True, stream=None, tune: bool = True) -> Summary:
    """Tune (or read from the caches) every item, then launch it once with its config.

    Args:
        items: from :func:`plan`.
        dev: device index (the current one by default).
        force: tune keys the caches already have.
        budget_s: seconds per key (None: every candidate).
        warm: launch each key's kernel once with its chosen config (compiles it).
        progress: draw the progress bar on ``stream`` (stderr).
        tune: False: no tuning (the caches' configs, else the heuristics), launches only. (Explicit:
            ``GEMS_AUTOTUNE`` does not apply here; :func:`warmup` reads it.)

    Returns:
        A :class:`Summary`.

    Raises:
        RuntimeError: called inside a CUDA-graph capture.
    """
    from .kernels import _autotune as at

    if at.capturing():
        raise RuntimeError("flag_gems pretune/warmup must run outside CUDA-graph capture (it tunes and synchronizes)")
    dev = at.current_device() if dev is None else dev
    summary = Summary(items=len(items), device=at.device_name(dev),
                      cache_dir=os.path.join(at.cache_dir(), "autotune", at.device_slug(at.device_name(dev))))
    bar = _Progress(len(items), stream, progress)
    t0 = time.perf_counter()
    tune_allowed = tune
    for i, it in enumerate(items):
        tunable = at.TUNABLES[it.kernel]
        dims = dict(it.dims) or None
        bar.update(i, it.label, "")
        t1 = time.perf_counter()
        try:
            if tune_allowed:
                res = tunable.tune(it.key, dev, dims, budget_s=budget_s, force=force)
            else:
                tunable.resolve(it.key, dev, dims, tune=False)
                res = tunable.origin(it.key, dev) or at.TuneResult(it.kernel, it.key, {}, "default")
            if warm and res.origin != "tuned":
                tunable.warm(it.key, dev, dims)
        except Exception as exc:  # noqa: BLE001 - one failing key is a row of the summary, not the end of the run
            logger.warning("pretune %s %s failed: %s: %s", it.kernel, it.label, type(exc).__name__, exc)
            summary.failed += 1
            summary.results.append(dict(kernel=it.kernel, label=it.label, key=at._jsonable(it.key), error=str(exc)))
            continue
        secs = time.perf_counter() - t1
        origin = res.origin
        summary.tuned += origin == "tuned"
        summary.cached += origin == "cache"
        summary.shipped += origin == "shipped"
        k = summary.by_kernel.setdefault(it.kernel, dict(items=0, tuned=0, seconds=0.0))
        k["items"] += 1
        k["tuned"] += origin == "tuned"
        k["seconds"] += secs
        summary.results.append(dict(kernel=it.kernel, label=it.label, key=at._jsonable(it.key), origin=origin,
                                    config=res.config, best_us=res.best_us, default_us=res.default_us,
                                    baseline_us=res.baseline_us, tune_s=res.seconds, seconds=secs, tried=res.tried))
    bar.update(len(items), "done", "")
    summary.seconds = time.perf_counter() - t0
    return summary


def warmup(model_or_shapes, *, tokens=None, max_tokens: int = 8192, max_reqs: int = 256, dtype=None,
           device=None, ops=DEFAULT_OPS, tp: int = 1, tune: bool = True, progress: bool = False) -> Summary:
    """Tune and compile the kernels a model will use, for the given token counts, before serving.

    Under ``GEMS_AUTOTUNE=off`` nothing is tuned; the kernels are still compiled. Keys already in a
    cache are read, not tuned again.

    Args:
        model_or_shapes: a model name (``"llama"``, ``"qwen2.5-7b"``, ...), an HF model or config
            (its ``hidden_size``, ``intermediate_size``, heads, ``vocab_size``), a shapes document
            or the path of a shapes / config JSON file (see the module docstring).
        tokens: token counts to prepare (each rounds to its bucket); default: powers of two up to ``max_tokens``.
        max_tokens, max_reqs: bucket limits when ``tokens`` is None (``max_reqs`` for the logits GEMM).
        dtype: the activations' dtype; default the model's parameter dtype, else bfloat16.
        device: CUDA device (index or ``torch.device``); the current one by default.
        ops: op families (``flag_gems.pretune.ALL_OPS``).
        tp: tensor-parallel degree (per-rank shapes).
        tune: False: only compile (the caches' or the heuristic configs).
        progress: draw a progress bar on stderr.

    Returns:
        The :class:`Summary` (keys, how each was decided, time).

    Raises:
        ValueError: an unknown model / op, or malformed shapes.
        RuntimeError: called inside a CUDA-graph capture.
    """
    from .kernels import _autotune as at

    if dtype is None:
        params = getattr(model_or_shapes, "parameters", None)
        first = next(iter(params()), None) if callable(params) else None
        dtype = first.dtype if first is not None and first.dtype.is_floating_point else torch.bfloat16
    if isinstance(device, torch.device):
        device = device.index if device.type == "cuda" else -1
    dev = at.current_device() if device is None else int(device)
    items = plan(model_or_shapes, dtype=dtype, max_tokens=max_tokens, max_reqs=max_reqs, tokens=tokens, tp=tp,
                 ops=ops, dev=dev)
    return run(items, dev=dev, progress=progress, tune=tune and at.mode() != "off")


# ------------------------------------------------------------------------------------ command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flag_gems.pretune", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama",
                   help=f"model: {', '.join(list(ALIASES) + list(MODELS))}, or a config.json / shapes file path")
    p.add_argument("--model-config", "--model_config", dest="model_config", help="an HF config.json (overrides --model)")
    p.add_argument("--shapes", help="a shapes JSON file (module docstring); replaces the model's shapes")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--max_tokens", "--max-tokens", dest="max_tokens", type=int, default=16384,
                   help="token-count buckets up to this (default 16384)")
    p.add_argument("--max_reqs", "--max-reqs", dest="max_reqs", type=int, default=1024,
                   help="the logits GEMM's buckets up to this (default 1024)")
    p.add_argument("--tokens", type=int, nargs="+", help="explicit token counts instead of the buckets")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree: per-rank shapes (default 1)")
    p.add_argument("--ops", nargs="+", default=list(DEFAULT_OPS), choices=list(ALL_OPS) + ["all"],
                   help=f"op families (default {' '.join(DEFAULT_OPS)}; 'all' adds attention, layer_norm, "
                        "pointwise, reduction)")
    p.add_argument("--force", action="store_true", help="tune keys the caches already have")
    p.add_argument("--budget", type=float, default=None, help="seconds per key (default: every candidate)")
    p.add_argument("--device", type=int, default=None, help="CUDA device index (default: the current one)")
    p.add_argument("--cache-dir", "--cache_dir", dest="cache_dir", help="cache root (sets GEMS_CACHE_DIR)")
    p.add_argument("--export", help="also write the decided configs as a shipped table (kernels/tuned/<device>.json)")
    p.add_argument("--json", help="write the per-key results as JSON")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", help="list the keys, tune nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def export_table(path: str, dev: int) -> int:
    """Write this process's decided configs on ``dev`` as a shipped table; returns the entry count."""
    import triton

    from .kernels import _autotune as at

    entries = at.export_entries(dev)
    doc = dict(format=at.FORMAT, device=at.device_name(dev), triton=triton.__version__, torch=torch.__version__,
               date=at.now_iso(), entries=entries)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    return len(entries)


def main(argv=None) -> int:
    """The command line (module docstring); returns the exit code."""
    args = _parser().parse_args(argv)
    if args.cache_dir:
        os.environ["GEMS_CACHE_DIR"] = args.cache_dir
    from .kernels import _autotune as at

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ops = ALL_OPS if "all" in args.ops else tuple(args.ops)
    dev = at.current_device() if args.device is None else args.device
    if dev >= 0:
        torch.cuda.set_device(dev)
    source = args.shapes or args.model_config or args.model
    try:
        items = plan(source, dtype=DTYPES[args.dtype], max_tokens=args.max_tokens, max_reqs=args.max_reqs,
                     tokens=args.tokens, tp=args.tp, ops=ops, dev=dev)
    except ValueError as exc:
        print(f"pretune: {exc}", file=sys.stderr)
        return 2
    name = source if not isinstance(source, str) else os.path.basename(source)
    print(f"pretune: {name} {args.dtype} on {at.device_name(dev)}: {len(items)} keys "
          f"(max_tokens {args.max_tokens}, max_reqs {args.max_reqs}, tp {args.tp}, ops {' '.join(ops)})", flush=True)
    if args.dry_run:
        for it in items:
            print(f"  {it.kernel:<12} {it.label:<48} key={at.key_text(it.key)}")
        return 0
    if dev < 0:
        print("pretune: no CUDA device: tuning runs through Triton's interpreter (CPU timings; for testing only)",
              file=sys.stderr)
    if at.mode() == "off":
        print("pretune: GEMS_AUTOTUNE=off: the tuned configs are written but not used until it is unset",
              file=sys.stderr)
    summary = run(items, dev=dev, force=args.force, budget_s=args.budget, progress=not args.quiet)
    print(summary.text(), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(summary=dataclasses.asdict(summary)), f, indent=1, default=str)
    if args.export:
        n = export_table(args.export, dev)
        print(f"  exported {n} entries to {args.export}")
    return 1 if summary.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
