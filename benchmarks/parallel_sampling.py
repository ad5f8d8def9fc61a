"""Parallel sampling: 32 prompts x n=8 against 256 independent requests with the same prompts.

Reports output tok/s and the peak number of KV blocks of each way. With
n=8 the prompt is prefilled once and its blocks are shared by the eight
samples; independent requests prefill it eight times (with prefix caching
on, requests admitted after the first one's prefill still hit its full
blocks, so the run without prefix caching is shown too).

    python benchmarks/parallel_sampling.py                       # CPU, the default model
    python benchmarks/parallel_sampling.py --shape qwen3-0.6b --bench-dir ../shared/bench
                                                                 # GPU, random weights
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

import torch


def build(args, enable_prefix_caching: bool):
    from paged_backend import LLM
    if args.shape == "default":
        return LLM(max_model_len=args.prompt_len + args.max_tokens + 16,
                   enable_prefix_caching=enable_prefix_caching)
    sys.path.insert(0, os.path.abspath(args.bench_dir))
    from models import save_dummy_checkpoint
    path = os.path.join(tempfile.gettempdir(), f"pb-{args.shape}")
    if not os.path.exists(os.path.join(path, "config.json")):
        save_dummy_checkpoint(args.shape, path)
    return LLM(path, skip_tokenizer_init=True, load_format="dummy",
               max_model_len=args.prompt_len + args.max_tokens + 16,
               enable_prefix_caching=enable_prefix_caching)


def timed(llm, prompts, params):
    llm.reset_prefix_cache()
    llm.reset_stats()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    secs = time.perf_counter() - t
    n = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return dict(seconds=round(secs, 2), output_tokens=n, tok_per_s=round(n / secs, 1),
                kv_blocks_peak=llm.get_stats()["kv_blocks_peak"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="default", help="'default' (CPU model) or a bench shape")
    ap.add_argument("--bench-dir", default="../shared/bench")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    from paged_backend import SamplingParams

    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(100, 10000) for _ in range(a.prompt_len)]}
               for _ in range(a.num_prompts)]
    par = SamplingParams(n=a.n, temperature=1.0, seed=0, max_tokens=a.max_tokens, ignore_eos=True)
    one = SamplingParams(temperature=1.0, max_tokens=a.max_tokens, ignore_eos=True)
    indep = [p for p in prompts for _ in range(a.n)]
    rows = []
    for cache in (True, False):
        llm = build(a, cache)
        llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
        if cache:
            rows.append(dict(mode=f"{a.num_prompts} prompts x n={a.n}", prefix_caching=cache,
                             **timed(llm, prompts, par)))
        rows.append(dict(mode=f"{len(indep)} independent requests", prefix_caching=cache,
                         **timed(llm, indep, one)))
        del llm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    for r in rows:
        print(json.dumps(dict(r, shape=a.shape, device=dev, prompt_len=a.prompt_len,
                              max_tokens=a.max_tokens)))
    print("\n| mode | prefix caching | output tok/s | peak KV blocks |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['mode']} | {r['prefix_caching']} | {r['tok_per_s']} | {r['kv_blocks_peak']} |")


if __name__ == "__main__":
    main()
