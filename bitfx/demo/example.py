"""A small Llama-style decoder in plain torch: the built-in model of ``python -m bitfx`` (trained) and
``python -m bitfx compiler``.

Pre-norm blocks as Llama writes them (RMSNorm in fp32, cast back, times the weight), grouped
into attention (q, k, v from one norm) and a gated MLP (gate, up from one norm), so each block
holds two RMSNorm -> Linear sites with five linear layers between them; ``o_proj``,
``down_proj`` and the output head read no norm and stay dense.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ExampleConfig", "ExampleLlama", "RMSNorm"]


class RMSNorm(nn.Module):
    """``weight * (x * rsqrt(mean(x^2) + eps))``, normalized in fp32 and cast back first (Llama)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        r = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * r.to(x.dtype)


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn_norm = RMSNorm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.mlp_norm = RMSNorm(dim)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(B, T, D))
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class ExampleConfig:
    def __init__(self, vocab: int = 1024, dim: int = 512, hidden: int = 1408, heads: int = 8, layers: int = 2):
        self.vocab, self.dim, self.hidden, self.heads, self.layers = vocab, dim, hidden, heads, layers


class ExampleLlama(nn.Module):
    """Token ids ``[B, T]`` -> logits ``[B, T, vocab]``."""

    def __init__(self, config: ExampleConfig | None = None):
        super().__init__()
        c = config or ExampleConfig()
        self.embed = nn.Embedding(c.vocab, c.dim)
        self.layers = nn.ModuleList(Block(c.dim, c.hidden, c.heads) for _ in range(c.layers))
        self.norm = RMSNorm(c.dim)
        self.lm_head = nn.Linear(c.dim, c.vocab, bias=False)
        with torch.no_grad():  # random weights with norms away from 1, so every part matters
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
                elif p.dim() == 2:
                    p.normal_(0.0, p.shape[1] ** -0.5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))
