"""Programmatic dependent launch (PDL; compute capability 9.0 and up) for the decode step's kernels.

A one-sequence decode step is a chain of short kernels, ten a layer with quantized weights. Between two kernels of
a stream the GPU lets the first drain (its last programs finishing while other multiprocessors idle) before it
starts the second, whose first loads then wait a memory latency: microseconds a kernel, in a step of a few
milliseconds. Launched with PDL, a kernel starts while the one before it is still running. Each kernel here first
lets the next one launch (gdc_launch_dependents), then waits until the one before it has finished and its writes
are visible (gdc_wait), and only then reads or writes anything; a GEMV first asks for its program's slice of the
weights to be brought into L2 (prefetch), so that the next projection's weights stream in while the kernels before
it end. Weights are written by no kernel, so reading them early is safe.

Why the chain stays correct: every kernel finishes only after its wait returned, so when a kernel's wait returns,
every kernel before it in the stream has finished. A kernel launched without PDL (PyTorch's, cuBLAS's) waits for
the whole of the kernel before it, as always. CUDA graphs capture the launches with their programmatic edges.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

# 0: off; 1: launched early, no prefetch; 2: launched early, GEMVs prefetching their weights (read at each launch)
LEVEL = int(os.environ.get("XVERSE_PDL", "0"))  # off until timed on a GPU
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _has_pdl(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (9, 0)


def launch(t: torch.Tensor) -> dict:
    """The launch arguments of a kernel that reads `t`: with PDL where its device has it (the kernel's constexpr
    PDL, the level, and Triton's launch_pdl), else PDL=0, which compiles the kernel as it was."""
    if LEVEL and not INTERPRET and t.is_cuda and _has_pdl(t.device):
        return {"PDL": LEVEL, "launch_pdl": True}
    return {"PDL": 0}


@triton.jit
def begin(PDL: tl.constexpr):
    """A kernel's first step: let the next kernel launch, and wait for the one before to finish."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


@triton.jit
def prefetch(start_ptr, nbytes, PDL: tl.constexpr):
    """Asks for the bytes [start_ptr, start_ptr + nbytes) to be brought into L2, once per program: thread 0 issues
    one bulk prefetch (a hint: no result, no wait) of the range's ends rounded inwards to 16 bytes (the bulk
    copy's unit), so that no byte outside it is touched. Only at level 2."""
    if PDL >= 2:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; .reg .u32 t, n; .reg .b64 a, e; "
            "mov.u32 t, %tid.x; add.s64 a, $1, 15; and.b64 a, a, -16; cvt.u64.u32 e, $2; add.s64 e, e, $1; "
            "and.b64 e, e, -16; sub.s64 e, e, a; cvt.u32.u64 n, e; setp.eq.u32 p, t, 0; setp.gt.and.s64 p, e, 0, p; "
            "@p cp.async.bulk.prefetch.L2.global [a], n; mov.u32 $0, 0; }",
            "=r,l,r", [start_ptr, nbytes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_rows(w_ptr, row0, rows, stride, PDL: tl.constexpr):
    """prefetch of a program's weights: `rows` rows of a row-major matrix from row0 on (stride in elements), one
    contiguous range."""
    element_bytes: tl.constexpr = w_ptr.dtype.element_ty.primitive_bitwidth // 8
    prefetch(w_ptr + row0.to(tl.int64) * stride, rows * stride * element_bytes, PDL)
