"""Builds an `LLMEngine` from user arguments: device, dtype, model, tokenizer, KV pool."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from paged_backend.config import EngineConfig
from paged_backend.engine.block_manager import BlockManager
from paged_backend.engine.detokenizer import IncrementalDetokenizer
from paged_backend.engine.engine import LLMEngine
from paged_backend.engine.scheduler import Scheduler

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
# KV space on the CPU when num_kv_blocks is not given (GiB); override with this variable.
CPU_KV_SPACE_ENV = "PAGED_BACKEND_CPU_KV_SPACE_GIB"
_DEFAULT_CPU_KV_GIB = 4.0
# Largest decode batch captured as a CUDA graph (larger decode batches run eagerly).
_MAX_GRAPH_BATCH = 512
PREFILL_GRAPH_MAX_TOKENS = 512  # one sequence's prefill graphs cover up to this many tokens


@dataclass(slots=True)
class EngineArgs:
    """The arguments of `LLM(...)`, before resolution."""

    model: Optional[str] = None
    tokenizer: Optional[str] = None
    dtype: Union[str, torch.dtype] = "auto"
    device: Union[str, torch.device] = "auto"
    max_model_len: Optional[int] = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: Optional[int] = None
    max_num_seqs: int = 256
    max_num_batched_tokens: Optional[int] = None
    enable_prefix_caching: bool = True
    seed: int = 0
    load_format: str = "auto"
    enforce_eager: bool = False
    skip_tokenizer_init: bool = False
    gguf_file: Optional[str] = None
    max_logprobs: int = 20


def default_max_num_batched_tokens(device: torch.device) -> int:
    """Token budget of a step when the user gives none: 16384 on CUDA, 8192 elsewhere.

    On GPUs 16384-token steps (nano-vllm's default) run the prefill GEMMs nearer peak; on the
    H100 they beat 8192 by 1.4% (llama3-8b) and 2.0% (qwen3-0.6b) on bench-256. The CPU
    keeps smaller steps (each is a long, memory-hungry forward there)."""
    return 16384 if device.type == "cuda" else 8192


def resolve_device(device: Union[str, torch.device]) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}.")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here.")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}.")
    return dev


def resolve_dtype(dtype: Union[str, torch.dtype], device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on GPUs that support it (else float16), float32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}.")
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto', 'float32', 'float16' or 'bfloat16', got {dtype!r}.")
    return _DTYPES[dtype]


def eos_ids(hf_config: Any, tokenizer: Any, model_path: Optional[str]) -> set[int]:
    """EOS ids from the config, the generation config and the tokenizer."""
    ids: set[int] = set()

    def add(v):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)

    add(getattr(hf_config, "eos_token_id", None))
    if model_path and os.path.isfile(os.path.join(model_path, "generation_config.json")):
        try:
            from transformers import GenerationConfig
            add(GenerationConfig.from_pretrained(model_path).eos_token_id)
        except Exception:  # a broken generation config only loses extra EOS ids
            logger.warning("could not read generation_config.json in %s", model_path)
    if tokenizer is not None:
        add(tokenizer.eos_token_id)
    return ids


def _kv_blocks(args: EngineArgs, device: torch.device, bytes_per_block: int, max_model_len: int,
               profile) -> int:
    if args.num_kv_blocks is not None:
        return args.num_kv_blocks
    if device.type == "cuda":
        peak = profile()
        free, total = torch.cuda.mem_get_info(device)
        budget = total * args.gpu_memory_utilization - (total - free) - peak
        if budget < bytes_per_block:
            raise ValueError("no GPU memory is left for the KV cache: raise gpu_memory_utilization "
                             "or lower max_num_batched_tokens.")
        return int(budget // bytes_per_block)
    gib = float(os.environ.get(CPU_KV_SPACE_ENV, _DEFAULT_CPU_KV_GIB))
    want = args.max_num_seqs * -(-max_model_len // args.block_size)
    return max(1, min(want, int(gib * 2**30 // bytes_per_block)))


def build_engine(args: EngineArgs) -> LLMEngine:
    """Load the model and tokenizer and assemble scheduler, block manager, runner and engine."""
    from paged_backend.layers.triton_attention import default_backend
    from paged_backend.models import loader
    from paged_backend.models.registry import kv_cache_shape_info
    from paged_backend.runner.cuda_graphs import batch_size_buckets
    from paged_backend.runner.dummy_batch import full_prefill_lens
    from paged_backend.runner.model_runner import ModelRunner

    if args.load_format not in ("auto", "dummy", "safetensors", "gguf", "pt"):
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {args.load_format!r}.")
    if not isinstance(args.max_logprobs, int) or args.max_logprobs < 0:
        raise ValueError(f"max_logprobs must be an integer >= 0, got {args.max_logprobs!r}.")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    src = loader.resolve_model(args.model, args.gguf_file)
    hf_config = loader.load_hf_config(src)
    text_config = getattr(hf_config, "get_text_config", lambda: hf_config)()

    tokenizer = None
    if not args.skip_tokenizer_init:
        if args.tokenizer is not None:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        else:
            tokenizer = loader.load_tokenizer(src)

    limit = getattr(text_config, "max_position_embeddings", None) or 2048
    max_model_len = args.max_model_len
    if max_model_len is None:
        max_model_len = limit
    elif not isinstance(max_model_len, int) or max_model_len < 1:
        raise ValueError(f"max_model_len must be a positive integer, got {max_model_len!r}.")
    elif max_model_len > limit:
        raise ValueError(f"max_model_len ({max_model_len}) is larger than the model's "
                         f"max_position_embeddings ({limit}).")
    mnbt = args.max_num_batched_tokens
    if mnbt is None:
        mnbt = default_max_num_batched_tokens(device)
    cfg = EngineConfig(max_model_len=max_model_len, block_size=args.block_size,
                       num_kv_blocks=args.num_kv_blocks,
                       gpu_memory_utilization=args.gpu_memory_utilization,
                       max_num_seqs=args.max_num_seqs, max_num_batched_tokens=mnbt,
                       enable_prefix_caching=args.enable_prefix_caching, seed=args.seed,
                       enforce_eager=args.enforce_eager)

    torch.manual_seed(args.seed)
    backend = default_backend(device)
    model = loader.load_model(src, hf_config, dtype=dtype, device=device,
                              load_format=args.load_format, attn_backend=backend)
    if device.type == "cpu" and dtype == torch.float32:
        from paged_backend.layers.cpu_prepack import prepack_cpu_linears
        prepack_cpu_linears(model)
    num_layers, num_kv_heads, head_dim = kv_cache_shape_info(hf_config)
    per_block = ModelRunner.kv_bytes_per_block(num_layers, num_kv_heads, head_dim,
                                               cfg.block_size, dtype)

    def profile() -> int:
        return _profile_activation_bytes(model, cfg, device, dtype, num_layers, num_kv_heads,
                                         head_dim, args.max_logprobs)

    num_blocks = _kv_blocks(args, device, per_block, max_model_len, profile)
    capacity = num_blocks * cfg.block_size
    if capacity < max_model_len:
        if args.max_model_len is not None:
            raise ValueError(f"the KV cache holds {capacity} tokens ({num_blocks} blocks of "
                             f"{cfg.block_size}), fewer than max_model_len ({max_model_len}): "
                             "raise num_kv_blocks or lower max_model_len.")
        logger.warning("max_model_len lowered from %d to %d to fit the KV cache",
                       max_model_len, capacity)
        max_model_len = capacity
    vocab_size = text_config.vocab_size
    runner = ModelRunner(model, num_layers=num_layers, num_kv_heads=num_kv_heads,
                         head_dim=head_dim, num_blocks=num_blocks, block_size=cfg.block_size,
                         vocab_size=vocab_size, device=device, dtype=dtype, seed=cfg.seed)
    if device.type == "cuda":
        runner.warm_up_kernels(
            max_model_len,
            full_prefill_lens(cfg.max_num_batched_tokens, cfg.max_num_seqs, max_model_len),
            head_sizes=batch_size_buckets(cfg.max_num_seqs))
    if device.type == "cuda" and not cfg.enforce_eager and getattr(backend, "graph_capturable", False):
        runner.capture_decode_graphs(min(cfg.max_num_seqs, _MAX_GRAPH_BATCH), max_model_len)
        # One sequence's prefill up to 512 tokens: host-bound when launched eagerly.
        runner.capture_prefill_graphs(
            min(PREFILL_GRAPH_MAX_TOKENS, cfg.max_num_batched_tokens, max_model_len), max_model_len)
    bm = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
    sched = Scheduler(bm, cfg.max_num_seqs, cfg.max_num_batched_tokens, max_model_len)
    engine = LLMEngine(scheduler=sched, runner=runner, tokenizer=tokenizer,
                       eos_token_ids=eos_ids(text_config, tokenizer, src.path),
                       vocab_size=vocab_size, max_model_len=max_model_len,
                       detokenizer_cls=IncrementalDetokenizer, max_logprobs=args.max_logprobs)
    engine.config = cfg
    engine.hf_config = hf_config
    engine.model_source = src
    engine.device = device
    engine.dtype = dtype
    logger.info("engine ready: %s on %s (%s), %d KV blocks of %d tokens", src.path, device,
                dtype, num_blocks, cfg.block_size)
    return engine


def _profile_activation_bytes(model, cfg: EngineConfig, device: torch.device, dtype: torch.dtype,
                              num_layers: int, num_kv_heads: int, head_dim: int,
                              max_logprobs: int) -> int:
    """Peak memory of the largest step (GPU only): a forward pass over max_num_batched_tokens
    tokens in as few sequences as max_model_len allows (runner/dummy_batch.py), then the
    step's tail at its largest (`run_largest_step_tail`) on its hidden states."""
    from paged_backend.runner.dummy_batch import (full_prefill_lens, prefill_batch,
                                                  run_largest_step_tail)
    from paged_backend.runner.model_runner import LOGPROB_ROWS

    lens = full_prefill_lens(cfg.max_num_batched_tokens, cfg.max_num_seqs, cfg.max_model_len)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    ids, positions, meta, nb = prefill_batch(lens, cfg.block_size, device, write_kv=True)
    kv = torch.zeros((num_layers, 2, nb, cfg.block_size, num_kv_heads, head_dim), dtype=dtype,
                     device=device)
    with torch.inference_mode():
        h = model(ids, positions, list(kv), meta)
        run_largest_step_tail(model, h, cfg.max_num_seqs, max_logprobs, LOGPROB_ROWS,
                              cfg.max_model_len)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base - kv.numel() * kv.element_size()
    del kv, h, ids, positions, meta
    torch.cuda.empty_cache()
    return int(peak)
