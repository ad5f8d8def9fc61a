"""`AttentionBackend` on Triton kernels over the paged cache (CUDA).

Per layer: `forward` writes the new tokens' K/V into their slots with one kernel
(the Llama family's layers instead have the rotary kernel store them and call
`attend`, which starts here; on pure-decode steps they call `decode_with_new_kv`,
where the decode kernel rotates and stores the new token itself; on Hopper a
step of at most four sequences runs the CUDA `stream_decode` and a larger one the
CUDA `batch_decode`), then a batch of pure decode rows runs the split-KV decode
kernel (query heads of a KV head packed into one `tl.dot`, partial results
merged by log-sum-exp),
and any other batch (prefill, chunked prefill, prefix hits, mixed) runs the
varlen extend kernel, which reads the cached prefix straight from the
blocks. Nothing here reads device values on the host.
"""

from __future__ import annotations

import torch

from paged_backend.layers.attention import AttentionMetadata


def _pure_decode(meta: AttentionMetadata) -> bool:
    """One new token per sequence: the split-KV decode kernel's case."""
    return meta.max_query_len == 1 and meta.num_tokens == meta.num_seqs


class TritonAttentionBackend:
    """Paged attention with the kernels of `paged_backend.kernels`."""

    name = "triton"
    graph_capturable = True

    def __init__(self) -> None:
        from paged_backend.kernels.batch_decode import batch_decode, batch_decode_supported
        from paged_backend.kernels.decode_attention import decode_attention
        from paged_backend.kernels.extend_attention import extend_attention
        from paged_backend.kernels.kv_write import write_kv
        from paged_backend.kernels.stream_decode import (
            STREAM_DECODE_MAX_BATCH, stream_decode, stream_decode_supported)
        self._decode = decode_attention
        self._stream_decode = stream_decode
        self._stream_supported = stream_decode_supported
        self._stream_max_batch = STREAM_DECODE_MAX_BATCH
        self._batch_decode = batch_decode
        self._batch_supported = batch_decode_supported
        self._extend = extend_attention
        self._write = write_kv

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D]; writes k/v at `meta.slot_mapping`, returns [T, Hq, D]."""
        self._write(k, v, kv_cache, meta.slot_mapping)
        return self.attend(q, kv_cache, meta, scale)

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float) -> torch.Tensor:
        """Attention over the cache, which already holds this step's k, v."""
        if _pure_decode(meta):
            return self._decode(q, kv_cache, meta.block_tables, meta.seq_lens, scale,
                                num_splits=meta.decode_num_splits, max_seq_len=meta.max_seq_len)
        return self._extend(q, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                            meta.max_query_len, scale)

    def decode_with_new_kv(self, q: torch.Tensor, new_kv, kv_cache: torch.Tensor,
                           meta: AttentionMetadata, scale: float, trigger_early: bool = False):
        """Pure-decode steps: attention of the un-rotated `q` with the rotary and the KV
        write of the new tokens (`new_kv`, a `DecodeNewKV`) done by the decode kernel itself,
        one launch less per layer. Returns None, having done nothing, for other steps.

        `trigger_early`: the caller's next kernel reads only weights before its PDL wait
        (an output projection), so the CUDA decode kernel may let it launch at its start."""
        if not _pure_decode(meta):
            return None
        if meta.num_seqs <= self._stream_max_batch and self._stream_supported(
                q, kv_cache, new_kv, meta.block_tables, meta.seq_lens):
            # A few sequences on Hopper: one CUDA kernel whose context loads before its PDL
            # wait, splits merged in a thread-block cluster (kernels/stream_decode.py).
            return self._stream_decode(q, kv_cache, meta.block_tables, meta.seq_lens, scale,
                                       new_kv, trigger_early=trigger_early)
        if self._batch_supported(q, kv_cache, new_kv, meta.block_tables, meta.seq_lens):
            # More sequences on Hopper: per-warp cp.async rings and tensor-core MMAs
            # (kernels/batch_decode.py), ~20% faster than the Triton kernel at 16-64.
            return self._batch_decode(q, kv_cache, meta.block_tables, meta.seq_lens, scale,
                                      new_kv, trigger_early=trigger_early)
        return self._decode(q, kv_cache, meta.block_tables, meta.seq_lens, scale,
                            num_splits=meta.decode_num_splits, max_seq_len=meta.max_seq_len,
                            new_kv=new_kv)


def default_backend(device: torch.device):
    """Triton on CUDA when triton imports, else the plain-torch backend."""
    import os

    from paged_backend.layers.torch_attention import TorchAttentionBackend
    choice = os.environ.get("PAGED_BACKEND_ATTENTION", "auto")
    if choice == "torch" or (choice == "auto" and device.type != "cuda"):
        return TorchAttentionBackend()
    try:
        return TritonAttentionBackend()
    except ImportError:
        if choice == "triton":
            raise
        return TorchAttentionBackend()
