"""Every flag and its default, in one place. Each flag can also be set through an environment variable."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path

ENV_PREFIX = "XVERSE_"
DEFAULT_MODEL_PATH = Path("models") / "xverse" / "XVERSE-7B-Chat"


@dataclass(frozen=True)
class Settings:
    model_path: Path = DEFAULT_MODEL_PATH
    host: str = "0.0.0.0"
    port: int = 6006
    device: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = None
    served_model_name: str = "XVERSE-7B-Chat"
    block_size: int = 16
    kv_cache_tokens: int | None = None
    gpu_memory_utilization: float = 0.90
    max_num_seqs: int = 256
    # 2048: prompts arriving together are prefilled four or so per step, so their first tokens come in turn and
    # running streams stall at most one such step (H200, 64 clients: TTFT p50 220 ms against 511 ms with 8192,
    # output tok/s within 1%; H100: a 6,144-token prompt at idle took 3% longer).
    max_batched_tokens: int = 2048
    max_prefill_with_decodes: int | None = None
    enforce_eager: bool = False
    prefix_caching: bool = True
    max_waiting: int = 1024
    max_body_bytes: int = 4 * 1024 * 1024
    request_timeout: float | None = None
    api_key: str | None = None
    cors_origin: str | None = None
    shutdown_grace: float = 30.0
    log_prompts: bool = False
    log_level: str = "info"
    quantize: str = "none"
    kv_cache_dtype: str = "auto"
    engine_process: bool = True
    overlap_steps: bool = True


# name -> (converter, help). argparse runs the converter on string defaults too, so values taken
# from the environment are checked like command-line ones.
OPTIONS = {
    "model_path": (Path, "folder holding config.json, tokenizer.json and the weight shards "
                         "(the one model_download.py fills)"),
    "host": (str, "address to listen on"),
    "port": (int, "port to listen on"),
    "device": (str, "auto (cuda when available, else cpu), cpu, cuda or cuda:N"),
    "dtype": (str, "auto (bfloat16 where the GPU supports it, else float16; float32 on CPU), "
                   "bfloat16, float16 or float32"),
    "max_model_len": (int, "context window in tokens, prompt and answer together; "
                           "unset: max_position_embeddings from config.json (8192)"),
    "served_model_name": (str, "model id reported by /v1/models and accepted in requests"),
    "block_size": (int, "tokens per KV-cache block"),
    "kv_cache_tokens": (int, "KV-cache capacity in tokens; unset: on CUDA, what "
                             "--gpu-memory-utilization leaves after the weights; on CPU, four full contexts"),
    "gpu_memory_utilization": (float, "fraction of the GPU's memory this process may use"),
    "max_num_seqs": (int, "most sequences in one step"),
    "max_batched_tokens": (int, "most tokens (prompt chunks and decodes) computed in one step"),
    "max_prefill_with_decodes": (int, "most prompt tokens computed in a step that also decodes: new prompts are "
                                      "spread over many steps, so running streams never wait long between "
                                      "tokens (H100, 64 clients, 512: inter-token p99 62 -> 41 ms, TTFT p50 "
                                      "225 -> 123 ms, output tokens/s 2%% lower); unset: --max-batched-tokens"),
    "enforce_eager": (bool, "run every step eagerly: no CUDA graphs"),
    "prefix_caching": (bool, "reuse the KV blocks of prompt prefixes seen before (earlier turns, shared system prompts)"),
    "max_waiting": (int, "most requests waiting for a place in the batch; beyond it new ones get 503 with Retry-After"),
    "max_body_bytes": (int, "largest request body accepted, in bytes; larger ones get 413"),
    "request_timeout": (float, "seconds a request may take from submission to its last token; unset: no limit"),
    "api_key": (str, "API key(s), comma-separated: every route but /health then needs `Authorization: Bearer KEY`"),
    "cors_origin": (str, "origin(s), comma-separated, allowed to call the API from a browser (CORS); off when unset"),
    "shutdown_grace": (float, "seconds in-flight requests may take to finish after SIGTERM/SIGINT; "
                              "new requests get 503 meanwhile"),
    "log_prompts": (bool, "put prompt and answer text in the per-request log lines (off: only ids, tokens, timings)"),
    "log_level": (str, "log level: debug, info, warning or error"),
    "quantize": (str, "weight-only quantization applied at load: none (the checkpoint's dtype), int8 "
                      "(per channel) or int4 (groups of 128) for the layers' projections; the lm_head and the "
                      "embeddings become int8 in both"),
    "kv_cache_dtype": (str, "KV-cache element type: auto (the model's dtype), int8 (with scales) or fp8 "
                            "(cards with fp8: Hopper, Ada)"),
    "engine_process": (bool, "run the engine (model, cache, scheduler) in a process of its own, so that the HTTP "
                             "server's Python work never holds up a step; off: in a thread of the server process"),
    "overlap_steps": (bool, "queue each step on the GPU before the previous one's tokens are read back, so "
                            "the host's work per step hides behind the GPU's (a sequence ended by end of text "
                            "computes one token more, dropped); off: one step at a time"),
}
CHOICES = {"dtype": ("auto", "bfloat16", "float16", "float32"), "log_level": ("debug", "info", "warning", "error"),
           "quantize": ("none", "int8", "int4"), "kv_cache_dtype": ("auto", "int8", "fp8")}
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes"), ("0", "false", "no")
POSITIVE = ("port", "max_waiting", "max_body_bytes", "request_timeout", "max_model_len", "block_size", "kv_cache_tokens", "max_num_seqs", "max_batched_tokens",
            "max_prefill_with_decodes")


SECRETS = ("api_key",)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default, except secrets: --help must not print a key taken from the environment."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.dest in SECRETS:
            return action.help or ""
        return super()._get_help_string(action)


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def parse_settings(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="python api.py",
        description="Serve XVERSE-7B-Chat: the seed's POST / API and an OpenAI-compatible API beside it.",
        formatter_class=DefaultsHelpFormatter,
    )
    defaults = Settings()
    for field in fields(Settings):
        converter, help_text = OPTIONS[field.name]
        flag, env = "--" + field.name.replace("_", "-"), env_name(field.name)
        default = environ.get(env, getattr(defaults, field.name))
        if converter is bool:  # --flag / --no-flag; from the environment 1/true/yes or 0/false/no
            if isinstance(default, str):
                if default.lower() not in TRUE_WORDS + FALSE_WORDS:
                    parser.error(f"{env} must be one of {', '.join(TRUE_WORDS + FALSE_WORDS)}, got {default!r}")
                default = default.lower() in TRUE_WORDS
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=f"{help_text} [env {env}]")
            continue
        parser.add_argument(flag, type=converter, choices=CHOICES.get(field.name), default=default,
                            help=f"{help_text} [env {env}]")
    settings = Settings(**vars(parser.parse_args(argv)))
    for name in POSITIVE:
        value = getattr(settings, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if settings.shutdown_grace < 0:
        parser.error(f"--shutdown-grace must be 0 or more, got {settings.shutdown_grace}")
    if not 0 < settings.gpu_memory_utilization <= 1:
        parser.error(f"--gpu-memory-utilization must be in (0, 1], got {settings.gpu_memory_utilization}")
    if settings.device != "auto" and settings.device != "cpu" and not settings.device.startswith("cuda"):
        parser.error(f"--device must be auto, cpu, cuda or cuda:N, got {settings.device!r}")
    return settings
