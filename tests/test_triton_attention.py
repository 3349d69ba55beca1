"""The Triton decode-attention kernel equals attention.decode_attention on the paged cache.

Without CUDA these run the kernels in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 is set
here, before triton is imported). With CUDA and TRITON_INTERPRET unset they run the compiled kernels
on the GPU, and the CUDA-graph test runs too.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = torch.device("cpu" if INTERPRET else "cuda")

triton = pytest.importorskip("triton")

from xverse_serve.engine.block_allocator import blocks_needed  # noqa: E402
from xverse_serve.kernels.paged_attention import paged_decode_attention  # noqa: E402
from xverse_serve.model.attention import decode_attention, gather_context  # noqa: E402


def _fix_interpreter_index() -> None:
    """Triton 3.6's interpreter turns a scalar tensor into a Python int with int(1-element array), which
    NumPy >= 2.4 rejects, so `range(start, end)` over loaded values fails there. Upstream fix:
    triton-lang/triton#9172 (issue #9171); this applies the same change, inside the interpreter's own
    patch scope so it is undone with the rest after every launch."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_xverse_fixed", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._xverse_fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if INTERPRET:
    _fix_interpreter_index()


class PagedBatch:
    """Random sequences of the given lengths scattered over a shared pool through shuffled block tables.

    Cache entries that no sequence owns hold large garbage (or NaN when `poison`, including the tail of
    each sequence's last block), so a wrong block id or an unmasked read changes the result."""

    def __init__(self, lengths: list[int], heads: int, head_dim: int, block_size: int, seed: int,
                 dtype: torch.dtype = torch.float32, table_dtype: torch.dtype = torch.int32,
                 spare_blocks: int = 5, extra_table_columns: int = 0, poison: bool = False) -> None:
        gen = torch.Generator().manual_seed(seed)
        counts = [blocks_needed(n, block_size) for n in lengths]
        num_blocks = sum(counts) + spare_blocks + 1  # block 0 is the padding entry and belongs to nobody
        shape = (num_blocks, block_size, heads, head_dim)
        fill = float("nan") if poison else 100.0
        k_cache = torch.full(shape, fill)
        v_cache = torch.full(shape, fill)
        if not poison:
            k_cache *= torch.randn(shape, generator=gen)
            v_cache *= torch.randn(shape, generator=gen)
        pool = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
        max_blocks = max(counts) + extra_table_columns
        tables = []
        for n, count in zip(lengths, counts):
            table, pool = pool[:count], pool[count:]
            if count > 1 and table == sorted(table):
                table.reverse()  # never in ascending order: a kernel assuming contiguous blocks must fail
            for position in range(n):  # the sequence's own tokens; the rest of its last block stays garbage
                block, offset = table[position // block_size], position % block_size
                k_cache[block, offset] = torch.randn(heads, head_dim, generator=gen)
                v_cache[block, offset] = torch.randn(heads, head_dim, generator=gen)
            tables.append(table + [0] * (max_blocks - count))
        self.q = torch.randn(len(lengths), heads, head_dim, generator=gen).to(dtype).to(DEVICE)
        self.k_cache = k_cache.to(dtype).to(DEVICE)
        self.v_cache = v_cache.to(dtype).to(DEVICE)
        self.block_tables = torch.tensor(tables, dtype=table_dtype, device=DEVICE)
        self.context_lens = torch.tensor(lengths, dtype=table_dtype, device=DEVICE)
        self.scale = head_dim ** -0.5

    def reference(self) -> torch.Tensor:
        """attention.decode_attention, in float32 from the cached values."""
        return decode_attention(self.q.float(), self.k_cache, self.v_cache, self.block_tables.long(),
                                self.context_lens.long(), self.scale)

    def exact_reference(self) -> torch.Tensor:
        """Float64 attention over exactly the cached tokens of each sequence (reads no padding)."""
        outs = []
        for seq, n in enumerate(self.context_lens.tolist()):
            keys = gather_context(self.k_cache, self.block_tables[seq].long(), n).double()
            values = gather_context(self.v_cache, self.block_tables[seq].long(), n).double()
            scores = torch.einsum("hd,khd->hk", self.q[seq].double(), keys) * self.scale
            outs.append(torch.einsum("hk,khd->hd", scores.softmax(-1), values))
        return torch.stack(outs)

    def run(self, **kwargs) -> torch.Tensor:
        return paged_decode_attention(self.q, self.k_cache, self.v_cache, self.block_tables, self.context_lens,
                                      self.scale, **kwargs)


def assert_close(out: torch.Tensor, ref: torch.Tensor, atol: float = 2e-5) -> None:
    assert out.shape == ref.shape
    assert torch.isfinite(out).all(), "output has NaN/inf (unwritten or masked entries read)"
    error = (out.double() - ref.double()).abs().max().item()
    assert error <= atol, f"max abs error {error:.3g} > {atol}"


# lengths: 1, exactly one block, a block plus one, several blocks, several partitions, a partition boundary
LENGTHS = [1, 16, 17, 50, 64, 65, 129, 200]


@pytest.mark.parametrize("lanes", [False, True], ids=["step", "lanes"])
@pytest.mark.parametrize(("partition_size", "heads_per_program", "block_n"), [
    (32, 1, 16),  # many partitions, one cache block per iteration
    (64, 2, 32),  # two heads per program, two cache blocks per iteration
    (64, 4, 64),  # all heads in one program, a whole partition per iteration
    (256, 1, 64),  # one partition: the single-pass path without the reduce kernel
])
def test_matches_reference(partition_size: int, heads_per_program: int, block_n: int, lanes: bool) -> None:
    batch = PagedBatch(LENGTHS, heads=4, head_dim=32, block_size=16, seed=partition_size + heads_per_program)
    out = batch.run(partition_size=partition_size, heads_per_program=heads_per_program, block_n=block_n,
                    lanes=lanes)
    assert out.dtype == batch.q.dtype
    assert_close(out, batch.reference())


@pytest.mark.parametrize(("partition_size", "block_n", "num_parts"), [
    (32, 16, None),  # two tiles a partition: the context's last token in the first or the second
    (16, 16, None),  # one tile a partition: at 17, 65 and 129 tokens the last token is alone in its partition
    (256, 64, None),  # one partition of several tiles
    (16, 16, 3),  # fewer partitions than the table needs: each a multiple of 16 tokens
])
def test_one_sequence_takes_its_last_token_apart_from_the_tiles(partition_size: int, block_n: int,
                                                                num_parts: int | None) -> None:
    """One sequence (a one-request decode step): each partition's first tile is read without the context's last
    token (on a GPU before the PDL wait, as the kernel before writes that token), which joins the softmax apart."""
    for n in LENGTHS:
        batch = PagedBatch([n], heads=4, head_dim=32, block_size=16, seed=n)
        assert_close(batch.run(partition_size=partition_size, block_n=block_n, num_parts=num_parts),
                     batch.reference())


@pytest.mark.parametrize(("block_size", "head_dim", "block_n"), [
    (4, 16, 16),  # four cache blocks per iteration
    (8, 64, 8),
    (32, 128, 16),  # a cache block spans two iterations
    (64, 16, 32),
])
def test_block_sizes_and_head_dims(block_size: int, head_dim: int, block_n: int) -> None:
    lengths = [1, block_size, block_size + 1, 3 * block_size - 1, 97]
    batch = PagedBatch(lengths, heads=2, head_dim=head_dim, block_size=block_size, seed=block_size * head_dim)
    ref = batch.reference()
    assert_close(batch.run(partition_size=32, block_n=block_n), ref)
    assert_close(batch.run(partition_size=64, block_n=block_n, lanes=True), ref)


def test_xverse_head_dim_and_default_tuning() -> None:
    """head_dim 128, block_size 16, the default partition size and tokens per iteration (a batch's and one
    sequence's), random lengths."""
    gen = torch.Generator().manual_seed(2)
    lengths = [1, 16, 511, 512, 513] + torch.randint(1, 1100, (3,), generator=gen).tolist()
    batch = PagedBatch(lengths, heads=2, head_dim=128, block_size=16, seed=2)
    ref = batch.reference()
    assert_close(batch.run(), ref)
    single = PagedBatch([777], heads=2, head_dim=128, block_size=16, seed=3)
    assert_close(single.run(), single.reference())
    assert_close(batch.run(partition_size=512), ref)
    assert_close(batch.run(lanes=True), ref)


def test_int64_tables_padding_columns_and_default_tuning() -> None:
    """int64 block tables / context lengths, tables wider than any sequence needs, default knobs."""
    batch = PagedBatch([3, 40, 130], heads=3, head_dim=32, block_size=16, seed=7,
                       table_dtype=torch.int64, extra_table_columns=9)
    assert_close(batch.run(), batch.reference())
    # three heads in groups of two: the second group is half empty
    assert_close(batch.run(partition_size=64, heads_per_program=2, block_n=16), batch.reference())


@pytest.mark.parametrize("lanes", [False, True], ids=["step", "lanes"])
@pytest.mark.parametrize("num_parts", [2, 3, 5])
def test_fewer_parts_than_the_width_needs_split_each_context_evenly(num_parts: int, lanes: bool) -> None:
    """num_parts smaller than the table width needs (a decode graph's wide tables): each context is cut into
    at most num_parts partitions of a multiple of partition_size tokens, long and short contexts alike."""
    batch = PagedBatch(LENGTHS, heads=4, head_dim=32, block_size=16, seed=num_parts, extra_table_columns=20,
                       poison=True)
    assert_close(batch.run(partition_size=16, num_parts=num_parts, block_n=16, lanes=lanes),
                 batch.exact_reference())


def test_default_parts_come_from_the_batch_shape_not_the_table_width() -> None:
    from xverse_serve.kernels.paged_attention import default_num_parts

    # One sequence on a 132-SM card: 9 parts give two programs per SM, whatever the width beyond 9 x 128 tokens.
    assert default_num_parts(1, 32, 8192, 132) == default_num_parts(1, 32, 2048, 132) == 9
    assert default_num_parts(1, 32, 512, 132) == 4  # no partition shorter than 128 tokens
    assert default_num_parts(64, 32, 8192, 132) == 1  # enough programs: one pass, no reduce kernel


def test_never_reads_past_the_context() -> None:
    """NaN in every unowned block and in the tail of each last block: none of it may reach the output."""
    batch = PagedBatch([1, 5, 16, 33, 100], heads=2, head_dim=16, block_size=16, seed=11, poison=True,
                       extra_table_columns=3)
    ref = batch.exact_reference()
    for partition_size in (16, 64, 512):
        for lanes in (False, True):
            assert_close(batch.run(partition_size=partition_size, block_n=16, lanes=lanes), ref)


def test_writes_into_out_and_takes_strided_q() -> None:
    """q as a view into a fused qkv projection; `out` preallocated, poisoned, and returned filled."""
    heads, head_dim = 4, 32
    batch = PagedBatch([9, 70, 150], heads=heads, head_dim=head_dim, block_size=8, seed=5)
    qkv = torch.randn(3, 3 * heads * head_dim, device=DEVICE)
    qkv[:, :heads * head_dim] = batch.q.flatten(1)
    q = qkv[:, :heads * head_dim].view(3, heads, head_dim)
    assert not q.is_contiguous()
    out = torch.full_like(batch.q, float("nan"))
    result = paged_decode_attention(q, batch.k_cache, batch.v_cache, batch.block_tables, batch.context_lens,
                                    batch.scale, out, partition_size=32, block_n=16)
    assert result is out
    assert_close(out, batch.reference())


def test_bfloat16() -> None:
    batch = PagedBatch([1, 31, 120], heads=2, head_dim=64, block_size=16, seed=3, dtype=torch.bfloat16)
    ref = batch.reference()  # float32 from the bf16 cache
    out = batch.run(partition_size=32, block_n=16)
    assert out.dtype == torch.bfloat16
    relative = ((out.float() - ref).norm() / ref.norm()).item()
    assert relative < 1e-2, relative  # bf16 output rounding is ~2e-3


def test_rejects_bad_shapes() -> None:
    batch = PagedBatch([5], heads=2, head_dim=16, block_size=16, seed=0)
    with pytest.raises(ValueError):
        paged_decode_attention(batch.q[:, :1], batch.k_cache, batch.v_cache, batch.block_tables,
                               batch.context_lens, batch.scale)
    with pytest.raises(ValueError):
        batch.run(partition_size=48)
    with pytest.raises(TypeError):
        paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_tables.float(),
                               batch.context_lens, batch.scale)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_follows_new_lengths() -> None:
    """Captured once, the graph gives the right answer for other context lengths and block tables."""
    first = PagedBatch([3, 100, 300], heads=4, head_dim=128, block_size=16, seed=1, dtype=torch.bfloat16,
                       extra_table_columns=4)
    q, block_tables, context_lens = first.q.clone(), first.block_tables.clone(), first.context_lens.clone()
    out = torch.empty_like(q)
    paged_decode_attention(q, first.k_cache, first.v_cache, block_tables, context_lens, first.scale, out,
                           partition_size=64)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(q, first.k_cache, first.v_cache, block_tables, context_lens, first.scale, out,
                               partition_size=64)
    graph.replay()
    ref = first.reference()
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2
    # other lengths and tables over the same pool, same shapes
    context_lens.copy_(torch.tensor([310, 1, 64], device=DEVICE, dtype=context_lens.dtype))
    block_tables.copy_(block_tables.flip(0).roll(1, dims=1))
    shifted = [t for t in block_tables.tolist()]
    fresh = torch.randn_like(q)
    q.copy_(fresh)
    out.fill_(float("nan"))
    graph.replay()
    for seq, n in enumerate(context_lens.tolist()):
        keys = gather_context(first.k_cache, torch.tensor(shifted[seq], device=DEVICE), n).float()
        values = gather_context(first.v_cache, torch.tensor(shifted[seq], device=DEVICE), n).float()
        probs = (torch.einsum("hd,khd->hk", fresh[seq].float(), keys) * first.scale).softmax(-1)
        expected = torch.einsum("hk,khd->hd", probs, values)
        assert torch.isfinite(out[seq]).all()
        assert ((out[seq].float() - expected).norm() / expected.norm()).item() < 1e-2
