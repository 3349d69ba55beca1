"""The engine: continuous batching over the paged cache gives every request the tokens it would get alone."""

from __future__ import annotations

import asyncio
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest
import torch

from xverse_serve.engine.block_allocator import BlockAllocator
from xverse_serve.engine.client import EngineClient, EngineDead
from xverse_serve.engine.config import CacheConfig, SchedulerConfig
from xverse_serve.engine.engine import Engine
from xverse_serve.engine.loader import assemble_engine
from xverse_serve.engine.messages import EngineStats, SamplingParams, StepOutput, StepReport
from xverse_serve.engine.piecewise_graphs import PiecewiseGraphs
from xverse_serve.engine.runner import Feed, ModelRunner, StepLogits
from xverse_serve.engine.scheduler import ScheduledSequence, Scheduler
from xverse_serve.engine.thread_transport import ThreadTransport
from xverse_serve.launch import build_engine
from xverse_serve.model.checkpoint import load_config
from xverse_serve.model.kv_cache import KVCache
from xverse_serve.model.tokenizer import Tokenizer
from xverse_serve.model.xverse import XverseForCausalLM, load_model
from xverse_serve.server.generation import GenerationFailed, generate_text
from xverse_serve.server.service import FAILURE_TYPES, failure_message
from xverse_serve.settings import parse_settings

MAX_MODEL_LEN = 256
BLOCK_SIZE = 4
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> XverseForCausalLM:
    config = load_config(tiny_model_dir)
    return load_model(tiny_model_dir, config, torch.device("cpu"), torch.float32, MAX_MODEL_LEN)


def make_engine(model: XverseForCausalLM, num_blocks: int = 128, max_num_seqs: int = 16,
                max_batched_tokens: int = 512, max_model_len: int = MAX_MODEL_LEN, overlap: bool = True) -> Engine:
    return assemble_engine(model, CacheConfig(num_blocks, BLOCK_SIZE), SchedulerConfig(max_num_seqs, max_batched_tokens),
                           max_model_len, overlap=overlap)


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(4, 500, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


PROMPTS = {f"r{i}": prompt(length, seed=i) for i, length in enumerate([3, 17, 40, 9, 25, 1])}


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class StepLog:
    """What each step scheduled: (request id, tokens already cached, new tokens) per entry."""

    steps: list[list[tuple[str, int, int]]] = field(default_factory=list)
    running: list[int] = field(default_factory=list)
    fed: list[bool] = field(default_factory=list)  # whether the step took tokens from the one before on the device

    def watch(self, engine: Engine) -> None:
        run = engine.runner.forward

        def logged_run(scheduled: list[ScheduledSequence], feed: Feed | None = None) -> StepLogits:
            self.steps.append([(e.seq.request_id, e.seq.num_computed, e.num_new_tokens) for e in scheduled])
            self.running.append(len(engine.scheduler.running))
            self.fed.append(feed is not None)
            return run(scheduled, feed)

        engine.runner.forward = logged_run


def collect(engine: Engine, results: dict[str, Result], max_steps: int = 5000) -> None:
    """Steps until no work is left; each request's outputs end with exactly one finish."""
    for _ in range(max_steps):
        if not engine.has_work():
            return
        for output in engine.step():
            result = results.setdefault(output.request_id, Result())
            assert output.error is None, output.error
            assert result.finish_reason is None, f"{output.request_id} got output after finishing"
            result.tokens += output.new_token_ids
            result.finish_reason = output.finish_reason
    raise AssertionError(f"the engine still has work after {max_steps} steps")


def run_all(engine: Engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, Result]:
    for request_id, (prompt_ids, params) in requests.items():
        engine.add_request(request_id, prompt_ids, params)
    results: dict[str, Result] = {}
    collect(engine, results)
    assert set(results) == set(requests)
    return results


def alone(model: XverseForCausalLM, prompt_ids: list[int], params: SamplingParams, **engine_args) -> Result:
    return run_all(make_engine(model, **engine_args), {"alone": (prompt_ids, params)})["alone"]


def assert_all_blocks_free(engine: Engine) -> None:
    allocator = engine.scheduler.allocator
    assert allocator.num_free == allocator.num_blocks
    assert sorted(allocator._free) == list(range(allocator.num_blocks)), "a block was freed twice or lost"
    assert not engine.sequences and not engine.has_work()


# --- batching --------------------------------------------------------------------------------------------


def test_batched_paged_decoding_equals_one_at_a_time(model: XverseForCausalLM) -> None:
    expected = {rid: alone(model, ids, GREEDY) for rid, ids in PROMPTS.items()}
    engine = make_engine(model)
    log = StepLog()
    log.watch(engine)
    results = run_all(engine, {rid: (ids, GREEDY) for rid, ids in PROMPTS.items()})
    assert results == expected
    assert all(len(r.tokens) == GREEDY.max_tokens and r.finish_reason == "length" for r in results.values())
    assert max(len(step) for step in log.steps) == len(PROMPTS), "all requests should share steps"
    assert_all_blocks_free(engine)


def test_requests_joining_mid_generation_equal_one_at_a_time(model: XverseForCausalLM) -> None:
    expected = {rid: alone(model, ids, GREEDY) for rid, ids in PROMPTS.items()}
    engine = make_engine(model)
    results: dict[str, Result] = {}
    arrivals = list(PROMPTS.items())
    while arrivals or engine.has_work():
        if arrivals:
            request_id, ids = arrivals.pop(0)
            engine.add_request(request_id, ids, GREEDY)
        for _ in range(3):
            for output in engine.step():
                result = results.setdefault(output.request_id, Result())
                result.tokens += output.new_token_ids
                result.finish_reason = output.finish_reason
    assert results == expected
    assert_all_blocks_free(engine)


def test_chunked_prefill_equals_unchunked(model: XverseForCausalLM) -> None:
    requests = {rid: (ids, GREEDY) for rid, ids in PROMPTS.items()}
    unchunked = run_all(make_engine(model), requests)
    engine = make_engine(model, max_num_seqs=4, max_batched_tokens=8)
    log = StepLog()
    log.watch(engine)
    chunked = run_all(engine, requests)
    assert chunked == unchunked
    assert all(sum(n for _, _, n in step) <= 8 for step in log.steps)
    later_chunks = [(rid, done) for step in log.steps for rid, done, n in step
                    if 0 < done < len(PROMPTS[rid]) and n > 1]
    assert later_chunks, "some prompt should have been computed in several chunks"
    assert_all_blocks_free(engine)


def test_max_prefill_with_decodes_caps_the_prompt_tokens_of_steps_that_decode(model: XverseForCausalLM) -> None:
    """Prompts arriving while others decode are spread over steps of at most 5 prompt tokens; a step with no
    decode takes the whole budget; no request's tokens change."""
    requests = {rid: (ids, GREEDY) for rid, ids in PROMPTS.items()}
    expected = {rid: alone(model, ids, GREEDY) for rid, ids in PROMPTS.items()}
    engine = make_engine(model, max_batched_tokens=32)
    engine.scheduler.max_prefill_with_decodes = 5
    log = StepLog()
    log.watch(engine)
    first = "r1"  # 17 prompt tokens, decoding before the others arrive
    engine.add_request(first, *requests[first])
    results: dict[str, Result] = {}
    engine.step()
    for rid, request in requests.items():
        if rid != first:
            engine.add_request(rid, *request)
    collect(engine, results)
    assert results == expected
    capped = 0
    for step in log.steps:
        prompt_tokens = sum(n for rid, done, n in step if done < len(PROMPTS[rid]) and n > 1)
        if any(done >= len(PROMPTS[rid]) for rid, done, _ in step):
            assert prompt_tokens <= 5, step
            capped += prompt_tokens == 5
        else:
            assert prompt_tokens <= 32
    assert log.steps[0] == [(first, 0, 17)]  # alone and not decoding: the whole prompt
    assert capped >= 5, "the cap should have held back prompt tokens in several steps"
    assert_all_blocks_free(engine)


def test_the_model_cut_at_its_attentions_gives_the_tokens_of_the_whole_forward(model: XverseForCausalLM) -> None:
    """piecewise_graphs' pieces, run eagerly on the CPU, with every step padded up to a bucket of 32 or 40 tokens:
    chunked prompts beside decodes get the tokens of the whole forward; the padded rows write only the null slot
    (a stale slot would overwrite a live sequence's keys)."""
    engine = make_engine(model, max_batched_tokens=24)
    pieces = PiecewiseGraphs(model, engine.runner.kv_cache, 40, capture=False)
    assert pieces.buckets == [32, 40]
    engine.runner.pieces = pieces
    sizes = []
    forward = pieces.forward
    pieces.forward = lambda input_ids, *args: sizes.append(input_ids.shape[0]) or forward(input_ids, *args)
    requests = {rid: (ids, GREEDY) for rid, ids in PROMPTS.items()}
    results = run_all(engine, {"r1": requests["r1"]})
    results |= run_all(engine, requests)  # the same again beside the others, from the prefix cache
    assert results == {rid: alone(model, ids, GREEDY) for rid, ids in PROMPTS.items()}
    assert max(sizes) <= 24 and sum(size > 1 for size in sizes) >= 4
    assert_all_blocks_free(engine)


def test_preemption_recomputes_and_gives_the_same_tokens(model: XverseForCausalLM) -> None:
    # Each sequence grows to 12 + 24 = 36 tokens (9 blocks); the pool holds 12 blocks, one full context.
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=24, temperature=1.0, seed=7, ignore_eos=True)
    requests = {f"p{i}": (prompt(12, seed=100 + i), seeded if i == 2 else params) for i in range(4)}
    expected = {rid: alone(model, ids, p) for rid, (ids, p) in requests.items()}
    engine = make_engine(model, num_blocks=12, max_model_len=12 * BLOCK_SIZE)
    results = run_all(engine, requests)
    assert engine.scheduler.num_preemptions > 0
    assert results == expected
    assert all(r.finish_reason == "length" and len(r.tokens) == 24 for r in results.values())
    assert_all_blocks_free(engine)


def test_penalized_requests_with_prefix_hits_and_preemption_equal_one_at_a_time(model: XverseForCausalLM) -> None:
    """The repetition penalty's seen tokens are marked from what each step feeds, on the device: a cached prefix
    (never fed), a preempted sequence computed again and overlapped steps must still count every token."""
    penalized = SamplingParams(max_tokens=24, temperature=0.0, repetition_penalty=1.5, ignore_eos=True)
    shared = prompt(16, seed=300)  # four full blocks: cached once the first request has run
    requests = {f"p{i}": (shared + prompt(3 + i, seed=310 + i), penalized) for i in range(4)}
    expected = {rid: alone(model, ids, params) for rid, (ids, params) in requests.items()}
    unpenalized = msgspec.structs.replace(penalized, repetition_penalty=1.0)
    assert any(alone(model, ids, unpenalized) != expected[rid] for rid, (ids, _) in requests.items())
    engine = make_engine(model, num_blocks=14, max_model_len=14 * BLOCK_SIZE)
    log = StepLog()
    log.watch(engine)
    results = run_all(engine, {"p0": requests["p0"]})
    results |= run_all(engine, {rid: request for rid, request in requests.items() if rid != "p0"})
    assert results == expected
    assert engine.scheduler.prefix_hit_tokens > 0 and engine.scheduler.num_preemptions > 0 and any(log.fed)
    assert_all_blocks_free(engine)


def test_random_workloads_equal_one_at_a_time(model: XverseForCausalLM) -> None:
    """Mixed greedy and seeded requests under random pool sizes (down to one context), token budgets
    and sequence limits: chunking, preemption and admission order never change a request's tokens."""
    rng = random.Random(0)
    for _ in range(8):
        max_model_len = rng.choice([32, 48])
        blocks_per_context = max_model_len // BLOCK_SIZE
        engine = make_engine(model, num_blocks=rng.randint(blocks_per_context, 2 * blocks_per_context),
                             max_num_seqs=rng.randint(1, 5), max_batched_tokens=rng.choice([1, 4, 8, 64]),
                             max_model_len=max_model_len)
        requests = {
            f"q{i}": (prompt(rng.randint(1, max_model_len - 1), seed=rng.randrange(10**6)),
                      SamplingParams(max_tokens=rng.randint(1, 20), temperature=rng.choice([0.0, 1.0]),
                                     seed=rng.randrange(100), ignore_eos=True))
            for i in range(rng.randint(2, 6))
        }
        results = run_all(engine, requests)
        for request_id, (prompt_ids, params) in requests.items():
            assert results[request_id] == alone(model, prompt_ids, params, max_model_len=max_model_len)
        assert_all_blocks_free(engine)


def test_max_num_seqs_bounds_every_step(model: XverseForCausalLM) -> None:
    engine = make_engine(model, max_num_seqs=2)
    log = StepLog()
    log.watch(engine)
    results = run_all(engine, {rid: (ids, GREEDY) for rid, ids in PROMPTS.items()})
    assert max(log.running) == 2
    assert max(len(step) for step in log.steps) == 2
    assert results == {rid: alone(model, ids, GREEDY) for rid, ids in PROMPTS.items()}
    assert_all_blocks_free(engine)


def test_seeded_sample_is_the_same_alone_and_in_a_batch(model: XverseForCausalLM) -> None:
    seeded = SamplingParams(max_tokens=20, temperature=1.5, seed=1234, ignore_eos=True)
    ids = PROMPTS["r2"]
    reference = alone(model, ids, seeded)
    assert reference.tokens != alone(model, ids, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)).tokens
    assert reference.tokens != alone(model, ids, SamplingParams(max_tokens=20, temperature=1.5, seed=99,
                                                                ignore_eos=True)).tokens
    crowd = {
        "greedy": (PROMPTS["r1"], GREEDY),
        "unseeded": (PROMPTS["r3"], SamplingParams(max_tokens=30, temperature=1.0, top_k=20, ignore_eos=True)),
        "seeded": (ids, seeded),
        "other-seed": (PROMPTS["r4"], SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=5)),
    }
    assert run_all(make_engine(model), crowd)["seeded"] == reference


# --- finishing -----------------------------------------------------------------------------------------


def test_max_tokens_finishes_with_length(model: XverseForCausalLM) -> None:
    result = alone(model, PROMPTS["r1"], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    assert len(result.tokens) == 5 and result.finish_reason == "length"


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_stop_token_id_finishes_with_stop_and_is_included(model: XverseForCausalLM, ignore_eos: bool) -> None:
    reference = alone(model, PROMPTS["r1"], GREEDY).tokens
    position = next(i for i in range(3, len(reference)) if reference[i] not in reference[:i])
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=ignore_eos, stop_token_ids=(reference[position],))
    result = alone(model, PROMPTS["r1"], params)
    assert result == Result(reference[:position + 1], "stop")


def engine_with_eos(model: XverseForCausalLM, eos_token_id: int, num_blocks: int = 64, overlap: bool = True) -> Engine:
    """Built by hand from the pieces, with an end-of-text id the tiny model actually produces."""
    kv_cache = KVCache(model.config, num_blocks, BLOCK_SIZE, torch.float32, torch.device("cpu"))
    scheduler = Scheduler(BlockAllocator(num_blocks), BLOCK_SIZE, SchedulerConfig(max_num_seqs=8, max_batched_tokens=256))
    return Engine(ModelRunner(model, kv_cache), scheduler, eos_token_id, MAX_MODEL_LEN, overlap)


def test_end_of_text_finishes_with_stop_unless_ignored(model: XverseForCausalLM) -> None:
    reference = alone(model, PROMPTS["r4"], GREEDY).tokens
    position = next(i for i in range(2, len(reference)) if reference[i] not in reference[:i])
    eos = reference[position]
    params = SamplingParams(max_tokens=16, temperature=0.0)
    assert run_all(engine_with_eos(model, eos), {"a": (PROMPTS["r4"], params)})["a"] == Result(reference[:position + 1], "stop")
    ignoring = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    assert run_all(engine_with_eos(model, eos), {"a": (PROMPTS["r4"], ignoring)})["a"] == Result(reference, "length")


def test_end_of_context_finishes_with_length(model: XverseForCausalLM) -> None:
    params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    result = alone(model, prompt(28, seed=9), params, max_model_len=32)
    assert len(result.tokens) == 4 and result.finish_reason == "length"
    result = alone(model, prompt(31, seed=9), params, max_model_len=32)
    assert len(result.tokens) == 1 and result.finish_reason == "length"


def test_prompts_that_leave_no_room_or_are_empty_are_refused(model: XverseForCausalLM) -> None:
    engine = make_engine(model, max_model_len=32)
    with pytest.raises(ValueError, match="32"):
        engine.add_request("full", prompt(32, seed=0), GREEDY)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", [], GREEDY)
    engine.add_request("ok", prompt(5, seed=0), GREEDY)
    with pytest.raises(ValueError, match="already"):
        engine.add_request("ok", prompt(5, seed=0), GREEDY)
    assert set(engine.sequences) == {"ok"}


# --- overlapped steps ----------------------------------------------------------------------------------


def test_overlapped_steps_give_the_tokens_of_steps_run_one_at_a_time(model: XverseForCausalLM) -> None:
    """Random mixes of greedy, seeded and penalized requests, stop tokens, end of text, small pools (preemption) and
    token budgets: queuing decode steps before the last one's tokens are read changes no request's tokens, and it
    does happen."""
    rng = random.Random(1)
    eos = alone(model, PROMPTS["r2"], GREEDY).tokens[3]
    fed_steps = 0
    for _ in range(6):
        requests = {
            f"q{i}": (prompt(rng.randint(1, 40), seed=rng.randrange(10**6)),
                      SamplingParams(max_tokens=rng.randint(1, 20), temperature=rng.choice([0.0, 0.0, 1.0]),
                                     seed=rng.randrange(100), ignore_eos=rng.random() < 0.3,
                                     repetition_penalty=rng.choice([1.0, 1.0, 1.0, 1.3]),
                                     stop_token_ids=tuple(rng.sample(range(4, 500), 3))))
            for i in range(rng.randint(2, 6))
        }
        num_blocks = rng.choice([16, 64])
        results = {}
        for overlap in (True, False):
            engine = engine_with_eos(model, eos, num_blocks, overlap)
            log = StepLog()
            log.watch(engine)
            results[overlap] = run_all(engine, requests)
            assert_all_blocks_free(engine)
            if overlap:
                fed_steps += sum(log.fed)
            else:
                assert not any(log.fed)
        assert results[True] == results[False]
    assert fed_steps > 20


def test_steps_with_prompt_chunks_overlap_too(model: XverseForCausalLM) -> None:
    """A prompt chunked over steps while others decode: those steps are queued before the last one's tokens are
    read as well (the decodes' inputs come from the device), with the tokens of steps run one at a time."""
    requests = {rid: (ids, GREEDY) for rid, ids in PROMPTS.items()}
    results, fed_with_prompts = {}, 0
    for overlap in (True, False):
        engine = make_engine(model, max_batched_tokens=8, overlap=overlap)
        log = StepLog()
        log.watch(engine)
        results[overlap] = {}
        for rid, request in requests.items():  # one arrival every other step
            engine.add_request(rid, *request)
            for _ in range(2):
                for output in engine.step():
                    result = results[overlap].setdefault(output.request_id, Result())
                    result.tokens += output.new_token_ids
                    result.finish_reason = output.finish_reason
        collect(engine, results[overlap])
        assert_all_blocks_free(engine)
        if overlap:
            fed_with_prompts = sum(fed and any(n > 1 for _, _, n in step) for fed, step in zip(log.fed, log.steps))
    assert results[True] == results[False] == {rid: alone(model, ids, GREEDY) for rid, ids in PROMPTS.items()}
    assert fed_with_prompts >= 3


def test_a_sequence_ended_by_end_of_text_drops_the_token_computed_after_it(model: XverseForCausalLM) -> None:
    reference = alone(model, PROMPTS["r4"], GREEDY).tokens
    position = next(i for i in range(2, len(reference)) if reference[i] not in reference[:i])
    engine = engine_with_eos(model, reference[position])
    log = StepLog()
    log.watch(engine)
    long = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    results = run_all(engine, {"ends": (PROMPTS["r4"], SamplingParams(max_tokens=16, temperature=0.0)),
                               "goes-on": (PROMPTS["r1"], long)})
    assert results["ends"] == Result(reference[:position + 1], "stop")
    assert results["goes-on"] == alone(model, PROMPTS["r1"], long)
    # The step queued while the end of text was on its way computed one more position of "ends".
    computed = [cached + new for step in log.steps for rid, cached, new in step if rid == "ends"]
    assert max(computed) == len(PROMPTS["r4"]) + position + 1
    assert_all_blocks_free(engine)


def test_a_sequence_at_max_tokens_leaves_the_batch_with_its_last_step(model: XverseForCausalLM) -> None:
    engine = make_engine(model)
    log = StepLog()
    log.watch(engine)
    short, long = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), GREEDY
    results = run_all(engine, {"short": (PROMPTS["r1"], short), "long": (PROMPTS["r2"], long)})
    assert len(results["short"].tokens) == 3 and results["short"].finish_reason == "length"
    # Prefill samples the first token; two decode steps the others; never a third.
    assert sum(1 for step in log.steps for rid, _, _ in step if rid == "short") == 3
    assert sum(log.fed) > 0
    assert_all_blocks_free(engine)


def test_aborting_a_request_while_its_step_is_in_flight(model: XverseForCausalLM) -> None:
    engine = make_engine(model)
    engine.add_request("stays", PROMPTS["r1"], GREEDY)
    engine.add_request("leaves", PROMPTS["r2"], GREEDY)
    results: dict[str, Result] = {}
    for _ in range(4):
        for output in engine.step():
            results.setdefault(output.request_id, Result()).tokens += output.new_token_ids
    assert engine.in_flight is not None and any(seq.request_id == "leaves" for seq, _ in engine.in_flight.sampled)
    engine.abort("leaves")
    collect(engine, results)
    assert results["stays"].tokens == alone(model, PROMPTS["r1"], GREEDY).tokens
    assert len(results["leaves"].tokens) < GREEDY.max_tokens
    assert_all_blocks_free(engine)


# --- aborting ------------------------------------------------------------------------------------------


def test_abort_frees_blocks_of_running_and_waiting_requests(model: XverseForCausalLM) -> None:
    engine = make_engine(model, max_num_seqs=2)
    allocator = engine.scheduler.allocator
    for rid in ("r1", "r2", "r4"):
        engine.add_request(rid, PROMPTS[rid], GREEDY)
    for _ in range(3):
        engine.step()
    running = {seq.request_id: len(seq.block_table) for seq in engine.scheduler.running}
    assert set(running) == {"r1", "r2"} and [s.request_id for s in engine.scheduler.waiting] == ["r4"]
    free_before = allocator.num_free
    engine.abort("r2")
    assert allocator.num_free == free_before + running["r2"]
    engine.abort("r4")  # still waiting: holds no blocks
    assert allocator.num_free == free_before + running["r2"]
    engine.abort("never-added")
    results: dict[str, Result] = {}
    collect(engine, results)
    assert set(results) == {"r1"}, "aborted requests produce no more output"
    assert_all_blocks_free(engine)


def test_abort_everything_midway_leaves_the_pool_whole(model: XverseForCausalLM) -> None:
    engine = make_engine(model, max_num_seqs=4, max_batched_tokens=8)
    for rid, ids in PROMPTS.items():
        engine.add_request(rid, ids, GREEDY)
    for _ in range(4):
        engine.step()
    for rid in PROMPTS:
        engine.abort(rid)
    assert engine.step() == []
    assert_all_blocks_free(engine)


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(model: XverseForCausalLM) -> None:
    engine = make_engine(model)
    run = engine.runner.forward
    calls = []

    def failing_second_step(scheduled: list[ScheduledSequence], feed: Feed | None = None) -> StepLogits:
        calls.append(len(scheduled))
        if len(calls) == 2:
            raise RuntimeError("boom")
        return run(scheduled, feed)

    engine.runner.forward = failing_second_step
    engine.add_request("a", PROMPTS["r1"], GREEDY)
    engine.add_request("b", PROMPTS["r2"], GREEDY)
    engine.step()
    failed = engine.step()
    assert sorted(o.request_id for o in failed) == ["a", "b"]
    assert all(o.error == "RuntimeError: boom" and o.finished and not o.new_token_ids for o in failed)
    assert_all_blocks_free(engine)
    assert run_all(engine, {"c": (PROMPTS["r1"], GREEDY)})["c"] == alone(model, PROMPTS["r1"], GREEDY)


# --- start-up ------------------------------------------------------------------------------------------


def test_build_engine_from_flags_on_cpu(tiny_model_dir: Path, model: XverseForCausalLM) -> None:
    settings = parse_settings(["--model-path", str(tiny_model_dir), "--device", "cpu", "--block-size", "8",
                               "--kv-cache-tokens", "512", "--max-num-seqs", "3"], environ={})
    context = build_engine(settings)
    engine = context.engine.transport.engine
    assert context.max_model_len == MAX_MODEL_LEN
    assert engine.runner.model.lm_head.weight.dtype == torch.float32
    assert engine.scheduler.allocator.num_blocks == 512 // 8
    assert engine.scheduler.max_num_seqs == 3
    results = run_all(engine, {rid: (PROMPTS[rid], GREEDY) for rid in ("r0", "r2")})
    assert results == {rid: alone(model, PROMPTS[rid], GREEDY) for rid in ("r0", "r2")}
    assert_all_blocks_free(engine)


# --- EngineClient over the in-thread transport ---------------------------------------------------------------------------------------


class Gate:
    """Makes the engine thread wait for permission before each step, so a test decides how far it gets."""

    def __init__(self, engine: Engine, permits: int) -> None:
        self.permits = threading.Semaphore(permits)
        run = engine.runner.forward

        def gated_run(scheduled: list[ScheduledSequence], feed: Feed | None = None) -> StepLogits:
            self.permits.acquire()
            return run(scheduled, feed)

        engine.runner.forward = gated_run

    def open(self) -> None:
        self.permits.release(1_000_000)


async def consume(engine: EngineClient, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Result:
    result = Result()
    async for output in engine.generate(request_id, prompt_ids, params):
        assert output.error is None, output.error
        result.tokens += output.new_token_ids
        result.finish_reason = output.finish_reason
    return result


async def wait_until_idle(client: EngineClient) -> None:
    """Until the engine thread has applied every command and finished every step, and reported so (fails after
    60 s)."""
    transport = client.transport
    for _ in range(6000):
        with transport._lock:
            inbox_empty = not transport._inbox
        stats = client.stats()
        if inbox_empty and not transport.engine.has_work() and stats.running == stats.waiting == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the engine did not become idle")


def run_async(engine: Engine, scenario, gate: Gate | None = None) -> object:
    """Runs `scenario(async_engine)` on a fresh event loop with the engine thread started, then stops it
    (opening the gate first, should the scenario have failed with the thread waiting at it)."""
    async def main() -> object:
        async_engine = EngineClient(ThreadTransport(engine))
        async_engine.start()
        try:
            return await asyncio.wait_for(scenario(async_engine), timeout=120)
        finally:
            if gate is not None:
                gate.open()
            async_engine.stop()
    return asyncio.run(main())


def test_concurrent_generate_calls_each_get_their_own_tokens(model: XverseForCausalLM) -> None:
    params = {rid: SamplingParams(max_tokens=8 + i, temperature=0.0, ignore_eos=True) for i, rid in enumerate(PROMPTS)}
    expected = {rid: alone(model, ids, params[rid]) for rid, ids in PROMPTS.items()}
    engine = make_engine(model)

    async def scenario(async_engine: EngineClient) -> dict[str, Result]:
        results = await asyncio.gather(*(consume(async_engine, rid, ids, params[rid]) for rid, ids in PROMPTS.items()))
        await wait_until_idle(async_engine)
        return dict(zip(PROMPTS, results))

    assert run_async(engine, scenario) == expected
    assert_all_blocks_free(engine)


def test_leaving_the_iterator_early_aborts_the_request(model: XverseForCausalLM) -> None:
    engine = make_engine(model)
    gate = Gate(engine, permits=3)
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    other = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    async def scenario(async_engine: EngineClient) -> tuple[int, Result]:
        outputs = async_engine.generate("long", PROMPTS["r2"], long)
        first: StepOutput = await outputs.__anext__()
        sequence = engine.sequences["long"]
        await outputs.aclose()  # what `break` in `async for` leads to, done at once
        survivor = asyncio.ensure_future(consume(async_engine, "other", PROMPTS["r1"], other))
        gate.open()
        result = await survivor
        await wait_until_idle(async_engine)
        assert first.new_token_ids and not first.finished
        return len(sequence.output_ids), result

    generated, survivor = run_async(engine, scenario, gate)
    assert generated < long.max_tokens
    assert survivor == alone(model, PROMPTS["r1"], other)
    assert_all_blocks_free(engine)


def test_breaking_out_of_async_for_aborts_the_request(model: XverseForCausalLM) -> None:
    engine = make_engine(model)
    gate = Gate(engine, permits=3)
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def scenario(async_engine: EngineClient) -> int:
        sequence = None
        async for _ in async_engine.generate("long", PROMPTS["r2"], long):
            sequence = engine.sequences["long"]
            break
        # The event loop closes the abandoned generator in a task of its own; closing sends the abort.
        for _ in range(1000):
            if "long" not in async_engine._queues:
                break
            await asyncio.sleep(0.01)
        gate.open()
        await wait_until_idle(async_engine)
        return len(sequence.output_ids)

    assert run_async(engine, scenario, gate) < long.max_tokens
    assert_all_blocks_free(engine)


def test_cancelling_the_consumer_aborts_the_request(model: XverseForCausalLM) -> None:
    engine = make_engine(model)
    gate = Gate(engine, permits=2)
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def scenario(async_engine: EngineClient) -> int:
        started = asyncio.Event()

        async def consumer() -> None:
            async for _ in async_engine.generate("long", PROMPTS["r2"], long):
                started.set()

        task = asyncio.ensure_future(consumer())
        await started.wait()
        sequence = engine.sequences["long"]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.open()
        await wait_until_idle(async_engine)
        return len(sequence.output_ids)

    assert run_async(engine, scenario, gate) < long.max_tokens
    assert_all_blocks_free(engine)


def test_a_refused_request_gets_an_error_and_the_engine_goes_on(model: XverseForCausalLM) -> None:
    engine = make_engine(model, max_model_len=32)

    async def scenario(async_engine: EngineClient) -> tuple[list[StepOutput], Result]:
        refused = [output async for output in async_engine.generate("too-long", prompt(40, seed=0), GREEDY)]
        served = await consume(async_engine, "fine", PROMPTS["r1"], GREEDY)
        return refused, served

    refused, served = run_async(engine, scenario)
    assert len(refused) == 1 and refused[0].error and "32" in refused[0].error
    assert refused[0].error_status == 400  # about the request: the server answers it as a bad request
    assert served == alone(model, PROMPTS["r1"], GREEDY, max_model_len=32)


def test_a_refusal_reaches_the_server_as_a_400_in_the_engine_s_words(model: XverseForCausalLM,
                                                                      tokenizer: Tokenizer) -> None:
    async def scenario(async_engine: EngineClient) -> GenerationFailed:
        with pytest.raises(GenerationFailed) as caught:
            async for _ in generate_text(async_engine, tokenizer, "too-long", prompt(40, seed=0), GREEDY):
                pass
        return caught.value

    failure = run_async(make_engine(model, max_model_len=32), scenario)
    assert failure.status == 400 and FAILURE_TYPES[failure.status] == "invalid_request_error"
    assert failure_message(failure) == "the prompt has 40 tokens; the context holds 32"


def test_generate_before_start_raises_engine_dead(model: XverseForCausalLM) -> None:
    async def scenario() -> None:
        with pytest.raises(EngineDead):
            async for _ in EngineClient(ThreadTransport(make_engine(model))).generate("a", PROMPTS["r1"], GREEDY):
                pass

    asyncio.run(scenario())


def test_engine_thread_death_fails_waiting_requests_and_refuses_new_ones(model: XverseForCausalLM) -> None:
    engine = make_engine(model)
    schedule = engine.scheduler.schedule
    calls = []

    def broken_schedule() -> list[ScheduledSequence]:
        calls.append(None)
        if len(calls) == 3:
            raise RuntimeError("scheduler bug")
        return schedule()

    engine.scheduler.schedule = broken_schedule

    async def scenario(async_engine: EngineClient) -> list[StepOutput]:
        outputs = [output async for output in async_engine.generate("a", PROMPTS["r1"], GREEDY)]
        async_engine.transport._thread.join(timeout=60)
        assert not async_engine.alive
        assert "RuntimeError: scheduler bug" in async_engine.error
        with pytest.raises(EngineDead):
            async for _ in async_engine.generate("b", PROMPTS["r1"], GREEDY):
                pass
        return outputs

    outputs = run_async(engine, scenario)
    # Two steps were queued before the third's scheduling failed, and the first one's token read back (the second's
    # was still in flight: with overlap a step's tokens are read after the next is queued).
    assert sum(len(o.new_token_ids) for o in outputs) == 1
    assert "scheduler bug" in outputs[-1].error
    assert all(o.error is None for o in outputs[:-1])


def test_a_request_larger_than_the_whole_kv_pool_is_refused_not_left_waiting(model: XverseForCausalLM) -> None:
    engine = make_engine(model, num_blocks=8)  # 32 tokens of cache
    with pytest.raises(ValueError, match="holds 32"):
        engine.add_request("big", prompt(20, seed=1), SamplingParams(max_tokens=13, temperature=0.0))
    fits = run_all(engine, {"fits": (prompt(20, seed=1), SamplingParams(max_tokens=12, temperature=0.0,
                                                                          ignore_eos=True))})
    assert len(fits["fits"].tokens) == 12


def test_warm_up_leaves_the_engine_idle_with_every_block_free_and_counters_at_zero(model: XverseForCausalLM) -> None:
    engine = make_engine(model, max_batched_tokens=64)
    calls = []
    run = engine.runner.forward
    engine.runner.forward = lambda scheduled, feed=None: calls.append([e.num_new_tokens for e in scheduled]) or run(
        scheduled, feed)
    engine.warm_up()
    assert any(len(step) > 1 and 1 in step and max(step) > 1 for step in calls), "a mixed prefill/decode step"
    assert sum(1 for step in calls if max(step) > 1) >= 2, "the long prompt is prefilled in chunks"
    assert any(sum(step) == 64 for step in calls), "a step that fills the token budget"
    assert not engine.has_work() and not engine.sequences
    assert_all_blocks_free(engine)
    assert engine.scheduler.prefix_queried_tokens == 0 and engine.scheduler.num_preemptions == 0


def test_warm_up_samples_greedy_and_filtered_rows_together_and_apart(model: XverseForCausalLM,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The sampler's kernels differ by batch make-up (the greedy argmax runs over the whole vocabulary, the
    filtered draw over the top-k candidates only): warm-up must meet each, or a first user pays a compile."""
    from xverse_serve.engine import runner

    batches = []
    sample = runner.sample
    monkeypatch.setattr(runner, "sample", lambda logits, rows, seen=None, counts=None, allowed=None: batches.append(
        tuple(sorted({r.params.greedy for r in rows}))) or sample(logits, rows, seen, counts, allowed))
    make_engine(model, max_batched_tokens=64).warm_up()
    assert {(True,), (False,), (False, True)} <= set(batches), batches


def test_outputs_that_pile_up_reach_the_consumer_merged_and_complete(model: XverseForCausalLM) -> None:
    async def main() -> list[list[int]]:
        engine = EngineClient(ThreadTransport(make_engine(model)))
        engine.start()
        try:
            received = []
            async for output in engine.generate("slow", prompt(9, seed=3), SamplingParams(max_tokens=40,
                                                temperature=0.0, ignore_eos=True)):
                received.append(output.new_token_ids)
                await asyncio.sleep(0.05)  # a slow client: several steps finish meanwhile
            return received
        finally:
            engine.stop()

    received = asyncio.run(main())
    assert sum(len(ids) for ids in received) == 40
    assert any(len(ids) > 1 for ids in received), "piled-up outputs come merged"
    expected = alone(model, prompt(9, seed=3), SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    assert [t for ids in received for t in ids] == expected.tokens


class HeldTransport:
    """A transport whose engine never runs: the test hands the client its reports itself."""

    def __init__(self) -> None:
        self.initial_stats = EngineStats(0, 0, 0, 64, 0, 0, 0)
        self.structured_outputs = True
        self.sent: list = []

    def start(self, on_report) -> None:
        pass

    def send(self, command) -> None:
        self.sent.append(command)

    def alive(self) -> bool:
        return True

    def stop(self) -> None:
        pass


def test_a_merged_output_keeps_the_status_of_the_error_that_ended_it() -> None:
    """Tokens that piled up before a shutdown's 503 reach the consumer with it, and the 503 stays a 503."""

    async def main() -> tuple[list[StepOutput], list]:
        client = EngineClient(HeldTransport())
        client.start()
        outputs = client.generate("a", [5, 6], GREEDY)
        first = asyncio.ensure_future(anext(outputs))
        await asyncio.sleep(0)  # the request is sent and its queue waits
        client._handle(StepReport([StepOutput("a", [7])], client.stats(), 1))
        client._handle(StepReport([StepOutput("a", [8])], client.stats(), 1))
        client.end_all("the server is shutting down")
        received = [await first] + [output async for output in outputs]
        return received, client.transport.sent

    received, sent = asyncio.run(main())
    assert [(o.new_token_ids, o.error_status) for o in received] == [([7, 8], 503)]
    assert received[-1].error == "the server is shutting down"
    assert [type(command).__name__ for command in sent] == ["AddRequest", "AbortRequest"]
