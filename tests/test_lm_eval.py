"""EleutherAI's lm-evaluation-harness as a real client: `lm_eval --model local-completions` against `python api.py`
on the tiny checkpoint gives the scores, and the very per-document results, that the same harness's `--model hf`
gives on the checkpoint's Llama twin: a loglikelihood task (echoed prompt log-probs) and a generation task."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_checkpoint import GENERATION_CONFIG

from xverse_serve.model.checkpoint import load_config

CHOICE_DOCS = [
    {"question": "The capital of France is", "choices": [" Paris", " a fox", " blue"], "answer": 0},
    {"question": "今天天气", "choices": ["很好", "不好", "一般"], "answer": 1},
    {"question": "def add(a, b):", "choices": [" return a + b", " pass", " print(a)"], "answer": 0},
    {"question": "Hello, who are", "choices": [" you?", " we?", " they?"], "answer": 0},
    {"question": "1 + 1 =", "choices": [" 2", " 3", " 11"], "answer": 0},
    {"question": "北京是中国的", "choices": ["首都", "城市", "大海"], "answer": 0},
]
GENERATION_DOCS = [{"prompt": prompt, "target": "x"} for prompt in
                   ["Tell me a story", "What is the capital of France?", "今天天气很好", "def add(a, b):"]]
CHOICE_TASK = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
GENERATION_TASK = """task: tiny_generation
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 12
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
"""


def write_llama_twin(model_dir: Path, twin: Path) -> Path:
    """The checkpoint as transformers loads it as LlamaForCausalLM (XVERSE is Llama): a Llama config.json, the same
    weights, tokenizer.json with a tokenizer_config.json naming its special tokens, the same generation_config.json."""
    twin.mkdir(parents=True, exist_ok=True)
    config = load_config(model_dir)
    (twin / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_heads, "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "float32", "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}))
    (twin / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": False,
        "model_max_length": config.max_position_embeddings}))
    # The same defaults (XVERSE's repetition penalty above all), without max_new_tokens: the harness sets the length.
    defaults = {key: value for key, value in GENERATION_CONFIG.items() if key != "max_new_tokens"}
    (twin / "generation_config.json").write_text(json.dumps(defaults))
    for name in ["tokenizer.json", "pytorch_model.bin.index.json",
                 *json.loads((model_dir / "pytorch_model.bin.index.json").read_text())["weight_map"].values()]:
        if not (twin / name).exists():
            shutil.copy(model_dir / name, twin / name)
    return twin


def run_lm_eval(model: str, model_args: str, tasks_dir: Path, out: Path) -> dict[str, list[dict]]:
    """Runs the `lm_eval` command as a user would and returns its logged samples, by task, in document order."""
    command = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args,
               "--tasks", "tiny_choice,tiny_generation", "--include_path", str(tasks_dir), "--device", "cpu",
               "--batch_size", "1", "--output_path", str(out), "--log_samples", "--seed", "1234"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=out.parent)
    assert result.returncode == 0, f"lm_eval failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    samples = {}
    for path in out.rglob("samples_*.jsonl"):
        task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
        samples[task] = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert set(samples) == {"tiny_choice", "tiny_generation"}, samples.keys()
    return samples


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, docs, template in (("choice", CHOICE_DOCS, CHOICE_TASK), ("generation", GENERATION_DOCS, GENERATION_TASK)):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs))
        (folder / f"tiny_{name}.yaml").write_text(template.format(data=data))
    return folder


def test_lm_eval_scores_through_the_server_equal_transformers_on_the_same_weights(server, tiny_model_dir, tasks_dir,
                                                                                  tmp_path):
    pytest.importorskip("lm_eval")
    twin = write_llama_twin(tiny_model_dir, tmp_path / "llama-twin")
    served = run_lm_eval("local-completions",
                         f"base_url={server.url}/v1/completions,model=XVERSE-7B-Chat,tokenizer_backend=huggingface,"
                         f"tokenizer={twin},tokenized_requests=True,max_length=256,num_concurrent=1,max_retries=1",
                         tasks_dir, tmp_path / "served")
    reference = run_lm_eval("hf", f"pretrained={twin},dtype=float32", tasks_dir, tmp_path / "hf")

    # Loglikelihood: each choice's summed log-prob and whether it is the greedy continuation.
    for ours, theirs in zip(served["tiny_choice"], reference["tiny_choice"], strict=True):
        for (our_logprob, our_greedy), (their_logprob, their_greedy) in zip(ours["filtered_resps"],
                                                                             theirs["filtered_resps"], strict=True):
            assert float(our_logprob) == pytest.approx(float(their_logprob), abs=1e-3)
            assert our_greedy == their_greedy
        assert ours["acc"] == theirs["acc"]
    # Generation: the very same text, document by document.
    for ours, theirs in zip(served["tiny_generation"], reference["tiny_generation"], strict=True):
        assert ours["filtered_resps"] == theirs["filtered_resps"]
        assert ours["filtered_resps"][0].strip(), "the tiny model should answer something"
