"""kernels.dp4a_gemv: one-row projections on int8 and int4 weights through integer dot products.

What is specified here: quantize_row keeps every activation within max|x| / 64,516 (two int8 parts), or for int4
weights with act_block within max|x_b| / 254 of its block b (one part, a scale per block), packed in the order each
weight format's words need; where the activations are exactly representable the GEMVs are exact
(which pins the byte and nibble order); otherwise they equal the float32 reference to the activations' rounding;
the tuner offers them for 1 to MAX_ROWS rows of bf16 or fp16 only; several rows are each computed as one row
alone is; they compile for sm_90 with dp4a and without spills.
Runs in Triton's interpreter on CPU (dp4a computed from the bytes) and compiled on a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = torch.device("cpu" if INTERPRET else "cuda")

pytest.importorskip("triton")

from test_quantization import compiled_kernels, gaussian, quantized_layer  # noqa: E402
from test_triton_ops import interpreter_rounds_bfloat16  # noqa: E402,F401  (autouse: bf16 rounding as on GPUs)

from xverse_serve.kernels import dp4a_gemv  # noqa: E402
from xverse_serve.model.quantization import (  # noqa: E402
    INT4_GROUP,
    MatmulKernel,
    QuantizedLinear,
    candidates,
    dp4a_kernel,
    reference_matmul,
    relative_error,
)
from xverse_serve.model.xverse import rms_norm_reference  # noqa: E402

BOUND = 1 / 64516  # of max|x|, per activation


def decode(words: torch.Tensor, scale: torch.Tensor, k: int, int4: bool, act_block: int = 0) -> torch.Tensor:
    """quantize_row's words of one row back to the activations they stand for, in x's order."""
    if act_block:  # one part, a scale per block
        value = words.contiguous().view(torch.int8).float()
    else:
        parts = words.view(2, -1).contiguous().view(torch.int8).float()  # [hi, lo] bytes, little-endian
        value = (parts[0] + parts[1] / 254) * scale
    if int4:
        even, odd = value.view(2, k // 8, 4)  # byte i of word j: element 8j + 2i (even words), 8j + 2i + 1 (odd)
        value = torch.stack((even, odd), dim=-1).reshape(k)
    return (value.view(-1, act_block) * scale.view(-1, 1)).view(k) if act_block else value


@pytest.mark.parametrize("int4", [False, True], ids=["int8 order", "int4 order"])
@pytest.mark.parametrize("k", [384, 1152])
def test_quantize_row_keeps_each_activation_within_its_bound(int4: bool, k: int) -> None:
    x = gaussian(2, k, seed=k)
    x[0, 5] = 300.0  # an outlier sets the scale
    words, scale, sums = dp4a_gemv.quantize_row(x.to(DEVICE), int4=int4)
    assert words.shape == (2, k // 2) and words.dtype == torch.int32 and scale.shape == (2,)
    for row in range(2):
        largest = x[row].abs().max()
        assert scale[row].item() == pytest.approx(largest.item() / 127, rel=1e-6)
        error = (decode(words[row].cpu(), scale[row].item(), k, int4) - x[row]).abs().max()
        assert error <= largest * BOUND * 1.001, (row, error)
    if int4:
        assert torch.allclose(sums.cpu(), x.view(2, -1, INT4_GROUP).sum(-1), rtol=1e-5, atol=1e-4)
    else:
        assert sums is None


@pytest.mark.parametrize("act_block", [32, 128])
def test_one_part_activations_keep_each_within_its_blocks_bound(act_block: int) -> None:
    k = 3 * INT4_GROUP
    x = gaussian(2, k, seed=act_block)
    x[0, 5] = 300.0  # an outlier sets its block's scale only
    words, scale, sums = dp4a_gemv.quantize_row(x.to(DEVICE), int4=True, act_block=act_block)
    assert words.shape == (2, k // 4) and scale.shape == (2, k // act_block)
    for row in range(2):
        largest = x[row].view(-1, act_block).abs().amax(dim=1)
        torch.testing.assert_close(scale[row].cpu(), largest / 127, rtol=1e-6, atol=0)
        decoded = decode(words[row].cpu(), scale[row].cpu(), k, True, act_block)
        assert ((decoded - x[row]).view(-1, act_block).abs() <= largest[:, None] / 254 * 1.001).all(), row
        # the groups' sums are of the activations as quantized (the GEMV's product is then exact for them)
        assert torch.allclose(sums[row].cpu(), decoded.view(-1, INT4_GROUP).sum(-1), rtol=1e-5, atol=1e-4)
    for int4, block in ((False, 32), (True, 256), (True, 24)):
        with pytest.raises(ValueError, match="one-part activations"):
            dp4a_gemv.quantize_row(x.to(DEVICE), int4=int4, act_block=block)


def test_a_row_of_zeros_quantizes_to_zeros() -> None:
    words, scale, _ = dp4a_gemv.quantize_row(torch.zeros(1, 256, device=DEVICE))
    assert scale.item() == 0 and not words.any()
    y = dp4a_gemv.int8_gemv(torch.zeros(1, 256, device=DEVICE), torch.ones(8, 256, dtype=torch.int8, device=DEVICE),
                            torch.ones(8, device=DEVICE))
    assert not y.any()


def exact_activations(k: int, seed: int) -> torch.Tensor:
    """Integers in [-127, 127] times 2^-3 with 127 in every block of 32: every scale (a row's or a block's) is 2^-3
    and every part exact."""
    x = torch.randint(-127, 128, (1, k), generator=torch.Generator().manual_seed(seed)).float()
    x[0, ::32] = 127
    return x / 8


def test_int8_gemv_is_exact_on_exact_activations() -> None:
    n, k = 70, 416  # rows and words that fill no whole block
    weight = torch.randint(-127, 128, (n, k), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    x = exact_activations(k, seed=2)
    expected = x.double() @ weight.double().T
    y = dp4a_gemv.int8_gemv(x.to(DEVICE), weight.to(DEVICE), torch.ones(n, device=DEVICE))
    assert torch.equal(y.cpu().double(), expected)


@pytest.mark.parametrize("act_block", [0, 32])
def test_int4_gemv_is_exact_on_exact_activations(act_block: int) -> None:
    n, k = 70, 3 * INT4_GROUP  # three groups: no whole block of four
    packed = torch.randint(0, 256, (n, k // 2), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    scale = torch.full((n, 3), 0.5, dtype=torch.float16)
    offset = torch.full((n, 3), -4.0, dtype=torch.float16)
    q = torch.stack((packed & 0xF, packed >> 4), dim=-1).view(n, k).double()  # low nibble first
    x = exact_activations(k, seed=4)
    expected = x.double() @ (q * 0.5 - 4).T
    y, _ = dp4a_gemv.fused_gemv(x.to(DEVICE), packed.to(DEVICE), scale.to(DEVICE), offset.to(DEVICE),
                                act_block=act_block)
    assert torch.equal(y.cpu().double(), expected)


@pytest.mark.parametrize(("scheme", "act_block"), [("int8", 0), ("int4", 0), ("int4", 32)])
def test_the_dp4a_kernel_equals_the_float32_reference(scheme: str, act_block: int) -> None:
    k = 3 * INT4_GROUP + (32 if scheme == "int8" else 0)
    layer = quantized_layer(scheme, 70, k, seed=5, device=DEVICE)
    x = gaussian(1, k, seed=6)
    x[0, 7] = 30.0  # an outlier: with two parts the other activations keep max|x| / 64,516, with one its block's / 254
    kernel = MatmulKernel("dp4a", (("act_block", act_block),) if act_block else ())
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        xd = x.to(dtype).to(DEVICE)
        y = kernel(xd.view(1, 1, k), layer)  # any leading shape
        assert y.shape == (1, 1, 70) and y.dtype == dtype
        # the activations' rounding (two parts, or one part per block: mostly the outlier's block), or the output's
        bound = 2e-2 if act_block else 2e-4 if dtype == torch.float32 else 5e-3
        assert relative_error(y.view(1, 70), reference_matmul(xd, layer)) < bound


@pytest.mark.parametrize(("scheme", "act_block"), [("int8", 0), ("int4", 0), ("int4", 32)])
@pytest.mark.parametrize("rows", [2, 5])
def test_several_rows_each_equal_their_one_row_product(scheme: str, act_block: int, rows: int) -> None:
    """matmul: each row of x quantized and multiplied as one row alone is (one launch for them all)."""
    k, n = 3 * INT4_GROUP, 70
    layer = quantized_layer(scheme, n, k, seed=21, device=DEVICE)
    operands = (layer.weight, layer.weight_scale, layer.weight_offset)
    x = (gaussian(rows, k, seed=rows) * 2).to(torch.bfloat16).to(DEVICE)
    x[-1, 3] = 40.0  # an outlier in one row changes no other row's scale
    y = dp4a_gemv.matmul(x.view(1, rows, k), *operands, act_block=act_block)
    assert y.shape == (1, rows, n) and y.dtype == torch.bfloat16
    for row in range(rows):
        alone, _ = dp4a_gemv.fused_gemv(x[row], *operands, act_block=act_block)
        assert torch.equal(y[0, row], alone), row
    bound = 2e-2 if act_block else 5e-3
    assert relative_error(y.view(rows, n), reference_matmul(x, layer)) < bound
    with pytest.raises(ValueError, match="rows"):
        dp4a_gemv.matmul(gaussian(dp4a_gemv.MAX_ROWS + 1, k, seed=1).to(DEVICE), *operands)


@pytest.mark.parametrize("int4", [False, True], ids=["int8 order", "int4 order"])
def test_quantize_row_with_a_norm_quantizes_the_rows_rms_norm(int4: bool) -> None:
    k = 3 * INT4_GROUP
    x = (gaussian(2, k, seed=11) * 3).to(torch.bfloat16)
    weight = (1 + gaussian(k, seed=12) / 4).to(torch.bfloat16)
    normed = rms_norm_reference(x, weight, 1e-6).float()  # rounded to bf16 as the norm kernel rounds
    words, scale, sums = dp4a_gemv.quantize_row(x.to(DEVICE), int4=int4, norm_weight=weight.to(DEVICE), eps=1e-6)
    for row in range(2):
        largest = normed[row].abs().max()
        assert scale[row].item() == pytest.approx(largest.item() / 127, rel=1e-2)
        error = (decode(words[row].cpu(), scale[row].cpu(), k, int4) - normed[row]).abs().max()
        # the activations' bound, and a bf16 rounding where the variance's last bit differs from the reference's
        assert error <= largest * BOUND * 1.001 + normed[row].abs().max() * 2 ** -8, row
    if int4:
        assert torch.allclose(sums.cpu(), normed.view(2, -1, INT4_GROUP).sum(-1), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="norm's weight"):
        dp4a_gemv.quantize_row(x.to(DEVICE), norm_weight=weight[:-4].to(DEVICE))


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.float().chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@pytest.mark.parametrize(("scheme", "act_block"), [("int8", 0), ("int4", 0), ("int4", 32)])
def test_the_fused_forms_equal_their_unfused_references(scheme: str, act_block: int) -> None:
    """What the one-row path runs (one_row.py): the norm in the quantizing kernel, silu(gate) * up and the
    residual add with its sums of squares in the GEMV's epilogue; for int4 with either form of activations."""
    k, n = 3 * INT4_GROUP, 70  # rows that fill no whole block
    layer = quantized_layer(scheme, 2 * n, k, seed=13, device=DEVICE)
    operands = (layer.weight, layer.weight_scale, layer.weight_offset)
    x = (gaussian(1, k, seed=14) * 2).to(torch.bfloat16)
    norm_weight = (1 + gaussian(k, seed=15) / 4).to(torch.bfloat16)
    residual = gaussian(n, seed=16).to(torch.bfloat16)
    normed = rms_norm_reference(x, norm_weight, 1e-5)
    products = reference_matmul(normed.to(DEVICE), layer).cpu()  # [1, 2n]: the gate's rows, then the up's

    y, squares = dp4a_gemv.fused_gemv(x.to(DEVICE), *operands, norm=(norm_weight.to(DEVICE), 1e-5),
                                      act_block=act_block)
    assert squares is None and y.dtype == torch.bfloat16
    bound = 1e-2 if act_block else 5e-3  # one part: the activations' rounding, or the output's
    assert relative_error(y.cpu(), products) < bound

    gated, _ = dp4a_gemv.fused_gemv(x.to(DEVICE), *operands, norm=(norm_weight.to(DEVICE), 1e-5), gated=True,
                                    act_block=act_block)
    assert gated.shape == (1, n)
    assert relative_error(gated.cpu(), silu_and_mul(products)) < 2 * bound

    half = quantized_layer(scheme, n, k, seed=17, device=DEVICE)
    summed, squares = dp4a_gemv.fused_gemv(x.to(DEVICE), half.weight, half.weight_scale, half.weight_offset,
                                           residual=residual.to(DEVICE), act_block=act_block)
    expected = reference_matmul(x.to(DEVICE), half)[0].cpu() + residual.float()
    assert relative_error(summed.cpu().view(n), expected) < bound
    block_n = (dp4a_gemv.INT4_CONFIG if scheme == "int4" else dp4a_gemv.INT8_CONFIG)[0]
    assert squares.shape == (-(-n // block_n),)  # one per program, as kernels.gemv.add_gemv leaves them
    assert squares.sum().item() == pytest.approx(summed.float().pow(2).sum().item(), rel=1e-4)
    with pytest.raises(ValueError, match="residual"):
        dp4a_gemv.fused_gemv(x.to(DEVICE), *operands, residual=residual.to(DEVICE))  # 2n rows, n residuals


@pytest.mark.parametrize(("scheme", "act_block"), [("int8", 0), ("int4", 0), ("int4", 32)])
def test_split_k_sums_the_slices_of_k_as_one_launch_would(scheme: str, act_block: int) -> None:
    """split_k: each slice's programs add their sums, the last to arrive stores, with every fusion; the scratch is
    left zero, so launches one after another (as a decode step's are) stay right. K of 7 groups (int4: 2 steps of 4
    groups) or 232 words (int8: 4 steps of 64): slices of unequal and masked steps."""
    k, n = 7 * INT4_GROUP + (32 if scheme == "int8" else 0), 70
    layer = quantized_layer(scheme, 2 * n, k, seed=31, device=DEVICE)
    operands = (layer.weight, layer.weight_scale, layer.weight_offset)
    half = quantized_layer(scheme, n, k, seed=32, device=DEVICE)
    x = (gaussian(1, k, seed=33) * 2).to(torch.bfloat16).to(DEVICE)
    norm = ((1 + gaussian(k, seed=34) / 4).to(torch.bfloat16).to(DEVICE), 1e-5)
    residual = gaussian(n, seed=35).to(torch.bfloat16).to(DEVICE)
    for split_k in (1, 3, 8):  # 8: more slices than steps, so fewer are launched
        plain, _ = dp4a_gemv.fused_gemv(x, *operands, norm=norm, act_block=act_block, split_k=split_k)
        gated, _ = dp4a_gemv.fused_gemv(x, *operands, norm=norm, gated=True, act_block=act_block, split_k=split_k)
        summed, squares = dp4a_gemv.fused_gemv(x, half.weight, half.weight_scale, half.weight_offset,
                                               residual=residual, act_block=act_block, split_k=split_k)
        rows = dp4a_kernel(act_block, split_k)(x.expand(3, k), layer)  # the tuner's candidate: dp4a_gemv.matmul
        if split_k == 1:
            expected = (plain, gated, summed, rows, squares)
            continue
        # float32 sums in another order: within a rounding of bf16 outputs
        for got, want in zip((plain, gated, summed, rows), expected):
            assert relative_error(got.float(), want.float()) < 1e-2, split_k
        assert torch.allclose(squares, expected[-1], rtol=2e-2)
        if scheme == "int4":  # other groups a step (block_g): 2 (four steps, some slices masked), 32 (one step)
            for block_g in (2, 32):
                got = dp4a_kernel(act_block, split_k, block_g)(x.expand(2, k), layer)
                assert relative_error(got.float(), expected[3][:2].float()) < 1e-2, (split_k, block_g)
        partial, count = dp4a_gemv._SCRATCH[x.device]
        assert not partial.any() and not count.any(), split_k


def test_the_split_k_scratch_is_kept_when_outgrown(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA graph keeps the scratch it was captured with: a larger launch gets a new one, the old stays alive."""
    monkeypatch.setattr(dp4a_gemv, "_SCRATCH", {})
    monkeypatch.setattr(dp4a_gemv, "_OUTGROWN", [])
    partial, count = dp4a_gemv.split_scratch(DEVICE, 1, 100, 13)
    assert partial.shape == (1, 100) and count.shape == (1, 13) and not partial.any() and not count.any()
    assert dp4a_gemv.split_scratch(DEVICE, 8, 100, 13)[0].data_ptr() == partial.data_ptr()  # MAX_ROWS from the first
    grown, _ = dp4a_gemv.split_scratch(DEVICE, 2, dp4a_gemv.SCRATCH_MIN_ROWS * dp4a_gemv.MAX_ROWS, 13)
    assert grown.data_ptr() != partial.data_ptr()
    assert dp4a_gemv._OUTGROWN[0][0].data_ptr() == partial.data_ptr()


def test_the_tuner_offers_dp4a_up_to_max_rows_of_bf16_or_fp16_for_int8_and_int4() -> None:
    assert "dp4a(act_block=32)" in {str(k) for k in candidates(QuantizedLinear(4096, 4096, "int4"), 1)}
    assert "dp4a(act_block=32)" not in {str(k) for k in candidates(QuantizedLinear(4096, 4096, "int8"), 1)}
    for scheme in ("int8", "int4"):
        layer = QuantizedLinear(4096, 4096, scheme)
        assert "dp4a" in {k.backend for k in candidates(layer, 1)}
        assert "dp4a" in {k.backend for k in candidates(layer, 1, torch.float16)}
        assert "dp4a" in {k.backend for k in candidates(layer, dp4a_gemv.MAX_ROWS)}
        assert "dp4a" not in {k.backend for k in candidates(layer, dp4a_gemv.MAX_ROWS + 1)}
        assert "dp4a" not in {k.backend for k in candidates(layer, 1, torch.float32)}
    assert "dp4a" not in {k.backend for k in candidates(QuantizedLinear(4096, 4096, "fp8"), 1)}
    assert "dp4a" not in {k.backend for k in candidates(QuantizedLinear(4096, 4096, "int4", 64), 1)}


def test_bad_shapes_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        dp4a_gemv.quantize_row(torch.ones(1, 6))
    with pytest.raises(ValueError, match="one row of 8 values"):
        dp4a_gemv.int8_gemv(torch.ones(2, 8), torch.ones(4, 8, dtype=torch.int8), torch.ones(4))


def test_the_dp4a_kernels_compile_for_hopper_with_dp4a_and_without_register_spills() -> None:
    reports = {r["kernel"]: r for r in compiled_kernels("dp4a")}
    assert len(reports) == 32 and [r for r in reports.values() if r["spilled_bytes"]] == []
    shapes = [(k, form) for k, forms in ((4096, ("", " gated", " residual")), (11008, ("", " residual")))
              for form in forms]
    split = [(4096, " gated split4"), (4096, " residual split4"), (11008, " residual split4")]
    wide = ["int4 dp4a act32 K=4096 gated g32", "int4 dp4a act32 K=11008 residual split4 g32"]
    assert {name for name, r in reports.items() if r["dp4a"]} == {
        f"{kind} K={k}{form}" for kind in ("int8 dp4a", "int4 dp4a", "int4 dp4a act32") for k, form in shapes} | {
        f"{kind} K={k}{form}" for kind in ("int8 dp4a", "int4 dp4a act32") for k, form in split} | set(wide)
    # split-K: the sums and the count by atomics (the gated form: the gate's and the up's sums); K whole: none
    assert {name for name, r in reports.items() if r["atomics"]} == {
        f"{kind} K={k}{form}" for kind in ("int8 dp4a", "int4 dp4a act32") for k, form in split} | {wide[1]}
    # 32 groups a step: all of a thread's weight loads in one step (K = 4,096), in fewer instructions a weight
    assert reports[wide[0]]["instructions"] < reports["int4 dp4a act32 K=4096 gated"]["instructions"]
    for k, form in shapes:  # one part: half the dp4a, and fewer instructions in all
        two, one = reports[f"int4 dp4a K={k}{form}"], reports[f"int4 dp4a act32 K={k}{form}"]
        assert one["dp4a"] * 2 == two["dp4a"] and one["instructions"] < 0.9 * two["instructions"]
    assert {r["pdl_waits"] for r in reports.values()} == {1}  # launched early, each waiting for the one before
    # Before that wait a GEMV reads its first step of weights (int4: with their scales and offsets), the quantize
    # kernel nothing (it reads what the kernel before writes); at 32 groups a step all of a thread's weight loads
    # (8 for the gate, 8 for the up: K = 4,096 in one step) go out before it.
    early = {name: r["loads_before_wait"] for name, r in reports.items()}
    assert all((early[name] == 0) == name.startswith("quantize_row") for name in early), early
    assert early[wide[0]] >= 16  # at 4 groups a step, a weight load and the scales' and offsets' (gated: twice)
    assert all(early[name] == (6 if "gated" in name else 3) for name in early if name.startswith("int4 dp4a K="))
