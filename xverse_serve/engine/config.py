"""The engine's configuration, as settings.Settings builds it from the flags (the defaults live there)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int  # most sequences in one step
    max_batched_tokens: int  # most tokens (prompt chunks and decodes) computed in one step
    prefix_caching: bool = True
    max_prefill_with_decodes: int | None = None  # most prompt tokens in a step that also decodes; None: no cap


@dataclass(frozen=True)
class CacheConfig:
    """The KV pool: num_blocks blocks of block_size tokens, of `dtype` (None: the model's)."""

    num_blocks: int
    block_size: int
    dtype: torch.dtype | None = None


@dataclass(frozen=True)
class EngineConfig:
    """What loading an engine takes: the checkpoint, the device, the KV pool's plan and the scheduler's limits."""

    model_path: Path
    device: str  # auto, cpu, cuda or cuda:N
    dtype: str  # auto, bfloat16, float16 or float32
    max_model_len: int | None  # None: the model's max_position_embeddings
    quantize: str  # none, int8 or int4
    kv_cache_dtype: str  # auto, int8 or fp8
    block_size: int
    kv_cache_tokens: int | None  # None: planned from the card (CUDA) or four contexts (CPU)
    gpu_memory_utilization: float
    cuda_graphs: bool
    overlap_steps: bool
    scheduler: SchedulerConfig
    log_level: str = "info"  # the engine process's own logging
