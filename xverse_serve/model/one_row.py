"""The one-row path's projections: a decode step of one sequence runs each projection as one of kernels.gemv's
fused GEMVs, with the RMSNorm in its prologue, the residual add or SiLU * up in its epilogue
(DecoderLayer.forward_one_row). A projection takes part through `gemv_operands`: a dense weight, or int8 rows
with their float32 scales, which the same kernels stream at half the bytes.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Protocol

import torch

FUSED_KERNELS = os.environ.get("XVERSE_FUSED_KERNELS", "1") != "0"


def gemv_kernels(x: torch.Tensor) -> ModuleType | None:
    """kernels.gemv for activations its kernels take (bf16 or fp16 on CUDA, unless fused kernels are off)."""
    if x.is_cuda and FUSED_KERNELS and x.dtype in (torch.bfloat16, torch.float16):
        from ..kernels import gemv  # imported here, so a CPU-only install needs no Triton

        return gemv
    return None


class Norm(Protocol):
    """An RMSNorm's parameters (xverse.RMSNorm)."""

    weight: torch.Tensor
    eps: float


class OneRowProjection:
    """What a projection needs for the one-row path, given its gemv_operands."""

    in_features: int

    def gemv_operands(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight, int8 scales or None) for kernels.gemv, or None if its kernels cannot read this weight."""
        raise NotImplementedError

    def gated(self, x: torch.Tensor) -> torch.Tensor | None:
        """For a gate_up projection: silu(gate) * up of one row in one kernel (gemv.gated_gemv) where the GEMV
        runs; None elsewhere, where the caller computes the projection and then the activation."""
        operands = self.gemv_operands()
        if operands is not None and (gemv := gemv_kernels(x)) is not None and x.numel() == self.in_features:
            weight, scale = operands
            return gemv.gated_gemv(x, weight, scale=scale)
        return None

    def add_to(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + self(x), the sums of squares of its slices) in one kernel: gemv.add_gemv."""
        from ..kernels import gemv

        weight, scale = self.gemv_operands()
        return gemv.add_gemv(x, weight, residual, scale=scale)

    def normed(self, stream: torch.Tensor, squares: torch.Tensor, norm: Norm) -> torch.Tensor:
        """self(norm(stream)) with the norm taken inside the GEMV, from the sums of squares add_to left beside the
        stream."""
        from ..kernels import gemv

        weight, scale = self.gemv_operands()
        return gemv.gemv(stream, weight, norm=gemv.RowNorm(norm.weight, norm.eps, squares), scale=scale)
