"""The synthetic largest-prefill batch that the memory profile and the warm-up run."""

from __future__ import annotations

import pytest
import torch

from paged_backend.runner.dummy_batch import full_prefill_lens, prefill_batch


@pytest.mark.parametrize("mnbt, seqs, mml, expected", [
    (16384, 256, 2048, [2048] * 8),          # many shorter prompts fill the step
    (16384, 4, 2048, [2048] * 4),            # max_num_seqs caps the tokens
    (8192, 256, 3000, [3000, 3000, 2192]),   # the remainder in a last, shorter sequence
    (100, 256, 2048, [100]),                 # one sequence holds the whole step
    (16384, 256, 16384, [16384]),
])
def test_full_prefill_lens(mnbt, seqs, mml, expected):
    assert full_prefill_lens(mnbt, seqs, mml) == expected


@pytest.mark.parametrize("bad", [(0, 8, 64), (64, 0, 64), (64, 8, 0)])
def test_full_prefill_lens_rejects_non_positive(bad):
    with pytest.raises(ValueError, match="must be >= 1"):
        full_prefill_lens(*bad)


def test_prefill_batch_layout():
    lens, bs = [5, 3, 9], 4
    ids, pos, meta, nb = prefill_batch(lens, bs, torch.device("cpu"), write_kv=True)
    assert ids.tolist() == [0] * 17
    assert pos.tolist() == list(range(5)) + list(range(3)) + list(range(9))
    assert meta.query_start_loc.tolist() == meta.query_start_loc_cpu == [0, 5, 8, 17]
    assert meta.seq_lens.tolist() == meta.seq_lens_cpu == lens
    assert (meta.max_query_len, meta.max_seq_len, meta.num_tokens, meta.num_seqs) == (9, 9, 17, 3)
    assert nb == 3 * 3 and meta.block_tables.shape == (3, 3)
    # Every token's slot lies in its own sequence's block at its position.
    for i, (start, n) in enumerate(zip(meta.query_start_loc_cpu, lens)):
        for p in range(n):
            slot = int(meta.slot_mapping[start + p])
            assert slot // bs == int(meta.block_tables[i, p // bs]) and slot % bs == p % bs
    assert len(set(meta.slot_mapping.tolist())) == 17 and max(meta.slot_mapping.tolist()) < nb * bs

    _, _, meta, nb = prefill_batch(lens, bs, torch.device("cpu"), write_kv=False)
    assert nb == 1 and meta.slot_mapping.tolist() == [-1] * 17
    assert meta.block_tables.abs().sum() == 0
    with pytest.raises(ValueError, match="at least one token"):
        prefill_batch([4, 0], bs, torch.device("cpu"), write_kv=True)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_prefill_batch_runs_each_sequence_apart(arch, tmp_path):
    """The batch is well formed: each sequence's hidden states equal a forward of that
    sequence alone (its own blocks, positions from 0, causal within it), and with
    write_kv=False the cache is left as it was."""
    from paged_backend.models.loader import load_hf_config, load_model, resolve_model
    from tiny_models import make_tiny_checkpoint

    make_tiny_checkpoint(arch, str(tmp_path))
    src = resolve_model(str(tmp_path))
    cfg = load_hf_config(src)
    model = load_model(src, cfg, torch.float32, "cpu")
    layers, hkv, hd = model.kv_cache_shape(cfg)
    bs, lens = 4, [7, 2, 11]

    def cache(nb):
        return list(torch.zeros((layers, 2, nb, bs, hkv, hd)))

    ids, pos, meta, nb = prefill_batch(lens, bs, torch.device("cpu"), write_kv=True)
    ids = torch.randint(3, cfg.vocab_size, ids.shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        batched = model(ids, pos, cache(nb), meta)
        for i, start in enumerate(meta.query_start_loc_cpu[:-1]):
            one_ids, one_pos, one_meta, one_nb = prefill_batch([lens[i]], bs, torch.device("cpu"),
                                                               write_kv=True)
            alone = model(ids[start:start + lens[i]], one_pos, cache(one_nb), one_meta)
            torch.testing.assert_close(batched[start:start + lens[i]], alone, rtol=1e-5, atol=1e-5)
        kv = cache(1)
        _, pos, meta, _ = prefill_batch(lens, bs, torch.device("cpu"), write_kv=False)
        out = model(ids, pos, kv, meta)
    assert torch.isfinite(out).all() and all(t.abs().sum() == 0 for t in kv)


def test_warm_up_runs_the_largest_prefill_without_writing(tmp_path, monkeypatch):
    """warm_up_kernels runs its forwards, the largest prefill step included, and leaves the
    KV cache as it was."""
    from paged_backend.models.loader import load_hf_config, load_model, resolve_model
    from paged_backend.runner.model_runner import ModelRunner
    from tiny_models import make_tiny_checkpoint

    make_tiny_checkpoint("qwen3", str(tmp_path))
    src = resolve_model(str(tmp_path))
    cfg = load_hf_config(src)
    model = load_model(src, cfg, torch.float32, "cpu")
    layers, hkv, hd = model.kv_cache_shape(cfg)
    runner = ModelRunner(model, num_layers=layers, num_kv_heads=hkv, head_dim=hd, num_blocks=8,
                         block_size=16, vocab_size=cfg.vocab_size, device=torch.device("cpu"),
                         dtype=torch.float32, seed=0)
    seen, head_rows = [], []
    real_forward, real_logits = type(model).forward, model.compute_logits

    def spy(self, input_ids, positions, kv_caches, meta):
        seen.append(meta.seq_lens_cpu)
        return real_forward(self, input_ids, positions, kv_caches, meta)
    monkeypatch.setattr(type(model), "forward", spy)
    monkeypatch.setattr(model, "compute_logits",
                        lambda h, *a, **k: head_rows.append(h.shape[0]) or real_logits(h, *a, **k))
    lens = full_prefill_lens(300, 4, 128)
    runner.warm_up_kernels(128, lens, head_sizes=[4, 1, 2, 512])
    assert seen[-1] == lens == [128, 128, 44]
    assert head_rows[-4:] == [1, 2, 4, 512]  # each LM-head size, 512 past the 300 rows
    assert runner._head_sizes == [1, 2, 4, 512]
    assert runner.kv_cache.abs().sum() == 0
    head_rows.clear()
    runner.warm_up_kernels(128, head_sizes=[3])  # head sizes without the prefill step
    assert head_rows[-1] == 3 and runner._head_sizes == [3] and seen[-1] != lens


@pytest.mark.parametrize("num_tokens, max_logprobs, want_rows, want_slice", [
    (10, 5, 4, 6),   # max_num_seqs rows sampled, one slice of logprob_rows positions
    (3, 5, 4, 3),    # fewer tokens: rows repeated up to max_rows, the slice capped
    (10, 0, 4, 6),   # max_logprobs 0: logprobs of the chosen tokens only, no top-k
])
def test_largest_step_tail_runs_every_sampler_path(num_tokens, max_logprobs, want_rows, want_slice,
                                                   monkeypatch):
    """The profile's step tail samples with every filter, penalty and logprobs on, then
    computes one slice of prompt logprobs."""
    from paged_backend.runner import dummy_batch

    vocab, hidden_size = 200, 8
    head = torch.nn.Linear(hidden_size, vocab, bias=False)

    class Model(torch.nn.Module):
        def compute_logits(self, h, upcast=True):
            return head(h).float()

    metas, slices = [], []
    real_sampler, real_lp = dummy_batch.Sampler, dummy_batch.compute_logprobs_tensors

    class SpySampler(real_sampler):
        def __call__(self, logits, meta):
            metas.append((logits.shape, meta))
            return super().__call__(logits, meta)

    def spy_lp(logits, targets, k):
        slices.append((logits.shape, targets.shape, k))
        return real_lp(logits, targets, k)
    monkeypatch.setattr(dummy_batch, "Sampler", SpySampler)
    monkeypatch.setattr(dummy_batch, "compute_logprobs_tensors", spy_lp)
    with torch.no_grad():
        dummy_batch.run_largest_step_tail(Model(), torch.randn(num_tokens, hidden_size),
                                          max_rows=4, max_logprobs=max_logprobs, logprob_rows=6,
                                          max_model_len=30)
    (shape, meta), = metas
    assert shape == (want_rows, vocab) and meta.num_rows == want_rows
    assert not meta.all_greedy and meta.top_k is not None and meta.top_p is not None
    assert meta.min_p is not None and meta.repetition_penalty is not None
    assert meta.frequency_penalty is not None and meta.presence_penalty is not None
    # The penalties' token tables padded to a prompt and an output of max_model_len tokens.
    assert meta.prompt_token_ids.shape == meta.output_token_ids.shape == (want_rows, 30)
    # logprobs=0 still runs the logprobs path (the sampled token's own logprob).
    assert meta.needs_logprobs and meta.max_num_logprobs == max_logprobs
    assert slices == [((want_slice, vocab), (want_slice,), max_logprobs)]
