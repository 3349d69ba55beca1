"""kernels.mixed_gemm (int8, fp8 and int4 weights dequantized in registers as the first operand of the tensor-core dot)
against float32 products of the dequantized weights: in Triton's interpreter on the CPU, compiled on a GPU; and the
tuner offering it."""

from __future__ import annotations

import os

import pytest
import torch

from xverse_serve.model import quantization

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cpu" if INTERPRET else "cuda")
mixed_gemm = pytest.importorskip("xverse_serve.kernels.mixed_gemm")

# The interpreter has no bfloat16 dot (it reads the bits wrongly); float32 is exact there.
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])
# The product of the dequantized weight summed in float32: the result's own rounding (float16 ~3e-4, bfloat16
# ~2e-3), and on a GPU tf32's for float32 inputs.
TOLERANCE = {torch.float32: 1e-6 if INTERPRET else 2e-3, torch.float16: 1e-3, torch.bfloat16: 5e-3}


@pytest.fixture(scope="module", autouse=True)
def interpreter_fix():
    if INTERPRET:
        from test_triton_attention import _fix_interpreter_index

        _fix_interpreter_index()


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.float() - reference).norm() / reference.norm()).item()


def activations(rows: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))
    x[:, 7] *= 40  # an outlier channel
    return x.to(dtype).to(DEVICE)


def weights(scheme: str, n: int, k: int, seed: int) -> tuple[tuple, torch.Tensor]:
    """The kernel's operands (weight, scale, offset, group) and the dequantized weight, float32."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02
    if scheme in ("int8", "fp8"):
        q, scale = (quantization.quantize_int8 if scheme == "int8" else quantization.quantize_fp8)(w)
        return (q.to(DEVICE), scale.to(DEVICE), None, 0), quantization.dequantize_rows(q, scale).to(DEVICE)
    group = quantization.INT4_GROUP
    w[:, :group] += 0.05  # a group far from zero: its offset matters
    packed, scale, offset = quantization.quantize_int4(w, group)
    dense = quantization.dequantize_int4(packed, scale, offset)
    return (packed.to(DEVICE), scale.to(DEVICE), offset.to(DEVICE), group), dense.to(DEVICE)


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
@pytest.mark.parametrize(("rows", "n", "config", "split_k"), [
    (1, 70, (16, 64, 64, 4, 1), 1),     # N not a multiple of the weight tile, one row
    (19, 128, (16, 64, 128, 4, 1), 2),  # rows over two token tiles, K split in two
    (37, 96, (32, 32, 64, 4, 1), 3),    # a split that does not divide the steps evenly
    (5, 130, (16, 64, 64, 4, 1), 4),    # one token tile: the slices add up inside the kernel (tickets)
])
def test_mixed_gemm_equals_the_product_of_the_dequantized_weight(scheme: str, rows: int, n: int, config: tuple,
                                                                 split_k: int) -> None:
    k = 3 * quantization.INT4_GROUP
    operands, dense = weights(scheme, n, k, seed=rows)
    for dtype in DTYPES:
        x = activations(rows, k, dtype, seed=n)
        y = mixed_gemm.matmul(x, *operands, config=config, split_k=split_k)
        assert y.shape == (rows, n) and y.dtype == dtype
        # again: the same sums (in slice order), and the tickets were reset for it
        assert torch.equal(mixed_gemm.matmul(x, *operands, config=config, split_k=split_k), y)
        # int4's weights enter the dot rounded to x's dtype, as quant_matmul.dequantize rounds them; int8's and
        # fp8's values are exact in it
        w = dense if scheme != "int4" or dtype == torch.float32 else dense.to(dtype).float()
        error = relative_error(y, x.float() @ w.T)
        assert error < TOLERANCE[dtype], (dtype, error)


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
@pytest.mark.parametrize(("rows", "n", "config"), [
    (70, 200, (64, 64, 64, 4, 2)),  # rows and N past whole tiles: the TMA copies read zeros there
    (3, 64, (16, 64, 128, 4, 1)),   # one token tile, int4 a group per step
])
def test_the_tma_kernel_equals_the_product_of_the_dequantized_weight(scheme: str, rows: int, n: int,
                                                                     config: tuple) -> None:
    k = 3 * quantization.INT4_GROUP
    operands, dense = weights(scheme, n, k, seed=rows)
    for dtype in DTYPES:
        x = activations(rows, k + 1, dtype, seed=n)
        for view in (x[:, :k].contiguous(), x[:, 1:]):  # a view whose start and rows are off 16-byte boundaries
            y = mixed_gemm.matmul(view, *operands, config=config, tma=True)
            assert y.shape == (rows, n) and y.dtype == dtype
            w = dense if scheme != "int4" or dtype == torch.float32 else dense.to(dtype).float()
            error = relative_error(y, view.float() @ w.T)
            assert error < TOLERANCE[dtype], (dtype, error)


def test_mixed_gemm_keeps_leading_dimensions_and_takes_no_rows() -> None:
    operands, dense = weights("int8", 64, 256, seed=3)
    x = activations(6, 256, torch.float16, seed=4).view(2, 3, 256)
    y = mixed_gemm.matmul(x, *operands, config=(16, 64, 64, 4, 1))
    assert y.shape == (2, 3, 64)
    assert relative_error(y.view(6, 64), x.view(6, 256).float() @ dense.T) < TOLERANCE[torch.float16]
    assert mixed_gemm.matmul(x[:0], *operands, config=(16, 64, 64, 4, 1)).shape == (0, 3, 64)


def test_mixed_gemm_refuses_what_it_cannot_multiply() -> None:
    (q, scale, _, _), _ = weights("int8", 64, 192, seed=1)
    x = activations(2, 192, torch.float16, seed=1)
    with pytest.raises(ValueError, match="multiple of block_k"):
        mixed_gemm.matmul(x, q, scale, config=(16, 64, 128, 4, 1))  # 192 is no multiple of 128
    (packed, s, o, group), _ = weights("int4", 64, 256, seed=1)
    with pytest.raises(ValueError, match="divide"):
        mixed_gemm.matmul(activations(2, 256, torch.float16, 1), packed, s, o, group, config=(16, 64, 256, 4, 1))
    with pytest.raises(ValueError, match="int8"):
        mixed_gemm.matmul(x, q.to(torch.int16), scale)
    (q, scale, _, _), _ = weights("int8", 64, 256, seed=1)
    with pytest.raises(ValueError, match="one slice"):
        mixed_gemm.matmul(activations(2, 256, torch.float16, 1), q, scale, config=(16, 64, 64, 4, 1), split_k=2,
                          tma=True)


@pytest.mark.parametrize(("m", "block_m"), [(2, 16), (16, 16), (33, 64), (64, 64), (512, 128)])
@pytest.mark.parametrize("n", [12288, 4096])
def test_the_tuner_offers_the_mixed_gemm_from_two_rows(m: int, block_m: int, n: int) -> None:
    configs = [c for c in mixed_gemm.CONFIGS if c[0] == block_m]
    assert len(configs) == (2 if block_m == 64 else 1)  # the 64-token tile also 64 weight rows wide
    for scheme in ("int8", "int4", "fp8"):
        layer = quantization.QuantizedLinear(4096, n, scheme)
        mixed = [dict(k.options) for k in quantization.candidates(layer, m) if k.backend == "mixed"]
        names = ("block_m", "block_n", "block_k", "num_warps", "num_stages")
        offered = sorted({tuple(options[name] for name in names) for options in mixed})
        assert offered == sorted(configs)
        for config in configs:
            splits = [o["split_k"] for o in mixed if tuple(o[name] for name in names) == config]
            # split along K only while the output tiles would not fill the SMs twice (132 taken where there is no
            # GPU); for decode batches in half as many slices too
            tiles = -(-m // block_m) * -(-n // config[1])
            split = splits[0]
            assert split == 1 or tiles * split // 2 < 2 * quantization._num_sms(layer.weight.device)
            assert splits == ([split, split // 2] if split > 1 and m <= 64 else [split])
    assert not [k for k in quantization.candidates(layer, 1) if k.backend == "mixed"]
    assert not [k for k in quantization.candidates(layer, 64, torch.float32) if k.backend == "mixed"]


def test_the_tuner_offers_the_tma_kernel_for_prefills_on_hopper(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = quantization.QuantizedLinear(4096, 12288, "int8")
    assert not [k for k in quantization.candidates(layer, 512) if dict(k.options).get("tma")]  # no CUDA here
    monkeypatch.setattr(quantization, "_has_tma", lambda device: True)
    for scheme in ("int8", "int4", "fp8"):
        layer = quantization.QuantizedLinear(4096, 12288, scheme)
        tma = [dict(k.options) for k in quantization.candidates(layer, 512) if dict(k.options).get("tma")]
        assert [tuple(o[name] for name in ("block_m", "block_n", "block_k", "num_warps", "num_stages"))
                for o in tma] == list(mixed_gemm.TMA_CONFIGS)
        assert all(o["split_k"] == 1 for o in tma)
        assert not [k for k in quantization.candidates(layer, mixed_gemm.TMA_MIN_ROWS // 2)
                    if dict(k.options).get("tma")]


@pytest.mark.skipif(INTERPRET, reason="the tuner's candidates run on CUDA")
@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_the_mixed_candidates_pass_the_tuners_check_on_the_gpu(scheme: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quantization, "MIXED_TMA", True)  # the TMA kernel too (even with XVERSE_MIXED_TMA=0)
    layer = quantization.QuantizedLinear(1024, 640, scheme).to(DEVICE)
    layer.load_rows(0, torch.randn(640, 1024, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16) * 0.03)
    for m in (2, 40, 300, 600):  # decode batches, and prefill sizes past one token tile
        x = activations(m, 1024, torch.bfloat16, seed=m)
        for kernel in [k for k in quantization.candidates(layer, m) if k.backend == "mixed"]:
            error = quantization.relative_error(kernel(x, layer), quantization.reference_matmul(x, layer))
            assert error < quantization.tolerance(torch.bfloat16, kernel), (str(kernel), error)
