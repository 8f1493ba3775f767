"""Tensor-parallel decoder on two processes: eager, ``use_gems()`` and ``backend="flag_gems"`` (issue 14).

A small Llama-style decoder (RMSNorm, GQA attention with rotate-half RoPE, SiLU-gated MLP) split
Megatron-style over the ranks: q/k/v and gate/up are column-parallel (each rank holds its heads
and its slice of the intermediate size), o and down are row-parallel, and an all-reduce of the
partial sums follows each row-parallel layer (two per decoder layer). Embedding, norms and the
LM head are replicated. Every rank builds the whole model from one seed, runs it unsplit on its
own device (the single-device reference, plain PyTorch eager), then its shard in three modes:

- ``eager``: plain PyTorch (the split itself is what this checks);
- ``use_gems``: ``flag_gems.use_gems()``, every registry entry on (one first call with
  ``record=True`` names the flag_gems kernels that ran);
- ``compiled``: ``torch.compile(model, backend="flag_gems")`` (the all-reduces are in the
  graph as functional collectives; the report counts the fusions).

Per rank and mode: cosine similarity of the logits with the single-device run (passes at
``LOGITS_COSINE[dtype]`` of ``tests/accuracy.py``), max abs error against it and against a float64
CPU run of the unsplit model, the largest difference from rank 0's logits, the first call's
seconds (compile and tuning included) and the median ms per step.

Tuning cache: ``GEMS_AUTOTUNE=on`` (unless set) and ``GEMS_CACHE_DIR`` a fresh folder rank 0 makes
and shares (``--cache-dir`` names one), so both ranks tune the same keys at the same time into one
folder. On a GPU the first calls tune; under Triton's interpreter nothing tunes at run time, so
both ranks first tune the per-rank keys explicitly (``flag_gems.pretune``, ``force=True``).
Afterwards every file there must be a valid record, no temporary file may be left and no
autotune warning may have been raised.

Launch (NCCL with CUDA, one GPU per rank; gloo on the CPU)::

    torchrun --nproc_per_node 2 benchmarks/multigpu_tp.py --out benchmarks/results
    torchrun --nproc_per_node 2 benchmarks/multigpu_tp.py --device cpu --size tiny --out /tmp/tp

NVLink multicast stays off (``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``,
``NVSHMEM_DISABLE_NVLS=1``: the device machines' rule), set here before anything initializes.
Rank 0 writes ``multigpu_tp_<world>x_<GPU>_<date>.json`` (long-format rows) and ``.md`` into
``--out``; the exit status is 0 only when every mode passed on every rank and the cache was clean.
"""

from __future__ import annotations

import os
import sys

# Before torch, NCCL or NVSHMEM read them (the device machines' rule: multicast can take the
# host's GPUs out of service). Set, not defaulted: a caller's "1" must not turn it on.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(MULTICAST_OFF)
os.environ.setdefault("GEMS_AUTOTUNE", "on")
os.environ.setdefault("GEMS_AUTOTUNE_BUDGET_S", "1")  # per key: both ranks tune ~30 keys in the first calls

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))


def _early_device(argv) -> str:
    """``--device`` before torch is imported: the CPU needs Triton's interpreter switched on first."""
    for i, a in enumerate(argv):
        if a == "--device" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--device="):
            return a.split("=", 1)[1]
    return "auto"


if _early_device(sys.argv[1:]) == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
    # CPU ranks on a GPU machine: with a GPU visible, flag_gems' runtime picks the CUDA backend and
    # use_gems() registers on the CUDA key, so the ranks' CPU tensors would run no kernel of ours.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "tests"))  # the tolerance table
from _bench_utils import file_tag, run_meta, write_rows  # noqa: E402
from accuracy import LOGITS_COSINE  # noqa: E402

import flag_gems  # noqa: E402

MODES = ("eager", "use_gems", "compiled")


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes of the decoder (Llama's names); heads, kv heads and intermediate must split over the ranks."""

    vocab: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    layers: int
    batch: int
    seq: int
    eps: float = 1e-5
    theta: float = 10000.0


SIZES = {
    # A 1B-class Llama slice: hidden 2048, 16 q / 8 kv heads of 128, 4 layers; [4, 128] tokens.
    "default": Config(vocab=32000, hidden=2048, intermediate=5632, n_heads=16, n_kv_heads=8, head_dim=128, layers=4,
                      batch=4, seq=128),
    # Through Triton's interpreter: a few seconds a mode.
    "tiny": Config(vocab=128, hidden=64, intermediate=128, n_heads=4, n_kv_heads=2, head_dim=16, layers=2, batch=1,
                   seq=8),
}


# --------------------------------------------------------------------------- the model


def full_weights(cfg: Config, seed: int) -> dict:
    """Every weight of the unsplit model, fp32 on the CPU, from ``seed`` (the same on every rank)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape, scale=1.0):
        return torch.randn(shape, generator=g) * scale

    def norm():
        return 1.0 + 0.1 * w(cfg.hidden)

    hq, hk, d, h, i = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.head_dim, cfg.hidden, cfg.intermediate
    out = {"embed": w(cfg.vocab, h), "norm": norm(), "lm_head": w(cfg.vocab, h, scale=h**-0.5)}
    for n in range(cfg.layers):
        out.update({
            f"{n}.attn_norm": norm(), f"{n}.q": w(hq, h, scale=h**-0.5), f"{n}.k": w(hk, h, scale=h**-0.5),
            f"{n}.v": w(hk, h, scale=h**-0.5), f"{n}.o": w(h, hq, scale=hq**-0.5), f"{n}.mlp_norm": norm(),
            f"{n}.gate": w(i, h, scale=h**-0.5), f"{n}.up": w(i, h, scale=h**-0.5), f"{n}.down": w(h, i, scale=i**-0.5),
        })
    del d
    return out


def shard(cfg: Config, weights: dict, rank: int, world: int) -> dict:
    """Rank ``rank``'s part of ``weights`` (Megatron's split).

    Column-parallel (output features, weight rows): q by q heads, k and v by kv heads (rank r keeps
    q heads ``[r Hq/tp, (r+1) Hq/tp)`` and the kv heads they read), gate and up by intermediate
    slices. Row-parallel (input features, weight columns): o by the q heads' columns, down by the
    intermediate slice. The rest is replicated.

    Raises:
        ValueError: a size the ranks do not divide.
    """
    for what, v in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads), ("intermediate", cfg.intermediate)):
        if v % world:
            raise ValueError(f"tensor parallel: {world} ranks do not divide {what}={v}")
    if world == 1:
        return dict(weights)
    d = cfg.head_dim
    q_part, kv_part, i_part = cfg.n_heads // world * d, cfg.n_kv_heads // world * d, cfg.intermediate // world

    def rows(t, part):
        return t[rank * part:(rank + 1) * part]

    def cols(t, part):
        return t[:, rank * part:(rank + 1) * part]

    out = {}
    for name, t in weights.items():
        kind = name.split(".")[-1]
        out[name] = {"q": lambda: rows(t, q_part), "k": lambda: rows(t, kv_part), "v": lambda: rows(t, kv_part),
                     "gate": lambda: rows(t, i_part), "up": lambda: rows(t, i_part), "o": lambda: cols(t, q_part),
                     "down": lambda: cols(t, i_part)}.get(kind, lambda: t)().contiguous()
    return out


def rms_norm(x, weight, eps):
    """HF Llama's RMSNorm (fp32 statistics, rounded before the weight): the backend's pattern."""
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class Layer(nn.Module):
    """One decoder layer's shard; ``group`` None: the unsplit layer (no all-reduce)."""

    def __init__(self, cfg: Config, w: dict, n: int, world: int, group):
        super().__init__()
        self.cfg, self.group = cfg, group
        self.hq, self.hk = cfg.n_heads // world, cfg.n_kv_heads // world
        for name in ("attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down"):
            setattr(self, name, nn.Parameter(w[f"{n}.{name}"], requires_grad=False))

    def reduce(self, t):
        """The sum of the ranks' partial results (row-parallel output), in place."""
        if self.group is not None:
            dist.all_reduce(t, group=self.group)
        return t

    def forward(self, h, cos, sin):
        b, s, _ = h.shape
        d, eps = self.cfg.head_dim, self.cfg.eps
        x = rms_norm(h, self.attn_norm, eps)
        q = F.linear(x, self.q).view(b, s, self.hq, d).transpose(1, 2)
        k = F.linear(x, self.k).view(b, s, self.hk, d).transpose(1, 2)
        v = F.linear(x, self.v).view(b, s, self.hk, d).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        groups = self.hq // self.hk
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        a = a.transpose(1, 2).reshape(b, s, self.hq * d)
        h = h + self.reduce(F.linear(a, self.o))
        x = rms_norm(h, self.mlp_norm, eps)
        m = F.linear(F.silu(F.linear(x, self.gate)) * F.linear(x, self.up), self.down)
        return h + self.reduce(m)


class Decoder(nn.Module):
    """The decoder, or one rank's shard of it (``world`` > 1, ``group`` the tensor-parallel group)."""

    def __init__(self, cfg: Config, weights: dict, world: int = 1, group=None):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Parameter(weights["embed"], requires_grad=False)
        self.norm = nn.Parameter(weights["norm"], requires_grad=False)
        self.lm_head = nn.Parameter(weights["lm_head"], requires_grad=False)
        self.layers = nn.ModuleList(Layer(cfg, weights, n, world, group) for n in range(cfg.layers))
        inv = 1.0 / (cfg.theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
        self.register_buffer("inv_freq", inv.float(), persistent=False)

    def forward(self, ids):
        h = F.embedding(ids, self.embed)
        pos = torch.arange(ids.shape[1], device=ids.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)  # [S, D], HF's rotate-half tables
        cos, sin = emb.cos().to(h.dtype)[None, None], emb.sin().to(h.dtype)[None, None]
        for layer in self.layers:
            h = layer(h, cos, sin)
        return F.linear(rms_norm(h, self.norm, self.cfg.eps), self.lm_head)


def build(cfg: Config, weights: dict, device, dtype, world: int = 1, group=None) -> Decoder:
    model = Decoder(cfg, weights, world, group)
    return model.to(device=device, dtype=dtype).eval()


# --------------------------------------------------------------------------- measuring


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cosine(a, b) -> float:
    return float(F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def max_err(a, b) -> float:
    return float((a.double().cpu() - b.double().cpu()).abs().max())


def steps_ms(fn, device, iters: int) -> float:
    """Median wall ms of one forward (host and device, synchronized after each)."""
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def first_call(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def run_mode(mode: str, model, ids, device, iters: int, record_dir: str):
    """(logits of the first call, first-call s, ms per step, evidence dict) of one mode."""
    evidence = {}
    with torch.no_grad():
        if mode == "eager":
            out, first = first_call(lambda: model(ids), device)
            fn = lambda: model(ids)  # noqa: E731
            ms = steps_ms(fn, device, iters)
        elif mode == "use_gems":
            log = os.path.join(record_dir, "use_gems_ops.log")
            with flag_gems.use_gems(record=True, once=True, path=log):
                out, first = first_call(lambda: model(ids), device)
            # Lines are written after each kernel returned (a kernel that fell back logs nothing).
            with open(log, encoding="utf-8") as f:
                evidence["gems_ops"] = sorted({line.split("GEMS ", 1)[1].strip() for line in f if "GEMS " in line})
            with flag_gems.use_gems():
                ms = steps_ms(lambda: model(ids), device, iters)
        elif mode == "compiled":
            from flag_gems.backend import _collect
            from flag_gems.report import CompileReport

            compiled = torch.compile(model, backend="flag_gems")
            with _collect(CompileReport()) as report:
                out, first = first_call(lambda: compiled(ids), device)
            evidence["graphs"] = len(report.graphs)
            evidence["fused"] = dict(report.fused)
            evidence["fallbacks"] = [f"graph {g}: {why}" for g, why in report.fallbacks]
            ms = steps_ms(lambda: compiled(ids), device, iters)
        else:
            raise ValueError(f"mode: unknown {mode!r}; expected one of {MODES}")
    return out, first, ms, evidence


def mode_passed(mode: str, cos: float, dtype, evidence: dict) -> tuple[bool, str]:
    """Whether a rank's mode passed, and why not."""
    if not cos >= LOGITS_COSINE[dtype]:
        return False, f"cosine {cos:.6f} < {LOGITS_COSINE[dtype]}"
    if mode == "use_gems" and not evidence.get("gems_ops"):
        return False, "no flag_gems kernel ran under use_gems()"
    if mode == "compiled":
        if evidence.get("fallbacks"):
            return False, f"graphs fell back: {evidence['fallbacks']}"
        if not sum(evidence.get("fused", {}).values()):
            return False, "the backend fused nothing"
    return True, ""


# --------------------------------------------------------------------------- the tuning cache


def tune_explicitly(cfg: Config, world: int, dtype, dev: int) -> dict:
    """Under the interpreter (no run-time tuning): tune this rank's keys now, both ranks at once."""
    from flag_gems import pretune

    shapes = pretune.ModelShapes("tp-decoder", cfg.hidden, cfg.intermediate, cfg.n_heads, cfg.n_kv_heads,
                                 cfg.head_dim, cfg.vocab)
    items = pretune.plan(shapes, dtype=dtype, tokens=[cfg.batch * cfg.seq], tp=world, dev=dev,
                         ops=("rms_norm", "act_and_mul", "rope"))
    summary = pretune.run(items, dev=dev, force=True, progress=False, warm=False)
    return {"keys": summary.items, "tuned": summary.tuned, "failed": summary.failed}


def tuning_origins() -> dict:
    """How this process decided each tuning key it used: origin -> count (``tuned``, ``cache``, ...)."""
    from flag_gems.kernels import _autotune as at

    counts: dict = {}
    for t in at.TUNABLES.values():
        for result in t._origin.values():
            counts[result.origin] = counts.get(result.origin, 0) + 1
    return counts


def check_cache(root: str, dev: int) -> dict:
    """Every file under ``root``'s autotune folder read back as the autotuner reads it: valid records
    (``_tune_cache.load`` accepts the file at its own path, and the config is one of the key's
    candidates), invalid ones with the reason, temporary files left behind."""
    from flag_gems.kernels import _autotune as at
    from flag_gems.kernels import _tune_cache as cache

    files = sorted(glob.glob(os.path.join(root, "autotune", "*", "*")))
    records, bad, tmp = 0, [], []
    for path in files:
        name = os.path.basename(path)
        if path.endswith(".tmp"):
            tmp.append(name)
            continue
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
            tunable = at.TUNABLES[raw["kernel"]]
            key = _key(json.loads(raw["key"]))
            rec = cache.load(tunable, key, raw["device"])
            why = ("not read back at its own path" if rec is None or rec["_path"] != path
                   else "config is not a candidate" if not tunable._valid(rec["config"], key, dev) else None)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            why = f"{type(exc).__name__}: {exc}"
        if why is None:
            records += 1
        else:
            bad.append(f"{name}: {why}")
    return {"files": len(files), "records": records, "invalid": bad, "tmp_left": tmp}


def _key(values) -> tuple:
    """A stored key (JSON: lists, dtypes by name) as the Python key."""
    return tuple(getattr(torch, v) if isinstance(v, str) and isinstance(getattr(torch, v, None), torch.dtype) else
                 _key(v) if isinstance(v, list) else v for v in values)


# --------------------------------------------------------------------------- one rank


def setup(args):
    """Process group, this rank's device, the shared cache folder."""
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit("multigpu_tp: --device cuda but no CUDA device")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise SystemExit(f"multigpu_tp: local rank {local} but {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend, device_id=device if use_cuda else None)
    else:  # one process without torchrun: world 1 (the split is then the identity)
        dist.init_process_group(backend, init_method=f"file://{tempfile.mktemp(prefix='gems_tp_')}", rank=0,
                                world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    box = [args.cache_dir or (tempfile.mkdtemp(prefix="gems_tp_cache_") if rank == 0 else None)]
    dist.broadcast_object_list(box, src=0)
    os.environ["GEMS_CACHE_DIR"] = box[0]
    fresh = not glob.glob(os.path.join(box[0], "autotune", "*", "*"))
    dist.barrier()
    return device, backend, rank, world, box[0], fresh


def run_rank(args) -> tuple[list, bool]:
    device, backend, rank, world, cache, fresh = setup(args)
    cfg = SIZES[args.size]
    if args.batch:
        cfg = dataclasses.replace(cfg, batch=args.batch)
    if args.seq:
        cfg = dataclasses.replace(cfg, seq=args.seq)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype or
                                                                                   ("bf16" if device.type == "cuda" else "fp32")]
    group = dist.group.WORLD if world > 1 else None
    weights = full_weights(cfg, seed=args.seed)
    ids = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=torch.Generator().manual_seed(args.seed + 1))
    caught: list = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids_d = ids.to(device)
        with torch.no_grad():
            ref64 = build(cfg, weights, device, torch.float64)(ids_d).cpu()  # fp64 on the rank's own device
            single = build(cfg, weights, device, dtype)
            ref, _ = first_call(lambda: single(ids_d), device)
            single_ms = steps_ms(lambda: single(ids_d), device, args.iters)
            del single
        dist.barrier()  # the ranks start tuning together
        tuned_first = tune_explicitly(cfg, world, dtype, -1) if device.type == "cpu" else None
        dist.barrier()
        model = build(cfg, shard(cfg, weights, rank, world), device, dtype, world, group)
        results = {}
        record_dir = tempfile.mkdtemp(prefix=f"gems_tp_rank{rank}_")
        for mode in args.modes:
            torch._dynamo.reset()
            dist.barrier()
            out, first, ms, evidence = run_mode(mode, model, ids_d, device, args.iters, record_dir)
            rank0 = out.clone()
            dist.broadcast(rank0, src=0)
            cos = cosine(out, ref)
            ok, why = mode_passed(mode, cos, dtype, evidence)
            results[mode] = dict(passed=ok, why=why, cosine=cos, max_abs_err=max_err(out, ref),
                                 max_abs_err_fp64=max_err(out, ref64), max_diff_rank0=max_err(out, rank0),
                                 first_call_s=first, ms_per_step=ms, **evidence)
        dist.barrier()  # every rank's tuning is written
        shutil.rmtree(record_dir, ignore_errors=True)
    autotune_warnings = [str(w.message) for w in caught if "autotune" in str(w.message)]
    shown = set()
    for w in caught:  # the others, once per place as the default filter shows them
        where = (str(w.message), w.category, w.filename, w.lineno)
        if "autotune" not in str(w.message) and where not in shown:
            shown.add(where)
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    mine = dict(
        rank=rank, device=str(device), gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        single=dict(ms_per_step=single_ms, max_abs_err_fp64=max_err(ref, ref64)), modes=results,
        tuning=dict(origins=tuning_origins(), explicit=tuned_first, warnings=autotune_warnings),
    )
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    cache_state = check_cache(cache, device.index if device.type == "cuda" else -1)
    ok = all(r["modes"][m]["passed"] for r in everyone for m in r["modes"])
    cache_ok = (not cache_state["invalid"] and not cache_state["tmp_left"]
                and not any(r["tuning"]["warnings"] for r in everyone) and cache_state["records"] > 0)
    rows = []
    if rank == 0:
        rows = report_rows(args, cfg, dtype, backend, world, cache, fresh, cache_state, cache_ok, everyone)
    dist.barrier()
    dist.destroy_process_group()
    return rows, ok and cache_ok


# --------------------------------------------------------------------------- results


def report_rows(args, cfg, dtype, backend, world, cache, fresh, cache_state, cache_ok, everyone) -> list:
    meta = run_meta("cuda" if everyone[0]["device"].startswith("cuda") else "cpu")
    gpus = [r["gpu"] for r in everyone]
    machine = f"{world}x {gpus[0]}" if len(set(gpus)) == 1 else " + ".join(gpus)
    shape = (f"B{cfg.batch}xS{cfg.seq} h{cfg.hidden} i{cfg.intermediate} q{cfg.n_heads}/kv{cfg.n_kv_heads}x{cfg.head_dim} "
             f"L{cfg.layers} V{cfg.vocab} {str(dtype).replace('torch.', '')} tp{world}")
    base = dict(meta, op="tp_decoder", shape=shape, machine=machine, host=platform.node(), world=world,
                backend=backend)
    rows = []
    for r in everyone:
        where = dict(base, rank=r["rank"], device=r["device"], rank_gpu=r["gpu"])
        rows.append(dict(where, provider="single_device_eager", metric="ms_per_step", value=r["single"]["ms_per_step"]))
        rows.append(dict(where, provider="single_device_eager", metric="max_abs_err_fp64",
                         value=r["single"]["max_abs_err_fp64"]))
        for mode, m in r["modes"].items():
            for metric in ("passed", "cosine", "max_abs_err", "max_abs_err_fp64", "max_diff_rank0", "first_call_s",
                           "ms_per_step"):
                value = int(m[metric]) if metric == "passed" else m[metric]
                rows.append(dict(where, provider=mode, metric=metric, value=value))
            extra = {k: m[k] for k in ("why", "gems_ops", "graphs", "fused", "fallbacks") if k in m and m[k] != ""}
            if extra:
                rows.append(dict(where, provider=mode, metric="evidence", value=extra))
        rows.append(dict(where, provider="tuning", metric="origins", value=r["tuning"]["origins"]))
        if r["tuning"]["explicit"] is not None:
            rows.append(dict(where, provider="tuning", metric="explicit_tuning", value=r["tuning"]["explicit"]))
        rows.append(dict(where, provider="tuning", metric="autotune_warnings", value=r["tuning"]["warnings"]))
    rows.append(dict(base, provider="tuning", metric="shared_cache",
                     value=dict(cache_state, dir=cache, fresh_at_start=fresh, passed=int(cache_ok),
                                autotune=os.environ.get("GEMS_AUTOTUNE"))))
    rows.append(dict(base, provider="env", metric="multicast_off", value={k: os.environ.get(k) for k in MULTICAST_OFF}))
    return rows


def markdown(rows: list) -> str:
    base = rows[0]
    ranks = sorted({r["rank"] for r in rows if "rank" in r})

    def get(rank, provider, metric):
        for r in rows:
            if r.get("rank") == rank and r["provider"] == provider and r["metric"] == metric:
                return r["value"]
        return None

    modes = [m for m in MODES if get(ranks[0], m, "passed") is not None]
    lines = [
        f"# Tensor-parallel decoder, {base['world']} processes ({base['backend']})", "",
        f"Machine: {base['machine']} (host {base['host']}); torch {base['torch']}, triton {base['triton']}, "
        f"git {base['git']}, {base['date']}.", "",
        f"Model: {base['shape']}. Pass: cosine with the single-device run >= LOGITS_COSINE (tests/accuracy.py) on "
        "every rank, and evidence that flag_gems ran (use_gems: kernels recorded after they returned; compiled: "
        "fusions, no fallback).", "",
        "| mode | rank | device | passed | cosine | max abs err vs single | vs fp64 | vs rank 0 | first call s | ms/step |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for rank in ranks:
        dev = next(r["rank_gpu"] + " " + r["device"] for r in rows if r.get("rank") == rank)
        lines.append(f"| single device, unsplit | {rank} | {dev} | reference | | | "
                     f"{get(rank, 'single_device_eager', 'max_abs_err_fp64'):.3g} | | | "
                     f"{get(rank, 'single_device_eager', 'ms_per_step'):.3f} |")
    for mode in modes:
        for rank in ranks:
            dev = next(r["rank_gpu"] + " " + r["device"] for r in rows if r.get("rank") == rank)
            lines.append(
                f"| {mode} | {rank} | {dev} | {'yes' if get(rank, mode, 'passed') else 'NO'} | "
                f"{get(rank, mode, 'cosine'):.6f} | {get(rank, mode, 'max_abs_err'):.3g} | "
                f"{get(rank, mode, 'max_abs_err_fp64'):.3g} | {get(rank, mode, 'max_diff_rank0'):.3g} | "
                f"{get(rank, mode, 'first_call_s'):.2f} | {get(rank, mode, 'ms_per_step'):.3f} |")
    lines.append("")
    for mode in modes:
        for rank in ranks:
            ev = get(rank, mode, "evidence")
            if ev:
                lines.append(f"- {mode}, rank {rank}: {json.dumps(ev, sort_keys=True)}")
    cache = next(r["value"] for r in rows if r["metric"] == "shared_cache")
    lines += ["", f"Tuning cache (GEMS_AUTOTUNE={cache['autotune']}, shared folder, fresh at start: "
              f"{cache['fresh_at_start']}): {cache['records']} valid records in {cache['files']} files, "
              f"{len(cache['invalid'])} invalid, {len(cache['tmp_left'])} temporary files left; "
              f"{'clean' if cache['passed'] else 'NOT CLEAN'}."]
    for rank in ranks:
        lines.append(f"- rank {rank}: keys decided {get(rank, 'tuning', 'origins')}"
                     + (f", explicit tuning {get(rank, 'tuning', 'explicit_tuning')}"
                        if get(rank, 'tuning', 'explicit_tuning') else "")
                     + f", autotune warnings {len(get(rank, 'tuning', 'autotune_warnings') or [])}")
    env = next(r["value"] for r in rows if r["metric"] == "multicast_off")
    lines += ["", "NVLink multicast off: " + ", ".join(f"{k}={v}" for k, v in env.items()) + "."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(_HERE, "results"))
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: CUDA (NCCL) when there is a GPU, else the CPU (gloo, Triton's interpreter)")
    p.add_argument("--size", choices=list(SIZES), default=None, help="default on a GPU, tiny on the CPU")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--modes", nargs="*", choices=MODES, default=list(MODES))
    p.add_argument("--iters", type=int, default=None, help="timed steps per mode (20 on a GPU, 2 on the CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="shared tuning cache folder (default: a fresh one)")
    args = p.parse_args(argv)
    gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.size = args.size or ("default" if gpu else "tiny")
    args.iters = args.iters or (20 if gpu else 2)
    rows, ok = run_rank(args)
    if rows:
        world = rows[0]["world"]
        tag = f"{world}x_{file_tag(rows[0])}"
        text = markdown(rows)
        paths = write_rows(rows, args.out, f"multigpu_tp_{tag}", text)
        print(text)
        print("wrote", *paths)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
