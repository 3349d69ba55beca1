"""The 8-bit KV cache's format, shared by the kernels and the PyTorch reference (model.attention): each cached
vector of one token and head is stored divided by its own float32 scale, its largest |element| / KV_QMAX."""

from __future__ import annotations

import torch

# The largest magnitude of each 8-bit cache type: a vector's scale maps its largest element there.
KV_QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
KV_MIN_AMAX = 1e-8  # an all-zero vector gets this instead of a zero scale


def check_kv_scales(cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> bool:
    """Whether `cache` is 8-bit; raises unless an 8-bit cache comes with float32 scales [blocks, block_size,
    heads] (contiguous along heads, the same strides for k and v) and any other cache with none."""
    if cache.dtype not in KV_QMAX:
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"scales are for an 8-bit cache; this one is {cache.dtype}")
        return False
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        if t is None or t.shape != cache.shape[:3] or t.dtype != torch.float32 or t.stride(-1) != 1:
            raise ValueError(f"an 8-bit cache needs {name} [{', '.join(map(str, cache.shape[:3]))}] float32, "
                             "contiguous along heads")
    if k_scale.stride() != v_scale.stride():
        raise ValueError("k_scale and v_scale must have the same strides")
    return True
