"""Reading an XVERSE checkpoint folder as shipped: config, generation defaults and weight shards."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

SUPPORTED_MODEL_TYPES = ("xverse", "llama")
BIN_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
DOWNLOAD_HINT = "python model_download.py"


class CheckpointError(Exception):
    """The model folder is missing, incomplete or does not hold an XVERSE/Llama checkpoint."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    max_tokenizer_truncation: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    pad_token_id: int
    bos_token_id: int
    eos_token_id: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def context_window(self, requested: int | None) -> int:
        """The context window served: --max-model-len if given (at most max_position_embeddings), else all of it."""
        window = requested or self.max_position_embeddings
        if window > self.max_position_embeddings:
            raise CheckpointError(f"--max-model-len {window} exceeds the model's "
                                  f"max_position_embeddings ({self.max_position_embeddings})")
        return window

    @classmethod
    def from_dict(cls, raw: dict) -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"config.json has model_type {model_type!r}; expected one of {SUPPORTED_MODEL_TYPES}"
            )
        if raw.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"config.json hidden_act {raw['hidden_act']!r} is not supported (only silu)")
        num_heads = raw["num_attention_heads"]
        if raw.get("num_key_value_heads", num_heads) != num_heads:
            raise CheckpointError("config.json asks for grouped-query attention; "
                                  "XVERSE models use multi-head attention")
        max_positions = raw.get("max_position_embeddings", 8192)
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            max_position_embeddings=max_positions,
            max_tokenizer_truncation=raw.get("max_tokenizer_truncation", max_positions),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=raw.get("rope_theta", 10000.0),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            pad_token_id=raw.get("pad_token_id", 1),
            bos_token_id=raw.get("bos_token_id", 2),
            eos_token_id=raw.get("eos_token_id", 3),
        )


@dataclass(frozen=True)
class GenerationDefaults:
    """generation_config.json, with XVERSE-7B-Chat's shipped values as the fallback."""

    do_sample: bool = True
    temperature: float = 0.5
    top_k: int = 30
    top_p: float = 0.85
    repetition_penalty: float = 1.1
    max_new_tokens: int = 2048

    @classmethod
    def from_dict(cls, raw: dict) -> GenerationDefaults:
        names = cls.__dataclass_fields__
        return cls(**{name: raw[name] for name in names if raw.get(name) is not None})


def load_config(model_dir: Path) -> ModelConfig:
    path = model_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    return ModelConfig.from_dict(json.loads(path.read_text()))


def load_generation_defaults(model_dir: Path) -> GenerationDefaults:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return GenerationDefaults()
    return GenerationDefaults.from_dict(json.loads(path.read_text()))


def weight_files(model_dir: Path) -> list[Path]:
    """The shard files named by the index (or the single unsharded file), all checked to exist."""
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = model_dir / index_name
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [model_dir / name for name in names]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{model_dir} is incomplete: {', '.join(missing)} missing "
                                      f"(named by {index_name})")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / single).is_file():
            return [model_dir / single]
    raise CheckpointError(f"{model_dir} holds no weights ({BIN_INDEX}, {SAFETENSORS_INDEX} or a single weight file)")


def check_model_dir(model_dir: Path) -> None:
    """Raises CheckpointError, naming what is missing and the command that fetches it, unless the folder holds
    config.json, tokenizer.json and every weight shard."""
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


def iter_shard_tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) shard by shard, memory-mapped, so at most one shard is touched at a time."""
    for path in weight_files(model_dir):
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as shard:
                for name in shard.keys():
                    yield name, shard.get_tensor(name)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()
            del state


def is_skipped_tensor(name: str) -> bool:
    # Rotary frequencies are recomputed from the config, never loaded.
    return name.endswith("rotary_emb.inv_freq")
