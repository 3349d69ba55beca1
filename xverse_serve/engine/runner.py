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
from .grammar import TokenMasks
from .messages import SamplingParams, TokenLogprob
from .piecewise_graphs import PiecewiseGraphs
from .sampling import OutputCounts, SamplingRow, SeenTokens, sample, to_device
from .scheduler import ScheduledSequence, Sequence


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


@dataclass
class Logprobs:
    """Log-probabilities of one token per row, with its row's top[i] best alternatives, on the device or the host."""

    top: list[int]  # alternatives asked for, per row
    chosen: torch.Tensor  # [rows] float32
    top_logprobs: torch.Tensor  # [rows, max(top)] float32
    top_ids: torch.Tensor  # [rows, max(top)] int64

    def to_host(self) -> Logprobs:
        return Logprobs(self.top, to_host(self.chosen), to_host(self.top_logprobs), to_host(self.top_ids))

    def entries(self) -> list[TokenLogprob]:
        """One TokenLogprob per row (on the host)."""
        chosen, top_logprobs, top_ids = self.chosen.tolist(), self.top_logprobs.tolist(), self.top_ids.tolist()
        return [TokenLogprob(chosen[i], list(zip(top_ids[i][:k], top_logprobs[i][:k]))) for i, k in enumerate(self.top)]


def logprobs_of(logits: torch.Tensor, targets: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """The raw model log-probabilities (log-softmax of the logits, before penalties, bias, temperature, top-k/top-p)
    of each row's target token, and each row's k likeliest tokens with theirs."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top_logprobs, top_ids = logprobs.topk(k, dim=-1)
    return logprobs.gather(1, targets[:, None])[:, 0], top_logprobs, top_ids


@dataclass
class StepLogits:
    """A step whose forward pass is queued: its sequences' last-position logits, [scheduled, vocab] on the device
    (a CUDA graph's buffer: sample before the next step runs), and the prompt log-probs it computed."""

    scheduled: list[ScheduledSequence]
    drawing: list[int]  # the entries it draws a token for (as the step was scheduled: ScheduledSequence.draws)
    logits: torch.Tensor
    prompt: PromptLogprobs | None


@dataclass
class SampledLogprobs:
    """The log-probabilities of some rows' samples; rows are indices among the step's sampled rows."""

    rows: list[int]
    values: Logprobs


@dataclass
class PromptLogprobs:
    """The log-probabilities of prompt tokens computed by one step: for each span (sequence, first position,
    count), the log-prob of the prompt token after each of those positions and its top alternatives, rows in span
    order."""

    spans: list[tuple[Sequence, int, int]]
    values: Logprobs


# Prompt positions whose logits are computed at once for their log-probs: [this, vocab] float32 at a time.
PROMPT_LOGPROB_ROWS = 512
# How a row draws whose sequence ended between the step's forward pass and its draw: the token is dropped.
RELEASED_ROW = SamplingParams(max_tokens=1, temperature=0.0)


def prompt_spans(scheduled: list[ScheduledSequence]) -> tuple[list[tuple[Sequence, int, int]], list[int]]:
    """For the step's sequences that ask for prompt log-probs: (sequence, first position, count) of the positions it
    computes whose next token is a prompt token, and where those positions sit among the step's tokens."""
    spans, rows, first = [], [], 0
    for entry in scheduled:
        seq = entry.seq
        start, end = seq.num_computed, seq.num_computed + entry.num_new_tokens
        last = min(end, len(seq.prompt_ids) - 1)
        if seq.params.prompt_logprobs is not None and start < last:
            spans.append((seq, start, last - start))
            rows.extend(range(first, first + last - start))
        first += entry.num_new_tokens
    return spans, rows


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A copy in page-locked memory, queued behind the work before it (the caller waits on an event for it)."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


class SampledTokens:
    """One step's sampled token ids (and the log-probs some rows asked for): on the device at once (the next step
    can take the ids as inputs), on the host once read. tolist waits for the copies queued right behind the sampler,
    not for work queued after it."""

    def __init__(self, ids: torch.Tensor, logprobs: SampledLogprobs | None = None,
                 prompt: PromptLogprobs | None = None) -> None:
        self.ids = ids
        self._copied = None
        if ids.is_cuda:
            ids = to_host(ids)
            if logprobs is not None:
                logprobs = SampledLogprobs(logprobs.rows, logprobs.values.to_host())
            if prompt is not None:
                prompt = PromptLogprobs(prompt.spans, prompt.values.to_host())
            self._copied = torch.cuda.Event()
            self._copied.record()
        self._host, self._host_logprobs, self._host_prompt = ids, logprobs, prompt

    def tolist(self) -> list[int]:
        if self._copied is not None:
            self._copied.synchronize()
        return self._host.tolist()

    def logprobs(self) -> dict[int, TokenLogprob]:
        """By index among the step's sampled rows, the log-probs of the rows that asked (after tolist)."""
        found = self._host_logprobs
        return {} if found is None else dict(zip(found.rows, found.values.entries()))

    def prompt_logprobs(self) -> list[tuple[Sequence, int, list[TokenLogprob]]]:
        """(sequence, first position, the log-probs of the prompt tokens after it on), per span (after tolist)."""
        found = self._host_prompt
        if found is None:
            return []
        entries, spans, row = found.values.entries(), [], 0
        for seq, start, count in found.spans:
            spans.append((seq, start, entries[row:row + count]))
            row += count
        return spans


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
        self.released: set[str] = set()  # since the last forward pass

    def release(self, request_id: str) -> None:
        """Forgets a finished or aborted sequence's sampling state."""
        self.seen.release(request_id)
        self.counts.release(request_id)
        self.released.add(request_id)

    def run(self, scheduled: list[ScheduledSequence], feed: Feed | None = None) -> SampledTokens | None:
        """Queues one step on the device: the forward pass and the sampling of a token for each entry whose chunk
        ends its sequence. Returns those tokens (None if no entry samples) without waiting for the GPU.
        `feed` gives rows whose input token the previous step sampled and the host has not read yet."""
        return self.sample(self.forward(scheduled, feed))

    @torch.inference_mode()
    def forward(self, scheduled: list[ScheduledSequence], feed: Feed | None = None) -> StepLogits:
        """Queues a step's forward pass: the logits of its sequences' last positions (and the prompt log-probs
        asked for), to sample from next."""
        self.released.clear()
        inputs = build_inputs(scheduled, self.kv_cache.block_size, self.table_width)
        spans, span_rows = prompt_spans(scheduled)
        prompt = None
        if (self.graphs is not None and inputs.decode_only and len(scheduled) <= self.graphs.max_batch
                and not spans):
            logits = self.graphs.run(inputs.input_ids, inputs.positions, inputs.slot_mapping, inputs.block_tables,
                                     inputs.context_lens, self.input_ids(inputs, feed) if feed is not None else None)
            step_ids = self.graphs.input_ids[:len(scheduled)]
        else:
            logits, step_ids, hidden = self.run_forward(inputs, feed)
            if spans:
                prompt = self._prompt_logprobs(hidden, span_rows, spans)
        self._record_seen(scheduled, step_ids)
        return StepLogits(scheduled, [index for index, entry in enumerate(scheduled) if entry.draws], logits, prompt)

    @torch.inference_mode()
    def sample(self, step: StepLogits, masks: TokenMasks | None = None) -> SampledTokens | None:
        """Queues the draw of a token for each of the step's drawing rows (in order), within `masks` for the rows
        with a grammar."""
        indices, rows, penalized, counted = step.drawing, [], [], []
        for index in indices:
            seq = step.scheduled[index].seq
            # A sequence released since the forward pass (a grammar step read the previous step, which ended it)
            # has no sampling state left: it draws greedily, and its token is dropped.
            released = seq.request_id in self.released
            params = RELEASED_ROW if released else seq.params
            rows.append(SamplingRow(params, None if released else seq.generator))
            penalized.append(seq.request_id if params.repetition_penalty != 1.0 else None)
            counted.append(seq.request_id if params.counts_outputs else None)
        prompt = step.prompt
        if not rows:
            return SampledTokens(torch.empty(0, dtype=torch.long, device=self.device), None, prompt) if prompt else None
        logits = step.logits
        if len(rows) < len(step.scheduled):
            logits = logits[to_device(indices, torch.long, self.device)]
        seen = self.seen.rows(penalized) if any(penalized) else None
        counts = None
        if any(counted):
            counts = self.counts.rows([r if r is not None and self.counts.tracks(r) else None for r in counted])
        allowed = None
        if masks is not None and masks.rows:
            allowed = (to_device(masks.rows, torch.long, self.device), to_device(masks.bits, None, self.device))
        sampled = sample(logits, rows, seen, counts, allowed)
        if any(counted):
            kept = [i for i, request_id in enumerate(counted) if request_id is not None]
            self.counts.add([counted[i] for i in kept], sampled[to_device(kept, torch.long, self.device)])
        asking = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
        logprobs = None
        if asking:
            index = to_device(asking, torch.long, self.device)
            top = [rows[i].params.logprobs for i in asking]
            logprobs = SampledLogprobs(asking, Logprobs(top, *logprobs_of(logits[index], sampled[index], max(top))))
        return SampledTokens(sampled, logprobs, prompt)

    def _prompt_logprobs(self, hidden: torch.Tensor, span_rows: list[int],
                         spans: list[tuple[Sequence, int, int]]) -> PromptLogprobs:
        """The log-probs of the prompt tokens that follow the positions `span_rows` of the step's hidden states,
        computed from their logits a slice of positions at a time."""
        targets = [seq.prompt_ids[position + 1] for seq, start, count in spans
                   for position in range(start, start + count)]
        top = [seq.params.prompt_logprobs for seq, _, count in spans for _ in range(count)]
        rows = to_device(span_rows, torch.long, self.device)
        targets_device = to_device(targets, torch.long, self.device)
        parts = [logprobs_of(self.model.compute_logits(hidden[rows[first:first + PROMPT_LOGPROB_ROWS]]),
                             targets_device[first:first + PROMPT_LOGPROB_ROWS], max(top))
                 for first in range(0, len(span_rows), PROMPT_LOGPROB_ROWS)]
        return PromptLogprobs(spans, Logprobs(top, *(torch.cat(column) for column in zip(*parts))))

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

    def run_forward(self, inputs: StepInputs,
                    feed: Feed | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits [sequences, vocab] at each sequence's last position this step, the step's input ids and its
        hidden states [tokens, hidden] (a graph's buffer: read them before the next step): through the piecewise
        graphs where the step fits them, else eagerly."""
        input_ids, positions, batch = self.device_inputs(inputs, feed)
        # Each sequence's last position, on the device before the forward pass so nothing waits on it.
        last = to_device(list(itertools.accumulate(inputs.query_lens, initial=-1))[1:], torch.long, self.device)
        if self.pieces is not None and input_ids.shape[0] <= self.pieces.max_tokens:
            hidden = self.pieces.forward(input_ids, positions, batch)
        else:
            hidden = self.model(input_ids, positions, self.kv_cache.layers, batch)
        return self.model.compute_logits(hidden[last]), input_ids, hidden
