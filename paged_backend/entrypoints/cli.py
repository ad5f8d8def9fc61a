"""The command line: `paged-backend generate [--model M] [--max-tokens N] ... PROMPT...`."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF checkpoint folder, .gguf file or hub id (default: the embedded "
                        "SmolLM2-135M-Instruct)")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model's folder")
    p.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])


def _generate(args: argparse.Namespace) -> int:
    from paged_backend import LLM, SamplingParams

    temperature = args.temperature
    if temperature is None:  # greedy for one completion, sampling for several
        temperature = 0.0 if args.n == 1 else 1.0
    params = SamplingParams(n=args.n, temperature=temperature, top_p=args.top_p,
                            top_k=args.top_k, max_tokens=args.max_tokens, seed=args.sample_seed,
                            stop=args.stop or None)
    llm = LLM(args.model, gguf_file=args.gguf_file, dtype=args.dtype, device=args.device,
              max_model_len=args.max_model_len, seed=args.seed, load_format=args.load_format)
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params,
                        use_tqdm=False)
    else:
        outs = llm.generate(list(args.prompts), params, use_tqdm=False)
    for prompt, out in zip(args.prompts, outs):
        for comp in out.outputs:
            tag = f" [{comp.index}]" if len(out.outputs) > 1 else ""
            print(f"Prompt: {prompt!r}{tag}\nGenerated: {comp.text!r}\n", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paged-backend",
                                     description="paged_backend: paged-KV LLM inference")
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine details")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate completions for prompts and print them")
    _add_engine_args(g)
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=None,
                   help="default: 0 (greedy) with --n 1, else 1.0")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--n", type=int, default=1, help="completions per prompt")
    g.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    g.add_argument("prompts", nargs="+", metavar="PROMPT")
    g.set_defaults(func=_generate)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # bad input, missing files, a hub without network
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
