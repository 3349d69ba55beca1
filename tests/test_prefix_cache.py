"""Prefix caching: full KV blocks are found again by the hash of their tokens and everything before them,
shared read-only, evicted least recently freed first — and the tokens generated never change because of it."""

from __future__ import annotations

from test_engine import BLOCK_SIZE, GREEDY, assert_all_blocks_free, make_engine, model, prompt, run_all  # noqa: F401

from xverse_serve.engine.block_allocator import BlockAllocator, block_hash
from xverse_serve.engine.config import CacheConfig, SchedulerConfig
from xverse_serve.engine.loader import assemble_engine


def hashes(tokens: list[int]) -> list[bytes]:
    out: list[bytes] = []
    for start in range(0, len(tokens) - len(tokens) % BLOCK_SIZE, BLOCK_SIZE):
        out.append(block_hash(out[-1] if out else None, tokens[start:start + BLOCK_SIZE]))
    return out


def test_a_block_hash_depends_on_everything_before_it() -> None:
    first = block_hash(None, [1, 2, 3, 4])
    assert block_hash(None, [1, 2, 3, 4]) == first
    assert block_hash(first, [5, 6, 7, 8]) != block_hash(block_hash(None, [9, 2, 3, 4]), [5, 6, 7, 8])
    assert block_hash(None, [1, 2, 3, 5]) != first


def test_released_blocks_stay_findable_until_handed_out_again() -> None:
    allocator = BlockAllocator(4)
    blocks = allocator.allocate(2)
    keys = hashes(list(range(8)))
    for block, key in zip(blocks, keys):
        allocator.register(block, key)
    allocator.release(blocks)
    assert allocator.num_free == 4
    assert allocator.cached_prefix(keys) == blocks  # found, and now held again
    assert allocator.num_free == 2
    allocator.release(blocks)
    allocator.allocate(4)  # every block handed out: the cached content is gone
    allocator.release(list(range(4)))
    assert allocator.cached_prefix(keys) == []


def test_shared_blocks_are_freed_only_when_their_last_holder_lets_go() -> None:
    allocator = BlockAllocator(2)
    [block] = allocator.allocate(1)
    key = block_hash(None, [1, 2, 3, 4])
    allocator.register(block, key)
    assert allocator.cached_prefix([key]) == [block]
    allocator.release([block])
    assert allocator.num_free == 1
    allocator.release([block])
    assert allocator.num_free == 2


def test_eviction_takes_the_least_recently_freed_block_and_a_prefix_last() -> None:
    allocator = BlockAllocator(3)
    keys = hashes(list(range(8)))
    older = allocator.allocate(2)
    for block, key in zip(older, keys):
        allocator.register(block, key)
    allocator.release(older)  # freed last block first: the prefix block is evicted last
    [spare] = allocator.allocate(1)
    assert spare not in older
    [evicted] = allocator.allocate(1)
    assert evicted == older[1]
    assert allocator.cached_prefix(keys) == [older[0]]


def test_a_repeated_prompt_reuses_its_blocks_and_answers_the_same(model) -> None:
    engine = make_engine(model)
    ids = prompt(37, seed=1)
    first = run_all(engine, {"first": (ids, GREEDY)})["first"]
    assert engine.scheduler.prefix_hit_tokens == 0
    second = run_all(engine, {"second": (ids, GREEDY)})["second"]
    assert engine.scheduler.prefix_hit_tokens == 36  # nine full blocks of four; the last token is recomputed
    assert second.tokens == first.tokens
    assert_all_blocks_free(engine)


def test_a_fully_cached_prompt_still_computes_its_last_token(model) -> None:
    engine = make_engine(model)
    ids = prompt(4 * BLOCK_SIZE, seed=2)
    first = run_all(engine, {"a": (ids, GREEDY)})["a"]
    second = run_all(engine, {"b": (ids, GREEDY)})["b"]
    assert engine.scheduler.prefix_hit_tokens == 3 * BLOCK_SIZE
    assert second.tokens == first.tokens


def test_a_conversation_that_resends_its_history_hits_its_earlier_blocks(model) -> None:
    engine = make_engine(model)
    turn_one = prompt(30, seed=3)
    answer = run_all(engine, {"turn1": (turn_one, GREEDY)})["turn1"].tokens
    turn_two = turn_one + answer + prompt(11, seed=4)
    cached_run = run_all(engine, {"turn2": (turn_two, GREEDY)})["turn2"]
    # The first turn's prompt and the computed part of its answer were full blocks in the cache.
    assert engine.scheduler.prefix_hit_tokens >= (30 + len(answer) - 1) // BLOCK_SIZE * BLOCK_SIZE
    uncached = assemble_engine(model, CacheConfig(128, BLOCK_SIZE), SchedulerConfig(16, 512, prefix_caching=False), 256)
    assert run_all(uncached, {"turn2": (turn_two, GREEDY)})["turn2"].tokens == cached_run.tokens
    assert uncached.scheduler.prefix_hit_tokens == 0


def test_concurrent_requests_sharing_a_system_prompt_answer_as_without_caching(model) -> None:
    shared = prompt(24, seed=5)
    requests = {f"q{i}": (shared + prompt(5 + i, seed=10 + i), GREEDY) for i in range(6)}
    engine = make_engine(model, max_batched_tokens=40)  # chunked: later ones arrive after blocks are cached
    cached = run_all(engine, requests)
    plain = run_all(assemble_engine(model, CacheConfig(128, BLOCK_SIZE), SchedulerConfig(16, 40, prefix_caching=False), 256), requests)
    assert {k: r.tokens for k, r in cached.items()} == {k: r.tokens for k, r in plain.items()}
    assert engine.scheduler.prefix_hit_tokens > 0
    assert 0 < engine.scheduler.prefix_hit_rate < 1
    assert_all_blocks_free(engine)


def test_a_pool_under_pressure_evicts_cached_blocks_and_stays_correct(model) -> None:
    requests = {f"p{i}": (prompt(30, seed=20 + i % 3), GREEDY) for i in range(9)}
    engine = make_engine(model, num_blocks=24, max_num_seqs=4)
    results = run_all(engine, requests)
    for request_id, result in results.items():
        again = run_all(make_engine(model), {"x": requests[request_id]})["x"]
        assert result.tokens == again.tokens, request_id
    assert_all_blocks_free(engine)


def test_choices_of_one_request_compute_their_prompt_once_and_answer_as_alone(model) -> None:
    """n > 1: the first choice computes the prompt; the others wait until its full blocks are cached, then compute
    only the rest (here 2 of 42 tokens) and sample as they would alone, each with its own seed."""
    from xverse_serve.engine.messages import SamplingParams

    shared = prompt(42, seed=21)
    choices = [SamplingParams(max_tokens=8, temperature=0.9, top_k=20, seed=100 + i, ignore_eos=True)
               for i in range(4)]
    engine = make_engine(model)
    computed = []
    run = engine.runner.forward

    def counting_run(scheduled, feed=None):
        computed.extend(min(e.num_new_tokens, len(e.seq.prompt_ids) - e.seq.num_computed) for e in scheduled
                        if e.seq.num_computed < len(e.seq.prompt_ids))
        return run(scheduled, feed)

    engine.runner.forward = counting_run
    for i, params in enumerate(choices):
        engine.add_request(f"c{i}", shared, params, shares_prompt_with="c0" if i else None)
    tokens = {f"c{i}": [] for i in range(4)}
    while engine.has_work():
        for output in engine.step():
            tokens[output.request_id] += output.new_token_ids
    assert sum(computed) == 42 + 3 * 2
    alone = [run_all(make_engine(model), {"a": (shared, params)})["a"].tokens for params in choices]
    assert list(tokens.values()) == alone
    assert len({tuple(t) for t in alone}) > 1, "different seeds should draw different answers"
    assert_all_blocks_free(engine)
