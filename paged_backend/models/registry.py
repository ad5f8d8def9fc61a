"""Maps HF `architectures` / `model_type` to this package's model classes."""

from __future__ import annotations

from typing import Any

import torch

from paged_backend.models.llama import LlamaForCausalLM
from paged_backend.models.opt import OPTForCausalLM

_BY_ARCHITECTURE: dict[str, type[torch.nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "OPTForCausalLM": OPTForCausalLM,
}
# GGUF-derived configs carry a model_type but no `architectures`.
_BY_MODEL_TYPE: dict[str, type[torch.nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "opt": OPTForCausalLM,
}


def supported_architectures() -> list[str]:
    """HF architecture names this package can run."""
    return sorted(_BY_ARCHITECTURE)


def get_model_class(hf_config: Any) -> type[torch.nn.Module]:
    """The model class for a HF config; ValueError naming the architecture if unsupported."""
    architectures = list(getattr(hf_config, "architectures", None) or [])
    for arch in architectures:
        if arch in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[arch]
    model_type = getattr(hf_config, "model_type", None)
    if not architectures and model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    name = ", ".join(architectures) if architectures else f"model_type={model_type!r}"
    raise ValueError(f"Unsupported model architecture {name}. Supported architectures: "
                     f"{', '.join(supported_architectures())}.")


def kv_cache_shape_info(hf_config: Any) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of the paged KV cache a config needs."""
    return get_model_class(hf_config).kv_cache_shape(hf_config)
