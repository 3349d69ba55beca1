"""--quantize int8 / int4: weight-only quantization applied while the checkpoint loads.

What is specified here:
- round trips: int8 per output channel is within half a step (scale / 2) of the weight; int4 in groups of 128
  within half a step of its group (plus float16's rounding of the stored offset);
- every way of multiplying (the CPU path, the Triton gemv / gemm / dequantize kernels, in Triton's interpreter
  on CPU or compiled on a GPU) equals x @ dequantized(W)^T computed in float32, up to the output's rounding;
- the quantized model equals, to float32 rounding, the same model with its weights replaced by the dequantized
  ones (its greedy tokens exactly), and stays near the original: on the tiny random checkpoints the relative
  logit error is ~1.2% for int8 and ~16% for int4 (4-bit steps on random Gaussian weights); tolerances 2.5% and
  25%. (Greedy tokens of a random tiny model sit on near-ties, so they are compared with the dequantized
  reference, not with the original.) The 7B-shaped figures come from bench/quant_bench.py;
- `python api.py --quantize int8 --kv-cache-dtype int8` serves; unsupported combinations stop it with one line;
- every kernel configuration the tuner may pick compiles for sm_90 (Hopper) without register spills, checked
  without a GPU through the ptxas Triton brings (tests/hopper_compile.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = torch.device("cpu" if INTERPRET else "cuda")

from conftest import REPO, start_server, stop_server  # noqa: E402
from paged import engine_tokens, paged_logits  # noqa: E402
from tiny_checkpoint import write_checkpoint  # noqa: E402

from xverse_serve.engine.config import CacheConfig, SchedulerConfig  # noqa: E402
from xverse_serve.engine.loader import assemble_engine, check_quantize, resolve_kv_cache_dtype  # noqa: E402
from xverse_serve.engine.messages import SamplingParams  # noqa: E402
from xverse_serve.launch import build_engine  # noqa: E402
from xverse_serve.model.checkpoint import CheckpointError, ModelConfig, load_config  # noqa: E402
from xverse_serve.model.quantization import (
    INT4_GROUP,
    TORCH_INT8_MAX_ROWS,
    Fp8Rows,
    MatmulKernel,
    QuantizedEmbedding,
    QuantizedLinear,
    candidates,
    dequantize_fp8,
    dequantize_int4,
    dequantize_int8,
    kernel_for,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
    quantized_bytes,
    reference_matmul,
    relative_error,
    tolerance,
    unpack_int4,
)
from xverse_serve.model.tuner import one_row_family, one_row_options  # noqa: E402
from xverse_serve.model.xverse import XverseForCausalLM, load_model  # noqa: E402
from xverse_serve.settings import parse_settings  # noqa: E402

CPU = torch.device("cpu")
MAX_POSITIONS = 256


def gaussian(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# ---------------------------------------------------------------- round trips


def test_int8_round_trip_is_within_half_a_step_per_channel() -> None:
    w = gaussian(48, 200, seed=0, scale=0.02) * torch.linspace(0.1, 10, 48)[:, None]  # channels of unlike range
    w[5] = 0  # an all-zero row
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (48,)
    assert q.abs().max() <= 127
    torch.testing.assert_close(scale[6:], w[6:].abs().amax(dim=1) / 127)
    assert (q.abs().amax(dim=1)[6:] == 127).all()  # each row uses its whole range
    error = (dequantize_int8(q, scale) - w).abs()
    assert (error <= scale[:, None] / 2 * (1 + 1e-6)).all()
    assert (dequantize_int8(q, scale)[5] == 0).all()


def test_int4_round_trip_is_within_half_a_step_per_group_of_128() -> None:
    w = gaussian(24, 3 * INT4_GROUP, seed=1, scale=0.02)
    w[:, :INT4_GROUP] += 0.5  # groups need their own offset
    w[3, INT4_GROUP:2 * INT4_GROUP] = 0.25  # a constant group
    packed, scale, offset = quantize_int4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (24, 3 * INT4_GROUP // 2)
    assert scale.shape == offset.shape == (24, 3) and scale.dtype == offset.dtype == torch.float16
    q = unpack_int4(packed)
    assert q.max() <= 15 and (q.view(24, 3, -1).amax(-1) >= 14).float().mean() > 0.9  # the range is used
    dequantized = dequantize_int4(packed, scale, offset)
    step = scale.float().repeat_interleave(INT4_GROUP, dim=1)
    slack = offset.float().abs().repeat_interleave(INT4_GROUP, dim=1) * 2.0 ** -11  # float16 rounding of the offset
    assert ((dequantized - w).abs() <= step / 2 + slack + 1e-7).all()
    torch.testing.assert_close(dequantized[3, INT4_GROUP:2 * INT4_GROUP], w[3, INT4_GROUP:2 * INT4_GROUP],
                               atol=2e-4, rtol=0)


def test_fp8_round_trip_keeps_three_mantissa_bits_per_channel() -> None:
    w = gaussian(48, 200, seed=7, scale=0.02) * torch.linspace(0.1, 10, 48)[:, None]  # channels of unlike range
    w[5] = 0  # an all-zero row
    q, scale = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (48,)
    torch.testing.assert_close(scale[6:], w[6:].abs().amax(dim=1) / 448)
    assert (q.float().abs().amax(dim=1)[6:] == 448).all()  # each row's largest weight maps to e4m3's largest
    error = (dequantize_fp8(q, scale) - w).abs()
    # e4m3 rounds to within 2**-4 of a value in its normal range; below 2**-6 (subnormal) within 2**-10 * scale
    assert (error <= torch.maximum(w.abs() * 2.0 ** -4, scale[:, None] * 2.0 ** -10) * (1 + 1e-6)).all()
    assert (dequantize_fp8(q, scale)[5] == 0).all()


def test_int4_packs_two_weights_per_byte_low_nibble_first() -> None:
    w = torch.arange(INT4_GROUP, dtype=torch.float32).repeat(2, 1) % 16  # q = w exactly: offset 0, scale 1
    packed, scale, offset = quantize_int4(w)
    assert torch.equal(scale, torch.ones_like(scale)) and torch.equal(offset, torch.zeros_like(offset))
    assert packed[0, 0].item() == 0 | (1 << 4) and packed[0, 1].item() == 2 | (3 << 4)
    assert torch.equal(unpack_int4(packed).float(), w)


def test_int4_needs_whole_groups() -> None:
    with pytest.raises(ValueError, match="multiple of 128"):
        quantize_int4(torch.zeros(4, 160))
    with pytest.raises(ValueError, match="multiple of 128"):
        QuantizedLinear(160, 64, "int4")
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        QuantizedLinear(128, 64, "int3")


# ---------------------------------------------------------------- the matmul


def quantized_layer(scheme: str, out_features: int, in_features: int, seed: int,
                    device: torch.device = CPU) -> QuantizedLinear:
    """A layer filled in two row slices, as the loader fills q, k, v into qkv_proj."""
    layer = QuantizedLinear(in_features, out_features, scheme).to(device)
    w = gaussian(out_features, in_features, seed=seed, scale=in_features ** -0.5).to(torch.bfloat16)
    first = out_features // 3
    layer.load_rows(0, w[:first])
    layer.load_rows(first, w[first:])
    return layer


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_load_rows_in_slices_equals_quantizing_the_whole(scheme: str) -> None:
    layer = quantized_layer(scheme, 40, 256, seed=2)
    w = gaussian(40, 256, seed=2, scale=256 ** -0.5).to(torch.bfloat16)
    whole = {"int8": quantize_int8, "int4": quantize_int4, "fp8": quantize_fp8}[scheme](w)
    assert torch.equal(layer.weight.view(torch.uint8), whole[0].view(torch.uint8))
    assert torch.equal(layer.weight_scale, whole[1])


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_forward_equals_the_dequantized_matmul(scheme: str, dtype: torch.dtype) -> None:
    layer = quantized_layer(scheme, 40, 256, seed=3)
    x = gaussian(2, 3, 256, seed=4).to(dtype)
    y = layer(x)
    assert y.shape == (2, 3, 40) and y.dtype == dtype
    assert relative_error(y.reshape(6, 40), reference_matmul(x.reshape(6, 256), layer)) < (
        1e-5 if dtype == torch.float32 else 1e-2)
    assert layer(x[:0]).shape == (0, 3, 40)


# name -> (backend, options per scheme): every kernel family, with several row and K blocks per program, a split
# along K, a partial last block of output channels and, for int8, an input width not a multiple of the block.
KERNELS = {
    "gemv": ("gemv", {"int8": {}, "int4": {}}),
    "gemv-small-blocks": ("gemv", {"int8": {"block_n": 4, "block_k": 64},
                                   "int4": {"block_n": 4, "groups_per_iter": 2}}),
    "gemm": ("gemm", {"int8": {"block_m": 16, "block_n": 32, "block_k": 64}, "int4": {"block_m": 16, "block_n": 32}}),
    "gemm-split-k": ("gemm", {"int8": {"block_m": 16, "block_n": 32, "block_k": 64, "split_k": 3},
                              "int4": {"block_m": 16, "block_n": 32, "split_k": 2}}),
    "dequantize": ("dequantize", {"int8": {}, "int4": {}}),
}


@pytest.fixture(scope="module")
def triton_kernels():
    pytest.importorskip("triton")
    if INTERPRET:
        from test_triton_attention import _fix_interpreter_index

        _fix_interpreter_index()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize(("name", "m"), [(name, m) for name in KERNELS for m in (1, 5, 33)
                                         if not (name.startswith("gemv") and m > 16)])  # gemv: decode batches
def test_triton_kernels_equal_the_float32_reference(triton_kernels, scheme: str, name: str, m: int) -> None:
    in_features = 3 * INT4_GROUP if scheme == "int4" else 3 * INT4_GROUP + 32
    layer = quantized_layer(scheme, 70, in_features, seed=5, device=DEVICE)
    backend, options = KERNELS[name]
    kernel = MatmulKernel(backend, tuple(options[scheme].items()))
    # The interpreter has no bfloat16 dot (it reads the bits wrongly); bf16 runs where the kernels compile.
    dtypes = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])
    for dtype in dtypes:
        x = gaussian(m, in_features, seed=m).to(dtype).to(DEVICE)
        y = kernel(x, layer)
        assert y.shape == (m, 70) and y.dtype == dtype
        error = relative_error(y, reference_matmul(x, layer))
        assert error < (2e-6 if dtype == torch.float32 else 5e-3), (dtype, error)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_dequantize_writes_into_a_given_buffer(triton_kernels, scheme: str) -> None:
    from xverse_serve.kernels import quant_matmul

    layer = quantized_layer(scheme, 70, 3 * INT4_GROUP, seed=9, device=DEVICE)
    operands = (layer.weight, layer.weight_scale, layer.weight_offset, layer.bits, layer.group_size, torch.float32)
    buffer = torch.zeros(80 * 3 * INT4_GROUP, device=DEVICE)
    out = buffer[:70 * 3 * INT4_GROUP].view(70, 3 * INT4_GROUP)
    assert quant_matmul.dequantize(*operands, out=out) is out
    assert torch.equal(out, quant_matmul.dequantize(*operands))
    assert not buffer[70 * 3 * INT4_GROUP:].any()  # nothing written past it
    with pytest.raises(ValueError, match="out must be"):
        quant_matmul.dequantize(*operands, out=out.to(torch.float16))


@pytest.mark.parametrize("m", [1, 17, 64])
def test_int4_takes_the_split_k_gemm(triton_kernels, m: int) -> None:
    layer = quantized_layer("int4", 70, 3 * INT4_GROUP, seed=7, device=DEVICE)
    options = (("block_n", 32), ("num_warps", 4), ("num_stages", 2))
    for dtype in [torch.float16] + ([] if INTERPRET else [torch.bfloat16]):
        x = gaussian(m, 3 * INT4_GROUP, seed=m).to(dtype).to(DEVICE)
        y = MatmulKernel("split", options)(x, layer)
        assert y.shape == (m, 70) and y.dtype == dtype
        assert relative_error(y, reference_matmul(x, layer)) < 5e-3


TWO_PART_OPTIONS = {
    ("int8", "split"): (("block_n", 32), ("block_k", 64), ("num_warps", 4), ("num_stages", 2), ("two_part", 1)),
    ("int4", "split"): (("block_n", 32), ("num_warps", 4), ("num_stages", 2), ("two_part", 1)),
    ("int8", "imma_rows"): (("block_m", 16), ("block_n", 32), ("block_k", 64), ("num_warps", 4), ("num_stages", 1)),
    ("int4", "imma_rows"): (("block_m", 16), ("block_n", 32), ("num_warps", 4), ("num_stages", 1))}


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize(("backend", "m"), [("split", 1), ("split", 17), ("imma_rows", 40)])
def test_int8_and_int4_take_the_int8_tensor_core_kernels(triton_kernels, scheme: str, backend: str, m: int) -> None:
    layer = quantized_layer(scheme, 70, 3 * INT4_GROUP, seed=9, device=DEVICE)
    kernel = MatmulKernel(backend, TWO_PART_OPTIONS[scheme, backend])
    for dtype in [torch.float16] + ([] if INTERPRET else [torch.bfloat16]):
        x = gaussian(m, 3 * INT4_GROUP, seed=m).to(dtype).to(DEVICE)
        y = kernel(x.view(m, 1, -1), layer)  # any leading shape
        assert y.shape == (m, 1, 70) and y.dtype == dtype
        assert relative_error(y.view(m, 70), reference_matmul(x, layer)) < 5e-3


def test_int8_takes_cublas_int8_gemm_on_the_two_parts(triton_kernels) -> None:
    """imma_gemm.cublas_rows_matmul: both parts in one torch._int_mm call, the scales applied by one kernel."""
    layer = quantized_layer("int8", 72, 3 * INT4_GROUP, seed=9, device=DEVICE)
    kernel = MatmulKernel("cublas_int8")
    for dtype in [torch.float16] + ([] if INTERPRET else [torch.bfloat16]):
        x = gaussian(40, 3 * INT4_GROUP, seed=40).to(dtype).to(DEVICE)
        y = kernel(x.view(40, 1, -1), layer)  # any leading shape
        assert y.shape == (40, 1, 72) and y.dtype == dtype
        assert relative_error(y.view(40, 72), reference_matmul(x, layer)) < 5e-3
    with pytest.raises(ValueError, match="multiples of 8"):
        kernel(x, quantized_layer("int8", 70, 3 * INT4_GROUP, seed=9, device=DEVICE))
    with pytest.raises(ValueError, match="more than 8 rows"):
        kernel(x[:8], layer)
    offered = {m: "cublas_int8" in {k.backend for k in candidates(QuantizedLinear(4096, 4096, "int8"), m)}
               for m in (32, 64, 512, 1024, 2048)}
    assert offered == {32: False, 64: True, 512: False, 1024: False, 2048: False}
    for other in (QuantizedLinear(4096, 4096, "int4"), QuantizedLinear(4096, 4096, "fp8"),
                  QuantizedLinear(4096, 4004, "int8")):  # N not a multiple of 8
        assert "cublas_int8" not in {k.backend for k in candidates(other, 64)}
    assert "cublas_int8" not in {k.backend for k in candidates(QuantizedLinear(4096, 4096, "int8"), 64,
                                                                torch.float32)}


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
@pytest.mark.parametrize(("backend", "m"), [("rowgemv", 1), ("skinny", 5), ("skinny", 32), ("skinny", 64),
                                          ("split", 1), ("split", 17), ("split", 64)])
def test_int8_and_fp8_take_the_bf16_models_gemv_kernels(triton_kernels, scheme: str, backend: str, m: int) -> None:
    in_features = 3 * INT4_GROUP + 32
    layer = quantized_layer(scheme, 70, in_features, seed=6, device=DEVICE)
    options = (("block_n", 32), ("block_k", 64), ("num_warps", 4), ("num_stages", 2)) if backend == "split" else ()
    # The interpreter has no bfloat16 dot (it reads the bits wrongly); bf16 runs where the kernels compile.
    for dtype in [torch.float16] + ([] if INTERPRET else [torch.bfloat16]):
        x = gaussian(m, in_features, seed=m).to(dtype).to(DEVICE)
        y = MatmulKernel(backend, options)(x, layer)
        assert y.shape == (m, 70) and y.dtype == dtype
        assert relative_error(y, reference_matmul(x, layer)) < 5e-3
    assert layer.gemv_operands() == (layer.weight, layer.weight_scale) and layer.one_row == "gemv"
    assert quantized_layer("int4", 70, 3 * INT4_GROUP, seed=6, device=DEVICE).one_row is None  # until tuned


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 tensor cores: compute capability 8.9+")
@pytest.mark.parametrize("m", [1, 16, 100, 512])
def test_fp8_scaled_mm_quantizes_activations_per_token(m: int) -> None:
    layer = quantized_layer("fp8", 256, 512, seed=8, device=DEVICE)
    x = (gaussian(m, 512, seed=m) * torch.linspace(0.1, 10, m)[:, None]).to(torch.bfloat16).to(DEVICE)
    y = MatmulKernel("scaled_mm")(x, layer)
    assert y.shape == (m, 256) and y.dtype == torch.bfloat16
    # the activations rounded to e4m3 per token: about 2**-5 of each term on average, a few % of the product
    assert relative_error(y, reference_matmul(x, layer)) < 0.05


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 tensor cores: 8.9+ (tests/test_imma_gemm.py says why not in the interpreter)")
@pytest.mark.parametrize("m", [1, 17, 64])
def test_fp8_takes_the_two_part_split_kernel(m: int) -> None:
    layer = quantized_layer("fp8", 256, 512, seed=8, device=DEVICE)
    x = (gaussian(m, 512, seed=m) * torch.linspace(0.1, 10, m)[:, None]).to(torch.bfloat16).to(DEVICE)
    options = (("block_n", 64), ("block_k", 128), ("num_warps", 4), ("num_stages", 3), ("two_part", 1))
    y = MatmulKernel("split", options)(x, layer)
    assert y.shape == (m, 256) and y.dtype == torch.bfloat16
    assert relative_error(y, reference_matmul(x, layer)) < 1e-2  # the tuner's bound, as for weight-only kernels


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 tensor cores: 8.9+ (tests/test_imma_gemm.py says why not in the interpreter)")
@pytest.mark.parametrize("tma", [0, 1])
@pytest.mark.parametrize("m", [16, 33, 64])
def test_fp8_takes_the_split_kernel_with_e4m3_activations(m: int, tma: int) -> None:
    if tma and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA copies: compute capability 9.0+")
    layer = quantized_layer("fp8", 256, 512, seed=8, device=DEVICE)
    x = (gaussian(m, 512, seed=m) * torch.linspace(0.1, 10, m)[:, None]).to(torch.bfloat16).to(DEVICE)
    options = (("block_n", 64), ("block_k", 128), ("num_warps", 4), ("num_stages", 3), ("tma", tma), ("fp8_act", 1))
    y = MatmulKernel("split", options)(x.view(m, 1, -1), layer)  # any leading shape
    assert y.shape == (m, 1, 256) and y.dtype == torch.bfloat16
    # x rounded to e4m3 per token as scaled_mm rounds it: the same product, to the sums' order and bf16's rounding
    assert relative_error(y.view(m, 256), MatmulKernel("scaled_mm")(x, layer).float()) < 1e-2
    assert relative_error(y.view(m, 256), reference_matmul(x, layer)) < 0.05


def test_kernels_that_round_the_activations_to_e4m3_are_held_to_scaled_mms_bound() -> None:
    fp8_act = MatmulKernel("split", (("block_n", 64), ("block_k", 128), ("num_warps", 4), ("num_stages", 3),
                                     ("tma", 0), ("fp8_act", 1)))
    assert tolerance(torch.bfloat16, fp8_act) == tolerance(torch.bfloat16, MatmulKernel("scaled_mm")) == 0.06
    two_part = MatmulKernel("split", (("block_n", 64), ("block_k", 128), ("num_warps", 4), ("num_stages", 3),
                                      ("two_part", 1)))
    assert tolerance(torch.bfloat16, two_part) == tolerance(torch.bfloat16) == 1e-2
    # offered only where the card has FP8 dots: a layer on the CPU gets none
    fp8 = QuantizedLinear(4096, 4096, "fp8")
    assert not [k for m in (16, 64) for k in candidates(fp8, m) if ("fp8_act", 1) in k.options]


def test_candidates_cover_every_batch_size_and_the_torch_op_only_for_int8() -> None:
    for scheme in ("int8", "int4"):
        layer = QuantizedLinear(4096, 4096, scheme, INT4_GROUP)
        for m in (1, 2, 4, 16, 64, 512, 8192):
            backends = {kernel.backend for kernel in candidates(layer, m)}
            assert backends & {"gemv", "gemm"}
            # the torch op for decode-sized batches only: it is slow and slower the more rows
            assert ("torch" in backends) == (scheme == "int8" and m <= TORCH_INT8_MAX_ROWS)
    lm_head = QuantizedLinear(4096, 100534, "int8")
    assert "dequantize" not in {kernel.backend for kernel in candidates(lm_head, 512)}  # 823 MB would be too big
    # float32 activations: gemv or cuBLAS after dequantizing; the tensor-core gemm only where nothing else fits
    assert {k.backend for k in candidates(QuantizedLinear(4096, 4096, "int4"), 512, torch.float32)} == {"dequantize"}
    assert {k.backend for k in candidates(lm_head, 512, torch.float32)} == {"gemm", "torch"}
    assert "gemm" not in {k.backend for k in candidates(lm_head, 1, torch.float32)}
    # bf16 int8: the bf16 model's GEMV at one row, its skinny GEMM at 2-64, the split-K GEMM at 1-64
    assert {"rowgemv", "split"} <= {k.backend for k in candidates(lm_head, 1)}
    assert {"skinny" in {k.backend for k in candidates(lm_head, m)} for m in (2, 32, 64)} == {True}
    assert {"split" in {k.backend for k in candidates(lm_head, m)} for m in (2, 32, 64)} == {True}
    assert not {"rowgemv", "skinny", "split"} & {k.backend for k in candidates(lm_head, 65)}
    fp8 = QuantizedLinear(4096, 4096, "fp8")
    from xverse_serve.kernels import split_gemm

    splits = ["split"] * len(split_gemm.TUNED_CONFIGS)
    two_part = ["split"] * len(split_gemm.TWO_PART_CONFIGS)
    assert [k.backend for k in candidates(fp8, 1)] == ["rowgemv", *splits, *two_part, "scaled_mm"]
    mixed = [k.backend for k in candidates(fp8, 64) if k.backend == "mixed"]  # test_mixed_gemm.py checks which
    assert [k.backend for k in candidates(fp8, 64)] == ["skinny", *splits, *two_part, "scaled_mm", *mixed]
    assert mixed
    assert [k.backend for k in candidates(fp8, 4096)] == ["scaled_mm", "mixed"]
    assert [k.backend for k in candidates(fp8, 8, torch.float32)] == ["reference"]
    int4 = QuantizedLinear(4096, 4096, "int4")
    assert not {"rowgemv", "skinny"} & {k.backend for k in candidates(int4, 1)}
    assert {"split" in {k.backend for k in candidates(int4, m)} for m in (1, 64)} == {True}
    assert "split" not in {k.backend for k in candidates(int4, 65)}
    assert "split" not in {k.backend for k in candidates(int4, 1, torch.float32)}
    # int8 tensor cores for int8 and int4 weights, bf16 or fp16 activations in two parts: up to 64 rows split along
    # K (split_gemm), from 64 rows tiled over the outputs (imma_gemm)
    def two_part(kernel: MatmulKernel) -> str | None:
        return "split" if ("two_part", 1) in kernel.options else "imma_rows" if kernel.backend == "imma_rows" else None

    for layer in (int4, QuantizedLinear(4096, 4096, "int8")):
        kinds = {m: {two_part(k) for k in candidates(layer, m)} - {None} for m in (1, 64, 512)}
        assert kinds == {1: {"split"}, 64: {"split", "imma_rows"}, 512: {"imma_rows"}}
        assert not {two_part(k) for k in candidates(layer, 64, torch.float32)} - {None}
    assert "imma_rows" not in {k.backend for k in candidates(QuantizedLinear(4000, 4096, "int8"), 512)}  # K % 128


def test_one_row_steps_take_the_faster_fused_family_unless_the_tuned_kernels_are_clearly_faster() -> None:
    """Summed over the projections: the fused path saves its separate norm, residual and SiLU kernels, worth
    ONE_ROW_MARGIN on the projections' time; beyond that the tuned kernels take one-row steps."""
    close = [{"rowgemv": 1.1, "split(block_n=64, two_part=1)": 1.0}, {"rowgemv": 2.2, "split(block_n=64)": 2.0}]
    assert one_row_family(close, "gemv") == "gemv"
    far = [{"rowgemv": 1.5, "split(block_n=64, two_part=1)": 1.0}, {"rowgemv": 2.2, "split(block_n=64)": 2.0}]
    assert one_row_family(far, "gemv") is None  # 3.7 ms against 3.0
    failed = [{"rowgemv": "failed: OutOfMemoryError", "split(block_n=64, two_part=1)": 1.0}]
    assert one_row_family(failed, "gemv") is None
    assert one_row_family([{}], "gemv") == "gemv"  # nothing measured: the path stays
    assert one_row_family([{}], None) is None
    # int8: dp4a's GEMVs (with their quantizing kernel) against the float ones, over all projections.
    both = [{"rowgemv": 1.0, "dp4a": 0.9}, {"rowgemv": 2.0, "dp4a": 2.2, "split(block_n=64)": 1.9}]
    assert one_row_family(both, "gemv") == "gemv"  # 3.0 ms against 3.1
    both[1]["dp4a"] = 1.9
    assert one_row_family(both, "gemv") == "dp4a"
    # int4 has no float GEMV at one row: dp4a's, unless it failed anywhere.
    int4 = [{"dp4a": 1.0, "split(block_n=64)": 1.1}, {"dp4a": 0.5}]
    assert one_row_family(int4, None) == "dp4a"
    # ... or its one-part activations where those are faster everywhere they ran (and not where one failed).
    one_part = [{"dp4a": 1.0, "dp4a(act_block=32)": 0.95}, {"dp4a": 0.5, "dp4a(act_block=32)": 0.45}]
    assert one_row_family(one_part, None) == "dp4a_one_part"
    one_part[1]["dp4a(act_block=32)"] = "rejected: relative error 2.00e-02"
    assert one_row_family(one_part, None) == "dp4a"
    int4[1]["dp4a"] = "rejected: relative error 1.00e+00"
    int4[1]["split(block_n=64)"] = 0.6
    assert one_row_family(int4, None) is None


def test_each_projection_takes_its_one_row_familys_fastest_shape() -> None:
    """A dp4a family's time on a projection is its fastest candidate's (K whole or in slices, int4's groups a step),
    and the projection's one-row GEMV takes that candidate's options."""
    timings = [{"dp4a": 1.0, "dp4a(split_k=2)": 0.7, "dp4a(split_k=4)": 0.8, "rowgemv": 0.9},
               {"dp4a": 2.0, "dp4a(split_k=2)": "failed: OutOfMemoryError", "dp4a(split_k=4)": 2.1, "rowgemv": 1.9}]
    assert one_row_family(timings, "gemv") == "dp4a"  # 2.7 ms against 2.8
    assert [one_row_options(t, "dp4a") for t in timings] == [(("split_k", 2),), ()]
    assert one_row_options(timings[0], "gemv") == () and one_row_options(timings[0], None) == ()
    assert one_row_options({}, "dp4a") == ()  # nothing measured
    one_part = {"dp4a(act_block=32)": 0.5, "dp4a(act_block=32, split_k=2, block_g=32)": 0.4, "dp4a(split_k=2)": 0.3}
    assert one_row_options(one_part, "dp4a_one_part") == (("act_block", 32), ("split_k", 2), ("block_g", 32))
    assert one_row_options(one_part, "dp4a") == (("split_k", 2),)
    names = {str(k) for k in candidates(QuantizedLinear(4096, 11008, "int4"), 1)}
    assert {"dp4a", "dp4a(split_k=2)", "dp4a(act_block=32, split_k=2)", "dp4a(block_g=32)",
            "dp4a(act_block=32, split_k=2, block_g=16)"} <= names
    int8_names = {str(k) for k in candidates(QuantizedLinear(11008, 4096, "int8"), 1) if k.backend == "dp4a"}
    assert int8_names == {"dp4a", "dp4a(split_k=2)"}
    # K = 4,096 at 32 groups a step is one step: no slices of it to time
    wide = {str(k) for k in candidates(QuantizedLinear(4096, 4096, "int4"), 1) if "block_g=32" in str(k)}
    assert wide == {"dp4a(block_g=32)", "dp4a(act_block=32, block_g=32)"}
    at_two = {str(k) for k in candidates(QuantizedLinear(4096, 11008, "int4"), 2) if k.backend == "dp4a"}
    assert at_two == {"dp4a", "dp4a(act_block=32)", "dp4a(block_g=32)", "dp4a(act_block=32, block_g=32)"}


# ---------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def tiny_int4_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint whose projections take whole groups of 128 (hidden 128, intermediate 256)."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt4") / "XVERSE-tiny-128", hidden_size=128,
                            intermediate_size=256)


def model_dir_for(scheme: str, tiny_model_dir: Path, tiny_int4_dir: Path) -> Path:
    return tiny_int4_dir if scheme == "int4" else tiny_model_dir


def dequantized_twin(model: XverseForCausalLM, model_dir: Path) -> XverseForCausalLM:
    """The unquantized model with every quantized weight replaced by its dequantized value."""
    twin = load_model(model_dir, model.config, CPU, model.dtype, MAX_POSITIONS)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
                twin.get_submodule(name).weight.copy_(module.dequantized(model.dtype))
    return twin


def greedy(model: XverseForCausalLM, prompts: list[list[int]], max_tokens: int = 24,
           kv_dtype: torch.dtype | None = None) -> list[list[int]]:
    """All prompts at once through the engine (batched, chunked prefill), greedy."""
    engine = assemble_engine(model, CacheConfig(64, 4, kv_dtype), SchedulerConfig(8, 32), MAX_POSITIONS)
    return engine_tokens(engine, prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))

def random_ids(count: int, config: ModelConfig, seed: int) -> list[int]:
    return torch.randint(4, config.vocab_size, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.skipif(INTERPRET, reason="the one-row path runs on CUDA only")
@pytest.mark.parametrize(("scheme", "family"), [("none", "gemv"), ("int8", "gemv"), ("int8", "dp4a"), ("int4", "dp4a"),
                                               ("int4", "dp4a_one_part")])
def test_one_row_decode_steps_run_either_family_of_fused_gemvs(scheme: str, family: str, tiny_model_dir: Path,
                                                               tiny_int4_dir: Path, monkeypatch) -> None:
    """The one-row path (one_row.py) with kernels.gemv's GEMVs (bf16 weights too) or dp4a_gemv's: no residual add
    and no norm kernel but the first and final ones and (gemv) the post-attention one; logits as the general
    path's."""
    from collections import Counter

    from xverse_serve.kernels import fused_ops
    from xverse_serve.model.xverse import Linear

    model_dir = model_dir_for(scheme, tiny_model_dir, tiny_int4_dir)
    config = load_config(model_dir)
    model = load_model(model_dir, config, DEVICE, torch.bfloat16, MAX_POSITIONS, scheme)
    for layer in model.model.layers:
        for projection in layer.projections():
            projection.one_row = family
    assert model.one_row_ready
    calls: Counter[str] = Counter()
    for name in ("rms_norm", "fused_add_rms_norm"):
        original = getattr(fused_ops, name)
        monkeypatch.setattr(fused_ops, name, lambda *args, _f=original, _n=name: calls.update([_n]) or _f(*args))
    token_ids, chunks = list(range(5, 29)), [20, 1, 1, 1, 1]
    fused = paged_logits(model, token_ids, chunks)
    layers = config.num_layers
    # The prefill: the first norm alone, every other one with its residual add. Each of the four decodes: the final
    # norm, and with kernels.gemv the first layer's input norm and every post-attention norm.
    per_decode = 1 + (layers + 1) * (family == "gemv")
    assert calls == {"rms_norm": 1 + 4 * per_decode, "fused_add_rms_norm": 2 * layers}
    monkeypatch.setattr(Linear, "runs_one_row", classmethod(lambda cls, x: False))
    unfused = paged_logits(model, token_ids, chunks)
    torch.testing.assert_close(fused[:20], unfused[:20], rtol=0, atol=0)
    # Other kernels (sums in other orders, dp4a's activations in two int8 parts): the logits agree to bf16
    # roundings, the greedy tokens exactly. One-part activations round more (about 5e-3 of a product): a near tie
    # may go the other way, so only the logits are held to the bound.
    assert relative_error(fused[20:], unfused[20:].float()) < 2e-2
    if family != "dp4a_one_part":
        assert torch.equal(fused.argmax(dim=-1), unfused.argmax(dim=-1))


@pytest.mark.parametrize("kernel", ["scaled_mm", "split_fp8_act"])
def test_fp8_projections_take_their_activations_quantized_by_the_norm_and_silu(
        triton_kernels, tiny_model_dir: Path, kernel: str, monkeypatch) -> None:
    """Where an fp8 projection's kernel multiplies e4m3 activations, the kernel before it quantizes them: the norms
    before qkv_proj and gate_up_proj (fused_ops.rms_norm_fp8) and SiLU·up before down_proj (silu_and_mul_fp8), and
    no kernel of the projection's own does. The logits are those of the projections quantizing x themselves, bit
    for bit (the same e4m3 values into the same matmul). On the CPU the fused kernels run in Triton's interpreter
    and the projections run their plan as a GPU would (scaled_mm on the CPU; the split kernel is GPU-only)."""
    from test_kv_int8 import _to_float8
    from test_triton_ops import interpreter_converts_floats_with

    from xverse_serve.kernels import fused_ops
    from xverse_serve.model import xverse

    if kernel == "split_fp8_act" and (INTERPRET or torch.cuda.get_device_capability() < (8, 9)):
        pytest.skip("the split kernel with e4m3 activations runs compiled, on compute capability 8.9+")
    config = load_config(tiny_model_dir)
    model = load_model(tiny_model_dir, config, DEVICE, torch.bfloat16, MAX_POSITIONS, "fp8")
    chosen = MatmulKernel("scaled_mm") if kernel == "scaled_mm" else MatmulKernel("split", (
        ("block_n", 64), ("block_k", 128), ("num_warps", 4), ("num_stages", 3), ("tma", 0), ("fp8_act", 1)))
    for layer in model.model.layers:
        for projection in layer.projections():
            projection.plan = ((1 << 30, chosen),)
            projection.one_row = None  # decode steps take the general path too
    if INTERPRET:
        monkeypatch.setattr(xverse, "fused_ops", lambda t: fused_ops)

        cpu_forward = QuantizedLinear.forward

        def run_plan(self: QuantizedLinear, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
            if self.plan is None:  # the int8 lm_head
                return cpu_forward(self, x)
            if isinstance(x, Fp8Rows):
                return kernel_for(self.plan, x.values.shape[0])(x, self)
            x2 = x.reshape(-1, self.in_features)
            return kernel_for(self.plan, x2.shape[0])(x2, self).view(*x.shape[:-1], self.out_features)

        monkeypatch.setattr(QuantizedLinear, "forward", run_plan)
    calls: dict[str, int] = {"rms_norm_fp8": 0, "silu_and_mul_fp8": 0}
    for name in calls:
        original = getattr(fused_ops, name)
        monkeypatch.setattr(fused_ops, name, lambda *args, _f=original, _n=name: calls.update({_n: calls[_n] + 1})
                            or _f(*args))
    token_ids, chunks = random_ids(22, config, seed=3), [20, 1, 1]
    with interpreter_converts_floats_with(_to_float8):
        fused = paged_logits(model, token_ids, chunks)
        assert calls == {"rms_norm_fp8": 2 * config.num_layers * 3, "silu_and_mul_fp8": config.num_layers * 3}
        monkeypatch.setattr(xverse, "FP8_FUSED_QUANT", False)
        unfused = paged_logits(model, token_ids, chunks)
    assert calls == {"rms_norm_fp8": 2 * config.num_layers * 3, "silu_and_mul_fp8": config.num_layers * 3}
    assert torch.equal(fused, unfused)


def test_only_the_kernels_that_multiply_e4m3_activations_take_fp8_rows() -> None:
    fp8 = QuantizedLinear(4096, 4096, "fp8")
    fp8.plan = ((16, MatmulKernel("skinny")), (64, MatmulKernel("split", (("block_n", 64), ("fp8_act", 1)))),
                (1 << 30, MatmulKernel("scaled_mm")))
    assert [fp8.takes_fp8_rows(m) for m in (0, 1, 16, 17, 64, 65, 4096)] == [False, False, False, True, True, True,
                                                                            True]
    int8 = QuantizedLinear(4096, 4096, "int8")
    int8.plan = fp8.plan
    assert not int8.takes_fp8_rows(4096)
    rows = Fp8Rows(torch.zeros(2, 4096, dtype=torch.float8_e4m3fn), torch.ones(2, 1), torch.bfloat16)
    with pytest.raises(TypeError, match="skinny takes activations in torch.bfloat16, not Fp8Rows"):
        MatmulKernel("skinny")(rows, fp8)


def test_a_quantized_model_quantizes_the_projections_lm_head_and_embeddings_only(tiny_int4_dir: Path) -> None:
    config = load_config(tiny_int4_dir)
    dense = load_model(tiny_int4_dir, config, CPU, torch.bfloat16, MAX_POSITIONS)
    for scheme in ("int8", "int4"):
        model = load_model(tiny_int4_dir, config, CPU, torch.bfloat16, MAX_POSITIONS, scheme)
        assert model.dtype == torch.bfloat16 and model.model.norm.weight.dtype == torch.bfloat16
        assert model.lm_head.scheme == "int8"
        embed = model.model.embed_tokens
        assert isinstance(embed, QuantizedEmbedding) and embed.weight.dtype == torch.int8
        ids = torch.tensor(random_ids(9, config, seed=3))
        looked_up = embed(ids)
        assert looked_up.dtype == torch.bfloat16
        assert torch.equal(looked_up, embed.dequantized(torch.bfloat16)[ids])
        # per-row int8: within half a step of each row's largest value / 127
        error = (embed.dequantized() - dense.model.embed_tokens.weight.float()).abs()
        assert (error <= embed.weight_scale[:, None] / 2 + 1e-3 * embed.weight_scale[:, None]).all()
        for layer in model.model.layers:
            for proj in layer.projections():
                assert isinstance(proj, QuantizedLinear) and proj.scheme == scheme
        projections = [proj for layer in model.model.layers for proj in (layer.self_attn, layer.mlp)]
        for proj in (module for module in model.modules() if isinstance(module, QuantizedLinear)):
            n, k = proj.out_features, proj.in_features
            # int8: a byte per weight and a float32 scale per channel; int4: half a byte per weight and two
            # float16 numbers per group of 128
            expected = n * k + 4 * n if proj.scheme == "int8" else n * k // 2 + 2 * 2 * n * k // INT4_GROUP
            assert quantized_bytes(proj) == expected
        ratio = sum(map(quantized_bytes, projections)) / sum(
            quantized_bytes(layer.self_attn) + quantized_bytes(layer.mlp) for layer in dense.model.layers)
        assert ratio < (0.52 if scheme == "int8" else 0.27)  # of bf16
        assert quantized_bytes(model) < quantized_bytes(dense)


@pytest.mark.parametrize(("scheme", "tolerance"), [("int8", 2.5e-2), ("int4", 0.25), ("fp8", 0.06)])
def test_quantized_logits_equal_the_dequantized_model_and_stay_near_the_original(
        scheme: str, tolerance: float, tiny_model_dir: Path, tiny_int4_dir: Path) -> None:
    model_dir = model_dir_for(scheme, tiny_model_dir, tiny_int4_dir)
    config = load_config(model_dir)
    original = load_model(model_dir, config, CPU, torch.float32, MAX_POSITIONS)
    quantized = load_model(model_dir, config, CPU, torch.float32, MAX_POSITIONS, scheme)
    twin = dequantized_twin(quantized, model_dir)
    ids = random_ids(60, config, seed=1)
    chunks = [40, 7, 5] + [1] * 8  # prefill, chunked prefill and decodes
    ours = paged_logits(quantized, ids, chunks)
    assert relative_error(ours, paged_logits(twin, ids, chunks)) < 1e-5
    assert relative_error(ours, paged_logits(original, ids, chunks)) < tolerance


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_greedy_tokens_of_a_quantized_model_equal_its_dequantized_twin(scheme: str, tiny_model_dir: Path,
                                                                       tiny_int4_dir: Path) -> None:
    model_dir = model_dir_for(scheme, tiny_model_dir, tiny_int4_dir)
    config = load_config(model_dir)
    quantized = load_model(model_dir, config, CPU, torch.float32, MAX_POSITIONS, scheme)
    prompts = [random_ids(n, config, seed=n) for n in (5, 17, 40)]
    tokens = greedy(quantized, prompts)
    assert all(len(set(t)) > 3 for t in tokens), "the tiny model should not be degenerate"
    assert tokens == greedy(dequantized_twin(quantized, model_dir), prompts)


# ---------------------------------------------------------------- start-up: flags, errors, a served answer


def test_int4_on_a_model_without_whole_groups_is_a_clear_start_up_error(tiny_model_dir: Path) -> None:
    settings = parse_settings(["--model-path", str(tiny_model_dir), "--device", "cpu", "--quantize", "int4"])
    with pytest.raises(CheckpointError, match="hidden_size to be a multiple of 128.*use --quantize int8"):
        build_engine(settings)


def test_fp8_kv_cache_needs_a_card_with_fp8(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    with pytest.raises(CheckpointError, match="fp8 support.*RTX 3090 has 8.6.*--kv-cache-dtype int8"):
        resolve_kv_cache_dtype("fp8", torch.device("cuda"), torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve_kv_cache_dtype("fp8", torch.device("cuda"), torch.bfloat16) == torch.float8_e4m3fn
    assert resolve_kv_cache_dtype("fp8", CPU, torch.float32) == torch.float8_e4m3fn  # the CPU reference has it
    assert resolve_kv_cache_dtype("int8", CPU, torch.float32) == torch.int8
    assert resolve_kv_cache_dtype("auto", CPU, torch.float32) == torch.float32


def test_fp8_weights_need_a_card_with_fp8_tensor_cores(monkeypatch: pytest.MonkeyPatch, config) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    with pytest.raises(CheckpointError, match="FP8 tensor cores.*RTX 3090 has 8.6.*--quantize int8"):
        check_quantize("fp8", config, torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    check_quantize("fp8", config, torch.device("cuda"))
    check_quantize("fp8", config, CPU)  # the CPU runs the PyTorch reference


def test_api_py_refuses_int4_on_this_checkpoint_in_one_line(tiny_model_dir: Path) -> None:
    result = subprocess.run([sys.executable, str(REPO / "api.py"), "--model-path", str(tiny_model_dir),
                             "--device", "cpu", "--quantize", "int4"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "--quantize int4" in line and "--quantize int8" in line


def test_api_py_serves_with_int8_weights_and_an_int8_kv_cache(tiny_model_dir: Path, tmp_path: Path) -> None:
    server = start_server(tiny_model_dir, tmp_path / "server.log", "--quantize", "int8", "--kv-cache-dtype", "int8")
    try:
        body = {"prompt": "Hello, who are you?", "temperature": 0, "max_new_tokens": 16}
        first = requests.post(server.url, json=body, timeout=60)
        assert first.status_code == 200, first.text
        assert first.json()["response"]
        assert requests.post(server.url, json=body, timeout=60).json()["response"] == first.json()["response"]
        log = server.log()
        assert "weights quantized to int8" in log and "KV cache (int8)" in log
    finally:
        stop_server(server)



# ---------------------------------------------------------------- the kernels compile for the GPU


def compiled_kernels(family: str) -> list[dict]:
    """tests/hopper_compile.py's report for a family of kernels (compiled for sm_90, or for "consumer" sm_89 and
    sm_86, in a process of its own)."""
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").is_file():
        pytest.skip("this Triton wheel brings no ptxas")
    result = subprocess.run([sys.executable, str(REPO / "tests" / "hopper_compile.py"), family],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_the_one_row_gemvs_compile_for_hopper_without_register_spills() -> None:
    reports = compiled_kernels("gemv")
    assert len(reports) == 8 and [r for r in reports if r["spilled_bytes"]] == []
    assert {r["pdl_waits"] for r in reports} == {1}  # launched early, each waiting for the kernel before (kernels.pdl)
    # ... having read its first step of weights (the gated GEMV the gate's and the up's), which no kernel writes
    early = {r["kernel"]: r["loads_before_wait"] for r in reports}
    assert all(early[name] > 0 for name in early) and early["bf16 gemv gated"] == 2 * early["bf16 gemv plain"]


def test_every_quantized_matmul_kernel_compiles_for_hopper_without_register_spills() -> None:
    reports = compiled_kernels("quant")
    assert {r["kernel"].split("(")[0] for r in reports} >= {"int8 gemv", "int8 gemm", "int8 dequantize", "int4 gemv",
                                                            "int4 gemm", "int4 dequantize", "i8 split", "fp8e4nv split",
                                                            "u4 split", "fp8 activations", "split rows",
                                                            "i8 imma_rows", "u4 imma_rows", "i8 two-part split",
                                                            "u4 two-part split", "fp8e4nv two-part split",
                                                            "cublas_int8 combine", "i8 mixed", "u4 mixed",
                                                            "fp8e4nv mixed", "i8 mixed_tma", "u4 mixed_tma",
                                                            "fp8e4nv mixed_tma", "fp8e4nv scaled_rows", "fp8 norm",
                                                            "fp8 silu_and_mul", "bf16 silu_and_mul", "bf16 skinny",
                                                            "i8 skinny", "fp8e4nv skinny"}
    assert [r for r in reports if r["spilled_bytes"]] == []
    # split_gemm's kernels, the skinny GEMM, mixed_gemm's (not its TMA form, for prompts) and imma_gemm's are launched
    # early (kernels.pdl): each waits for the kernel before it before it reads anything, and lets the next one
    # launch once, after its loop
    splits = [r for r in reports
              if any(f" {name}(" in r["kernel"] for name in ("split", "scaled_rows", "skinny", "mixed", "imma_rows"))]
    assert len(splits) > 20 and all(r["pdl_waits"] == 1 and r["reads_before_wait"] == 0 for r in splits)
    assert all(r["pdl_launches"] == 1 for r in splits)
    # so are the kernels between them: the activations' quantizer, the norm and SiLU·up (in bf16 or to e4m3)
    between = [r for r in reports if r["kernel"].split("(")[0] in ("fp8 activations", "fp8 norm", "fp8 silu_and_mul",
                                                                   "bf16 silu_and_mul", "split rows",
                                                                   "cublas_int8 combine")]
    assert len(between) == 9 and all(r["pdl_waits"] == 1 and r["reads_before_wait"] == 0 for r in between)
    # split_gemm's fp8-activation kernel: FP8 wgmma on the weights as stored, nothing converted; its TMA form copies
    scaled = [r for r in reports if " scaled_rows(" in r["kernel"]]
    assert scaled and all(r["wgmma"] > 0 and r["int_to_float"] == 0 for r in scaled)
    assert {r["kernel"].endswith("tma=1)") for r in scaled} == {True, False}
    assert all((r["tma"] > 0) == r["kernel"].endswith("tma=1)") for r in scaled)
    # mixed_gemm: the weights reach Hopper's tensor cores as wgmma's register operand, int4's nibbles made floats
    # by their bits: no more int-to-float conversions (a sixteenth of the FMA rate) than int8's, whose weights the
    # compiler converts without them (the few left are the tile index's division)
    from xverse_serve.kernels import mixed_gemm

    mixed = [r for r in reports if " mixed(" in r["kernel"]]
    assert len(mixed) == 3 * len(mixed_gemm.CONFIGS) and all(r["wgmma"] > 0 for r in mixed)
    conversions = {r["kernel"]: r["int_to_float"] for r in mixed}
    assert all(conversions[name] <= conversions["i8" + name[2:]] <= 2 for name in conversions if name[:2] == "u4")
    # its TMA kernel: the tiles copied by the tensor memory accelerator, into the same register-operand dots
    tma = [r for r in reports if " mixed_tma(" in r["kernel"]]
    assert len(tma) == 6 and all(r["wgmma"] > 0 and r["tma"] > 0 for r in tma)
    assert all(r["int_to_float"] <= 1 for r in tma if r["kernel"].startswith("u4"))


def test_each_kernel_compiles_for_the_consumer_cards_as_it_launches_there() -> None:
    # The 24 GB cards the README serves quantized models on, which the GPU tests never run: Ada (sm_89: RTX 4090,
    # L4) and Ampere (sm_86: RTX 3090, A10). One configuration of each kernel, without PDL or TMA (Hopper's), e4m3
    # on Ada only.
    reports = compiled_kernels("consumer")
    cards = {capability: {r["kernel"].split(" ", 1)[1] for r in reports if r["kernel"].startswith(f"sm_{capability} ")}
             for capability in (89, 86)}
    assert len(cards[89]) >= 40 and cards[86] == {name for name in cards[89] if "fp8" not in name}
    assert {"i8 split", "u4 mixed", "fp8e4nv scaled_rows", "int4 dp4a", "bf16 gemv plain"} <= {
        name.split("(")[0].split(" K=")[0] for name in cards[89]}
    assert all(r["pdl_waits"] == 0 and r["tma"] == 0 and r["wgmma"] == 0 for r in reports)
    # no register spills but one: one-sequence decode attention on an int8 cache, its first tile read early
    # (PRELOAD, as on Hopper), spills 16 bytes on both
    spilled = {r["kernel"]: r["spilled_bytes"] for r in reports if r["spilled_bytes"]}
    assert spilled == {f"sm_{capability} decode attention, i8 cache, lanes=False": 16 for capability in (89, 86)}


def test_the_tuners_candidates_can_be_compiled_side_by_side_first(monkeypatch: pytest.MonkeyPatch) -> None:
    # tuner.compile_candidates calls every candidate but cuBLAS's once at each size from a pool of threads
    # before the tuner times them: each call must happen, two at once (a barrier that one thread alone would never
    # pass), a failing one must not stop the rest, and with fewer than two threads nothing is called.
    import threading

    from xverse_serve.model import tuner

    layer = QuantizedLinear(256, 128, "int8")
    calls: list[tuple] = []
    both_running = threading.Barrier(2, timeout=10)

    class Recorder:
        def __init__(self, name: str, backend: str = "mixed") -> None:
            self.name, self.backend = name, backend

        def __call__(self, x: torch.Tensor, called: QuantizedLinear) -> torch.Tensor:
            # recorded, not asserted here: compile_candidates swallows what a call raises
            calls.append((x.shape[0], self.name, x.shape[1], x.dtype, called is layer))
            if self.name == "first":
                both_running.wait()  # returns only once another call waits beside it
            if self.name == "failing":
                raise RuntimeError("out of resources")
            return x

    def candidates(layer: QuantizedLinear, m: int, dtype: torch.dtype) -> list[Recorder]:
        return [Recorder("first"), Recorder("failing"), Recorder("cuBLAS", "scaled_mm"), Recorder("first"),
                Recorder("cuBLAS", "dequantize")]

    monkeypatch.setattr(tuner, "candidates", candidates)
    tuner.compile_candidates(layer, torch.bfloat16, [1, 8], threads=1)
    assert calls == []
    tuner.compile_candidates(layer, torch.bfloat16, [1, 8], threads=2)
    assert sorted(call[:2] for call in calls) == sorted((m, name) for m in (1, 8)
                                                        for name in ("first", "failing", "first"))
    assert {call[2:] for call in calls} == {(256, torch.bfloat16, True)}
    assert not both_running.broken  # the "first" calls ran two at a time
    monkeypatch.setenv("XVERSE_COMPILE_THREADS", "eight")
    with pytest.raises(ValueError, match="XVERSE_COMPILE_THREADS takes a number of threads"):
        tuner._compile_threads()
    monkeypatch.setenv("XVERSE_COMPILE_THREADS", "0")
    assert tuner._compile_threads() == 0
    monkeypatch.delenv("XVERSE_COMPILE_THREADS")
    monkeypatch.setattr(tuner, "_usable_cpus", lambda: 16)
    assert tuner._compile_threads() == 8
    monkeypatch.setattr(tuner, "_usable_cpus", lambda: 2)
    assert tuner._compile_threads() == 2
    monkeypatch.undo()
    assert 1 <= tuner._usable_cpus() <= (os.cpu_count() or 1)


def test_the_tuner_keeps_the_fastest_right_kernel_per_size(monkeypatch: pytest.MonkeyPatch) -> None:
    # tuner.measure_plan with made-up kernels and timings: at each size the fastest kernel whose product is right,
    # a faster wrong one rejected and a failing one recorded, neighbouring sizes with the same kernel merged into
    # one entry (the largest M it serves), and the PyTorch reference where nothing works.
    from xverse_serve.model import tuner

    layer = QuantizedLinear(256, 128, "int8")
    layer.load_rows(0, torch.randn(128, 256, generator=torch.Generator().manual_seed(5)) * 0.05)
    last_call: list = [None, 0]  # the kernel and rows of the latest call, which the fake time_call times

    class Fake:
        backend, options, takes_fp8_rows = "mixed", (), False

        def __init__(self, name: str, ms: dict[int, float], wrong: bool = False) -> None:
            self.name, self.ms, self.wrong = name, ms, wrong  # a size missing from ms: the kernel raises there

        def __call__(self, x: torch.Tensor, called: QuantizedLinear) -> torch.Tensor:
            last_call[:] = [self, x.shape[0]]
            if x.shape[0] not in self.ms:
                raise RuntimeError("out of resources\nmore")
            y = reference_matmul(x, called)
            return y * 1.5 if self.wrong else y

        def __str__(self) -> str:
            return self.name

    def time_call(fn, flush: torch.Tensor, graph: bool = True) -> float:
        fn()
        kernel, m = last_call
        return kernel.ms[m]

    fast_wrong = Fake("fast_wrong", {1: 0.001, 2: 0.001, 4: 0.001, 8: 0.001}, wrong=True)
    small = Fake("small", {1: 0.010, 2: 0.012, 4: 0.030})
    large = Fake("large", {1: 0.020, 2: 0.020, 4: 0.020})
    monkeypatch.setattr(tuner, "TUNE_SIZES", (1, 2, 4, 8))
    monkeypatch.setattr(tuner, "L2_FLUSH_BYTES", 1024)
    monkeypatch.setattr(tuner, "candidates", lambda layer, m, dtype: [fast_wrong, small, large])
    monkeypatch.setattr(tuner, "time_call", time_call)
    plan, timings = tuner.measure_plan(layer, torch.float32)
    assert plan == ((2, small), (4, large), (8, MatmulKernel("reference")))
    assert kernel_for(plan, 3) is large and kernel_for(plan, 100) == MatmulKernel("reference")
    assert timings[1] == {"fast_wrong": timings[1]["fast_wrong"], "small": 0.010, "large": 0.020}
    assert timings[1]["fast_wrong"] == "rejected: relative error 5.00e-01"
    assert timings[8]["small"] == "failed: RuntimeError: out of resources"


def test_the_tuner_times_fp8_activation_kernels_on_handed_over_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    # Where the model hands a projection its activations quantized (the norm or SiLU·up before it), the tuner gives
    # the kernels that take Fp8Rows the rows as quantize_activations_fp8 makes them, outside the timed call, and
    # the others x itself; without the handover every kernel gets x. The plan's key tells the two apart.
    from xverse_serve.model import tuner
    from xverse_serve.model.quantization import quantize_activations_fp8

    layer = QuantizedLinear(256, 128, "fp8")
    layer.load_rows(0, torch.randn(128, 256, generator=torch.Generator().manual_seed(5)) * 0.05)
    given: dict[str, list] = {"scaled_mm": [], "skinny": []}

    class Fake:
        options = ()

        def __init__(self, backend: str) -> None:
            self.backend, self.takes_fp8_rows = backend, backend == "scaled_mm"

        def __call__(self, x, called: QuantizedLinear) -> torch.Tensor:
            given[self.backend].append(x)
            if isinstance(x, Fp8Rows):
                return reference_matmul(x.values.float() * x.scale, called)
            return reference_matmul(x, called)

        def __str__(self) -> str:
            return self.backend

    monkeypatch.setattr(tuner, "TUNE_SIZES", (1, 2))
    monkeypatch.setattr(tuner, "L2_FLUSH_BYTES", 1024)
    monkeypatch.setattr(tuner, "COMPILE_THREADS", 0)
    monkeypatch.setattr(tuner, "candidates", lambda layer, m, dtype: [Fake("scaled_mm"), Fake("skinny")])
    monkeypatch.setattr(tuner, "time_call", lambda fn, flush, graph=True: fn() is None or 0.01)
    layer.fp8_input_handed_over = True
    tuner.measure_plan(layer, torch.float32)
    assert all(isinstance(x, Fp8Rows) for x in given["scaled_mm"]) and len(given["scaled_mm"]) == 4  # check, time
    assert all(isinstance(x, torch.Tensor) for x in given["skinny"])
    x = given["skinny"][0]
    values, scale = quantize_activations_fp8(x)
    rows = given["scaled_mm"][0]
    assert torch.equal(rows.values.view(torch.uint8), values.view(torch.uint8)) and torch.equal(rows.scale, scale)
    assert rows.dtype == torch.float32
    layer.fp8_input_handed_over = False
    given["scaled_mm"].clear()
    tuner.measure_plan(layer, torch.float32)
    assert given["scaled_mm"] and all(isinstance(x, torch.Tensor) for x in given["scaled_mm"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "card")
    handed_over = tuner.plan_key(layer, torch.bfloat16)
    layer.fp8_input_handed_over = True
    assert tuner.plan_key(layer, torch.bfloat16) != handed_over


@pytest.mark.parametrize("fused", [True, False])
def test_the_fp8_projections_after_a_norm_or_silu_are_marked_as_handed_over(tiny_model_dir: Path, fused: bool,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from xverse_serve.model import xverse

    monkeypatch.setattr(xverse, "FP8_FUSED_QUANT", fused)
    model = load_model(tiny_model_dir, load_config(tiny_model_dir), CPU, torch.bfloat16, MAX_POSITIONS, "fp8")
    layer = model.model.layers[0]
    marked = [projection.fp8_input_handed_over for projection in layer.projections()]
    assert marked == ([True, False, True, True] if fused else [False] * 4)  # qkv, o, gate_up, down
    assert not model.lm_head.fp8_input_handed_over
    int8 = load_model(tiny_model_dir, load_config(tiny_model_dir), CPU, torch.bfloat16, MAX_POSITIONS, "int8")
    assert not any(projection.fp8_input_handed_over for projection in int8.model.layers[0].projections())


def test_the_tuner_leaves_out_disabled_kernels_and_names_one_that_hangs(monkeypatch: pytest.MonkeyPatch,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    # XVERSE_DISABLED_KERNELS: its backends are never called or timed; an unknown name or `reference` (the fallback)
    # is refused with the list of names. A candidate still running after HANG_WARNING_S is named in the log, with
    # the setting that leaves it out, and a quick one is not.
    import logging
    import time

    from xverse_serve.model import tuner

    monkeypatch.setenv("XVERSE_DISABLED_KERNELS", " imma_rows, mixed ,")
    assert tuner._disabled_kernels() == {"imma_rows", "mixed"}
    for wrong in ("mixd", "reference,split"):
        monkeypatch.setenv("XVERSE_DISABLED_KERNELS", wrong)
        with pytest.raises(ValueError, match=r"takes kernel backends separated by commas, of gemv, gemm, .*; got "):
            tuner._disabled_kernels()
    monkeypatch.delenv("XVERSE_DISABLED_KERNELS")
    assert tuner._disabled_kernels() == frozenset()

    layer = QuantizedLinear(256, 128, "int8")
    layer.load_rows(0, torch.randn(128, 256, generator=torch.Generator().manual_seed(5)) * 0.05)
    called: list[str] = []

    class Fake:
        options, takes_fp8_rows = (), False

        def __init__(self, backend: str, seconds: float = 0.0) -> None:
            self.backend, self.seconds = backend, seconds

        def __call__(self, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
            called.append(self.backend)
            time.sleep(self.seconds)
            return reference_matmul(x, layer)

        def __str__(self) -> str:
            return f"{self.backend}(slow)" if self.seconds else self.backend

    monkeypatch.setattr(tuner, "TUNE_SIZES", (1,))
    monkeypatch.setattr(tuner, "L2_FLUSH_BYTES", 1024)
    monkeypatch.setattr(tuner, "candidates", lambda layer, m, dtype: [Fake("mixed"), Fake("split", 0.5)])
    monkeypatch.setattr(tuner, "time_call", lambda fn, flush, graph=True: fn() is None or 0.01)
    monkeypatch.setattr(tuner, "HANG_WARNING_S", 0.2)
    monkeypatch.setattr(tuner, "COMPILE_THREADS", 0)
    monkeypatch.setattr(tuner, "DISABLED_KERNELS", frozenset({"mixed"}))
    with caplog.at_level(logging.WARNING, logger=tuner.__name__):
        plan, timings = tuner.measure_plan(layer, torch.float32)
    assert set(called) == {"split"} and set(timings[1]) == {"split(slow)"}
    assert plan[0][1].backend == "split"
    warnings = [record.getMessage() for record in caplog.records]
    assert warnings == ["tuning the int8 128x256 matmul at M=1: split(slow) has not finished after 0.2 s; if the "
                        "start hangs here, XVERSE_DISABLED_KERNELS=split leaves it out"] * len(warnings)
    assert len(warnings) in (1, 2)  # the check's call, and the timing's if this machine is slow
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=tuner.__name__), tuner.hang_warning("quick", "split", 0.2):
        pass
    time.sleep(0.3)
    assert not caplog.records


@pytest.mark.skipif(INTERPRET, reason="the tuner's candidates run on CUDA")
@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_candidates_compiled_side_by_side_give_the_plans_products(scheme: str) -> None:
    # After the threads' pass, each candidate the tuner keeps multiplies as the reference does.
    from xverse_serve.model import quantization, tuner

    if scheme == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores: compute capability 8.9+")
    layer = QuantizedLinear(1024, 640, scheme).to(DEVICE)
    layer.load_rows(0, torch.randn(640, 1024, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16) * 0.03)
    tuner.compile_candidates(layer, torch.bfloat16, [1, 2, 40], threads=4)
    plan, _ = tuner.measure_plan(layer, torch.bfloat16)
    for m in (1, 2, 40):
        x = torch.randn(m, 1024, device=DEVICE).to(torch.bfloat16)
        kernel = next(kernel for bound, kernel in plan if m <= bound)
        error = quantization.relative_error(kernel(x, layer), reference_matmul(x, layer))
        assert error < quantization.tolerance(torch.bfloat16, kernel), (str(kernel), error)
