"""Where a decode step's time goes: GPU kernels (torch profiler) and host phases.

Builds the engine on a shape of the bench dir with random weights, brings
`--batch` requests of `--context` prompt tokens into the decode phase, then
over `--steps` steps reports the wall time per step, the host time of each
engine phase (schedule, launch, reading results) and the GPU time per
kernel family.

    python benchmarks/profile_decode.py --shape qwen3-0.6b --batch 1 64 256 --bench-dir ../shared/bench
"""
import argparse
import collections
import os
import sys
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--context", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--bench-dir", default="../shared/bench")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--top", type=int, default=14)
    a = ap.parse_args()
    sys.path.insert(0, os.path.abspath(a.bench_dir))
    import torch
    from models import hf_config

    from paged_backend import LLM, SamplingParams

    d = tempfile.mkdtemp()
    hf_config(a.shape).save_pretrained(d)
    llm = LLM(d, load_format="dummy", skip_tokenizer_init=True, max_model_len=a.context + 512,
              enforce_eager=a.enforce_eager, max_num_seqs=max(a.batch))
    eng = llm.llm_engine
    timers: dict[str, float] = collections.defaultdict(float)

    def timed(obj, name, key):
        fn = getattr(obj, name)

        def wrapper(*args, **kw):
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                timers[key] += time.perf_counter() - t
        setattr(obj, name, wrapper)

    timed(eng.scheduler, "schedule", "schedule")
    timed(eng.runner, "launch", "runner.launch")
    timed(eng.runner, "_prepare", "  of which _prepare")
    timed(eng, "_process", "process results")

    for batch in a.batch:
        g = torch.Generator().manual_seed(batch)
        for i in range(batch):
            ids = torch.randint(0, 10000, (a.context,), generator=g).tolist()
            eng.add_request(f"b{batch}-{i}", {"prompt_token_ids": ids},
                            SamplingParams(temperature=0, ignore_eos=True, max_tokens=a.steps * 3 + 20))
        while eng.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                                           for r in eng.scheduler.running):
            eng.step()
        for _ in range(5):
            eng.step()
        torch.cuda.synchronize()
        timers.clear()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            eng.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / a.steps
        host = {k: v / a.steps for k, v in timers.items()}
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(a.steps):
                eng.step()
            torch.cuda.synchronize()
        fam: dict[str, float] = collections.defaultdict(float)
        total = 0.0
        for ev in prof.key_averages():
            t = getattr(ev, "device_time_total", None)
            if t is None:
                t = ev.cuda_time_total
            if t <= 0 or ev.key.startswith("cuda") or "Memcpy" in ev.key and False:
                continue
            fam[ev.key[:60]] += t / a.steps
            total += t / a.steps
        print(f"\n=== {a.shape} batch {batch} context ~{a.context}: {wall * 1e3:.3f} ms/step wall, "
              f"{batch / wall:,.0f} tok/s; GPU kernels {total / 1e3:.3f} ms/step")
        for k, v in host.items():
            print(f"  host {k:<22} {v * 1e3:7.3f} ms/step")
        for k, v in sorted(fam.items(), key=lambda kv: -kv[1])[:a.top]:
            print(f"  gpu {v / 1e3:7.3f} ms  {k}")
        eng.abort_request([f"b{batch}-{i}" for i in range(batch)])
        eng.step()


if __name__ == "__main__":
    main()
