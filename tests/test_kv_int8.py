"""--kv-cache-dtype int8 / fp8: an 8-bit KV cache with a float32 scale per token and head.

What is specified here:
- quantize_kv's round trip: int8 within half a step (scale / 2) of each value, fp8 (e4m3) within half an ulp of
  its 3-bit mantissa; the cache takes 264 KB per token of XVERSE-7B instead of 512 KB (1.94x the tokens);
- the fused RoPE + cache-write kernel stores exactly the values and scales attention.write_kv stores, and the
  Triton decode kernel equals decode_attention over the same 8-bit cache (in Triton's interpreter on CPU, compiled
  on a GPU); both read the cache dequantized, so the reference is the float32 attention over dequantized vectors;
- against the unquantized cache, attention stays within 2e-2 (int8) / 1.5e-1 (fp8) of outputs of order 1, and the
  tiny model's logits within 1% (int8, measured ~0.3%) / 4% (fp8, ~1.7%); with int8 its greedy tokens on these
  prompts are the unquantized cache's.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = torch.device("cpu" if INTERPRET else "cuda")

triton = pytest.importorskip("triton")

from paged import paged_logits  # noqa: E402
from test_quantization import greedy, random_ids  # noqa: E402
from test_triton_attention import PagedBatch, _fix_interpreter_index  # noqa: E402
from test_triton_ops import (
    interpreter_converts_floats_with,  # noqa: E402
    interpreter_rounds_bfloat16,  # noqa: E402,F401  (autouse: bf16 rounding as on GPUs)
)

from xverse_serve.kernels.fused_ops import rope_and_write_kv  # noqa: E402
from xverse_serve.kernels.kv_format import KV_QMAX
from xverse_serve.kernels.paged_attention import paged_decode_attention  # noqa: E402
from xverse_serve.model.attention import (
    AttentionBatch,
    decode_attention,
    dequantize_kv,
    paged_attention,
    quantize_kv,
    write_kv,
)
from xverse_serve.model.checkpoint import ModelConfig, load_config  # noqa: E402
from xverse_serve.model.kv_cache import KVCache  # noqa: E402
from xverse_serve.model.quantization import relative_error  # noqa: E402
from xverse_serve.model.xverse import apply_rope, load_model, rope_tables  # noqa: E402

if INTERPRET:
    _fix_interpreter_index()


def _to_float8(input, input_dtype, output_dtype, rounding_mode, _original):
    """float32 -> fp8 e4m3 rounded to nearest even, with subnormals, as the GPU's cvt.rn.satfinite does and as
    torch converts. Triton 3.6's interpreter mishandles fp8 subnormals (and rounds ties up, not to even)."""
    import numpy as np
    import triton.language as tl

    if not (input_dtype == tl.float32 and output_dtype == tl.float8e4nv):
        return _original(input, input_dtype, output_dtype, rounding_mode)
    values = torch.from_numpy(np.ascontiguousarray(input, dtype=np.float32))
    return values.to(torch.float8_e4m3fn).view(torch.uint8).numpy().reshape(np.shape(input))


@pytest.fixture(autouse=True, scope="module")
def interpreter_rounds_float8(interpreter_rounds_bfloat16):  # noqa: F811 (pytest requests the fixture by name)
    with interpreter_converts_floats_with(_to_float8):
        yield

KV_DTYPES = [torch.int8, torch.float8_e4m3fn]
XVERSE_7B = ModelConfig(vocab_size=100534, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                        max_position_embeddings=8192, max_tokenizer_truncation=6144, rms_norm_eps=1e-6,
                        rope_theta=10000.0, tie_word_embeddings=False, pad_token_id=1, bos_token_id=2, eos_token_id=3)


# ---------------------------------------------------------------- quantize_kv, write_kv, capacity


@pytest.mark.parametrize("dtype", KV_DTYPES, ids=str)
def test_quantize_kv_round_trip(dtype: torch.dtype) -> None:
    x = torch.randn(9, 4, 32, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 9)[:, None, None]
    x[2, 1] = 0  # an all-zero vector
    values, scale = quantize_kv(x, dtype)
    assert values.dtype == dtype and values.shape == x.shape and scale.shape == (9, 4) and scale.dtype == torch.float32
    torch.testing.assert_close(scale[3:], x[3:].abs().amax(-1) / KV_QMAX[dtype])
    back = dequantize_kv(values, scale, torch.float32)
    assert (back[2, 1] == 0).all() and torch.isfinite(back).all()
    error = (back - x).abs()
    if dtype == torch.int8:
        assert (error <= scale[..., None] / 2 * (1 + 1e-5)).all()
    else:  # 3 mantissa bits: half an ulp is 1/16 of the value (subnormals: of the smallest normal, 2^-6 * scale)
        assert (error <= torch.maximum(x.abs() / 16, scale[..., None] * 2.0 ** -10) * (1 + 1e-5)).all()


@pytest.mark.parametrize("dtype", KV_DTYPES, ids=str)
def test_write_kv_stores_quantized_vectors_and_scales_at_their_slots(dtype: torch.dtype) -> None:
    config = ModelConfig.from_dict({"model_type": "xverse", "vocab_size": 10, "hidden_size": 32,
                                    "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2})
    cache = KVCache(config, num_blocks=6, block_size=4, dtype=dtype, device=torch.device("cpu"))
    layer = cache.layers[0]
    assert layer.k.dtype == dtype and layer.k_scale.shape == (7, 4, 2) and layer.k_scale.dtype == torch.float32
    k, v = torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    slots = torch.tensor([5, 0, 22])
    write_kv(layer.k, layer.v, k, v, slots, layer.k_scale, layer.v_scale)
    for cached, scales, x in ((layer.k, layer.k_scale, k), (layer.v, layer.v_scale, v)):
        values, scale = quantize_kv(x, dtype)
        assert torch.equal(cached.view(torch.uint8).view(-1, 2, 16)[slots], values.view(torch.uint8))
        assert torch.equal(scales.view(-1, 2)[slots], scale)
        untouched = torch.ones(28, dtype=torch.bool)
        untouched[slots] = False
        assert (cached.view(torch.uint8).view(-1, 2, 16)[untouched] == 0).all()


def test_an_8bit_cache_holds_194_percent_of_the_tokens() -> None:
    bf16 = KVCache.bytes_per_token(XVERSE_7B, torch.bfloat16)
    assert bf16 == 512 * 1024
    for dtype in KV_DTYPES:
        assert KVCache.bytes_per_token(XVERSE_7B, dtype) == 256 * 1024 + 8 * 1024  # + 2 x 32 layers x 32 heads x 4 B
    assert bf16 / KVCache.bytes_per_token(XVERSE_7B, torch.int8) == pytest.approx(1.94, abs=0.01)


# ---------------------------------------------------------------- attention over an 8-bit cache


def quantized(batch: PagedBatch, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The batch's cache in `dtype`, with scales: (k, v, k_scale, v_scale)."""
    shape = batch.k_cache.shape
    k, k_scale = quantize_kv(batch.k_cache.float().view(-1, *shape[2:]), dtype)
    v, v_scale = quantize_kv(batch.v_cache.float().view(-1, *shape[2:]), dtype)
    return k.view(shape), v.view(shape), k_scale.view(shape[:3]), v_scale.view(shape[:3])


@pytest.mark.parametrize("dtype", KV_DTYPES, ids=str)
def test_decode_attention_reads_the_cache_dequantized(dtype: torch.dtype) -> None:
    batch = PagedBatch([1, 16, 17, 50, 129], heads=4, head_dim=32, block_size=16, seed=1)
    k, v, k_scale, v_scale = quantized(batch, dtype)
    tables, lens = batch.block_tables.long().cpu(), batch.context_lens.long().cpu()
    q = batch.q.float().cpu()
    out = decode_attention(q, k.cpu(), v.cpu(), tables, lens, batch.scale, k_scale.cpu(), v_scale.cpu())
    dense = decode_attention(q, dequantize_kv(k, k_scale, torch.float32).cpu(),
                             dequantize_kv(v, v_scale, torch.float32).cpu(), tables, lens, batch.scale)
    torch.testing.assert_close(out, dense, rtol=0, atol=1e-6)
    unquantized = decode_attention(q, batch.k_cache.float().cpu(), batch.v_cache.float().cpu(), tables, lens,
                                   batch.scale)
    assert (out - unquantized).abs().max() < (2e-2 if dtype == torch.int8 else 1.5e-1)


@pytest.mark.parametrize("dtype", KV_DTYPES, ids=str)
@pytest.mark.parametrize("options", [
    {"partition_size": 32},  # many partitions, then the reduce kernel
    {"partition_size": 256},  # one partition: the single-pass path
    {"partition_size": 64, "heads_per_program": 2, "lanes": True},
    {},  # the defaults: a batch of an 8-bit cache takes lanes
    {"lanes": False},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_triton_decode_kernel_reads_an_8bit_cache_as_the_reference(dtype: torch.dtype, options: dict) -> None:
    batch = PagedBatch([1, 16, 17, 50, 65, 129], heads=4, head_dim=32, block_size=16, seed=2)
    k, v, k_scale, v_scale = quantized(batch, dtype)
    reference = decode_attention(batch.q.float(), k, v, batch.block_tables.long(), batch.context_lens.long(),
                                 batch.scale, k_scale, v_scale)
    out = paged_decode_attention(batch.q, k, v, batch.block_tables, batch.context_lens, batch.scale,
                                 k_scale=k_scale, v_scale=v_scale, **options)
    assert torch.isfinite(out).all()
    assert (out.double() - reference.double()).abs().max().item() <= 2e-5


@pytest.mark.parametrize("dtype", KV_DTYPES, ids=str)
def test_triton_decode_kernel_reads_one_sequence_of_an_8bit_cache_as_the_reference(dtype: torch.dtype) -> None:
    """One sequence: the context's last token (with its scales) apart from the tiles, as the kernel takes it."""
    for n in (1, 17, 65, 129):
        batch = PagedBatch([n], heads=4, head_dim=32, block_size=16, seed=n)
        k, v, k_scale, v_scale = quantized(batch, dtype)
        reference = decode_attention(batch.q.float(), k, v, batch.block_tables.long(), batch.context_lens.long(),
                                     batch.scale, k_scale, v_scale)
        for options in ({"partition_size": 16, "block_n": 16}, {"partition_size": 32, "block_n": 16}):
            out = paged_decode_attention(batch.q, k, v, batch.block_tables, batch.context_lens, batch.scale,
                                         k_scale=k_scale, v_scale=v_scale, **options)
            assert (out.double() - reference.double()).abs().max().item() <= 2e-5, (n, options)


def test_triton_decode_kernel_needs_the_scales_of_an_8bit_cache() -> None:
    batch = PagedBatch([5], heads=2, head_dim=16, block_size=4, seed=3)
    k, v, k_scale, v_scale = quantized(batch, torch.int8)
    args = (batch.q, k, v, batch.block_tables, batch.context_lens, batch.scale)
    with pytest.raises(ValueError, match="needs k_scale"):
        paged_decode_attention(*args)
    with pytest.raises(ValueError, match="needs v_scale"):
        paged_decode_attention(*args, k_scale=k_scale, v_scale=v_scale.half())
    with pytest.raises(ValueError, match="scales are for an 8-bit cache"):
        paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.context_lens,
                               batch.scale, k_scale=k_scale, v_scale=v_scale)


def test_prefill_attention_reads_the_cache_dequantized() -> None:
    """A chunk of 5 new tokens after 11 cached ones, as paged_attention's prefill branch computes it."""
    heads, head_dim, block_size = 2, 16, 4
    gen = torch.Generator().manual_seed(4)
    cache_shape = (8, block_size, heads, head_dim)
    k_cache, v_cache = torch.zeros(cache_shape, dtype=torch.int8), torch.zeros(cache_shape, dtype=torch.int8)
    k_scale, v_scale = torch.zeros(cache_shape[:3]), torch.zeros(cache_shape[:3])
    table = torch.tensor([[6, 1, 3, 4]])
    slots = torch.tensor([table[0, p // block_size].item() * block_size + p % block_size for p in range(16)])
    keys, values = torch.randn(16, heads, head_dim, generator=gen), torch.randn(16, heads, head_dim, generator=gen)
    write_kv(k_cache, v_cache, keys, values, slots, k_scale, v_scale)
    q = torch.randn(5, heads, head_dim, generator=gen)
    batch = AttentionBatch(slot_mapping=slots[11:], block_tables=table, context_lens=torch.tensor([16]),
                           query_lens=[5], context_lens_host=[16], num_decodes=0)
    out = paged_attention(q, k_cache, v_cache, batch, 0.25, k_scale, v_scale)
    dense_k = dequantize_kv(k_cache, k_scale, torch.float32)
    dense_v = dequantize_kv(v_cache, v_scale, torch.float32)
    torch.testing.assert_close(out, paged_attention(q, dense_k, dense_v, batch, 0.25), rtol=0, atol=1e-6)
    plain_k, plain_v = torch.zeros(cache_shape), torch.zeros(cache_shape)
    write_kv(plain_k, plain_v, keys, values, slots)
    assert (out - paged_attention(q, plain_k, plain_v, batch, 0.25)).abs().max() < 2e-2


# ---------------------------------------------------------------- the fused RoPE + cache write


@pytest.mark.parametrize("dtype", KV_DTYPES, ids=str)
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("tokens", "heads", "head_dim", "heads_per_program"), [(1, 4, 16, 1), (13, 4, 128, None),
                                                                                (9, 3, 24, 2)])
def test_fused_rope_and_write_stores_what_write_kv_stores(dtype: torch.dtype, model_dtype: torch.dtype, tokens: int,
                                                          heads: int, head_dim: int,
                                                          heads_per_program: int | None) -> None:
    gen = torch.Generator().manual_seed(tokens)
    block_size, num_blocks = 4, -(-tokens // 4) + 3
    cos, sin = rope_tables(head_dim, 300, 10000.0, torch.device("cpu"))
    cos, sin = cos.to(model_dtype).to(DEVICE), sin.to(model_dtype).to(DEVICE)
    qkv = (torch.randn(tokens, 3 * heads * head_dim, generator=gen) * 2).to(model_dtype).to(DEVICE)
    qkv[0, heads * head_dim:heads * head_dim + head_dim] = 0  # token 0's first key head is all zeros
    positions = torch.randint(0, 300, (tokens,), generator=gen).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens].to(DEVICE)
    shape = (num_blocks + 1, block_size, heads, head_dim)
    caches = [torch.zeros(shape, dtype=torch.uint8, device=DEVICE).view(dtype) for _ in range(2)]
    scales = [torch.zeros(shape[:3], device=DEVICE) for _ in range(2)]
    expected = ([c.clone() for c in caches], [s.clone() for s in scales])
    q, k, v = qkv.view(tokens, 3, heads, head_dim).unbind(dim=1)
    q_ref = apply_rope(q, cos[positions], sin[positions])
    write_kv(*expected[0], apply_rope(k, cos[positions], sin[positions]), v, slots, *expected[1])
    out = rope_and_write_kv(qkv, cos, sin, positions, *caches, slots, k_scale=scales[0], v_scale=scales[1],
                            heads_per_program=heads_per_program)
    assert torch.equal(out, q_ref)
    # In float32 the GPU may contract RoPE's multiply and add into one FMA (one rounding fewer than PyTorch's):
    # a key's largest element, and so its scale, can then differ in the last bit, and a code by one step.
    exact = not (DEVICE.type == "cuda" and model_dtype == torch.float32)
    for name, ours, ref in zip(("k", "v", "k_scale", "v_scale"), caches + scales, expected[0] + expected[1]):
        ours, ref = ours.float(), ref.float()  # exact values (an fp8 zero's sign may differ: -0 == +0)
        if exact:
            assert torch.equal(ours, ref), f"{name}: {(ours != ref).sum().item()} of {ours.numel()} differ"
        elif name.endswith("scale"):
            torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
        else:
            step = 1.0 if dtype == torch.int8 else 0.125 * ref.abs().clamp_min(2.0**-6)  # one int8 / e4m3 step
            assert ((ours - ref).abs() <= step).all(), f"{name}: codes differ by more than one step"
    assert (scales[0].view(-1, heads)[slots[0], 0] > 0).item()  # the zero vector got a positive scale


def test_fused_rope_and_write_needs_the_scales_of_an_8bit_cache() -> None:
    qkv = torch.randn(2, 3 * 2 * 16).to(DEVICE)
    cos, sin = (t.to(DEVICE) for t in rope_tables(16, 8, 10000.0, torch.device("cpu")))
    cache = torch.zeros(3, 4, 2, 16, dtype=torch.int8, device=DEVICE)
    index = torch.tensor([0, 1], device=DEVICE)
    with pytest.raises(ValueError, match="needs k_scale"):
        rope_and_write_kv(qkv, cos, sin, index, cache, cache.clone(), index)


# ---------------------------------------------------------------- the model and the engine


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.int8, 1e-2), (torch.float8_e4m3fn, 4e-2)], ids=str)
def test_model_logits_over_an_8bit_cache(tiny_model_dir: Path, dtype: torch.dtype, tolerance: float) -> None:
    config = load_config(tiny_model_dir)
    model = load_model(tiny_model_dir, config, torch.device("cpu"), torch.float32, 256)
    ids = random_ids(60, config, seed=1)
    full = paged_logits(model, ids, [60], dtype)
    chunked = paged_logits(model, ids, [40, 7, 5] + [1] * 8, dtype)  # chunks and decodes read the same cache
    assert relative_error(chunked, full) < 1e-5
    unquantized = paged_logits(model, ids, [60])
    assert relative_error(full, unquantized) < tolerance
    assert (full.argmax(-1) == unquantized.argmax(-1)).float().mean() >= 0.95


def test_engine_with_an_int8_cache_gives_the_unquantized_greedy_tokens(tiny_model_dir: Path) -> None:
    config = load_config(tiny_model_dir)
    model = load_model(tiny_model_dir, config, torch.device("cpu"), torch.float32, 256)
    prompts = [random_ids(n, config, seed=n) for n in (5, 17, 40)]
    tokens = greedy(model, prompts, kv_dtype=torch.int8)
    assert all(len(set(t)) > 3 for t in tokens)
    assert tokens == greedy(model, prompts)



def test_8bit_cache_kernels_compile_for_hopper_without_register_spills() -> None:
    from test_quantization import compiled_kernels

    reports = compiled_kernels("kv")
    assert len(reports) == 6  # decode attention (two loop forms) and the cache write, for int8 and fp8
    assert [r for r in reports if r["spilled_bytes"]] == []
    assert {r["pdl_waits"] for r in reports} == {1}  # launched early, each waiting for the kernel before (kernels.pdl)
    # Before the wait: the one-sequence form (lanes=False, its first tile preloaded) reads the tile's keys and values
    # and block table; the lanes form only the context's length; the cache write nothing.
    early = {r["kernel"]: r["loads_before_wait"] for r in reports}
    for cache in ("i8", "fp8e4nv"):
        attention = f"decode attention, {cache} cache, lanes="
        assert early[attention + "False"] > early[attention + "True"]
        assert early[f"rope + cache write, {cache} cache"] == 0
