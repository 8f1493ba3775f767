"""A small model of real vLLM layers (RMSNorm with residual, SiluAndMul, rotary embedding) under
vLLM's compile decorator, for the mode 1/2 tests (also loaded by their fresh processes, so that
vLLM's AOT cache key, which hashes the forward's code, matches)."""

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.rotary_embedding import get_rope

HIDDEN, INTER, HEADS, HEAD_DIM = 64, 48, 4, 16


class TinyBlock(nn.Module):
    """``h = x + residual -> norm -> q rope -> gated MLP``: every pattern, a few dims."""

    def __init__(self, *, vllm_config=None, prefix: str = "", dtype=torch.bfloat16):
        super().__init__()
        self.norm = RMSNorm(HIDDEN, 1e-6, dtype=dtype)
        self.q_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False, dtype=dtype)
        self.rope = get_rope(HEAD_DIM, 256, is_neox_style=True, rope_parameters={"rope_theta": 10000.0}, dtype=dtype)
        self.up = nn.Linear(HIDDEN, 2 * INTER, bias=False, dtype=dtype)
        self.act = SiluAndMul()
        self.down = nn.Linear(INTER, HIDDEN, bias=False, dtype=dtype)
        with torch.no_grad():
            self.norm.weight.normal_(1.0, 0.2)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        h, residual = self.norm(x, residual)
        q = self.q_proj(h)
        q, _ = self.rope(positions, q, None)
        y = self.down(self.act(self.up(h)))
        return y + q.sum(-1, keepdim=True) + residual


CompiledTinyBlock = support_torch_compile(type("CompiledTinyBlock", (TinyBlock,), {}))


def inputs(tokens: int, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, HIDDEN, generator=g).to(dtype)
    residual = torch.randn(tokens, HIDDEN, generator=g).to(dtype)
    positions = torch.randint(0, 256, (tokens,), generator=g)
    return positions, x, residual
