"""triton_gemv's kernels (the one-row GEMV, the skinny GEMM for up to 32 rows) against float32 products: in
Triton's interpreter on the CPU, compiled on a GPU. Shapes whose rows or columns do not fill whole blocks
included."""

from __future__ import annotations

import os

import pytest
import torch
from test_triton_ops import interpreter_rounds_bfloat16  # noqa: E402,F401  (autouse: bf16 rounding as on GPUs)

from xverse_serve.model.xverse import Linear

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cpu" if INTERPRET else "cuda")
triton_gemv = pytest.importorskip("xverse_serve.kernels.gemv")

SHAPES = [(64, 512), (37, 100), (5, 1024), (130, 1536)]
CONFIGS = [(4, 512, 4, 1), (16, 256, 4, 2), (4, 128, 8, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize(("n", "k"), SHAPES, ids=str)
def test_gemv_equals_a_float32_product(n: int, k: int, config: tuple, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(n * k)
    weight = torch.randn(n, k, generator=gen).to(dtype).to(DEVICE)
    x = torch.randn(1, k, generator=gen).to(dtype).to(DEVICE)
    reference = (x.float() @ weight.float().T)
    out = triton_gemv.gemv(x, weight, config)
    assert out.shape == (1, n) and out.dtype == dtype
    # float32 accumulation in another order; bf16 adds its one rounding of the result
    tolerance = 1e-5 if dtype == torch.float32 else 8e-3
    assert ((out.float() - reference).norm() / reference.norm()).item() < tolerance


def test_gemv_takes_strided_rows_and_refuses_more_than_one() -> None:
    weight = torch.randn(24, 64).to(DEVICE)
    x = torch.randn(64, 2).to(DEVICE)[:, 0]  # a strided view of one row
    torch.testing.assert_close(triton_gemv.gemv(x, weight), weight @ x, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one row"):
        triton_gemv.gemv(torch.randn(2, 64).to(DEVICE), weight)


@pytest.mark.skipif(INTERPRET, reason="the model's Linear uses the GEMV on CUDA only")
def test_the_models_linear_uses_the_gemv_kernels_for_up_to_32_bf16_rows_on_the_gpu() -> None:
    layer = Linear(4096, 4096, bias=False).to(DEVICE, torch.bfloat16)
    x = torch.randn(1, 4096, device=DEVICE, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x), triton_gemv.gemv(x, layer.weight), rtol=0, atol=0)
    few = torch.randn(3, 4096, device=DEVICE, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(few), triton_gemv.skinny_matmul(few, layer.weight), rtol=0, atol=0)
    many = torch.randn(33, 4096, device=DEVICE, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(many), torch.nn.functional.linear(many, layer.weight), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [2, 7, 16, 17, 32])
@pytest.mark.parametrize(("n", "k"), [(64, 512), (37, 100), (130, 256)], ids=str)
def test_skinny_matmul_equals_a_float32_product(n: int, k: int, rows: int, dtype: torch.dtype) -> None:
    if INTERPRET and dtype == torch.bfloat16:
        pytest.skip("Triton 3.6's interpreter computes bf16 dots wrongly (numpy has no bf16); checked on the GPU")
    gen = torch.Generator().manual_seed(n + k + rows)
    weight = torch.randn(n, k, generator=gen).to(dtype).to(DEVICE)
    x = torch.randn(rows, k, generator=gen).to(dtype).to(DEVICE)
    reference = x.float() @ weight.float().T
    out = triton_gemv.skinny_matmul(x, weight, (32, 64, 4, 2))
    assert out.shape == (rows, n) and out.dtype == dtype
    # tensor-core dots of float32 inputs round them to tf32 on a GPU
    tolerance = (1e-5 if INTERPRET else 2e-3) if dtype == torch.float32 else 8e-3
    assert ((out.float() - reference).norm() / reference.norm()).item() < tolerance


def test_skinny_matmul_refuses_too_many_rows() -> None:
    with pytest.raises(ValueError, match="rows"):
        triton_gemv.skinny_matmul(torch.randn(33, 64).to(DEVICE), torch.randn(8, 64).to(DEVICE))


@pytest.mark.skipif(INTERPRET, reason="counts compiled kernels: on a GPU only")
def test_skinny_matmul_compiles_one_kernel_per_tile_height_whatever_the_rows() -> None:
    # Rows change step by step; a kernel compiled while serving stalls every request (about a second).
    weight = torch.randn(48, 192, device=DEVICE, dtype=torch.bfloat16)  # a K no other test compiles for
    compiled = triton_gemv._skinny_kernel.device_caches[torch.cuda.current_device()][0]
    before = len(compiled)
    for rows in range(2, triton_gemv.MAX_SKINNY_ROWS + 1):
        triton_gemv.skinny_matmul(torch.randn(rows, 192, device=DEVICE, dtype=torch.bfloat16), weight)
    assert len(compiled) - before == 2  # 16-row and 32-row tiles


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", [(4, 512, 4, 1), (2, 128, 8, 3)], ids=str)
@pytest.mark.parametrize(("inter", "k"), [(32, 512), (37, 100), (5, 1024)], ids=str)
def test_gated_gemv_is_the_gemv_then_silu_and_mul(inter: int, k: int, config: tuple, dtype: torch.dtype) -> None:
    from xverse_serve.kernels.fused_ops import silu_and_mul

    gen = torch.Generator().manual_seed(inter * k)
    weight = torch.randn(2 * inter, k, generator=gen).to(dtype).to(DEVICE)
    x = torch.randn(1, k, generator=gen).to(dtype).to(DEVICE)
    fused = triton_gemv.gated_gemv(x, weight, config)
    unfused = silu_and_mul(triton_gemv.gemv(x, weight, config))
    assert fused.shape == (1, inter) and fused.dtype == dtype
    # The same products summed in the same order, rounded where the unfused path stores: equal, up to the
    # order a compiled reduction may pick.
    torch.testing.assert_close(fused, unfused, rtol=0 if INTERPRET else 1e-2, atol=0 if INTERPRET else 1e-3)
    gate, up = (x.float() @ weight.float().T).chunk(2, dim=-1)
    reference = torch.nn.functional.silu(gate) * up
    assert ((fused.float() - reference).norm() / reference.norm()).item() < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.skipif(INTERPRET, reason="the model's Linear uses the GEMV on CUDA only")
def test_the_mlp_runs_one_bf16_row_through_the_gated_gemv() -> None:
    from xverse_serve.kernels.fused_ops import silu_and_mul
    from xverse_serve.model.checkpoint import ModelConfig
    from xverse_serve.model.xverse import MLP

    config = ModelConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_layers=1, num_heads=2,
                         max_position_embeddings=64, max_tokenizer_truncation=64, rms_norm_eps=1e-6,
                         rope_theta=10000.0, tie_word_embeddings=False, pad_token_id=1, bos_token_id=2, eos_token_id=3)
    mlp = MLP(config).to(DEVICE, torch.bfloat16)
    x = torch.randn(1, 256, device=DEVICE, dtype=torch.bfloat16)
    expected = mlp.down_proj(triton_gemv.gated_gemv(x, mlp.gate_up_proj.weight))
    torch.testing.assert_close(mlp(x), expected, rtol=0, atol=0)
    unfused = mlp.down_proj(silu_and_mul(mlp.gate_up_proj(x)))
    torch.testing.assert_close(mlp(x), unfused, rtol=2e-2, atol=2e-3)


def slice_squares(stream: torch.Tensor, block_n: int) -> torch.Tensor:
    """The float32 sum of squares of each block_n-long slice of a row, as add_gemv writes them."""
    values = stream.float().reshape(-1)
    padded = torch.nn.functional.pad(values, (0, -len(values) % block_n))
    return padded.view(-1, block_n).square().sum(dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", [(8, 512, 8, 2), (4, 128, 4, 1)], ids=str)
@pytest.mark.parametrize(("n", "k"), [(64, 512), (37, 100)], ids=str)
def test_add_gemv_is_the_gemv_then_the_residual_add(n: int, k: int, config: tuple, dtype: torch.dtype) -> None:
    from xverse_serve.kernels.fused_ops import fused_add_rms_norm

    gen = torch.Generator().manual_seed(n + k)
    weight = torch.randn(n, k, generator=gen).to(dtype).to(DEVICE)
    x = torch.randn(1, k, generator=gen).to(dtype).to(DEVICE)
    residual = (torch.randn(1, n, generator=gen) * 4).to(dtype).to(DEVICE)
    stream, squares = triton_gemv.add_gemv(x, weight, residual, config)
    # The unfused path: the GEMV's output, then the norm kernel's residual add (each rounded to dtype).
    _, expected = fused_add_rms_norm(triton_gemv.gemv(x, weight, config), residual, torch.ones(n, dtype=dtype,
                                     device=DEVICE), 1e-6)
    assert stream.shape == (1, n) and stream.dtype == dtype
    torch.testing.assert_close(stream, expected, rtol=0 if INTERPRET else 1e-2, atol=0 if INTERPRET else 1e-2)
    assert squares.shape == (-(-n // config[0]),) and squares.dtype == torch.float32
    torch.testing.assert_close(squares, slice_squares(stream, config[0]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("n", "k", "slice_rows"), [(64, 512, 8), (38, 100, 3)], ids=str)
def test_a_normed_gemv_is_the_rms_norm_then_the_gemv(n: int, k: int, slice_rows: int, dtype: torch.dtype,
                                                     gated: bool) -> None:
    from xverse_serve.kernels.fused_ops import silu_and_mul
    from xverse_serve.model.xverse import rms_norm_reference

    gen = torch.Generator().manual_seed(n * k + gated)
    weight = torch.randn(n, k, generator=gen).to(dtype).to(DEVICE)
    stream = (torch.randn(1, k, generator=gen) * 3).to(dtype).to(DEVICE)
    norm_weight = (1 + torch.randn(k, generator=gen) / 4).to(dtype).to(DEVICE)
    norm = triton_gemv.RowNorm(norm_weight, 1e-6, slice_squares(stream, slice_rows))
    config = (4, 128, 4, 1)
    normed = rms_norm_reference(stream, norm_weight, 1e-6)
    if gated:
        out, unfused = (triton_gemv.gated_gemv(stream, weight, config, norm),
                        silu_and_mul(triton_gemv.gemv(normed, weight, config)))
        gate, up = (normed.float() @ weight.float().T).chunk(2, dim=-1)
        reference = torch.nn.functional.silu(gate) * up
    else:
        out, unfused = triton_gemv.gemv(stream, weight, config, norm), triton_gemv.gemv(normed, weight, config)
        reference = normed.float() @ weight.float().T
    assert out.shape == unfused.shape and out.dtype == dtype
    # The variance is summed in another order than the reference's (float32), so a normalised value on a rounding
    # tie may round the other way: the products agree to about one bf16 rounding of a few of their terms.
    tolerance = 1e-5 if dtype == torch.float32 else 5e-3
    assert ((out.float() - unfused.float()).norm() / unfused.float().norm()).item() < tolerance
    assert ((out.float() - reference).norm() / reference.norm()).item() < (1e-5 if dtype == torch.float32 else 2e-2)


def test_gemv_refuses_a_norm_or_residual_of_the_wrong_size() -> None:
    weight = torch.randn(16, 64).to(DEVICE)
    x = torch.randn(1, 64).to(DEVICE)
    with pytest.raises(ValueError, match="norm's weight"):
        triton_gemv.gemv(x, weight, norm=triton_gemv.RowNorm(torch.ones(32).to(DEVICE), 1e-6, torch.ones(4).to(DEVICE)))
    with pytest.raises(ValueError, match="residual"):
        triton_gemv.add_gemv(x, weight, torch.randn(1, 64).to(DEVICE))


def int8_weight(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An int8 weight with its float32 row scales (model/quantization.py's layout), and W dequantized in float32."""
    from xverse_serve.model.quantization import dequantize_int8, quantize_int8

    q, scale = quantize_int8(torch.randn(n, k, generator=gen))
    return q.to(DEVICE), scale.to(DEVICE), dequantize_int8(q, scale).to(DEVICE)


@pytest.mark.parametrize("via_bits", [True, False], ids=["via-bits", "converted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("n", "k"), [(64, 512), (37, 100), (130, 1536)], ids=str)
def test_int8_weights_give_the_products_of_their_dequantized_weights(n: int, k: int, dtype: torch.dtype,
                                                                     via_bits: bool, monkeypatch) -> None:
    """Every one-row kernel and the skinny GEMM take int8 rows with their scales: the values -128..127 widened
    (through the float's bits, or converted), the scale applied to each row's sum."""
    from xverse_serve.kernels.fused_ops import silu_and_mul

    monkeypatch.setattr(triton_gemv, "INT8_VIA_BITS", via_bits)

    gen = torch.Generator().manual_seed(n * k + 1)
    q, scale, w = int8_weight(n, k, gen)
    extremes = torch.tensor([-128, 127, -1, 0], dtype=torch.int8, device=DEVICE)  # they widen exactly
    q[0, :4] = extremes
    w[0, :4] = extremes.float() * scale[0]
    x = torch.randn(1, k, generator=gen).to(dtype).to(DEVICE)
    tolerance = 1e-5 if dtype == torch.float32 else 8e-3

    def close(out: torch.Tensor, reference: torch.Tensor, within: float = tolerance) -> bool:
        return ((out.float() - reference).norm() / reference.norm()).item() < within

    reference = x.float() @ w.T
    for config in (None, (4, 128, 4, 1), (16, 256, 8, 2)):
        out = triton_gemv.gemv(x, q, config, scale=scale)
        assert out.dtype == dtype and close(out, reference), config
    residual = torch.randn(1, n, generator=gen).to(dtype).to(DEVICE)
    stream, _ = triton_gemv.add_gemv(x, q, residual, scale=scale)
    assert close(stream, reference + residual.float())
    if n % 2 == 0:
        gated = triton_gemv.gated_gemv(x, q, scale=scale)
        assert close(gated, silu_and_mul(reference.to(dtype)).float())
    if not (INTERPRET and dtype == torch.bfloat16):  # the interpreter's bf16 dots: see the skinny test above
        rows = torch.randn(5, k, generator=gen).to(dtype).to(DEVICE)
        out = triton_gemv.skinny_matmul(rows, q, (32, 64, 4, 2), scale=scale)
        # tensor-core dots of float32 inputs round them to tf32 on a GPU
        assert close(out, rows.float() @ w.T, 2e-3 if dtype == torch.float32 and not INTERPRET else tolerance)


def test_a_scaled_weight_must_be_int8_with_a_float32_scale_per_row() -> None:
    x = torch.randn(1, 64).to(DEVICE)
    with pytest.raises(ValueError, match="int8"):
        triton_gemv.gemv(x, torch.randn(16, 64).to(DEVICE), scale=torch.ones(16).to(DEVICE))
    with pytest.raises(ValueError, match="float32 scale"):
        triton_gemv.gemv(x, torch.zeros(16, 64, dtype=torch.int8).to(DEVICE), scale=torch.ones(8).to(DEVICE))


def test_fp8_weights_take_their_own_tile_where_the_table_has_one(monkeypatch) -> None:
    """FP8_TABLES (a sweep of fp8's fused GEMVs) gives fp8 weights their tile, per kind of call and shape; int8 and
    shapes the table lacks keep the bf16 table's tile in bytes; the product is the same with either."""
    n, k = 48, 256
    tile = (2, 128, 4, 1)
    monkeypatch.setitem(triton_gemv.FP8_TABLES, "residual", {(n, k): tile})
    monkeypatch.setitem(triton_gemv.RESIDUAL_CONFIGS, (n, k), (4, 64, 4, 1))
    scale = torch.ones(n, device=DEVICE)
    fp8 = torch.zeros(n, k, dtype=torch.float8_e4m3fn, device=DEVICE)
    int8 = torch.zeros(n, k, dtype=torch.int8, device=DEVICE)
    assert triton_gemv._config(None, "residual", fp8, scale) == tile
    assert triton_gemv._config(None, "residual", int8, scale) == (4, 128, 4, 1)
    assert triton_gemv._config(None, "plain", fp8, scale) == triton_gemv.int8_config(triton_gemv.DEFAULT_CONFIG)
    assert triton_gemv._config((8, 64, 4, 1), "residual", fp8, scale) == (8, 64, 4, 1)

    from xverse_serve.model.quantization import dequantize_fp8, quantize_fp8

    gen = torch.Generator().manual_seed(5)
    q, scale = quantize_fp8(torch.randn(n, k, generator=gen))
    w = dequantize_fp8(q, scale).to(DEVICE)
    q, scale = q.to(DEVICE), scale.to(DEVICE)
    x = torch.randn(1, k, generator=gen).to(DEVICE)
    residual = torch.randn(1, n, generator=gen).to(DEVICE)
    reference = x @ w.T + residual
    for config in (None, (4, 64, 4, 1)):
        stream, _ = triton_gemv.add_gemv(x, q, residual, config, scale=scale)
        assert ((stream - reference).norm() / reference.norm()).item() < 1e-5


@pytest.fixture
def gemv_bench(monkeypatch):
    """bench/gemv_bench.py as a module, its folder on the path for this test only (it imports bench/common.py)."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    import gemv_bench

    return gemv_bench


def test_the_fp8_sweep_writes_its_winners_into_fp8_tables(gemv_bench) -> None:
    """bench/gemv_bench.py --write-tables: a case's best tile enters FP8_TABLES under its kind and shape only where
    it beat the module's tile by 2%, and the rest of kernels/gemv.py stays as it was."""
    import ast
    from pathlib import Path

    sweep = {"o_proj + residual": {"n": 4096, "k": 4096, "kind": "residual", "module_us": 10.0, "best_us": 9.7,
                                   "best_config": "(8, 1024, 8, 2)"},
             "qkv_proj normed": {"n": 12288, "k": 4096, "kind": "normed", "module_us": 10.0, "best_us": 9.9,
                                 "best_config": "(4, 1024, 4, 2)"}}
    tables = gemv_bench.winning_tables(sweep)
    assert tables == {"plain": {}, "gated": {}, "normed": {}, "residual": {(4096, 4096): (8, 1024, 8, 2)}}
    source = Path(triton_gemv.__file__).read_text()
    written = gemv_bench.with_fp8_tables(source, tables)
    node = next(node for node in ast.parse(written).body
                if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "FP8_TABLES")
    assert ast.literal_eval(node.value) == tables
    assert gemv_bench.with_fp8_tables(written, triton_gemv.FP8_TABLES) == source  # the module's own, written back


def test_the_fp8_sweep_runs_each_tile_as_the_one_row_path_calls_it(gemv_bench, monkeypatch) -> None:
    """bench/gemv_bench.py's fused fp8 sweep on small shapes (timings faked, later tiles faster): every tile's output
    agrees with the module's, and the winners land under each call's kind and shape."""
    hidden = 64
    shapes = {"qkv_proj": (3 * hidden, hidden), "o_proj": (hidden, hidden), "gate_up_proj": (4 * hidden, hidden),
              "down_proj": (hidden, 2 * hidden)}
    monkeypatch.setattr(gemv_bench, "HIDDEN", hidden)
    monkeypatch.setattr(gemv_bench, "PROJECTION_SHAPES", shapes)
    monkeypatch.setattr(gemv_bench, "FUSED_SCALED_SWEEP", [(2, 32, 4, 2), (4, 64, 4, 2)])
    calls = []

    def faster_each_call(fn, flush, **_) -> float:
        fn()
        calls.append(None)
        return 100.0 - len(calls)

    monkeypatch.setattr(gemv_bench, "cold_time_us", faster_each_call)
    sweep = gemv_bench.fused_scaled_sweep(DEVICE, torch.empty(1), "fp8")
    assert len(calls) == 4 * 3
    assert gemv_bench.winning_tables(sweep) == {
        "plain": {}, "gated": {(4 * hidden, hidden): (4, 64, 4, 2)}, "normed": {(3 * hidden, hidden): (4, 64, 4, 2)},
        "residual": {(hidden, hidden): (4, 64, 4, 2), (hidden, 2 * hidden): (4, 64, 4, 2)}}
