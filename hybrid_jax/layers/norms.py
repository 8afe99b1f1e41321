"""RMSNorm (Qwen3 / Llama form): reduce in float32, scale by a learned weight."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hybrid_jax.layers.params import param


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / rms(x) over the last axis, computed in float32, returned in float32."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """`weight * (x / rms(x))`; the weight multiplies after casting back to `dtype`, as in HF Qwen3."""

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.dtype = dtype
        self.weight = param(rngs, jnp.ones((dim,)), (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.weight[...].astype(self.dtype) * rms_normalize(x, self.eps).astype(self.dtype)
