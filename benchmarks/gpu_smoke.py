"""GPU smoke check: greedy equality with transformers on CUDA (fp32) for every tiny
architecture under preemption, a bf16 run of each, and eager bench-64 throughput of the
qwen3-0.6b shape with random weights (no peer: see benchmarks/ for side-by-side runs).

    python benchmarks/gpu_smoke.py [--bench-dir ../shared/bench]
"""
import argparse, sys, os, time, tempfile, random
ap = argparse.ArgumentParser()
ap.add_argument("--bench-dir", default="../shared/bench")
args = ap.parse_args()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.abspath(args.bench_dir))
import torch
from paged_backend import LLM, SamplingParams
from tiny_models import ARCHS, make_tiny_checkpoint
from transformers import AutoModelForCausalLM
rows = []
for arch in ARCHS:
    d = tempfile.mkdtemp(); make_tiny_checkpoint(arch, d)
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval().cuda()
    rng = random.Random(0); V = hf.config.get_text_config().vocab_size
    prompts = [[rng.randrange(V) for _ in range(rng.randint(2, 40))] for _ in range(12)]
    llm = LLM(d, skip_tokenizer_init=True, dtype="float32", device="cuda", block_size=4,
              num_kv_blocks=26, max_num_batched_tokens=32, max_model_len=96)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    ok = 0
    for p, o in zip(prompts, outs):
        ids = list(p); ref = []
        with torch.no_grad():
            for _ in range(8):
                t = int(hf(torch.tensor([ids], device="cuda")).logits[0, -1].argmax()); ref.append(t); ids.append(t)
        ok += o.outputs[0].token_ids == ref
    rows.append((arch, f"{ok}/12 greedy equal (cuda fp32)", llm.get_stats()["num_preemptions"]))
    llm16 = LLM(d, skip_tokenizer_init=True, device="cuda", max_model_len=96, gpu_memory_utilization=0.2)
    o = llm16.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    rows.append((arch, f"bf16 dtype={llm16.llm_engine.dtype} ran, {sum(len(x.outputs[0].token_ids) for x in o)} tokens, kv_blocks={llm16.get_stats()['kv_blocks_total']}", ""))
    del llm16, llm, hf; import gc; gc.collect(); torch.cuda.empty_cache()
from models import save_dummy_checkpoint
d = tempfile.mkdtemp(); save_dummy_checkpoint("qwen3-0.6b", d)
llm = LLM(d, skip_tokenizer_init=True, load_format="dummy", max_model_len=2048, gpu_memory_utilization=0.6)
st = llm.get_stats()
from workload import make_workload
reqs = make_workload(num_seqs=64)
ps = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in reqs]
llm.generate([{"prompt_token_ids": p} for p, _ in reqs[:4]], ps[:4], use_tqdm=False)
torch.cuda.synchronize(); t = time.perf_counter()
outs = llm.generate([{"prompt_token_ids": p} for p, _ in reqs], ps, use_tqdm=False)
torch.cuda.synchronize(); s = time.perf_counter() - t
n = sum(len(o.outputs[0].token_ids) for o in outs)
rows.append((f"qwen3-0.6b dummy bench-64 backend={llm.llm_engine.runner.model.model.layers[0].self_attn.attn_backend.name}", f"{n/s:.1f} tok/s ({n} tok, {s:.1f}s) kv_blocks={st['kv_blocks_total']}", torch.cuda.get_device_name()))
for r in rows: print(" | ".join(map(str, r)))
