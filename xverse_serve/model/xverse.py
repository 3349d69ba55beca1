"""The XVERSE decoder (the Llama architecture) over a flat batch of tokens and a paged KV cache.

On CUDA the elementwise stages (residual add + RMSNorm, RoPE + KV-cache write, SiLU * up) run as fused
Triton kernels (kernels.fused_ops); on CPU the pure-PyTorch code here runs instead, and it is the reference the
kernels and the transformers-equality tests compare against. XVERSE_FUSED_KERNELS=0 keeps CUDA on the
PyTorch code too (to compare or bisect).

With --quantize, the projections of every layer become quantization.QuantizedLinear (int8, int4 or fp8), and the
lm_head and the embedding table int8; the norms keep the model dtype. load_model quantizes each tensor as it
arrives. Before an fp8 projection whose kernel multiplies e4m3 activations, the norm or SiLU * up quantizes its
output in its own kernel (takes_fp8, quantization.Fp8Rows).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionBatch, paged_attention, write_kv
from .checkpoint import CheckpointError, ModelConfig, is_skipped_tensor, iter_shard_tensors
from .kv_cache import LayerCache
from .one_row import FUSED_KERNELS, OneRowProjection, gemv_kernels
from .quantization import Fp8Rows, QuantizedEmbedding, QuantizedLinear, replace_linear
from .tuner import tune


def fused_ops(t: torch.Tensor) -> ModuleType | None:
    """kernels.fused_ops for a CUDA tensor (unless turned off), else None: CPU keeps the PyTorch code."""
    if not (t.is_cuda and FUSED_KERNELS):
        return None
    from ..kernels import fused_ops  # imported here, so a CPU-only install needs no Triton

    return fused_ops


# XVERSE_FP8_FUSED_QUANT=0: the norm and SiLU·up hand fp8 projections bf16, which they quantize themselves (to compare).
FP8_FUSED_QUANT = os.environ.get("XVERSE_FP8_FUSED_QUANT", "1") != "0"


def takes_fp8(proj: nn.Module, x: torch.Tensor) -> bool:
    """Whether the fused kernel that reads x [rows, ...] to make proj's input (the norm, SiLU·up) should hand it over
    quantized (Fp8Rows): proj is fp8 and its kernel at that many rows multiplies e4m3 activations. Saves the kernel
    that would quantize them (a launch and a pass over the rows) before each such projection."""
    return (FP8_FUSED_QUANT and isinstance(proj, QuantizedLinear) and fused_ops(x) is not None
            and proj.takes_fp8_rows(x.shape[0]))


class Linear(nn.Linear, OneRowProjection):
    """nn.Linear without bias whose products with a few rows on CUDA (decode steps of up to 32 sequences) run
    as kernels.gemv's kernels, which stream the weights faster than cuBLAS there; everything else is F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (gemv := gemv_kernels(x)) is not None:
            rows = x.numel() // self.in_features
            if rows == 1:
                return gemv.gemv(x, self.weight)
            if rows <= gemv.MAX_SKINNY_ROWS:
                return gemv.skinny_matmul(x, self.weight)
        return F.linear(x, self.weight)

    def gemv_operands(self) -> tuple[torch.Tensor, None]:
        return self.weight, None

    @classmethod
    def runs_one_row(cls, x: torch.Tensor) -> bool:
        """Whether x is one row the GEMV kernels take."""
        return x.shape[0] == 1 and gemv_kernels(x) is not None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # The variance is taken in float32, as the model was trained.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (ops := fused_ops(x)) is not None:
            return ops.rms_norm(x, self.weight, self.eps)
        return rms_norm_reference(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor | None,
                     fp8: bool = False) -> tuple[torch.Tensor | Fp8Rows, torch.Tensor]:
        """(norm(residual + x), residual + x): on CUDA the residual add is fused into the norm's kernel. Residual
        None: (norm(x), x). fp8 (where takes_fp8 says so): the norm comes quantized for an FP8 matmul."""
        if fp8:
            q, scale, residual = fused_ops(x).rms_norm_fp8(x, residual, self.weight, self.eps)
            return Fp8Rows(q, scale, x.dtype), residual
        if residual is None:
            return self(x), x
        if (ops := fused_ops(x)) is not None:
            return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
        residual = residual + x
        return rms_norm_reference(residual, self.weight, self.eps), residual


def rope_tables(head_dim: int, max_positions: int, theta: float,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
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


@dataclass
class Rotary:
    """One step's rotary embedding: the model's tables and each token's position. The fused kernel reads
    the tables at the positions itself; the PyTorch path gathers per-token rows, once per step."""

    cos_table: torch.Tensor  # [max_positions, head_dim] in the model dtype
    sin_table: torch.Tensor
    positions: torch.Tensor  # [tokens]

    @cached_property
    def cos(self) -> torch.Tensor:
        return self.cos_table[self.positions]

    @cached_property
    def sin(self) -> torch.Tensor:
        return self.sin_table[self.positions]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        # q, k and v in one matrix: one pass over the input instead of three (checkpoints keep them apart).
        self.qkv_proj = Linear(config.hidden_size, 3 * self.num_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def attend(self, qkv: torch.Tensor, rotary: Rotary, kv: LayerCache | tuple[torch.Tensor, torch.Tensor],
               batch: AttentionBatch) -> torch.Tensor:
        """The attention of the projected q, k, v [tokens, 3 * heads * head_dim], before o_proj: [tokens, heads *
        head_dim]. The tokens' k and v go into the cache first."""
        kv = LayerCache(*kv)  # a plain (k, v) pair is a cache without scales
        q = self.rope_and_cache(qkv, rotary, kv, batch.slot_mapping)
        return self.paged(q, kv, batch).reshape(qkv.shape[0], -1)

    def paged(self, q: torch.Tensor, kv: LayerCache, batch: AttentionBatch,
              out: torch.Tensor | None = None) -> torch.Tensor:
        """The attention of the step's queries q [tokens, heads, head_dim] over the paged cache, their own keys and
        values already in it: [tokens, heads, head_dim], written into `out` if given."""
        return paged_attention(q, kv.k, kv.v, batch, self.scale, kv.k_scale, kv.v_scale, out=out)

    def rope_and_cache(self, qkv: torch.Tensor, rotary: Rotary, kv: LayerCache,
                       slot_mapping: torch.Tensor) -> torch.Tensor:
        """Rotates q and k, stores k and v at the tokens' cache slots; returns q [tokens, heads, head_dim]."""
        if (ops := fused_ops(qkv)) is not None:
            return ops.rope_and_write_kv(qkv, rotary.cos_table, rotary.sin_table, rotary.positions,
                                         kv.k, kv.v, slot_mapping, k_scale=kv.k_scale, v_scale=kv.v_scale)
        q, k, v = qkv.view(qkv.shape[0], 3, self.num_heads, self.head_dim).unbind(dim=1)
        q, k = apply_rope(q, rotary.cos, rotary.sin), apply_rope(k, rotary.cos, rotary.sin)
        write_kv(kv.k, kv.v, k, v, slot_mapping, kv.k_scale, kv.v_scale)
        return q


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        # One row on CUDA: the projection and the activation in one kernel (an int4 projection has no such).
        if not isinstance(x, Fp8Rows) and (hidden := self.gate_up_proj.gated(x)) is not None:
            return self.down_proj(hidden)
        gate_up = self.gate_up_proj(x)
        if (ops := fused_ops(gate_up)) is not None:
            if takes_fp8(self.down_proj, gate_up):
                return self.down_proj(Fp8Rows(*ops.silu_and_mul_fp8(gate_up), gate_up.dtype))
            return self.down_proj(ops.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rotary: Rotary,
                kv: LayerCache, batch: AttentionBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output (the embeddings, with residual None, in the first layer);
        residual: the running sum before it. Returns this layer's MLP output and the running sum before it.
        The residual stream travels apart so that each add happens inside the next norm (one kernel on CUDA)."""
        kv = LayerCache(*kv)
        q, residual = self.attention_input(x, residual, rotary, kv, batch.slot_mapping)
        return self.attention_output(self.self_attn.paged(q, kv, batch), residual)

    def projections(self) -> tuple[OneRowProjection, ...]:
        """The layer's four projections, in the order a step runs them."""
        return self.self_attn.qkv_proj, self.self_attn.o_proj, self.mlp.gate_up_proj, self.mlp.down_proj

    # forward's two halves around the attention, which piecewise_graphs runs between CUDA graphs of the rest.

    def attention_input(self, x: torch.Tensor, residual: torch.Tensor | None, rotary: Rotary, kv: LayerCache,
                        slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The norm and the q, k, v projection; k and v go into the cache. Returns q and the running sum."""
        attn = self.self_attn
        h, residual = self.input_layernorm.add_and_norm(x, residual, takes_fp8(attn.qkv_proj, x))
        return attn.rope_and_cache(attn.qkv_proj(h), rotary, kv, slot_mapping), residual

    def attention_output(self, attn: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The output projection of the attention [tokens, heads, head_dim], its residual add and the MLP."""
        h = self.self_attn.o_proj(attn.reshape(attn.shape[0], -1))
        h, residual = self.post_attention_layernorm.add_and_norm(h, residual, takes_fp8(self.mlp.gate_up_proj, h))
        return self.mlp(h), residual

    def forward_one_row(self, stream: torch.Tensor, squares: torch.Tensor | None, rotary: Rotary, kv: LayerCache,
                        batch: AttentionBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """forward for one row on CUDA (a one-sequence decode step) in fused GEMVs (one_row.py): each residual add
        runs in the GEMV before it (o_proj, down_proj: add_to), which also sums the squares of its slices, and each
        norm in the GEMV after it or in the kernel that quantizes its output (normed, gated_normed). stream: the
        residual stream entering the layer, with its slices' squares (None in the first layer: the embeddings).
        Returns the stream leaving the layer and its squares."""
        attn, mlp = self.self_attn, self.mlp
        qkv = attn.qkv_proj.normed(stream, squares, self.input_layernorm)
        stream, _ = attn.o_proj.add_to(attn.attend(qkv, rotary, kv, batch), stream)
        hidden = mlp.gate_up_proj.gated_normed(stream, self.post_attention_layernorm)
        return mlp.down_proj.add_to(hidden, stream)


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
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (a quantized model's projections and embeddings hold integers)."""
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def init_rope(self, max_positions: int) -> None:
        cos, sin = rope_tables(self.config.head_dim, max_positions, self.config.rope_theta, self.device)
        self.rope_cos, self.rope_sin = cos.to(self.dtype), sin.to(self.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[LayerCache], batch: AttentionBatch) -> torch.Tensor:
        """Hidden states after the final norm, [tokens, hidden]."""
        rotary = Rotary(self.rope_cos, self.rope_sin, positions)
        x, residual = self.model.embed_tokens(input_ids), None
        if self.one_row_ready and Linear.runs_one_row(x):
            stream, squares = x, None
            for layer, kv in zip(self.model.layers, kv_caches):
                stream, squares = layer.forward_one_row(stream, squares, rotary, kv, batch)
            return self.model.norm(stream)
        for layer, kv in zip(self.model.layers, kv_caches):
            x, residual = layer(x, residual, rotary, kv, batch)
        hidden, _ = self.model.norm.add_and_norm(x, residual)
        return hidden

    @cached_property
    def one_row_ready(self) -> bool:
        """Whether one-row GEMVs read every projection of every layer (one_row.py)."""
        return all(proj.one_row is not None for layer in self.model.layers for proj in layer.projections())

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


def quantize_projections(model: XverseForCausalLM, scheme: str) -> None:
    """Every layer's projections become QuantizedLinear of `scheme`, and an untied lm_head int8 (its logits are
    what sampling sees, and per-channel int8 barely moves them), as is then the embedding table; the norms keep
    their dtype."""
    for layer in model.model.layers:
        for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                             (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
            replace_linear(parent, name, scheme)
            # the norm or SiLU·up before it hands fp8 activations over (takes_fp8); the attention before o_proj not
            getattr(parent, name).fp8_input_handed_over = (scheme == "fp8" and name != "o_proj" and FP8_FUSED_QUANT
                                                           and FUSED_KERNELS)
    if not model.config.tie_word_embeddings:
        replace_linear(model, "lm_head", "int8")
        # The embedding table (0.8 GB in bf16) as int8 too: a lookup reads a few rows, so it costs no speed.
        embed = model.model.embed_tokens
        with embed.weight.device:
            model.model.embed_tokens = QuantizedEmbedding(embed.num_embeddings, embed.embedding_dim, embed.weight.dtype)


@dataclass(frozen=True)
class LoadTarget:
    """Where one checkpoint tensor goes: its expected shape and what stores it."""

    shape: tuple[int, ...]
    store: Callable[[torch.Tensor], None]


def load_targets(model: XverseForCausalLM) -> dict[str, LoadTarget]:
    """Every tensor of the checkpoint layout, by its checkpoint name: dense ones copied into their parameter
    (a view, checkpoint_tensors), quantized ones into their rows of a QuantizedLinear."""
    targets = {name: LoadTarget(tuple(view.shape), view.copy_) for name, view in checkpoint_tensors(model).items()}
    for module_name, module in model.named_modules():
        if not isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
            continue
        name = module_name + ".weight"
        packed = [(name[:-len(suffix)] + part_name, part, count)
                  for part_name, (suffix, part, count) in PACKED_TENSORS.items() if name.endswith(suffix)]
        for part_name, part, count in packed or [(name, 0, 1)]:
            rows = module.out_features // count
            targets[part_name] = LoadTarget((rows, module.in_features), partial(module.load_rows, part * rows))
    return targets


def load_model(model_dir: Path, config: ModelConfig, device: torch.device, dtype: torch.dtype,
               max_positions: int, quantize: str = "none") -> XverseForCausalLM:
    """Builds the model on `device` and fills it shard by shard: no second full copy in host memory. With
    quantize int8/int4, each projection tensor is quantized on `device` as it arrives (a slice of rows at a
    time), so the device never holds the model in full precision; on CUDA the quantized matmul kernels are
    then chosen by timing (tuner.tune)."""
    with torch.device("meta"):
        # The dtype is set while still on meta: a float32 copy would not fit where the bf16 model just does.
        model = XverseForCausalLM(config).to(dtype)
        if quantize != "none":
            quantize_projections(model, quantize)
    model = model.to_empty(device=device)
    targets = load_targets(model)
    if config.tie_word_embeddings:
        targets.pop("lm_head.weight")
    loaded: set[str] = set()
    for name, tensor in iter_shard_tensors(model_dir):
        if is_skipped_tensor(name):
            continue
        target = targets.get(name)
        if target is None:
            raise CheckpointError(f"unexpected tensor {name!r} in the checkpoint (not part of the model)")
        if tuple(tensor.shape) != target.shape:
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, the config implies {target.shape}"
            )
        try:
            with torch.no_grad():
                target.store(tensor)
        except ValueError as exc:  # a tensor that cannot be quantized
            raise CheckpointError(f"tensor {name!r}: {exc}") from exc
        loaded.add(name)
    missing = sorted(set(targets) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"the checkpoint lacks {shown}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_rope(max_positions)
    model = model.eval().requires_grad_(False)
    if quantize != "none" and device.type == "cuda":
        tune(model, dtype)
    return model
