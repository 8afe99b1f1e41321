"""Test-time-training memory layer (AllMem's memory), wrapping `pallas_kernels.ttt.ttt_memory`.

    q, k, v   = x W_q, x W_k, x W_v                     [B,T,H,hd]  (q, k L2-normalised by default)
    lr        = softplus(x W_lr + b_lr)                 [B,T,H]  per-token inner learning rate
    momentum  = sigmoid(x W_mu + b_mu)                  [B,T,H]
    decay     = sigmoid(x W_a + b_a)                    [B,T,H]  forgetting of the fast weights
    o         = ttt_memory(q, k, v, lr, momentum, decay, weights0=(w1, w2, w3), chunk_size)
    y         = o W_o

The fast weights start every document at the learned (w1, w2, w3) of a residual SwiGLU MLP;
the kernel reads, then updates them once per `chunk_size` tokens (see pallas_kernels/ttt).
Decode cache: the kernel's `TTTState` (fast weights, momentum, the partial chunk's gradient,
count, last segment) flattened into the layer's dict. `chunk_size` and `backend` are plain
attributes a trainer may change between steps.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from hybrid_jax.layers.params import param
from pallas_kernels.ttt import TTTState, init_state, ttt_memory

_STATE_KEYS = ("w1", "w2", "w3", "m1", "m2", "m3", "g1", "g2", "g3")


def _l2norm(x, eps=1e-6):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class TTTMemory(nnx.Module):
    """The AllMem memory as a mixer-contract module (used inside `AllMem`)."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, *, memory_hidden: int | None = None,
                 chunk_size: int = 512, lr_init: float = 1e-3, momentum_init: float = 0.9,
                 decay_init: float = 1e-3, qk_l2norm: bool = True, backend: str = "auto", dtype=jnp.float32,
                 param_dtype=jnp.float32, init_std: float = 0.02, rngs: nnx.Rngs):
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"TTTMemory: chunk_size must be an int >= 1, got {chunk_size!r}")
        for name, v in (("momentum_init", momentum_init), ("decay_init", decay_init)):
            if not 0 < v < 1:
                raise ValueError(f"TTTMemory: {name}={v} must lie in (0, 1)")
        if not lr_init > 0:
            raise ValueError(f"TTTMemory: lr_init={lr_init} must be > 0")
        H, hd, D = num_heads, head_dim, hidden_size
        F = memory_hidden or head_dim
        init = nnx.initializers.normal(init_std)
        self.num_heads, self.head_dim, self.memory_hidden = H, hd, F
        self.chunk_size, self.qk_l2norm, self.backend, self.dtype = chunk_size, qk_l2norm, backend, dtype
        self.q_proj = param(rngs, init, (D, H, hd), ("embed", "heads", "head_dim"), param_dtype)
        self.k_proj = param(rngs, init, (D, H, hd), ("embed", "heads", "head_dim"), param_dtype)
        self.v_proj = param(rngs, init, (D, H, hd), ("embed", "heads", "head_dim"), param_dtype)
        self.o_proj = param(rngs, init, (H, hd, D), ("heads", "head_dim", "embed"), param_dtype)
        logit = lambda p: math.log(p / (1 - p))
        for name, bias in (("lr", lr_init + math.log(-math.expm1(-lr_init))), ("momentum", logit(momentum_init)),
                           ("decay", logit(decay_init))):
            setattr(self, f"{name}_proj", param(rngs, init, (D, H), ("embed", "heads"), param_dtype))
            setattr(self, f"{name}_bias", param(None, jnp.full((H,), bias), (H,), ("heads",), jnp.float32))
        # Initial fast weights (learned): w1, w3 ~ N(0, 1/hd) like a fresh MLP, w2 small so f starts near identity.
        self.w1 = param(rngs, nnx.initializers.normal(hd**-0.5), (H, hd, F), ("heads", "head_dim", "mlp"), jnp.float32)
        self.w3 = param(rngs, nnx.initializers.normal(hd**-0.5), (H, hd, F), ("heads", "head_dim", "mlp"), jnp.float32)
        self.w2 = param(rngs, nnx.initializers.normal(init_std), (H, F, hd), ("heads", "mlp", "head_dim"), jnp.float32)

    def _gate(self, x, name, fn):
        w = getattr(self, f"{name}_proj")[...].astype(self.dtype)
        return fn(jnp.einsum("btd,dh->bth", x, w).astype(jnp.float32) + getattr(self, f"{name}_bias")[...])

    def weights0(self):
        return self.w1[...], self.w2[...], self.w3[...]

    def __call__(self, x, *, positions, segment_ids, cache=None):
        del positions
        x = x.astype(self.dtype)
        proj = lambda w: jnp.einsum("btd,dhk->bthk", x, w[...].astype(self.dtype))
        q, k, v = proj(self.q_proj), proj(self.k_proj), proj(self.v_proj)
        if self.qk_l2norm:
            q, k = _l2norm(q), _l2norm(k)
        lr = self._gate(x, "lr", jax.nn.softplus)
        momentum = self._gate(x, "momentum", jax.nn.sigmoid)
        decay = self._gate(x, "decay", jax.nn.sigmoid)
        state = None if cache is None else TTTState(
            weights=tuple(cache[k_] for k_ in _STATE_KEYS[0:3]), momentum=tuple(cache[k_] for k_ in _STATE_KEYS[3:6]),
            grad=tuple(cache[k_] for k_ in _STATE_KEYS[6:9]), count=cache["count"], segment=cache["segment"])
        o, final = ttt_memory(q, k, v, lr, momentum, decay, weights0=self.weights0(), chunk_size=self.chunk_size,
                              segment_ids=segment_ids, initial_state=state, output_final_state=cache is not None,
                              backend=self.backend)
        y = jnp.einsum("bthk,hkd->btd", o.astype(self.dtype), self.o_proj[...].astype(self.dtype))
        if cache is None:
            return y, None
        return y, {**self._flatten(final), "index": cache["index"] + x.shape[1]}

    @staticmethod
    def _flatten(state: TTTState) -> dict[str, jax.Array]:
        arrays = (*state.weights, *state.momentum, *state.grad)
        return {**dict(zip(_STATE_KEYS, arrays)), "count": state.count, "segment": state.segment}

    def init_cache(self, batch_size: int, max_length: int, dtype) -> dict[str, jax.Array]:
        del max_length, dtype  # constant size; the memory state is float32
        return {**self._flatten(init_state(self.weights0(), batch_size)), "index": jnp.zeros((), jnp.int32)}
