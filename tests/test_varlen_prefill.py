"""On CUDA a step's prefills go through one varlen_attn call per layer, over their contexts gathered with one index
built per step (runner.varlen_layout); it computes what the per-sequence loop (the CPU path) computes.

On CPU, varlen_attn is replaced by a per-sequence reference with the bottom-right causal mask flash attention
uses, and the layout is handed to paged_attention, so the layout and the call path are checked without a GPU.
On a GPU, the real varlen_attn in bfloat16 stays within 2e-2 (relative) of the float32 loop on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from paged import paged_logits

from xverse_serve.engine import runner as runner_module
from xverse_serve.engine.block_allocator import blocks_needed
from xverse_serve.engine.messages import SamplingParams
from xverse_serve.engine.runner import ModelRunner, build_inputs, varlen_layout, varlen_layouts
from xverse_serve.engine.scheduler import ScheduledSequence, Sequence
from xverse_serve.model import attention
from xverse_serve.model.attention import AttentionBatch, paged_attention, quantize_kv, varlen_supported
from xverse_serve.model.checkpoint import ModelConfig
from xverse_serve.model.kv_cache import KVCache
from xverse_serve.model.quantization import relative_error
from xverse_serve.model.xverse import XverseForCausalLM, load_model

HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 4, 16, 4, 48
SCALE = HEAD_DIM ** -0.5
CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def reference_varlen_attn(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_q: torch.Tensor,
                          cu_seq_k: torch.Tensor, max_q: int, max_k: int, *, scale: float,
                          window_size: tuple[int, int]) -> torch.Tensor:
    """varlen_attn with window_size (-1, 0), one sequence at a time: query i of q_len attends keys up to
    i + (k_len - q_len), the causal mask aligned bottom-right."""
    assert window_size == (-1, 0)
    assert cu_seq_q.dtype == cu_seq_k.dtype == torch.int32 and cu_seq_q.device == query.device
    q_lens, k_lens = cu_seq_q.diff().tolist(), cu_seq_k.diff().tolist()
    assert (max_q, max_k) == (max(q_lens), max(k_lens))
    assert query.shape[0] == cu_seq_q[-1] and key.shape[0] == value.shape[0] == cu_seq_k[-1]
    outputs = []
    for i, (q_len, k_len) in enumerate(zip(q_lens, k_lens)):
        q = query[cu_seq_q[i]:cu_seq_q[i + 1]]
        k, v = key[cu_seq_k[i]:cu_seq_k[i + 1]], value[cu_seq_k[i]:cu_seq_k[i + 1]]
        allowed = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
        out = F.scaled_dot_product_attention(*(t.transpose(0, 1).float() for t in (q, k, v)), attn_mask=allowed,
                                             scale=scale)
        outputs.append(out.transpose(0, 1).to(query.dtype))
    return torch.cat(outputs)


@dataclasses.dataclass
class Scenario:
    context_lens: list[int]  # tokens cached for each sequence once this step's are written
    query_lens: list[int]  # the decodes (1) first
    tables: list[list[int]] | None = None  # default: shuffled blocks, none shared


SCENARIOS = {
    "prompts of odd lengths": Scenario([5, 13, 7, 31, 3], [5, 13, 7, 31, 3]),
    "decodes then prefills": Scenario([11, 3, 25, 8, 14], [1, 1, 1, 8, 5]),
    "later chunks of chunked prefills": Scenario([20, 9, 26], [6, 9, 3]),
    # The second prompt's first two blocks are the first's, found in the prefix cache: only its tail is computed.
    "prefix-cache hit": Scenario([10, 15], [10, 7], tables=[[7, 2, 30], [7, 2, 11, 40]]),
    "non-contiguous blocks": Scenario([15, 15, 10], [1, 15, 4],
                                      tables=[[5, 6, 7, 8], [9, 3, 27, 1], [44, 0, 12]]),
}
KV_DTYPES = {"plain": None, "int8": torch.int8, "fp8": torch.float8_e4m3fn}


@dataclasses.dataclass
class Step:
    q: torch.Tensor  # [tokens, heads, head_dim]
    kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]  # k, v, k_scale, v_scale
    batch: AttentionBatch  # without a VarlenLayout: prefills go through the loop
    tables: np.ndarray  # the block tables on the host, as build_inputs makes them

    def to(self, device: torch.device, dtype: torch.dtype) -> Step:
        """q (and an unquantized cache) in `dtype`, everything on `device`; 8-bit caches and scales as they are."""
        k, v, k_scale, v_scale = self.kv
        if k_scale is None:
            kv = (k.to(device, dtype), v.to(device, dtype), None, None)
        else:
            kv = (k.to(device), v.to(device), k_scale.to(device), v_scale.to(device))
        batch = dataclasses.replace(self.batch, slot_mapping=self.batch.slot_mapping.to(device),
                                    block_tables=self.batch.block_tables.to(device),
                                    context_lens=self.batch.context_lens.to(device))
        return Step(self.q.to(device, dtype), kv, batch, self.tables)

    def attention(self) -> torch.Tensor:
        return paged_attention(self.q, *self.kv[:2], self.batch, SCALE, *self.kv[2:])

    def varlen_attention(self) -> torch.Tensor:
        layouts = varlen_layouts(self.tables, self.batch.context_lens_host, self.batch.query_lens,
                                 self.batch.num_decodes, BLOCK_SIZE, self.q.device)
        return paged_attention(self.q, *self.kv[:2], dataclasses.replace(self.batch, varlen=layouts), SCALE,
                               *self.kv[2:])


def make_step(scenario: Scenario, kv_dtype: torch.dtype | None, seed: int = 0) -> Step:
    """Random queries and a cache of random vectors everywhere, so that a wrong slot changes the result.
    The step's own keys and values need no writing: attention reads them from the cache like the rest."""
    gen = torch.Generator().manual_seed(seed)
    shape = (NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM)
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    kv = (k_cache, v_cache, None, None)
    if kv_dtype is not None:
        (k_cache, k_scale), (v_cache, v_scale) = (quantize_kv(c, kv_dtype) for c in (k_cache, v_cache))
        kv = (k_cache, v_cache, k_scale, v_scale)
    tables = scenario.tables
    if tables is None:
        pool = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
        counts = [blocks_needed(n, BLOCK_SIZE) for n in scenario.context_lens]
        tables = [pool[sum(counts[:i]):sum(counts[:i + 1])] for i in range(len(counts))]
    width = max(map(len, tables))
    host_tables = np.array([t + [0] * (width - len(t)) for t in tables], dtype=np.int32)
    slots = [t[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
             for t, n, count in zip(tables, scenario.context_lens, scenario.query_lens) for p in range(n - count, n)]
    batch = AttentionBatch(
        slot_mapping=torch.tensor(slots), block_tables=torch.from_numpy(host_tables),
        context_lens=torch.tensor(scenario.context_lens, dtype=torch.int32), query_lens=scenario.query_lens,
        context_lens_host=scenario.context_lens, num_decodes=sum(1 for n in scenario.query_lens if n == 1),
    )
    return Step(torch.randn(len(slots), HEADS, HEAD_DIM, generator=gen), kv, batch, host_tables)


def test_layout_lists_the_cache_slot_of_every_prefill_context_position() -> None:
    tables = np.array([[5, 0, 0], [7, 2, 0], [3, 9, 4]], dtype=np.int32)
    layout = varlen_layout(tables, context_lens=[3, 6, 9], query_lens=[1, 2, 9], rows=range(1, 3), block_size=4,
                           device=CPU)
    assert layout.tokens == slice(1, 12)
    assert layout.context_slots.tolist() == [28, 29, 30, 31, 8, 9] + [12, 13, 14, 15, 36, 37, 38, 39, 16]
    assert layout.context_slots.dtype == torch.long
    assert layout.cu_seq_q.tolist() == [0, 2, 11] and layout.cu_seq_k.tolist() == [0, 6, 15]
    assert layout.cu_seq_q.dtype == layout.cu_seq_k.dtype == torch.int32
    assert (layout.max_q, layout.max_k) == (9, 9)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES.values(), ids=KV_DTYPES.keys())
@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_varlen_path_equals_the_per_sequence_loop(monkeypatch: pytest.MonkeyPatch, scenario: Scenario,
                                                  kv_dtype: torch.dtype | None) -> None:
    monkeypatch.setattr(attention, "varlen_attn", reference_varlen_attn)
    step = make_step(scenario, kv_dtype)
    torch.testing.assert_close(step.varlen_attention(), step.attention())


def test_varlen_only_where_flash_attention_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")
    assert not varlen_supported(CPU, torch.bfloat16)
    assert not varlen_supported(cuda, torch.float32)

    def varlen_attn_of_torch_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                                  is_causal=False):  # no scale, no window_size
        raise AssertionError("not to be called")

    monkeypatch.setattr(attention, "varlen_attn", varlen_attn_of_torch_2_10)
    assert not varlen_supported(cuda, torch.bfloat16)
    monkeypatch.setattr(attention, "varlen_attn", reference_varlen_attn)
    assert varlen_supported(cuda, torch.bfloat16) and varlen_supported(cuda, torch.float16)
    monkeypatch.setattr(attention, "varlen_attn", None)
    assert not varlen_supported(cuda, torch.bfloat16)


def test_prefills_whose_contexts_exceed_the_gather_limit_go_in_several_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner_module, "VARLEN_MAX_CONTEXT_TOKENS", 10)
    tables = np.arange(4 * 5, dtype=np.int32).reshape(4, 5)
    # A decode, then prefills with contexts of 4, 5, 12 (alone over the limit) and 3 tokens.
    layouts = varlen_layouts(np.vstack([tables, tables[:1]]), context_lens=[7, 4, 5, 12, 3],
                             query_lens=[1, 4, 2, 3, 3], num_decodes=1, block_size=4, device=CPU)
    assert [layout.tokens for layout in layouts] == [slice(1, 7), slice(7, 10), slice(10, 13)]
    assert [layout.cu_seq_k.tolist() for layout in layouts] == [[0, 4, 9], [0, 12], [0, 3]]
    assert layouts[1].context_slots.tolist() == list(range(60, 72))  # row 3: blocks 15, 16, 17


@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_several_calls_compute_what_one_does(monkeypatch: pytest.MonkeyPatch, scenario: Scenario) -> None:
    monkeypatch.setattr(attention, "varlen_attn", reference_varlen_attn)
    step = make_step(scenario, torch.int8)
    whole = step.varlen_attention()
    monkeypatch.setattr(runner_module, "VARLEN_MAX_CONTEXT_TOKENS", 1)  # every prefill in a call of its own
    torch.testing.assert_close(step.varlen_attention(), whole)


@pytest.fixture
def forced_varlen(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner builds layouts on CPU, and varlen_attn is the reference."""
    monkeypatch.setattr(runner_module, "varlen_supported", lambda device, dtype: True)
    monkeypatch.setattr(attention, "varlen_attn", reference_varlen_attn)


@pytest.mark.usefixtures("forced_varlen")
def test_runner_builds_a_layout_for_steps_with_prefills_only(config: ModelConfig) -> None:
    model = XverseForCausalLM(config)
    runner = ModelRunner(model, KVCache(config, 16, BLOCK_SIZE, torch.float32, CPU))
    decoding = Sequence("a", list(range(4, 14)), SamplingParams(max_tokens=1))
    decoding.block_table, decoding.num_computed = [3, 9, 1], 9
    prefilling = Sequence("b", list(range(4, 11)), SamplingParams(max_tokens=1))
    prefilling.block_table = [12, 5]
    step = [ScheduledSequence(decoding, 1), ScheduledSequence(prefilling, 7)]
    _, _, batch = runner.device_inputs(build_inputs(step, BLOCK_SIZE))
    (layout,) = batch.varlen
    assert layout.context_slots.tolist() == [48, 49, 50, 51, 20, 21, 22] and layout.tokens == slice(1, 8)
    assert layout.cu_seq_q.tolist() == [0, 7] and layout.cu_seq_k.tolist() == [0, 7]
    _, _, batch = runner.device_inputs(build_inputs(step[:1], BLOCK_SIZE))
    assert batch.varlen is None


def test_runner_on_cpu_keeps_the_loop(config: ModelConfig) -> None:
    runner = ModelRunner(XverseForCausalLM(config), KVCache(config, 16, BLOCK_SIZE, torch.float32, CPU))
    prefilling = Sequence("b", list(range(4, 11)), SamplingParams(max_tokens=1))
    prefilling.block_table = [12, 5]
    _, _, batch = runner.device_inputs(build_inputs([ScheduledSequence(prefilling, 7)], BLOCK_SIZE))
    assert batch.varlen is None


def test_model_logits_through_varlen_equal_the_loop(monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path,
                                                    config: ModelConfig) -> None:
    model = load_model(tiny_model_dir, config, CPU, torch.float32, 256)
    ids = torch.randint(4, config.vocab_size, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    chunks = [13, 1, 9, 6, 1, 1, 9]
    loop = paged_logits(model, ids, chunks)
    monkeypatch.setattr(runner_module, "varlen_supported", lambda device, dtype: True)
    monkeypatch.setattr(attention, "varlen_attn", reference_varlen_attn)
    torch.testing.assert_close(paged_logits(model, ids, chunks), loop)


# ---------------------------------------------------------------- the real varlen_attn, on a GPU


@pytest.fixture
def counted_varlen(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of the real varlen_attn."""
    calls = []
    real = attention.varlen_attn

    @functools.wraps(real)  # the same signature, which varlen_supported inspects
    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "varlen_attn", counting)
    return calls


@needs_cuda
def test_varlen_is_supported_on_this_gpu() -> None:
    assert varlen_supported(torch.device("cuda"), torch.bfloat16)


@needs_cuda
@pytest.mark.parametrize("kv_dtype", KV_DTYPES.values(), ids=KV_DTYPES.keys())
@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_bfloat16_varlen_on_gpu_agrees_with_the_float32_loop(counted_varlen: list[int], scenario: Scenario,
                                                             kv_dtype: torch.dtype | None) -> None:
    step = make_step(scenario, kv_dtype).to(CPU, torch.bfloat16)  # the GPU's inputs, exactly
    reference = step.to(CPU, torch.float32).attention()
    out = step.to(torch.device("cuda"), torch.bfloat16).varlen_attention()
    assert counted_varlen == [1] and out.dtype == torch.bfloat16
    assert relative_error(out.cpu(), reference) < 2e-2


@needs_cuda
def test_bfloat16_model_logits_through_varlen_agree_with_the_loop(monkeypatch: pytest.MonkeyPatch,
                                                                  counted_varlen: list[int], tiny_model_dir: Path,
                                                                  config: ModelConfig) -> None:
    model = load_model(tiny_model_dir, config, torch.device("cuda"), torch.bfloat16, 256)
    ids = torch.randint(4, config.vocab_size, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    chunks = [13, 1, 9, 6, 1, 1, 9]
    varlen = paged_logits(model, ids, chunks)
    assert len(counted_varlen) == 4 * config.num_layers  # the four prefill chunks
    monkeypatch.setattr(runner_module, "varlen_supported", lambda device, dtype: False)
    loop = paged_logits(model, ids, chunks)
    assert relative_error(varlen.float(), loop.float()) < 2e-2
