"""The one-row path's projections: a decode step of one sequence runs each projection as a fused GEMV, with the
RMSNorm in its prologue, the residual add or SiLU * up in its epilogue (DecoderLayer.forward_one_row).

Three kernel families do it, and a projection says which reads its weight (`one_row`):
- "gemv": kernels.gemv's float GEMVs, for dense weights and for int8 or fp8 rows with their float32 scales
  (`gemv_operands`), which they stream at half the bytes. The norm is taken inside the GEMV.
- "dp4a": kernels.dp4a_gemv's integer GEMVs, for int8 and int4 weights (`dp4a_operands`). Their activations are
  quantized first; the norm is taken by the kernel that quantizes them, so it costs no kernel of its own.
- "dp4a_one_part": the same for int4 weights, the activations in one int8 part with a scale per 32 values instead
  of two parts per row: half the dot products, at that part's precision (docs/quantization.md).
A projection with `one_row` None has no one-row path (the model then takes its general path).
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Protocol

import torch

FUSED_KERNELS = os.environ.get("XVERSE_FUSED_KERNELS", "1") != "0"
# The dp4a families, by the activations' blocks (kernels.dp4a_gemv's act_block; 0: two parts per row).
DP4A_ACT_BLOCKS = {"dp4a": 0, "dp4a_one_part": 32}


def gemv_kernels(x: torch.Tensor) -> ModuleType | None:
    """kernels.gemv for activations its kernels take (bf16 or fp16 on CUDA, unless fused kernels are off)."""
    if x.is_cuda and FUSED_KERNELS and x.dtype in (torch.bfloat16, torch.float16):
        from ..kernels import gemv  # imported here, so a CPU-only install needs no Triton

        return gemv
    return None


def dp4a_arguments(options: dict[str, int]) -> dict:
    """dp4a_gemv.matmul's and fused_gemv's keyword arguments for a dp4a candidate's options."""
    from ..kernels import dp4a_gemv  # imported here, so a CPU-only install needs no Triton

    block_g = options.get("block_g", 0)
    config = (dp4a_gemv.INT4_CONFIG[0], block_g, dp4a_gemv.INT4_CONFIG[2]) if block_g else None
    return {"act_block": options.get("act_block", 0), "split_k": options.get("split_k", 1), "config": config}


class Norm(Protocol):
    """An RMSNorm (xverse.RMSNorm): its parameters, and the norm itself."""

    weight: torch.Tensor
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class OneRowProjection:
    """What a projection needs for the one-row path, given its `one_row` family and that family's operands."""

    in_features: int
    one_row: str | None = "gemv"
    # The dp4a families' GEMV shape (tuner.one_row_options, dp4a_arguments: split_k, block_g).
    one_row_options: tuple[tuple[str, int], ...] = ()

    def gemv_operands(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, int8 or fp8 scales or None) for kernels.gemv."""
        raise NotImplementedError

    def dp4a_operands(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(int8 or packed int4 weight, its scales, int4's offsets or None) for kernels.dp4a_gemv."""
        raise NotImplementedError

    def gated(self, x: torch.Tensor) -> torch.Tensor | None:
        """For a gate_up projection: silu(gate) * up of one row in one kernel where a one-row GEMV reads this
        weight; None elsewhere, where the caller computes the projection and then the activation."""
        if self.one_row is None or gemv_kernels(x) is None or x.numel() != self.in_features:
            return None
        return self._fused(x, gated=True)[0]

    def gated_normed(self, stream: torch.Tensor, norm: Norm) -> torch.Tensor:
        """silu(gate) * up of norm(stream), one row: the norm is the quantizing kernel (dp4a) or a kernel of its
        own before the gated GEMV (gemv: taken inside the GEMV, every program would normalise the whole row, which
        measured slower, docs/benchmarks.md)."""
        if self.one_row in DP4A_ACT_BLOCKS:
            return self._fused(stream, gated=True, norm=norm)[0]
        return self._fused(norm(stream), gated=True)[0]

    def add_to(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + self(x), the sums of squares of its slices) in one GEMV."""
        return self._fused(x, residual=residual)

    def normed(self, stream: torch.Tensor, squares: torch.Tensor | None, norm: Norm) -> torch.Tensor:
        """self(norm(stream)). gemv: the norm taken inside the GEMV from the sums of squares add_to left beside the
        stream (with squares None, the embeddings, by a norm kernel first); dp4a: by the quantizing kernel."""
        if self.one_row == "gemv" and squares is None:
            return self._fused(norm(stream))[0]
        return self._fused(stream, norm=norm, squares=squares)[0]

    def _fused(self, x: torch.Tensor, gated: bool = False, norm: Norm | None = None,
               squares: torch.Tensor | None = None, residual: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.one_row in DP4A_ACT_BLOCKS:
            from ..kernels import dp4a_gemv

            arguments = dp4a_arguments({**dict(self.one_row_options), "act_block": DP4A_ACT_BLOCKS[self.one_row]})
            return dp4a_gemv.fused_gemv(x, *self.dp4a_operands(), gated=gated, residual=residual,
                                        norm=(norm.weight, norm.eps) if norm is not None else None, **arguments)
        from ..kernels import gemv

        weight, scale = self.gemv_operands()
        if residual is not None:
            return gemv.add_gemv(x, weight, residual, scale=scale)
        row_norm = gemv.RowNorm(norm.weight, norm.eps, squares) if norm is not None else None
        run = gemv.gated_gemv if gated else gemv.gemv
        return run(x, weight, norm=row_norm, scale=scale), None
