"""The XVERSE decoder (the Llama architecture) over a flat batch of tokens and a paged KV cache."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionBatch, paged_attention, write_kv
from .checkpoint import CheckpointError, ModelConfig, is_skipped_tensor, iter_shard_tensors


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The variance is taken in float32, as the model was trained.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(head_dim: int, max_positions: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, [max_positions, head_dim] in float32, in the rotate-half layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [tokens, heads, head_dim]; cos/sin [tokens, head_dim] already in x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        # q, k and v in one matrix: one pass over the input instead of three (checkpoints keep them apart).
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * self.num_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor], batch: AttentionBatch) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).view(tokens, 3, self.num_heads, self.head_dim).unbind(dim=1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_cache, v_cache = kv
        write_kv(k_cache, v_cache, k, v, batch.slot_mapping)
        out = paged_attention(q, k_cache, v_cache, batch, self.scale)
        return self.o_proj(out.reshape(tokens, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor], batch: AttentionBatch) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """Named `model` inside XverseForCausalLM so that parameter names equal the checkpoint's."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class XverseForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None

    def init_rope(self, max_positions: int) -> None:
        weight = self.lm_head.weight
        cos, sin = rope_tables(self.config.head_dim, max_positions, self.config.rope_theta, weight.device)
        self.rope_cos, self.rope_sin = cos.to(weight.dtype), sin.to(weight.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], batch: AttentionBatch) -> torch.Tensor:
        """Hidden states after the final norm, [tokens, hidden]."""
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        x = self.model.embed_tokens(input_ids)
        for layer, kv in zip(self.model.layers, kv_caches):
            x = layer(x, cos, sin, kv, batch)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


# Checkpoint tensors that live inside a packed parameter: name suffix -> (parameter suffix, part, parts).
PACKED_TENSORS = {
    "self_attn.q_proj.weight": ("self_attn.qkv_proj.weight", 0, 3),
    "self_attn.k_proj.weight": ("self_attn.qkv_proj.weight", 1, 3),
    "self_attn.v_proj.weight": ("self_attn.qkv_proj.weight", 2, 3),
    "mlp.gate_proj.weight": ("mlp.gate_up_proj.weight", 0, 2),
    "mlp.up_proj.weight": ("mlp.gate_up_proj.weight", 1, 2),
}


def checkpoint_tensors(model: XverseForCausalLM) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint layout, by its checkpoint name, as a view into the model's parameters."""
    views = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        packed_into_this = False
        for suffix, (packed, part, count) in PACKED_TENSORS.items():
            if name.endswith(packed):  # e.g. "model.layers.3." + "self_attn.q_proj.weight"
                views[name[:-len(packed)] + suffix] = param.chunk(count)[part]
                packed_into_this = True
        if not packed_into_this:
            views[name] = param
    return views


def load_model(model_dir: Path, config: ModelConfig, device: torch.device, dtype: torch.dtype,
               max_positions: int) -> XverseForCausalLM:
    """Builds the model on `device` and fills it shard by shard: no second full copy in host memory."""
    with torch.device("meta"):
        model = XverseForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    targets = checkpoint_tensors(model)
    if config.tie_word_embeddings:
        targets.pop("lm_head.weight")
    loaded: set[str] = set()
    for name, tensor in iter_shard_tensors(model_dir):
        if is_skipped_tensor(name):
            continue
        target = targets.get(name)
        if target is None:
            raise CheckpointError(f"unexpected tensor {name!r} in the checkpoint (not part of the model)")
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, the config implies {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(tensor)
        loaded.add(name)
    missing = sorted(set(targets) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"the checkpoint lacks {shown}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_rope(max_positions)
    return model.eval().requires_grad_(False)
