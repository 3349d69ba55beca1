"""kernels.split_gemm (int8 and fp8 weights, 1-64 rows, split along K and summed by the last program of each
tile) against float32 products of the dequantized weights: in Triton's interpreter on the CPU, compiled on a GPU."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import record_pdl_launches
from test_triton_ops import interpreter_rounds_bfloat16  # noqa: E402,F401  (autouse: bf16 rounding as on GPUs)

from xverse_serve.model import quantization

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cpu" if INTERPRET else "cuda")
split_gemm = pytest.importorskip("xverse_serve.kernels.split_gemm")

FORMATS = {"int8": (quantization.quantize_int8, quantization.dequantize_int8),
           "fp8": (quantization.quantize_fp8, quantization.dequantize_fp8)}


def scaled_weight(fmt: str, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    quantize, dequantize = FORMATS[fmt]
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02
    q, scale = quantize(w)
    return q.to(DEVICE), scale.to(DEVICE), dequantize(q, scale).to(DEVICE)


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.float() - reference).norm() / reference.norm()).item()


# The interpreter has no bfloat16 dot (it reads the bits wrongly); float16 is exact for int8 and e4m3 alike.
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize(("n", "k", "rows", "config"), [
    (64, 512, 5, (32, 64, 4, 2, 4)),  # four slices of two steps
    (37, 100, 1, (32, 32, 4, 2, 3)),  # outputs and K in partial blocks; the last slice runs past K
    (130, 256, 17, (64, 64, 4, 2, 1)),  # no split: the tile is stored directly
    (96, 384, 64, (32, 64, 4, 2, 2)),
    (70, 416, 33, (64, 128, 4, 2)),  # the split chosen for the card
], ids=str)
def test_split_matmul_equals_the_product_of_the_dequantized_weight(fmt: str, n: int, k: int, rows: int,
                                                                    config: tuple) -> None:
    q, scale, w = scaled_weight(fmt, n, k, seed=n * k)
    for dtype in DTYPES:
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(dtype).to(DEVICE)
        out = split_gemm.split_matmul(x, q, scale, config)
        assert out.shape == (rows, n) and out.dtype == dtype
        # float32 accumulation in another order (tf32 dots on a GPU); fp16/bf16 add one rounding of the result
        tolerance = (1e-5 if INTERPRET else 2e-3) if dtype == torch.float32 else 8e-3
        assert relative_error(out, x.float() @ w.T) < tolerance, dtype


def test_the_last_program_sums_the_slices_in_order_and_resets_its_ticket() -> None:
    """Two calls give the same bits (the partial sums are added in split order, not in the order the programs
    finished), and every tile's ticket is back at zero for the next call (and the next CUDA graph replay)."""
    q, scale, _ = scaled_weight("int8", 96, 512, seed=3)
    x = torch.randn(8, 512, generator=torch.Generator().manual_seed(4)).to(torch.float16).to(DEVICE)
    config = (32, 64, 4, 2, 4)
    first = split_gemm.split_matmul(x, q, scale, config)
    assert torch.equal(first, split_gemm.split_matmul(x, q, scale, config))
    _, tickets = split_gemm._WORKSPACES[(x.device, 96, 32, 4)]
    assert tickets.shape == (3,) and torch.count_nonzero(tickets) == 0
    # the four slices' partial sums, added in order, are what was stored
    w = q.float() * scale[:, None]
    parts = [x.float()[:, s * 128:(s + 1) * 128] @ w[:, s * 128:(s + 1) * 128].T for s in range(4)]
    assert relative_error(first, sum(parts)) < 8e-3


def test_default_split_fills_the_card_but_keeps_two_steps_per_slice() -> None:
    device = torch.device("cpu")  # counts as 132 SMs
    assert split_gemm.default_split(4096, 4096, 64, 128, device) == 8  # 64 tiles -> 512 programs
    assert split_gemm.default_split(22016, 4096, 64, 128, device) == 2  # 344 tiles -> 688
    assert split_gemm.default_split(100534, 4096, 64, 128, device) == 1
    assert split_gemm.default_split(4096, 512, 64, 128, device) == 2  # 4 steps: two slices of two
    # the fp8-activation kernel's: half as many programs (XVERSE-7B's qkv, o, gate_up and down projections)
    half = split_gemm.SCALED_ROWS_PROGRAMS_PER_SM
    assert [split_gemm.default_split(n, k, 64, 128, device, half)
            for n, k in ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008))] == [2, 4, 1, 4]


def test_split_matmul_refuses_what_it_cannot_multiply() -> None:
    q, scale, _ = scaled_weight("int8", 16, 64, seed=1)
    with pytest.raises(ValueError, match="1 to 64 rows"):
        split_gemm.split_matmul(torch.randn(65, 64).to(DEVICE), q, scale)
    with pytest.raises(ValueError, match="int8 or fp8"):
        split_gemm.split_matmul(torch.randn(2, 64).to(DEVICE), q.float(), scale)
    with pytest.raises(ValueError, match="float32 scale"):
        split_gemm.split_matmul(torch.randn(2, 64).to(DEVICE), q, scale[:8])


FP8_DOTS = not INTERPRET and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.parametrize(("n", "k", "rows", "config", "tma"), [
    (64, 512, 5, (32, 64, 4, 2, 4), False),  # four slices of two steps
    (37, 100, 1, (32, 32, 4, 2, 3), False),  # outputs and K in partial blocks; the last slice runs past K
    (130, 256, 17, (64, 64, 4, 2, 1), False),  # no split: the tile is stored directly
    (96, 384, 64, (32, 64, 4, 2, 2), False),
    (70, 416, 33, (64, 128, 4, 2), False),  # the split chosen for the card
    (96, 384, 64, (32, 64, 4, 2, 2), True),  # by TMA copies: rows past M, outputs past N and K past K read as 0
    (37, 112, 5, (32, 32, 4, 2, 3), True),
], ids=str)
def test_scaled_rows_matmul_applies_both_scales_to_the_sums_of_the_e4m3_products(n: int, k: int, rows: int,
                                                                                 config: tuple, tma: bool) -> None:
    """On a GPU with FP8 dots: e4m3 operands. In the interpreter (which mis-decodes e4m3 in dots, test_imma_gemm.py)
    the same values in float16, where every e4m3 value is exact: the tiling, split and scales are what is tested."""
    if tma and not (FP8_DOTS and torch.cuda.get_device_capability() >= (9, 0)):
        pytest.skip("TMA copies: compute capability 9.0+")
    if not INTERPRET and not FP8_DOTS:
        pytest.skip("FP8 tensor cores: compute capability 8.9+")
    q, scale, w = scaled_weight("fp8", n, k, seed=n + k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    x[:, 3] *= 30  # an outlier channel sets its rows' scales
    xq, x_scale = quantization.quantize_activations_fp8(x)
    operand = torch.float16 if INTERPRET else xq.dtype
    out = split_gemm.scaled_rows_matmul(xq.to(operand).to(DEVICE), x_scale.to(DEVICE), q.to(operand), scale,
                                        torch.bfloat16 if not INTERPRET else torch.float32, config, tma)
    assert out.shape == (rows, n)
    # the exact product of what the kernel was given; the float32 sums add only their own rounding (and bf16's)
    reference = (xq.float() * x_scale).to(DEVICE) @ w.T
    assert relative_error(out, reference) < (1e-5 if INTERPRET else 5e-3)
    # against x itself, the e4m3 rounding of the activations shows: the tuner's bound for such kernels
    assert relative_error(out, x.to(DEVICE) @ w.T) < 0.06


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="programmatic dependent launch: compute capability 9.0+")
def test_split_kernels_launched_early_read_nothing_before_the_kernel_before_them_ends(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Split kernels in a chain, each reading the output of the one before and all sharing one workspace of partial
    sums and tickets, replayed from a CUDA graph: the same bits launched early (kernels.pdl) as not. A kernel that
    read its x, or wrote the workspace, before the kernel before it had finished would show here."""
    from xverse_serve.kernels import pdl

    n = k = 4096
    int8 = [scaled_weight("int8", n, k, seed)[:2] for seed in (1, 2)]
    int4 = [t.to(DEVICE) for t in quantization.quantize_int4(
        torch.randn(n, k, generator=torch.Generator().manual_seed(3)) * 0.02)]
    x = torch.randn(64, k, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16).to(DEVICE)

    def chain() -> torch.Tensor:
        y = split_gemm.split_matmul(x, *int8[0], (64, 128, 4, 3, 4))
        y = split_gemm.split_matmul(y, *int8[1], (64, 128, 4, 3, 4))
        return split_gemm.split_matmul_int4(y, *int4, quantization.INT4_GROUP, (64, 8, 3, 4))  # the same workspace

    launched = record_pdl_launches(monkeypatch)
    outputs: dict[bool, list[torch.Tensor]] = {}
    for on in (False, True):
        monkeypatch.setattr(pdl, "ENABLED", on)
        chain()  # compiled before the capture
        launched.clear()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain()
        assert launched == [on] * 3
        outputs[on] = []
        for _ in range(10):
            graph.replay()
            outputs[on].append(out.clone())
    first = outputs[False][0]
    assert first.abs().max() > 0 and all(torch.equal(o, first) for o in outputs[False] + outputs[True])


def test_scaled_rows_matmul_refuses_operands_of_two_dtypes_or_too_many_rows() -> None:
    q, scale, _ = scaled_weight("fp8", 16, 64, seed=1)
    x_scale = torch.ones(2, device=DEVICE)
    with pytest.raises(ValueError, match="of one dtype"):
        split_gemm.scaled_rows_matmul(torch.randn(2, 64).to(DEVICE), x_scale, q, scale, torch.float32)
    with pytest.raises(ValueError, match="1 to 64 rows"):
        split_gemm.scaled_rows_matmul(torch.zeros(65, 64, dtype=q.dtype, device=DEVICE), x_scale, q, scale,
                                      torch.float32)
    q, scale, _ = scaled_weight("fp8", 16, 72, seed=1)
    with pytest.raises(ValueError, match="16-byte boundaries; K is 72"):
        split_gemm.scaled_rows_matmul(torch.zeros(2, 72, dtype=q.dtype, device=DEVICE), x_scale, q, scale,
                                      torch.float32, tma=True)


@pytest.mark.parametrize(("n", "groups", "rows", "config"), [
    (64, 4, 5, (32, 4, 2, 2)),  # two slices of two groups
    (37, 3, 1, (32, 4, 2, 2)),  # outputs in a partial block; the last slice has no group
    (70, 3, 33, (64, 4, 2, 1)),  # no split
    (96, 5, 64, (32, 4, 2)),  # the split chosen for the card
], ids=str)
def test_split_matmul_int4_applies_each_groups_scale_and_offset(n: int, groups: int, rows: int,
                                                                config: tuple) -> None:
    group = quantization.INT4_GROUP
    w = torch.randn(n, groups * group, generator=torch.Generator().manual_seed(n)) * 0.02
    w[:, :group] += 0.05  # a group far from zero: its offset matters
    packed, scale, offset = quantization.quantize_int4(w, group)
    dense = quantization.dequantize_int4(packed, scale, offset).to(DEVICE)
    packed, scale, offset = packed.to(DEVICE), scale.to(DEVICE), offset.to(DEVICE)
    for dtype in DTYPES:
        x = torch.randn(rows, groups * group, generator=torch.Generator().manual_seed(rows)).to(dtype).to(DEVICE)
        out = split_gemm.split_matmul_int4(x, packed, scale, offset, group, config)
        assert out.shape == (rows, n) and out.dtype == dtype
        tolerance = (1e-5 if INTERPRET else 2e-3) if dtype == torch.float32 else 8e-3
        assert relative_error(out, x.float() @ dense.T) < tolerance, dtype


def test_split_matmul_int4_refuses_a_layout_it_does_not_know() -> None:
    packed, scale, offset = quantization.quantize_int4(torch.randn(8, 256), 128)
    x = torch.randn(2, 256)
    with pytest.raises(ValueError, match="packed uint8"):
        split_gemm.split_matmul_int4(x.to(DEVICE), packed.to(DEVICE), scale.to(DEVICE), offset[:, :1].to(DEVICE), 128)
