"""Tiny random-weight checkpoints of every supported architecture, built with transformers.

Not a test module: tests import `ARCHS` and `make_tiny_checkpoint` from it.
Weights are re-initialised with a larger spread than HF's default (and with
non-trivial norm scales and biases) so logits are far from flat and greedy
choices do not tie.
"""

from __future__ import annotations

from typing import Any

import torch

_LLAMA_BASE: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=512,
    rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    pad_token_id=0,
)
_OPT_BASE: dict[str, Any] = dict(
    hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=512,
    max_position_embeddings=512, word_embed_proj_dim=64, do_layer_norm_before=True,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)

# arch name -> (HF model_type, config overrides)
_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", dict(_LLAMA_BASE, num_hidden_layers=3)),
    "llama3_rope": ("llama", dict(_LLAMA_BASE, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "mistral": ("mistral", dict(_LLAMA_BASE, sliding_window=None)),
    "qwen2": ("qwen2", dict(_LLAMA_BASE)),
    "qwen3": ("qwen3", dict(_LLAMA_BASE, num_key_value_heads=1, tie_word_embeddings=True)),
    "smollm2": ("llama", dict(_LLAMA_BASE, hidden_size=96, num_attention_heads=6,
                              num_key_value_heads=2, tie_word_embeddings=True,
                              rope_parameters={"rope_type": "default", "rope_theta": 100000.0})),
    "opt": ("opt", dict(_OPT_BASE)),
    "opt_postnorm": ("opt", dict(_OPT_BASE, do_layer_norm_before=False, word_embed_proj_dim=32)),
}

ARCHS: list[str] = list(_SPECS)


def make_tiny_config(arch: str, **extra: Any) -> Any:
    """The transformers config of a tiny model of `arch` (one of `ARCHS`); `extra` overrides fields."""
    from transformers import AutoConfig

    model_type, overrides = _SPECS[arch]
    return AutoConfig.for_model(model_type, **dict(overrides, **extra))


def make_tiny_checkpoint(arch: str, path: str, seed: int = 0, **extra: Any) -> Any:
    """Save a tiny random float32 model of `arch` to `path` (config.json + safetensors).

    Returns the transformers model (eval mode), which is the reference for tests.
    """
    from transformers import AutoModelForCausalLM

    cfg = make_tiny_config(arch, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() >= 2:
                p.copy_(noise * 0.1)
            elif name.endswith("bias"):
                p.copy_(noise * 0.1)
            else:  # norm scales
                p.copy_(1.0 + noise * 0.1)
    model.eval()
    model.save_pretrained(path)
    return model
