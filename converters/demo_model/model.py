"""A Qwen2 decoder written out for training: the same math and parameter names as
transformers' Qwen2ForCausalLM, plus what training on packed rows needs.

transformers' own class computes the same, but training packs several conversations into each
row: here each attends only to itself and its positions restart, with one boolean mask per
row and no per-call mask building (on 2 CPU cores a model this small is bound by per-op cost).
`to_transformers` loads the weights into Qwen2ForCausalLM, which is what gets saved and
converted; `check_against_transformers` proves the two compute the same logits.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# The shipped shape: 4 layers, hidden 256, 4 heads of 64 (2 key/value heads), ~3.7M parameters.
SHAPE: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}


def qwen2_config(vocab_size: int, eos: int, pad: int, **shape: Any):
    """The transformers Qwen2Config of the demo model."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab_size, bos_token_id=eos, eos_token_id=eos,
                       pad_token_id=pad, **{**SHAPE, **shape})  # fmt: skip


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // self.heads
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        repeat = self.heads // self.kv_heads  # each key/value head serves `repeat` query heads
        k = k.repeat_interleave(repeat, dim=1)
        v = v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DemoModel(nn.Module):
    """Qwen2ForCausalLM's computation; forward takes packed rows (ids, positions, documents)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = Body(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight  # tied, as the config says
        head_dim = config.hidden_size // config.num_attention_heads
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        self.register_buffer("inv_freq", 1.0 / (config.rope_theta**exponent), persistent=False)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        """transformers' initialisation: normal(0, 0.02) weights, zero biases."""
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor,
                documents: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Logits; a token sees the tokens before it in its own document only."""
        return self.lm_head(self.hidden(ids, positions, documents))

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor,
               documents: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """The last layer's normalised states, which the head turns into logits."""
        freqs = positions[..., None].float() * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # [batch, 1, length, head_dim]
        cos, sin = angles.cos(), angles.sin()
        length = ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
        mask = (documents[:, :, None] == documents[:, None, :]) & causal
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask[:, None])
        return self.model.norm(x)


def loss_fn(model: DemoModel, ids, positions, documents, labels, context_weight: float = 0.0,
            chosen_after: int | None = None) -> torch.Tensor:  # fmt: skip
    """Mean cross-entropy over the labelled tokens (the assistant's), next-token shifted,
    plus `context_weight` times that over the other tokens of each conversation (the
    prompts: predicting them too teaches the model to read and copy what users write).

    The token after `chosen_after` (<think>) is never learnt from a prompt: there the
    template wrote an empty thinking section because thinking was off, while with thinking
    on the model chooses to think, and the prompt alone does not say which was the case.
    Without context the head runs only where there is a label: a fifth of the tokens."""
    targets = labels[:, 1:]
    learnt = targets != -100
    hidden = model.hidden(ids, positions, documents)[:, :-1]
    loss = F.cross_entropy(model.lm_head(hidden[learnt]).float(), targets[learnt])
    if context_weight:
        context = (documents[:, 1:] == documents[:, :-1]) & (documents[:, 1:] >= 0) & ~learnt
        if chosen_after is not None:
            context &= ids[:, :-1] != chosen_after
        logits = model.lm_head(hidden[context]).float()
        loss = loss + context_weight * F.cross_entropy(logits, ids[:, 1:][context])
    return loss


def to_transformers(model: DemoModel):
    """The same weights in transformers' Qwen2ForCausalLM."""
    from transformers import Qwen2ForCausalLM

    hf = Qwen2ForCausalLM(model.config)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    # Rotary frequencies are computed, not stored; nothing else may differ.
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return hf.eval()


@torch.no_grad()
def check_against_transformers(model: DemoModel, hf, ids: list[int]) -> float:
    """Max absolute logit difference between the two on one sequence (~1e-5 when equal)."""
    tokens = torch.tensor([ids])
    positions = torch.arange(len(ids))[None]
    ours = model(tokens, positions, torch.zeros_like(tokens))
    theirs = hf(input_ids=tokens).logits
    return float((ours - theirs).abs().max())


@torch.no_grad()
def greedy(model: DemoModel, prompt: list[int], stop: int, limit: int = 64) -> list[int]:
    """Greedy continuation of one prompt (a quick check while training; no KV cache)."""
    ids = list(prompt)
    for _ in range(limit):
        tokens = torch.tensor([ids])
        logits = model(tokens, torch.arange(len(ids))[None], torch.zeros_like(tokens))
        token = int(logits[0, -1].argmax())
        if token == stop:
            break
        ids.append(token)
    return ids[len(prompt) :]
