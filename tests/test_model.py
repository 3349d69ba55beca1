"""Our decoder over the paged cache computes what transformers' LlamaForCausalLM computes on the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from paged import engine_tokens
from paged import paged_logits as shared_paged_logits
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

from xverse_serve.engine.config import CacheConfig, SchedulerConfig
from xverse_serve.engine.loader import assemble_engine
from xverse_serve.engine.messages import SamplingParams
from xverse_serve.engine.runner import ModelRunner
from xverse_serve.engine.scheduler import ScheduledSequence, Sequence
from xverse_serve.model.checkpoint import ModelConfig, is_skipped_tensor, iter_shard_tensors
from xverse_serve.model.kv_cache import KVCache
from xverse_serve.model.tokenizer import Tokenizer
from xverse_serve.model.xverse import XverseForCausalLM, load_model

CPU = torch.device("cpu")
MAX_POSITIONS = 256
BLOCK_SIZE = 4
NUM_BLOCKS = 64
PROMPTS = [
    "Human: Tell me a story about the sea and the sky.\n\nAssistant: ",
    "Human: 今天天气很好，我们去公园散步吧。请写一首关于大海的诗。\n\nAssistant: ",
    "Human: 鑫淼 is a rare name; what is 1234 + 5678?\n\nAssistant: ",
    "Human: def add(a, b):\n    return a + b\n\nAssistant: ",
]


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir: Path, config: ModelConfig) -> LlamaForCausalLM:
    """transformers' Llama in float32 on the checkpoint's weights (inv_freq buffers dropped)."""
    hf_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, hidden_act="silu", tie_word_embeddings=False,
        pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
    )
    model = LlamaForCausalLM(hf_config)
    weights = {name: t for name, t in iter_shard_tensors(tiny_model_dir) if not is_skipped_tensor(name)}
    model.load_state_dict(weights, strict=True)
    return model.float().eval()


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path, config: ModelConfig) -> XverseForCausalLM:
    return load_model(tiny_model_dir, config, CPU, torch.float32, MAX_POSITIONS)


def hf_logits(hf_model: LlamaForCausalLM, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([token_ids])).logits[0].float()


def paged_logits(model: XverseForCausalLM, token_ids: list[int], chunks: list[int], seed: int = 0) -> torch.Tensor:
    return shared_paged_logits(model, token_ids, chunks, seed=seed, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)

def assert_logits_close(ours: torch.Tensor, reference: torch.Tensor, relative: float) -> None:
    """Close relative to the logits' own scale, at every position."""
    torch.testing.assert_close(ours, reference, rtol=relative, atol=relative * reference.abs().max().item())


def random_ids(count: int, vocab_size: int, seed: int) -> list[int]:
    return torch.randint(4, vocab_size, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_prefill_logits_equal_transformers(model: XverseForCausalLM, hf_model: LlamaForCausalLM,
                                           tokenizer: Tokenizer) -> None:
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        assert_logits_close(paged_logits(model, ids, [len(ids)]), hf_logits(hf_model, ids), relative=1e-4)


def test_long_prefill_logits_equal_transformers(model: XverseForCausalLM, hf_model: LlamaForCausalLM,
                                                config: ModelConfig) -> None:
    ids = random_ids(200, config.vocab_size, seed=0)  # 50 blocks, positions far into the RoPE table
    assert_logits_close(paged_logits(model, ids, [len(ids)], seed=1), hf_logits(hf_model, ids), relative=1e-4)


def test_chunked_prefill_then_decodes_equals_one_full_prefill(model: XverseForCausalLM, hf_model: LlamaForCausalLM,
                                                              config: ModelConfig) -> None:
    ids = random_ids(47, config.vocab_size, seed=2)
    full = paged_logits(model, ids, [47], seed=3)
    chunked = paged_logits(model, ids, [7, 1, 12, 9, 5] + [1] * 13, seed=4)
    assert_logits_close(chunked, full, relative=1e-5)
    assert_logits_close(chunked, hf_logits(hf_model, ids), relative=1e-4)


def test_one_step_with_a_decode_and_a_prefill_equals_each_alone(model: XverseForCausalLM, config: ModelConfig) -> None:
    first, second = random_ids(10, config.vocab_size, seed=5), random_ids(9, config.vocab_size, seed=6)
    kv_cache = KVCache(config, NUM_BLOCKS, BLOCK_SIZE, torch.float32, CPU)
    runner = ModelRunner(model, kv_cache)
    decoding = Sequence("decoding", first, SamplingParams(max_tokens=1))
    decoding.block_table = [9, 2, 30]
    prefilling = Sequence("prefilling", second, SamplingParams(max_tokens=1))
    prefilling.block_table = [17, 0, 5]
    input_ids, positions, batch = runner.prepare([ScheduledSequence(decoding, 9)])
    with torch.inference_mode():
        model(input_ids, positions, kv_cache.layers, batch)
    decoding.num_computed = 9
    input_ids, positions, batch = runner.prepare([ScheduledSequence(decoding, 1), ScheduledSequence(prefilling, 9)])
    assert batch.num_decodes == 1
    with torch.inference_mode():
        logits = model.compute_logits(model(input_ids, positions, kv_cache.layers, batch))
    assert_logits_close(logits[:1], paged_logits(model, first, [10])[-1:], relative=1e-5)
    assert_logits_close(logits[1:], paged_logits(model, second, [9]), relative=1e-5)


def generate_with_engine(model: XverseForCausalLM, prompts: list[list[int]],
                         params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
    """All prompts at once through the engine (batched, paged), the tokens of each."""
    engine = assemble_engine(model, CacheConfig(NUM_BLOCKS, BLOCK_SIZE), SchedulerConfig(max_num_seqs=8, max_batched_tokens=512),
                             MAX_POSITIONS)
    return engine_tokens(engine, prompts, params)

def hf_generate(hf_model: LlamaForCausalLM, ids: list[int], max_new: int, **options) -> list[int]:
    with torch.no_grad():
        generated = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      max_new_tokens=max_new, do_sample=False, eos_token_id=3, pad_token_id=1,
                                      **options)
    return generated[0, len(ids):].tolist()


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.1])
def test_greedy_tokens_equal_transformers_generate(model: XverseForCausalLM, hf_model: LlamaForCausalLM,
                                                   tokenizer: Tokenizer, repetition_penalty: float) -> None:
    max_new = 24
    prompts = [tokenizer.encode(prompt) for prompt in PROMPTS]
    params = SamplingParams(max_tokens=max_new, temperature=0.0, repetition_penalty=repetition_penalty)
    ours = generate_with_engine(model, prompts, params)
    for text, ids, tokens in zip(PROMPTS, prompts, ours):
        expected = hf_generate(hf_model, ids, max_new, repetition_penalty=repetition_penalty)
        assert len(set(expected)) > 3, "the tiny model should not be degenerate"
        assert tokens == expected, text


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties over the tokens generated after the prompt, and its logit_bias,
    written out for transformers' generate as the reference."""

    def __init__(self, prompt_len: int, presence: float, frequency: float, bias: dict[int, float]) -> None:
        self.prompt_len, self.presence, self.frequency, self.bias = prompt_len, presence, frequency, bias

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        for token, bias in self.bias.items():
            scores[:, token] += bias
        for token in set(input_ids[0, self.prompt_len:].tolist()):
            count = input_ids[0, self.prompt_len:].tolist().count(token)
            scores[:, token] -= count * self.frequency + self.presence
        return scores


def test_presence_frequency_penalties_and_logit_bias_equal_openais_definition(model: XverseForCausalLM,
                                                                             hf_model: LlamaForCausalLM,
                                                                             tokenizer: Tokenizer) -> None:
    """Eight requests in one batch, each with its own penalties (one with none), greedy: each answer equals
    transformers' generate with OpenAI's definitions applied by hand, beside XVERSE's repetition penalty for one."""
    max_new = 20
    prompts = [tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(8)]
    plain = [hf_generate(hf_model, ids, max_new, min_new_tokens=max_new) for ids in prompts]
    # Negative penalties make the tiny model repeat itself (its greedy answers rarely do), so they change answers.
    settings = [dict(presence_penalty=-2.0), dict(frequency_penalty=-2.0),
                dict(presence_penalty=1.5, frequency_penalty=-1.0),
                dict(logit_bias=((plain[3][0], -100.0), (plain[3][1], 3.0))), dict(),
                dict(frequency_penalty=-2.0, repetition_penalty=1.05),
                dict(logit_bias=((7, 8.0),), presence_penalty=2.0), dict(presence_penalty=-1.0)]
    params = [SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True, **options) for options in settings]
    ours = generate_with_engine(model, prompts, params)
    for ids, tokens, options, unchanged in zip(prompts, ours, settings, plain):
        processor = OpenAIPenalties(len(ids), options.get("presence_penalty", 0.0),
                                    options.get("frequency_penalty", 0.0), dict(options.get("logit_bias", ())))
        expected = hf_generate(hf_model, ids, max_new, logits_processor=LogitsProcessorList([processor]),
                               repetition_penalty=options.get("repetition_penalty", 1.0), min_new_tokens=max_new)
        assert tokens == expected, options
        assert (tokens != unchanged) == bool(options), options  # every setting here changes its answer


def engine_outputs(model: XverseForCausalLM, prompts: list[list[int]], params: list[SamplingParams],
                   max_batched_tokens: int = 512, engine=None) -> list[list]:
    """Each request's StepOutputs, all requests in one batch stepped to the end (on `engine`, or a new one)."""
    engine = engine or assemble_engine(model, CacheConfig(NUM_BLOCKS, BLOCK_SIZE),
                                       SchedulerConfig(max_num_seqs=8, max_batched_tokens=max_batched_tokens),
                                       MAX_POSITIONS)
    for i, (ids, request_params) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), ids, request_params)
    outputs: list[list] = [[] for _ in prompts]
    while engine.has_work():
        for output in engine.step():
            outputs[int(output.request_id)].append(output)
    return outputs


def test_logprobs_are_the_models_log_softmax_at_each_generated_token(model: XverseForCausalLM,
                                                                     hf_model: LlamaForCausalLM,
                                                                     tokenizer: Tokenizer) -> None:
    """The log-probs of a generated token and of its top alternatives are those of the model's raw logits (before
    penalties, bias or temperature), whatever the request samples with; rows that do not ask get none."""
    prompts = [tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(4)]
    params = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3),
              SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0, frequency_penalty=-2.0,
                             logit_bias=((9, 5.0),)),
              SamplingParams(max_tokens=12, temperature=0.8, top_k=5, seed=3, ignore_eos=True, logprobs=20),
              SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)]
    for ids, request_params, outputs in zip(prompts, params, engine_outputs(model, prompts, params)):
        tokens = [t for output in outputs for t in output.new_token_ids]
        if request_params.logprobs is None:
            assert all(output.logprobs is None for output in outputs)
            continue
        logprobs = [lp for output in outputs for lp in output.logprobs]
        assert len(logprobs) == len(tokens) == 12
        reference = torch.log_softmax(hf_logits(hf_model, ids + tokens)[len(ids) - 1:-1], dim=-1)
        for position, (token, logprob) in enumerate(zip(tokens, logprobs)):
            assert logprob.logprob == pytest.approx(reference[position, token].item(), abs=1e-4)
            top = reference[position].topk(request_params.logprobs)
            assert [token_id for token_id, _ in logprob.top] == top.indices.tolist()
            assert [value for _, value in logprob.top] == pytest.approx(top.values.tolist(), abs=1e-4)


@pytest.mark.parametrize("max_batched_tokens", [512, 7])  # whole prompts, or chunks of 7 tokens
def test_prompt_logprobs_are_the_models_at_every_prompt_token(model: XverseForCausalLM, hf_model: LlamaForCausalLM,
                                                              tokenizer: Tokenizer, max_batched_tokens: int) -> None:
    """With prompt_logprobs, each prompt token but the first comes with its log-prob given the tokens before it and
    the top alternatives there, chunked or not, even where the prompt's blocks are in the prefix cache; with
    max_tokens 0 the request ends after its prompt with no token ("length")."""
    prompt = tokenizer.encode(PROMPTS[1] + PROMPTS[2])
    engine = assemble_engine(model, CacheConfig(NUM_BLOCKS, BLOCK_SIZE),
                             SchedulerConfig(max_num_seqs=8, max_batched_tokens=max_batched_tokens), MAX_POSITIONS)
    warm = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    engine_outputs(model, [prompt], [warm], engine=engine)  # its full blocks are now cached
    params = [SamplingParams(max_tokens=0, prompt_logprobs=2), SamplingParams(max_tokens=3, temperature=0.0,
                                                                               ignore_eos=True, prompt_logprobs=0)]
    echoed, generated = engine_outputs(model, [prompt, prompt], params, engine=engine)
    assert [(o.new_token_ids, o.finish_reason) for o in echoed] == [([], "length")]
    reference = torch.log_softmax(hf_logits(hf_model, prompt), dim=-1)
    for outputs, k in ((echoed, 2), (generated, 0)):
        found = outputs[0].prompt_logprobs
        assert len(found) == len(prompt) and found[0] is None
        for position, (token, logprob) in enumerate(zip(prompt[1:], found[1:])):
            assert logprob.logprob == pytest.approx(reference[position, token].item(), abs=1e-4)
            assert [i for i, _ in logprob.top] == reference[position].topk(k).indices.tolist()
        assert all(o.prompt_logprobs is None for o in outputs[1:])
    assert sum(len(o.new_token_ids) for o in generated) == 3
    assert engine.scheduler.allocator.num_free == NUM_BLOCKS


def test_bfloat16_logits_agree_loosely(tiny_model_dir: Path, config: ModelConfig, hf_model: LlamaForCausalLM,
                                       tokenizer: Tokenizer) -> None:
    bf16_model = load_model(tiny_model_dir, config, CPU, torch.bfloat16, MAX_POSITIONS)
    ids = tokenizer.encode("".join(PROMPTS))
    ours = paged_logits(bf16_model, ids, [len(ids) - 8] + [1] * 8)
    reference = hf_logits(hf_model, ids)
    assert ours.dtype == torch.float32
    assert_logits_close(ours, reference, relative=5e-2)
    # Rounding may flip a near-tie, but the top token agrees almost everywhere.
    agreement = (ours.argmax(-1) == reference.argmax(-1)).float().mean().item()
    assert agreement >= 0.9
