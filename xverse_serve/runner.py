"""Turns a scheduled step into model inputs, runs the model and samples the next tokens."""

from __future__ import annotations

import torch

from .attention import AttentionBatch
from .kv_cache import KVCache
from .model import XverseForCausalLM
from .sampling import SamplingRow, sample
from .scheduler import ScheduledSequence


class ModelRunner:
    def __init__(self, model: XverseForCausalLM, kv_cache: KVCache) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = model.lm_head.weight.device

    def prepare(self, scheduled: list[ScheduledSequence]) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch]:
        block_size = self.kv_cache.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        context_lens: list[int] = []
        for entry in scheduled:
            seq, start = entry.seq, entry.seq.num_computed
            end = start + entry.num_new_tokens
            input_ids.extend(seq.token_ids(start, end))
            positions.extend(range(start, end))
            slots.extend(seq.block_table[p // block_size] * block_size + p % block_size for p in range(start, end))
            context_lens.append(end)
        max_blocks = max(len(entry.seq.block_table) for entry in scheduled)
        tables = [entry.seq.block_table + [0] * (max_blocks - len(entry.seq.block_table)) for entry in scheduled]
        query_lens = [entry.num_new_tokens for entry in scheduled]

        def on_device(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

        batch = AttentionBatch(
            slot_mapping=on_device(slots),
            block_tables=on_device(tables),
            context_lens=on_device(context_lens),
            query_lens=query_lens,
            context_lens_host=context_lens,
            num_decodes=sum(1 for n in query_lens if n == 1),
        )
        return on_device(input_ids), on_device(positions), batch

    @torch.inference_mode()
    def run(self, scheduled: list[ScheduledSequence]) -> list[int]:
        """Runs one step; returns the sampled token of each entry whose chunk ends its sequence, in order."""
        input_ids, positions, batch = self.prepare(scheduled)
        hidden = self.model(input_ids, positions, self.kv_cache.layers, batch)
        last_index, rows = [], []
        offset = 0
        for entry in scheduled:
            offset += entry.num_new_tokens
            if entry.samples:
                last_index.append(offset - 1)
                seq = entry.seq
                seen = seq.prompt_ids + seq.output_ids if seq.params.repetition_penalty != 1.0 else []
                rows.append(SamplingRow(seq.params, seen, seq.generator))
        if not rows:
            return []
        logits = self.model.compute_logits(hidden[torch.tensor(last_index, device=self.device)])
        return sample(logits, rows)
