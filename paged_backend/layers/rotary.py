"""Rotary position embedding (RoPE), neox style (`rotate_half`), as HF Llama applies it.

Supported `rope_type`s: "default", "linear" and "llama3". The parameters are
read from a HF config in either layout: transformers 5's
`config.rope_parameters` dict (holding `rope_theta`, `rope_type`, `factor`,
...) or the older `config.rope_theta` + `config.rope_scaling`.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

import torch

from paged_backend.layers import fused_kernels
from paged_backend.layers.norm import RMSNorm

logger = logging.getLogger(__name__)

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def get_rope_parameters(hf_config: Any) -> dict[str, Any]:
    """Return one flat dict with at least `rope_theta` and `rope_type` from a HF config."""
    params = getattr(hf_config, "rope_parameters", None)
    params = dict(params) if isinstance(params, dict) else {}
    if params and all(isinstance(v, dict) for v in params.values()):
        # Per-layer-type parameters (e.g. Gemma): only a single global rope is supported.
        if "full_attention" not in params:
            raise ValueError(f"Unsupported per-layer rope_parameters: {sorted(params)}.")
        params = dict(params["full_attention"])
    legacy_scaling = getattr(hf_config, "rope_scaling", None)
    if not params and isinstance(legacy_scaling, dict):
        params = dict(legacy_scaling)
    if "rope_theta" not in params or params["rope_theta"] is None:
        params["rope_theta"] = getattr(hf_config, "rope_theta", None) or 10000.0
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    if params["rope_type"] == "llama3":
        params.setdefault("original_max_position_embeddings",
                          getattr(hf_config, "max_position_embeddings", None))
    return params


def compute_inv_freq(head_dim: int, params: dict[str, Any]) -> torch.Tensor:
    """Inverse frequencies `[head_dim // 2]` (float32) for the given rope parameters."""
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported (supported: "
                         f"{', '.join(SUPPORTED_ROPE_TYPES)}).")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported.")
    base = float(params["rope_theta"])
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (base ** exponents)
    if rope_type == "linear":
        inv_freq = inv_freq / float(params["factor"])
    elif rope_type == "llama3":
        inv_freq = _llama3_scale(inv_freq, params)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by `factor`, short kept, a smooth ramp between."""
    factor = float(params["factor"])
    low_freq_factor = float(params["low_freq_factor"])
    high_freq_factor = float(params["high_freq_factor"])
    old_context_len = float(params["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dimension's halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(torch.nn.Module):
    """Computes cos/sin for token positions and rotates q/k `[T, H, D]` with them.

    `rotate` (or `rotate_and_write_kv`, which also stores k/v into the KV cache in
    the same launch) is the per-layer entry point: on CUDA (see `fused_kernels`) one
    Triton kernel computes cos/sin itself and rotates q and k in place
    (after Qwen3's per-head q/k norms, fused); the torch path uses cos/sin
    from `cos_sin`, computed from the positions once per model forward
    (`torch_cos_sin`) and shared by all layers. No position limit either way.
    """

    def __init__(self, head_dim: int, params: dict[str, Any]) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rope_type = params["rope_type"]
        self.register_buffer("inv_freq", compute_inv_freq(head_dim, params), persistent=False)

    @classmethod
    def from_config(cls, hf_config: Any, head_dim: int) -> "RotaryEmbedding":
        """Build from a HF config's rope parameters."""
        return cls(head_dim, get_rope_parameters(hf_config))

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[T, D]` for `positions` `[T]`, computed in float32 then cast to `dtype`."""
        freqs = positions[:, None].float() * self.inv_freq.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate `x` `[T, H, D]` by cos/sin `[T, D]`."""
        cos = cos[:, None, :]
        sin = sin[:, None, :]
        return x * cos + rotate_half(x) * sin

    def uses_kernel(self, q: torch.Tensor) -> bool:
        """Whether `rotate` runs the Triton kernel for q/k like `q`."""
        return fused_kernels.use_fused_kernels(q)

    def torch_cos_sin(self, positions: torch.Tensor, x: torch.Tensor
                      ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """`cos_sin(positions, x.dtype)` for `rotate`'s torch path; None when the kernel runs."""
        if self.uses_kernel(x):
            return None
        return self.cos_sin(positions, x.dtype)

    def rotate(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               q_norm: Optional[RMSNorm] = None, k_norm: Optional[RMSNorm] = None,
               cos_sin: Optional[tuple[torch.Tensor, torch.Tensor]] = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated (q, k) for q `[T, Hq, D]`, k `[T, Hkv, D]` at `positions` `[T]`.

        `q_norm`/`k_norm` (RMSNorm over D, Qwen3) are applied first. The kernel
        path rotates q and k IN PLACE (strided views of a fused QKV output are
        fine) and returns them; the torch path returns new tensors, using
        `cos_sin` when given (else computing it).
        """
        if self.uses_kernel(q) and self._kernel_norms_ok(q, q_norm, k_norm):
            return self._kernel_rotate(positions, q, k, q_norm, k_norm)
        if q_norm is not None:
            q = q_norm(q)
        if k_norm is not None:
            k = k_norm(k)
        cos, sin = cos_sin if cos_sin is not None else self.cos_sin(positions, q.dtype)
        return self.apply(q, cos, sin), self.apply(k, cos, sin)

    def rotate_and_write_kv(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                            v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                            q_norm: Optional[RMSNorm] = None, k_norm: Optional[RMSNorm] = None
                            ) -> Optional[torch.Tensor]:
        """`rotate`, and store the rotated k and v into `kv_cache` at `slot_mapping`, in one
        kernel launch; returns the rotated q (k is rotated in place too), or None, having
        done nothing, when the kernel path does not apply (the caller then rotates and
        writes separately). Bad shapes raise as in `apply_rotary`."""
        if not (self.uses_kernel(q) and self._kernel_norms_ok(q, q_norm, k_norm)
                and kv_cache.stride(-1) == 1):
            return None
        q, _ = self._kernel_rotate(positions, q, k, q_norm, k_norm,
                                   v=v, kv_cache=kv_cache, slot_mapping=slot_mapping)
        return q

    def decode_new_kv(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      q_norm: Optional[RMSNorm] = None, k_norm: Optional[RMSNorm] = None):
        """The new tokens' un-rotated k/v and rotary parameters for a decode kernel that
        rotates and caches them itself (`kernels.decode_attention.DecodeNewKV`), or None
        when the kernel path does not apply (same conditions as `rotate_and_write_kv`)."""
        if not (self.uses_kernel(q) and self._kernel_norms_ok(q, q_norm, k_norm)
                and kv_cache.stride(-1) == 1 and self.head_dim % 2 == 0):
            return None
        from paged_backend.kernels.decode_attention import DecodeNewKV

        norm = q_norm if q_norm is not None else k_norm
        return DecodeNewKV(k=k, v=v, positions=positions, slot_mapping=slot_mapping,
                           inv_freq=self.inv_freq,
                           q_norm_weight=q_norm.weight if q_norm is not None else None,
                           k_norm_weight=k_norm.weight if k_norm is not None else None,
                           eps=norm.eps if norm is not None else 1e-6)

    def _kernel_rotate(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                       q_norm: Optional[RMSNorm], k_norm: Optional[RMSNorm],
                       **kv_write: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The Triton kernel's in-place rotation (plus the KV write when given `kv_write`)."""
        from paged_backend.kernels.rotary import apply_rotary

        norm = q_norm if q_norm is not None else k_norm
        return apply_rotary(
            q, k, positions, self.inv_freq,
            q_norm.weight if q_norm is not None else None,
            k_norm.weight if k_norm is not None else None,
            eps=norm.eps if norm is not None else 1e-6, **kv_write)

    def _kernel_norms_ok(self, q: torch.Tensor, q_norm: Optional[RMSNorm],
                         k_norm: Optional[RMSNorm]) -> bool:
        """The kernel fuses RMSNorms of q's dtype sharing one epsilon; float32 inv_freq."""
        norms = [n for n in (q_norm, k_norm) if n is not None]
        if any(not isinstance(n, RMSNorm) or n.weight.dtype != q.dtype for n in norms):
            return False
        if len({n.eps for n in norms}) > 1:
            return False
        return self.inv_freq.dtype == torch.float32
