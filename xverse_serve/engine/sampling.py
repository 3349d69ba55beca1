"""The batched sampler: each row's sampling parameters (messages.SamplingParams) applied on the device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .messages import SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs of one sequence this step, beside its row of the seen-token mask."""

    params: SamplingParams
    generator: torch.Generator | None = None


def to_device(data: list | torch.Tensor, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """A host list or tensor on `device`, without waiting for the GPU: a copy from pageable memory first
    waits for all queued work (the step's whole forward pass, or the step still running while the engine
    prepares the next), one from pinned memory is queued behind it."""
    tensor = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def seen_token_mask(token_lists: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[rows, vocab] bool: which ids each row has seen (prompt and output), the repetition penalty's input."""
    mask = torch.zeros(len(token_lists), vocab_size, dtype=torch.bool, device=device)
    for i, ids in enumerate(token_lists):
        mask[i, torch.tensor(ids, dtype=torch.long, device=device)] = True
    return mask


def apply_repetition_penalty(logits: torch.Tensor, penalties: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """As transformers does: a seen token's logit is divided by the penalty if positive, multiplied if not."""
    penalties = penalties[:, None]
    penalized = torch.where(logits < 0, logits * penalties, logits / penalties)
    return torch.where(seen, penalized, logits)


def keep_nucleus(sorted_logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, vocab: int) -> torch.Tensor:
    """Rows of logits sorted in descending order, with those past each row's top-k or top-p nucleus at -inf
    (top-k first, as transformers)."""
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    ranks = torch.arange(sorted_logits.shape[-1], device=sorted_logits.device)[None, :]
    sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # Keep a token while the mass ranked above it is below top_p; the top token always stays.
    # top_p 1 cuts nothing: rounding can carry the cumulative sum to 1 before the tail's last tokens.
    cut = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)
    return sorted_logits.masked_fill(cut, float("-inf"))


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's first maximum: on CUDA through fused_ops.argmax_rows (torch's kernel takes one block per row)."""
    if logits.is_cuda and logits.dim() == 2:
        from ..kernels.fused_ops import argmax_rows  # imported here, so a CPU-only install needs no Triton

        return argmax_rows(logits)
    return logits.argmax(dim=-1)


def apply_token_masks(logits: torch.Tensor, rows: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """`logits` with the ids that rows `rows` may not draw at -inf: bit j of word w of bits[i] allows id 32 * w + j
    for row rows[i] (the grammar's masks). A new tensor: `logits` may be a CUDA graph's buffer."""
    shifts = torch.arange(32, dtype=torch.int32, device=bits.device)
    allowed = ((bits[:, :, None] >> shifts) & 1).bool().flatten(1)[:, :logits.shape[1]]
    return logits.index_copy(0, rows, logits[rows].masked_fill(~allowed, float("-inf")))


def adjust_logits(logits: torch.Tensor, rows: list[SamplingRow], seen: torch.Tensor | None,
                  counts: torch.Tensor | None,
                  allowed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The logits each row's request asks to be drawn from: its logit_bias added, then XVERSE's multiplicative
    repetition penalty over the ids it has seen (`seen`), then OpenAI's presence and frequency penalties over the
    ids it has generated (`counts`: how often each), then the ids its grammar forbids at -inf (`allowed`: rows and
    their bit masks, apply_token_masks). Rows that ask for none of these are left as they are."""
    device = logits.device
    if any(r.params.logit_bias for r in rows):
        row_index, token_index, bias = [], [], []
        for i, row in enumerate(rows):
            for token, value in row.params.logit_bias:
                row_index.append(i)
                token_index.append(token)
                bias.append(value)
        index = (to_device(row_index, torch.long, device), to_device(token_index, torch.long, device))
        logits = logits.index_put(index, to_device(bias, torch.float32, device), accumulate=True)
    if any(r.params.repetition_penalty != 1.0 for r in rows):
        penalty = to_device([r.params.repetition_penalty for r in rows], torch.float32, device)
        logits = apply_repetition_penalty(logits, penalty, seen)
    if any(r.params.counts_outputs for r in rows):
        penalties = to_device([(r.params.presence_penalty, r.params.frequency_penalty) for r in rows], torch.float32,
                              device)
        logits = apply_openai_penalties(logits, penalties[:, 0], penalties[:, 1], counts)
    if allowed is not None:
        logits = apply_token_masks(logits, *allowed)
    return logits


def apply_openai_penalties(logits: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor,
                           counts: torch.Tensor) -> torch.Tensor:
    """OpenAI's definition: logit[j] - count[j] * frequency_penalty - (count[j] > 0) * presence_penalty, count[j]
    being how often the row's request has generated token j."""
    counts = counts.float()
    return logits - counts * frequency[:, None] - (counts > 0).float() * presence[:, None]


def sample(logits: torch.Tensor, rows: list[SamplingRow], seen: torch.Tensor | None = None,
           counts: torch.Tensor | None = None,
           allowed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """logits [rows, vocab] in float32 -> one token id per row, [rows] int64 on logits' device; nothing waits
    for the GPU. `seen` [rows, vocab] bool is needed when any row has a repetition penalty, `counts` [rows, vocab]
    when any has a presence or frequency penalty (OutputCounts), `allowed` when a row has a grammar."""
    device = logits.device
    logits = adjust_logits(logits, rows, seen, counts, allowed)
    if all(r.params.greedy for r in rows):
        return argmax(logits)
    table = to_device([r.params.table_row for r in rows], torch.float32, device)
    temperature, top_k, top_p, _, greedy_rows = table.unbind(dim=1)
    vocab = logits.shape[-1]
    candidates = min(max(r.params.top_k or vocab for r in rows if not r.params.greedy), vocab)
    # Only the batch's largest top-k can be drawn (all of the vocabulary if a sampled row has no top-k):
    # filtering, softmax and the draw run over those candidates alone.
    sorted_logits, order = logits.topk(candidates, dim=-1)
    probs = keep_nucleus(sorted_logits / temperature[:, None], top_k.long(), top_p, vocab).softmax(dim=-1)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p. A seeded row draws its E for the whole
    # vocabulary, in vocabulary order, whatever the batch: its samples do not depend on the other rows.
    noise = torch.empty_like(probs).exponential_()
    for i, row in enumerate(rows):
        if row.generator is not None:
            full = torch.empty(vocab, device=device).exponential_(generator=row.generator)
            noise[i] = full[order[i]]
    sampled_ids = order.gather(-1, argmax(probs / noise)[:, None]).squeeze(-1)
    if not any(r.params.greedy for r in rows):
        return sampled_ids
    return torch.where(greedy_rows.bool(), argmax(logits), sampled_ids)


class SequenceRows:
    """Rows of one [rows, vocab] tensor on the device, one per live sequence that needs one, handed out and taken
    back by request id. Row 0 stays all zero: sequences that need no row share it."""

    def __init__(self, vocab_size: int, device: torch.device, dtype: torch.dtype, rows: int = 64) -> None:
        self.table = torch.zeros(rows, vocab_size, dtype=dtype, device=device)
        self._free = list(range(rows - 1, 0, -1))
        self._row: dict[str, int] = {}

    def tracks(self, request_id: str) -> bool:
        return request_id in self._row

    def rows(self, request_ids: list[str | None]) -> torch.Tensor:
        """Rows [len(request_ids), vocab] for the sampler; None: a sequence without one (zeros)."""
        indices = [0 if request_id is None else self._row[request_id] for request_id in request_ids]
        return self.table[to_device(indices, torch.long, self.table.device)]

    def release(self, request_id: str) -> None:
        row = self._row.pop(request_id, None)
        if row is not None:
            self._free.append(row)

    def _start(self, request_id: str) -> int:
        """A zeroed row for the sequence."""
        if not self._free:  # grow: more sequences need a row than there are rows so far
            old = self.table.shape[0]
            self.table = torch.cat([self.table, torch.zeros_like(self.table)])
            self._free = list(range(2 * old - 1, old - 1, -1))
        row = self._row[request_id] = self._free.pop()
        self.table[row] = 0
        return row


class SeenTokens(SequenceRows):
    """Which ids each sequence with a repetition penalty has seen, as rows of one bool mask. A step marks the
    tokens it feeds from its input ids on the device, so the ids sampled by a step still running count without
    the host reading them."""

    def __init__(self, vocab_size: int, device: torch.device, rows: int = 64) -> None:
        super().__init__(vocab_size, device, torch.bool, rows)
        # The value marks are written with, already on the device: `mask[rows, ids] = True` would copy a
        # Python True from pageable memory, which waits for all queued work (the step's forward pass).
        self._true = torch.ones((), dtype=torch.bool, device=device)

    def start(self, request_id: str, earlier_ids: list[int]) -> None:
        """Gives a sequence an empty row, marked with the ids it will never feed (a cached prefix)."""
        row = self._start(request_id)
        if earlier_ids:
            self._mark([row] * len(earlier_ids), to_device(earlier_ids, torch.long, self.table.device))

    def record(self, step_ids: torch.Tensor, spans: list[tuple[str, int, int]]) -> None:
        """Marks the ids a step feeds: span (request id, first, end) is that sequence's part of step_ids, the
        step's input ids on the device. Marks are a set: a recomputed (preempted) sequence marks ids again."""
        rows, positions = [], []
        for request_id, first, end in spans:
            rows.extend([self._row[request_id]] * (end - first))
            positions.extend(range(first, end))
        if positions:
            if positions != list(range(step_ids.numel())):
                step_ids = step_ids[to_device(positions, torch.long, self.table.device)]
            self._mark(rows, step_ids)

    def _mark(self, rows: list[int], ids: torch.Tensor) -> None:
        self.table.index_put_((to_device(rows, torch.long, self.table.device), ids.long()), self._true)


class OutputCounts(SequenceRows):
    """How often each sequence with a presence or frequency penalty has generated each id, as rows of one int32
    table. Each step adds its samples on the device, right after drawing them, so the next step's penalties count
    them without the host reading them; a preempted sequence keeps its row, as it keeps its output."""

    def __init__(self, vocab_size: int, device: torch.device, rows: int = 8) -> None:
        super().__init__(vocab_size, device, torch.int32, rows)
        self._one = torch.ones((), dtype=torch.int32, device=device)

    def add(self, request_ids: list[str], sampled: torch.Tensor) -> None:
        """Counts sampled[i] for request_ids[i], starting a row for a sequence not yet counted."""
        rows = [self._row[r] if r in self._row else self._start(r) for r in request_ids]
        self.table.index_put_((to_device(rows, torch.long, self.table.device), sampled.long()), self._one,
                              accumulate=True)
