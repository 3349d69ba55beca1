"""Turns a scheduled step into model inputs, runs the model and samples the next tokens."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from ..model.attention import AttentionBatch, VarlenLayout, varlen_supported
from ..model.kv_cache import KVCache
from ..model.xverse import XverseForCausalLM
from .cuda_graphs import DecodeGraphs
from .piecewise_graphs import PiecewiseGraphs
from .sampling import OutputCounts, SamplingRow, SeenTokens, sample, to_device
from .scheduler import ScheduledSequence


@dataclass
class StepInputs:
    """One step's inputs, built on the host."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: list[int]
    query_lens: list[int]

    @property
    def decode_only(self) -> bool:
        return len(self.query_lens) == self.input_ids.shape[0]


def build_inputs(scheduled: list[ScheduledSequence], block_size: int, table_width: int | None = None) -> StepInputs:
    """`table_width` pads every block table to that many columns (default: the longest table)."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    context_lens: list[int] = []
    width = table_width or max(len(entry.seq.block_table) for entry in scheduled)
    tables = np.zeros((len(scheduled), width), dtype=np.int32)
    for row, entry in enumerate(scheduled):
        seq, start = entry.seq, entry.seq.num_computed
        end = start + entry.num_new_tokens
        table = seq.block_table
        tables[row, :len(table)] = table
        context_lens.append(end)
        if end - start == 1:  # a decode: the common case, kept cheap
            input_ids.extend(seq.token_ids(start, end))
            positions.append(start)
            slots.append(table[start // block_size] * block_size + start % block_size)
            continue
        input_ids.extend(seq.token_ids(start, end))
        positions.extend(range(start, end))
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
    return StepInputs(
        input_ids=torch.tensor(input_ids, dtype=torch.long),
        positions=torch.tensor(positions, dtype=torch.long),
        slot_mapping=torch.tensor(slots, dtype=torch.long),
        block_tables=torch.from_numpy(tables),
        context_lens=context_lens,
        query_lens=[entry.num_new_tokens for entry in scheduled],
    )


# Most context tokens gathered for one varlen_attn call (keys and values of 8,192 tokens of XVERSE-7B: 128 MiB in
# bf16, what a default step's prefills gather and start-up's memory plan measures). Prefills whose contexts add up
# to more (long cached prefixes: the new tokens are few, the context is not) go in several calls.
VARLEN_MAX_CONTEXT_TOKENS = 8192


def varlen_layouts(block_tables: np.ndarray, context_lens: list[int], query_lens: list[int], num_decodes: int,
                   block_size: int, device: torch.device) -> list[VarlenLayout]:
    """The step's prefills (its sequences from num_decodes on) in groups of at most VARLEN_MAX_CONTEXT_TOKENS
    context tokens (or a single longer one), one varlen_attn call each."""
    groups, start, total = [], num_decodes, 0
    for row in range(num_decodes, len(query_lens)):
        if row > start and total + context_lens[row] > VARLEN_MAX_CONTEXT_TOKENS:
            groups.append(range(start, row))
            start, total = row, 0
        total += context_lens[row]
    groups.append(range(start, len(query_lens)))
    return [varlen_layout(block_tables, context_lens, query_lens, rows, block_size, device) for rows in groups]


def varlen_layout(block_tables: np.ndarray, context_lens: list[int], query_lens: list[int], rows: range,
                  block_size: int, device: torch.device) -> VarlenLayout:
    """Prefills `rows` of the step packed for varlen_attn, on `device`: the cache slot of every position of their
    contexts, where each one's queries and context start, and where their queries sit among the step's tokens."""
    q_lens = np.asarray(query_lens[rows.start:rows.stop])
    k_lens = np.asarray(context_lens[rows.start:rows.stop])
    cu_seq_q = np.concatenate(([0], np.cumsum(q_lens))).astype(np.int32)
    cu_seq_k = np.concatenate(([0], np.cumsum(k_lens))).astype(np.int32)
    # Each context position's row in the block tables and its position within its sequence.
    seq_rows = np.repeat(np.arange(rows.start, rows.stop), k_lens)
    positions = np.arange(cu_seq_k[-1]) - np.repeat(cu_seq_k[:-1], k_lens)
    blocks = block_tables[seq_rows, positions // block_size].astype(np.int64)
    slots = blocks * block_size + positions % block_size
    first_token = sum(query_lens[:rows.start])
    return VarlenLayout(
        tokens=slice(first_token, first_token + int(cu_seq_q[-1])),
        context_slots=torch.from_numpy(slots).to(device, non_blocking=True),
        cu_seq_q=torch.from_numpy(cu_seq_q).to(device, non_blocking=True),
        cu_seq_k=torch.from_numpy(cu_seq_k).to(device, non_blocking=True),
        max_q=int(q_lens.max()),
        max_k=int(k_lens.max()),
    )


@dataclass
class Feed:
    """Input tokens a step takes from the previous step's sampled ids, still on the device."""

    ids: torch.Tensor  # the previous step's SampledTokens.ids
    sources: list[int]  # per scheduled row: the index of its input token in ids, or -1 (the host has it)


class SampledTokens:
    """One step's sampled token ids: on the device at once (the next step can take them as inputs), on the host
    once read. tolist waits for the copy queued right behind the sampler, not for work queued after it."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids
        self._host, self._copied = ids, None
        if ids.is_cuda:
            self._host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
            self._host.copy_(ids, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()

    def tolist(self) -> list[int]:
        if self._copied is not None:
            self._copied.synchronize()
        return self._host.tolist()


class ModelRunner:
    def __init__(self, model: XverseForCausalLM, kv_cache: KVCache, graphs: DecodeGraphs | None = None,
                 pieces: PiecewiseGraphs | None = None) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.graphs = graphs  # decode steps
        self.pieces = pieces  # other steps of up to pieces.max_tokens tokens
        # With graphs, eager steps pad block tables to the graphs' width too: the decode kernel's variant
        # depends on the width, and every variant for that width was compiled when the graphs were captured.
        self.table_width = graphs.block_tables.shape[1] if graphs is not None else None
        self.device = model.lm_head.weight.device
        self.use_varlen = varlen_supported(self.device, model.dtype)
        self.seen = SeenTokens(model.config.vocab_size, self.device)
        self.counts = OutputCounts(model.config.vocab_size, self.device)

    def release(self, request_id: str) -> None:
        """Forgets a finished or aborted sequence's sampling state."""
        self.seen.release(request_id)
        self.counts.release(request_id)

    @torch.inference_mode()
    def run(self, scheduled: list[ScheduledSequence], feed: Feed | None = None) -> SampledTokens | None:
        """Queues one step on the device: the forward pass and the sampling of a token for each entry whose chunk
        ends its sequence. Returns those tokens (None if no entry samples) without waiting for the GPU.
        `feed` gives rows whose input token the previous step sampled and the host has not read yet."""
        inputs = build_inputs(scheduled, self.kv_cache.block_size, self.table_width)
        if self.graphs is not None and inputs.decode_only and len(scheduled) <= self.graphs.max_batch:
            logits = self.graphs.run(inputs.input_ids, inputs.positions, inputs.slot_mapping, inputs.block_tables,
                                     inputs.context_lens, self.input_ids(inputs, feed) if feed is not None else None)
            step_ids = self.graphs.input_ids[:len(scheduled)]
        else:
            logits, step_ids = self.run_forward(inputs, feed)
        self._record_seen(scheduled, step_ids)
        indices, rows, penalized, counted = [], [], [], []
        for index, entry in enumerate(scheduled):
            if not entry.samples:
                continue
            seq = entry.seq
            indices.append(index)
            rows.append(SamplingRow(seq.params, seq.generator))
            penalized.append(seq.request_id if seq.params.repetition_penalty != 1.0 else None)
            counted.append(seq.request_id if seq.params.counts_outputs else None)
        if not rows:
            return None
        if len(rows) < len(scheduled):
            logits = logits[to_device(indices, torch.long, self.device)]
        seen = self.seen.rows(penalized) if any(penalized) else None
        counts = None
        if any(counted):
            counts = self.counts.rows([r if r is not None and self.counts.tracks(r) else None for r in counted])
        sampled = sample(logits, rows, seen, counts)
        if any(counted):
            kept = [i for i, request_id in enumerate(counted) if request_id is not None]
            self.counts.add([counted[i] for i in kept], sampled[to_device(kept, torch.long, self.device)])
        return SampledTokens(sampled)

    def _record_seen(self, scheduled: list[ScheduledSequence], step_ids: torch.Tensor) -> None:
        """Marks the ids each sequence with a repetition penalty feeds this step (read on the device: a fed id
        the previous step sampled may not have reached the host yet)."""
        spans, first = [], 0
        for entry in scheduled:
            seq, end = entry.seq, first + entry.num_new_tokens
            if seq.params.repetition_penalty != 1.0:
                if not self.seen.tracks(seq.request_id):
                    self.seen.start(seq.request_id, seq.token_ids(0, seq.num_computed))
                spans.append((seq.request_id, first, end))
            first = end
        if spans:
            self.seen.record(step_ids, spans)

    def input_ids(self, inputs: StepInputs, feed: Feed | None) -> torch.Tensor:
        """The step's token ids on the device, with the fed ones taken from the previous step's sampled ids."""
        if feed is not None and feed.sources == list(range(feed.ids.numel())):
            return feed.ids  # the same decodes as last step, in the same order: its samples are the inputs
        input_ids = to_device(inputs.input_ids, None, self.device)
        if feed is None:
            return input_ids
        targets, sources = [], []
        for end, source in zip(itertools.accumulate(inputs.query_lens), feed.sources):
            if source >= 0:  # the row's last token, the one sampled last step
                targets.append(end - 1)
                sources.append(source)
        if targets:
            fed = feed.ids[to_device(sources, torch.long, self.device)]
            input_ids[to_device(targets, torch.long, self.device)] = fed
        return input_ids

    def prepare(self, scheduled: list[ScheduledSequence]) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch]:
        """Token ids, positions and attention batch of a step, on the device."""
        return self.device_inputs(build_inputs(scheduled, self.kv_cache.block_size, self.table_width))

    def device_inputs(self, inputs: StepInputs,
                      feed: Feed | None = None) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch]:
        num_decodes = sum(1 for n in inputs.query_lens if n == 1)
        varlen = None
        if self.use_varlen and not inputs.decode_only:
            varlen = varlen_layouts(inputs.block_tables.numpy(), inputs.context_lens, inputs.query_lens, num_decodes,
                                   self.kv_cache.block_size, self.device)
        batch = AttentionBatch(
            slot_mapping=to_device(inputs.slot_mapping, None, self.device),
            block_tables=to_device(inputs.block_tables, None, self.device),
            context_lens=to_device(inputs.context_lens, torch.int32, self.device),
            query_lens=inputs.query_lens,
            context_lens_host=inputs.context_lens,
            num_decodes=num_decodes,
            varlen=varlen,
        )
        return self.input_ids(inputs, feed), to_device(inputs.positions, None, self.device), batch

    def run_forward(self, inputs: StepInputs, feed: Feed | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [sequences, vocab] at each sequence's last position this step, and the step's input ids:
        through the piecewise graphs where the step fits them, else eagerly."""
        input_ids, positions, batch = self.device_inputs(inputs, feed)
        # Each sequence's last position, on the device before the forward pass so nothing waits on it.
        last = to_device(list(itertools.accumulate(inputs.query_lens, initial=-1))[1:], torch.long, self.device)
        if self.pieces is not None and input_ids.shape[0] <= self.pieces.max_tokens:
            hidden = self.pieces.forward(input_ids, positions, batch)
        else:
            hidden = self.model(input_ids, positions, self.kv_cache.layers, batch)
        return self.model.compute_logits(hidden[last]), input_ids
