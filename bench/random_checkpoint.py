"""Writes a checkpoint folder of XVERSE-7B-Chat's exact shape with random weights, for benchmarks without a download.

    python bench/random_checkpoint.py /tmp/xverse-random --llama-copy /tmp/xverse-random-llama
    python bench/random_checkpoint.py /tmp/xverse-tiny --tiny --llama-copy /tmp/xverse-tiny-llama

The folder holds config.json (model_type xverse), generation_config.json, a synthetic tokenizer.json of
exactly 100,534 ids, and bf16 safetensors shards (normal std 0.02, norms 1) with model.safetensors.index.json.
Shards are generated one at a time (on CUDA when available), so host memory stays near one shard.

The synthetic tokenizer is a WordLevel model: ids 0-3 are XVERSE's special tokens, then "Human",
"Assistant" and ":" (so XVERSE's chat format encodes without <unk>), then the words "w0", "w1", ...
A text of K words "wN" separated by spaces encodes to exactly K tokens, and every id decodes to text.

--llama-copy DIR2 writes a second folder that transformers loads as LlamaForCausalLM (for
`transformers serve`): a Llama config.json, the same tokenizer.json, a tokenizer_config.json with XVERSE's
chat format as its chat template, generation_config.json, and weight files that are symlinks to the first folder's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import CHAT_FORMAT_TOKENS, INIT_STD, NUM_WORDS, SPECIAL_TOKENS, WORD_PREFIX, XVERSE_7B, XVERSE_7B_CONFIG
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from xverse_serve.model.checkpoint import SAFETENSORS_INDEX, GenerationDefaults

# Same vocabulary and context, tiny layers: loads and runs on a CPU in seconds.
TINY_OVERRIDES = {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2, "num_attention_heads": 4}

# generation_config.json with XVERSE-7B-Chat's shipped values.
GENERATION_CONFIG = {"pad_token_id": XVERSE_7B.pad_token_id, "bos_token_id": XVERSE_7B.bos_token_id,
                     "eos_token_id": XVERSE_7B.eos_token_id, **dataclasses.asdict(GenerationDefaults())}

# XVERSE's chat format (xverse_serve/model/chat_format.py) as a Jinja template, for transformers' apply_chat_template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ 'Human: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'Human: ' + message['content'] + '\\n\\n' }}"
    "{% else %}{{ 'Assistant: ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return 2 * torch.Size(self.shape).numel()  # bf16

    @property
    def is_norm(self) -> bool:
        return self.name.endswith("norm.weight")


def model_config(tiny: bool) -> dict:
    return {**XVERSE_7B_CONFIG, **(TINY_OVERRIDES if tiny else {})}


def tensor_specs(config: dict) -> list[TensorSpec]:
    """Llama-named weights in the order the upstream shards hold them."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    specs = [TensorSpec("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        specs += [TensorSpec(prefix + f"self_attn.{p}_proj.weight", (hidden, hidden)) for p in "qkvo"]
        specs += [TensorSpec(prefix + "mlp.gate_proj.weight", (inter, hidden)),
                  TensorSpec(prefix + "mlp.up_proj.weight", (inter, hidden)),
                  TensorSpec(prefix + "mlp.down_proj.weight", (hidden, inter)),
                  TensorSpec(prefix + "input_layernorm.weight", (hidden,)),
                  TensorSpec(prefix + "post_attention_layernorm.weight", (hidden,))]
    specs += [TensorSpec("model.norm.weight", (hidden,)), TensorSpec("lm_head.weight", (vocab, hidden))]
    return specs


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors packed greedily into shards of at most max_shard_bytes (a larger tensor alone)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def random_shard(specs: list[TensorSpec], device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """One shard's tensors, generated on `device` and returned on the CPU."""
    gen = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for spec in specs:
        tensor = torch.empty(spec.shape, dtype=torch.bfloat16, device=device)
        if spec.is_norm:
            tensor.fill_(1.0)
        else:
            tensor.normal_(0.0, INIT_STD, generator=gen)
        tensors[spec.name] = tensor.cpu()
    return tensors


def write_weights(folder: Path, config: dict, device: torch.device, max_shard_bytes: int, seed: int) -> None:
    shards = plan_shards(tensor_specs(config), max_shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for number, specs in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        started = time.perf_counter()
        tensors = random_shard(specs, device, seed + number)
        save_file(tensors, str(folder / file_name), metadata={"format": "pt"})
        size = sum(spec.nbytes for spec in specs)
        total += size
        weight_map.update({spec.name: file_name for spec in specs})
        del tensors  # before the next shard is generated: host memory holds one shard at a time
        print(f"  {file_name}: {len(specs)} tensors, {size / 1e9:.2f} GB, {time.perf_counter() - started:.1f} s",
              flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))


def build_tokenizer() -> Tokenizer:
    """WordLevel over specials, chat-format words and w0..wN: exactly XVERSE's vocabulary size of ids."""
    words = CHAT_FORMAT_TOKENS + [f"{WORD_PREFIX}{i}" for i in range(NUM_WORDS)]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    # WordPiece's decoder joins tokens with spaces (none of ours carries the "##" prefix).
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    assert tokenizer.get_vocab_size() == XVERSE_7B.vocab_size, tokenizer.get_vocab_size()
    return tokenizer


BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
PRINTABLE = [chr(c) for c in range(0x21, 0x7F)]  # one token each, as in XVERSE's vocabulary: JSON is short


def build_bpe_tokenizer() -> Tokenizer:
    """A byte-fallback BPE with Metaspace, as XVERSE's own: any text encodes (JSON and tool calls included, which
    the WordLevel tokenizer cannot write), each printable ASCII character is a token, and so is each word "wN"
    below the vocabulary's room (the words are merged digit by digit: "▁w12" from "▁w1" and "2"). Exactly
    XVERSE's vocabulary size of ids."""
    fixed = SPECIAL_TOKENS + BYTE_TOKENS + ["▁"] + PRINTABLE + ["▁w"]
    num_words = XVERSE_7B.vocab_size - len(fixed)
    words = [f"▁{WORD_PREFIX}{i}" for i in range(num_words)]
    vocab = {token: i for i, token in enumerate(fixed + words)}
    merges = [("▁", WORD_PREFIX)] + [(words[i // 10] if i >= 10 else "▁w", str(i % 10)) for i in range(num_words)]
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    assert tokenizer.get_vocab_size() == XVERSE_7B.vocab_size, tokenizer.get_vocab_size()
    return tokenizer


def write_checkpoint(folder: Path, tiny: bool, device: torch.device, max_shard_bytes: int, seed: int,
                     bpe_tokenizer: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = model_config(tiny)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    (build_bpe_tokenizer() if bpe_tokenizer else build_tokenizer()).save(str(folder / "tokenizer.json"))
    write_weights(folder, config, device, max_shard_bytes, seed)


def llama_config(config: dict) -> dict:
    """The same model as transformers' LlamaForCausalLM sees it (XVERSE = Llama with multi-head attention)."""
    llama = {key: value for key, value in config.items() if key != "max_tokenizer_truncation"}
    return {**llama, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "num_key_value_heads": config["num_attention_heads"], "rope_theta": 10000.0,
            "attention_bias": False, "mlp_bias": False,
            # Without it transformers 5 takes the folder for an old Mistral one and warns about its tokenizer.
            "transformers_version": "5.17.0"}


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": SPECIAL_TOKENS[0], "pad_token": SPECIAL_TOKENS[1],
        "bos_token": SPECIAL_TOKENS[2], "eos_token": SPECIAL_TOKENS[3],
        "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": XVERSE_7B_CONFIG["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }


def write_llama_copy(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(llama_config(config), indent=2))
    (target / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2))
    for name in ("generation_config.json", "tokenizer.json", SAFETENSORS_INDEX):
        shutil.copyfile(source / name, target / name)
    for shard in sorted(set(json.loads((source / SAFETENSORS_INDEX).read_text())["weight_map"].values())):
        link = target / shard
        link.unlink(missing_ok=True)
        link.symlink_to((source / shard).resolve())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("folder", type=Path, help="where to write the XVERSE checkpoint")
    parser.add_argument("--tiny", action="store_true", help="tiny layers (same vocabulary and context) for CPU checks")
    parser.add_argument("--llama-copy", type=Path, default=None, help="also write a transformers (Llama) view here")
    parser.add_argument("--shard-gb", type=float, default=None, help="most GB per shard (default 3, tiny 0.03)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the random numbers are generated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bpe-tokenizer", action="store_true",
                        help="a byte-fallback BPE tokenizer that can write JSON (structured_bench.py needs it)")
    args = parser.parse_args()

    shard_gb = args.shard_gb or (0.03 if args.tiny else 3.0)
    started = time.perf_counter()
    print(f"writing {'tiny' if args.tiny else 'XVERSE-7B'} random checkpoint to {args.folder} "
          f"(generated on {args.device})", flush=True)
    write_checkpoint(args.folder, args.tiny, torch.device(args.device), int(shard_gb * 1e9), args.seed,
                     args.bpe_tokenizer)
    if args.llama_copy:
        write_llama_copy(args.folder, args.llama_copy)
        print(f"llama copy (symlinked weights) in {args.llama_copy}", flush=True)
    print(f"done in {time.perf_counter() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main()
