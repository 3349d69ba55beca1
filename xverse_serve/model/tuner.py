"""Start-up tuning of the quantized matmuls: for each layer shape, every candidate kernel (quantization.candidates)
timed at M = 1, 2, 4 ... rows, checked against the float32 reference, the fastest kept per M (`tune`); and the
kernels of the decoder's one-row steps chosen from the same timings (`one_row_family`, `one_row_options`).

Each shape is tuned once per process; Triton caches the compiled kernels on disk, so a later start only times them.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
from torch import nn

from ..kernels import cutlass_mixed
from .one_row import DP4A_ACT_BLOCKS
from .quantization import (
    BACKENDS,
    Fp8Rows,
    MatmulKernel,
    MatmulPlan,
    QuantizedLinear,
    candidates,
    dp4a_family,
    fp8_activations,
    reference_matmul,
    relative_error,
    tolerance,
)

log = logging.getLogger(__name__)

TUNE_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
TUNE_MAX_BYTES = 1 << 28  # rows tuned per shape: the float32 reference output stays under 256 MB

L2_FLUSH_BYTES = 256 << 20  # more than any GPU's L2 cache
# Decode-sized batches are timed as CUDA graphs (time_call); larger ones as launched, since a graph's private
# memory pool would hold their temporaries (a dequantized weight: 180 MB for gate_up_proj) beside the eager ones.
GRAPH_TIMING_MAX_ROWS = 64


def time_call(fn, flush: torch.Tensor, repeats: int = 15, graph: bool = True) -> float:
    """Median milliseconds of fn() on the current CUDA stream, the L2 cache emptied before each call (as a decode
    step meets each layer's weights: they were read a whole step ago). Calls fn once first (compiling it).

    With `graph`, fn runs as a CUDA graph where it can be captured, as decode steps run it: a candidate of two
    kernels (dp4a's quantize, then GEMV) then pays the graph's launch gap between them, not an eager launch's.
    L2 is emptied by reading `flush`: overwriting it would leave dirty lines whose write-back lands in the call."""
    fn()
    run = fn
    if graph:
        try:
            captured = torch.cuda.CUDAGraph()
            with torch.cuda.graph(captured):
                fn()
            run = captured.replay
        except RuntimeError:  # a kernel that cannot be captured: timed as launched
            torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        flush.sum(dtype=torch.int32)
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return sorted(start.elapsed_time(end) for start, end in events)[repeats // 2]


# Plans already measured in this process, by (scheme, N, K, group, dtype, device name).
_PLANS: dict[tuple, MatmulPlan] = {}
# What each plan's measurement saw: key -> {M: {kernel: milliseconds or error}}.
TIMINGS: dict[tuple, dict[int, dict[str, float | str]]] = {}


def plan_key(layer: QuantizedLinear, dtype: torch.dtype) -> tuple:
    """What a plan depends on: the layer's format and shape, the activations' dtype, the card, whether CUTLASS's
    GEMMs are among the candidates (XVERSE_CUTLASS, which a benchmark may change between loads), and whether its
    fp8 activations come quantized (QuantizedLinear.fp8_input_handed_over)."""
    return (layer.scheme, layer.out_features, layer.in_features, layer.group_size, str(dtype),
            torch.cuda.get_device_name(layer.weight.device), cutlass_mixed.enabled(), layer.fp8_input_handed_over)


def _usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, which a container's cpuset narrows), else all of them."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _compile_threads() -> int:
    value = os.environ.get("XVERSE_COMPILE_THREADS")
    if value is None:
        return min(8, _usable_cpus())
    if not value.isdigit():
        raise ValueError(f"XVERSE_COMPILE_THREADS takes a number of threads (0: compile as timed), got {value!r}")
    return int(value)


# Threads that call every tuning candidate once before the tuner times them one at a time, so that Triton
# compiles them side by side: its compiler releases the GIL. On an H100 machine with 16 CPU cores, int4's first
# start (an empty Triton cache) took 37 s with 8 threads and 103 s with none, and the plans were the same but for
# one near tie (bench/results/first_start_threads8_h100.json, first_start_threads0_h100.json). Default: 8, or
# the usable CPUs if fewer; 0 or 1: none.
COMPILE_THREADS = _compile_threads()
# Candidates that call cuBLAS are left to the timing pass: PyTorch gives each thread its own cuBLAS handle and
# workspace and keeps them after the thread ends (0.19 GiB more allocated after int4's load with 8 threads). So are
# CUTLASS's, compiled before the threads start (cutlass_mixed.served_module, when candidates() first offers them).
UNTHREADED_BACKENDS = frozenset({"cublas_int8", "scaled_mm", "dequantize", "reference", "cutlass"})


def _disabled_kernels() -> frozenset[str]:
    value = os.environ.get("XVERSE_DISABLED_KERNELS", "")
    names = frozenset(name.strip() for name in value.split(",") if name.strip())
    allowed = [backend for backend in BACKENDS if backend != "reference"]  # what runs where nothing else does
    if unknown := sorted(names - set(allowed)):
        raise ValueError(f"XVERSE_DISABLED_KERNELS takes kernel backends separated by commas, of {', '.join(allowed)};"
                         f" got {', '.join(unknown)}")
    return names


# Backends the tuner leaves out (XVERSE_DISABLED_KERNELS=mixed,imma_rows, as vLLM's VLLM_DISABLED_KERNELS): for a
# kernel that fails or hangs on a card or driver we have not run, without waiting for a release.
DISABLED_KERNELS = _disabled_kernels()
# A candidate still running after this many seconds is named in the log: a kernel that hangs would otherwise hang
# the start with no word (one of Triton's warp-specialised kernels did, in bench/imma_ws_lab.py). The slowest served
# candidate takes well under a second a call, a first compilation up to about ten seconds.
HANG_WARNING_S = 60.0


def tuning_candidates(layer: QuantizedLinear, m: int, dtype: torch.dtype) -> list[MatmulKernel]:
    """quantization.candidates, less those whose backend is in DISABLED_KERNELS."""
    return [kernel for kernel in candidates(layer, m, dtype) if kernel.backend not in DISABLED_KERNELS]


@contextmanager
def hang_warning(what: str, backends: str, seconds: float | None = None) -> Iterator[None]:
    """Logs a warning if the block is still running after `seconds` (HANG_WARNING_S), naming `what` and how to leave
    `backends` out; it cannot stop the block: a kernel that hangs holds the GPU until the process ends."""
    seconds = HANG_WARNING_S if seconds is None else seconds
    timer = threading.Timer(seconds, log.warning, ("%s has not finished after %g s; if the start hangs here, "
                                                   "XVERSE_DISABLED_KERNELS=%s leaves it out", what, seconds, backends))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def compile_candidates(layer: QuantizedLinear, dtype: torch.dtype, sizes: list[int],
                       threads: int | None = None) -> None:
    """Calls each candidate (but UNTHREADED_BACKENDS') once at each of `sizes` from `threads` threads
    (COMPILE_THREADS unless given; each call compiles what it launches that is not compiled yet) and waits for them.
    A call that fails is left to the timing pass, which calls it again and records why. Fewer than two threads:
    nothing to do."""
    threads = COMPILE_THREADS if threads is None else threads
    if threads < 2:
        return
    device = layer.weight.device
    gen = torch.Generator(device=device).manual_seed(0)
    inputs = {m: torch.randn(m, layer.in_features, generator=gen, device=device).to(dtype) for m in sizes}

    def call(job: tuple[int, MatmulKernel]) -> None:
        m, kernel = job
        try:
            kernel(inputs[m], layer)
        except Exception:  # noqa: BLE001 - timed (and its failure recorded) by measure_plan
            pass

    jobs = [(m, kernel) for m in sizes for kernel in tuning_candidates(layer, m, dtype)
            if kernel.backend not in UNTHREADED_BACKENDS]
    backends = ",".join(sorted({kernel.backend for _, kernel in jobs}))
    with hang_warning(f"compiling the {layer.scheme} {layer.out_features}x{layer.in_features} matmul's candidates "
                      f"({backends})", backends):
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(call, jobs))
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def measure_plan(layer: QuantizedLinear, dtype: torch.dtype) -> tuple[MatmulPlan, dict]:
    """Times every candidate at each tuning size, rejects any whose result is off, keeps the fastest."""
    gen = torch.Generator(device=layer.weight.device).manual_seed(0)
    width = max(layer.in_features, layer.out_features)
    sizes = [m for m in TUNE_SIZES if m == 1 or m * width * 4 <= TUNE_MAX_BYTES]
    compile_candidates(layer, dtype, sizes)
    plan: list[tuple[int, MatmulKernel]] = []
    timings: dict[int, dict[str, float | str]] = {}
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=layer.weight.device)
    for m in sizes:
        x = torch.randn(m, layer.in_features, generator=gen, device=layer.weight.device).to(dtype)
        reference = reference_matmul(x, layer)
        # As the layer will be given x: quantized by the kernel before (its cost there is a few stores, not a
        # kernel), for those that multiply e4m3 activations where the model hands them over.
        handed_over = Fp8Rows(*fp8_activations(x), dtype) if layer.fp8_input_handed_over else None
        timings[m] = {}
        best: tuple[float, MatmulKernel] | None = None
        for kernel in tuning_candidates(layer, m, dtype):
            given = handed_over if handed_over is not None and kernel.takes_fp8_rows else x
            try:
                with hang_warning(f"tuning the {layer.scheme} {layer.out_features}x{layer.in_features} matmul at "
                                  f"M={m}: {kernel}", kernel.backend):
                    error = relative_error(kernel(given, layer), reference)
                    if error > tolerance(dtype, kernel):
                        timings[m][str(kernel)] = f"rejected: relative error {error:.2e}"
                        continue
                    ms = time_call(lambda kernel=kernel, given=given: kernel(given, layer), flush,
                                   graph=m <= GRAPH_TIMING_MAX_ROWS)
            except Exception as exc:  # a backend this build or card lacks, or out of memory: not a candidate
                timings[m][str(kernel)] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                torch.cuda.empty_cache()
                continue
            timings[m][str(kernel)] = ms
            if best is None or ms < best[0]:
                best = (ms, kernel)
        del x, reference, handed_over
        if best is None:
            log.warning("no quantized matmul kernel works for %s at M=%d (%s): using the PyTorch reference",
                        layer.extra_repr(), m, timings[m])
            best = (float("inf"), MatmulKernel("reference"))
        if plan and plan[-1][1] == best[1]:
            plan[-1] = (m, best[1])
        else:
            plan.append((m, best[1]))
    return tuple(plan), timings


def tune(model: nn.Module, dtype: torch.dtype) -> None:
    """Gives every QuantizedLinear of a CUDA model the fastest kernel per M for its shape (measured once
    per shape and process), and chooses the kernels of its one-row steps (one_row_family)."""
    decoder_layers = []
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantizedLinear) or not layer.weight.is_cuda:
            continue
        key = plan_key(layer, dtype)
        if key not in _PLANS:
            _PLANS[key], TIMINGS[key] = measure_plan(layer, dtype)
            described = ", ".join(f"M<={m}: {kernel}" for m, kernel in _PLANS[key])
            log.info("%s %dx%d matmul: %s", layer.scheme, layer.out_features, layer.in_features, described)
        layer.plan = _PLANS[key]
        layer.keep_cutlass_operands()
        if not name.endswith("lm_head"):  # the decoder's projections
            decoder_layers.append((layer, TIMINGS[key].get(1, {})))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the timing graphs' memory, before the KV pool is planned
    if decoder_layers:
        family = one_row_family([timings for _, timings in decoder_layers], decoder_layers[0][0].one_row)
        for layer, timings in decoder_layers:
            layer.one_row = family
            layer.one_row_options = one_row_options(timings, family)


# The one-row path's fusions (the norm in the GEMV's prologue or the quantizing kernel, the residual add and
# SiLU * up in its epilogue) save the separate kernels of the general path: worth about this factor on the
# projections' own time.
ONE_ROW_MARGIN = 1.15
# Each one-row family, by the tuning candidates that time its GEMV at M = 1 (dp4a's with its quantizing kernel, in
# each of its shapes: a projection takes its family's fastest, one_row_options). Those a format lacks go unmeasured.
ONE_ROW_CANDIDATES = {"gemv": (MatmulKernel("rowgemv"),),
                      **{family: tuple(dp4a_family(family, 4)) for family in DP4A_ACT_BLOCKS}}


def one_row_family(timings: list[dict[str, float | str]], default: str | None) -> str | None:
    """The kernels one-row decode steps of a quantized model take (one_row.py), from its decoder projections'
    `timings` (each one's milliseconds by kernel at M = 1): the faster family of fused GEMVs over all of them,
    unless even that took over ONE_ROW_MARGIN times the fastest tuned kernels' time; then None, and one-row steps
    take each projection's tuned kernel. All or none, since the path runs whole. Nothing measured: `default`."""
    totals = dict.fromkeys(ONE_ROW_CANDIDATES, 0.0)
    fastest = 0.0
    for one_row in timings:
        times = [ms for ms in one_row.values() if isinstance(ms, float)]
        if not times:
            return default
        fastest += min(times)
        for family, kernels in ONE_ROW_CANDIDATES.items():
            totals[family] += _fastest_of(one_row, kernels)[0]
    family = min(totals, key=totals.get)
    if totals[family] <= ONE_ROW_MARGIN * fastest:
        return family
    log.info("one-row decode steps take the tuned kernels: %.3f ms of projections per step against the fused "
             "GEMVs' %.3f ms", fastest, totals[family])
    return None


def one_row_options(timings: dict[str, float | str], family: str | None) -> tuple[tuple[str, int], ...]:
    """The options of a projection's one-row GEMV in `family` (dp4a_arguments'): its fastest candidate's at M = 1;
    none where the family has no shapes to choose, or nothing was measured."""
    if family not in DP4A_ACT_BLOCKS:
        return ()
    ms, index = _fastest_of(timings, ONE_ROW_CANDIDATES[family])
    return ONE_ROW_CANDIDATES[family][index].options if ms < float("inf") else ()


def _fastest_of(timings: dict[str, float | str], kernels: tuple[MatmulKernel, ...]) -> tuple[float, int]:
    """(the least milliseconds among `kernels` that ran, its index), or (inf, 0) where none did."""
    times = [(ms, i) for i, kernel in enumerate(kernels) if isinstance(ms := timings.get(str(kernel)), float)]
    return min(times, default=(float("inf"), 0))

