"""Start-up: resolve device and dtype, load tokenizer and weights, size the KV cache, build the engine."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from .chat import Tokenizer
from .checkpoint import CheckpointError, GenerationDefaults, ModelConfig, load_config, load_generation_defaults, weight_files
from .engine import AsyncEngine, Engine
from .kv_cache import BlockAllocator, KVCache
from .cuda_graphs import DecodeGraphs
from .memory_plan import kv_cache_tokens_for_card, measure_step_peaks
from .model import XverseForCausalLM, load_model
from .piecewise_graphs import MAX_PIECEWISE_TOKENS, PiecewiseGraphs
from .quantization import INT4_GROUP, quantized_bytes
from .runner import ModelRunner
from .scheduler import Scheduler
from .settings import Settings

log = logging.getLogger(__name__)

DOWNLOAD_HINT = "python model_download.py"


@dataclass
class ServingContext:
    """What the server needs: the running engine and the facts of the loaded model."""

    engine: AsyncEngine
    tokenizer: Tokenizer
    config: ModelConfig
    generation_defaults: GenerationDefaults
    settings: Settings
    max_model_len: int


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


def check_quantize(scheme: str, config: ModelConfig) -> None:
    """int4 quantizes groups of INT4_GROUP input features: every projection's input must divide into them."""
    if scheme != "int4":
        return
    for name in ("hidden_size", "intermediate_size"):
        size = getattr(config, name)
        if size % INT4_GROUP:
            raise CheckpointError(f"--quantize int4 needs {name} to be a multiple of {INT4_GROUP} (its group size); "
                                  f"this model's is {size}: use --quantize int8")


def check_model_dir(settings: Settings) -> None:
    model_dir = settings.model_path
    if not model_dir.is_dir():
        raise CheckpointError(f"model folder {model_dir} not found: run `{DOWNLOAD_HINT}` or pass --model-path")
    missing = [name for name in ("config.json", "tokenizer.json") if not (model_dir / name).is_file()]
    if missing:
        raise CheckpointError(f"model folder {model_dir} is incomplete ({', '.join(missing)} missing): "
                              f"run `{DOWNLOAD_HINT}` again")
    try:
        weight_files(model_dir)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}: run `{DOWNLOAD_HINT}` again") from exc


def model_len(settings: Settings, config: ModelConfig) -> int:
    max_model_len = settings.max_model_len or config.max_position_embeddings
    if max_model_len > config.max_position_embeddings:
        raise CheckpointError(f"--max-model-len {max_model_len} exceeds the model's "
                              f"max_position_embeddings ({config.max_position_embeddings})")
    return max_model_len


def build_context(settings: Settings) -> ServingContext:
    """What the server runs on. With --engine-process (the default) the engine is loaded and run in a process of
    its own (engine_process.EngineProcess), else here, stepped by a thread once the server starts."""
    check_model_dir(settings)
    config = load_config(settings.model_path)
    tokenizer = Tokenizer(settings.model_path / "tokenizer.json", config)
    max_model_len = model_len(settings, config)
    if settings.engine_process:
        from .engine_process import EngineProcess

        engine = EngineProcess(settings)
    else:
        engine = AsyncEngine(load_engine(settings))
    return ServingContext(engine, tokenizer, config, load_generation_defaults(settings.model_path), settings,
                          max_model_len)


def build_engine(settings: Settings) -> ServingContext:
    """build_context with the engine in this process, where ctx.engine.engine can be driven directly."""
    return build_context(dataclasses.replace(settings, engine_process=False))


def load_engine(settings: Settings) -> Engine:
    """Loads the weights, sizes the KV cache, captures the decode graphs and warms the kernels up."""
    check_model_dir(settings)
    model_dir = settings.model_path
    config = load_config(model_dir)
    device = resolve_device(settings.device)
    if device.type == "cuda" and device.index is not None:
        # Triton launches and graph captures go to the current device: make it the one asked for (cuda:N).
        torch.cuda.set_device(device)
    dtype = resolve_dtype(settings.dtype, device)
    max_model_len = model_len(settings, config)
    kv_dtype = resolve_kv_cache_dtype(settings.kv_cache_dtype, device, dtype)
    check_quantize(settings.quantize, config)
    log.info("loading %s on %s as %s%s", model_dir, device, dtype,
             "" if settings.quantize == "none" else f", weights quantized to {settings.quantize}")
    started = time.perf_counter()
    model = load_model(model_dir, config, device, dtype, max_model_len, settings.quantize)
    tuned = settings.quantize != "none" and device.type == "cuda"
    log.info("weights: %.2f GiB, loaded%s in %.1f s", quantized_bytes(model) / 2**30,
             " and the quantized matmul kernels chosen" if tuned else "", time.perf_counter() - started)

    block_size = settings.block_size
    cuda_graphs = device.type == "cuda" and not settings.enforce_eager
    if settings.kv_cache_tokens is not None:
        kv_tokens = settings.kv_cache_tokens
    elif device.type == "cuda":
        peaks = measure_step_peaks(model, settings.max_num_seqs, settings.max_batched_tokens, max_model_len, block_size,
                                   kv_dtype, cuda_graphs)
        kv_tokens = kv_cache_tokens_for_card(model, settings.gpu_memory_utilization, peaks, cuda_graphs, kv_dtype)
    else:
        kv_tokens = 4 * max_model_len
    num_blocks = kv_tokens // block_size
    if num_blocks * block_size < max_model_len:
        raise CheckpointError(
            f"the KV cache holds {num_blocks * block_size} tokens, less than one {max_model_len}-token context: "
            "lower --max-model-len, or give the cache more memory (--gpu-memory-utilization, --kv-cache-tokens)"
        )
    capacity = num_blocks * block_size
    log.info("KV cache (%s): %d blocks of %d tokens = %d tokens, %.1f full %d-token contexts, %.2f GiB",
             str(kv_dtype).removeprefix("torch."), num_blocks, block_size, capacity, capacity / max_model_len,
             max_model_len, capacity * KVCache.bytes_per_token(config, kv_dtype) / 2**30)
    engine = assemble_engine(model, num_blocks, block_size, settings.max_num_seqs, settings.max_batched_tokens,
                             max_model_len, cuda_graphs, settings.prefix_caching, kv_dtype, settings.overlap_steps,
                             settings.max_prefill_with_decodes)
    if device.type == "cuda":
        started = time.perf_counter()
        engine.warm_up()
        log.info("warmed up the kernels in %.1f s", time.perf_counter() - started)
    return engine


def assemble_engine(model: XverseForCausalLM, num_blocks: int, block_size: int, max_num_seqs: int,
                    max_batched_tokens: int, max_model_len: int, cuda_graphs: bool = False,
                    prefix_caching: bool = True, kv_cache_dtype: torch.dtype | None = None,
                    overlap: bool = True, max_prefill_with_decodes: int | None = None) -> Engine:
    """The engine around a loaded model: KV pool (of kv_cache_dtype, default the model's), CUDA graphs,
    scheduler, runner; `overlap`: Engine's overlapped steps."""
    kv_cache = KVCache(model.config, num_blocks, block_size, kv_cache_dtype or model.dtype, model.device)
    graphs = pieces = None
    if cuda_graphs:
        started = time.perf_counter()
        graphs = DecodeGraphs(model, kv_cache, max_num_seqs, max_model_len)
        log.info("captured %d decode CUDA graphs (batch sizes up to %d) in %.1f s",
                 len(graphs.buckets), max_num_seqs, time.perf_counter() - started)
        started = time.perf_counter()
        pieces = PiecewiseGraphs(model, kv_cache, min(MAX_PIECEWISE_TOKENS, max_batched_tokens))
        log.info("captured the layers between attentions as CUDA graphs for %d step sizes (up to %d tokens) in "
                 "%.1f s", len(pieces.buckets), pieces.max_tokens, time.perf_counter() - started)
    # Every running sequence must be able to decode in every step, whatever the token budget.
    scheduler = Scheduler(BlockAllocator(num_blocks), block_size, max_num_seqs, max(max_batched_tokens, max_num_seqs),
                          prefix_caching, max_prefill_with_decodes)
    return Engine(ModelRunner(model, kv_cache, graphs, pieces), scheduler, model.config.eos_token_id, max_model_len,
                  overlap)
