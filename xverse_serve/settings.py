"""Every flag of `python api.py`, in one place: its default, help, choices and bounds, and its environment variable.

The --help text and the README's flags table are both generated from the fields below (`python -m
xverse_serve.settings` prints the table; tests/test_cli.py checks the README's copy). The engine and the server
each get a config object built from the settings, not the settings themselves."""

from __future__ import annotations

import argparse
import os
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .engine.config import EngineConfig, SchedulerConfig
from .server.config import ServerConfig

ENV_PREFIX = "XVERSE_"
DEFAULT_MODEL_PATH = Path("models") / "xverse" / "XVERSE-7B-Chat"
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes"), ("0", "false", "no")


def setting(default: Any, help: str, *, choices: tuple[str, ...] | None = None, above: float | None = None,
            at_least: float | None = None, at_most: float | None = None, power_of_two: bool = False,
            pattern: str | None = None, secret: bool = False) -> Any:
    """A field of Settings: `above`, `at_least`, `at_most` and `power_of_two` bound a number, `pattern` a string (a
    full match); a secret's value is never shown by --help."""
    return field(default=default, metadata=dict(help=help, choices=choices, above=above, at_least=at_least,
                                                at_most=at_most, power_of_two=power_of_two, pattern=pattern,
                                                secret=secret))


@dataclass(frozen=True)
class Settings:
    model_path: Path = setting(DEFAULT_MODEL_PATH, "folder with config.json, tokenizer.json and the weight shards "
                                                   "(the one `python model_download.py` fills)")
    host: str = setting("0.0.0.0", "address to listen on")
    port: int = setting(6006, "port to listen on", above=0)
    device: str = setting("auto", "`auto` (cuda when available, else cpu), `cpu`, `cuda` or `cuda:N`",
                          pattern=r"auto|cpu|cuda(:\d+)?")
    dtype: str = setting("auto", "`auto` (bfloat16 where the GPU supports it, else float16; float32 on the CPU), "
                                 "`bfloat16`, `float16` or `float32`",
                         choices=("auto", "bfloat16", "float16", "float32"))
    max_model_len: int | None = setting(None, "context window in tokens, prompt and answer together; unset: "
                                              "max_position_embeddings from config.json (8192)", above=0)
    served_model_name: str = setting("XVERSE-7B-Chat", "model id in /v1/models and accepted in requests")
    block_size: int = setting(16, "tokens per KV-cache block (a power of two: the decode kernel's tiles)",
                              power_of_two=True)
    kv_cache_tokens: int | None = setting(None, "KV-cache capacity in tokens; unset: on CUDA what "
                                                "--gpu-memory-utilization leaves after the weights, on the CPU four "
                                                "full contexts", above=0)
    gpu_memory_utilization: float = setting(0.90, "share of the GPU's memory this process may take", above=0,
                                            at_most=1)
    max_num_seqs: int = setting(256, "most requests decoded together", above=0)
    max_batched_tokens: int = setting(2048, "most tokens computed in one step; longer prompts are prefilled in "
                                            "chunks, and prompts that arrive together a few per step", above=0)
    max_prefill_with_decodes: int | None = setting(None, "most prompt tokens computed in a step that also "
                                                         "decodes, so that running streams never wait long between "
                                                         "tokens; unset: --max-batched-tokens", above=0)
    enforce_eager: bool = setting(False, "run every step eagerly, without CUDA graphs (slower; for debugging)")
    prefix_caching: bool = setting(True, "reuse the KV blocks of prompt prefixes seen before (earlier turns of a "
                                         "conversation, shared system prompts)")
    max_waiting: int = setting(1024, "most requests waiting for a place in the batch; beyond it a new request "
                                     "gets 503 with Retry-After", above=0)
    max_body_bytes: int = setting(4 * 1024 * 1024, "largest request body accepted, in bytes; larger ones get 413",
                                  above=0)
    request_timeout: float | None = setting(None, "seconds a request may take; past it the request is aborted with "
                                                  "504 (or an error event in a stream); unset: no limit", above=0)
    api_key: str | None = setting(None, "API key(s), comma-separated; when set, every route but /health needs "
                                        "`Authorization: Bearer KEY` (else 401)", secret=True)
    cors_origin: str | None = setting(None, "origin(s), comma-separated, that browsers may call the API from; no "
                                            "CORS headers when unset")
    shutdown_grace: float = setting(30.0, "seconds requests in flight may take to finish after SIGTERM/SIGINT; "
                                          "new requests get 503 meanwhile, and the rest then end with an error",
                                    at_least=0)
    log_prompts: bool = setting(False, "put prompt and answer text in the per-request log lines (and print the "
                                       "seed's own line for POST /)")
    log_level: str = setting("info", "log level", choices=("debug", "info", "warning", "error"))
    quantize: str = setting("none", "weight quantization applied while loading: `none` (the checkpoint's dtype), "
                                    "`int8` (per output channel) or `int4` (groups of 128), weight-only, or `fp8` "
                                    "(e4m3 per output channel, activations per token on FP8 tensor cores; compute "
                                    "capability 8.9+) for the layers' projections; the lm_head and the embeddings "
                                    "are int8 in each", choices=("none", "int8", "int4", "fp8"))
    kv_cache_dtype: str = setting("auto", "KV-cache element type: `auto` (the model's dtype), `int8` or `fp8` "
                                          "(e4m3, GPUs with compute capability 8.9+), 8-bit with a float32 "
                                          "scale per token and head", choices=("auto", "int8", "fp8"))
    engine_process: bool = setting(True, "run the engine (model, KV cache, scheduler) in a process of its own, so "
                                         "that the server's Python work never holds up a step; off: in a thread "
                                         "of the server process")
    overlap_steps: bool = setting(True, "queue each step on the GPU before the previous step's tokens are read "
                                        "back, so the host's per-step work runs while the GPU computes (a request "
                                        "ended by end of text computes one token more, dropped); off: one step "
                                        "at a time")

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model_path=self.model_path, device=self.device, dtype=self.dtype, max_model_len=self.max_model_len,
            quantize=self.quantize, kv_cache_dtype=self.kv_cache_dtype, block_size=self.block_size,
            kv_cache_tokens=self.kv_cache_tokens, gpu_memory_utilization=self.gpu_memory_utilization,
            cuda_graphs=not self.enforce_eager, overlap_steps=self.overlap_steps, log_level=self.log_level,
            scheduler=SchedulerConfig(max_num_seqs=self.max_num_seqs, max_batched_tokens=self.max_batched_tokens,
                                      prefix_caching=self.prefix_caching,
                                      max_prefill_with_decodes=self.max_prefill_with_decodes),
        )

    def server_config(self) -> ServerConfig:
        return ServerConfig(
            served_model_name=self.served_model_name, max_waiting=self.max_waiting, max_body_bytes=self.max_body_bytes,
            request_timeout=self.request_timeout, api_keys=split_list(self.api_key),
            cors_origins=split_list(self.cors_origin), shutdown_grace=self.shutdown_grace,
            log_prompts=self.log_prompts, kv_block_size=self.block_size,
        )


def split_list(value: str | None) -> tuple[str, ...]:
    """Comma-separated flag values (API keys, CORS origins)."""
    return tuple(item.strip() for item in (value or "").split(",") if item.strip())


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def value_type(field_name: str) -> type:
    """The field's type, without the `| None`."""
    hint = typing.get_type_hints(Settings)[field_name]
    return next(arg for arg in typing.get_args(hint) if arg is not type(None)) if typing.get_args(hint) else hint


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default, except secrets': --help must not print a key taken from the environment."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.dest in SECRETS:
            return action.help or ""
        return super()._get_help_string(action)


SECRETS = tuple(f.name for f in fields(Settings) if f.metadata["secret"])


def bound_error(field_name: str, value: object) -> str | None:
    """What is wrong with a value for a field, or None."""
    meta = next(f.metadata for f in fields(Settings) if f.name == field_name)
    if value is None:
        return None
    if meta["above"] is not None and value <= meta["above"]:
        return "must be positive" if meta["above"] == 0 else f"must be above {meta['above']:g}"
    if meta["at_least"] is not None and value < meta["at_least"]:
        return f"must be {meta['at_least']:g} or more"
    if meta["at_most"] is not None and value > meta["at_most"]:
        return f"must be at most {meta['at_most']:g}"
    if meta["power_of_two"] and (value <= 0 or value & (value - 1)):
        return "must be a power of two (1, 2, 4, 8, 16, ...)"
    if meta["pattern"] is not None and not re.fullmatch(meta["pattern"], value):
        return f"must match {meta['pattern']}"
    return None


def parse_settings(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="python api.py",
        description="Serve XVERSE-7B-Chat: the seed's POST / API and an OpenAI-compatible API beside it.",
        formatter_class=DefaultsHelpFormatter,
    )
    for settings_field in fields(Settings):
        name, meta = settings_field.name, settings_field.metadata
        flag, env = flag_name(name), env_name(name)
        default = environ.get(env, settings_field.default)
        help_text = f"{meta['help'].replace('%', '%%').replace('`', '')} [env {env}]"
        if value_type(name) is bool:  # --flag / --no-flag; from the environment 1/true/yes or 0/false/no
            if isinstance(default, str):
                if default.lower() not in TRUE_WORDS + FALSE_WORDS:
                    parser.error(f"{env} must be one of {', '.join(TRUE_WORDS + FALSE_WORDS)}, got {default!r}")
                default = default.lower() in TRUE_WORDS
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        # argparse converts string defaults too, so values taken from the environment are checked like flags.
        parser.add_argument(flag, type=value_type(name), choices=meta["choices"], default=default, help=help_text)
    settings = Settings(**vars(parser.parse_args(argv)))
    for settings_field in fields(Settings):
        value = getattr(settings, settings_field.name)
        if (problem := bound_error(settings_field.name, value)) is not None:
            parser.error(f"{flag_name(settings_field.name)} {problem}, got {value!r}")
    return settings


def flags_table() -> str:
    """The README's flags table, in Markdown."""
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for settings_field in fields(Settings):
        name, default = settings_field.name, settings_field.default
        flag = f"`{flag_name(name)}`"
        if value_type(name) is bool:
            flag += f" / `--no-{flag_name(name)[2:]}`"
            shown = "on" if default else "off"
        else:
            shown = "unset" if default is None else f"`{default}`"
        choices = settings_field.metadata["choices"]
        meaning = settings_field.metadata["help"]
        if choices and not all(f"`{choice}`" in meaning for choice in choices):
            meaning += f"; one of {', '.join(f'`{choice}`' for choice in choices)}"
        rows.append(f"| {flag} | `{env_name(name)}` | {shown} | {meaning} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(flags_table())
