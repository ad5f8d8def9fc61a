"""Beam search with vLLM's API (`LLM.beam_search`), on forked requests that share KV blocks.

Each live beam is one request in the engine. Every step each beam yields the
log-probabilities of its top `2 * beam_width` next tokens; the best
`beam_width` (beam, token) candidates by cumulative logprob survive. A beam
chosen once keeps its request; a beam chosen again is forked (its blocks
shared, the partly filled last one copied on write); a beam not chosen is
freed. Nothing is re-prefilled.

What is matched: vLLM's algorithm and scoring. A candidate ending in EOS
(unless `ignore_eos`) is set aside as finished; the rest compete for the
`beam_width` places; after `max_tokens` steps (or when no beam is left) the
finished and live beams are ranked by `cum_logprob / len(tokens) ** length_penalty`
(tokens include the prompt, EOS not counted). Scores use the model's raw
log-probabilities, so `temperature` does not change them (as in vLLM V1).
Without EOS this equals transformers' `num_beams` search (`do_sample=False`,
`early_stopping=False`) run to `max_new_tokens`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from paged_backend.engine.request import Request
from paged_backend.sampling_params import SamplingParams


@dataclass
class BeamSearchParams:
    """vLLM's beam-search parameters; checked at construction (ValueError naming the field)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, msg: str) -> ValueError:
            return ValueError(f"BeamSearchParams.{name} {msg}, got {getattr(self, name)!r}.")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.beam_width) or self.beam_width < 1:
            raise bad("beam_width", "must be an integer >= 1")
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", "must be an integer >= 1")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "must be a bool")
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature < float("inf"):
            raise bad("temperature", "must be a finite number >= 0")
        if not isinstance(self.length_penalty, (int, float)) or self.length_penalty != self.length_penalty:
            raise bad("length_penalty", "must be a number")


@dataclass
class BeamSearchSequence:
    """One finished beam: `tokens` include the prompt; `text` decodes them all (as vLLM does)."""

    tokens: list[int]
    cum_logprob: float = 0.0
    text: Optional[str] = None
    finish_reason: Optional[str] = None  # "stop" (EOS) or "length"


@dataclass
class BeamSearchOutput:
    """The best `beam_width` sequences of one prompt, best first."""

    sequences: list[BeamSearchSequence] = field(default_factory=list)


def beam_score(tokens: Sequence[int], cum_logprob: float, eos_ids: set[int],
               length_penalty: float) -> float:
    """vLLM's score: cumulative logprob over length ** length_penalty (EOS not counted)."""
    n = len(tokens)
    if tokens and tokens[-1] in eos_ids:
        n -= 1
    return cum_logprob / (max(n, 1) ** length_penalty)


@dataclass(eq=False)
class _Beam:
    request: Request
    cum_logprob: float = 0.0


@dataclass(eq=False)
class _Group:
    prompt_ids: list[int]
    beams: list[_Beam]
    done: list[BeamSearchSequence] = field(default_factory=list)
    steps: int = 0


def run_beam_search(engine, prompts: Sequence[Any], params: BeamSearchParams,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
    """Run beam search for every prompt on `engine` (an `LLMEngine`), all groups side by side."""
    if not isinstance(params, BeamSearchParams):
        raise ValueError(f"params must be BeamSearchParams, got {type(params).__name__}.")
    width = params.beam_width
    eos = set() if params.ignore_eos else set(engine.eos_token_ids)
    step_params = SamplingParams(temperature=0.0, logprobs=2 * width, max_tokens=None,
                                 ignore_eos=True)
    if width > engine.scheduler.max_num_seqs:
        raise ValueError(f"BeamSearchParams.beam_width is {width}: more sequences than "
                         f"max_num_seqs ({engine.scheduler.max_num_seqs}) lets a step run.")
    prompt_ids = [engine._tokenize_prompt(p)[1] for p in prompts]
    for ids in prompt_ids:
        if not ids:
            raise ValueError("the prompt is empty: give at least one token.")
        if len(ids) >= engine.max_model_len:
            raise ValueError(f"the prompt is {len(ids)} tokens long; max_model_len is "
                             f"{engine.max_model_len}.")
    counter = itertools.count()
    sched = engine.scheduler

    def new_id() -> str:
        return f"beam-{next(counter)}-{id(engine):x}"

    groups = []
    for ids in prompt_ids:
        rid = new_id()
        req = Request(rid, list(ids), step_params, external=True, seat_group=(rid, width))
        sched.add_request(req)
        groups.append(_Group(list(ids), [_Beam(req)]))

    bar = None
    if use_tqdm:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(groups), desc="Beam search", dynamic_ncols=True)
    live = list(groups)
    try:
        while live:
            engine.step()
            for g in list(live):
                if not all(b.request.request_id in engine.beam_logprobs for b in g.beams):
                    continue  # some beam has not produced its logits yet (chunked or preempted)
                _advance(engine, g, width, eos, params, new_id)
                if not g.beams:
                    live.remove(g)
                    if bar is not None:
                        bar.update(1)
    except BaseException:
        for g in live:
            for b in g.beams:
                engine.finish_external(b.request.request_id)
        raise
    finally:
        if bar is not None:
            bar.close()

    tok = engine.tokenizer
    outs = []
    for g in groups:
        best = sorted(g.done, key=lambda s: beam_score(s.tokens, s.cum_logprob, eos,
                                                       params.length_penalty), reverse=True)
        for s in best[:width]:
            if tok is not None:
                s.text = tok.decode(s.tokens, skip_special_tokens=True)
        outs.append(BeamSearchOutput(best[:width]))
    return outs


def _advance(engine, g: _Group, width: int, eos: set[int], params: BeamSearchParams,
             new_id) -> None:
    """One beam-search step of group `g`: choose the surviving (beam, token) pairs."""
    cands: list[tuple[float, int, int]] = []  # (cumulative logprob, beam index, token)
    for i, b in enumerate(g.beams):
        ids, lps, _ = engine.beam_logprobs.pop(b.request.request_id)
        for t, lp in zip(ids[1:], lps[1:]):  # column 0 is the greedy token, repeated in the top-k
            cands.append((b.cum_logprob + lp, i, t))
    cands.sort(key=lambda c: c[0], reverse=True)
    g.steps += 1
    chosen: list[tuple[float, int, int]] = []
    seen = set()
    for c in cands:
        if (c[1], c[2]) in seen:
            continue
        seen.add((c[1], c[2]))
        if c[2] in eos:
            b = g.beams[c[1]]
            g.done.append(BeamSearchSequence(g.prompt_ids + b.request.output_token_ids + [c[2]],
                                             c[0], finish_reason="stop"))
            continue
        chosen.append(c)
        if len(chosen) == width:
            break
    last = g.steps >= params.max_tokens or \
        len(g.prompt_ids) + g.steps >= engine.max_model_len
    new_beams: list[_Beam] = []
    used = set()
    sched = engine.scheduler
    for cum, i, t in chosen:
        parent = g.beams[i]
        tokens = parent.request.output_token_ids
        if last:
            g.done.append(BeamSearchSequence(g.prompt_ids + tokens + [t], cum,
                                             finish_reason="length"))
            continue
        if i in used:  # the parent already continues: fork a new request off its blocks
            child = Request(new_id(), g.prompt_ids, parent.request.sampling_params, external=True,
                            output_token_ids=list(tokens) + [t],
                            seat_group=parent.request.seat_group)
            sched.add_forked(parent.request, child)
            new_beams.append(_Beam(child, cum))
        else:
            used.add(i)
            new_beams.append(_Beam(parent.request, cum))
    # Append each continuing beam's token after all forks (forks copy the pre-step tokens).
    for nb, (cum, i, t) in zip(new_beams, chosen):
        if nb.request is g.beams[i].request:
            nb.request.output_token_ids.append(t)
    for i, b in enumerate(g.beams):
        if i not in used or last:
            engine.finish_external(b.request.request_id)
    g.beams = [] if last else new_beams
