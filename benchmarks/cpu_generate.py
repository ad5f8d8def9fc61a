"""CPU benchmark: 16 prompts x 64 output tokens on the default model, next to transformers.

Both engines decode greedily in float32 with EOS ignored, on the same
prompts in the same process, after a warm-up. transformers runs `generate`
on the whole batch at once (left padding, its default KV cache). The two
runs alternate `--repeats` times (the prefix cache is emptied before each
of ours) and the median of each is reported: shared CPUs are noisy.

    python benchmarks/cpu_generate.py [--num-prompts 16] [--max-tokens 64] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

PROMPTS = [
    "The capital of France is", "Write a short poem about the sea.", "def quicksort(arr):",
    "The three laws of thermodynamics are", "Once upon a time, in a small village,",
    "Explain how a transformer language model works.", "The best way to learn a new language is",
    "Here is a recipe for a simple tomato soup:", "The history of the Roman Empire begins",
    "In machine learning, overfitting means", "My favourite book is", "import numpy as np\n",
    "The weather today is", "List five fruits that are red:", "A haiku about autumn:",
    "The main difference between TCP and UDP is",
]


def make_ours(prompts, max_tokens):
    """Load our engine; return a function that times one generate call."""
    from paged_backend import LLM, SamplingParams
    llm = LLM(dtype="float32", device="cpu", max_model_len=1024)
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)

    def run():
        llm.reset_prefix_cache()
        t = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        secs = time.perf_counter() - t
        return secs, sum(len(o.outputs[0].token_ids) for o in outs)
    return run, llm


def make_transformers(llm, prompts, max_tokens):
    """Load transformers' model from the same file; return a function that times one generate."""
    from transformers import AutoModelForCausalLM
    src = llm.llm_engine.model_source
    tok = llm.get_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file,
                                                 dtype=torch.float32).eval()
    enc = [tok.encode(p) for p in prompts]
    L = max(map(len, enc))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (L - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (L - len(e)) + [1] * len(e) for e in enc])

    def gen(n):
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=pad)
    gen(4)

    def run():
        t = time.perf_counter()
        out = gen(max_tokens)
        return time.perf_counter() - t, (out.shape[1] - L) * len(prompts)
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    prompts = (PROMPTS * (a.num_prompts // len(PROMPTS) + 1))[:a.num_prompts]
    ours, llm = make_ours(prompts, a.max_tokens)
    hf = make_transformers(llm, prompts, a.max_tokens)
    t_ours, t_hf = [], []
    for _ in range(a.repeats):
        s_ours, n_ours = ours()
        s_hf, n_hf = hf()
        t_ours.append(s_ours)
        t_hf.append(s_hf)
        print(f"  run: paged_backend {n_ours / s_ours:.1f} tok/s, transformers {n_hf / s_hf:.1f} tok/s",
              flush=True)
    s_ours, s_hf = statistics.median(t_ours), statistics.median(t_hf)
    import transformers
    rows = [dict(engine="paged_backend", seconds=round(s_ours, 2), output_tokens=n_ours,
                 tok_per_s=round(n_ours / s_ours, 1)),
            dict(engine=f"transformers-{transformers.__version__}-generate",
                 seconds=round(s_hf, 2), output_tokens=n_hf, tok_per_s=round(n_hf / s_hf, 1))]
    for r in rows:
        print(json.dumps(dict(r, prompts=a.num_prompts, max_tokens=a.max_tokens, repeats=a.repeats,
                              threads=torch.get_num_threads(), torch=torch.__version__)))
    print("\n| engine | output tok/s (median) | seconds (median) |\n| --- | --- | --- |")
    for r in rows:
        print(f"| {r['engine']} | {r['tok_per_s']} | {r['seconds']} |")
    print(f"\nratio paged_backend / transformers: {rows[0]['tok_per_s'] / rows[1]['tok_per_s']:.2f}x")


if __name__ == "__main__":
    main()
