"""On a CUDA machine: the GPU path (Triton decode attention, CUDA graphs, memory plan) gives the CPU
reference's greedy tokens on the tiny checkpoint, batched or alone. Skipped where there is no GPU (CI)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from xverse_serve.launch import build_engine
from xverse_serve.sampling import SamplingParams
from xverse_serve.settings import parse_settings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [[5 + i for i in range(n)] for n in (3, 17, 40, 64, 100)]


def greedy_tokens(model_dir: Path, device: str, *flags: str, together: bool = True) -> list[list[int]]:
    ctx = build_engine(parse_settings(["--model-path", str(model_dir), "--device", device, "--dtype", "float32",
                                       "--max-num-seqs", "8", "--max-batched-tokens", "64", *flags]))
    engine = ctx.engine.engine
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, repetition_penalty=1.1)
    results: dict[str, list[int]] = {}

    def drain() -> None:
        while engine.has_work():
            for output in engine.step():
                results.setdefault(output.request_id, []).extend(output.new_token_ids)

    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, params)
        if not together:
            drain()
    drain()
    assert engine.scheduler.allocator.num_free == engine.scheduler.allocator.num_blocks
    return [results[str(i)] for i in range(len(PROMPTS))]


def test_gpu_greedy_tokens_equal_the_cpu_reference(tiny_model_dir: Path) -> None:
    reference = greedy_tokens(tiny_model_dir, "cpu", together=False)
    assert greedy_tokens(tiny_model_dir, "cuda") == reference  # batched, chunked prefill, CUDA graphs
    assert greedy_tokens(tiny_model_dir, "cuda", together=False) == reference
    assert greedy_tokens(tiny_model_dir, "cuda", "--enforce-eager") == reference
