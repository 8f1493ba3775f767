"""Real ``transformers`` models under ``flag_gems.use_gems()`` (the seeds' use cases 3-5, no hub access).

Random-weight models built from small configs: greedy ``generate`` gives the same tokens as
eager PyTorch, BERT's last hidden state in fp16/fp32/bf16 matches an fp32 reference, and the
causal LMs' logits match eager in bf16. Each test also checks from the record log that the
registry's entries actually served the forward (a test that ran only native kernels proves nothing).
"""

import pytest
import torch

import flag_gems
from flag_gems.lowerings.registry import REGISTRY

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
EXTRA = {"llama": {}, "qwen2": {}, "mistral": {}, "gemma": {"head_dim": 16}}
BERT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, type_vocab_size=2)


# Every registered entry (what use_gems() registers, excluded entries too): the kernels inside real models.
ALL = sorted(f"{t._opname}.{t._overloadname}" for t in REGISTRY)


@pytest.fixture(autouse=True)
def _off():
    flag_gems.disable()
    yield
    flag_gems.disable()


def causal_lm(model_type, dtype, device):
    cfg = transformers.AutoConfig.for_model(model_type, **BASE, **EXTRA[model_type])
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dtype).eval()


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def served(path):
    """Op names the record log shows (one line per op with ``once=True``)."""
    return {line.split("GEMS ")[1] for line in path.read_text().splitlines()}


@pytest.mark.parametrize("model_type", list(EXTRA))
def test_causal_lm_logits_bf16(model_type, device, tmp_path):
    model = causal_lm(model_type, torch.bfloat16, device)
    ids = torch.randint(3, BASE["vocab_size"], (2, 9), device=device)
    log = tmp_path / "ops.log"
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        with flag_gems.use_gems(include=ALL, record=True, once=True, path=log):
            out = model(ids, use_cache=False).logits
    assert flag_gems.all_registered_ops() == []
    assert torch.isfinite(out).all()
    assert cosine(out, ref) >= 0.9999
    ops = served(log)
    assert {"MUL_TENSOR", "ADD_TENSOR", "RSQRT", "MEAN_DIM"} <= ops, sorted(ops)


def test_llama_greedy_generate_same_tokens(device, tmp_path):
    # fp32: greedy decoding on random weights has near-ties that bf16 rounding alone can flip.
    model = causal_lm("llama", torch.float32, device)
    prompts = [torch.randint(3, BASE["vocab_size"], (1, n), device=device) for n in (3, 5, 8)]
    log = tmp_path / "ops.log"
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=BASE["pad_token_id"])
    for ids in prompts:
        with torch.no_grad():
            ref = model.generate(ids, **kw)
            with flag_gems.use_gems(include=ALL, record=True, once=True, path=log):
                out = model.generate(ids, **kw)
        assert out.shape == ref.shape and torch.equal(out, ref), (out.tolist(), ref.tolist())
    assert {"MUL_TENSOR", "SILU", "COS", "SIN"} <= served(log)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16], ids=str)
def test_bert_last_hidden_state(dtype, device, tmp_path):
    cfg = transformers.BertConfig(**BERT)
    torch.manual_seed(0)
    ref_model = transformers.BertModel(cfg).to(device=device, dtype=torch.float32).eval()
    model = transformers.BertModel(cfg).to(device=device, dtype=dtype).eval()
    model.load_state_dict(ref_model.state_dict())
    ids = torch.randint(3, BERT["vocab_size"], (2, 11), device=device)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding: exercises the attention mask path
    log = tmp_path / "ops.log"
    with torch.no_grad():
        ref = ref_model(input_ids=ids, attention_mask=mask).last_hidden_state
        with flag_gems.use_gems(include=ALL, record=True, once=True, path=log):
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert cosine(out, ref) >= 0.99
    ops = served(log)
    assert {"NATIVE_LAYER_NORM", "GELU"} <= ops, sorted(ops)


def test_default_entries_keep_the_model_exact(device, tmp_path):
    # The default set (measured wins only) on a causal LM: what use_gems() users get.
    model = causal_lm("llama", torch.float32, device)
    ids = torch.randint(3, BASE["vocab_size"], (2, 9), device=device)
    log = tmp_path / "ops.log"
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        with flag_gems.use_gems(record=True, once=True, path=log):
            out = model(ids, use_cache=False).logits
    assert cosine(out, ref) >= 0.99999
    assert "MEAN_DIM" in served(log)
