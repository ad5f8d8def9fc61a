"""GPU throughput benchmark: paged_backend on a bench shape with random weights, against the
physical bound and (optionally) transformers in the same process.

Workloads (from ../shared/bench, imported at run time): `bench-256` / `bench-64` are
`make_workload(num_seqs=N)` (random prompt ids, prompt and output lengths uniform in
[100, 1024], EOS ignored); `latency` is one request of 128 random prompt tokens and 256
output tokens. Output tok/s = generated tokens / wall seconds of one `generate` call,
after a warm-up. The bound is `roofline.bound(shape, reqs, 3.0e12, 7.8e14)` (H100).
The peer is hf_peer.py's `run_static(model, reqs, 64)` (`run_latency` for latency),
run after our engine is freed. The last lines are rows for BENCHMARKS.md's GPU table.

    python benchmarks/throughput.py --shape qwen3-0.6b --workload bench-64 --peer transformers
    python benchmarks/throughput.py --shape llama3-8b --workload bench-256 --json-out r.json
    # CPU smoke test with a shrunken workload:
    python benchmarks/throughput.py --shape qwen3-0.6b --workload bench-64 --device cpu \
        --dtype float32 --num-seqs 2 --prompt-len-cap 32 --output-len-cap 8 --max-num-seqs 4
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BW, FLOPS = 3.0e12, 7.8e14  # measured H100 ceilings (../shared/GPU.md)
LATENCY_PROMPT, LATENCY_OUTPUT = 128, 256
PEER_BATCH = 64


def log(*a) -> None:
    print(*a, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", required=True, choices=["qwen3-0.6b", "llama3-8b"])
    ap.add_argument("--workload", required=True, choices=["bench-256", "bench-64", "latency"])
    ap.add_argument("--peer", choices=["transformers"], default=None,
                    help="also run transformers (hf_peer.py) in this process, after ours")
    ap.add_argument("--bench-dir", default=None,
                    help="folder holding workload.py, models.py, roofline.py, hf_peer.py "
                         "(default: ../shared/bench next to the repo, else shared/bench in it)")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="default: the engine's")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="default: the longest prompt + output of the workload and warm-up")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json-out", default=None, help="write every result to this JSON file")
    ap.add_argument("--repeat", type=int, default=1,
                    help="time the workload N times (prefix cache reset between runs) and "
                         "report the run of median time; a 1-request run is ~0.3 s, so a single "
                         "run varies by several percent")
    # Shrinking, for smoke tests (the workload label then says what was changed).
    ap.add_argument("--num-seqs", type=int, default=None,
                    help="bench workloads: make_workload(num_seqs=N) instead of the named N")
    ap.add_argument("--prompt-len-cap", type=int, default=None, help="truncate prompts to N tokens")
    ap.add_argument("--output-len-cap", type=int, default=None, help="cap max_tokens at N")
    ap.add_argument("--warmup-len-cap", type=int, default=None,
                    help="cap warm-up prompt lengths (default: 1024, or the prompt cap)")
    a = ap.parse_args(argv)
    if a.bench_dir is None:
        a.bench_dir = next((d for d in (os.path.join(REPO, "..", "shared", "bench"),
                                        os.path.join(REPO, "shared", "bench"))
                            if os.path.isdir(d)), "../shared/bench")
    if a.workload == "latency" and a.num_seqs is not None:
        ap.error("--num-seqs applies to the bench workloads only")
    return a


def import_bench(bench_dir: str):
    """Import the shared reference modules (workload, models, roofline) from `bench_dir`."""
    bench_dir = os.path.abspath(bench_dir)
    for f in ("workload.py", "models.py", "roofline.py", "hf_peer.py"):
        if not os.path.isfile(os.path.join(bench_dir, f)):
            sys.exit(f"{f} not found in --bench-dir {bench_dir}")
    if bench_dir not in sys.path:
        sys.path.insert(0, bench_dir)
    import models
    import roofline
    import workload
    return workload, models, roofline


def build_workload(a, workload_mod) -> tuple[list[tuple[list[int], int]], str]:
    """The (prompt_token_ids, max_tokens) list and its label for the table."""
    if a.workload == "latency":
        rng = random.Random(0)  # hf_peer draws its own random prompt: only lengths match
        reqs = [([rng.randrange(10000) for _ in range(LATENCY_PROMPT)], LATENCY_OUTPUT)]
        label, changes = "latency", []
    else:
        n = int(a.workload.split("-")[1])
        changes = []
        if a.num_seqs is not None and a.num_seqs != n:
            n = a.num_seqs
            changes.append(f"{n} seqs")
        reqs = workload_mod.make_workload(num_seqs=n)
        label = a.workload
    if a.prompt_len_cap is not None:
        reqs = [(p[:a.prompt_len_cap], m) for p, m in reqs]
        changes.append(f"prompt<={a.prompt_len_cap}")
    if a.output_len_cap is not None:
        reqs = [(p, min(m, a.output_len_cap)) for p, m in reqs]
        changes.append(f"out<={a.output_len_cap}")
    if changes:
        label += f" ({', '.join(changes)})"
    return reqs, label


def warmup_workload(a) -> list[tuple[list[int], int]]:
    """8 requests x 32 tokens with prompt lengths up to 1024, drawn apart from the workload."""
    cap = a.warmup_len_cap or a.prompt_len_cap or 1024
    out = min(32, a.output_len_cap or 32)
    rng = random.Random(12345)
    lens = [16, 100, 1024, 257, 777, 64, 1000, 512]
    return [([rng.randrange(10000) for _ in range(min(n, cap))], out) for n in lens]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return name[len("NVIDIA "):] if name.startswith("NVIDIA ") else name
    return f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})"


def git_commit() -> tuple[str, bool]:
    """(short HEAD, whether the working tree has changes); ('unknown', False) without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, check=True,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        return head or "unknown", bool(dirty)
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def timed_generate(llm, reqs, device: torch.device) -> tuple[float, list]:
    """One `generate` over `reqs` between device syncs: (seconds, outputs)."""
    from paged_backend import SamplingParams
    prompts = [{"prompt_token_ids": p} for p, _ in reqs]
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=m) for _, m in reqs]
    sync(device)
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    sync(device)
    return time.perf_counter() - t, outs


def check_outputs(outs, reqs) -> int:
    """Every request produced exactly its max_tokens; returns the total output tokens."""
    assert len(outs) == len(reqs), f"{len(outs)} outputs for {len(reqs)} requests"
    for i, (o, (_, m)) in enumerate(zip(outs, reqs)):
        got = len(o.outputs[0].token_ids)
        assert got == m, f"request {i}: {got} tokens, max_tokens {m} ({o.outputs[0].finish_reason})"
    return sum(m for _, m in reqs)


def run_engine(a, models_mod, reqs) -> dict:
    """Build our engine on the shape's config (dummy weights), warm up, time the workload."""
    from paged_backend import LLM
    warm = [reqs[0]] if a.workload == "latency" else warmup_workload(a)
    max_len = a.max_model_len or max(len(p) + m for p, m in reqs + warm)
    tmp = tempfile.mkdtemp(prefix=f"pb-{a.shape}-")
    models_mod.hf_config(a.shape).save_pretrained(tmp)  # config.json only: no weights
    kw = dict(load_format="dummy", skip_tokenizer_init=True, max_model_len=max_len,
              gpu_memory_utilization=a.gpu_memory_utilization, max_num_seqs=a.max_num_seqs,
              enforce_eager=a.enforce_eager, device=a.device, dtype=a.dtype)
    if a.max_num_batched_tokens is not None:
        kw["max_num_batched_tokens"] = a.max_num_batched_tokens
    t = time.perf_counter()
    llm = LLM(tmp, **kw)
    eng = llm.llm_engine
    device = eng.device
    log(f"engine: {a.shape} on {device} ({eng.dtype}), max_model_len {max_len}, "
        f"max_num_batched_tokens {eng.config.max_num_batched_tokens}, "
        f"{llm.get_stats()['kv_blocks_total']} KV blocks of {eng.config.block_size}, "
        f"enforce_eager={a.enforce_eager}; built in {time.perf_counter() - t:.1f}s")

    secs, outs = timed_generate(llm, warm, device)
    check_outputs(outs, warm)
    log(f"warm-up: {len(warm)} requests, {sum(m for _, m in warm)} tokens in {secs:.1f}s")
    runs = []
    for _ in range(max(1, a.repeat)):
        llm.reset_prefix_cache()  # the warm-up (and earlier runs) saw the same prompts
        llm.reset_stats()
        secs, outs = timed_generate(llm, reqs, device)
        n = check_outputs(outs, reqs)
        runs.append((secs, llm.get_stats()))
    if len(runs) > 1:
        log("runs: " + ", ".join(f"{n / s:,.1f}" for s, _ in runs) + " tok/s")
    secs, st = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    res = dict(engine="paged_backend", device=str(device),
               dtype=str(eng.dtype).replace("torch.", ""), seconds=secs, output_tokens=n,
               prompt_tokens=sum(len(p) for p, _ in reqs), tok_per_s=n / secs,
               runs_tok_per_s=[n / s for s, _ in runs],
               max_model_len=max_len,
               max_num_batched_tokens=eng.config.max_num_batched_tokens,
               stats={k: st[k] for k in ("num_steps", "num_preemptions", "kv_blocks_total",
                                         "kv_blocks_peak", "num_chunked_prefill_steps",
                                         "num_mixed_steps")})
    log(f"paged_backend: {n} output tokens in {secs:.2f}s = {n / secs:,.1f} tok/s")
    log("engine stats: " + ", ".join(f"{k} {v}" for k, v in res["stats"].items()))
    del llm, eng, outs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        log(f"after freeing the engine: {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB "
            "still allocated by torch")
    return res


def run_peer(a, reqs) -> dict:
    """transformers via hf_peer.py: `run_static(model, reqs, 64)`, or `run_latency(model)`."""
    import hf_peer  # defines functions only; its CLI is under __main__
    import transformers
    model = hf_peer.load(a.shape, "sdpa")
    if a.workload == "latency":
        secs, n = hf_peer.run_latency(model)
        mode = "generate"
    else:
        secs, n = hf_peer.run_static(model, reqs, PEER_BATCH)
        mode = f"generate (batch {PEER_BATCH})"
    del model
    gc.collect()
    torch.cuda.empty_cache()
    log(f"transformers {transformers.__version__} {mode}: {n} output tokens in {secs:.2f}s "
        f"= {n / secs:,.1f} tok/s")
    return dict(engine=f"transformers {transformers.__version__} {mode}", seconds=secs,
                output_tokens=n, tok_per_s=n / secs)


def ratio(x: float) -> str:
    return f"{x:.2f}x" if x < 10 else f"{x:.1f}x"


def main(argv=None) -> dict:
    import transformers
    a = parse_args(argv)
    workload_mod, models_mod, roofline = import_bench(a.bench_dir)
    reqs, label = build_workload(a, workload_mod)
    log(f"workload {label}: {len(reqs)} requests, {sum(len(p) for p, _ in reqs)} prompt and "
        f"{sum(m for _, m in reqs)} output tokens")
    if a.peer and not torch.cuda.is_available():
        sys.exit("--peer transformers needs CUDA (hf_peer.py runs on the GPU)")

    bound_s, bound_n = roofline.bound(a.shape, reqs, BW, FLOPS)
    bound = bound_n / bound_s
    log(f"bound (roofline, {BW:.1e} B/s, {FLOPS:.1e} FLOP/s): >= {bound_s:.2f}s, "
        f"<= {bound:,.1f} tok/s")

    ours = run_engine(a, models_mod, reqs)
    device = torch.device(ours["device"])
    ours["of_bound"] = ours["tok_per_s"] / bound
    log(f"paged_backend: {100 * ours['of_bound']:.1f}% of the bound")
    peer = None
    if a.peer:
        peer = run_peer(a, reqs)
        peer["of_bound"] = peer["tok_per_s"] / bound
        ours["vs_peer"] = ours["tok_per_s"] / peer["tok_per_s"]
        log(f"paged_backend / transformers: {ratio(ours['vs_peer'])}")

    commit, dirty = git_commit()
    if dirty:
        log(f"note: the working tree differs from {commit} (uncommitted changes)")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    card = card_name(device)
    shape = f"{a.shape} (dummy weights)"
    engine = "paged_backend" + (" (enforce_eager)" if a.enforce_eager else "")

    def row(engine: str, r: dict, vs: str) -> str:
        return (f"| {date} | {commit} | {card} | {shape} | {label} | {engine} | "
                f"{r['tok_per_s']:.1f} | {vs} | {100 * r['of_bound']:.1f}% of {bound:,.0f} |")
    rows = [row(engine, ours, ratio(ours["vs_peer"]) if peer else "n/a")]
    if peer:
        rows.append(row(peer["engine"], peer, "1.00x"))
    log("\n| date | commit | card | shape | workload | engine | output tok/s | vs transformers "
        "| of bound |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        log(r)

    result = dict(date=date, commit=commit, tree_dirty=dirty, card=card, shape=a.shape,
                  workload=label, args=vars(a), requests=len(reqs),
                  bound=dict(seconds=bound_s, output_tokens=bound_n, tok_per_s=bound,
                             bandwidth=BW, flops=FLOPS),
                  paged_backend=ours, transformers=peer, rows=rows,
                  versions=dict(torch=torch.__version__, transformers=transformers.__version__,
                                python=platform.python_version()))
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(result, f, indent=2, default=str)
        log(f"wrote {a.json_out}")
    return result


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    main()
