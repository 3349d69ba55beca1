"""What the HTTP server runs on: its own settings, the engine's client and the facts of the loaded model."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.client import EngineClient
from ..model.checkpoint import GenerationDefaults, ModelConfig
from ..model.tokenizer import Tokenizer


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str
    max_waiting: int
    max_body_bytes: int
    request_timeout: float | None
    api_keys: tuple[str, ...]
    cors_origins: tuple[str, ...]
    shutdown_grace: float
    log_prompts: bool
    kv_block_size: int  # tokens per KV-cache block, for the room n answers need


@dataclass
class ServingContext:
    engine: EngineClient
    tokenizer: Tokenizer
    model_config: ModelConfig
    generation_defaults: GenerationDefaults
    config: ServerConfig
    max_model_len: int
