"""Writes tiny checkpoints in XVERSE-7B-Chat's own file layout, for tests that need no download.

config.json with model_type xverse, generation_config.json, a tokenizer.json built with the `tokenizers`
library (BPE with byte fallback, Metaspace, digits split one by one, Chinese in its training text),
and bf16 pickled `.bin` shards with `pytorch_model.bin.index.json` and rotary `inv_freq` buffers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<unk>", "<pad>", "<|startoftext|>", "<|endoftext|>"]  # ids 0, 1, 2, 3 as in XVERSE
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]

CORPUS = [
    "Human: Hello, who are you?\n\nAssistant: I am XChat, a language model developed by XVERSE.",
    "The quick brown fox jumps over the lazy dog. Tell me a story about the sea and the sky.",
    "What is the capital of France? Paris is the capital of France. 1234567890",
    "Human: 你好，你是谁？\n\nAssistant: 我是元象公司开发的人工智能语言模型。",
    "今天天气很好，我们去公园散步吧。北京是中国的首都。请写一首关于大海的诗。",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
]

TINY_CONFIG = {
    "architectures": ["XverseForCausalLM"],
    "model_type": "xverse",
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 256,
    "max_tokenizer_truncation": 192,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "pad_token_id": 1,
    "bos_token_id": 2,
    "eos_token_id": 3,
}

GENERATION_CONFIG = {
    "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 3,
    "do_sample": True, "temperature": 0.5, "top_k": 30, "top_p": 0.85,
    "repetition_penalty": 1.1, "max_new_tokens": 2048,
}


def build_tokenizer(vocab_size: int = 400) -> Tokenizer:
    """Trains a small BPE, then gives it XVERSE's id layout: specials 0-3, byte tokens, learned tokens."""
    trainer_tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    trainer_tokenizer.train_from_iterator(CORPUS, trainer)
    spec = json.loads(trainer_tokenizer.to_str())
    learned = sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + BYTE_TOKENS)}
    for token, _ in learned:
        vocab.setdefault(token, len(vocab))
    spec["model"].update(vocab=vocab, byte_fallback=True, fuse_unk=True)
    spec["added_tokens"] = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    ]
    spec["decoder"] = json.loads(decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ]).__getstate__())
    return Tokenizer.from_str(json.dumps(spec))


def random_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Llama-named weights, large enough in scale that greedy choices are clear-cut."""
    gen = torch.Generator().manual_seed(seed)
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = hidden // config["num_attention_heads"]

    def rand(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(torch.bfloat16)

    weights = {"model.embed_tokens.weight": rand(vocab, hidden, scale=1.0)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            weights[prefix + f"self_attn.{name}.weight"] = rand(hidden, hidden, scale=hidden ** -0.5)
        weights[prefix + "self_attn.rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
        weights[prefix + "mlp.gate_proj.weight"] = rand(inter, hidden, scale=hidden ** -0.5)
        weights[prefix + "mlp.up_proj.weight"] = rand(inter, hidden, scale=hidden ** -0.5)
        weights[prefix + "mlp.down_proj.weight"] = rand(hidden, inter, scale=inter ** -0.5)
        weights[prefix + "input_layernorm.weight"] = (1 + rand(hidden, scale=0.1).float()).to(torch.bfloat16)
        weights[prefix + "post_attention_layernorm.weight"] = (1 + rand(hidden, scale=0.1).float()).to(torch.bfloat16)
    weights["model.norm.weight"] = (1 + rand(hidden, scale=0.1).float()).to(torch.bfloat16)
    weights["lm_head.weight"] = rand(vocab, hidden, scale=4 * hidden ** -0.5)
    return weights


def write_checkpoint(folder: Path, seed: int = 0, num_shards: int = 2, **config_overrides) -> Path:
    """A complete tiny XVERSE checkpoint folder; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {**TINY_CONFIG, "vocab_size": tokenizer.get_vocab_size(), **config_overrides}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    weights = random_weights(config, seed)
    names = list(weights)
    per_shard = -(-len(names) // num_shards)
    weight_map = {}
    for shard in range(num_shards):
        file_name = f"pytorch_model-{shard + 1:05d}-of-{num_shards:05d}.bin"
        part = {name: weights[name] for name in names[shard * per_shard:(shard + 1) * per_shard]}
        torch.save(part, folder / file_name)
        weight_map.update({name: file_name for name in part})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in weights.values())},
             "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    return folder


def never_ends(folder: Path) -> None:
    """Zeroes the end-of-text row of lm_head: its logit is always 0, never the largest of ~400 random logits,
    so greedy answers run to max_tokens."""
    weight_map = json.loads((folder / "pytorch_model.bin.index.json").read_text())["weight_map"]
    shard = folder / weight_map["lm_head.weight"]
    tensors = torch.load(shard, weights_only=True)
    eos_token_id = json.loads((folder / "config.json").read_text())["eos_token_id"]
    tensors["lm_head.weight"][eos_token_id] = 0
    torch.save(tensors, shard)
