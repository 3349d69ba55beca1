"""Sampling parameters of one request and the batched sampler that applies them row by row."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = field(default=())

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class SamplingRow:
    """What the sampler needs of one sequence this step."""

    params: SamplingParams
    seen_token_ids: list[int]  # prompt and output so far, for the repetition penalty
    generator: torch.Generator | None


def apply_repetition_penalty(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """As transformers does: a seen token's logit is divided by the penalty if positive, multiplied if not."""
    for i, row in enumerate(rows):
        penalty = row.params.repetition_penalty
        if penalty == 1.0 or not row.seen_token_ids:
            continue
        ids = torch.tensor(row.seen_token_ids, device=logits.device).unique()
        scores = logits[i, ids]
        logits[i, ids] = torch.where(scores < 0, scores * penalty, scores / penalty)


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Sets logits outside each row's top-k and top-p nucleus to -inf (top-k first, as transformers)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, logits.shape[-1])
    sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # Keep a token while the mass ranked above it is below top_p; the top token always stays.
    # top_p 1 cuts nothing: rounding can carry the cumulative sum to 1 before the tail's last tokens.
    cut = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)
    sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(-1, order, sorted_logits)


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    """logits [rows, vocab] in float32 -> one token id per row, with a single device-to-host copy."""
    logits = logits.clone()
    apply_repetition_penalty(logits, rows)
    greedy_ids = logits.argmax(dim=-1)
    if all(row.params.greedy for row in rows):
        return greedy_ids.tolist()
    device = logits.device
    temperature = torch.tensor([row.params.temperature or 1.0 for row in rows], device=device)
    top_k = torch.tensor([row.params.top_k for row in rows], device=device)
    top_p = torch.tensor([row.params.top_p for row in rows], device=device)
    probs = filter_top_k_top_p(logits / temperature[:, None], top_k, top_p).softmax(dim=-1)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p; seeded rows use their own generator.
    noise = torch.empty_like(probs).exponential_()
    for i, row in enumerate(rows):
        if row.generator is not None:
            noise[i].exponential_(generator=row.generator)
    sampled_ids = (probs / noise).argmax(dim=-1)
    greedy_rows = torch.tensor([row.params.greedy for row in rows], device=device)
    return torch.where(greedy_rows, greedy_ids, sampled_ids).tolist()
