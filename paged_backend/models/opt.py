"""OPT (facebook/opt-*): learned positions (offset 2), LayerNorm, ReLU MLP, tied lm_head.

Covers both pre-norm (`do_layer_norm_before`, opt-125m) and post-norm
(opt-350m) layers, and `project_in`/`project_out` when `word_embed_proj_dim`
differs from `hidden_size`.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

import torch
from transformers.activations import ACT2FN

from paged_backend.layers.attention import AttentionBackend, AttentionMetadata
from paged_backend.layers.linear import ColumnParallelLinear, RowParallelLinear
from paged_backend.models.weights import load_named_weights

logger = logging.getLogger(__name__)

# OPT's learned position table is offset by 2 (a fairseq padding legacy).
POSITION_OFFSET = 2


def _layer_norm(cfg: Any) -> torch.nn.LayerNorm:
    return torch.nn.LayerNorm(cfg.hidden_size,
                              elementwise_affine=getattr(cfg, "layer_norm_elementwise_affine", True))


class OPTAttention(torch.nn.Module):
    """Multi-head self-attention (no KV grouping, no rotary)."""

    def __init__(self, cfg: Any, attn_backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // self.num_heads
        self.scaling = self.head_dim ** -0.5
        self.attn_backend = attn_backend
        bias = bool(getattr(cfg, "enable_bias", True))
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, [cfg.hidden_size] * 3, bias=bias)
        self.out_proj = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        # OPT scales q before the product (as HF does), so the backend's scale is 1.
        q = (q * self.scaling).view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_heads, self.head_dim)
        v = v.view(num_tokens, self.num_heads, self.head_dim)
        out = self.attn_backend.forward(q, k, v, kv_cache, meta, 1.0)
        return self.out_proj(out.reshape(num_tokens, -1))


class OPTDecoderLayer(torch.nn.Module):
    """Attention + ReLU MLP with LayerNorm before (pre-norm) or after (post-norm) each."""

    def __init__(self, cfg: Any, attn_backend: AttentionBackend) -> None:
        super().__init__()
        self.do_layer_norm_before = bool(cfg.do_layer_norm_before)
        bias = bool(getattr(cfg, "enable_bias", True))
        self.self_attn = OPTAttention(cfg, attn_backend)
        self.self_attn_layer_norm = _layer_norm(cfg)
        self.fc1 = ColumnParallelLinear(cfg.hidden_size, cfg.ffn_dim, bias=bias)
        self.fc2 = RowParallelLinear(cfg.ffn_dim, cfg.hidden_size, bias=bias)
        self.final_layer_norm = _layer_norm(cfg)
        self.act = ACT2FN[cfg.activation_function]

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if self.do_layer_norm_before:
            x = x + self.self_attn(self.self_attn_layer_norm(x), kv_cache, meta)
            return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(x + self.self_attn(x, kv_cache, meta))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))


class OPTDecoder(torch.nn.Module):
    """Token + position embeddings, optional projections, layers, final LayerNorm."""

    def __init__(self, cfg: Any, attn_backend: AttentionBackend) -> None:
        super().__init__()
        proj_dim = getattr(cfg, "word_embed_proj_dim", None) or cfg.hidden_size
        self.embed_tokens = torch.nn.Embedding(cfg.vocab_size, proj_dim)
        self.embed_positions = torch.nn.Embedding(cfg.max_position_embeddings + POSITION_OFFSET,
                                                  cfg.hidden_size)
        if proj_dim != cfg.hidden_size:
            self.project_in: Optional[RowParallelLinear] = RowParallelLinear(proj_dim, cfg.hidden_size)
            self.project_out: Optional[RowParallelLinear] = RowParallelLinear(cfg.hidden_size, proj_dim)
        else:
            self.project_in = self.project_out = None
        if cfg.do_layer_norm_before and not getattr(cfg, "_remove_final_layer_norm", False):
            self.final_layer_norm: Optional[torch.nn.LayerNorm] = _layer_norm(cfg)
        else:
            self.final_layer_norm = None
        self.layers = torch.nn.ModuleList(
            OPTDecoderLayer(cfg, attn_backend) for _ in range(cfg.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(positions + POSITION_OFFSET)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, kv_cache, meta)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x


class OPTModel(torch.nn.Module):
    """Holds the decoder (HF's `model.decoder.*` names)."""

    def __init__(self, cfg: Any, attn_backend: AttentionBackend) -> None:
        super().__init__()
        self.decoder = OPTDecoder(cfg, attn_backend)


class OPTForCausalLM(torch.nn.Module):
    """OPT causal LM over a paged KV cache."""

    def __init__(self, hf_config: Any, attn_backend: AttentionBackend) -> None:
        super().__init__()
        self.config = hf_config
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", True))
        self.model = OPTModel(hf_config, attn_backend)
        proj_dim = getattr(hf_config, "word_embed_proj_dim", None) or hf_config.hidden_size
        self.lm_head = ColumnParallelLinear(proj_dim, hf_config.vocab_size, bias=False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    @staticmethod
    def kv_cache_shape(hf_config: Any) -> tuple[int, int, int]:
        """(num_layers, num_kv_heads, head_dim) of the KV cache this config needs."""
        heads = hf_config.num_attention_heads
        return hf_config.num_hidden_layers, heads, hf_config.hidden_size // heads

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states `[T, word_embed_proj_dim]` of the new tokens."""
        return self.model.decoder(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        """Logits `[N, vocab]` of hidden states `[N, hidden]`: float32, or the model dtype
        with `upcast=False` (enough for an argmax: the cast to float32 is exact)."""
        logits = self.lm_head(hidden)
        return logits.float() if upcast else logits

    def _map_name(self, name: str) -> Optional[tuple[str, Optional[int]]]:
        # Original facebook/opt checkpoints name the decoder "decoder.*", not "model.decoder.*".
        if name.startswith("decoder."):
            name = "model." + name
        if name == "lm_head.weight" and self.tie_word_embeddings:
            return None
        for shard_id, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            marker = f".self_attn.{proj}."
            if marker in name:
                return name.replace(marker, ".self_attn.qkv_proj."), shard_id
        return name, None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors."""
        load_named_weights(self, weights, self._map_name)
