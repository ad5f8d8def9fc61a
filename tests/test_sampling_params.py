"""SamplingParams: vLLM's defaults, and a ValueError naming the field for every bad value."""

from __future__ import annotations

import pytest

from paged_backend import SamplingParams


def test_defaults_match_vllm():
    sp = SamplingParams()
    assert (sp.n, sp.best_of, sp.temperature, sp.top_p, sp.top_k, sp.min_p) == (1, 1, 1.0, 1.0, 0, 0.0)
    assert (sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty) == (0.0, 0.0, 1.0)
    assert sp.seed is None and sp.stop == [] and sp.stop_token_ids == []
    assert sp.max_tokens == 16 and sp.min_tokens == 0 and sp.ignore_eos is False
    assert sp.logprobs is None and sp.prompt_logprobs is None and sp.logit_bias is None
    assert sp.skip_special_tokens is True and sp.include_stop_str_in_output is False


def test_normalization():
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(temperature=0).sampling_type_greedy
    assert SamplingParams(top_k=-1).effective_top_k == 0
    assert SamplingParams(top_k=0).effective_top_k == 0
    assert SamplingParams(logit_bias={"5": 1}).logit_bias == {5: 1.0}
    assert SamplingParams(n=3, temperature=0.5).best_of == 3


BAD = [
    ("n", dict(n=0)), ("n", dict(n=1.5)), ("best_of", dict(n=3, best_of=2, temperature=1.0)),
    ("temperature", dict(temperature=-0.1)), ("temperature", dict(temperature=float("nan"))),
    ("temperature", dict(temperature="hot")),
    ("top_p", dict(top_p=0.0)), ("top_p", dict(top_p=1.5)),
    ("top_k", dict(top_k=-2)), ("top_k", dict(top_k=2.5)),
    ("min_p", dict(min_p=-0.1)), ("min_p", dict(min_p=1.1)),
    ("presence_penalty", dict(presence_penalty=3.0)),
    ("frequency_penalty", dict(frequency_penalty=-2.5)),
    ("repetition_penalty", dict(repetition_penalty=0.0)),
    ("seed", dict(seed=1.5)), ("seed", dict(seed="x")),
    ("stop", dict(stop=[""])), ("stop", dict(stop=[1])), ("stop", dict(stop=5)),
    ("stop_token_ids", dict(stop_token_ids=5)),
    ("stop_token_ids", dict(stop_token_ids=[-1])), ("stop_token_ids", dict(stop_token_ids=["a"])),
    ("ignore_eos", dict(ignore_eos="yes")),
    ("max_tokens", dict(max_tokens=0)), ("max_tokens", dict(max_tokens=2.0)),
    ("min_tokens", dict(min_tokens=-1)), ("min_tokens", dict(min_tokens=5, max_tokens=4)),
    ("logprobs", dict(logprobs=-1)), ("prompt_logprobs", dict(prompt_logprobs=-1)),
    ("skip_special_tokens", dict(skip_special_tokens=None)),
    ("include_stop_str_in_output", dict(include_stop_str_in_output=1)),
    ("logit_bias", dict(logit_bias=[1, 2])), ("logit_bias", dict(logit_bias={-1: 1.0})),
    ("logit_bias", dict(logit_bias={1: float("inf")})), ("logit_bias", dict(logit_bias={1: "a"})),
    ("n", dict(n=2, temperature=0.0)),
]


@pytest.mark.parametrize("field,kwargs", BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_bad_field_raises_naming_it(field, kwargs):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_vocab_check():
    SamplingParams(stop_token_ids=[3]).verify_vocab(10)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[10]).verify_vocab(10)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={12: 1.0}).verify_vocab(10)
