"""A BERT encoder in plain torch, enough to run the packaged MiniLM sentence model.

Kept to inference: embeddings, post-LayerNorm encoder layers with GELU, masked mean pooling and
L2 normalisation. Weights and sizes come from the model directory (safetensors + config.json).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn


class _Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, inner: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.up = nn.Linear(hidden, inner)
        self.down = nn.Linear(inner, hidden)
        self.out_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = self.attn_norm(x + self.attn_out(ctx.transpose(1, 2).reshape(b, n, h)))
        return self.out_norm(x + self.down(torch.nn.functional.gelu(self.up(x))))


class BertEncoder(nn.Module):
    def __init__(self, config: dict) -> None:
        super().__init__()
        h, eps = config["hidden_size"], config["layer_norm_eps"]
        self.word = nn.Embedding(config["vocab_size"], h)
        self.position = nn.Embedding(config["max_position_embeddings"], h)
        self.token_type = nn.Embedding(config["type_vocab_size"], h)
        self.norm = nn.LayerNorm(h, eps=eps)
        self.layers = nn.ModuleList(_Layer(h, config["num_attention_heads"], config["intermediate_size"], eps)
                                    for _ in range(config["num_hidden_layers"]))

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Sentence vectors: mean of the token states where `mask` is 1, L2-normalised."""
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.norm(self.word(ids) + self.position(pos)[None] + self.token_type.weight[0])
        bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(mask == 0, -math.inf)
        bias = bias[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        m = mask[..., None].to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


def load_bert(model_dir: Path, device: str = "cpu") -> BertEncoder:
    config = json.loads((model_dir / "config.json").read_text())
    w = load_file(str(model_dir / "model.safetensors"))
    model = BertEncoder(config)
    state = {
        "word.weight": w["embeddings.word_embeddings.weight"],
        "position.weight": w["embeddings.position_embeddings.weight"],
        "token_type.weight": w["embeddings.token_type_embeddings.weight"],
        "norm.weight": w["embeddings.LayerNorm.weight"], "norm.bias": w["embeddings.LayerNorm.bias"],
    }
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        a = p + "attention.self."
        for part in ("weight", "bias"):
            state[f"layers.{i}.qkv.{part}"] = torch.cat([w[a + "query." + part], w[a + "key." + part],
                                                          w[a + "value." + part]])
            state[f"layers.{i}.attn_out.{part}"] = w[p + "attention.output.dense." + part]
            state[f"layers.{i}.attn_norm.{part}"] = w[p + "attention.output.LayerNorm." + part]
            state[f"layers.{i}.up.{part}"] = w[p + "intermediate.dense." + part]
            state[f"layers.{i}.down.{part}"] = w[p + "output.dense." + part]
            state[f"layers.{i}.out_norm.{part}"] = w[p + "output.LayerNorm." + part]
    model.load_state_dict(state)
    return model.to(device).eval()
