"""A vLLM-shaped compile and CUDA-graph harness for machines without vLLM (the GPU runner has none).

It reproduces what vLLM's mode 3 (``VLLM_COMPILE``) does to a decoder, with the graph forms
vLLM's layers produce there (the native math of RMSNorm with residual, SiLU·mul, rotary
embedding from a ``cos_sin_cache``, DeepSeek's YaRN rope on interleaved pairs):

1. **One Dynamo capture**, the token dim symbolic (``mark_dynamic``), guards dropped (vLLM
   compiles once and never re-traces).
2. **Split at the attention op** (vLLM's ``splitting_ops``): ``gems_harness::attention`` writes
   into an output buffer that the piece before it allocated (vLLM's
   ``unified_attention_with_output``) and reads / writes the KV cache through a forward
   context; it runs eagerly, outside CUDA graphs.
3. **Per-piece compilation**: Inductor for the symbolic size (fake inputs taken from the graph)
   and once per capture size (the size made concrete), with the post-grad custom pass being
   ``flag_gems.vllm_pass`` or nothing (Inductor alone). Without a GPU the pieces go through
   Inductor's pipeline up to code generation and run as post-grad graphs (``codegen=False``).
4. **Warm-up and capture per size**, largest first: one eager run of the compiled pieces (where
   kernels compile and tune), then each piece captured as its own CUDA graph into one shared pool
   (piecewise CUDA graphs).
5. **Replay with new data** copied into persistent input buffers (vLLM's model-runner buffers),
   attention running between the replays.

``torch.cuda.set_sync_debug_mode("error")`` is on inside each piece's capture (torch's own
synchronization when a capture starts and ends is outside it) and around replays: a kernel that
synchronizes the host there fails, as it would break vLLM's capture. The warm-up runs before
are free to (our kernels tune a shape they have not seen there, as vLLM's warm-up allows).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import operator
import types

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

# ------------------------------------------------------------------ attention (the splitting op)


@dataclasses.dataclass
class AttentionContext:
    """What vLLM's forward context gives attention: the KV caches and the batch's metadata."""

    k_cache: list  # per layer [n_seqs, max_len, kv_heads, qk_dim]
    v_cache: list  # per layer [n_seqs, max_len, kv_heads, v_dim]
    positions: Tensor  # persistent [max_tokens] int64 (the model's input too)
    seq_idx: Tensor  # persistent [max_tokens] int64: the sequence each token belongs to
    heads: int
    kv_heads: int
    qk_dim: int
    v_dim: int
    prefill: bool = False  # one sequence at positions 0..T-1 (causal attention over the step's tokens)
    scale: float | None = None
    context_len: int | None = None  # decode reads cache rows [0, context_len) (all when None)


CONTEXT: AttentionContext | None = None


@contextlib.contextmanager
def attention_context(ctx: AttentionContext):
    global CONTEXT
    prev, CONTEXT = CONTEXT, ctx
    try:
        yield ctx
    finally:
        CONTEXT = prev


@torch.library.custom_op("gems_harness::attention", mutates_args=("out",))
def attention(q: Tensor, k: Tensor, v: Tensor, out: Tensor, layer: int) -> None:
    """Write the step's k / v into the layer's cache and ``out <- softmax(q k^T) v`` over each
    token's sequence up to its position (no host synchronization: masks, not lengths)."""
    c = CONTEXT
    t = q.shape[0]
    qh = q.view(t, c.heads, c.qk_dim)
    kh, vh = k.view(t, c.kv_heads, c.qk_dim), v.view(t, c.kv_heads, c.v_dim)
    pos, seq = c.positions[:t], c.seq_idx[:t]
    kc, vc = c.k_cache[layer], c.v_cache[layer]
    kc[seq, pos] = kh.to(kc.dtype)
    vc[seq, pos] = vh.to(vc.dtype)
    scale = c.scale if c.scale is not None else 1.0 / math.sqrt(c.qk_dim)
    group = c.heads // c.kv_heads
    if c.prefill:
        o = F.scaled_dot_product_attention(
            qh.transpose(0, 1)[None], kh.transpose(0, 1)[None].repeat_interleave(group, 1),
            vh.transpose(0, 1)[None].repeat_interleave(group, 1), is_causal=True, scale=scale,
        )[0].transpose(0, 1)
    else:
        n = c.context_len or kc.shape[1]
        keys, values = kc[seq, :n], vc[seq, :n]  # [t, n, kv_heads, d]: each token's sequence
        qg = qh.view(t, c.kv_heads, group, c.qk_dim).to(keys.dtype)
        scores = torch.einsum("tkgd,tnkd->tkgn", qg, keys).float() * scale
        visible = torch.arange(n, device=q.device)[None, :] <= pos[:, None]  # [t, n]
        probs = scores.masked_fill(~visible[:, None, None, :], float("-inf")).softmax(-1).to(values.dtype)
        o = torch.einsum("tkgn,tnkd->tkgd", probs, values)
    out.copy_(o.reshape(out.shape))


@attention.register_fake
def _(q, k, v, out, layer):
    return None


# ------------------------------------------------------------------ layers in vLLM's native forms


def rms_norm(x, w, eps):
    """vLLM IR ``rms_norm``'s native implementation, as the graph holds it after IR lowering."""
    d = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (h.to(w.dtype) * w).to(d)


def fused_add_rms_norm(x, residual, w, eps):
    """vLLM IR ``fused_add_rms_norm``'s native implementation: returns ``(y, x + residual)``."""
    d = x.dtype
    h = x.to(torch.float32) + residual.to(torch.float32)
    residual = h.to(d)
    h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (h.to(w.dtype) * w).to(d), residual


def silu_and_mul(x):
    """``SiluAndMul.forward_native``."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def rope_cache(rotary_dim, max_pos, base, dtype, device, yarn: dict | None = None):
    """vLLM's ``cos_sin_cache [max_pos, rotary_dim]`` (cos | sin); with ``yarn`` DeepSeek's YaRN
    scaling (``factor``, ``original_max_position_embeddings``, ``beta_fast``, ``beta_slow``,
    ``mscale``, ``mscale_all_dim``): interpolated low frequencies, magnitude ``mscale``."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    inv_freq = base ** -exponents
    mscale = 1.0
    if yarn:
        factor, orig = yarn["factor"], yarn["original_max_position_embeddings"]

        def dim_for(rotations):  # the dim index whose wavelength fits `rotations` turns in `orig` positions
            return rotary_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(dim_for(yarn["beta_fast"])), 0)
        high = min(math.ceil(dim_for(yarn["beta_slow"])), rotary_dim - 1)
        ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
        keep = 1 - ramp  # 1: extrapolate (high frequency), 0: interpolate
        inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep

        def m(scale):
            return 1.0 if factor <= 1 else 0.1 * scale * math.log(factor) + 1.0

        mscale = m(yarn["mscale"]) / m(yarn["mscale_all_dim"])
        max_pos = int(orig * factor)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq)
    cache = torch.cat((freqs.cos() * mscale, freqs.sin() * mscale), -1)
    return cache.to(device=device, dtype=dtype)


def rope_neox(positions, x, head_size, cache):
    """``RotaryEmbedding.forward_static`` (rotate-half, ``ApplyRotaryEmb``'s halves form), partial dims."""
    rot = cache.shape[1]
    cos, sin = cache.index_select(0, positions).chunk(2, dim=-1)
    shape = x.shape
    x = x.view(positions.shape[0], -1, head_size)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    x1, x2 = torch.chunk(x_rot, 2, dim=-1)
    x_rot = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((x_rot, x_pass), dim=-1).reshape(shape)


def rope_deepseek(positions, x, cache):
    """``DeepseekScalingRotaryEmbedding.forward_static`` with interleaved pairs (GPT-J style):
    ``x * cos + rotate_gptj(x) * sin`` with tables repeated per pair; ``x [T, heads, rot]``."""
    cos, sin = cache[positions].chunk(2, dim=-1)
    cos = cos.repeat_interleave(2, dim=-1).unsqueeze(-2)
    sin = sin.repeat_interleave(2, dim=-1).unsqueeze(-2)
    rotated = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    return x * cos + rotated * sin


# ------------------------------------------------------------------ models


@dataclasses.dataclass(frozen=True)
class Shape:
    """A decoder's dimensions; ``kind`` ``"llama"`` (GQA, neox rope) or ``"deepseek"`` (MLA-like
    latent projections, YaRN rope on the last ``rope_dim`` of each q / k head, interleaved)."""

    kind: str
    vocab: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    layers: int
    max_pos: int = 4096
    rope_dim: int = 0  # deepseek: the rotated part of each head
    lora: int = 0  # deepseek: kv latent rank (and q's)
    eps: float = 1e-6

    @property
    def qk_dim(self):
        return self.head_dim + self.rope_dim if self.kind == "deepseek" else self.head_dim


LLAMA_TINY = Shape("llama", vocab=97, hidden=64, heads=4, kv_heads=2, head_dim=16, inter=96, layers=2, max_pos=256)
DEEPSEEK_TINY = Shape("deepseek", vocab=97, hidden=64, heads=4, kv_heads=4, head_dim=16, inter=96, layers=2,
                      max_pos=256, rope_dim=16, lora=32)
LLAMA3_8B = Shape("llama", vocab=128256, hidden=4096, heads=32, kv_heads=8, head_dim=128, inter=14336, layers=4,
                  max_pos=8192)
YARN = {"factor": 4.0, "original_max_position_embeddings": 1024, "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
        "mscale_all_dim": 0.707}


class Decoder(nn.Module):
    """A decoder in vLLM's layer forms. ``forward(input_ids, positions) -> logits``; attention
    goes through ``torch.ops.gems_harness.attention`` (the current :class:`AttentionContext`)."""

    def __init__(self, shape: Shape, dtype=torch.bfloat16, device="cpu", seed: int = 0, init: bool = True):
        super().__init__()
        self.shape = s = shape
        g = torch.Generator(device=device).manual_seed(seed)

        def param(*size, scale=None, mean=0.0):
            if not init:  # filled by load_state_dict
                return nn.Parameter(torch.empty(*size, device=device, dtype=dtype), requires_grad=False)
            scale = scale if scale is not None else 1.0 / math.sqrt(size[-1])
            w = torch.randn(*size, generator=g, device=device) * scale + mean
            return nn.Parameter(w.to(dtype), requires_grad=False)

        self.embed = param(s.vocab, s.hidden, scale=1.0)
        self.layers = nn.ModuleList()
        for _ in range(s.layers):
            layer = nn.Module()
            layer.norm1, layer.norm2 = param(s.hidden, scale=0.2, mean=1.0), param(s.hidden, scale=0.2, mean=1.0)
            if s.kind == "llama":
                layer.qkv = param((s.heads + 2 * s.kv_heads) * s.head_dim, s.hidden)
            else:
                layer.q_a = param(s.lora, s.hidden)
                layer.q_a_norm = param(s.lora, scale=0.2, mean=1.0)
                layer.q_b = param(s.heads * s.qk_dim, s.lora)
                layer.kv_a = param(s.lora + s.rope_dim, s.hidden)
                layer.kv_a_norm = param(s.lora, scale=0.2, mean=1.0)
                layer.kv_b = param(s.heads * 2 * s.head_dim, s.lora)
            layer.o = param(s.hidden, s.heads * s.head_dim)
            layer.gate_up = param(2 * s.inter, s.hidden)
            layer.down = param(s.hidden, s.inter)
            self.layers.append(layer)
        self.norm = param(s.hidden, scale=0.2, mean=1.0)
        self.lm_head = param(s.vocab, s.hidden)
        if s.kind == "llama":
            cache = rope_cache(s.head_dim, s.max_pos, 500000.0, dtype, device)
        else:
            cache = rope_cache(s.rope_dim, s.max_pos, 10000.0, dtype, device, YARN)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def _attention_inputs(self, layer, positions, h):
        s = self.shape
        t = h.shape[0]
        if s.kind == "llama":
            q, k, v = F.linear(h, layer.qkv).split([s.heads * s.head_dim, s.kv_heads * s.head_dim,
                                                     s.kv_heads * s.head_dim], dim=-1)
            q = rope_neox(positions, q, s.head_dim, self.cos_sin_cache)
            k = rope_neox(positions, k, s.head_dim, self.cos_sin_cache)
            return q, k, v
        q = F.linear(rms_norm(F.linear(h, layer.q_a), layer.q_a_norm, s.eps), layer.q_b).view(t, s.heads, s.qk_dim)
        q_nope, q_pe = q.split([s.head_dim, s.rope_dim], dim=-1)
        latent, k_pe = F.linear(h, layer.kv_a).split([s.lora, s.rope_dim], dim=-1)
        kv = F.linear(rms_norm(latent, layer.kv_a_norm, s.eps), layer.kv_b).view(t, s.heads, 2 * s.head_dim)
        k_nope, v = kv.split([s.head_dim, s.head_dim], dim=-1)
        q_pe = rope_deepseek(positions, q_pe, self.cos_sin_cache)
        k_pe = rope_deepseek(positions, k_pe.unsqueeze(1), self.cos_sin_cache)
        q = torch.cat((q_nope, q_pe), dim=-1)
        k = torch.cat((k_nope, k_pe.expand(t, s.heads, s.rope_dim)), dim=-1)
        return q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        s = self.shape
        h = F.embedding(input_ids, self.embed)
        residual = None
        for i, layer in enumerate(self.layers):
            if residual is None:
                residual, h = h, rms_norm(h, layer.norm1, s.eps)
            else:
                h, residual = fused_add_rms_norm(h, residual, layer.norm1, s.eps)
            q, k, v = self._attention_inputs(layer, positions, h)
            out = torch.empty(h.shape[0], s.heads * s.head_dim, dtype=h.dtype, device=h.device)
            torch.ops.gems_harness.attention(q, k, v, out, i)
            h = F.linear(out, layer.o)
            h, residual = fused_add_rms_norm(h, residual, layer.norm2, s.eps)
            h = F.linear(silu_and_mul(F.linear(h, layer.gate_up)), layer.down)
        h, _ = fused_add_rms_norm(h, residual, self.norm, s.eps)
        return F.linear(h, self.lm_head)

    def new_context(self, max_tokens: int, n_seqs: int, max_len: int, dtype=None) -> AttentionContext:
        s = self.shape
        p = self.lm_head
        dtype = dtype or p.dtype
        kc = [torch.zeros(n_seqs, max_len, s.kv_heads if s.kind == "llama" else s.heads, s.qk_dim, dtype=dtype,
                          device=p.device) for _ in range(s.layers)]
        vc = [torch.zeros(n_seqs, max_len, s.kv_heads if s.kind == "llama" else s.heads, s.head_dim, dtype=dtype,
                          device=p.device) for _ in range(s.layers)]
        return AttentionContext(kc, vc, torch.zeros(max_tokens, dtype=torch.long, device=p.device),
                                torch.zeros(max_tokens, dtype=torch.long, device=p.device), s.heads,
                                s.kv_heads if s.kind == "llama" else s.heads, s.qk_dim, s.head_dim)


# ------------------------------------------------------------------ compilation (vLLM's VllmBackend / PiecewiseBackend)


def split_at_attention(gm: fx.GraphModule):
    """Split ``gm`` at each attention call (and its getitems) as vLLM's ``split_graph`` does.

    Returns:
        ``(split_gm, [(submodule name, is_attention)])`` in execution order.
    """
    target = torch.ops.gems_harness.attention.default
    ids, current, attn_ids = {}, 0, set()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] in ids:
            ids[node] = ids[node.args[0]]
            continue
        if node.op == "call_function" and node.target in (target, torch.ops.gems_harness.attention):
            current += 1
            ids[node] = current
            attn_ids.add(current)
            current += 1
        else:
            ids[node] = current
    split = torch.fx.passes.split_module.split_module(gm, None, lambda n: ids[n], keep_original_order=True)
    _tuple_outputs(split)
    names = [name for name, _ in split.named_children()]
    return split, [(name, int(name.split("_")[-1]) in attn_ids) for name in names]


def _tuple_outputs(split: fx.GraphModule) -> None:
    """Make every submodule return a tuple (what AOT autograd and Inductor take), reading a
    single output back with ``getitem`` in the parent (``split_module(tuple_return=True)`` on newer torch)."""
    for node in list(split.graph.nodes):
        if node.op != "call_module":
            continue
        sub = getattr(split, node.target)
        out = next(n for n in sub.graph.nodes if n.op == "output")
        if isinstance(out.args[0], (tuple, list)):
            continue
        out.args = ((out.args[0],),)
        sub.recompile()
        with split.graph.inserting_after(node):
            item = split.graph.call_function(operator.getitem, (node, 0))
        node.replace_all_uses_with(item, delete_user_cb=lambda u: u is not item)
    split.recompile()


def _placeholder_values(gm):
    return [n.meta.get("example_value", n.meta.get("val")) for n in gm.graph.nodes if n.op == "placeholder"]


def _concrete(v, size, device=None):
    """``v`` (SymInt / fake tensor) with every symbol replaced by ``size``: an int or a real empty tensor."""
    def c(x):
        if isinstance(x, torch.SymInt):
            expr = x.node.expr
            return int(expr.subs({sym: size for sym in expr.free_symbols}))
        return int(x)

    if isinstance(v, torch.SymInt):
        return c(v)
    if isinstance(v, Tensor):
        shape, stride = tuple(c(d) for d in v.shape), tuple(c(d) for d in v.stride())
        return torch.empty_strided(shape, stride, dtype=v.dtype, device=device or v.device)
    return v


def _post_grad_only(post_pass):
    """Inductor's pipeline up to code generation, then the post-grad graph run as is (CPU tests)."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._guards import detect_fake_mode
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.fx_passes.post_grad import post_grad_passes
    from torch._inductor.virtualized import V

    patches = {"post_grad_custom_post_pass": post_pass}

    def compile_piece(gm, args):
        if not any(isinstance(a, torch._subclasses.FakeTensor) for a in args):
            # One size: its own static fake mode, away from Dynamo's shape env (as vLLM's
            # create_concrete_args does), so no guard on that env names a symbol of this compile.
            from torch._subclasses.fake_tensor import FakeTensorMode

            fake_mode = FakeTensorMode()
            args = [fake_mode.from_tensor(a, static_shapes=True) if isinstance(a, Tensor) else a for a in args]
            with torch._guards.tracing(None):
                return compile_piece(gm, args)

        def inference(g, example_inputs):
            with V.set_fake_mode(detect_fake_mode(example_inputs)), torch._inductor.config.patch(patches):
                post_grad_passes(g, is_inference=True)
            g.recompile()
            compile_piece.graphs.append(g)
            return make_boxed_func(g.forward)

        with torch._inductor.config.patch(patches):
            return aot_module_simplified(gm, args, fw_compiler=inference, decompositions=select_decomp_table())

    compile_piece.graphs = []
    return compile_piece


def _inductor(post_pass):
    """vLLM's compiler adaptor in short: ``standalone_compile`` with the pass as a config patch."""
    from torch._inductor import standalone_compile

    patches = {"post_grad_custom_post_pass": post_pass} if post_pass is not None else {}

    def compile_piece(gm, args, single_size):
        shapes = "from_example_inputs" if single_size else "from_graph"
        return standalone_compile(gm, args, dynamic_shapes=shapes, options={"config_patches": patches})

    return compile_piece


class Piece(nn.Module):
    """One compiled piece: a runnable per capture size and one for the symbolic size, and a CUDA
    graph per size once captured (vLLM's ``PiecewiseBackend`` + ``CUDAGraphWrapper``)."""

    def __init__(self, gm, runner: "GraphRunner"):
        super().__init__()
        self.runner = runner
        values = _placeholder_values(gm)
        self.size_index = next((i for i, v in enumerate(values) if isinstance(v, torch.SymInt)), None)
        self.tensor_index = next((i for i, v in enumerate(values)
                                  if isinstance(v, Tensor) and v.dim() and isinstance(v.shape[0], torch.SymInt)), None)
        post_grad = runner.codegen is False
        self.compiled = {}
        if post_grad:
            fn = runner.compiler
            self.compiled[None] = fn(gm, values)
            for size in runner.compile_sizes:
                self.compiled[size] = fn(gm, [_concrete(v, size) for v in values])
        else:
            self.compiled[None] = runner.compiler(gm, values, False)
            for size in runner.compile_sizes:
                self.compiled[size] = runner.compiler(gm, [_concrete(v, size) for v in values], True)
        self.graphs: dict = {}  # size -> (CUDAGraph, outputs)

    def _size(self, args):
        if self.size_index is not None:
            return int(args[self.size_index])
        if self.tensor_index is not None:
            return args[self.tensor_index].shape[0]
        return None

    def forward(self, *args):
        size = self._size(args)
        mode = self.runner.mode
        if mode == "replay" and size in self.graphs:
            graph, outputs = self.graphs[size]
            graph.replay()
            return outputs
        fn = self.compiled.get(size, self.compiled[None])
        if mode == "capture" and size in self.runner.capture_sizes and size not in self.graphs:
            graph = torch.cuda.CUDAGraph()
            # torch.cuda.graph synchronizes on entry and exit (its own, allowed); what the piece
            # runs inside must not.
            with torch.cuda.graph(graph, pool=self.runner.pool), sync_debug_error():
                outputs = fn(*args)
            self.graphs[size] = (graph, outputs)
            return outputs
        return fn(*args)


class GraphRunner:
    """vLLM's model runner in short: persistent inputs, one compile, warm-up and capture per size, replays.

    Args:
        model: a :class:`Decoder`.
        max_tokens: the persistent buffers' size (the largest batch).
        post_pass: the post-grad custom pass (``flag_gems.vllm_pass``) or None (Inductor alone).
        capture_sizes: the batch sizes compiled on their own and captured (vLLM's
            ``cudagraph_capture_sizes``); other sizes run the symbolic-size compile.
        codegen: Inductor code generation (GPU); False runs the post-grad graphs (CPU tests).
        n_seqs, max_len: the KV caches' shape.
    """

    def __init__(self, model: Decoder, max_tokens: int, post_pass=None, capture_sizes=(), compile_sizes=None,
                 codegen: bool = True, n_seqs: int = 64, max_len: int = 512):
        self.model = model
        self.post_pass = post_pass
        self.capture_sizes = tuple(sorted(capture_sizes, reverse=True))
        self.compile_sizes = tuple(compile_sizes if compile_sizes is not None else self.capture_sizes)
        self.codegen = codegen
        self.compiler = _inductor(post_pass) if codegen else _post_grad_only(post_pass)
        device = model.lm_head.device
        self.input_ids = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.ctx = model.new_context(max_tokens, n_seqs, max_len)
        self.positions = self.ctx.positions
        self.pieces: list = []
        self.split: fx.GraphModule | None = None
        self.mode = "eager"
        self.pool = None
        # A code object of its own: Dynamo keeps compiled frames on the code object, and with the
        # guards dropped two runners of one model class would share them.
        code = Decoder.forward.__code__.replace(co_name=f"forward_runner_{id(self):x}")
        forward = types.MethodType(types.FunctionType(code, Decoder.forward.__globals__, code.co_name), model)
        self._compiled = torch.compile(forward, backend=self._backend, fullgraph=True, dynamic=False,
                                       options={"guard_filter_fn": lambda entries: [False] * len(entries)})

    def _backend(self, gm, example_inputs):
        split, parts = split_at_attention(gm)
        for name, is_attention in parts:
            if not is_attention:
                piece = Piece(getattr(split, name), self)
                setattr(split, name, piece)
                self.pieces.append((name, piece))
        self.split = split
        return split

    def set_batch(self, input_ids, positions, seq_idx, prefill=False):
        """Copy a step's inputs into the persistent buffers; returns the token count."""
        t = input_ids.shape[0]
        self.input_ids[:t].copy_(input_ids)
        self.positions[:t].copy_(positions)
        self.ctx.seq_idx[:t].copy_(seq_idx)
        self.ctx.prefill = prefill
        return t

    def run(self, t: int) -> Tensor:
        """Run the compiled model on the first ``t`` tokens of the buffers (compiling on the first call)."""
        ids, pos = self.input_ids[:t], self.positions[:t]
        if self.split is None:
            torch._dynamo.mark_dynamic(ids, 0)
            torch._dynamo.mark_dynamic(pos, 0)
        with attention_context(self.ctx), torch.no_grad():
            return self._compiled(ids, pos)

    def capture(self, sizes=None):
        """Per size, largest first: one eager warm-up run, then every piece captured into the shared pool."""
        self.pool = torch.cuda.graph_pool_handle()
        for size in sizes or self.capture_sizes:
            self.ctx.prefill = False
            # The warm-up may synchronize (our kernels tune a new shape there, as vLLM's warm-up
            # allows); capture and replay must not.
            self.mode = "warmup"
            self.run(size)
            self.mode = "capture"  # each piece checks its own capture (Piece.forward)
            self.run(size)
        self.mode = "replay"

    def replay(self, t: int) -> Tensor:
        """Replay the captured graphs for ``t`` tokens (attention eager in between); returns a copy of the logits."""
        self.mode = "replay"
        with sync_debug_error():
            out = self.run(t)
        return out.clone()

    def fused_ops(self) -> set:
        """flag_gems ops in the compiled pieces' post-grad graphs (from the pass reports when compiled by Inductor)."""
        if not self.codegen:
            return {str(n.target) for g in self.compiler.graphs for n in g.graph.nodes
                    if n.op == "call_function" and str(n.target).startswith("flag_gems.")}
        report = self.post_pass.report() if self.post_pass is not None else None
        return set(report.fused) if report is not None else set()


@contextlib.contextmanager
def sync_debug_error():
    """``torch.cuda.set_sync_debug_mode("error")`` for the block (restored after)."""
    if not torch.cuda.is_available():
        yield
        return
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(prev)


# ------------------------------------------------------------------ reference and scenarios


def reference_logits(model: Decoder, ref: Decoder, ref_ctx: AttentionContext, input_ids, positions, seq_idx,
                     prefill: bool) -> Tensor:
    """The fp32 eager reference's logits for one step (``ref`` holds ``model``'s weights in fp32)."""
    t = input_ids.shape[0]
    ref_ctx.positions[:t].copy_(positions)
    ref_ctx.seq_idx[:t].copy_(seq_idx)
    ref_ctx.prefill = prefill
    with attention_context(ref_ctx), torch.no_grad():
        return ref(input_ids, positions).float()


def fp32_copy(model: Decoder) -> Decoder:
    ref = Decoder(model.shape, dtype=torch.float32, device=model.lm_head.device, init=False)
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    ref.cos_sin_cache = model.cos_sin_cache.float()  # the model's rounded cache: the reference reads the same values
    return ref


def decode_batch(shape: Shape, batch: int, max_len: int, n_seqs: int, device, generator):
    """One decode step of ``batch`` sequences at random context lengths: ``(input_ids, positions, seq_idx)``."""
    seq = torch.randperm(n_seqs, generator=generator)[:batch]
    pos = torch.randint(0, max_len - 1, (batch,), generator=generator)
    ids = torch.randint(0, shape.vocab, (batch,), generator=generator)
    return ids.to(device), pos.to(device), seq.to(device)


def prefill_batch(shape: Shape, tokens: int, device, generator):
    ids = torch.randint(0, shape.vocab, (tokens,), generator=generator)
    return ids.to(device), torch.arange(tokens, device=device), torch.zeros(tokens, dtype=torch.long, device=device)


def fill_caches(ctx: AttentionContext, ref_ctx: AttentionContext, generator):
    """The same random KV-cache contents in both contexts (the earlier steps' keys and values)."""
    seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    device_gen = torch.Generator(device=ctx.k_cache[0].device).manual_seed(seed)
    for caches, ref_caches in ((ctx.k_cache, ref_ctx.k_cache), (ctx.v_cache, ref_ctx.v_cache)):
        for c, r in zip(caches, ref_caches):
            values = torch.randn(c.shape, generator=device_gen, device=c.device).to(c.dtype)
            c.copy_(values)
            r.copy_(values.float())


def cosine(a: Tensor, b: Tensor) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


# The model-level accuracy criterion of this project (tests/test_backend_hf.py, benchmarks/bench_model.py):
# logits' cosine similarity with the reference.
LOGITS_COSINE = 0.9995
