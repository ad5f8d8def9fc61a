"""Where a small-batch decode step goes: the captured graph alone, then what the step adds.

Builds the engine on a shape of the bench dir with random weights, generates
`--bucket` requests at once (`--prompt-len` prompt, `--max-tokens` output tokens each,
greedy) once to warm up and three times to time the engine's step (the median), then
replays the CUDA graph of that batch bucket back to back on the inputs the last step
left in its static buffers (GPU time per replay from CUDA events):

- the graph alone (decoder layers and the final norm);
- plus the LM head and argmax, launched eagerly as the runner does for greedy rows
  (the model's `greedy_tokens`; also timed as cuBLAS logits + torch argmax);
- plus a device-to-host copy of the token (one sync per step, as the engine reads it).

    python benchmarks/graph_step.py --shape qwen3-0.6b --bench-dir ../shared/bench
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--bench-dir", default="../shared/bench")
    ap.add_argument("--bucket", type=int, default=1, help="captured batch bucket to replay")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--replays", type=int, default=200)
    return ap.parse_args()


def main() -> None:
    a = parse_args()
    sys.path.insert(0, os.path.abspath(a.bench_dir))
    import torch
    from models import hf_config

    from paged_backend import LLM, SamplingParams

    if not torch.cuda.is_available():
        sys.exit("benchmarks/graph_step.py needs a CUDA GPU")
    d = tempfile.mkdtemp()
    hf_config(a.shape).save_pretrained(d)
    llm = LLM(d, load_format="dummy", skip_tokenizer_init=True,
              max_model_len=a.prompt_len + a.max_tokens + 64, max_num_seqs=max(a.bucket, 8))
    sp = SamplingParams(temperature=0.0, max_tokens=a.max_tokens, ignore_eos=True)
    prompt = {"prompt_token_ids": list(range(1, a.prompt_len + 1))}
    walls = []
    for _ in range(4):  # the first pass compiles and warms up; the median of the other three
        t0 = time.perf_counter()
        llm.generate([prompt] * a.bucket, sp, use_tqdm=False)
        walls.append(time.perf_counter() - t0)
    wall = statistics.median(walls[1:])
    runner = llm.llm_engine.runner
    graphs, model = runner.graphs, runner.model
    if graphs is None or a.bucket not in graphs.buckets:
        sys.exit(f"no CUDA graph for bucket {a.bucket} (enforce_eager, or not a bucket)")
    b = a.bucket

    def replay():
        graphs.replay(b)

    def torch_head(h):
        return model.compute_logits(h, upcast=False).argmax(dim=-1)

    head = getattr(model, "greedy_tokens", torch_head)  # what the runner calls

    def with_torch_head():
        torch_head(graphs.replay(b))

    def with_head():
        head(graphs.replay(b))

    def with_sync():
        head(graphs.replay(b)).cpu()

    def gpu_us(fn) -> float:
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(a.replays):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / a.replays

    g, h, s = gpu_us(replay), gpu_us(with_head), gpu_us(with_sync)
    t = gpu_us(with_torch_head)
    name = torch.cuda.get_device_name()
    print(f"# {name}, {a.shape}, bf16 dummy weights, bucket {b}, {a.replays} replays")
    print(f"engine step ({b} requests, {a.max_tokens} tokens each): "
          f"{wall / a.max_tokens * 1e6:8.1f} us  ({b * a.max_tokens / wall:.1f} tok/s, median of 3)")
    print(f"graph replay alone:                      {g:8.1f} us")
    print(f"  + LM head and argmax:                  {h:8.1f} us  (+{h - g:.1f})")
    print(f"   (cuBLAS LM head + torch argmax:       {t:8.1f} us  (+{t - g:.1f}))")
    print(f"  + token to host each step:             {s:8.1f} us  (+{s - h:.1f})")


if __name__ == "__main__":
    main()
