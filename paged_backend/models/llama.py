"""The Llama family: Llama 2/3, Mistral, Qwen2 (qkv bias), Qwen3 (per-head q/k RMSNorm), SmolLM2.

Module names follow HF's, except that q/k/v and gate/up are fused into
`qkv_proj` and `gate_up_proj` (loaded shard by shard from HF's tensors).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Iterable, Optional

import torch
from transformers.activations import ACT2FN

from paged_backend.layers import fused_kernels
from paged_backend.layers.activation import SiluAndMul
from paged_backend.layers.attention import AttentionBackend, AttentionMetadata
from paged_backend.layers.linear import ColumnParallelLinear, RowParallelLinear
from paged_backend.layers.norm import RMSNorm
from paged_backend.layers.rotary import RotaryEmbedding
from paged_backend.models.weights import load_named_weights

logger = logging.getLogger(__name__)

_FUSED_SHARDS = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}
_FUSED_RE = re.compile(r"^(.*\.)(q_proj|k_proj|v_proj|gate_proj|up_proj)(\.(?:weight|bias))$")


def _head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _num_kv_heads(cfg: Any) -> int:
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def _attention_biases(cfg: Any) -> tuple[bool, bool]:
    """(qkv bias, o_proj bias) of this family member."""
    if cfg.model_type == "qwen2":
        return True, False
    if cfg.model_type == "mistral":
        return False, False
    bias = bool(getattr(cfg, "attention_bias", False))
    return bias, bias


def _mapped(t: torch.Tensor) -> bool:
    from paged_backend.kernels.host_io import host_pointer
    return host_pointer(t) is not None


class LlamaMLP(torch.nn.Module):
    """Gated MLP: `down(act(gate(x)) * up(x))`; SiLU runs fused with the product."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        bias = bool(getattr(cfg, "mlp_bias", False))
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, bias=bias)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=bias)
        if cfg.hidden_act == "silu":
            self.act_and_mul: Optional[SiluAndMul] = SiluAndMul()
            self.act = None
        else:
            self.act_and_mul = None
            self.act = ACT2FN[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.gate_up_proj.weight
        if self.act_and_mul is not None and fused_kernels.use_stream_gemm(
                x, w, self.gate_up_proj.bias, silu_mul=True):
            from paged_backend.kernels.stream_gemm import stream_gemm
            act = stream_gemm(x, w, self.gate_up_proj.bias, silu_mul=True)
            return self.down_proj(act)
        if self.act_and_mul is not None and fused_kernels.use_skinny_silu(x, w):
            from paged_backend.kernels.skinny_gemm import skinny_gemm
            # tl.dot from 2 rows: the broadcast path loses to cuBLAS there (qwen3 M=4: 22 vs 7 us).
            act = skinny_gemm(x, w, self.gate_up_proj.bias, silu_mul=True, use_dot=True)
            return self.down_proj(act)
        gate_up = self.gate_up_proj(x)
        if self.act_and_mul is not None:
            return self.down_proj(self.act_and_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(self.act(gate) * up)


class LlamaAttention(torch.nn.Module):
    """Self-attention with rotary embeddings and grouped KV heads over the paged cache."""

    def __init__(self, cfg: Any, attn_backend: AttentionBackend, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = _num_kv_heads(cfg)
        self.head_dim = _head_dim(cfg)
        self.scale = self.head_dim ** -0.5
        self.attn_backend = attn_backend
        self.rotary_emb = rotary_emb  # shared by all layers (no weights)
        qkv_bias, o_bias = _attention_biases(cfg)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_sizes = [q_size, kv_size, kv_size]
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, self.qkv_sizes, bias=qkv_bias,
                                             skinny=True)
        self.o_proj = RowParallelLinear(q_size, cfg.hidden_size, bias=o_bias)
        if cfg.model_type == "qwen3":
            self.q_norm: Optional[RMSNorm] = RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)
            self.k_norm: Optional[RMSNorm] = RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata,
                cos_sin: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """`cos_sin`: the rotary torch path's cos/sin, computed once per forward (None: not needed)."""
        out = self.attend(positions, self.qkv_proj(x), kv_cache, meta, cos_sin)
        return self.o_proj(out)

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor, kv_cache: torch.Tensor,
               meta: AttentionMetadata,
               cos_sin: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """Rotary, KV write and attention of a projected `qkv`; returns `[T, Hq * D]` (before o_proj)."""
        num_tokens = qkv.shape[0]
        q, k, v = qkv.split(self.qkv_sizes, dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        # Pure-decode steps on the kernel path: the decode kernel rotates and caches too.
        decode_new = getattr(self.attn_backend, "decode_with_new_kv", None)
        if decode_new is not None and meta.max_query_len == 1:
            new_kv = self.rotary_emb.decode_new_kv(positions, q, k, v, kv_cache,
                                                   meta.slot_mapping, self.q_norm, self.k_norm)
            # The next kernel is the output projection (weights only before its PDL wait),
            # so the decode kernel may let it launch at its start.
            out = None if new_kv is None else decode_new(q, new_kv, kv_cache, meta, self.scale,
                                                         trigger_early=True)
            if out is not None:
                return out.reshape(num_tokens, self.num_heads * self.head_dim)
        # Otherwise on the kernel path one launch rotates q/k and writes k/v into the cache,
        # and the backend only attends (a backend without `attend` gets the separate write).
        attend = getattr(self.attn_backend, "attend", None)
        q_rot = None
        if attend is not None:
            q_rot = self.rotary_emb.rotate_and_write_kv(positions, q, k, v, kv_cache,
                                                        meta.slot_mapping, self.q_norm,
                                                        self.k_norm)
        if q_rot is not None:
            out = attend(q_rot, kv_cache, meta, self.scale)
        else:
            q, k = self.rotary_emb.rotate(positions, q, k, self.q_norm, self.k_norm,
                                          cos_sin=cos_sin)
            out = self.attn_backend.forward(q, k, v, kv_cache, meta, self.scale)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)


class LlamaDecoderLayer(torch.nn.Module):
    """Pre-norm block, with each residual add fused into the norm that follows it.

    `forward` takes the previous layer's MLP output `hidden` and the running
    `residual` (None at the first layer) and returns this layer's
    `(mlp_output, residual)`: the residual stream is `residual + hidden`.
    """

    def __init__(self, cfg: Any, attn_backend: AttentionBackend, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, attn_backend, rotary_emb)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: Optional[torch.Tensor], kv_cache: torch.Tensor,
                meta: AttentionMetadata,
                cos_sin: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, residual) after this layer; `residual` may be updated in place (kernel path)."""
        if self.mlp.act_and_mul is not None and fused_kernels.use_skinny_gemm(hidden):
            return self._forward_skinny(positions, hidden, residual, kv_cache, meta, cos_sin)
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, meta, cos_sin)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual

    def _forward_skinny(self, positions: torch.Tensor, hidden: torch.Tensor,
                        residual: Optional[torch.Tensor], kv_cache: torch.Tensor,
                        meta: AttentionMetadata,
                        cos_sin: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                        ) -> tuple[torch.Tensor, None]:
        """One-token forwards: four GEMMs with the norms, SiLU-and-mul and residual adds fused in.

        Returns `(stream, None)`: the residual stream itself, updated in place (the next
        layer reads a None residual as "hidden is the whole stream").
        """
        gemm = fused_kernels.one_token_gemm
        stream = hidden if residual is None else hidden + residual
        attn, mlp = self.self_attn, self.mlp
        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        # QKV: trigger_early, so decode attention launches at once and gathers its cached
        # context during the projection (the kernel before this one, the previous layer's
        # down projection or the embedding, writes none of what it reads before its wait).
        qkv = gemm(stream, attn.qkv_proj.weight, attn.qkv_proj.bias,
                   norm_weight=ln1.weight, eps=ln1.eps, trigger_early=True)
        out = attn.attend(positions, qkv, kv_cache, meta, cos_sin)
        # o_proj: exclusive, since attention holds only some SMs and o_proj's programs would
        # double up on the others; trigger_early, so gate/up (whose pre-wait phase reads
        # only its weights) launches and streams them in while attention still runs.
        gemm(out, attn.o_proj.weight, attn.o_proj.bias, add_to=stream, exclusive=True,
             trigger_early=True)
        act = gemm(stream, mlp.gate_up_proj.weight, mlp.gate_up_proj.bias,
                   norm_weight=ln2.weight, eps=ln2.eps, silu_mul=True)
        gemm(act, mlp.down_proj.weight, mlp.down_proj.bias, add_to=stream)
        return stream, None


class LlamaModel(torch.nn.Module):
    """Embeddings, decoder layers and the final norm."""

    def __init__(self, cfg: Any, attn_backend: AttentionBackend) -> None:
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary_emb = RotaryEmbedding.from_config(cfg, _head_dim(cfg))
        self.layers = torch.nn.ModuleList(
            LlamaDecoderLayer(cfg, attn_backend, self.rotary_emb)
            for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        # Only the torch rotary path needs cos/sin (the kernel computes its own).
        cos_sin = self.rotary_emb.torch_cos_sin(positions, hidden)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta, cos_sin)
        if residual is None:  # the skinny-GEMM path returns the whole stream
            return self.norm(hidden)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(torch.nn.Module):
    """Llama-family causal LM over a paged KV cache (see the module docstring for members)."""

    def __init__(self, hf_config: Any, attn_backend: AttentionBackend) -> None:
        super().__init__()
        self.config = hf_config
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        window = getattr(hf_config, "sliding_window", None)
        if window is not None and window < hf_config.max_position_embeddings:
            logger.warning("sliding_window=%d is not implemented: attention spans the whole "
                           "context, so outputs past %d tokens differ from the reference.",
                           window, window)
        self.model = LlamaModel(hf_config, attn_backend)
        self.lm_head = ColumnParallelLinear(hf_config.hidden_size, hf_config.vocab_size, bias=False)
        self._argmax_workspace: Optional[torch.Tensor] = None  # greedy_tokens' kernel scratch
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def kv_cache_shape(hf_config: Any) -> tuple[int, int, int]:
        """(num_layers, num_kv_heads, head_dim) of the KV cache this config needs."""
        return hf_config.num_hidden_layers, _num_kv_heads(hf_config), _head_dim(hf_config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states `[T, hidden]` of the new tokens (K/V written to `kv_caches`)."""
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        """Logits `[N, vocab]` of hidden states `[N, hidden]`: float32, or the model dtype
        with `upcast=False` (enough for an argmax: the cast to float32 is exact)."""
        logits = self.lm_head(hidden)
        return logits.float() if upcast else logits

    def greedy_tokens(self, hidden: torch.Tensor,
                      host_out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`compute_logits(hidden, upcast=False).argmax(-1)` (int64 `[N]`); one row on Hopper
        runs as one CUDA kernel without a logits tensor (kernels/lm_head_argmax.py).

        `host_out` (pinned int64 CPU `[N]`): the tokens are also put there, by the kernel
        itself where it runs, else by a non-blocking copy; read it after the stream passes."""
        w = self.lm_head.weight
        if (hidden.shape[0] == 1 and self.lm_head.bias is None
                and fused_kernels.use_fused_kernels(hidden)):
            from paged_backend.kernels import lm_head_argmax as lha
            if lha.lm_head_argmax_supported(hidden, w):
                if self._argmax_workspace is None or self._argmax_workspace.device != hidden.device:
                    self._argmax_workspace = lha.new_workspace(hidden.device)
                mapped = host_out is not None and _mapped(host_out)
                tokens = lha.lm_head_argmax(hidden, w, self._argmax_workspace,
                                            host_out if mapped else None)
                if host_out is not None and not mapped:
                    host_out.copy_(tokens, non_blocking=True)
                return tokens
        tokens = self.compute_logits(hidden, upcast=False).argmax(dim=-1)
        if host_out is not None:
            host_out.copy_(tokens, non_blocking=True)
        return tokens

    def _map_name(self, name: str) -> Optional[tuple[str, Optional[int]]]:
        if "rotary_emb.inv_freq" in name:
            return None
        if name == "lm_head.weight" and self.tie_word_embeddings:
            return None
        m = _FUSED_RE.match(name)
        if m is not None:
            fused, shard_id = _FUSED_SHARDS[m.group(2)]
            return m.group(1) + fused + m.group(3), shard_id
        return name, None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors (safetensors or dequantized GGUF)."""
        load_named_weights(self, weights, self._map_name)
