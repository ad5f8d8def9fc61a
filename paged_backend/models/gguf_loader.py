"""Reading GGUF checkpoints of the Llama family as dequantized float32 tensors under HF names.

The `gguf` package reads and dequantizes each tensor (as transformers does
when loading a GGUF); llama.cpp's standard tensor names are mapped to HF's
here, and the q/k row permutation that llama.cpp's converter applies to
"llama"-architecture files (Llama, Mistral, SmolLM2) is undone.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from typing import Any, Iterator

import numpy as np
import torch

logger = logging.getLogger(__name__)

# GGUF architectures whose tensors follow the Llama layout.
SUPPORTED_GGUF_ARCHS = ("llama", "mistral", "qwen2", "qwen3")
# llama.cpp permutes q/k rows (for its rotary layout) only for these.
_PERMUTED_QK_ARCHS = ("llama", "mistral")

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Precomputed rope factors: recomputed from the config instead.
_SKIPPED = ("rope_freqs.weight",)
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^(\w+)\.(weight|bias)$")


def gguf_to_hf_name(name: str) -> str | None:
    """HF parameter name of a llama.cpp tensor name, or None if unknown."""
    m = _LAYER_RE.match(name)
    if m is not None:
        layer, part, suffix = m.groups()
        hf = _LAYER_NAMES.get(part)
        return f"model.layers.{layer}.{hf}.{suffix}" if hf else None
    m = _GLOBAL_RE.match(name)
    if m is not None and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    return None


def unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row interleave of q/k weights (or biases).

    llama.cpp stores each head's rows as (half, pair) -> (pair, half); this
    swaps them back to HF's rotate_half layout.
    """
    head_dim = w.shape[0] // num_heads
    return w.reshape(num_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _read_str_field(reader: Any, key: str) -> str:
    field = reader.fields[key]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def iter_gguf_weights(path: str, hf_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, float32 tensor) for every tensor of the GGUF file at `path`."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("Loading GGUF weights needs the `gguf` package: "
                          "`pip install gguf` (or `pip install paged-backend[gguf]`).")
    from gguf import GGUFReader, dequantize

    reader = GGUFReader(path)
    arch = _read_str_field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: "
                         f"{', '.join(SUPPORTED_GGUF_ARCHS)}).")
    num_heads = hf_config.num_attention_heads
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
    for tensor in reader.tensors:
        if tensor.name in _SKIPPED:
            continue
        hf_name = gguf_to_hf_name(tensor.name)
        if hf_name is None:
            raise ValueError(f"Unknown tensor {tensor.name!r} in GGUF file {path!r}.")
        weights = dequantize(tensor.data, tensor.tensor_type)
        if arch in _PERMUTED_QK_ARCHS:
            if ".q_proj." in hf_name:
                weights = unpermute_qk(weights, num_heads)
            elif ".k_proj." in hf_name:
                weights = unpermute_qk(weights, num_kv_heads)
        # A copy: F32 tensors come back as read-only views of the memory-mapped file.
        yield hf_name, torch.from_numpy(np.array(weights, dtype=np.float32))
