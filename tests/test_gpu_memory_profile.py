"""GPU: the memory profile that sizes the KV pool covers the largest step, its tail included.

The KV pool takes whatever `gpu_memory_utilization` leaves after the weights and the
profile's peak, so a step whose temporaries outgrow the profile can run out of memory
mid-run. Here a model with Qwen3's vocabulary (151,936) and tiny layers makes the step's
tail dominate: prompt logprobs over a long prompt (float32 logits and log-softmax of a
512-position slice, ~0.7 GB) and sampling 64 rows with every filter and logprobs on.
Before the profile ran that tail it counted ~40 MB of logits for them.
"""

from __future__ import annotations

import gc

import pytest
import torch

from tiny_models import make_tiny_config

pytestmark = pytest.mark.gpu

# Allocator rounding and small tensors that the step keeps alive beside its largest ones.
SLACK = 32 << 20


def test_profile_covers_prompt_logprobs_and_full_sampling(tmp_path, monkeypatch):
    from paged_backend import LLM, SamplingParams
    from paged_backend.engine import factory

    make_tiny_config("qwen3", vocab_size=151936, max_position_embeddings=1024).save_pretrained(tmp_path)
    profiled: list[int] = []
    real = factory._profile_activation_bytes

    def spy(*args, **kwargs):
        profiled.append(real(*args, **kwargs))
        return profiled[-1]
    monkeypatch.setattr(factory, "_profile_activation_bytes", spy)
    llm = LLM(str(tmp_path), load_format="dummy", skip_tokenizer_init=True, max_model_len=1024,
              max_num_batched_tokens=1024, max_num_seqs=64, gpu_memory_utilization=0.5)
    (peak,) = profiled
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = llm.generate({"prompt_token_ids": list(range(1, 1000))},
                       SamplingParams(max_tokens=1, prompt_logprobs=20), use_tqdm=False)
    assert len(out[0].prompt_logprobs) == 999  # None for the first position, then one per position
    outs = llm.generate([{"prompt_token_ids": [i + 1] * 4} for i in range(64)],
                        SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05,
                                       repetition_penalty=1.1, presence_penalty=0.1,
                                       frequency_penalty=0.1, logprobs=20, max_tokens=3),
                        use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 3 for o in outs)
    torch.cuda.synchronize()
    used = torch.cuda.max_memory_allocated() - base
    assert used > 500 << 20, f"the steps used only {used / 2**20:.0f} MiB: the test lost its point"
    assert used <= peak + SLACK, (f"steps peaked {used / 2**20:.0f} MiB over the engine's "
                                  f"resting memory; the profile counted {peak / 2**20:.0f} MiB")
    del llm, out, outs
    gc.collect()
    torch.cuda.empty_cache()
