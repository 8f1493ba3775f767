"""FlagGems' documented use cases (``seeds/use-cases.md``), rebuilt without hub access, every entry on.

1. ``torch.ops.flag_gems.add_tensor`` on every device there is, from threads, under ``torch.compile``;
3. a LLaVA-shaped vision-language model (tiny CLIP vision tower + Llama text model): logits
   with and without flag_gems;
4. LLaMA: generated tokens identical with and without flag_gems (greedy and beam search);
5. BERT in fp16 / fp32 / bf16 against an fp32 reference;
8. ``torch.library.opcheck`` of ``add_tensor`` on the seeds' four input pairs.

Models are built from small configs with random weights (fixed seed), inputs are random token
ids (no tokenizer, no images from the web). Comparisons use the seeds' rule: allclose at
``SEEDS_ATOL_RTOL``, else cosine similarity >= ``SEEDS_COSINE`` (tests/accuracy.py); where the
seeds' fallback is not needed (fp32) the tests demand the allclose branch.

What ran is proven without trusting a line written before the work:

- a probe wraps every registry entry's implementation and counts a call only after it
  returned (a kernel that raises on every call counts nothing; the eager mode then falls back
  to the native kernel, and the result alone would look fine);
- poison: with one named entry's output overwritten by NaN after its kernel returned, the
  model's output has NaN: that entry's output is what the model consumed (not discarded, not
  recomputed natively);
- in fp32 the result differs bitwise from native PyTorch's somewhere (our kernels accumulate in
  another order), yet within tolerance: a run in which nothing of ours ran would be bitwise
  native. (Not in fp16/bf16: at these sizes rounding to 16 bits hides the fp32 differences, and
  such runs are often bitwise native although every kernel ran.)

The record log (``record=True, once=True``) must name the same ops.
"""

from __future__ import annotations

import collections
import dataclasses
import threading

import pytest
import torch
from torch.library import opcheck

import flag_gems
from accuracy import DEVICE, DTYPE_IDS, DTYPES, OPCHECK_UTILS, SEEDS_ATOL_RTOL, SEEDS_COSINE, assert_close, rand, ref64, tag
from flag_gems.lowerings.registry import REGISTRY

transformers = pytest.importorskip("transformers")

aten = torch.ops.aten


def every_entry(**kwargs):
    """``flag_gems.use_gems()``: every registry entry on, as FlagGems' ``use_gems()`` means."""
    return flag_gems.use_gems(**kwargs)


def test_use_gems_means_every_entry():
    with every_entry():
        live = set(flag_gems.all_registered_ops())
    assert len(live) == len(REGISTRY), f"use_gems() registers {len(live)} of {len(REGISTRY)} entries"


@pytest.fixture(autouse=True)
def _off():
    flag_gems.disable()
    yield
    flag_gems.disable()


class Probe:
    """Counts, per aten overload, the calls whose flag_gems implementation returned.

    Every registry entry is replaced (for the test) by a copy whose ``impl`` calls the real one
    and counts only after it returned; ``poison(target)`` makes an entry overwrite its (first)
    output with NaN after its kernel returned.
    """

    def __init__(self, monkeypatch):
        self.returned = collections.Counter()
        self._monkeypatch = monkeypatch
        for target, entry in list(REGISTRY.items()):
            monkeypatch.setitem(REGISTRY, target, dataclasses.replace(entry, impl=self._counting(target, entry.impl)))

    def _counting(self, target, impl):
        def probed(*args, **kwargs):
            out = impl(*args, **kwargs)
            self.returned[target] += 1  # after the kernel returned
            return out

        return probed

    def poison(self, target):
        impl = REGISTRY[target].impl

        def poisoned(*args, **kwargs):
            out = impl(*args, **kwargs)
            (out[0] if isinstance(out, (tuple, list)) else out).fill_(float("nan"))
            return out

        self._monkeypatch.setitem(REGISTRY, target, dataclasses.replace(REGISTRY[target], impl=poisoned))

    def ran(self) -> set:
        return {t for t, n in self.returned.items() if n > 0}

    def reset(self):
        self.returned.clear()


@pytest.fixture
def probe(monkeypatch):
    """A :class:`Probe`, with the test device's aten ops on their Python kernels.

    Where the C++ runtime serves the device (``CUDA``), the eager mode registers its C++ wrappers
    for the aten ops it covers (add, mm, bmm, cat, sum, ...): those calls never reach Python,
    and their own tests (tests/test_cpp_*.py) prove what they run. Here the runtime is
    uninstalled from the device's key for the test, so that every entry runs its probed Python
    kernel, and installed again after.
    """
    from flag_gems import c_runtime

    key = "CUDA" if DEVICE == "cuda" else "CPU"
    served = c_runtime.available and key in c_runtime.installed_keys()
    if served:
        c_runtime.uninstall(key)
    try:
        yield Probe(monkeypatch)
    finally:
        flag_gems.disable()
        if served:
            c_runtime.install(key)


def logged(path) -> set:
    """Op names the record log shows as run by flag_gems (``... : GEMS ADD_TENSOR``)."""
    return {line.split(": GEMS ", 1)[1].strip() for line in path.read_text().splitlines() if ": GEMS " in line}


def log_name(target) -> str:
    """The record log's name of an overload (``aten.add.Tensor`` -> ``ADD_TENSOR``, ``mm.default`` -> ``MM``)."""
    base, overload = target._schema.name.split("::", 1)[1], target._schema.overload_name
    inplace = base.endswith("_")
    stem = base[:-1] if inplace else base
    return stem.upper() + (f"_{overload.upper()}" if overload else "") + ("_" if inplace else "")


def seeds_match(ref, out):
    """The seeds' comparison: ``(allclose, maxdiff, cosine)``; they accept allclose or cosine >= SEEDS_COSINE."""
    atol, rtol = SEEDS_ATOL_RTOL
    ref, out = ref.detach().double().cpu(), out.detach().double().cpu()
    close = torch.allclose(ref, out, atol=atol, rtol=rtol)
    cosine = torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0, eps=1e-6).item()
    return close, (ref - out).abs().max().item(), cosine


def assert_ran(probe, expected, log, what):
    """Every ``expected`` overload returned from its flag_gems kernel, and the record log names it."""
    missing = {str(t) for t in expected} - {str(t) for t in probe.ran()}
    assert not missing, f"{what} no flag_gems kernel returned for {sorted(missing)}; ran: {sorted(map(str, probe.ran()))}"
    names = {log_name(t) for t in expected}
    assert names <= logged(log), f"{what} record log lacks {sorted(names - logged(log))}"


def assert_differs(a, b, what):
    """Some element differs bitwise: something other than the native kernels produced ``a``."""
    a = a if isinstance(a, (list, tuple)) else [a]
    b = b if isinstance(b, (list, tuple)) else [b]
    assert any(not torch.equal(x, y) for x, y in zip(a, b)), f"{what} is bitwise the native result"


# ------------------------------------------------------------------ tiny models

LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
BERT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, type_vocab_size=2, pad_token_id=0)
CLIP = dict(hidden_size=32, intermediate_size=48, projection_dim=32, num_hidden_layers=2, num_attention_heads=2,
            image_size=16, patch_size=4)  # 16 patches
IMAGE_TOKEN = LLAMA["vocab_size"] - 1
N_PATCHES = (CLIP["image_size"] // CLIP["patch_size"]) ** 2


def build(model_cls, config, device, dtype=torch.float32):
    torch.manual_seed(0)
    return model_cls(config).to(device=device, dtype=dtype).eval()


def prompt_ids(n, device):
    """A prompt of ``n`` random token ids after BOS (stands in for the tokenizer's output)."""
    return torch.cat([torch.tensor([LLAMA["bos_token_id"]]), torch.randint(3, IMAGE_TOKEN, (n,))])[None].to(device)


# ------------------------------------------------------------------ 4. LLaMA


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam3"])
def test_llama_generate_is_identical(num_beams, device, probe, tmp_path):
    model = build(transformers.LlamaForCausalLM, transformers.LlamaConfig(**LLAMA), device)
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=num_beams, pad_token_id=LLAMA["pad_token_id"],
              return_dict_in_generate=True, output_logits=True)
    log = tmp_path / "ops.log"
    # Prompt lengths (the seeds loop over four prompts); beam search costs num_beams times more: one.
    for n in ((4, 7) if num_beams == 1 else (5,)):
        ids = prompt_ids(n, device)
        with torch.no_grad():
            ref = model.generate(ids, **kw)
            with every_entry(record=True, once=True, path=log):
                out = model.generate(ids, **kw)
        what = f"[llama generate num_beams={num_beams} prompt={n}]"
        assert torch.equal(out.sequences, ref.sequences), f"{what} {out.sequences.tolist()} != {ref.sequences.tolist()}"
        for step, (a, b) in enumerate(zip(out.logits, ref.logits)):
            close, maxdiff, _ = seeds_match(b, a)
            assert close, f"{what} step {step} logits maxdiff {maxdiff}"
        assert_differs(list(out.logits), list(ref.logits), f"{what} logits")
    expected = {aten.mm.default, aten.mean.dim, aten.rsqrt.default, aten.silu.default, aten.mul.Tensor,
                aten.embedding.default, aten.cos.default, aten.sin.default, aten.cat.default,
                aten.scaled_dot_product_attention.default}
    if num_beams > 1:
        expected |= {aten._log_softmax.default, aten.gather.default, aten.index_select.default}
    assert_ran(probe, expected, log, f"[llama generate num_beams={num_beams}]")


def test_llama_gemm_output_is_what_the_model_consumed(device, probe):
    """Poison: NaN written into the GEMM entry's output after its kernel returned reaches the logits."""
    model = build(transformers.LlamaForCausalLM, transformers.LlamaConfig(**LLAMA), device)
    ids = prompt_ids(6, device)
    probe.poison(aten.mm.default)
    with torch.no_grad(), every_entry():
        out = model(ids).logits
    assert aten.mm.default in probe.ran() and out.isnan().all(), "[llama] the GEMM entry's output did not reach the logits"


# ------------------------------------------------------------------ 5. BERT

BERT_PROMPTS = (5, 8, 3, 6)  # token counts of the seeds' four prompts, give or take


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bert_against_fp32_reference(dtype, device, probe, tmp_path):
    ref_model = build(transformers.BertModel, transformers.BertConfig(**BERT), device)
    model = build(transformers.BertModel, transformers.BertConfig(**BERT), device, dtype)
    log = tmp_path / "ops.log"
    for n in BERT_PROMPTS:
        ids = torch.randint(3, BERT["vocab_size"], (1, n), device=device)
        inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))
        with torch.no_grad():
            ref = ref_model(**inputs).last_hidden_state.to(dtype)
            native = model(**inputs).last_hidden_state
            with every_entry(record=True, once=True, path=log):
                out = model(**inputs).last_hidden_state
        what = f"[bert dtype={dtype} tokens={n}]"
        assert out.dtype == dtype and torch.isfinite(out).all(), what
        close, maxdiff, cosine = seeds_match(ref, out)
        assert close or (dtype != torch.float32 and cosine >= SEEDS_COSINE), f"{what} maxdiff {maxdiff} cosine {cosine}"
        if dtype == torch.float32:
            assert_differs(out, native, f"{what} last_hidden_state")
    expected = {aten.native_layer_norm.default, aten.gelu.default, aten.addmm.default, aten.embedding.default,
                aten.add.Tensor}
    assert_ran(probe, expected, log, f"[bert dtype={dtype}]")
    probe.poison(aten.native_layer_norm.default)
    with torch.no_grad(), every_entry():
        out = model(**inputs).last_hidden_state
    assert out.isnan().all(), f"[bert dtype={dtype}] the layer_norm entry's output did not reach the hidden state"


# ------------------------------------------------------------------ 3. LLaVA


def llava(device):
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**CLIP),
        text_config=transformers.LlamaConfig(**LLAMA),
        image_token_index=IMAGE_TOKEN,
        image_seq_length=N_PATCHES,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",  # drops CLS: one feature per patch
    )
    return build(transformers.LlavaForConditionalGeneration, cfg, device)


def llava_inputs(device):
    """"USER: <image>\\nWhat's the content of the image? ASSISTANT:" as ids: text, one image token per
    patch (what the processor expands ``<image>`` to), text; and a random image."""
    text = lambda n: torch.randint(3, IMAGE_TOKEN, (n,))  # noqa: E731
    ids = torch.cat([torch.tensor([LLAMA["bos_token_id"]]), text(3), torch.full((N_PATCHES,), IMAGE_TOKEN), text(9)])
    pixels = rand(1, 3, CLIP["image_size"], CLIP["image_size"], device=device)
    return dict(input_ids=ids[None].to(device), attention_mask=torch.ones(1, ids.numel(), dtype=torch.long,
                device=device), pixel_values=pixels)


def test_llava_logits(device, probe, tmp_path):
    model = llava(device)
    inputs = llava_inputs(device)
    log = tmp_path / "ops.log"
    with torch.no_grad():
        ref = model(**inputs).logits
        with every_entry(record=True, once=True, path=log):
            out = model(**inputs).logits
    close, maxdiff, cosine = seeds_match(ref, out)
    assert close, f"[llava] maxdiff {maxdiff} cosine {cosine}"  # fp32: the seeds' allclose branch, no fallback
    assert_differs(out, ref, "[llava] logits")
    # Vision tower (CLIP: layer norms, quick-GELU, addmm), projector (GELU) and Llama text model.
    expected = {aten.native_layer_norm.default, aten.sigmoid.default, aten.gelu.default, aten.addmm.default,
                aten.mm.default, aten.mean.dim, aten.rsqrt.default, aten.silu.default,
                aten.scaled_dot_product_attention.default}
    assert_ran(probe, expected, log, "[llava]")
    # Poison in the vision tower (the Llama text model has no layer norm): the image features
    # computed by our kernels reach the logits of the tokens from the image on.
    probe.poison(aten.native_layer_norm.default)
    with torch.no_grad(), every_entry():
        poisoned = model(**inputs).logits
    first_image = 1 + 3
    assert poisoned[:, first_image:].isnan().all(), "[llava] the vision tower's layer_norm output did not reach the logits"


# ------------------------------------------------------------------ 1. add_tensor: devices, threads, compile


def cpp_launches() -> int:
    """Kernel launches made by the C++ runtime's wrappers so far (0 without the runtime)."""
    from flag_gems import c_runtime

    if not c_runtime.available:
        return 0
    stats = c_runtime.stats()
    return stats["cpp_launches"] + stats["python_launches"]


class AddProbe:
    """Counts runs of the kernel behind ``torch.ops.flag_gems.add_tensor``: on the Python path, calls
    of its launcher that returned; where the C++ runtime serves the device (the seeds' use case 1 is
    the C++ runtime's), the launches its wrappers made."""

    def __init__(self, monkeypatch):
        import flag_gems.lowerings.add as add_mod

        self.python = 0
        self._lock = threading.Lock()
        self._cpp0 = cpp_launches()
        real = add_mod._ADD
        probe = self

        class Counting:
            def __getattr__(self, name):
                return getattr(real, name)

            def __call__(self, *args, **kwargs):
                out = real(*args, **kwargs)
                with probe._lock:
                    probe.python += 1  # after the launcher returned
                return out

        monkeypatch.setattr(add_mod, "_ADD", Counting())

    @property
    def returned(self) -> int:
        return self.python + cpp_launches() - self._cpp0


def devices():
    """Every device there is: each CUDA device (the seeds use cuda:0 .. cuda:3), else the CPU."""
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


def test_add_tensor_on_every_device_and_from_threads(monkeypatch):
    counter = AddProbe(monkeypatch)
    results, errors = {}, []
    with every_entry():
        for dev in devices():
            x = rand(10, device=dev)
            out = torch.ops.flag_gems.add_tensor(x, x)
            assert out.device == x.device
            assert_close(out, 2 * ref64(x), torch.float32, tag(f"add_tensor[{dev}]", x.shape, torch.float32))

        def f(i, x):
            try:
                results[i] = (x, torch.ops.flag_gems.add_tensor(x, x))
            except Exception as e:  # noqa: BLE001  (reported below, with the thread's device)
                errors.append((i, e))

        threads = [threading.Thread(target=f, args=(i, rand(10, device=dev))) for i, dev in enumerate(devices() * 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    assert len(results) == len(threads)
    for i, (x, out) in results.items():
        assert_close(out, 2 * ref64(x), torch.float32, tag(f"add_tensor[thread {i}, {x.device}]", x.shape, torch.float32))
    assert counter.returned >= len(devices()) + len(threads)


def test_add_tensor_under_torch_compile(monkeypatch, fresh_dynamo):
    counter = AddProbe(monkeypatch)
    dev = devices()[-1]  # the seeds compile on cuda:1: any device but the first when there are several

    def f(x, y):
        return torch.ops.flag_gems.add_tensor(x, y)

    F = torch.compile(f)  # the default backend, as in the seeds
    x = rand(2, 1, 3, device=dev, requires_grad=True)
    y = rand(4, 1, device=dev, requires_grad=True)
    with every_entry():
        out = F(x, y)
        out.backward(torch.ones_like(out))
    ref = ref64(x) + ref64(y)
    assert out.shape == (2, 4, 3) and out.device == x.device
    assert_close(out, ref, torch.float32, tag("add_tensor[compiled]", out.shape, torch.float32))
    assert torch.equal(x.grad, torch.full_like(x, 4.0)) and torch.equal(y.grad, torch.full_like(y, 6.0))
    assert counter.returned >= 1  # the compiled graph called the op, and its kernel returned


# ------------------------------------------------------------------ 8. opcheck


def test_opcheck_seed_inputs(monkeypatch):
    counter = AddProbe(monkeypatch)
    dev = devices()[0]
    inputs = [
        (torch.randn(2, 8, 4, device=dev), torch.randn(4, device=dev)),
        (torch.randn(3, 8, 4, device=dev, requires_grad=True), torch.randn(3, 1, 4, device=dev)),
        (torch.randn(2, 8, 4, device=dev), torch.randn(1, 4, device=dev, requires_grad=True)),
        (torch.randn(2, 1, 4, device=dev, requires_grad=True), torch.randn(2, 8, 1, device=dev, requires_grad=True)),
    ]
    with every_entry():
        for args in inputs:
            before = counter.returned
            opcheck(torch.ops.flag_gems.add_tensor.default, args, test_utils=OPCHECK_UTILS)
            assert counter.returned > before, f"[opcheck add_tensor {[list(a.shape) for a in args]}] no kernel ran"
    assert OPCHECK_UTILS == ("test_schema", "test_autograd_registration", "test_faketensor",
                             "test_aot_dispatch_static", "test_aot_dispatch_dynamic")  # the seeds' five
    # After the block, tracing again must not reach kernels that the block registered (the Python
    # dispatcher's cached resolutions of them crashed the process once: eager._forget_dispatch_cache).
    torch._dynamo.reset()
    f = torch.compile(lambda x: x.clone() * 2 + 1, backend="aot_eager")
    x = rand(4, device=dev)
    assert_close(f(x), 2 * ref64(x) + 1, torch.float32, tag("compile after opcheck", x.shape, torch.float32))
