"""Engine settings: one frozen dataclass, validated once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Settings of one engine instance (resolved: no 'auto' values left but dtype/device names).

    `num_kv_blocks` fixes the KV pool size; when None it is sized from
    `gpu_memory_utilization` on CUDA, or from `max_model_len` and
    `max_num_seqs` on the CPU.
    """

    max_model_len: int
    block_size: int = 16
    num_kv_blocks: Optional[int] = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    seed: int = 0
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        def pos_int(name: str) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}.")

        for name in ("max_model_len", "block_size", "max_num_seqs", "max_num_batched_tokens"):
            pos_int(name)
        if self.num_kv_blocks is not None:
            pos_int("num_kv_blocks")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}.")
        if self.block_size > 1024:
            raise ValueError(f"block_size must be at most 1024, got {self.block_size}.")
