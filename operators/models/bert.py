"""A lean BERT encoder for embedding: plain BERT checkpoints without importing transformers.

Importing transformers' model code costs seconds per process (its loss, kernels-hub and distributed
modules pull in scipy, sympy and torch._dynamo), which every embedding actor paid before its first row.
For the common case, a local folder holding a plain BERT (``model_type: bert``, absolute positions, GELU,
the encoder's weights in ``model.safetensors``: MiniLM, BERT base/large, most sentence-transformers
models), this module builds the same encoder from ``config.json`` and the safetensors file directly: one
fused QKV projection per layer and PyTorch's fused attention. Outputs equal ``transformers.BertModel``'s
up to float rounding (tested).

Anything else (another architecture or option, a hub id, missing tensors, ``trust_remote_code``) gets
``None`` here and goes through transformers as before. Embedding only: fine-tuning loads the
transformers module (its layer names drive freezing and unfreezing).
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS = "model.safetensors"


class _Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, inter: int, eps: float) -> None:
        super().__init__()
        self.heads, self.eps = heads, eps
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.ln1 = nn.LayerNorm(hidden, eps=eps)
        self.inter = nn.Linear(hidden, inter)
        self.out2 = nn.Linear(inter, hidden)
        self.ln2 = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(b, t, h)
        x = self.ln1(self.out(a) + x)
        return self.ln2(self.out2(F.gelu(self.inter(x))) + x)


class BertEncoder(nn.Module):
    """BERT's embeddings + encoder stack: (ids, attention mask) -> last hidden state [B, T, H]."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden, eps = int(cfg["hidden_size"]), float(cfg.get("layer_norm_eps", 1e-12))
        self.word = nn.Embedding(int(cfg["vocab_size"]), hidden)
        self.position = nn.Embedding(int(cfg.get("max_position_embeddings", 512)), hidden)
        self.token_type = nn.Embedding(int(cfg.get("type_vocab_size", 2)), hidden)
        self.ln = nn.LayerNorm(hidden, eps=eps)
        self.layers = nn.ModuleList(
            _Layer(hidden, int(cfg["num_attention_heads"]), int(cfg["intermediate_size"]), eps)
            for _ in range(int(cfg["num_hidden_layers"])))
        self.hidden_size = hidden

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``mask`` None: no padding (attention's fast path)."""
        t = ids.shape[1]
        # one segment (token type 0) and positions 0..T-1: what BertModel uses when given neither
        x = self.ln(self.word(ids) + self.position.weight[:t] + self.token_type.weight[0])
        keep = None if mask is None else mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = layer(x, keep)
        return x


def eligible(cfg: dict[str, Any]) -> bool:
    """A plain BERT encoder that :class:`BertEncoder` reproduces exactly."""
    return (cfg.get("model_type") == "bert" and cfg.get("hidden_act", "gelu") == "gelu"
            and cfg.get("position_embedding_type", "absolute") == "absolute"
            and not cfg.get("is_decoder") and not cfg.get("add_cross_attention")
            and int(cfg.get("hidden_size", 0)) % max(1, int(cfg.get("num_attention_heads", 1))) == 0)


def _state_dict(src: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor] | None:
    """transformers' BERT tensor names (``bert.`` prefix or not; LayerNorm gamma/beta or weight/bias)
    -> :class:`BertEncoder`'s; None if any is missing."""
    def get(name: str) -> torch.Tensor | None:
        for prefix in ("", "bert."):
            for n in (name, name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")):
                if prefix + n in src:
                    return src[prefix + n]
        return None

    names = {"word.weight": "embeddings.word_embeddings.weight",
             "position.weight": "embeddings.position_embeddings.weight",
             "token_type.weight": "embeddings.token_type_embeddings.weight",
             "ln.weight": "embeddings.LayerNorm.weight", "ln.bias": "embeddings.LayerNorm.bias"}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for ours, theirs in (("out", "attention.output.dense"), ("ln1", "attention.output.LayerNorm"),
                             ("inter", "intermediate.dense"), ("out2", "output.dense"), ("ln2", "output.LayerNorm")):
            for kind in ("weight", "bias"):
                names[f"layers.{i}.{ours}.{kind}"] = f"{p}{theirs}.{kind}"
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in names.items():
        t = get(theirs)
        if t is None:
            return None
        out[ours] = t
    for i in range(layers):
        for kind in ("weight", "bias"):
            parts = [get(f"encoder.layer.{i}.attention.self.{x}.{kind}") for x in ("query", "key", "value")]
            if any(t is None for t in parts):
                return None
            out[f"layers.{i}.qkv.{kind}"] = torch.cat(parts)  # type: ignore[arg-type]
    return out


def load_bert_encoder(folder: str) -> BertEncoder | None:
    """The encoder of a local plain-BERT folder (config.json + float32 model.safetensors), or None.

    None also for half-precision checkpoints (transformers computes those in their own dtype, so the
    vectors would differ) and for files that do not parse (transformers then reports what is wrong).
    """
    cfg_path, weights = os.path.join(folder, "config.json"), os.path.join(folder, WEIGHTS)
    if not (os.path.isfile(cfg_path) and os.path.isfile(weights)):
        return None
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        if not isinstance(cfg, dict) or not eligible(cfg):
            return None
        if str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32") not in ("float32", "auto"):
            return None
        from safetensors.torch import load_file

        tensors = load_file(weights)
    except Exception:  # noqa: BLE001 - unreadable: the transformers path raises the error the user sees
        return None
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in tensors.values()):
        return None
    sd = _state_dict(tensors, int(cfg["num_hidden_layers"]))
    if sd is None:
        return None
    model = BertEncoder(cfg)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError:  # shapes that do not fit the config: let transformers explain
        return None
    return model.eval().requires_grad_(False)
