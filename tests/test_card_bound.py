"""bench/card_bound.py: the offline batch's least time on a card, checked against sums worked by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from card_bound import ModelShape, bound_seconds, bound_tok_s  # noqa: E402

# One layer of hidden size 2 and intermediate 3: 4*2*2 + 3*2*3 = 34 weights in the layer.
SHAPE = ModelShape(num_layers=1, hidden_size=2, intermediate_size=3, vocab_size=5, weight_bytes_per_step=100,
                   kv_bytes_per_token=10)


def test_bound_adds_the_prefill_flops_and_each_decode_steps_bytes() -> None:
    # 2 requests, 3 prompt tokens, 3 new tokens. Prefill: 2 * (3 * 68 + attention 8 * (1 + 2 + 3) + head 20).
    prefill_flops = 2 * (3 * 68 + 8 * 6 + 20)
    # Decode steps 1 and 2 read the weights and 2 contexts of 4 and 5 tokens; compute is far below.
    moved = (100 + 2 * 4 * 10) + (100 + 2 * 5 * 10)
    assert bound_seconds(SHAPE, 2, 3, 3, bandwidth=10.0, matmul_flops=1e6) == pytest.approx(
        prefill_flops / 1e6 + moved / 10.0)
    assert bound_tok_s(SHAPE, 2, 3, 3, 10.0, 1e6) == pytest.approx(6 / (prefill_flops / 1e6 + moved / 10.0))


def test_a_step_whose_matmuls_outlast_its_bytes_takes_their_time() -> None:
    slow = bound_seconds(SHAPE, 2, 3, 2, bandwidth=1e12, matmul_flops=1.0)
    step_flops = 2 * (68 + 8 * 4 + 20)
    assert slow == pytest.approx(2 * (3 * 68 + 8 * 6 + 20) + step_flops)


def test_a_smaller_cache_entry_raises_the_bound_of_a_large_batch() -> None:
    half = ModelShape(1, 2, 3, 5, weight_bytes_per_step=100, kv_bytes_per_token=5)
    assert bound_tok_s(half, 64, 16, 8, 10.0, 1e9) > 1.5 * bound_tok_s(SHAPE, 64, 16, 8, 10.0, 1e9)
