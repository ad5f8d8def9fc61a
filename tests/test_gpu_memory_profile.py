"""GPU: the memory profile that sizes the KV pool covers the largest step, its tail included.

The KV pool takes whatever `gpu_memory_utilization` leaves after the weights and the
profile's peak, so a step whose temporaries outgrow the profile can run out of memory
mid-run. Here a model with Qwen3's vocabulary (151,936) and tiny layers makes the step's
tail dominate: prompt logprobs over a long prompt (float32 logits, log-softmax and masks
of a 512-position slice) in the same steps as sampling rows with every filter and
logprobs on, from n=4 requests whose children fork. Before the profile ran that tail it
counted only the LM head's logits for max_num_seqs rows (89 MiB against 1,262 for the
first case).
"""

from __future__ import annotations

import gc

import pytest
import torch

from tiny_models import make_tiny_config

pytestmark = pytest.mark.gpu

# Allocator rounding and small tensors that the step keeps alive beside its largest ones.
SLACK = 32 << 20
FILTERS = dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
               presence_penalty=0.1, frequency_penalty=0.1, logprobs=20, max_tokens=3)


@pytest.mark.parametrize("mnbt, max_num_seqs", [
    (1024, 64),   # a prompt-logprobs slice of 512 positions sets the peak
    (256, 256),   # sampling 256 rows (64 requests x n=4) sets it
])
def test_profile_covers_prompt_logprobs_and_full_sampling(mnbt, max_num_seqs, tmp_path,
                                                          monkeypatch):
    from paged_backend import LLM, SamplingParams
    from paged_backend.engine import factory

    make_tiny_config("qwen3", vocab_size=151936, max_position_embeddings=1024
                     ).save_pretrained(tmp_path)
    profiled: list[int] = []
    real = factory._profile_activation_bytes

    def spy(*args, **kwargs):
        profiled.append(real(*args, **kwargs))
        return profiled[-1]
    monkeypatch.setattr(factory, "_profile_activation_bytes", spy)
    llm = LLM(str(tmp_path), load_format="dummy", skip_tokenizer_init=True, max_model_len=1024,
              max_num_batched_tokens=mnbt, max_num_seqs=max_num_seqs, gpu_memory_utilization=0.5)
    (peak,) = profiled
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    # One generate: the prompt-logprobs request's chunks run in the same steps as the sampling
    # rows (whose logits stay alive meanwhile), and the n=4 parents fork their children.
    prompts = [{"prompt_token_ids": list(range(1, 1000))}]
    params = [SamplingParams(max_tokens=1, prompt_logprobs=20)]
    prompts += [{"prompt_token_ids": [i + 1] * 4} for i in range(max_num_seqs // 4)]
    params += [SamplingParams(n=4, **FILTERS)] * (max_num_seqs // 4)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert len(outs[0].prompt_logprobs) == 999  # None for the first position, then one each
    assert all(len(c.token_ids) == 3 for o in outs[1:] for c in o.outputs)
    assert all(len(o.outputs) == 4 for o in outs[1:])
    torch.cuda.synchronize()
    used = torch.cuda.max_memory_allocated() - base
    assert used > 300 << 20, f"the steps used only {used / 2**20:.0f} MiB: the test lost its point"
    assert used <= peak + SLACK, (f"steps peaked {used / 2**20:.0f} MiB over the engine's "
                                  f"resting memory; the profile counted {peak / 2**20:.0f} MiB")
    del llm, outs
    gc.collect()
    torch.cuda.empty_cache()
