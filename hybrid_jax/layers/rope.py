"""Rotary position embeddings with the `rope_scaling` types Qwen3 checkpoints use.

`rope_frequencies` returns (inverse frequencies, attention factor) as host constants, computed in
float64 numpy and matching transformers' `modeling_rope_utils` for "default", "linear" and "yarn".
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "yarn")


def rope_type(scaling: Mapping | None) -> str:
    if not scaling:
        return "default"
    return scaling.get("rope_type", scaling.get("type", "default"))


def rope_frequencies(head_dim: int, theta: float, scaling: Mapping | None = None,
                     max_position_embeddings: int | None = None) -> tuple[np.ndarray, float]:
    """Inverse frequencies [head_dim // 2] (float32) and the cos/sin attention factor."""
    kind = rope_type(scaling)
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling: rope_type {kind!r} is not supported; use one of {ROPE_TYPES}")
    dim = head_dim
    exponents = np.arange(0, dim, 2, dtype=np.float32) / dim
    pos_freqs = np.float32(theta) ** exponents
    inv_freq = (1.0 / pos_freqs).astype(np.float32)
    if kind == "default":
        return inv_freq, 1.0
    factor = scaling.get("factor")
    if kind == "linear":
        if factor is None:
            raise ValueError("rope_scaling: 'linear' needs a 'factor'")
        return (inv_freq / np.float32(factor)).astype(np.float32), 1.0

    # yarn: interpolate low frequencies, keep high ones, ramp in between (YaRN paper).
    original = scaling.get("original_max_position_embeddings") or max_position_embeddings
    if original is None:
        raise ValueError("rope_scaling: 'yarn' needs 'original_max_position_embeddings'")
    if factor is None:
        if max_position_embeddings is None:
            raise ValueError("rope_scaling: 'yarn' needs a 'factor'")
        factor = max_position_embeddings / original

    def mscale_of(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all:
            attention_factor = mscale_of(factor, mscale) / mscale_of(factor, mscale_all)
        else:
            attention_factor = mscale_of(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation = 1 - ramp
    inv_freq = (inv_freq / np.float32(factor)) * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq.astype(np.float32), float(attention_factor)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, attention_factor: float = 1.0) -> jax.Array:
    """Rotate x [B, T, H, D] by positions [B, T] (the rotate-half layout of HF Llama/Qwen)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, D/2]
    cos = (jnp.cos(angles) * attention_factor)[:, :, None, :]
    sin = (jnp.sin(angles) * attention_factor)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
