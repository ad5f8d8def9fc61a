"""Per-step timeline of a throughput workload: where the seconds of a run go.

Runs a bench workload (random weights) and records, for every engine step,
its wall time, its number of sequences and new tokens; prints the time spent
in steps with prefill tokens and in pure-decode steps grouped by batch size.

    python benchmarks/step_timeline.py --shape qwen3-0.6b --num-seqs 256 --bench-dir ../shared/bench
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
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--bench-dir", default="../shared/bench")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=1, help="run the workload this many times")
    ap.add_argument("--gc", choices=["on", "freeze", "off"], default="on",
                    help="Python GC during the timed run: as is, frozen after warm-up, or disabled")
    a = ap.parse_args()
    sys.path.insert(0, os.path.abspath(a.bench_dir))
    import torch
    from models import hf_config
    from workload import make_workload

    from paged_backend import LLM, SamplingParams
    from paged_backend.sampling_params import RequestOutputKind

    d = tempfile.mkdtemp()
    hf_config(a.shape).save_pretrained(d)
    reqs = make_workload(num_seqs=a.num_seqs)
    llm = LLM(d, load_format="dummy", skip_tokenizer_init=True, max_model_len=2048,
              max_num_batched_tokens=a.max_num_batched_tokens)
    eng = llm.llm_engine
    warm = make_workload(num_seqs=8, seed=1)
    llm.generate([{"prompt_token_ids": p} for p, _ in warm],
                 SamplingParams(temperature=0, ignore_eos=True, max_tokens=32), use_tqdm=False)
    llm.reset_prefix_cache()
    rows = []
    orig = eng.scheduler.schedule

    def schedule():
        out = orig()
        rows.append((len(out.scheduled), out.num_batched_tokens))
        return out
    eng.scheduler.schedule = schedule
    if a.gc != "on":
        import gc
        gc.collect()
        gc.freeze()
        if a.gc == "off":
            gc.disable()
    for rep in range(a.repeat):
        llm.reset_prefix_cache()
        rows.clear()
        for i, (p, m) in enumerate(reqs):
            eng.add_request(f"{rep}-{i}", {"prompt_token_ids": p},
                            SamplingParams(temperature=0, ignore_eos=True, max_tokens=m,
                                           output_kind=RequestOutputKind.FINAL_ONLY))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        stamps = []
        while eng.has_unfinished_requests():
            eng.step()
            stamps.append(time.perf_counter())
        total = time.perf_counter() - t0
        report(a, reqs, rows, stamps, t0, total)


def report(a, reqs, rows, stamps, t0, total) -> None:
    # With overlapped steps, step i's wall time is the gap between consecutive returns.
    durs = [b - a_ for a_, b in zip([t0] + stamps[:-1], stamps)]
    groups = collections.defaultdict(lambda: [0, 0.0, 0])
    for (nseq, ntok), dt in zip(rows, durs):
        key = "prefill/mixed" if ntok > nseq else f"decode {min(256, 1 << (max(nseq, 1) - 1).bit_length()):>4}"
        g = groups[key]
        g[0] += 1
        g[1] += dt
        g[2] += nseq
    out_tokens = sum(m for _, m in reqs)
    print(f"{a.shape} bench-{a.num_seqs}: {total:.2f} s, {out_tokens / total:,.0f} tok/s, {len(rows)} steps")
    for k in sorted(groups):
        n, t, s = groups[k]
        print(f"  {k:<14} steps {n:5d}  {t:6.2f} s  {t / n * 1e3:7.2f} ms/step  avg seqs {s / n:6.1f}")
    # Outliers: decode steps over twice their batch bucket's median (GC pauses, recompiles).
    by_key = collections.defaultdict(list)
    for i, (nseq, ntok) in enumerate(rows):
        if ntok == nseq:
            by_key[min(256, 1 << (max(nseq, 1) - 1).bit_length())].append(i)
    spikes = []
    for idx in by_key.values():
        med = sorted(durs[i] for i in idx)[len(idx) // 2]
        spikes += [(i, durs[i] - med) for i in idx if durs[i] > 2 * med]
    print(f"  decode spikes (> 2x bucket median): {len(spikes)}, "
          f"{sum(e for _, e in spikes) * 1e3:.1f} ms over the medians; first 20 (index, ms, seqs):",
          [(i, round(durs[i] * 1e3, 1), rows[i][0]) for i, _ in sorted(spikes)[:20]])
    slow = sorted(range(len(durs)), key=lambda i: -durs[i])[:6]
    print("  slowest steps (index, ms, seqs, tokens):",
          [(i, round(durs[i] * 1e3, 1), *rows[i]) for i in sorted(slow)])

if __name__ == "__main__":
    main()
