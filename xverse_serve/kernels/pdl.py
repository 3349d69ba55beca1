"""Programmatic dependent launch (PDL; compute capability 9.0 and up) for the decode step's kernels.

A one-sequence decode step is a chain of short kernels, ten a layer with quantized weights. Between two kernels of
a stream the GPU lets the first drain (its last programs finishing while other multiprocessors idle) before it
starts the second, whose first loads then wait a memory latency: microseconds a kernel, in a step of a few
milliseconds. Launched with PDL, a kernel is set up while the one before it is still running. Each kernel here
first lets the next one launch (gdc_launch_dependents), then waits until the one before it has finished and its
writes are visible (gdc_wait), and only then reads or writes anything. On an H100 (bench/one_row_bench.py --pdl
both, bench/results/one_row_pdl_h100.json) that took a one-sequence decode step from 5.27 to 5.12 ms in bf16, 3.46
to 3.25 with int8 weights and 3.01 to 2.84 with int4.

Tried and dropped: each GEMV program bulk-prefetching its slice of the weights into L2 before its wait (weights are
written by no kernel, so that is safe), so that the next projection's weights would stream in while the kernels
before it end: the same steps took 5.60, 3.77 and 3.22 ms, slower than without PDL (an earlier try with a prefetch
per cache line was slower too: gemv_chain_pdl_h100.json).

What a kernel reads that no kernel writes it may read between the two (launch_next, then wait): the one-row GEMVs
(kernels.gemv, kernels.dp4a_gemv) load their first step of weights into registers there, no extra traffic.

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

ENABLED = os.environ.get("XVERSE_PDL", "1") != "0"  # read at each launch
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _has_pdl(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (9, 0)


def launch(t: torch.Tensor) -> dict:
    """The launch arguments of a kernel that reads `t`: with PDL where its device has it (the kernel's constexpr
    PDL and Triton's launch_pdl), else PDL=False, which compiles the kernel as it was."""
    if ENABLED and not INTERPRET and t.is_cuda and _has_pdl(t.device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@triton.jit
def begin(PDL: tl.constexpr):
    """A kernel's first step: let the next kernel launch, and wait for the one before to finish."""
    launch_next(PDL)
    wait(PDL)


@triton.jit
def launch_next(PDL: tl.constexpr):
    """begin's first half: let the next kernel launch. A kernel may then read what no kernel writes (its weights)
    before `wait`."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def wait(PDL: tl.constexpr):
    """begin's second half: wait for the kernel before to finish, its writes visible."""
    if PDL:
        gdc_wait()
