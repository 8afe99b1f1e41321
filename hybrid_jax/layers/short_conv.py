"""Depthwise causal short convolution (KDA's q/k/v convolutions), reset at segment changes.

    y_t = act( sum_{j=0}^{K-1} w[K-1-j] * x_{t-j} * [seg_{t-j} == seg_t] )

The taps are indexed like torch's `Conv1d(groups=C, padding=K-1)` weight `[C, 1, K]`
transposed to `[K, C...]`: `w[K-1]` multiplies the current token. A token never sees
inputs of another segment, so a packed document computes what it computes alone. For
decoding, the last K-1 inputs and their segment ids are the cache state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hybrid_jax.layers.params import param

ACTIVATIONS = {"silu": jax.nn.silu, "identity": lambda x: x}


def append_to_state(x, segment_ids, state, state_segment_ids):
    """[state, x] along time and their segment ids (int32): the new conv state is the last K-1
    rows of both."""
    return (jnp.concatenate([state.astype(x.dtype), x], axis=1),
            jnp.concatenate([state_segment_ids.astype(jnp.int32), segment_ids.astype(jnp.int32)], axis=1))


def causal_short_conv(x, weight, segment_ids, state=None, state_segment_ids=None):
    """x [B,T,*C], weight [K,*C], segment_ids [B,T]; state [B,K-1,*C] with ids [B,K-1] (or None).

    Returns (pre-activation y [B,T,*C] in x.dtype, new state, new state ids): the state is the
    last K-1 inputs, so prefill and token-by-token decode compute the same outputs.
    """
    b, t = x.shape[:2]
    ks = weight.shape[0]
    if state is None:
        state = jnp.zeros((b, ks - 1, *x.shape[2:]), x.dtype)
        state_segment_ids = jnp.full((b, ks - 1), -1, jnp.int32)
    xs, segs = append_to_state(x, segment_ids, state, state_segment_ids)  # [B, K-1+T, C...]
    w = weight.astype(jnp.float32)
    y = jnp.zeros(x.shape, jnp.float32)
    for j in range(ks):  # tap j looks j tokens back
        xj = jax.lax.dynamic_slice_in_dim(xs, ks - 1 - j, t, axis=1)
        same = jax.lax.dynamic_slice_in_dim(segs, ks - 1 - j, t, axis=1) == segment_ids
        same = same.reshape(same.shape + (1,) * (x.ndim - 2))
        y = y + jnp.where(same, xj.astype(jnp.float32), 0.0) * w[ks - 1 - j]
    return y.astype(x.dtype), xs[:, t:], segs[:, t:]


class ShortConv(nnx.Module):
    """Depthwise causal convolution over `[B, T, heads, head_dim]` with an activation."""

    def __init__(self, num_heads: int, head_dim: int, kernel_size: int = 4, *, activation: str = "silu",
                 init: str = "identity", dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        if kernel_size < 1:
            raise ValueError(f"ShortConv: kernel_size must be >= 1, got {kernel_size}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"ShortConv: activation {activation!r} unknown; use one of {sorted(ACTIVATIONS)}")
        shape = (kernel_size, num_heads, head_dim)
        if init == "identity":  # only the current-token tap is 1: y_t = act(x_t)
            value = jnp.zeros(shape).at[-1].set(1.0)
        elif init == "random":  # torch Conv1d's default (kaiming uniform, fan_in = kernel_size)
            bound = kernel_size**-0.5
            value = jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound)
        else:
            raise ValueError(f"ShortConv: init {init!r} unknown; use 'identity' or 'random'")
        self.kernel_size = kernel_size
        self.activation = activation
        self.dtype = dtype
        self.weight = param(None, value, shape, ("conv", "heads", "head_dim"), param_dtype)

    def __call__(self, x, segment_ids, state=None, state_segment_ids=None):
        y, state, state_ids = causal_short_conv(x.astype(self.dtype), self.weight[...], segment_ids, state,
                                                state_segment_ids)
        return ACTIVATIONS[self.activation](y), state, state_ids
