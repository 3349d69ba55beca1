"""Building an engine: resolve device and dtypes, load the weights, size the KV pool, capture the CUDA graphs,
warm the kernels up. Runs where the engine runs (the engine process, or the server's for the in-thread transport)."""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

import torch

from ..model.checkpoint import CheckpointError, ModelConfig, check_model_dir, load_config
from ..model.kv_cache import KVCache
from ..model.quantization import INT4_GROUP, quantized_bytes
from ..model.xverse import XverseForCausalLM, load_model
from .block_allocator import BlockAllocator
from .config import CacheConfig, EngineConfig, SchedulerConfig
from .cuda_graphs import DecodeGraphs
from .engine import Engine
from .grammar import GrammarCompiler
from .memory_plan import kv_cache_tokens_for_card, measure_step_peaks
from .piecewise_graphs import MAX_PIECEWISE_TOKENS, PiecewiseGraphs
from .runner import ModelRunner
from .scheduler import Scheduler

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"--device {name} asked for, but this machine has no usable CUDA GPU")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise CheckpointError(f"--device {name} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve_kv_cache_dtype(name: str, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """--kv-cache-dtype: auto is the model's dtype; int8 and fp8 (e4m3) are stored with per-token scales."""
    if name == "auto":
        return dtype
    if name == "int8":
        return torch.int8
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            raise CheckpointError(
                f"--kv-cache-dtype fp8 needs a GPU with fp8 support (compute capability 8.9 or newer: Ada, Hopper); "
                f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}: use --kv-cache-dtype int8"
            )
    return torch.float8_e4m3fn


def check_quantize(scheme: str, config: ModelConfig, device: torch.device) -> None:
    """int4 quantizes groups of INT4_GROUP input features: every projection's input must divide into them. fp8
    multiplies on FP8 tensor cores, which only cards of compute capability 8.9+ have."""
    if scheme == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise CheckpointError(f"--quantize fp8 needs a GPU with FP8 tensor cores (compute capability 8.9 or newer: "
                              f"Ada, Hopper); {torch.cuda.get_device_name(device)} has {major}.{minor}: use "
                              "--quantize int8")
    if scheme != "int4":
        return
    for name in ("hidden_size", "intermediate_size"):
        size = getattr(config, name)
        if size % INT4_GROUP:
            raise CheckpointError(f"--quantize int4 needs {name} to be a multiple of {INT4_GROUP} (its group size); "
                                  f"this model's is {size}: use --quantize int8")


def load_engine(config: EngineConfig) -> Engine:
    """Loads the weights, sizes the KV cache, captures the CUDA graphs and warms the kernels up."""
    check_model_dir(config.model_path)
    model_config = load_config(config.model_path)
    device = resolve_device(config.device)
    if device.type == "cuda" and device.index is not None:
        # Triton launches and graph captures go to the current device: make it the one asked for (cuda:N).
        torch.cuda.set_device(device)
    dtype = resolve_dtype(config.dtype, device)
    max_model_len = model_config.context_window(config.max_model_len)
    kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, device, dtype)
    check_quantize(config.quantize, model_config, device)
    log.info("loading %s on %s as %s%s", config.model_path, device, dtype,
             "" if config.quantize == "none" else f", weights quantized to {config.quantize}")
    started = time.perf_counter()
    model = load_model(config.model_path, model_config, device, dtype, max_model_len, config.quantize)
    tuned = config.quantize != "none" and device.type == "cuda"
    log.info("weights: %.2f GiB, loaded%s in %.1f s", quantized_bytes(model) / 2**30,
             " and the quantized matmul kernels chosen" if tuned else "", time.perf_counter() - started)

    block_size, scheduler = config.block_size, config.scheduler
    cuda_graphs = device.type == "cuda" and config.cuda_graphs
    if config.kv_cache_tokens is not None:
        kv_tokens = config.kv_cache_tokens
    elif device.type == "cuda":
        peaks = measure_step_peaks(model, scheduler.max_num_seqs, scheduler.max_batched_tokens, max_model_len,
                                   block_size, kv_dtype, cuda_graphs)
        kv_tokens = kv_cache_tokens_for_card(model, config.gpu_memory_utilization, peaks, cuda_graphs, kv_dtype)
    else:
        kv_tokens = 4 * max_model_len
    num_blocks = kv_tokens // block_size
    capacity = num_blocks * block_size
    if capacity < max_model_len:
        raise CheckpointError(
            f"the KV cache holds {capacity} tokens, less than one {max_model_len}-token context: "
            "lower --max-model-len, or give the cache more memory (--gpu-memory-utilization, --kv-cache-tokens)"
        )
    log.info("KV cache (%s): %d blocks of %d tokens = %d tokens, %.1f full %d-token contexts, %.2f GiB",
             str(kv_dtype).removeprefix("torch."), num_blocks, block_size, capacity, capacity / max_model_len,
             max_model_len, capacity * KVCache.bytes_per_token(model_config, kv_dtype) / 2**30)
    grammars = load_grammars(config.model_path / "tokenizer.json", model_config)
    engine = assemble_engine(model, CacheConfig(num_blocks, block_size, kv_dtype), scheduler, max_model_len,
                             cuda_graphs, config.overlap_steps, grammars)
    if device.type == "cuda":
        started = time.perf_counter()
        engine.warm_up()
        log.info("warmed up the kernels in %.1f s", time.perf_counter() - started)
    freeze_startup_objects()
    return engine


def load_grammars(tokenizer_path: Path, model_config: ModelConfig) -> GrammarCompiler | None:
    """The grammar compiler of structured outputs and tool calls; None, with a warning, where llguidance cannot read
    the tokenizer (a decoder it does not know): the server then serves everything else and answers requests that
    need a grammar with a 400 that says so."""
    started = time.perf_counter()
    try:
        grammars = GrammarCompiler(tokenizer_path.read_text(encoding="utf-8"), model_config.vocab_size,
                                   model_config.eos_token_id)
    except ValueError as exc:
        log.warning("structured outputs and tool calls are off: llguidance cannot read %s (%s)", tokenizer_path, exc)
        return None
    log.info("structured outputs: the tokenizer read by llguidance in %.1f s", time.perf_counter() - started)
    return grammars


def freeze_startup_objects() -> None:
    """Takes every object alive now (the model, the CUDA graphs, the compiled kernels, the libraries: some 400,000)
    out of the garbage collector's scans, as vLLM does after its start-up: a full collection over them takes about
    0.1 s (0.12 s on this project's CPU machine), a pause that falls in the middle of a step. They live as long as the
    process; one that builds another engine after this one calls gc.unfreeze() first, or the old engine's
    reference cycles (its graphs and cache) are never freed (bench/quant_bench.py)."""
    gc.collect()
    gc.freeze()


def assemble_engine(model: XverseForCausalLM, cache: CacheConfig, scheduler: SchedulerConfig, max_model_len: int,
                    cuda_graphs: bool = False, overlap: bool = True, grammars: GrammarCompiler | None = None) -> Engine:
    """The engine around a loaded model: the KV pool, the CUDA graphs (decode steps whole, steps with prompts
    between their attentions), the scheduler and the runner; `overlap`: the engine's overlapped steps; `grammars`:
    structured outputs (None: refused)."""
    kv_cache = KVCache(model.config, cache.num_blocks, cache.block_size, cache.dtype or model.dtype, model.device)
    graphs = pieces = None
    if cuda_graphs:
        started = time.perf_counter()
        graphs = DecodeGraphs(model, kv_cache, scheduler.max_num_seqs, max_model_len)
        log.info("captured %d decode CUDA graphs (batch sizes up to %d) in %.1f s",
                 len(graphs.buckets), scheduler.max_num_seqs, time.perf_counter() - started)
        started = time.perf_counter()
        pieces = PiecewiseGraphs(model, kv_cache, min(MAX_PIECEWISE_TOKENS, scheduler.max_batched_tokens))
        log.info("captured the layers between attentions as CUDA graphs for %d step sizes (up to %d tokens) in "
                 "%.1f s", len(pieces.buckets), pieces.max_tokens, time.perf_counter() - started)
    step_scheduler = Scheduler(BlockAllocator(cache.num_blocks), cache.block_size, scheduler)
    return Engine(ModelRunner(model, kv_cache, graphs, pieces), step_scheduler, model.config.eos_token_id,
                  max_model_len, overlap, grammars)
