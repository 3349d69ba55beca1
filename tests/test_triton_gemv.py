"""The one-row Triton GEMV (triton_gemv.gemv) against a float32 matrix-vector product: in Triton's
interpreter on the CPU, compiled on a GPU. Shapes whose rows or columns do not fill whole blocks included."""

from __future__ import annotations

import os

import pytest
import torch

from xverse_serve.model import Linear

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cpu" if INTERPRET else "cuda")
triton_gemv = pytest.importorskip("xverse_serve.triton_gemv")

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
def test_the_models_linear_uses_it_for_one_bf16_row_on_the_gpu() -> None:
    layer = Linear(4096, 4096, bias=False).to(DEVICE, torch.bfloat16)
    x = torch.randn(1, 4096, device=DEVICE, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x), triton_gemv.gemv(x, layer.weight), rtol=0, atol=0)
    many = torch.randn(3, 4096, device=DEVICE, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(many), torch.nn.functional.linear(many, layer.weight), rtol=0, atol=0)
