"""The sampler filters and penalizes as transformers' logits processors do, row by row, and draws fairly."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from xverse_serve.engine.messages import SamplingParams
from xverse_serve.engine.sampling import (
    OutputCounts,
    SamplingRow,
    SeenTokens,
    adjust_logits,
    apply_repetition_penalty,
    keep_nucleus,
    sample,
    seen_token_mask,
)

VOCAB = 1000


def random_logits(rows: int, seed: int, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


@dataclass
class Row(SamplingRow):
    seen: list[int] = field(default_factory=list)  # the ids this row's sequence has seen


def row(seen: list[int] | None = None, generator: torch.Generator | None = None, **params) -> Row:
    return Row(SamplingParams(max_tokens=16, **params), generator, seen or [])


def penalize(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    penalties = torch.tensor([r.params.repetition_penalty for r in rows])
    return apply_repetition_penalty(logits, penalties, seen_token_mask([r.seen for r in rows], logits.shape[1], logits.device))


def draw(logits: torch.Tensor, rows: list[Row]) -> list[int]:
    return sample(logits, rows, seen_token_mask([r.seen for r in rows], logits.shape[1], logits.device)).tolist()


def hf_warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """transformers' warpers in generate()'s order, each used only where generate() would add it."""
    warpers = []
    if params.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k > 0:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    scores = logits[None].clone()
    for warper in warpers:
        scores = warper(None, scores)
    return scores[0]


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                       candidates: int | None = None) -> torch.Tensor:
    """The sampler's filter seen over the whole vocabulary: logits outside each row's top-k and top-p nucleus at
    -inf. `candidates` sorts only that many first, as sample() sorts only the batch's largest top-k."""
    sorted_logits, order = logits.topk(min(candidates or logits.shape[-1], logits.shape[-1]), dim=-1)
    kept = keep_nucleus(sorted_logits, top_k, top_p, logits.shape[-1])
    return torch.full_like(logits, float("-inf")).scatter_(-1, order, kept)


def our_warp(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """What sample() does before drawing: temperature, then top-k and top-p per row."""
    temperature = torch.tensor([r.params.temperature for r in rows])
    top_k = torch.tensor([r.params.top_k for r in rows])
    top_p = torch.tensor([r.params.top_p for r in rows])
    return filter_top_k_top_p(logits / temperature[:, None], top_k, top_p)


def assert_same_survivors(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    kept = torch.isfinite(theirs)
    assert torch.equal(torch.isfinite(ours), kept), "a different set of tokens survives"
    torch.testing.assert_close(ours[kept], theirs[kept])


FILTER_CASES = [
    dict(temperature=1.0, top_k=0, top_p=1.0),
    dict(temperature=0.5, top_k=0, top_p=1.0),
    dict(temperature=1.0, top_k=1, top_p=1.0),
    dict(temperature=1.0, top_k=30, top_p=1.0),
    dict(temperature=1.0, top_k=0, top_p=0.85),
    dict(temperature=1.0, top_k=0, top_p=0.1),
    dict(temperature=0.5, top_k=30, top_p=0.85),  # XVERSE-7B-Chat's defaults
    dict(temperature=1.7, top_k=200, top_p=0.95),
    dict(temperature=0.3, top_k=5, top_p=0.999),
]


@pytest.mark.parametrize("params", FILTER_CASES, ids=lambda p: "T{temperature}-k{top_k}-p{top_p}".format(**p))
def test_temperature_top_k_top_p_keep_the_tokens_transformers_keeps(params: dict) -> None:
    logits = random_logits(8, seed=0)
    rows = [row(**params)] * len(logits)
    ours = our_warp(logits, rows)
    for i in range(len(logits)):
        assert_same_survivors(ours[i], hf_warp(logits[i], rows[i].params))


def test_each_row_of_one_batch_uses_its_own_params() -> None:
    logits = random_logits(len(FILTER_CASES), seed=1)
    rows = [row(**params) for params in FILTER_CASES]
    ours = our_warp(logits, rows)
    for i, r in enumerate(rows):
        assert_same_survivors(ours[i], hf_warp(logits[i], r.params))


def test_top_p_one_and_top_k_zero_keep_all_of_xverse_vocabulary() -> None:
    logits = random_logits(4, seed=8, vocab=100534)
    filtered = filter_top_k_top_p(logits, torch.zeros(4, dtype=torch.long), torch.ones(4))
    assert torch.equal(filtered, logits)


def test_top_p_always_keeps_the_most_likely_token() -> None:
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0]])
    kept = torch.isfinite(filter_top_k_top_p(logits, torch.tensor([0]), torch.tensor([0.01])))
    assert kept.tolist() == [[True, False, False, False]]


@pytest.mark.parametrize("penalty", [1.1, 1.5, 0.8])
def test_repetition_penalty_equals_transformers(penalty: float) -> None:
    logits = random_logits(3, seed=2)
    seen = [[5, 17, 17, 400, 999, 5], [0], list(range(0, VOCAB, 7))]
    ours = penalize(logits, [row(seen=s, repetition_penalty=penalty) for s in seen])
    processor = RepetitionPenaltyLogitsProcessor(penalty)
    for i, s in enumerate(seen):
        theirs = processor(torch.tensor([s]), logits[i:i + 1].clone())[0]
        torch.testing.assert_close(ours[i], theirs, rtol=0, atol=0)
    assert not torch.equal(ours, logits)


def test_repetition_penalty_is_per_row_and_skips_rows_without_it() -> None:
    logits = random_logits(3, seed=3)
    ours = penalize(logits, [row(seen=[1, 2], repetition_penalty=1.0),
                                    row(seen=[], repetition_penalty=1.3),
                                    row(seen=[1, 2], repetition_penalty=1.3)])
    assert torch.equal(ours[:2], logits[:2])
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([[1, 2]]), logits[2:].clone())
    assert torch.equal(ours[2:], expected)


def test_sample_does_not_modify_the_callers_logits() -> None:
    logits = random_logits(2, seed=4)
    before = logits.clone()
    draw(logits, [row(seen=[1, 2, 3], repetition_penalty=1.3, temperature=0.7),
                    row(seen=[1, 2, 3], repetition_penalty=1.3, temperature=0.0)])
    assert torch.equal(logits, before)


def test_greedy_rows_take_the_argmax_after_the_repetition_penalty() -> None:
    logits = random_logits(4, seed=5)
    top = logits.argmax(-1).tolist()
    rows = [row(temperature=0.0), row(temperature=0.0, seen=[top[1]], repetition_penalty=100.0),
            row(temperature=1.0, top_k=50), row(temperature=0.0)]
    tokens = draw(logits, rows)
    penalized = RepetitionPenaltyLogitsProcessor(100.0)(torch.tensor([[top[1]]]), logits[1:2].clone())
    assert tokens[0] == top[0] and tokens[3] == top[3]
    assert tokens[1] == penalized.argmax().item() != top[1]


def test_top_k_one_is_the_argmax_whatever_the_temperature() -> None:
    logits = random_logits(64, seed=6)
    tokens = draw(logits, [row(temperature=5.0, top_k=1)] * 64)
    assert tokens == logits.argmax(-1).tolist()


def test_samples_never_leave_the_allowed_set() -> None:
    torch.manual_seed(0)
    logits = random_logits(len(FILTER_CASES), seed=7)
    draws = 300
    rows = [row(**params) for params in FILTER_CASES for _ in range(draws)]
    tokens = torch.tensor(draw(logits.repeat_interleave(draws, dim=0), rows)).view(len(FILTER_CASES), draws)
    for i, params in enumerate(FILTER_CASES):
        allowed = torch.isfinite(hf_warp(logits[i], SamplingParams(max_tokens=1, **params)))
        assert allowed[tokens[i]].all(), params
        if allowed.sum() > 20:
            assert len(tokens[i].unique()) > 1, "a wide nucleus should give varied samples"


def test_sampled_frequencies_follow_the_filtered_distribution() -> None:
    torch.manual_seed(1)
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0]])
    params = dict(temperature=0.8, top_k=4, top_p=0.9)
    expected = hf_warp(logits[0], SamplingParams(max_tokens=1, **params)).softmax(-1)
    draws = 40_000
    tokens = torch.tensor(draw(logits.expand(draws, -1), [row(**params)] * draws))
    frequencies = torch.bincount(tokens, minlength=logits.shape[1]).float() / draws
    assert (frequencies[expected == 0] == 0).all()
    torch.testing.assert_close(frequencies, expected, rtol=0, atol=0.01)


def test_seeded_rows_are_reproducible_and_independent_of_the_batch() -> None:
    logits = torch.zeros(1, VOCAB)  # uniform: every draw is up to the generator
    params = dict(temperature=1.0)
    alone = [draw(logits, [row(generator=torch.Generator().manual_seed(seed), **params)])[0] for seed in range(8)]
    again = [draw(logits, [row(generator=torch.Generator().manual_seed(seed), **params)])[0] for seed in range(8)]
    assert alone == again
    assert len(set(alone)) > 1, "different seeds should draw differently"
    for seed in range(8):
        batch = [row(**params), row(temperature=0.0), row(generator=torch.Generator().manual_seed(seed), **params),
                 row(generator=torch.Generator().manual_seed(seed + 100), top_k=3)]
        assert draw(logits.expand(4, -1), batch)[2] == alone[seed]


def test_a_seeded_row_with_top_k_draws_the_same_among_any_number_of_candidates() -> None:
    # Alone, only its 20 candidates are drawn among; beside a row without top-k, the whole vocabulary.
    # Either way it must win the race of its own seed's noise over the whole vocabulary.
    logits = random_logits(1, seed=12) / 3
    params = dict(temperature=1.0, top_k=20, top_p=0.95)
    for seed in range(6):
        noise = torch.empty(VOCAB).exponential_(generator=torch.Generator().manual_seed(seed))
        probs = our_warp(logits, [row(**params)]).softmax(-1)[0]
        expected = (probs / noise).argmax().item()
        alone = draw(logits, [row(generator=torch.Generator().manual_seed(seed), **params)])
        others = [row(temperature=0.7, top_k=100), row(temperature=1.0)]
        for other in others:
            batch = [other, row(generator=torch.Generator().manual_seed(seed), **params)]
            assert draw(logits.expand(2, -1), batch)[1] == expected
        assert alone == [expected]


def test_a_seeded_generator_advances_so_consecutive_draws_differ() -> None:
    logits = torch.zeros(1, VOCAB)
    generator = torch.Generator().manual_seed(0)
    draws = [draw(logits, [row(generator=generator)])[0] for _ in range(10)]
    assert len(set(draws)) > 1
    generator = torch.Generator().manual_seed(0)
    assert [draw(logits, [row(generator=generator)])[0] for _ in range(10)] == draws


def test_temperature_zero_means_greedy() -> None:
    assert SamplingParams(max_tokens=1, temperature=0.0).greedy
    assert not SamplingParams(max_tokens=1, temperature=0.5).greedy


@pytest.mark.parametrize("temperature", [1e-6, 1e-30, 1e-40, 5e-324])
def test_vanishing_temperatures_are_greedy_not_nan(temperature: float) -> None:
    logits = random_logits(4, seed=9)
    rows = [row(temperature=temperature), row(temperature=temperature, generator=torch.Generator().manual_seed(1)),
            row(temperature=temperature, top_p=0.5), row(temperature=1.0, top_k=1)]
    assert draw(logits, rows) == logits.argmax(-1).tolist()


def test_sorting_only_the_largest_top_k_keeps_the_same_survivors() -> None:
    logits = random_logits(3, seed=10)
    top_k, top_p = torch.tensor([5, 30, 12]), torch.tensor([0.9, 1.0, 0.5])
    full = filter_top_k_top_p(logits, top_k, top_p)
    assert torch.equal(filter_top_k_top_p(logits, top_k, top_p, candidates=30), full)


def test_seen_tokens_mark_what_each_step_feeds_and_rows_are_reused() -> None:
    cpu = torch.device("cpu")
    seen = SeenTokens(VOCAB, cpu, rows=2)  # room for one penalized sequence: it must grow
    seen.start("a", [])
    seen.start("b", [4])  # a cached prefix: never fed, marked at the start
    # A step feeding a's prompt [5, 6], one token of something unpenalized, then b's [7].
    seen.record(torch.tensor([5, 6, 3, 7]), [("a", 0, 2), ("b", 3, 4)])
    rows = seen.rows(["a", None, "b"])
    assert rows.shape == (3, VOCAB)
    assert torch.equal(rows, seen_token_mask([[5, 6], [], [4, 7]], VOCAB, cpu))
    seen.record(torch.tensor([9, 8]), [("a", 0, 1), ("b", 1, 2)])  # decodes: each feeds its newest token
    seen.record(torch.tensor([5]), [("a", 0, 1)])  # a repeat changes nothing
    assert torch.equal(seen.rows(["a", "b"]), seen_token_mask([[5, 6, 9], [4, 7, 8]], VOCAB, cpu))
    assert seen.tracks("a") and not seen.tracks("c")
    seen.release("a")
    assert not seen.tracks("a")
    seen.start("c", [1])  # takes a's old row, which must start empty
    assert seen.rows(["c"])[0].nonzero().flatten().tolist() == [1]

# --- OpenAI's penalties and logit_bias -----------------------------------------------------------------------

def test_output_counts_count_every_sample_and_start_at_zero() -> None:
    counts = OutputCounts(VOCAB, torch.device("cpu"), rows=2)
    counts.add(["a", "b"], torch.tensor([5, 7]))
    counts.add(["a", "a", "c"], torch.tensor([5, 9, 5]))  # a row twice in a step; a third row grows the table
    table = counts.rows(["a", "b", "c", None])
    assert table[0, 5] == 2 and table[0, 9] == 1 and table[0].sum() == 3
    assert table[1, 7] == 1 and table[1].sum() == 1
    assert table[2, 5] == 1 and table[2].sum() == 1
    assert table[3].sum() == 0
    counts.release("a")
    counts.add(["d"], torch.tensor([1]))  # takes a's old row, zeroed
    assert counts.rows(["d"])[0].sum() == 1


def test_penalties_and_bias_follow_openais_definition_row_by_row() -> None:
    logits = random_logits(4, seed=11)
    counts = torch.zeros(4, VOCAB, dtype=torch.int32)
    counts[0, [3, 4]] = torch.tensor([1, 3], dtype=torch.int32)
    counts[2, 3] = 2
    rows = [row(presence_penalty=0.5, frequency_penalty=0.25), row(logit_bias=((3, -100.0), (8, 2.5))),
            row(frequency_penalty=-1.0, logit_bias=((3, 1.0),)), row()]
    adjusted = adjust_logits(logits, rows, None, counts)
    expected = logits.clone()
    expected[0, 3] -= 1 * 0.25 + 0.5
    expected[0, 4] -= 3 * 0.25 + 0.5
    expected[1, 3] -= 100.0
    expected[1, 8] += 2.5
    expected[2, 3] += 1.0 + 2 * 1.0
    torch.testing.assert_close(adjusted, expected)


def test_a_banned_token_is_never_drawn_and_a_forced_one_always() -> None:
    logits = random_logits(2, seed=12)
    top = logits.argmax(dim=-1)
    rows = [row(temperature=1.0, top_k=2, logit_bias=((int(top[0]), -100.0),)),
            row(temperature=0.0, logit_bias=((17, 100.0),))]
    for _ in range(50):
        drawn = sample(logits, rows)
        assert drawn[0] != top[0] and drawn[1] == 17
