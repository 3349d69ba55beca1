"""checkpoint.py and load_model: what a model folder must hold, and what loading it yields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_checkpoint import GENERATION_CONFIG, TINY_CONFIG, write_checkpoint

from xverse_serve.model.checkpoint import (
    CheckpointError,
    GenerationDefaults,
    ModelConfig,
    iter_shard_tensors,
    load_config,
    load_generation_defaults,
    weight_files,
)
from xverse_serve.model.xverse import checkpoint_tensors, load_model

CPU = torch.device("cpu")
XVERSE_7B_CONFIG = {
    "architectures": ["XverseForCausalLM"], "model_type": "xverse", "hidden_size": 4096,
    "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
    "max_position_embeddings": 8192, "max_tokenizer_truncation": 6144, "rms_norm_eps": 1e-6,
    "hidden_act": "silu", "tie_word_embeddings": False, "vocab_size": 100534, "torch_dtype": "bfloat16",
    "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 3,
}


def read_bin_shards(folder: Path) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in iter_shard_tensors(folder)}


def edit_shard(folder: Path, tensor_name: str, edit) -> None:
    """Applies `edit(state_dict)` to the .bin shard that holds `tensor_name`, in place."""
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    path = folder / index["weight_map"][tensor_name]
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def load(folder: Path, dtype: torch.dtype = torch.float32):
    return load_model(folder, load_config(folder), CPU, dtype, max_positions=64)


def write_safetensors_copy(source: Path, target: Path, num_shards: int) -> None:
    """The same weights as `source`, converted to sharded safetensors with their own index."""
    target.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        (target / name).write_text((source / name).read_text())
    tensors = read_bin_shards(source)
    names = sorted(tensors)
    per_shard = -(-len(names) // num_shards)
    weight_map = {}
    for shard in range(num_shards):
        file_name = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {name: tensors[name].contiguous() for name in names[shard * per_shard:(shard + 1) * per_shard]}
        save_file(part, str(target / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file_name))
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A fresh tiny checkpoint that a test may damage."""
    return write_checkpoint(tmp_path / "ckpt")


# --- config.json ---------------------------------------------------------------------------------------


def test_xverse_7b_config_is_read_as_plain_multi_head_llama() -> None:
    config = ModelConfig.from_dict(XVERSE_7B_CONFIG)
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (100534, 4096, 11008)
    assert (config.num_layers, config.num_heads, config.head_dim) == (32, 32, 128)
    assert (config.max_position_embeddings, config.max_tokenizer_truncation) == (8192, 6144)
    assert config.rope_theta == 10000.0  # XVERSE's config has no rope_theta: Llama's base applies
    assert config.rms_norm_eps == 1e-6
    assert not config.tie_word_embeddings
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (1, 2, 3)


def test_llama_model_type_is_accepted() -> None:
    config = ModelConfig.from_dict({**XVERSE_7B_CONFIG, "model_type": "llama", "rope_theta": 500000.0})
    assert config.rope_theta == 500000.0


def test_max_tokenizer_truncation_falls_back_to_the_context_length() -> None:
    raw = {key: value for key, value in XVERSE_7B_CONFIG.items() if key != "max_tokenizer_truncation"}
    assert ModelConfig.from_dict(raw).max_tokenizer_truncation == 8192


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", None])
def test_other_model_types_are_rejected_naming_the_type(model_type: str | None) -> None:
    raw = {**XVERSE_7B_CONFIG, "model_type": model_type}
    with pytest.raises(CheckpointError, match=f"model_type {model_type!r}.*xverse"):
        ModelConfig.from_dict(raw)


def test_grouped_query_attention_is_rejected() -> None:
    with pytest.raises(CheckpointError, match="grouped-query"):
        ModelConfig.from_dict({**XVERSE_7B_CONFIG, "num_key_value_heads": 8})


def test_num_key_value_heads_equal_to_heads_is_plain_multi_head() -> None:
    assert ModelConfig.from_dict({**XVERSE_7B_CONFIG, "num_key_value_heads": 32}).num_heads == 32


def test_activation_other_than_silu_is_rejected() -> None:
    with pytest.raises(CheckpointError, match="gelu"):
        ModelConfig.from_dict({**XVERSE_7B_CONFIG, "hidden_act": "gelu"})


def test_load_config_reads_the_folder(tiny_model_dir: Path) -> None:
    config = load_config(tiny_model_dir)
    assert config.hidden_size == TINY_CONFIG["hidden_size"]
    assert config.num_layers == TINY_CONFIG["num_hidden_layers"]


def test_missing_config_json_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json"):
        load_config(tmp_path)


# --- generation_config.json ----------------------------------------------------------------------------


def test_generation_defaults_fall_back_to_xverse_7b_chat_values(tmp_path: Path) -> None:
    defaults = load_generation_defaults(tmp_path)  # no generation_config.json here
    assert defaults == GenerationDefaults(do_sample=True, temperature=0.5, top_k=30, top_p=0.85,
                                          repetition_penalty=1.1, max_new_tokens=2048)


def test_generation_config_values_are_read(tmp_path: Path) -> None:
    values = {**GENERATION_CONFIG, "do_sample": False, "temperature": 0.7, "top_k": 5, "top_p": 0.5,
              "repetition_penalty": 1.3, "max_new_tokens": 100}
    (tmp_path / "generation_config.json").write_text(json.dumps(values))
    assert load_generation_defaults(tmp_path) == GenerationDefaults(
        do_sample=False, temperature=0.7, top_k=5, top_p=0.5, repetition_penalty=1.3, max_new_tokens=100)


def test_generation_config_missing_or_null_fields_fall_back(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.9, "top_k": None, "eos_token_id": 3}))
    defaults = load_generation_defaults(tmp_path)
    assert defaults.temperature == 0.9
    assert defaults.top_k == 30
    assert defaults.max_new_tokens == 2048


# --- weights -------------------------------------------------------------------------------------------


def test_loaded_weights_equal_the_shards_and_skip_inv_freq(tiny_model_dir: Path) -> None:
    on_disk = read_bin_shards(tiny_model_dir)
    assert any(name.endswith("rotary_emb.inv_freq") for name in on_disk)
    params = checkpoint_tensors(load(tiny_model_dir, torch.bfloat16))
    expected = {name: t for name, t in on_disk.items() if not name.endswith("rotary_emb.inv_freq")}
    assert set(params) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(params[name], tensor), name


def test_rotary_tables_come_from_the_config_not_the_inv_freq_buffers(checkpoint: Path) -> None:
    reference = load(checkpoint)
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    edit_shard(checkpoint, name, lambda state: state.update({name: state[name] * 3}))
    model = load(checkpoint)
    assert torch.equal(model.rope_cos, reference.rope_cos)
    assert torch.equal(model.rope_sin, reference.rope_sin)


def test_safetensors_shards_load_the_same_weights_as_bin_shards(tiny_model_dir: Path, tmp_path: Path) -> None:
    converted = tmp_path / "safetensors"
    write_safetensors_copy(tiny_model_dir, converted, num_shards=3)
    assert all(path.suffix == ".safetensors" for path in weight_files(converted))
    from_bin = load(tiny_model_dir).state_dict()
    from_safetensors = load(converted).state_dict()
    assert from_bin.keys() == from_safetensors.keys()
    for name in from_bin:
        assert torch.equal(from_bin[name], from_safetensors[name]), name


def test_a_single_unsharded_safetensors_file_loads(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "single"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    tensors = {name: t.contiguous() for name, t in read_bin_shards(tiny_model_dir).items()}
    save_file(tensors, str(folder / "model.safetensors"))
    assert weight_files(folder) == [folder / "model.safetensors"]
    loaded = load(folder).state_dict()
    for name, tensor in load(tiny_model_dir).state_dict().items():
        assert torch.equal(loaded[name], tensor), name


def test_missing_tensor_is_named(checkpoint: Path) -> None:
    name = "model.layers.1.mlp.up_proj.weight"
    edit_shard(checkpoint, name, lambda state: state.pop(name))
    with pytest.raises(CheckpointError, match=f"lacks.*{name}"):
        load(checkpoint)


def test_wrong_shaped_tensor_is_named_with_both_shapes(checkpoint: Path) -> None:
    name = "model.layers.0.self_attn.k_proj.weight"
    hidden = TINY_CONFIG["hidden_size"]
    edit_shard(checkpoint, name, lambda state: state.update({name: torch.zeros(hidden, hidden + 1, dtype=torch.bfloat16)}))
    with pytest.raises(CheckpointError, match=rf"{name}.*\({hidden}, {hidden + 1}\).*\({hidden}, {hidden}\)"):
        load(checkpoint)


def test_unexpected_tensor_is_named(checkpoint: Path) -> None:
    name = "model.layers.0.self_attn.q_proj.bias"
    edit_shard(checkpoint, "model.layers.0.self_attn.q_proj.weight",
               lambda state: state.update({name: torch.zeros(TINY_CONFIG["hidden_size"], dtype=torch.bfloat16)}))
    with pytest.raises(CheckpointError, match=f"unexpected tensor '{name}'"):
        load(checkpoint)


def test_missing_shard_file_is_named(checkpoint: Path) -> None:
    (checkpoint / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00002.bin"):
        weight_files(checkpoint)
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00002.bin"):
        load(checkpoint)


def test_folder_without_weights_is_a_checkpoint_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    with pytest.raises(CheckpointError, match="holds no weights"):
        weight_files(tmp_path)
