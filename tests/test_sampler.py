"""Tests of the sampler: exact distributions, greedy, masks, logprobs, seeds.

Statistical tests draw NS = 50,000 samples (rows repeated in one batch) from
a fixed 8-token distribution with a fixed seed and compare the empirical
frequencies with the exact distribution computed here by hand in float64:
max |p_hat - p| < 0.01 (about 4.5 standard deviations at p = 0.5), a
chi-square statistic below its 0.999 quantile, and never a token of
probability zero.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from paged_backend.layers.sampler import (
    LogprobsTensors,
    Sampler,
    SamplerOutput,
    SamplingMetadata,
    SamplingRow,
    compute_logprobs_tensors,
)
from paged_backend.sampling_params import SamplingParams

NS = 50_000
MAX_ABS_DEV = 0.01
# 0.999 quantiles of the chi-square distribution, by degrees of freedom.
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}
LOGITS8 = [1.0, 0.5, 2.0, -1.0, 0.0, 1.5, -0.5, 0.8]
LP_TOL = 1e-6

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
GPU_DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else []


# --------------------------------------------------------------------------- helpers
def expected_distribution(logits: list[float], p: SamplingParams, prompt: list[int],
                          output: list[int]) -> list[float]:
    """The exact next-token distribution, by hand, in float64 (independent oracle)."""
    x = [float(v) for v in logits]
    v = len(x)
    for tok, b in (p.logit_bias or {}).items():
        x[tok] += b
    if len(output) < p.min_tokens:
        for tok in p.all_stop_token_ids:
            x[tok] = -math.inf
    for tok in set(prompt) | set(output):
        r = p.repetition_penalty
        x[tok] = x[tok] / r if x[tok] > 0 else x[tok] * r
    counts = Counter(output)
    for tok, c in counts.items():
        x[tok] -= p.frequency_penalty * c + p.presence_penalty * (c > 0)
    if p.temperature < 1e-5:
        best = max(range(v), key=lambda i: x[i])
        return [1.0 if i == best else 0.0 for i in range(v)]
    x = [xi / p.temperature for xi in x]
    m = max(x)
    w = [math.exp(xi - m) for xi in x]
    order = sorted(range(v), key=lambda i: -w[i])
    keep = set(order)
    if p.top_k not in (0, -1):
        keep = set(order[:p.top_k])
    if p.top_p < 1.0:
        total = sum(w[i] for i in keep)
        mass, kept = 0.0, set()
        for i in order:
            if i not in keep:
                continue
            if mass >= p.top_p:
                break
            kept.add(i)
            mass += w[i] / total
        keep = kept
    wmax = max(w)
    keep = {i for i in keep if w[i] >= p.min_p * wmax}
    total = sum(w[i] for i in keep)
    return [w[i] / total if i in keep else 0.0 for i in range(v)]


def rows_for(params: SamplingParams, n: int, prompt: list[int] = (), output: list[int] = (),
             seed_base: int | None = None, device: str = "cpu") -> list[SamplingRow]:
    prompt, output = list(prompt), list(output)  # shared by the rows: read-only
    if seed_base is None:
        return [SamplingRow(params, prompt, output, None) for _ in range(n)]
    return [SamplingRow(params, prompt, output,
                        torch.Generator(device=device).manual_seed(seed_base + i))
            for i in range(n)]


def sample(rows: list[SamplingRow], logits: torch.Tensor, seed: int = 0) -> SamplerOutput:
    device = logits.device
    meta = SamplingMetadata.build(rows, logits.shape[-1], device)
    gen = torch.Generator(device=device).manual_seed(seed)
    return Sampler(gen)(logits, meta)


def check_frequencies(tokens: torch.Tensor, expected: list[float]) -> None:
    n = tokens.numel()
    counts = torch.bincount(tokens.cpu(), minlength=len(expected)).tolist()
    p_hat = [c / n for c in counts]
    dev = max(abs(a - b) for a, b in zip(p_hat, expected))
    assert dev < MAX_ABS_DEV, (p_hat, expected)
    for c, p in zip(counts, expected):
        if p == 0.0:
            assert c == 0, (counts, expected)
    support = [i for i, p in enumerate(expected) if p > 0]
    if len(support) > 1:
        chi2 = sum((counts[i] - n * expected[i]) ** 2 / (n * expected[i]) for i in support)
        assert chi2 < CHI2_999[len(support) - 1], (chi2, counts, expected)


# ------------------------------------------------------------------ statistical tests
STAT_CASES = {
    "t1": (dict(temperature=1.0), [], []),
    "t0.5": (dict(temperature=0.5), [], []),
    "t2": (dict(temperature=2.0), [], []),
    "top_k3": (dict(top_k=3), [], []),
    "top_k1": (dict(top_k=1, temperature=1.7), [], []),
    "top_p0.7": (dict(top_p=0.7), [], []),
    "top_p0.4_t2": (dict(top_p=0.4, temperature=2.0), [], []),
    "min_p0.3": (dict(min_p=0.3), [], []),
    "min_p0.1_t0.6": (dict(min_p=0.1, temperature=0.6), [], []),
    "combined": (dict(temperature=0.8, top_k=6, top_p=0.85, min_p=0.1), [], []),
    "top_k_top_p": (dict(top_k=4, top_p=0.68), [], []),  # top-p on the top-4 renormalized
    "rep1.5": (dict(repetition_penalty=1.5), [0, 3, 5], [2]),
    "rep0.7": (dict(repetition_penalty=0.7), [1, 6], [6]),
    "presence": (dict(presence_penalty=0.8), [0, 1], [2, 2, 5]),
    "frequency": (dict(frequency_penalty=0.5), [0, 1], [2, 2, 5, 0]),
    "negative_penalties": (dict(frequency_penalty=-0.4, presence_penalty=-0.3), [], [3, 3, 6]),
    "logit_bias": (dict(logit_bias={3: 3.0, 2: -2.0}), [], []),
    "everything": (dict(temperature=1.3, top_k=5, top_p=0.9, min_p=0.05,
                        repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.2,
                        logit_bias={7: 1.5}), [0, 1], [2, 2, 7]),
    "min_tokens": (dict(min_tokens=2, stop_token_ids=[2]), [], [0]),
}


@pytest.mark.parametrize("case", list(STAT_CASES))
def test_distribution_matches_exact(case: str) -> None:
    kwargs, prompt, output = STAT_CASES[case]
    params = SamplingParams(**kwargs)
    if case == "min_tokens":
        params.all_stop_token_ids.add(5)  # the engine adds EOS this way
    expected = expected_distribution(LOGITS8, params, prompt, output)
    logits = torch.tensor(LOGITS8).expand(NS, -1)
    out = sample(rows_for(params, NS, prompt, output), logits, seed=1)
    check_frequencies(out.sampled_token_ids, expected)


def test_mixed_batch_distributions() -> None:
    """Rows of different params (seeded and not, greedy) interleaved in one batch."""
    configs = [
        (SamplingParams(temperature=0.5, top_k=3), [], [], None),
        (SamplingParams(temperature=1.5, top_p=0.8, seed=1), [4], [4, 1], 1000),
        (SamplingParams(temperature=0.0, repetition_penalty=2.0), [2], [], None),
        (SamplingParams(min_p=0.2, presence_penalty=1.0), [], [5], None),
    ]
    per = 15_000
    rows, which = [], []
    for c, (params, prompt, output, seed_base) in enumerate(configs):
        rows += rows_for(params, per, prompt, output, seed_base=seed_base)
        which += [c] * per
    perm = list(range(len(rows)))
    random.Random(0).shuffle(perm)
    rows = [rows[i] for i in perm]
    which = torch.tensor([which[i] for i in perm])
    logits = torch.tensor(LOGITS8).expand(len(rows), -1)
    out = sample(rows, logits, seed=2)
    for c, (params, prompt, output, _) in enumerate(configs):
        expected = expected_distribution(LOGITS8, params, prompt, output)
        check_frequencies(out.sampled_token_ids[which == c], expected)


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_distribution_on_gpu(device: str) -> None:
    kwargs, prompt, output = STAT_CASES["everything"]
    params = SamplingParams(**kwargs)
    expected = expected_distribution(LOGITS8, params, prompt, output)
    logits = torch.tensor(LOGITS8, device=device).expand(NS, -1)
    out = sample(rows_for(params, NS, prompt, output), logits, seed=1)
    assert out.sampled_token_ids.device.type == "cuda"
    check_frequencies(out.sampled_token_ids, expected)


# ------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax(device: str) -> None:
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0)).to(device)
    params = SamplingParams(temperature=0.0, top_k=5, top_p=0.5, min_p=0.5)
    out = sample(rows_for(params, 64), logits, seed=3)
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=-1))
    out = Sampler()(logits, SamplingMetadata.build(rows_for(params, 64), 1000, device))
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=-1))


def test_greedy_uses_processed_logits() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.5, 1.0, -1.0]] * 3)
    rows = [
        SamplingRow(SamplingParams(temperature=0, logit_bias={4: 5.0}), [], [], None),
        SamplingRow(SamplingParams(temperature=0, repetition_penalty=1.5), [1], [], None),
        SamplingRow(SamplingParams(temperature=0, frequency_penalty=1.0, presence_penalty=0.1),
                    [], [1, 1, 2, 2], None),
    ]
    out = sample(rows, logits)
    assert out.sampled_token_ids.tolist() == [4, 2, 3]


def test_greedy_rows_ignore_randomness_in_mixed_batch() -> None:
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(40, 300, generator=gen)
    greedy = SamplingParams(temperature=0.0)
    rand = SamplingParams(temperature=1.0)
    rows = [SamplingRow(greedy if i % 2 else rand, [], [], None) for i in range(40)]
    a = sample(rows, logits, seed=1).sampled_token_ids
    b = sample(rows, logits, seed=2).sampled_token_ids
    assert torch.equal(a[1::2], logits[1::2].argmax(-1))
    assert torch.equal(b[1::2], logits[1::2].argmax(-1))
    assert not torch.equal(a[0::2], b[0::2])


def test_top_k_zero_and_minus_one_disable() -> None:
    logits = torch.randn(256, 50, generator=torch.Generator().manual_seed(1))
    outs = []
    for k in (0, -1, 50, 1000):
        params = SamplingParams(top_k=k, temperature=1.0)
        meta = SamplingMetadata.build(rows_for(params, 256), 50, "cpu")
        assert meta.top_k is None
        outs.append(sample(rows_for(params, 256), logits, seed=7).sampled_token_ids)
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    assert len(set(outs[0].tolist())) > 1


def test_top_k_keeps_ties() -> None:
    logits = torch.tensor([[3.0, 1.0, 3.0, 0.0, 3.0, -2.0]] * 30_000)
    out = sample(rows_for(SamplingParams(top_k=2), 30_000), logits, seed=4)
    check_frequencies(out.sampled_token_ids, [1 / 3, 0, 1 / 3, 0, 1 / 3, 0])


def test_min_tokens_masks_stop_ids_until_reached() -> None:
    v = 10
    logits = torch.zeros(1, v)
    logits[0, 3] = 5.0  # a stop id
    logits[0, 7] = 4.0  # EOS
    logits[0, 1] = 3.0
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[3])
    params.all_stop_token_ids.add(7)
    rand = SamplingParams(temperature=1.0, min_tokens=3, stop_token_ids=[3])
    rand.all_stop_token_ids.add(7)
    for n_out in range(5):
        out = sample([SamplingRow(params, [0], [1] * n_out, None)], logits)
        assert out.sampled_token_ids.item() == (1 if n_out < 3 else 3)
        many = sample(rows_for(rand, 5000, [0], [1] * n_out), logits.expand(5000, v), seed=n_out)
        stop_hits = torch.isin(many.sampled_token_ids, torch.tensor([3, 7])).sum().item()
        assert (stop_hits == 0) if n_out < 3 else (stop_hits > 4000)


def test_zero_uniform_draw_never_picks_masked_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """u = 0 (possible in U[0, 1)) must not let a zero-probability token win."""
    monkeypatch.setattr(torch.Tensor, "uniform_", lambda self, *a, **k: self.zero_())
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0, 0.5]] * 2)
    rows = [SamplingRow(SamplingParams(top_k=1), [], [], None),
            SamplingRow(SamplingParams(top_k=2), [], [], None)]
    assert sample(rows, logits).sampled_token_ids.tolist()[0] == 2
    assert sample(rows, logits).sampled_token_ids.tolist()[1] in (2, 3)


def test_logit_bias_outside_vocab_raises() -> None:
    params = SamplingParams(logit_bias={12: 1.0})
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingMetadata.build([SamplingRow(params, [], [], None)], 10, "cpu")


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0.7, top_k=5, top_p=0.8, min_p=0.1, repetition_penalty=1.3,
         presence_penalty=0.5, logit_bias={3: 2.0}, min_tokens=2, stop_token_ids=[4]),
    dict(top_k=5), dict(top_p=0.5), dict(min_p=0.2), dict(temperature=0.5),
    dict(temperature=0.0), dict(temperature=0.0, logit_bias={3: 1.0}),
])
def test_input_logits_not_modified(kwargs: dict) -> None:
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(2))
    before = logits.clone()
    rows = rows_for(SamplingParams(**kwargs), 4, [1, 2], [5])
    rows += rows_for(SamplingParams(temperature=0.0), 4)
    sample(rows, logits)
    assert torch.equal(logits, before)


def test_empty_batch() -> None:
    out = sample([], torch.empty(0, 16))
    assert out.sampled_token_ids.shape == (0,)
    assert out.logprobs is None


# ----------------------------------------------------------------------- logprobs
def check_logprobs(lp: LogprobsTensors, logits: torch.Tensor, tokens: torch.Tensor,
                   k: int) -> None:
    ref = torch.log_softmax(logits.double(), dim=-1).cpu()
    lp_ids, lp_vals, ranks = lp.token_ids.cpu(), lp.logprobs.cpu(), lp.ranks.cpu()
    n = logits.shape[0]
    assert lp_ids.shape == (n, k + 1) and lp_vals.shape == (n, k + 1) and ranks.shape == (n,)
    assert lp_ids.dtype == torch.int64 and lp_vals.dtype == torch.float32
    assert ranks.dtype == torch.int64
    assert torch.equal(lp_ids[:, 0], tokens.cpu())
    # Every listed id carries its own raw logprob.
    torch.testing.assert_close(lp_vals.double(), ref.gather(1, lp_ids), atol=LP_TOL, rtol=0)
    ref32 = torch.log_softmax(logits.float(), dim=-1).cpu()
    tok_lp = ref32.gather(1, tokens.cpu().view(-1, 1))
    assert torch.equal(ranks, (ref32 > tok_lp).sum(-1) + 1)
    if k:
        top = torch.topk(ref32, k, dim=-1)
        torch.testing.assert_close(lp_vals[:, 1:].double(), top.values.double(),
                                   atol=LP_TOL, rtol=0)
        assert torch.all(lp_vals[:, 1:-1] >= lp_vals[:, 2:])
        for i in range(n):
            assert len(set(lp_ids[i, 1:].tolist())) == k


@pytest.mark.parametrize("device", DEVICES)
def test_sampler_logprobs_are_raw(device: str) -> None:
    gen = torch.Generator().manual_seed(11)
    logits = (torch.randn(12, 200, generator=gen) * 3).to(device)
    logits[0, :6] = logits[0].max() + 1.0  # ties at the top
    logits[5, 10:20] = 0.25  # ties in the middle
    kinds = [
        SamplingParams(temperature=0.0, logprobs=5),
        SamplingParams(temperature=0.9, logprobs=0, logit_bias={7: 50.0}),
        SamplingParams(temperature=1.2, top_k=20, top_p=0.9, logprobs=None,
                       repetition_penalty=1.4, frequency_penalty=0.5),
        SamplingParams(temperature=0.0, logprobs=2, seed=3, presence_penalty=1.0),
    ]
    rows = [SamplingRow(kinds[i % 4], [1, 2, 3], [7, 7], None) for i in range(12)]
    out = sample(rows, logits, seed=9)
    assert out.logprobs is not None
    check_logprobs(out.logprobs, logits, out.sampled_token_ids, 5)
    assert out.sampled_token_ids[0].item() == 0  # first of the tied maxima
    assert out.logprobs.ranks[0].item() == 1
    assert out.sampled_token_ids[1].item() == 7  # the bias wins, logprob stays raw


def test_logprobs_only_when_some_row_asks() -> None:
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(1))
    out = sample(rows_for(SamplingParams(), 5), logits, seed=0)
    assert out.logprobs is None  # nobody asked: no log_softmax over the vocabulary
    rows = rows_for(SamplingParams(), 4) + rows_for(SamplingParams(logprobs=0), 1)
    out = sample(rows, logits, seed=0)
    assert out.logprobs is not None
    check_logprobs(out.logprobs, logits, out.sampled_token_ids, 0)


def test_compute_logprobs_tensors_given_tokens() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0], [5.0, -1.0, 2.0, 4.0]])
    tokens = torch.tensor([0, 3, 3])
    lp = compute_logprobs_tensors(logits, tokens, 2)
    assert lp.ranks.tolist() == [3, 1, 2]
    check_logprobs(lp, logits, tokens, 2)
    assert lp.token_ids[2].tolist() == [3, 0, 3]
    assert sorted(lp.token_ids[0, 1:].tolist()) == [1, 2]
    torch.testing.assert_close(lp.logprobs[1], torch.full((3,), -math.log(4.0)))
    # Larger random case, K = 0 and K = 7.
    big = torch.randn(9, 500, generator=torch.Generator().manual_seed(4)) * 4
    toks = torch.randint(0, 500, (9,), generator=torch.Generator().manual_seed(5))
    check_logprobs(compute_logprobs_tensors(big, toks, 0), big, toks, 0)
    check_logprobs(compute_logprobs_tensors(big, toks, 7), big, toks, 7)


# ----------------------------------------------------------------------- seeding
SEEDED_A = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, min_p=0.02,
                          repetition_penalty=1.1, frequency_penalty=0.1, seed=1234)
SEEDED_B = SamplingParams(temperature=1.0, seed=99)
V_SEED = 1000
STEPS = 25


def step_logits(stream: torch.Generator, n: int) -> torch.Tensor:
    return torch.randn(n, V_SEED, generator=stream) * 2


def run_alone(params: SamplingParams, logit_seed: int, device: str) -> list[int]:
    stream = torch.Generator().manual_seed(logit_seed)
    gen = torch.Generator(device=device).manual_seed(params.seed)
    sampler = Sampler(torch.Generator(device=device).manual_seed(0))
    out: list[int] = []
    for _ in range(STEPS):
        logits = step_logits(stream, 1).to(device)
        meta = SamplingMetadata.build([SamplingRow(params, [1, 2, 3], list(out), gen)],
                                      V_SEED, device)
        out.append(sampler(logits, meta).sampled_token_ids.item())
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_tokens(device: str) -> None:
    a = run_alone(SEEDED_A, 0, device)
    assert a == run_alone(SEEDED_A, 0, device)
    other = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, min_p=0.02,
                           repetition_penalty=1.1, frequency_penalty=0.1, seed=4321)
    assert a != run_alone(other, 0, device)


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_row_same_alone_and_in_batch(device: str) -> None:
    alone_a = run_alone(SEEDED_A, 100, device)
    alone_b = run_alone(SEEDED_B, 200, device)
    stream_a = torch.Generator().manual_seed(100)
    stream_b = torch.Generator().manual_seed(200)
    stream_rest = torch.Generator().manual_seed(300)
    gen_a = torch.Generator(device=device).manual_seed(SEEDED_A.seed)
    gen_b = torch.Generator(device=device).manual_seed(SEEDED_B.seed)
    sampler = Sampler(torch.Generator(device=device).manual_seed(42))
    rng = random.Random(7)
    fillers = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.6, top_k=5, presence_penalty=0.5),
        SamplingParams(temperature=1.3, top_p=0.5, seed=7),
    ]
    out_a: list[int] = []
    out_b: list[int] = []
    for _ in range(STEPS):
        n_fill = rng.randint(0, 6)
        entries = [("a", None), ("b", None)] + [("f", rng.choice(fillers)) for _ in range(n_fill)]
        rng.shuffle(entries)
        logits_a = step_logits(stream_a, 1)
        logits_b = step_logits(stream_b, 1)
        rows, logit_rows = [], []
        for name, params in entries:
            if name == "a":
                rows.append(SamplingRow(SEEDED_A, [1, 2, 3], list(out_a), gen_a))
                logit_rows.append(logits_a)
            elif name == "b":
                rows.append(SamplingRow(SEEDED_B, [1, 2, 3], list(out_b), gen_b))
                logit_rows.append(logits_b)
            else:
                g = None
                if params.seed is not None:
                    g = torch.Generator(device=device).manual_seed(rng.randint(0, 10**6))
                rows.append(SamplingRow(params, [4, 5], [6] * rng.randint(0, 3), g))
                logit_rows.append(step_logits(stream_rest, 1))
        logits = torch.cat(logit_rows).to(device)
        tokens = sampler(logits, SamplingMetadata.build(rows, V_SEED, device))
        tokens = tokens.sampled_token_ids.tolist()
        out_a.append(tokens[[e[0] for e in entries].index("a")])
        out_b.append(tokens[[e[0] for e in entries].index("b")])
    assert out_a == alone_a
    assert out_b == alone_b


def test_seeded_row_consumes_one_draw_per_call() -> None:
    v = 64
    gen = torch.Generator().manual_seed(5)
    rows = [SamplingRow(SamplingParams(seed=5, top_p=0.5), [], [], gen)]
    rows += rows_for(SamplingParams(), 3)
    sampler = Sampler(torch.Generator().manual_seed(0))
    logits = torch.randn(4, v, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        sampler(logits, SamplingMetadata.build(rows, v, "cpu"))
    ref = torch.Generator().manual_seed(5)
    for _ in range(3):
        torch.empty(v).uniform_(generator=ref)
    assert torch.equal(gen.get_state(), ref.get_state())


def test_unseeded_rows_follow_sampler_generator() -> None:
    logits = torch.randn(32, 100, generator=torch.Generator().manual_seed(0))
    rows = rows_for(SamplingParams(temperature=1.0), 32)
    a = sample(rows, logits, seed=123).sampled_token_ids
    b = sample(rows, logits, seed=123).sampled_token_ids
    assert torch.equal(a, b)
    meta = SamplingMetadata.build(rows, 100, "cpu")
    torch.manual_seed(77)
    c = Sampler()(logits, meta).sampled_token_ids
    torch.manual_seed(77)
    d = Sampler()(logits, meta).sampled_token_ids
    assert torch.equal(c, d)


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_no_device_sync_on_gpu(device: str) -> None:
    """build + sample queue work without a GPU->CPU synchronization."""
    v = 1000
    kinds = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2,
                       frequency_penalty=0.3, presence_penalty=0.2, logit_bias={5: 1.0},
                       min_tokens=4, stop_token_ids=[2], logprobs=5),
        SamplingParams(top_k=3, seed=9),
    ]
    rows = [SamplingRow(kinds[i % 3], [1, 2], [3], torch.Generator(device=device).manual_seed(i)
                        if kinds[i % 3].seed is not None else None) for i in range(9)]
    logits = torch.randn(9, v, device=device)
    sampler = Sampler(torch.Generator(device=device).manual_seed(0))
    sampler(logits, SamplingMetadata.build(rows, v, device))  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sampler(logits, SamplingMetadata.build(rows, v, device))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.sampled_token_ids.shape == (9,)
