"""Start-up of the server process: check the model folder, load the tokenizer and the model's facts, and start
the engine behind its client, in a process of its own (the default) or in a thread of this one."""

from __future__ import annotations

import dataclasses

from .engine.client import EngineClient
from .engine.process_transport import ProcessTransport
from .engine.thread_transport import ThreadTransport
from .model.checkpoint import check_model_dir, load_config, load_generation_defaults
from .model.tokenizer import Tokenizer
from .server.config import ServingContext
from .settings import Settings


def build_context(settings: Settings) -> ServingContext:
    """What the server runs on. Raises CheckpointError (its message says what to fix) if the model cannot load."""
    check_model_dir(settings.model_path)
    model_config = load_config(settings.model_path)
    tokenizer = Tokenizer(settings.model_path / "tokenizer.json", model_config)
    max_model_len = model_config.context_window(settings.max_model_len)
    engine_config = settings.engine_config()
    if settings.engine_process:
        transport = ProcessTransport(engine_config)
    else:
        from .engine.loader import load_engine  # here: with the engine in its own process, this one never loads it

        transport = ThreadTransport(load_engine(engine_config))
    defaults = load_generation_defaults(settings.model_path)
    return ServingContext(EngineClient(transport), tokenizer, model_config, defaults, settings.server_config(),
                          max_model_len)


def build_engine(settings: Settings) -> ServingContext:
    """build_context with the engine in a thread of this process, where ctx.engine.transport.engine can be driven
    directly (tests, benchmarks)."""
    return build_context(dataclasses.replace(settings, engine_process=False))
