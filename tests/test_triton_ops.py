"""The fused Triton kernels of triton_ops equal the PyTorch code they replace in model.py.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 is set before
triton is imported, here and in conftest.py). With CUDA they run compiled on the GPU, and the tests at the
end (the whole model's forward against the CPU reference, CUDA-graph replay) run too.

Tolerances: the residual add, RoPE and the cache write are bit-exact (each product and sum is rounded to
the model dtype where PyTorch rounds it). RMSNorm sums its squares in another order, and SiLU's exp is
another implementation (on the GPU, exp2.approx of x * log2(e): a relative error up to ~|x| * 4e-8), so
their intermediate (the normalised value, silu(gate)) can round the other way on a near-tie: one ulp
there, up to two ulps of the final product, on a small fraction of the elements in bf16/fp16.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = torch.device("cpu" if INTERPRET else "cuda")

triton = pytest.importorskip("triton")

from xverse_serve.kernels.fused_ops import fused_add_rms_norm, rms_norm, rope_and_write_kv, silu_and_mul  # noqa: E402
from xverse_serve.model import xverse as model_module  # noqa: E402
from xverse_serve.model.attention import write_kv  # noqa: E402
from xverse_serve.model.xverse import apply_rope, rms_norm_reference, rope_tables  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _round_to_bfloat16(input, input_dtype, output_dtype, rounding_mode, _original):
    """float32 -> bfloat16 rounded to nearest even, as the GPU's cvt.rn.bf16.f32 does. Triton 3.6's interpreter
    truncates there (a plain cast passes no rounding mode): bf16 results would be off by up to one ulp."""
    import triton.language as tl
    from triton._C.libtriton import ir

    if not (input_dtype == tl.float32 and output_dtype == tl.bfloat16) or rounding_mode == ir.ROUNDING_MODE.RTZ:
        return _original(input, input_dtype, output_dtype, rounding_mode)  # truncation is right for RTZ
    bits = np.ascontiguousarray(input, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(input, dtype=np.float32))
    rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)  # stays a (quiet) NaN
    return rounded.reshape(np.shape(input))


@contextlib.contextmanager
def interpreter_converts_floats_with(convert):
    """Meanwhile Triton's interpreter converts floats with `convert(*args, _original=its own)`; compiled
    kernels need nothing."""
    if not INTERPRET:
        yield
        return
    from triton.runtime import interpreter

    original = interpreter._convert_float
    interpreter._convert_float = lambda *args: convert(*args, _original=original)
    try:
        yield
    finally:
        interpreter._convert_float = original


@pytest.fixture(autouse=True, scope="module")
def interpreter_rounds_bfloat16():
    with interpreter_converts_floats_with(_round_to_bfloat16):
        yield


def ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """The float's bit pattern as an integer that grows with the value: adjacent floats differ by 1."""
    int_dtype = {4: torch.int32, 2: torch.int16}[t.element_size()]
    bits = t.contiguous().view(int_dtype).long()
    sign_bit = 1 << (8 * t.element_size() - 1)
    return torch.where(bits < 0, -(bits + sign_bit), bits)


def assert_ulps(out: torch.Tensor, ref: torch.Tensor, max_ulps: int, max_fraction_off: float = 1.0) -> None:
    """Every element within max_ulps of the reference (in out's dtype), and at most max_fraction_off of them
    different at all."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    assert torch.isfinite(out).all()
    ulps = (ordered_bits(out.cpu()) - ordered_bits(ref.cpu())).abs()
    assert ulps.max().item() <= max_ulps, f"{ulps.max().item()} ulps apart"
    off = (ulps > 0).float().mean().item()
    assert off <= max_fraction_off, f"{off:.2%} of the elements differ"


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


def assert_norm_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """float32: a few ulps (the variance's summation order); bf16/fp16: a near-tie of the normalised value
    rounded the other way, at most two ulps after the weight, on few elements."""
    if out.dtype == torch.float32:
        assert_ulps(out, ref, max_ulps=16)
    else:
        assert_ulps(out, ref, max_ulps=2, max_fraction_off=0.02)


def assert_silu_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    if out.dtype == torch.float32:  # the GPU's fast exp: ~|gate| * 4e-8 relative
        torch.testing.assert_close(out, ref, rtol=2e-5, atol=1e-30)
    else:
        assert_ulps(out, ref, max_ulps=2, max_fraction_off=0.02)


# ---------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("tokens", "hidden"), [(1, 64), (7, 96), (33, 4096)])
def test_rms_norm_matches_reference(dtype: torch.dtype, tokens: int, hidden: int) -> None:
    x = randn(tokens, hidden, dtype=dtype, seed=tokens, scale=3.0)
    weight = (1 + randn(hidden, dtype=torch.float32, seed=1, scale=0.1)).to(dtype)
    out = rms_norm(x, weight, 1e-6)
    assert_norm_close(out, rms_norm_reference(x, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_add_rms_norm_matches_reference(dtype: torch.dtype) -> None:
    tokens, hidden = 13, 320
    x = randn(tokens, hidden, dtype=dtype, seed=2)
    residual = randn(tokens, hidden, dtype=dtype, seed=3, scale=10.0)
    weight = (1 + randn(hidden, dtype=torch.float32, seed=4, scale=0.1)).to(dtype)
    x_before, residual_before = x.clone(), residual.clone()
    normed, new_residual = fused_add_rms_norm(x, residual, weight, 1e-5)
    expected_residual = residual + x
    assert torch.equal(new_residual, expected_residual)  # the add is rounded exactly as PyTorch rounds it
    assert_norm_close(normed, rms_norm_reference(expected_residual, weight, 1e-5))
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)  # inputs untouched


def test_fused_add_rms_norm_without_residual_is_rms_norm() -> None:
    x = randn(5, 64, dtype=torch.bfloat16, seed=5)
    weight = randn(64, dtype=torch.bfloat16, seed=6)
    normed, residual = fused_add_rms_norm(x, None, weight, 1e-6)
    assert residual is x
    assert torch.equal(normed, rms_norm(x, weight, 1e-6))


def test_rms_norm_strided_rows_leading_dims_and_promotion() -> None:
    """Rows of a wider tensor; [2, 3, hidden] input; a float32 weight on bf16 activations gives float32
    (PyTorch's promotion in weight * normed)."""
    hidden = 128
    wide = randn(6, 2 * hidden, dtype=torch.bfloat16, seed=7)
    x = wide[:, :hidden]
    residual = randn(6, hidden, dtype=torch.bfloat16, seed=8)
    weight = 1 + randn(hidden, dtype=torch.float32, seed=9, scale=0.1)
    normed, new_residual = fused_add_rms_norm(x, residual, weight, 1e-6)
    assert normed.dtype == torch.float32
    assert torch.equal(new_residual, residual + x)
    torch.testing.assert_close(normed, rms_norm_reference(residual + x, weight, 1e-6), rtol=8e-3, atol=0)
    x3 = randn(2, 3, hidden, dtype=torch.float32, seed=10)
    assert_norm_close(rms_norm(x3, weight, 1e-6), rms_norm_reference(x3, weight, 1e-6))


# ---------------------------------------------------------------- RoPE + KV-cache write


class RopeCase:
    """A step of `tokens` tokens at random (unsorted) positions, written to shuffled slots of a cache whose
    every slot starts out holding random values."""

    def __init__(self, tokens: int, heads: int, head_dim: int, block_size: int, dtype: torch.dtype, seed: int,
                 index_dtype: torch.dtype = torch.int64, max_positions: int = 300) -> None:
        gen = torch.Generator().manual_seed(seed)
        num_blocks = -(-tokens // block_size) + 3
        shape = (num_blocks + 1, block_size, heads, head_dim)
        self.k_cache = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
        self.v_cache = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
        slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
        self.slot_mapping = slots.to(index_dtype).to(DEVICE)
        self.positions = torch.randint(0, max_positions, (tokens,), generator=gen).to(index_dtype).to(DEVICE)
        cos, sin = rope_tables(head_dim, max_positions, 10000.0, torch.device("cpu"))
        self.cos, self.sin = cos.to(dtype).to(DEVICE), sin.to(dtype).to(DEVICE)
        self.qkv = (torch.randn(tokens, 3 * heads * head_dim, generator=gen) * 2).to(dtype).to(DEVICE)
        self.heads, self.head_dim = heads, head_dim

    def expect(self) -> None:
        """Records the caches as they are now and what the PyTorch path (model.Attention's: apply_rope,
        then write_kv) makes of this step from them: q and the caches after."""
        self.before = (self.k_cache.clone(), self.v_cache.clone())
        k_cache, v_cache = self.k_cache.clone(), self.v_cache.clone()
        q, k, v = self.qkv.view(-1, 3, self.heads, self.head_dim).unbind(dim=1)
        cos, sin = self.cos[self.positions.long()], self.sin[self.positions.long()]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        write_kv(k_cache, v_cache, k, v, self.slot_mapping.long())
        self.expected = (q, k_cache, v_cache)

    def run(self, qkv: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        return rope_and_write_kv(self.qkv if qkv is None else qkv, self.cos, self.sin, self.positions,
                                 self.k_cache, self.v_cache, self.slot_mapping, **kwargs)

    def check(self, q: torch.Tensor) -> None:
        """Bit-exact q and caches; the slots the step did not write still hold what they held."""
        q_ref, k_ref, v_ref = self.expected
        assert q.shape == q_ref.shape and q.dtype == q_ref.dtype
        assert torch.equal(q, q_ref), f"q differs by up to {(q.float() - q_ref.float()).abs().max().item()}"
        assert torch.equal(self.k_cache, k_ref) and torch.equal(self.v_cache, v_ref)
        untouched = torch.ones(self.k_cache.shape[0] * self.k_cache.shape[1], dtype=torch.bool, device=DEVICE)
        untouched[self.slot_mapping.long()] = False
        assert untouched.sum().item() == untouched.numel() - q.shape[0]
        for after, before in zip((self.k_cache, self.v_cache), self.before):
            assert torch.equal(after.flatten(0, 1)[untouched], before.flatten(0, 1)[untouched])


def run_and_check(case: RopeCase, **kwargs) -> None:
    case.expect()
    case.check(case.run(**kwargs))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("tokens", "heads", "head_dim", "block_size"), [
    (1, 4, 16, 4),  # a single decode token
    (13, 4, 128, 16),  # XVERSE's head_dim, an odd token count
    (37, 3, 32, 8),  # an odd number of heads
    (9, 2, 24, 4),  # half a head (12) is not a power of two: masked lanes
])
def test_rope_and_write_kv_matches_reference(dtype: torch.dtype, tokens: int, heads: int, head_dim: int,
                                             block_size: int) -> None:
    run_and_check(RopeCase(tokens, heads, head_dim, block_size, dtype, seed=tokens * heads))


@pytest.mark.parametrize(("heads_per_program", "num_warps"), [(1, 1), (2, 2), (4, 4), (8, 1)])
def test_rope_heads_per_program(heads_per_program: int, num_warps: int) -> None:
    """Groups of heads per program, including a last group that is partly past the heads (3 heads in 2s/4s/8s)."""
    run_and_check(RopeCase(11, 3, 32, 4, torch.bfloat16, seed=heads_per_program),
                  heads_per_program=heads_per_program, num_warps=num_warps)


def test_rope_int32_indices_strided_qkv_and_out() -> None:
    """int32 positions and slots, qkv as rows of a wider buffer, q written into a given `out`."""
    case = RopeCase(7, 4, 32, 8, torch.bfloat16, seed=12, index_dtype=torch.int32)
    wide = torch.zeros(7, case.qkv.shape[1] + 64, dtype=case.qkv.dtype, device=DEVICE)
    wide[:, :case.qkv.shape[1]] = case.qkv
    qkv = wide[:, :case.qkv.shape[1]]
    assert not qkv.is_contiguous()
    out = torch.full((7, 4, 32), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    case.expect()
    assert case.run(qkv=qkv, out=out) is out
    case.check(out)


def test_rope_no_tokens() -> None:
    case = RopeCase(0, 2, 16, 4, torch.float32, seed=13)
    before = case.k_cache.clone()
    assert case.run().shape == (0, 2, 16)
    assert torch.equal(case.k_cache, before)


def test_rope_rejects_bad_inputs() -> None:
    case = RopeCase(3, 2, 16, 4, torch.bfloat16, seed=14)
    with pytest.raises(ValueError):
        case.run(qkv=case.qkv[:, :-16])
    with pytest.raises(TypeError):  # the tables must be in qkv's dtype, where the reference rounds
        rope_and_write_kv(case.qkv, case.cos.float(), case.sin.float(), case.positions, case.k_cache,
                          case.v_cache, case.slot_mapping)
    with pytest.raises(ValueError):
        rope_and_write_kv(case.qkv, case.cos, case.sin, case.positions[:2], case.k_cache, case.v_cache,
                          case.slot_mapping)
    with pytest.raises(ValueError):
        case.run(heads_per_program=3)


# ---------------------------------------------------------------- An 8-bit cache read back for prefills


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.float8_e4m3fn], ids=str)
@pytest.mark.parametrize(("heads", "head_dim"), [(4, 128), (3, 32), (64, 64)])  # 3: a masked head; 64: two programs
def test_gather_dequantize_is_dequantize_kv_of_the_gathered_slots(dtype: torch.dtype, cache_dtype: torch.dtype,
                                                                  heads: int, head_dim: int) -> None:
    from xverse_serve.kernels.fused_ops import gather_dequantize
    from xverse_serve.model.attention import dequantize_kv, gather, quantize_kv

    blocks, block_size = 6, 4
    x = randn(blocks * block_size, heads, head_dim, dtype=torch.float32, seed=heads, scale=3.0)
    values, scales = quantize_kv(x, cache_dtype)
    cache = values.view(blocks, block_size, heads, head_dim)
    scales = scales.view(blocks, block_size, heads)
    slots = torch.randperm(blocks * block_size, generator=torch.Generator().manual_seed(1))[:17].to(DEVICE)
    expected = dequantize_kv(gather(values, slots), scales.view(-1, heads)[slots], dtype)
    out = gather_dequantize(cache, scales, slots, dtype)
    assert out.dtype == dtype and torch.equal(out, expected)
    assert gather_dequantize(cache, scales, slots[:0], dtype).shape == (0, heads, head_dim)


# ---------------------------------------------------------------- SiLU * up


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("tokens", "inter"), [(1, 160), (5, 1000), (17, 2048 + 96)])
def test_silu_and_mul_matches_reference(dtype: torch.dtype, tokens: int, inter: int) -> None:
    gate_up = randn(tokens, 2 * inter, dtype=dtype, seed=tokens + inter, scale=4.0)
    gate, up = gate_up.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    assert_silu_close(silu_and_mul(gate_up), ref)


def test_silu_and_mul_leading_dims_and_extremes() -> None:
    gate_up = randn(2, 3, 64, dtype=torch.float32, seed=15, scale=30.0)  # exp overflows for large -gate
    gate_up[0, 0, :4] = torch.tensor([-1000.0, 1000.0, 0.0, -0.0])
    gate, up = gate_up.chunk(2, dim=-1)
    out = silu_and_mul(gate_up)
    assert out.shape == (2, 3, 32)
    assert_silu_close(out, F.silu(gate) * up)
    assert silu_and_mul(gate_up[:0]).shape == (0, 3, 32)


# ---------------------------------------------------------------- On a GPU: the model, CUDA graphs


def tiny_model_pair(model_dir, dtype: torch.dtype):
    from xverse_serve.model.checkpoint import load_config
    from xverse_serve.model.xverse import load_model

    config = load_config(model_dir)
    cpu = load_model(model_dir, config, torch.device("cpu"), dtype, 256)
    cuda = load_model(model_dir, config, torch.device("cuda"), dtype, 256)
    return config, cpu, cuda


def paged_steps(model, config, device: torch.device, dtype: torch.dtype) -> tuple[list[torch.Tensor], list]:
    """A 29-token prefill over a shuffled block table, then a step with one decode and a second sequence's
    prefill, then 5 decode steps of both; the hidden states of every step and the caches at the end."""
    from xverse_serve.model.attention import AttentionBatch

    block_size, num_blocks = 4, 40
    shape = (num_blocks + 1, block_size, config.num_heads, config.head_dim)
    caches = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
              for _ in range(config.num_layers)]
    tables = [[17, 3, 29, 8, 1, 22, 35, 12, 6, 30], [9, 2, 33, 14, 26, 19, 38]]
    tokens = [torch.randint(4, config.vocab_size, (40,), generator=torch.Generator().manual_seed(s)).tolist()
              for s in (0, 1)]
    done = [0, 0]

    def step(chunks: list[tuple[int, int]]) -> torch.Tensor:
        ids, positions, slots = [], [], []
        for seq, count in chunks:
            for p in range(done[seq], done[seq] + count):
                ids.append(tokens[seq][p])
                positions.append(p)
                slots.append(tables[seq][p // block_size] * block_size + p % block_size)
        lens = [done[seq] + count for seq, count in chunks]
        width = max(len(tables[seq]) for seq, _ in chunks)
        batch = AttentionBatch(
            slot_mapping=torch.tensor(slots, device=device),
            block_tables=torch.tensor([tables[seq] + [0] * (width - len(tables[seq])) for seq, _ in chunks],
                                      dtype=torch.int32, device=device),
            context_lens=torch.tensor(lens, dtype=torch.int32, device=device),
            query_lens=[count for _, count in chunks], context_lens_host=lens,
            num_decodes=sum(1 for _, count in chunks if count == 1),
        )
        with torch.inference_mode():
            hidden = model(torch.tensor(ids, device=device), torch.tensor(positions, device=device), caches, batch)
        for seq, count in chunks:
            done[seq] += count
        return hidden.float().cpu()

    hidden = [step([(0, 29)]), step([(0, 1), (1, 23)])]
    hidden += [step([(0, 1), (1, 1)]) for _ in range(5)]
    return hidden, [t.float().cpu() for kv in caches for t in kv]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA GPU (the compiled kernels)")
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=str)
def test_model_forward_with_fused_kernels_matches_the_cpu_reference(tiny_model_dir, monkeypatch,
                                                                    dtype: torch.dtype, tolerance: float) -> None:
    config, cpu, cuda = tiny_model_pair(tiny_model_dir, dtype)
    reference, reference_caches = paged_steps(cpu, config, torch.device("cpu"), dtype)
    fused, fused_caches = paged_steps(cuda, config, torch.device("cuda"), dtype)
    monkeypatch.setattr(model_module, "FUSED_KERNELS", False)
    unfused, _ = paged_steps(cuda, config, torch.device("cuda"), dtype)
    for step, (ours, ref, plain) in enumerate(zip(fused, reference, unfused)):
        assert torch.isfinite(ours).all()
        assert relative_error(ours, ref) < tolerance, (step, relative_error(ours, ref))
        assert relative_error(ours, plain) < tolerance, (step, relative_error(ours, plain))
    for ours, ref in zip(fused_caches, reference_caches):
        assert relative_error(ours, ref) < tolerance  # zeros where nothing was written, in both


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU")
def test_fused_ops_replay_in_a_cuda_graph() -> None:
    """Captured once, replayed on new inputs, positions and slots written into the captured tensors."""
    tokens, heads, head_dim, hidden, inter = 8, 4, 128, 512, 1376
    case = RopeCase(tokens, heads, head_dim, 16, torch.bfloat16, seed=20)
    x, residual = randn(tokens, hidden, dtype=torch.bfloat16, seed=21), randn(tokens, hidden, dtype=torch.bfloat16,
                                                                                 seed=22)
    weight = randn(hidden, dtype=torch.bfloat16, seed=23)
    gate_up = randn(tokens, 2 * inter, dtype=torch.bfloat16, seed=24)

    def ops():
        return (case.run(), fused_add_rms_norm(x, residual, weight, 1e-6), silu_and_mul(gate_up))

    ops()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q, (normed, new_residual), act = ops()
    other = RopeCase(tokens, heads, head_dim, 16, torch.bfloat16, seed=25)
    for name in ("qkv", "positions", "slot_mapping", "k_cache", "v_cache"):
        getattr(case, name).copy_(getattr(other, name))
    for t, seed in ((x, 26), (residual, 27), (gate_up, 28)):
        t.copy_(randn(*t.shape, dtype=t.dtype, seed=seed))
    case.expect()
    graph.replay()
    case.check(q)
    assert torch.equal(new_residual, residual + x)
    assert_norm_close(normed, rms_norm_reference(residual + x, weight, 1e-6))
    gate, up = gate_up.chunk(2, dim=-1)
    assert_silu_close(act, F.silu(gate) * up)


@pytest.mark.parametrize(("rows", "vocab"), [(1, 100534), (3, 5000), (5, 2048), (2, 7), (2, 140000)], ids=str)
def test_argmax_rows_is_torchs_argmax_first_maximum_included(rows: int, vocab: int) -> None:
    from xverse_serve.kernels.fused_ops import ARGMAX_BLOCK, argmax_rows

    gen = torch.Generator().manual_seed(rows * vocab)
    logits = torch.randn(rows, vocab, generator=gen)
    top = logits.max() + 1
    logits[0, vocab - 1] = top  # the last column
    if rows > 1:  # the same maximum in two chunks and twice in one: the first index wins
        logits[1, [vocab - 1, vocab // 2, min(vocab - 2, ARGMAX_BLOCK + 3), min(vocab - 3, ARGMAX_BLOCK + 1)]] = top
    if rows > 2:
        logits[2] = float("-inf")  # nothing finite: index 0, as torch
    if rows > 3:
        logits[3, vocab // 3] = float("nan")
    out = argmax_rows(logits.to(DEVICE))
    assert out.dtype == torch.int64
    assert out.cpu().tolist() == logits.argmax(dim=-1).tolist()


def _fp8_rows_equal(q: torch.Tensor, scale: torch.Tensor, q_ref: torch.Tensor, scale_ref: torch.Tensor) -> None:
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == scale_ref.shape
    torch.testing.assert_close(scale, scale_ref, rtol=0, atol=0)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "first-layer"])
@pytest.mark.parametrize(("tokens", "hidden"), [(1, 4096), (6, 96)], ids=str)
def test_rms_norm_with_fp8_output_is_the_norm_then_its_quantization_bit_for_bit(
        tokens: int, hidden: int, with_residual: bool, dtype: torch.dtype) -> None:
    """What an FP8 projection after the norm reads: the norm's kernel quantizes its own output (the value the
    model dtype holds) exactly as quantize_rows_fp8 would quantize it afterwards."""
    from test_kv_int8 import _to_float8

    from xverse_serve.kernels.fused_ops import quantize_rows_fp8, rms_norm_fp8

    x = randn(tokens, hidden, dtype=dtype, seed=tokens, scale=3.0)
    residual = randn(tokens, hidden, dtype=dtype, seed=hidden, scale=10.0) if with_residual else None
    weight = (1 + randn(hidden, dtype=torch.float32, seed=1, scale=0.1)).to(dtype)
    with interpreter_converts_floats_with(_to_float8):
        q, scale, new_residual = rms_norm_fp8(x, residual, weight, 1e-6)
        normed, expected_residual = fused_add_rms_norm(x, residual, weight, 1e-6)
        q_ref, scale_ref = quantize_rows_fp8(normed)
    _fp8_rows_equal(q, scale, q_ref, scale_ref)
    assert torch.equal(new_residual, expected_residual)


def test_rms_norm_with_fp8_output_refuses_a_weight_of_another_dtype() -> None:
    from xverse_serve.kernels.fused_ops import rms_norm_fp8

    x = randn(2, 64, dtype=torch.bfloat16, seed=1)
    with pytest.raises(TypeError, match="weight in x's dtype"):
        rms_norm_fp8(x, None, torch.ones(64, device=DEVICE), 1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("rows", "inter"), [(1, 11008), (5, 96)], ids=str)
def test_silu_and_mul_with_fp8_output_is_silu_and_mul_then_its_quantization_bit_for_bit(
        rows: int, inter: int, dtype: torch.dtype) -> None:
    from test_kv_int8 import _to_float8

    from xverse_serve.kernels.fused_ops import quantize_rows_fp8, silu_and_mul_fp8

    gate_up = randn(rows, 2 * inter, dtype=dtype, seed=inter, scale=2.0)
    with interpreter_converts_floats_with(_to_float8):
        q, scale = silu_and_mul_fp8(gate_up)
        q_ref, scale_ref = quantize_rows_fp8(silu_and_mul(gate_up))
    _fp8_rows_equal(q, scale, q_ref, scale_ref)
    with pytest.raises(ValueError, match="2 \\* inter"):
        silu_and_mul_fp8(gate_up[:, :-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("rows", "k"), [(1, 4096), (5, 100), (3, 11008)], ids=str)
def test_fp8_row_quantization_is_the_pytorch_reference_bit_for_bit(rows: int, k: int, dtype: torch.dtype) -> None:
    from xverse_serve.kernels.fused_ops import quantize_rows_fp8
    from xverse_serve.model.quantization import quantize_activations_fp8

    gen = torch.Generator().manual_seed(rows * k)
    x = (torch.randn(rows, k, generator=gen) * torch.logspace(-3, 2, rows)[:, None]).to(dtype)
    x[0, :3] = torch.tensor([0.0, -700.0, 1e-30])  # a value past 448 after scaling is impossible; tiny ones flush
    if rows > 1:
        x[1] = 0.0  # an all-zero row takes the floor of the scale
    x = x.to(DEVICE)
    from test_kv_int8 import _to_float8  # the interpreter's own fp8 rounding is wrong (see there)

    with interpreter_converts_floats_with(_to_float8):
        q, scale = quantize_rows_fp8(x)
    # On the CPU: PyTorch's CUDA division by a number multiplies by its reciprocal (an ulp off the scale at times);
    # the kernel divides exactly, as the CPU does.
    q_ref, scale_ref = quantize_activations_fp8(x.cpu())
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (rows, 1)
    torch.testing.assert_close(scale.cpu(), scale_ref, rtol=0, atol=0)
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))
