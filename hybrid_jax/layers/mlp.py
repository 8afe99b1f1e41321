"""SwiGLU feed-forward block: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hybrid_jax.layers.params import param


class SwiGLU(nnx.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, init_std: float = 0.02, rngs: nnx.Rngs):
        init = nnx.initializers.normal(init_std)
        self.dtype = dtype
        self.gate = param(rngs, init, (hidden_size, intermediate_size), ("embed", "mlp"), param_dtype)
        self.up = param(rngs, init, (hidden_size, intermediate_size), ("embed", "mlp"), param_dtype)
        self.down = param(rngs, init, (intermediate_size, hidden_size), ("mlp", "embed"), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        g = x @ self.gate[...].astype(self.dtype)
        u = x @ self.up[...].astype(self.dtype)
        return (jax.nn.silu(g) * u) @ self.down[...].astype(self.dtype)
