"""The offline API on the default model: prompts, stops, seeds, streaming, aborts, bad input."""

from __future__ import annotations

import pytest

from paged_backend import LLM, RequestOutputKind, SamplingParams

GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=256, dtype="float32", device="cpu")


def gen1(llm, prompt, **kw):
    return llm.generate(prompt, SamplingParams(**kw), use_tqdm=False)[0]


def assert_idle(llm):
    st = llm.get_stats()
    assert st["kv_blocks_used"] == 0 and st["num_running"] == 0 and st["num_waiting"] == 0


def test_prompt_forms_and_order(llm):
    tok = llm.get_tokenizer()
    ids = tok.encode("The capital of France is")
    outs = llm.generate(["Hello, my name is", {"prompt_token_ids": ids}, {"prompt": "1, 2, 3,"}],
                        SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)
    assert [o.prompt for o in outs] == ["Hello, my name is", None, "1, 2, 3,"]
    assert outs[1].prompt_token_ids == ids
    assert outs[1].outputs[0].text.startswith(" Paris")
    assert all(o.finished and len(o.outputs) == 1 for o in outs)
    assert len({o.request_id for o in outs}) == 3
    single = llm.generate("Hello, my name is", SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)
    assert single[0].outputs[0].token_ids == outs[0].outputs[0].token_ids
    assert single[0].num_cached_tokens > 0 or len(single[0].prompt_token_ids) < 16


def test_prefix_cache_reports_hits(llm):
    prompt = "A long shared system prompt that says many things. " * 4
    llm.generate(prompt + "First.", SamplingParams(max_tokens=2, **GREEDY), use_tqdm=False)
    out = gen1(llm, prompt + "Second.", max_tokens=2, **GREEDY)
    assert out.num_cached_tokens >= 16 and out.num_cached_tokens % 16 == 0


def test_per_prompt_params(llm):
    outs = llm.generate(["a", "b"], [SamplingParams(max_tokens=2, **GREEDY),
                                     SamplingParams(max_tokens=5, **GREEDY, ignore_eos=True)],
                        use_tqdm=False)
    assert len(outs[1].outputs[0].token_ids) == 5
    with pytest.raises(ValueError, match="sampling params"):
        llm.generate(["a", "b"], [SamplingParams()], use_tqdm=False)
    assert_idle(llm)


def test_max_tokens_and_ignore_eos(llm):
    conv = [{"role": "user", "content": "Say just the word hello."}]
    short = llm.chat(conv, SamplingParams(max_tokens=60, **GREEDY), use_tqdm=False)[0].outputs[0]
    assert short.finish_reason == "stop" and short.stop_reason is None  # EOS
    assert len(short.token_ids) < 60
    eos = short.token_ids[-1]
    assert eos in llm.llm_engine.eos_token_ids
    full = llm.chat(conv, SamplingParams(max_tokens=60, ignore_eos=True, **GREEDY),
                    use_tqdm=False)[0].outputs[0]
    assert len(full.token_ids) == 60 and full.finish_reason == "length"
    assert full.token_ids[:len(short.token_ids)] == short.token_ids


def test_stop_strings_and_tokens(llm):
    base = gen1(llm, "Once upon a time", max_tokens=24, ignore_eos=True, **GREEDY).outputs[0]
    tok = llm.get_tokenizer()
    pieces = [tok.decode([t]) for t in base.token_ids]
    # A stop string spanning two tokens: the end of token 5 and the start of token 6.
    i = next(i for i in range(4, 20) if len(pieces[i].strip()) >= 2 and len(pieces[i + 1].strip()) >= 2)
    prefix = "".join(pieces[:i])
    stop = pieces[i][-2:] + pieces[i + 1][:2]
    assert stop in base.text
    cut = base.text.index(stop)
    out = gen1(llm, "Once upon a time", max_tokens=24, stop=[stop, "zzzzqq"], **GREEDY).outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == base.text[:cut] and len(prefix) <= cut
    assert out.token_ids == base.token_ids[:i + 2]
    out = gen1(llm, "Once upon a time", max_tokens=24, stop=stop, include_stop_str_in_output=True,
               **GREEDY).outputs[0]
    assert out.text == base.text[:cut + len(stop)]
    # Stop token ids: the token is the last one returned, its text left out.
    stop_id = base.token_ids[3]
    out = gen1(llm, "Once upon a time", max_tokens=24, stop_token_ids=[stop_id], **GREEDY).outputs[0]
    assert out.token_ids == base.token_ids[:base.token_ids.index(stop_id) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.text == tok.decode(out.token_ids[:-1])
    # min_tokens: the stop token cannot end it early.
    first = base.token_ids[0]
    out = gen1(llm, "Once upon a time", max_tokens=24, stop_token_ids=[first], min_tokens=6,
               **GREEDY).outputs[0]
    assert len(out.token_ids) >= 6 and first not in out.token_ids[:6]
    assert_idle(llm)


def test_seeded_sampling_batch_invariant(llm):
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    alone = gen1(llm, "The weather today", **{k: getattr(sp, k) for k in
                                              ("temperature", "top_p", "seed", "max_tokens", "ignore_eos")})
    batch = llm.generate(["Other prompt here", "The weather today", "Yet another one"],
                         [SamplingParams(temperature=1.0, max_tokens=12), sp,
                          SamplingParams(temperature=0.7, seed=5, max_tokens=20)], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone.outputs[0].token_ids
    other = gen1(llm, "The weather today", temperature=1.0, top_p=0.9, seed=99, max_tokens=12,
                 ignore_eos=True)
    assert other.outputs[0].token_ids != alone.outputs[0].token_ids


def test_n_returns_n_completions(llm):
    out = gen1(llm, "My favourite colour is", n=3, temperature=1.0, seed=7, max_tokens=6)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert_idle(llm)


def test_streaming_deltas_and_abort(llm):
    eng = llm.llm_engine
    eng.add_request("s1", "Write a sentence about cats.",
                    SamplingParams(max_tokens=20, ignore_eos=True, stop=["qqqq"],
                                   output_kind=RequestOutputKind.DELTA, **GREEDY))
    eng.add_request("s2", "Another prompt that will be aborted", SamplingParams(max_tokens=200, **GREEDY))
    texts, toks = [], []
    finished = None
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.request_id == "s1":
                texts.append(out.outputs[0].text)
                toks.extend(out.outputs[0].token_ids)
                if out.finished:
                    finished = out
            if "s2" in eng._parents and eng.get_stats()["kv_blocks_used"] > 0 and len(toks) > 3:
                used = eng.get_stats()["kv_blocks_used"]
                eng.abort_request("s2")
                assert eng.get_stats()["kv_blocks_used"] < used
    assert finished is not None and len(toks) == 20 and len(texts) > 1
    ref = gen1(llm, "Write a sentence about cats.", max_tokens=20, ignore_eos=True, **GREEDY).outputs[0]
    assert "".join(texts) == ref.text and toks == ref.token_ids
    assert_idle(llm)
    st = llm.get_stats()
    for key in ("kv_blocks_total", "kv_blocks_used", "kv_blocks_peak", "prefix_cache_hit_tokens",
                "num_running", "num_waiting"):
        assert key in st


def test_bad_input_is_a_value_error_and_llm_keeps_serving(llm):
    long_prompt = {"prompt_token_ids": [5] * 300}
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate(["fine", long_prompt], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate("", SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []}, use_tqdm=False)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate({"prompt_token_ids": [10**7]}, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([3.5], use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        llm.generate("x", SamplingParams(temperature=-1))
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.generate("x", SamplingParams(stop_token_ids=[10**7]), use_tqdm=False)
    with pytest.raises(ValueError, match="max_logprobs"):
        llm.generate("x", SamplingParams(logprobs=21), use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        llm.generate("x", SamplingParams(prompt_logprobs=1000), use_tqdm=False)
    changed = SamplingParams()
    changed.top_k = -5  # changed after construction: checked again when the request is added
    with pytest.raises(ValueError, match="top_k"):
        llm.generate("x", changed, use_tqdm=False)
    assert_idle(llm)
    out = gen1(llm, "The capital of France is", max_tokens=3, **GREEDY)
    assert out.outputs[0].text.startswith(" Paris")


def test_missing_model_path():
    with pytest.raises(FileNotFoundError, match="no/such/model-dir"):
        LLM("./no/such/model-dir")


def test_bad_engine_args():
    with pytest.raises(ValueError, match="dtype"):
        LLM(dtype="float8")
    with pytest.raises(ValueError, match="device"):
        LLM(device="tpu")
    with pytest.raises(TypeError, match="not_an_arg"):
        LLM(not_an_arg=1)


def test_skip_tokenizer_init():
    llm = LLM(skip_tokenizer_init=True, max_model_len=128, num_kv_blocks=64)
    assert llm.get_tokenizer() is None
    out = llm.generate({"prompt_token_ids": [504, 3575, 282, 4649, 314]},
                       SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 3 and out.outputs[0].text == ""
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("text prompt", use_tqdm=False)
    with pytest.raises(ValueError, match="stop"):
        llm.generate({"prompt_token_ids": [504, 3575]}, SamplingParams(stop=["Paris"]), use_tqdm=False)
    assert llm.get_stats()["kv_blocks_used"] == 0


def test_chat_batch(llm):
    convs = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]]
    outs = llm.chat(convs, SamplingParams(max_tokens=16, **GREEDY), use_tqdm=False)
    assert len(outs) == 2
    assert "Paris" in outs[0].outputs[0].text
    assert "<|im_start|>assistant" in outs[0].prompt
    with pytest.raises(ValueError, match="role"):
        llm.chat([[{"content": "no role"}]], use_tqdm=False)


def test_beam_search_on_text_prompts(llm):
    from paged_backend import BeamSearchParams
    outs = llm.beam_search(["The capital of France is", {"prompt": "1, 2, 3,"}],
                           BeamSearchParams(beam_width=2, max_tokens=4))
    assert len(outs) == 2 and all(len(o.sequences) == 2 for o in outs)
    best = outs[0].sequences[0]
    assert best.text.startswith("The capital of France is") and "Paris" in best.text
    assert_idle(llm)


def test_default_step_budget(llm):
    """Without `max_num_batched_tokens`, a step holds 8192 tokens on the CPU and 16384 on CUDA."""
    import torch

    from paged_backend.engine.factory import default_max_num_batched_tokens
    assert llm.llm_engine.scheduler.max_num_batched_tokens == 8192
    assert default_max_num_batched_tokens(torch.device("cpu")) == 8192
    assert default_max_num_batched_tokens(torch.device("cuda", 0)) == 16384
