"""Real ``transformers`` models (built from small configs, random weights, no hub access) through the flag_gems backend."""

import pytest
import torch

import flag_gems
from accuracy import LOGITS_COSINE, assert_close, ref64, tag

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# model type -> (extra config, fusions expected: {pattern: count}); 2 layers each
MODELS = {
    "llama": ({}, {"rms_norm": 1, "add_rms_norm": 4, "act_and_mul": 2, "rotary_embedding": 2}),
    "qwen2": ({}, {"rms_norm": 1, "add_rms_norm": 4, "act_and_mul": 2, "rotary_embedding": 2}),
    "mistral": ({}, {"rms_norm": 1, "add_rms_norm": 4, "act_and_mul": 2, "rotary_embedding": 2}),
    "gemma": ({"head_dim": 16}, {"rms_norm": 1, "add_rms_norm": 4, "act_and_mul": 2, "rotary_embedding": 2}),
    "qwen3": ({"head_dim": 16}, {"rms_norm": 5, "add_rms_norm": 4, "act_and_mul": 2, "rotary_embedding": 2}),  # + per-head q/k norms
}


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def build(model_type, dtype, device):
    extra, _ = MODELS[model_type]
    cfg = transformers.AutoConfig.for_model(model_type, **BASE, **extra)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dtype).eval()


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


@pytest.mark.parametrize("model_type", list(MODELS))
def test_hf_model_logits_and_fusions(model_type, device):
    model = build(model_type, torch.bfloat16, device)
    ids = torch.randint(3, BASE["vocab_size"], (2, 9), device=device)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        report = flag_gems.explain(model, ids, use_cache=False, options={"strict": True})
        torch._dynamo.reset()
        out = torch.compile(model, backend="flag_gems", options={"strict": True}, fullgraph=True)(ids, use_cache=False).logits
    expected = MODELS[model_type][1]
    assert {k: report.fused[k] for k in expected} == expected, str(report)
    assert not report.fallbacks
    assert cosine(out, ref) >= LOGITS_COSINE[torch.bfloat16], f"[{model_type}] logits cosine vs eager {cosine(out, ref)}"


def test_hf_llama_training_step(device):
    model = build("llama", torch.float32, device).train()
    ids = torch.randint(3, BASE["vocab_size"], (2, 7), device=device)
    compiled = torch.compile(model, backend="flag_gems", options={"strict": True}, fullgraph=True)
    loss = compiled(ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref_loss = model(ids, labels=ids, use_cache=False).loss
    ref_loss.backward()
    fp32 = torch.float32
    assert_close(loss, ref64(ref_loss), fp32, tag("hf llama training loss", (), fp32))
    for n, p in model.named_parameters():
        assert_close(grads[n], ref64(p.grad), fp32, tag(f"hf llama training grad {n}", p.shape, fp32), grad=True)
