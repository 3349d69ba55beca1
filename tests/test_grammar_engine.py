"""Structured outputs in the engine: every token a constrained request draws follows its grammar, the rows beside it
in the batch are untouched, and the mask is applied on the device as its PyTorch definition says."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jsonschema
import llguidance
import pytest
import tokenizers
import torch
from paged import paged_logits

from xverse_serve.engine.config import CacheConfig, SchedulerConfig
from xverse_serve.engine.engine import Engine
from xverse_serve.engine.grammar import GrammarCompiler
from xverse_serve.engine.loader import assemble_engine, load_grammars
from xverse_serve.engine.messages import SamplingParams
from xverse_serve.engine.sampling import apply_token_masks
from xverse_serve.model.checkpoint import ModelConfig, load_config
from xverse_serve.model.tokenizer import Tokenizer
from xverse_serve.model.xverse import XverseForCausalLM, load_model

MAX_MODEL_LEN = 256
# The engine and its masks run where the server would: on the GPU when there is one (the device run's check).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["city", "days", "unit", "tags"],
    "additionalProperties": False,
}


def json_grammar(schema: dict) -> str:
    return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_flexible": False})


GRAMMAR = json_grammar(SCHEMA)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> XverseForCausalLM:
    return load_model(tiny_model_dir, load_config(tiny_model_dir), DEVICE, torch.float32, MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def grammars(tiny_model_dir: Path, config: ModelConfig) -> GrammarCompiler:
    return GrammarCompiler((tiny_model_dir / "tokenizer.json").read_text(), config.vocab_size, config.eos_token_id)


def make_engine(model: XverseForCausalLM, grammars: GrammarCompiler | None, overlap: bool = True) -> Engine:
    return assemble_engine(model, CacheConfig(128, 4), SchedulerConfig(16, 512), MAX_MODEL_LEN, overlap=overlap,
                           grammars=grammars)


def run(engine: Engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, tuple[list[int], str]]:
    for request_id, (prompt_ids, params) in requests.items():
        engine.add_request(request_id, prompt_ids, params)
    tokens: dict[str, list[int]] = {request_id: [] for request_id in requests}
    finished: dict[str, str] = {}
    for _ in range(2000):
        if not engine.has_work():
            break
        for output in engine.step():
            assert output.error is None, output.error
            assert output.request_id not in finished
            tokens[output.request_id] += output.new_token_ids
            if output.finish_reason:
                finished[output.request_id] = output.finish_reason
    assert set(finished) == set(requests)
    return {request_id: (tokens[request_id], finished[request_id]) for request_id in requests}


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(4, 500, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_apply_token_masks_follows_its_definition() -> None:
    generator = torch.Generator().manual_seed(0)
    vocab = 70  # not a multiple of 32: the last word's high bits are past the vocabulary
    logits = torch.randn(4, vocab, generator=generator)
    bits = torch.randint(-2**31, 2**31 - 1, (2, 3), generator=generator, dtype=torch.int64).to(torch.int32)
    rows = torch.tensor([3, 1])
    on_device = logits.to(DEVICE)
    masked = apply_token_masks(on_device, rows.to(DEVICE), bits.to(DEVICE)).cpu()
    expected = logits.clone()
    for i, row in enumerate(rows.tolist()):
        for token in range(vocab):
            word = int(bits[i, token // 32]) & 0xFFFFFFFF
            if not (word >> (token % 32)) & 1:
                expected[row, token] = float("-inf")
    assert torch.equal(masked, expected)
    assert not torch.isinf(on_device).any(), "the input logits (a CUDA graph's buffer) must be left as they were"


@pytest.mark.parametrize("overlap", [True, False])
def test_constrained_answers_parse_and_validate_and_rows_beside_them_are_unchanged(
        model: XverseForCausalLM, grammars: GrammarCompiler, tokenizer: Tokenizer, overlap: bool) -> None:
    free = {f"free{i}": (prompt(5 + 7 * i, seed=i), SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
            for i in range(3)}
    constrained = {
        f"json{i}": (prompt(9 + 5 * i, seed=10 + i),
                     # Penalties keep sampling state per sequence: one that the grammar ends between a step's forward
                     # pass and its draw must draw without it.
                     SamplingParams(max_tokens=200, temperature=1.0 if i % 2 else 0.0, seed=i, grammar=GRAMMAR,
                                    repetition_penalty=1.1 if i < 2 else 1.0, frequency_penalty=0.5 * (i == 3)))
        for i in range(4)}
    alone = {request_id: run(make_engine(model, grammars, overlap), {request_id: request})[request_id]
             for request_id, request in free.items()}
    mixed = run(make_engine(model, grammars, overlap), {**free, **constrained})
    for request_id in free:
        assert mixed[request_id] == alone[request_id], "an unconstrained row changed beside constrained ones"
    for request_id in constrained:
        ids, reason = mixed[request_id]
        assert reason == "stop"  # once the JSON is whole the grammar has ended: no end-of-text token is drawn
        jsonschema.validate(json.loads(tokenizer.decode(ids)), SCHEMA)


def test_the_grammar_decides_what_an_unconstrained_model_would_not_say(
        model: XverseForCausalLM, grammars: GrammarCompiler, tokenizer: Tokenizer) -> None:
    """The random model's greedy answer is not JSON; under the grammar the same request's is, and it is the model's
    most likely allowed token at each step (its first token is the likeliest of the few the grammar allows)."""
    prompt_ids = prompt(12, seed=5)
    free = run(make_engine(model, grammars), {"a": (prompt_ids, SamplingParams(max_tokens=30, temperature=0.0))})
    with pytest.raises(ValueError):
        json.loads(tokenizer.decode(free["a"][0]))
    enum_only = json_grammar({"enum": ["north", "south", "east", "west"]})
    ids, reason = run(make_engine(model, grammars),
                      {"a": (prompt_ids, SamplingParams(max_tokens=30, temperature=0.0, grammar=enum_only))})["a"]
    assert reason == "stop" and json.loads(tokenizer.decode(ids)) in ["north", "south", "east", "west"]
    matcher = grammars.matcher(enum_only)
    masks = grammars.masks([0], [matcher])
    allowed = [token for token in range(grammars.vocab_size)
               if (int(masks.bits[0, token // 32]) & 0xFFFFFFFF) >> (token % 32) & 1]
    logits = paged_logits(model, prompt_ids, [len(prompt_ids)], num_blocks=16, block_size=4)[-1]
    assert ids[0] == max(allowed, key=lambda token: logits[token].item())


def test_n_choices_each_follow_the_grammar_with_their_own_seed(
        model: XverseForCausalLM, grammars: GrammarCompiler, tokenizer: Tokenizer) -> None:
    engine = make_engine(model, grammars)
    shared = prompt(20, seed=7)
    for i in range(4):
        engine.add_request(f"c{i}", shared, SamplingParams(max_tokens=200, temperature=1.0, seed=100 + i,
                                                           grammar=GRAMMAR), shares_prompt_with="c0" if i else None)
    answers = {f"c{i}": [] for i in range(4)}
    while engine.has_work():
        for output in engine.step():
            assert output.error is None
            answers[output.request_id] += output.new_token_ids
    texts = [tokenizer.decode(ids) for ids in answers.values()]
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 1, "different seeds should give different answers"


def test_a_grammar_that_does_not_compile_is_refused_and_compiled_grammars_are_reused(
        model: XverseForCausalLM, grammars: GrammarCompiler) -> None:
    engine = make_engine(model, grammars)
    bad = llguidance.LLMatcher.grammar_from_lark("start: undefined_rule")
    with pytest.raises(ValueError, match="does not compile"):
        engine.add_request("bad", [5, 6], SamplingParams(max_tokens=4, grammar=bad))
    assert not engine.has_work()
    first, second = grammars.matcher(GRAMMAR), grammars.matcher(GRAMMAR)
    assert first is not second and len([g for g in grammars._compiled if g == GRAMMAR]) == 1
    no_grammars = make_engine(model, None)
    with pytest.raises(ValueError, match="structured outputs are off"):
        no_grammars.add_request("x", [5, 6], SamplingParams(max_tokens=4, grammar=GRAMMAR))


def test_a_tokenizer_llguidance_cannot_read_turns_grammars_off_with_a_warning(
        tiny_model_dir: Path, config: ModelConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert isinstance(load_grammars(tiny_model_dir / "tokenizer.json", config), GrammarCompiler)
    # A WordPiece decoder (bench/random_checkpoint.py's tokenizer has one) is a decoder llguidance does not know:
    # the server must still start, with structured outputs off.
    tokenizer = tokenizers.Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    tokenizer.decoder = tokenizers.decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    with caplog.at_level(logging.WARNING, logger="xverse_serve.engine.loader"):
        assert load_grammars(tmp_path / "tokenizer.json", config) is None
    assert "structured outputs and tool calls are off" in caplog.text and "WordPiece" in caplog.text


def test_preempted_constrained_sequences_resume_within_their_grammar(
        model: XverseForCausalLM, grammars: GrammarCompiler, tokenizer: Tokenizer) -> None:
    """A sequence preempted for blocks is recomputed from its prompt and output: its matcher, which has read that
    output, goes on from where it was."""
    engine = assemble_engine(model, CacheConfig(60, 4), SchedulerConfig(16, 512), MAX_MODEL_LEN, grammars=grammars)
    requests = {f"j{i}": (prompt(24, seed=30 + i), SamplingParams(max_tokens=200, temperature=1.0, seed=i,
                                                                  grammar=GRAMMAR)) for i in range(6)}
    results = run(engine, requests)
    assert engine.scheduler.num_preemptions > 0
    for ids, reason in results.values():
        assert reason == "stop"
        jsonschema.validate(json.loads(tokenizer.decode(ids)), SCHEMA)
