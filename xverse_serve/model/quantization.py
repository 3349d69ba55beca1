"""Weight-only quantization of the linear layers, applied while the checkpoint loads (--quantize).

int8: each output channel (row of W) is scaled symmetrically: W ~= q * scale, q in [-127, 127], scale float32.
int4: each run of 128 input weights of a row (a group) is mapped onto 0..15 between its minimum and maximum:
W ~= q * scale + offset, two values per byte, scale and offset float16 per group.

Quantization is per row, so a tensor can be quantized on its own as it arrives and written into its rows of a
packed projection (q/k/v into qkv_proj, gate/up into gate_up_proj): model.load_model does that shard by shard,
on the device, a slice of rows at a time, so no full-precision copy of the model is ever held.

The matmul: on the CPU, int8 runs torch._weight_int8pack_mm and int4 dequantizes and runs F.linear (the
reference). On CUDA the Triton kernels of kernels.quant_matmul, kernels.split_gemm and kernels.imma_gemm (int8
tensor cores) and kernels.dp4a_gemv (one row, on integer dot products) run, and for int8 also the bf16 model's
GEMVs of kernels.gemv (one row, and 2-64 rows), which read int8 rows with their scales; which one depends on the
number of rows M: tuner.tune times the candidates for each layer shape at M = 1, 2, 4, ... at start-up, checks each
against the float32 reference, and keeps the fastest per M. The one-row path of the decoder (one_row.py) takes
fused GEMVs, kernels.gemv's (int8, fp8) or kernels.dp4a_gemv's (int8, int4), whichever family is faster, unless the
tuned kernels are faster by more than what its fusions save (tuner.one_row_family).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .one_row import DP4A_ACT_BLOCKS, OneRowProjection, dp4a_arguments

SCHEMES = ("int8", "int4", "fp8")
INT4_GROUP = 128
INT8_MAX = 127
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
FP8 = torch.float8_e4m3fn
INT4_LEVELS = 15
QUANTIZE_ROWS_ELEMENTS = 1 << 24  # rows quantized at a time: float32 temporaries of ~64 MB, not 1.6 GB (lm_head)
DEQUANTIZE_MAX_ELEMENTS = 1 << 27  # larger weights are never dequantized whole (the temporary would be too big)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q int8 [N, K], scale float32 [N]) with w ~= q * scale[:, None], |error| <= scale / 2."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / INT8_MAX
    q = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 or fp8 values with a scale per row [N] -> the weight they stand for."""
    return (q.float() * scale[:, None]).to(dtype)


dequantize_int8 = dequantize_fp8 = dequantize_rows


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q float8_e4m3fn [N, K], scale float32 [N]) with w ~= q * scale[:, None]: each output channel's
    largest weight maps to 448, the rest round to the nearest e4m3 value (3 mantissa bits: within 1/16 of it)."""
    q, scale = quantize_activations_fp8(w)  # the same per-row quantization
    return q, scale[:, 0]


def quantize_activations_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8_e4m3fn [M, K], float32 scale [M, 1]): per token, its largest value maps to 448."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / FP8_MAX
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


@dataclass(frozen=True)
class Fp8Rows:
    """Activations already quantized for an FP8 matmul, as quantize_activations_fp8 gives them: e4m3 values [M, K],
    a float32 scale per row [M, 1], and the dtype the product comes back in. The norm or SiLU·up before an fp8
    projection makes them in its own kernel (kernels.fused_ops) when the projection's kernel takes them."""

    values: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype


def fp8_activations(x: torch.Tensor | Fp8Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_activations_fp8, by one kernel on a GPU (kernels.fused_ops.quantize_rows_fp8); Fp8Rows as they are."""
    if isinstance(x, Fp8Rows):
        return x.values, x.scale
    if x.is_cuda:
        from ..kernels.fused_ops import quantize_rows_fp8

        return quantize_rows_fp8(x)
    return quantize_activations_fp8(x)


def scaled_mm(x: torch.Tensor | Fp8Rows, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """x @ W^T on FP8 tensor cores (torch._scaled_mm, cuBLASLt), W fp8 with a scale per output channel and x
    quantized to fp8 per token on the fly (or already, Fp8Rows): twice bf16's FLOP rate, for prefill-sized batches."""
    xq, x_scale = fp8_activations(x)
    # Fast accumulation (FP8 tensor cores' own sums, not promoted to float32 every few steps, as vLLM's FP8 GEMMs
    # run): on an H100 0.85-0.95 of the time at 16-512 rows, the error against the exact product unchanged (2.65%,
    # the activations' e4m3 rounding; bench/results/fp8_gemm_lab_h100.json).
    return torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale[None, :], out_dtype=x.dtype,
                            use_fast_accum=True)


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (packed uint8 [N, K // 2], scale float16 [N, K // group], offset float16 [N, K // group]).

    Within each group, q = round((w - offset) / scale) in 0..15 with offset = the group's minimum and
    scale = its range / 15, both rounded to float16 first so that q is exact for the stored values.
    Byte j of a row holds q[2j] in its low nibble and q[2j + 1] in its high nibble."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"int4 quantizes groups of {group} input features; {k} is not a multiple of {group}")
    groups = w.float().view(n, k // group, group)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / INT4_LEVELS).clamp_min(1e-6).to(torch.float16)
    offset = low.to(torch.float16)
    if not (torch.isfinite(scale).all() and torch.isfinite(offset).all()):
        raise ValueError("weights beyond float16's range cannot be quantized to int4")
    q = torch.round((groups - offset.float()[..., None]) / scale.float()[..., None]).clamp_(0, INT4_LEVELS)
    q = q.to(torch.uint8).view(n, k)
    return q[:, 0::2] | (q[:, 1::2] << 4), scale, offset


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, K // 2] uint8 -> [N, K] uint8 in 0..15."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).view(packed.shape[0], -1)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n, groups = scale.shape
    q = unpack_int4(packed).float().view(n, groups, -1)
    return (q * scale.float()[..., None] + offset.float()[..., None]).view(n, -1).to(dtype)


# MatmulKernel's backends, as its docstring describes them.
BACKENDS = ("gemv", "gemm", "dequantize", "rowgemv", "skinny", "split", "imma_rows", "cublas_int8", "mixed", "dp4a",
            "scaled_mm", "cutlass", "torch", "reference")


@dataclass(frozen=True)
class MatmulKernel:
    """One way to multiply by a quantized weight on CUDA: a backend and its options.

    gemv, gemm, dequantize: the Triton kernels of kernels.quant_matmul (dequantize: the dense weight, then F.linear);
    rowgemv, skinny: kernels.gemv's one-row GEMV and 2-64-row GEMM (int8 and fp8); split: kernels.split_gemm's swap-AB,
    split-K GEMM for 1-64 rows (int8, fp8 and int4), with two_part=1 on int8 or FP8 tensor cores with the activations in
    two parts, with fp8_act=1 (fp8, 16-64 rows) on FP8 tensor cores with the activations quantized per token first as
    scaled_mm takes them (tma=1: its tiles by TMA copies); imma_rows: kernels.imma_gemm's int8 tensor-core GEMM for
    prefill-sized batches (int8 and int4); cublas_int8: the same two-part activations through cuBLAS's int8 GEMM (int8,
    64 rows: imma_gemm.CUBLAS_MAX_ROWS); mixed: kernels.mixed_gemm's GEMM with the weights dequantized in registers as
    the first operand of bf16 or fp16 tensor-core dots (int8, int4 and fp8, 2 rows and up; with tma=1 its TMA kernel,
    for prefills); dp4a: kernels.dp4a_gemv's GEMV on integer dot products, 1 to dp4a_gemv.MAX_ROWS rows (int8 and int4;
    with act_block, int4's activations in one int8 part with a scale per act_block values); scaled_mm: FP8 tensor cores
    with the activations quantized per token (fp8 only); cutlass: kernels.cutlass_mixed's CUTLASS mixed-input GEMM
    (Hopper, bf16, unless XVERSE_CUTLASS=0; option config: its tile); torch: torch._weight_int8pack_mm (int8 only);
    reference: the weight dequantized by PyTorch, then F.linear (slow and memory-hungry: only where no other kernel
    works)."""

    backend: str
    options: tuple[tuple[str, int], ...] = ()

    @property
    def takes_fp8_rows(self) -> bool:
        """Whether it multiplies activations quantized to e4m3 per row (and so can be given Fp8Rows)."""
        return self.backend == "scaled_mm" or ("fp8_act", 1) in self.options

    def __call__(self, x: torch.Tensor | Fp8Rows, layer: QuantizedLinear) -> torch.Tensor:
        from ..kernels import quant_matmul  # imported here, so a CPU-only install needs no Triton

        if isinstance(x, Fp8Rows) and not self.takes_fp8_rows:
            raise TypeError(f"{self} takes activations in {x.dtype}, not Fp8Rows")
        options = dict(self.options)
        if self.backend in ("rowgemv", "skinny"):
            from ..kernels import gemv

            run = gemv.gemv if self.backend == "rowgemv" else gemv.skinny_matmul
            return run(x, layer.weight, scale=layer.weight_scale)
        if self.backend == "split":
            from ..kernels import split_gemm

            if options.get("fp8_act"):
                return _scaled_rows(x, layer, options)
            two_part = bool(options.get("two_part", 0))
            if layer.bits == 4:
                config = tuple(options[name] for name in ("block_n", "num_warps", "num_stages"))
                return split_gemm.split_matmul_int4(x, layer.weight, layer.weight_scale, layer.weight_offset,
                                                    layer.group_size, config, two_part)
            config = tuple(options[name] for name in ("block_n", "block_k", "num_warps", "num_stages"))
            return split_gemm.split_matmul(x, layer.weight, layer.weight_scale, config, two_part)
        if self.backend == "cublas_int8":
            from ..kernels import imma_gemm

            return imma_gemm.cublas_rows_matmul(x, layer.weight, layer.weight_scale)
        if self.backend == "imma_rows":
            from ..kernels import imma_gemm

            config = tuple(value for _, value in self.options)
            if layer.bits == 4:
                return imma_gemm.rows_matmul_int4(x, layer.weight, layer.weight_scale, layer.weight_offset,
                                                  layer.group_size, config)
            return imma_gemm.rows_matmul(x, layer.weight, layer.weight_scale, config)
        if self.backend == "mixed":
            from ..kernels import mixed_gemm

            config = tuple(options[name] for name in ("block_m", "block_n", "block_k", "num_warps", "num_stages"))
            return mixed_gemm.matmul(x, layer.weight, layer.weight_scale, layer.weight_offset, layer.group_size,
                                     config, options.get("split_k", 1), tma=bool(options.get("tma", 0)))
        if self.backend == "dp4a":
            from ..kernels import dp4a_gemv

            return dp4a_gemv.matmul(x, *layer.dp4a_operands(), **dp4a_arguments(options))
        if self.backend == "cutlass":
            from ..kernels import cutlass_mixed

            module = cutlass_mixed.served_module(layer.scheme, x.device.index)
            return cutlass_mixed.matmul(module, layer.scheme, layer.cutlass_operands(), layer.group_size, x,
                                        options["config"])
        if self.backend == "scaled_mm":
            return scaled_mm(x, layer.weight, layer.weight_scale)
        if self.backend == "gemv" and layer.bits == 8:
            return quant_matmul.int8_gemv(x, layer.weight, layer.weight_scale, **options)
        if self.backend == "gemv":
            return quant_matmul.int4_gemv(x, layer.weight, layer.weight_scale, layer.weight_offset,
                                          layer.group_size, **options)
        if self.backend == "gemm":
            return quant_matmul.gemm(x, layer.weight, layer.weight_scale, layer.weight_offset, layer.bits,
                                     layer.group_size, **options)
        if self.backend == "dequantize":
            return F.linear(x, quant_matmul.dequantize(layer.weight, layer.weight_scale, layer.weight_offset,
                                                       layer.bits, layer.group_size, x.dtype))
        if self.backend == "torch":
            return torch._weight_int8pack_mm(x, layer.weight, layer.weight_scale.to(x.dtype))
        if self.backend == "reference":
            return F.linear(x, layer.dequantized(x.dtype))
        raise ValueError(f"unknown matmul backend {self.backend!r}")

    def __str__(self) -> str:
        if not self.options:
            return self.backend
        return f"{self.backend}({', '.join(f'{name}={value}' for name, value in self.options)})"


def _scaled_rows(x: torch.Tensor | Fp8Rows, layer: QuantizedLinear, options: dict[str, int]) -> torch.Tensor:
    """The split kernel with fp8 activations (kernels.split_gemm.scaled_rows_matmul), x quantized per row first
    (unless it comes quantized)."""
    from ..kernels import split_gemm

    xq, x_scale = fp8_activations(x if isinstance(x, Fp8Rows) else x.reshape(-1, layer.in_features))
    config = tuple(options[name] for name in ("block_n", "block_k", "num_warps", "num_stages"))
    y = split_gemm.scaled_rows_matmul(xq, x_scale, layer.weight, layer.weight_scale, x.dtype, config,
                                      bool(options.get("tma", 0)))
    return y if isinstance(x, Fp8Rows) else y.view(*x.shape[:-1], layer.out_features)


# (largest M, kernel) pairs in increasing M; beyond the last M, the last kernel.
MatmulPlan = tuple[tuple[int, MatmulKernel], ...]


class QuantizedLinear(nn.Module, OneRowProjection):
    """y = x @ W^T without bias, W held as int8 or fp8 per output channel or int4 per group (buffers, filled by
    load_rows). `weight` is the quantized tensor itself (int8 or float8_e4m3fn [N, K], or packed uint8
    [N, K // 2]). int8 and fp8 take the one-row path's fused GEMVs (unless tuner.tune found faster kernels)."""

    def __init__(self, in_features: int, out_features: int, scheme: str, group_size: int = INT4_GROUP) -> None:
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {scheme!r}; expected one of {SCHEMES}")
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.bits = 4 if scheme == "int4" else 8
        self.group_size = group_size if scheme == "int4" else in_features
        if scheme in ("int8", "fp8"):
            dtype = torch.int8 if scheme == "int8" else FP8
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=dtype))
            self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32))
            self.register_buffer("weight_offset", None)
        else:
            if in_features % group_size:
                raise ValueError(f"int4 quantizes groups of {group_size} input features; "
                                 f"{in_features} is not a multiple of {group_size}")
            groups = in_features // group_size
            self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("weight_scale", torch.empty(out_features, groups, dtype=torch.float16))
            self.register_buffer("weight_offset", torch.empty(out_features, groups, dtype=torch.float16))
        self.plan: MatmulPlan | None = None  # set by tuner.tune; until then default_plan
        # Whether the kernel before this layer hands its activations over quantized where the plan's kernel takes
        # them (model.xverse.takes_fp8): the tuner then times such kernels without x's quantization.
        self.fp8_input_handed_over = False
        self._cutlass_operands: tuple | None = None  # cutlass_operands', kept only while a plan uses them
        # The one-row path's kernel family (one_row.py): int8 and fp8 start with kernels.gemv's; tuner.tune may choose
        # dp4a (int8, int4) or none (the tuned kernels).
        self.one_row: str | None = "gemv" if self.bits == 8 else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"

    def gemv_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight, self.weight_scale

    def dp4a_operands(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return self.weight, self.weight_scale, self.weight_offset

    def cutlass_operands(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The weight, scale and offset as kernels.cutlass_mixed takes them (int4's scales and offsets in bf16 as
        [groups, N]: 6% of its weight's bytes), made on first use."""
        if self._cutlass_operands is None:
            from ..kernels import cutlass_mixed

            self._cutlass_operands = cutlass_mixed.operands(self.scheme, self.weight, self.weight_scale,
                                                            self.weight_offset)
        return self._cutlass_operands

    def keep_cutlass_operands(self) -> None:
        """Makes cutlass_operands now if the plan takes a CUTLASS kernel (before the KV cache is sized, not in a
        request), else frees them."""
        if any(kernel.backend == "cutlass" for _, kernel in self.plan or ()):
            self.cutlass_operands()
        else:
            self._cutlass_operands = None

    @torch.no_grad()
    def load_rows(self, start: int, w: torch.Tensor) -> None:
        """Quantizes w [rows, in_features] (any float dtype, on any device) into output channels
        start .. start + rows, a slice of rows at a time, on this layer's device."""
        step = max(1, QUANTIZE_ROWS_ELEMENTS // self.in_features)
        for first in range(0, w.shape[0], step):
            part = w[first:first + step].to(self.weight.device)
            rows = slice(start + first, start + first + part.shape[0])
            if self.bits == 8:
                q, scale = quantize_int8(part) if self.scheme == "int8" else quantize_fp8(part)
                self.weight[rows] = q
                self.weight_scale[rows] = scale
            else:
                packed, scale, offset = quantize_int4(part, self.group_size)
                self.weight[rows] = packed
                self.weight_scale[rows] = scale
                self.weight_offset[rows] = offset

    def dequantized(self, dtype: torch.dtype = torch.float32, rows: slice = slice(None)) -> torch.Tensor:
        """The weight this layer multiplies by, dense (the reference)."""
        if self.bits == 8:  # int8 or fp8
            return dequantize_rows(self.weight[rows], self.weight_scale[rows], dtype)
        return dequantize_int4(self.weight[rows], self.weight_scale[rows], self.weight_offset[rows], dtype)

    def kernel_at(self, rows: int) -> MatmulKernel:
        """The kernel this layer runs for `rows` rows on a GPU: its tuned plan's, or before tuning the default's."""
        return kernel_for(self.plan or default_plan(self), rows)

    def takes_fp8_rows(self, rows: int) -> bool:
        """Whether the kernel this layer's plan runs for `rows` rows multiplies e4m3 activations (fp8: scaled_mm
        or split(…, fp8_act=1)), so that the kernel making its input can hand it over quantized (Fp8Rows)."""
        return self.scheme == "fp8" and rows >= 1 and self.kernel_at(rows).takes_fp8_rows

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        if isinstance(x, Fp8Rows):  # [M, K], quantized by the kernel before (where takes_fp8_rows said so)
            return self.kernel_at(x.values.shape[0])(x, self)
        x2 = x.reshape(-1, self.in_features)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        if x2.shape[0] == 0:
            y = x2.new_empty((0, self.out_features))
        elif x2.is_cuda:
            y = self.kernel_at(x2.shape[0])(x2, self)
        elif self.scheme == "int8":
            y = torch._weight_int8pack_mm(x2, self.weight, self.weight_scale.to(x2.dtype))
        else:
            y = F.linear(x2, self.dequantized(x2.dtype))
        return y.view(*x.shape[:-1], self.out_features)


class QuantizedEmbedding(nn.Module):
    """An embedding table held as int8, one scale per token's vector (the int8 layout of QuantizedLinear with
    the tokens as its rows); a lookup dequantizes only the rows it reads, to `dtype`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        # in_features/out_features: the names load_targets reads for the rows of any quantized tensor.
        self.in_features, self.out_features, self.dtype = embedding_dim, num_embeddings, dtype
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.empty(num_embeddings, dtype=torch.float32))

    def extra_repr(self) -> str:
        return f"{self.out_features}, {self.in_features}, int8"

    @torch.no_grad()
    def load_rows(self, start: int, w: torch.Tensor) -> None:
        step = max(1, QUANTIZE_ROWS_ELEMENTS // self.in_features)
        for first in range(0, w.shape[0], step):
            q, scale = quantize_int8(w[first:first + step].to(self.weight.device))
            self.weight[start + first:start + first + q.shape[0]] = q
            self.weight_scale[start + first:start + first + q.shape[0]] = scale

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole table, dense (the reference)."""
        return dequantize_int8(self.weight, self.weight_scale, dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return (self.weight[input_ids].float() * self.weight_scale[input_ids, None]).to(self.dtype)


def reference_matmul(x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
    """x @ W^T in float32 with W dequantized exactly, a slice of output channels at a time (the lm_head's
    float32 weight alone would be 1.6 GB)."""
    step = max(1, DEQUANTIZE_MAX_ELEMENTS // 8 // layer.in_features)
    return torch.cat([x.float() @ layer.dequantized(torch.float32, slice(first, first + step)).T
                      for first in range(0, layer.out_features, step)], dim=1)


def kernel_for(plan: MatmulPlan, m: int) -> MatmulKernel:
    for largest, kernel in plan:
        if m <= largest:
            return kernel
    return plan[-1][1]


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


# gemm configurations, (block_m, block_n, block_k, num_warps, num_stages), by the batch sizes they suit; int4
# always takes one group (128) per step. Chosen to compile without register spills on sm_90 (ptxas -v).
GEMM_CONFIGS = {
    8: {"small": (16, 64, 128, 4, 3), "medium": (32, 64, 64, 4, 3), "large": (64, 128, 64, 8, 3),
        "huge": (128, 128, 64, 8, 3)},
    4: {"small": (16, 64, 128, 4, 3), "medium": (32, 64, 128, 4, 3), "large": (64, 64, 128, 4, 3),
        "huge": (128, 64, 128, 8, 3)},
}
# gemv configurations, (output channels per program, K per step or groups per step, num_warps): 2-4 KB of
# weights per step. (16, 256, 8) for int8 and (16, 4, 8) for int4 were timed too and never the fastest, on an H200
# or an H100 (bench/results/quant_h200_split.json, quant_h100_twopart.json).
GEMV_CONFIGS = {8: ((8, 512, 4),), 4: ((8, 4, 4),)}
# torch._weight_int8pack_mm is timed up to this many rows: at one row it took 10x the fastest kernel's time on an
# H100 and grows linearly with the rows (446 ms at 4,096 rows of qkv_proj), so timing it at every batch size was
# 63 of the 64 s of GPU time that int8's start-up tuning spent running candidates (quant_h100_twopart.json).
TORCH_INT8_MAX_ROWS = 4


def _gemm(layer: QuantizedLinear, m: int, size: str) -> MatmulKernel:
    """A gemm configuration for M rows, split along K when its output tiles alone would leave SMs idle."""
    block_m, block_n, block_k, num_warps, num_stages = GEMM_CONFIGS[layer.bits][size]
    return MatmulKernel("gemm", (("block_m", block_m), ("block_n", block_n), ("block_k", block_k),
                                 ("split_k", _split_k(layer, m, block_m, block_n, block_k)),
                                 ("num_warps", num_warps), ("num_stages", num_stages)))


def _split_k(layer: QuantizedLinear, m: int, block_m: int, block_n: int, block_k: int) -> int:
    """Slices of K for an output-tiled GEMM: doubled while its tiles would not fill the SMs twice, keeping at least
    four steps of K a slice."""
    tiles = -(-m // block_m) * -(-layer.out_features // block_n)
    steps = -(-layer.in_features // block_k)
    split = 1
    while tiles * split < 2 * _num_sms(layer.weight.device) and split * 2 * 4 <= steps:
        split *= 2
    return split


def _gemv(layer: QuantizedLinear, config: tuple[int, int, int]) -> MatmulKernel:
    rows, step, num_warps = config
    name = "block_k" if layer.bits == 8 else "groups_per_iter"
    return MatmulKernel("gemv", (("block_n", rows), (name, step), ("num_warps", num_warps)))


def candidates(layer: QuantizedLinear, m: int, dtype: torch.dtype = torch.bfloat16) -> list[MatmulKernel]:
    """The kernels worth timing for M rows of `dtype` activations."""
    dequantize_fits = layer.out_features * layer.in_features <= DEQUANTIZE_MAX_ELEMENTS
    if layer.scheme == "fp8":
        return _fp8_candidates(layer, m, dtype)
    if dtype == torch.float32:
        # Float32 (the CPU's dtype, used on GPUs for exact comparisons): a tensor-core dot would round to tf32, an
        # exact one is slow to compile and run; cuBLAS's float32 matmul after dequantizing is the sound choice.
        kernels = [_gemv(layer, config) for config in GEMV_CONFIGS[layer.bits]] if m <= 16 else []
        kernels += [MatmulKernel("dequantize")] if dequantize_fits else [_gemm(layer, m, "large")] * (m > 16)
        return kernels + [MatmulKernel("torch")] * (layer.bits == 8)
    kernels = _gemv_candidates(m, dtype) if layer.bits == 8 else _int4_split_candidates(m, dtype)
    kernels += _dp4a_candidates(layer, m, dtype) + _two_part_candidates(layer, m, dtype)
    kernels += _mixed_candidates(layer, m, dtype) + _cutlass_candidates(layer, m, dtype)
    if m <= 16:
        kernels += [_gemv(layer, config) for config in GEMV_CONFIGS[layer.bits]]
        kernels.append(_gemm(layer, m, "small"))
    if 16 < m <= 64:
        kernels.append(_gemm(layer, m, "medium"))
    if m >= 32:
        kernels.append(_gemm(layer, m, "large"))
    if m >= 256:
        kernels.append(_gemm(layer, m, "huge"))
    if m >= 64 and dequantize_fits:
        kernels.append(MatmulKernel("dequantize"))
    if layer.bits == 8 and m <= TORCH_INT8_MAX_ROWS:
        kernels.append(MatmulKernel("torch"))
    return kernels


def _gemv_candidates(m: int, dtype: torch.dtype) -> list[MatmulKernel]:
    """kernels.gemv's and kernels.split_gemm's kernels for int8 or fp8 rows with their scales: one row, or up to
    64 rows."""
    if dtype not in (torch.bfloat16, torch.float16):
        return []
    from ..kernels import gemv, split_gemm

    kernels = [MatmulKernel("rowgemv")] if m == 1 else [MatmulKernel("skinny")] * (m <= gemv.MAX_SCALED_SKINNY_ROWS)
    if m <= split_gemm.MAX_ROWS:
        kernels += [MatmulKernel("split", tuple(zip(("block_n", "block_k", "num_warps", "num_stages"), config)))
                    for config in split_gemm.TUNED_CONFIGS]
    return kernels


def _dp4a_candidates(layer: QuantizedLinear, m: int, dtype: torch.dtype) -> list[MatmulKernel]:
    """kernels.dp4a_gemv's GEMV (int8, and int4 in groups of 128) for 1 to dp4a_gemv.MAX_ROWS rows of bf16 or fp16
    activations; for int4 also with the activations in one int8 part and a scale per 32 (llama.cpp's q8_1): half
    the dp4a, at a relative error of about 5e-3 on Gaussian activations against the two parts' 3e-5
    (docs/quantization.md), which the tolerance check admits, against about 1e-1 from the int4 weights themselves.
    Beyond one row each row's programs read the weights again, mostly from L2."""
    from ..kernels import dp4a_gemv

    fits = layer.bits == 8 or layer.group_size == 8 * dp4a_gemv.INT4_GROUP_WORDS
    if not 1 <= m <= dp4a_gemv.MAX_ROWS or not fits or dtype not in (torch.bfloat16, torch.float16):
        return []
    families = [family for family, block in DP4A_ACT_BLOCKS.items() if layer.bits == 4 or not block]
    if m > 1:  # each row's programs stream the weights again: also the shape that has the most loads in flight
        wide = (0, DP4A_INT4_BLOCKS[-1]) if layer.bits == 4 else (0,)
        return [dp4a_kernel(DP4A_ACT_BLOCKS[family], 1, block_g) for family in families for block_g in wide]
    launches: dict[tuple, MatmulKernel] = {}  # a split that K's steps make the same launch as a smaller one: once
    for kernel in (kernel for family in families for kernel in dp4a_family(family, layer.bits)):
        options = dict(kernel.options)
        launches.setdefault((options.get("act_block"), options.get("block_g"), _dp4a_slices(layer, kernel)), kernel)
    return list(launches.values())


def _dp4a_slices(layer: QuantizedLinear, kernel: MatmulKernel) -> int:
    """How many slices of K a dp4a candidate launches on this layer (fewer than its split_k where K has too few
    steps)."""
    from ..kernels import dp4a_gemv

    arguments = dp4a_arguments(dict(kernel.options))
    return dp4a_gemv.split_shape(layer.in_features, layer.bits == 4, arguments["config"], arguments["split_k"])[1]


# At one row (the one-row path's GEMVs), dp4a_gemv's shapes beyond its defaults: K in split_k slices (for
# projections whose rows alone make few programs), and for int4 more groups a step (block_g; 0: INT4_CONFIG's 4).
# Compiled for sm_90, 4 groups a step leave a thread one or two weight loads in flight (ptxas interleaves the
# unrolled steps), 32 (K = 4,096 in one step) all eight of them, at 80 registers instead of 42, no spills. A step's
# weights are also what the kernel reads before its PDL wait (dp4a_gemv). Timed on an H100
# (quant_h100_preload.json): int4's fastest were 16 or 32 groups a step, K whole, on every projection (down_proj
# 23.3 -> 16.0 us); four slices never won, two only int8's down_proj (by 2%); int8's whole K in one step (1,024 words)
# never won either, and is not offered.
DP4A_SPLITS = (1, 2)
DP4A_INT4_BLOCKS = (0, 16, 32)


def dp4a_kernel(act_block: int = 0, split_k: int = 1, block_g: int = 0) -> MatmulKernel:
    """The dp4a tuning candidate with the activations in two parts (0) or one part in blocks of act_block, K in
    split_k slices, int4's groups a step block_g (0: dp4a_gemv's default)."""
    options = (("act_block", act_block),) if act_block else ()
    options += (("split_k", split_k),) if split_k > 1 else ()
    return MatmulKernel("dp4a", options + ((("block_g", block_g),) if block_g else ()))


def dp4a_family(family: str, bits: int) -> list[MatmulKernel]:
    """A dp4a one-row family's candidates at one row, for int8 (bits 8) or int4 weights."""
    return [dp4a_kernel(DP4A_ACT_BLOCKS[family], split_k, block_g) for split_k in DP4A_SPLITS
            for block_g in (DP4A_INT4_BLOCKS if bits == 4 else (0,))]


def _two_part_candidates(layer: QuantizedLinear, m: int, dtype: torch.dtype) -> list[MatmulKernel]:
    """The weights on int8 (int8, int4) or FP8 (fp8) tensor cores as stored, bf16 or fp16 activations in two parts:
    split_gemm's split-K GEMM for up to 64 rows, and for int8 and int4 imma_gemm's output-tiled one from 64 rows
    (where K is a multiple of its block), for int8 also cuBLAS's int8 GEMM at 64 rows (CUBLAS_MAX_ROWS)."""
    from ..kernels import imma_gemm, split_gemm

    if dtype not in (torch.bfloat16, torch.float16):
        return []
    int4 = layer.bits == 4
    kernels = []
    if m <= split_gemm.MAX_ROWS:
        names = ("block_n", "num_warps", "num_stages") if int4 else ("block_n", "block_k", "num_warps", "num_stages")
        configs = split_gemm.TWO_PART_INT4_CONFIGS if int4 else split_gemm.TWO_PART_CONFIGS
        kernels += [MatmulKernel("split", (*zip(names, config), ("two_part", 1))) for config in configs]
    if 64 <= m <= imma_gemm.CUBLAS_MAX_ROWS and layer.scheme == "int8" and not (layer.out_features % 8
                                                                               or layer.in_features % 8):
        kernels.append(MatmulKernel("cublas_int8"))
    if m >= 64 and layer.scheme != "fp8":
        names = ("block_m", "block_n", "num_warps", "num_stages") if int4 else (
            "block_m", "block_n", "block_k", "num_warps", "num_stages")
        configs = imma_gemm.ROWS_INT4_CONFIGS if int4 else [
            config for config in imma_gemm.ROWS_CONFIGS if layer.in_features % config[2] == 0]
        kernels += [MatmulKernel("imma_rows", tuple(zip(names, config))) for config in configs]
    return kernels


def _mixed_candidates(layer: QuantizedLinear, m: int, dtype: torch.dtype) -> list[MatmulKernel]:
    """kernels.mixed_gemm for 2 rows and up (bf16 or fp16): the configurations whose token tile is the smallest
    that holds M (up to 128), split along K as the gemm is (_split_k) and, for decode batches (up to
    split_gemm.MAX_ROWS rows), in half as many slices too: on an H100 at 64 rows _split_k's split was the fastest
    for qkv_proj and gate_up_proj (bench/results/mixed_gemm_h100.json), half of it for o_proj and down_proj
    (mixed_gemm_int4_64_h100.json: int4's o_proj 23.8 µs at split 4 against 30.5 at 8). From TMA_MIN_ROWS, its TMA
    kernel in each of TMA_CONFIGS where _has_tma."""
    from ..kernels import mixed_gemm, split_gemm

    if m < 2 or dtype not in (torch.bfloat16, torch.float16):
        return []
    def fits(config: tuple[int, ...]) -> bool:  # K in whole steps; int4 one group's scale and offset a step
        return layer.in_features % config[2] == 0 and (layer.bits == 8 or layer.group_size % config[2] == 0)

    names = ("block_m", "block_n", "block_k", "num_warps", "num_stages")
    block_m = next(c[0] for c in mixed_gemm.CONFIGS if c[0] >= min(m, mixed_gemm.CONFIGS[-1][0]))
    kernels = []
    for config in [c for c in mixed_gemm.CONFIGS if c[0] == block_m and fits(c)]:
        split = _split_k(layer, m, *config[:3])
        splits = (split, split // 2) if split > 1 and m <= split_gemm.MAX_ROWS else (split,)
        kernels += [MatmulKernel("mixed", (*zip(names, config), ("split_k", s))) for s in splits]
    if m >= mixed_gemm.TMA_MIN_ROWS and _has_tma(layer.weight.device):
        kernels += [MatmulKernel("mixed", (*zip(names, config), ("split_k", 1), ("tma", 1)))
                    for config in mixed_gemm.TMA_CONFIGS if fits(config)]
    return kernels


# mixed_gemm's TMA kernel among the candidates (XVERSE_MIXED_TMA=0 leaves it out). On an H100 the tuner chose it
# for int4's qkv_proj and gate_up_proj at 512 rows (bench/results/prefill_gemm_lab_h100.json, quant_h100_tma.json).
MIXED_TMA = os.environ.get("XVERSE_MIXED_TMA", "1") != "0"


def _has_tma(device: torch.device) -> bool:
    """Whether to offer the TMA kernel: not turned off (MIXED_TMA), and the card copies tiles by TMA (Hopper,
    compute capability 9.0, and newer)."""
    return MIXED_TMA and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _cutlass_candidates(layer: QuantizedLinear, m: int, dtype: torch.dtype) -> list[MatmulKernel]:
    """kernels.cutlass_mixed's GEMMs, each tile, from cutlass_mixed.MIN_ROWS rows of bf16: where they build and run
    on this card and XVERSE_CUTLASS is not 0 (served_module builds them on the first call)."""
    from ..kernels import cutlass_mixed

    device = layer.weight.device
    if (not cutlass_mixed.enabled() or m < cutlass_mixed.MIN_ROWS or dtype != torch.bfloat16
            or device.type != "cuda" or cutlass_mixed.served_module(layer.scheme, device.index) is None):
        return []
    return [MatmulKernel("cutlass", (("config", config),)) for config in cutlass_mixed.CONFIGS]


def _int4_split_candidates(m: int, dtype: torch.dtype) -> list[MatmulKernel]:
    """kernels.split_gemm's int4 kernel, for up to 64 rows of bf16 or fp16."""
    from ..kernels import split_gemm

    if dtype not in (torch.bfloat16, torch.float16) or m > split_gemm.MAX_ROWS:
        return []
    return [MatmulKernel("split", tuple(zip(("block_n", "num_warps", "num_stages"), config)))
            for config in split_gemm.INT4_TUNED_CONFIGS]


def _fp8_candidates(layer: QuantizedLinear, m: int, dtype: torch.dtype) -> list[MatmulKernel]:
    """fp8: the GEMVs for decode, FP8 tensor cores (where the activations' dtype has them) for the rest, PyTorch's
    dequantized weight for float32."""
    if dtype == torch.float32:
        return [MatmulKernel("reference")]
    return (_gemv_candidates(m, dtype) + _two_part_candidates(layer, m, dtype) + [MatmulKernel("scaled_mm")]
            + _scaled_rows_candidates(layer, m, dtype) + _mixed_candidates(layer, m, dtype)
            + _cutlass_candidates(layer, m, dtype))


def _scaled_rows_candidates(layer: QuantizedLinear, m: int, dtype: torch.dtype) -> list[MatmulKernel]:
    """fp8: split_gemm's split-K kernel on FP8 tensor cores with the activations quantized per token as scaled_mm
    takes them, for split_gemm.SCALED_ROWS_MIN_ROWS to MAX_ROWS rows of bf16 or fp16 (where the card has FP8 dots;
    the TMA configurations where it has TMA)."""
    from ..kernels import split_gemm

    device = layer.weight.device
    if (not split_gemm.SCALED_ROWS_MIN_ROWS <= m <= split_gemm.MAX_ROWS or dtype not in (torch.bfloat16, torch.float16)
            or device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9)):
        return []
    names = ("block_n", "block_k", "num_warps", "num_stages", "tma")
    tma = _has_tma(device) and layer.in_features % 16 == 0  # TMA copies take rows on 16-byte boundaries
    return [MatmulKernel("split", (*zip(names, config), ("fp8_act", 1))) for config in split_gemm.SCALED_ROWS_CONFIGS
            if not config[4] or tma]


def default_plan(layer: QuantizedLinear) -> MatmulPlan:
    """Before (or without) tuning: gemv for decode-sized batches, gemm beyond."""
    if layer.scheme == "fp8":
        return ((1, MatmulKernel("rowgemv")), (64, MatmulKernel("skinny")), (1 << 30, MatmulKernel("scaled_mm")))
    return ((4, _gemv(layer, GEMV_CONFIGS[layer.bits][0])), (64, _gemm(layer, 64, "medium")),
            (1 << 30, _gemm(layer, 4096, "large")))


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def tolerance(dtype: torch.dtype, kernel: MatmulKernel | None = None) -> float:
    """Relative error a correct kernel stays under: the output's own rounding, with room; scaled_mm also rounds
    the activations to e4m3 (three mantissa bits), a few percent of the product, as do the other kernels that
    take them so (takes_fp8_rows)."""
    if kernel is not None and kernel.takes_fp8_rows:
        return 0.06
    return 1e-4 if dtype == torch.float32 else 1e-2


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (the weights as they sit on the device)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def replace_linear(parent: nn.Module, name: str, scheme: str) -> None:
    """parent.name (an nn.Linear without bias) becomes an empty QuantizedLinear of the same shape, on the
    same device (meta while the model is being built)."""
    linear = getattr(parent, name)
    if linear.bias is not None:
        raise ValueError(f"{name} has a bias; quantized layers have none")
    with linear.weight.device:
        setattr(parent, name, QuantizedLinear(linear.in_features, linear.out_features, scheme))

