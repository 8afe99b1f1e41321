"""Kimi Delta Attention mixer (and its scalar-gate GDN ablation), following docs/architecture.md.

    q, k, v = silu(conv(x W_q)), silu(conv(x W_k)), silu(conv(x W_v))       [B,T,H,hd]
    g       = -exp(A_log[h]) * softplus(f_up(f_down(x)) + dt_bias)            per channel (KDA)
            = -exp(A_log[h]) * softplus(x W_a + dt_bias)  broadcast over hd   per head    (GDN)
    beta    = sigmoid(x W_b)
    o       = chunk_kda(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)       (decode: fused_recurrent_kda)
    y       = o_proj(RMSNorm_head(o) * sigmoid(g_up(g_down(x))))

Parameter names and layouts mirror transformers' `KimiDeltaAttention` (q/k/v/o projections,
f_a/f_b -> f_down/f_up, g_a/g_b -> g_down/g_up, A_log, dt_bias, b_proj, o_norm), stored
head-split like the teacher's Attention: `[D, H, hd]` in, `[H, hd, D]` out.
Cache: recurrent state [B,H,hd,hd] float32, the three conv states (last kernel-1 inputs and
their segment ids), the last segment id per row and the token index.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from hybrid_jax.layers.norms import RMSNorm
from hybrid_jax.layers.params import param
from hybrid_jax.layers.short_conv import ShortConv
from pallas_kernels.kda import chunk_kda, fused_recurrent_kda, kda_gate


def inverse_softplus(y: jax.Array) -> jax.Array:
    """x with softplus(x) = y (y > 0), stable for small y: x = y + log(-expm1(-y))."""
    return y + jnp.log(-jnp.expm1(-y))


def _log_uniform(key, shape, low, high):
    return jnp.exp(jax.random.uniform(key, shape, jnp.float32, math.log(low), math.log(high)))


class KDA(nnx.Module):
    """Kimi Delta Attention mixer; `gate="scalar"` makes it the GDN ablation (`mixer_kind` "gdn")."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, *, gate: str = "channel",
                 conv_size: int = 4, conv_init: str = "identity", A_init_range=(1.0, 16.0),
                 dt_init_range=(1e-3, 1e-1), output_gate_init: str = "half", chunk_size: int = 64,
                 norm_eps: float = 1e-6, backend: str = "auto", dtype=jnp.float32, param_dtype=jnp.float32,
                 init_std: float = 0.02, rngs: nnx.Rngs):
        if gate not in ("channel", "scalar"):
            raise ValueError(f"KDA: gate={gate!r}; use 'channel' (KDA) or 'scalar' (GDN)")
        if output_gate_init not in ("half", "random"):
            raise ValueError(f"KDA: output_gate_init={output_gate_init!r}; use 'half' or 'random'")
        lo, hi = A_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"KDA: A_init_range={A_init_range} must satisfy 0 < low <= high")
        dlo, dhi = dt_init_range
        if not 0 < dlo <= dhi:
            raise ValueError(f"KDA: dt_init_range={dt_init_range} must satisfy 0 < low <= high")
        H, hd, D = num_heads, head_dim, hidden_size
        init = nnx.initializers.normal(init_std)
        self.mixer_kind = "kda" if gate == "channel" else "gdn"
        self.gate = gate
        self.num_heads, self.head_dim = H, hd
        self.chunk_size = chunk_size
        self.backend = backend
        self.dtype = dtype
        self.q_proj = param(rngs, init, (D, H, hd), ("embed", "heads", "head_dim"), param_dtype)
        self.k_proj = param(rngs, init, (D, H, hd), ("embed", "heads", "head_dim"), param_dtype)
        self.v_proj = param(rngs, init, (D, H, hd), ("embed", "heads", "head_dim"), param_dtype)

        def conv():
            return ShortConv(H, hd, conv_size, init=conv_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.q_conv, self.k_conv, self.v_conv = conv(), conv(), conv()
        if gate == "channel":  # low-rank (rank hd) per-channel decay projection
            self.f_down = param(rngs, init, (D, hd), ("embed", None), param_dtype)
            self.f_up = param(rngs, init, (hd, H, hd), (None, "heads", "head_dim"), param_dtype)
            dt_shape, dt_axes = (H, hd), ("heads", "head_dim")
        else:
            self.f_proj = param(rngs, init, (D, H), ("embed", "heads"), param_dtype)
            dt_shape, dt_axes = (H,), ("heads",)
        # A ~ U(lo, hi) stored as log; dt ~ logU(dt range) stored as inverse-softplus (mamba/fla init).
        A = jax.random.uniform(rngs.params(), (H,), jnp.float32, lo, hi)
        self.A_log = param(None, jnp.log(A), (H,), ("heads",), jnp.float32)
        dt = _log_uniform(rngs.params(), dt_shape, dlo, dhi)
        self.dt_bias = param(None, inverse_softplus(dt), dt_shape, dt_axes, jnp.float32)
        self.b_proj = param(rngs, init, (D, H), ("embed", "heads"), param_dtype)
        self.g_down = param(rngs, init, (D, hd), ("embed", None), param_dtype)
        # "half": g_up = 0, so the output gate sigmoid(g_up(g_down(x))) is exactly 0.5 at init.
        up_init = nnx.initializers.zeros if output_gate_init == "half" else init
        self.g_up = param(rngs, up_init, (hd, H, hd), (None, "heads", "head_dim"), param_dtype)
        self.o_norm = RMSNorm(hd, eps=norm_eps, dtype=jnp.float32, param_dtype=param_dtype)
        self.o_proj = param(rngs, init, (H, hd, D), ("heads", "head_dim", "embed"), param_dtype)

    def _w(self, p):
        return p[...].astype(self.dtype)

    def log_decay(self, x):
        """g [B,T,H,hd] float32 (<= 0)."""
        if self.gate == "channel":
            raw = jnp.einsum("btr,rhk->bthk", x @ self._w(self.f_down), self._w(self.f_up))
            return kda_gate(raw, self.A_log[...], self.dt_bias[...])
        raw = jnp.einsum("btd,dh->bth", x, self._w(self.f_proj))[..., None]
        g = kda_gate(raw, self.A_log[...], self.dt_bias[...])
        return jnp.broadcast_to(g, (*g.shape[:-1], self.head_dim))

    def __call__(self, x, *, positions, segment_ids, cache=None):
        del positions  # KDA has no positional encoding
        x = x.astype(self.dtype)
        b, t, _ = x.shape
        c = cache or {}
        proj = lambda w: jnp.einsum("btd,dhk->bthk", x, self._w(w))
        q, q_state, q_ids = self.q_conv(proj(self.q_proj), segment_ids, c.get("q_conv"), c.get("conv_segment_ids"))
        k, k_state, _ = self.k_conv(proj(self.k_proj), segment_ids, c.get("k_conv"), c.get("conv_segment_ids"))
        v, v_state, _ = self.v_conv(proj(self.v_proj), segment_ids, c.get("v_conv"), c.get("conv_segment_ids"))
        g = self.log_decay(x)
        beta = jax.nn.sigmoid(jnp.einsum("btd,dh->bth", x, self._w(self.b_proj)).astype(jnp.float32))
        state = None
        if cache is not None:
            # The carried state belongs to the row's last segment; a new segment starts from zero.
            same = cache["segment_id"] == segment_ids[:, 0]
            state = jnp.where(same[:, None, None, None], cache["state"], 0.0)
        op = fused_recurrent_kda if (cache is not None and t == 1) else chunk_kda
        o, final = op(q, k, v, g, beta, initial_state=state, output_final_state=cache is not None,
                      use_qk_l2norm_in_kernel=True, segment_ids=segment_ids, chunk_size=self.chunk_size,
                      backend=self.backend)
        gate = jnp.einsum("btr,rhk->bthk", x @ self._w(self.g_down), self._w(self.g_up))
        o = self.o_norm(o.astype(jnp.float32)) * jax.nn.sigmoid(gate.astype(jnp.float32))
        y = jnp.einsum("bthk,hkd->btd", o.astype(self.dtype), self._w(self.o_proj))
        if cache is None:
            return y, None
        new_cache = {
            "state": final, "q_conv": q_state, "k_conv": k_state, "v_conv": v_state,
            "conv_segment_ids": q_ids, "segment_id": segment_ids[:, -1].astype(jnp.int32),
            "index": cache["index"] + t,
        }
        return y, new_cache

    def init_cache(self, batch_size: int, max_length: int, dtype) -> dict[str, jax.Array]:
        del max_length  # constant-size state
        H, hd = self.num_heads, self.head_dim
        ks = self.q_conv.kernel_size
        conv = jnp.zeros((batch_size, ks - 1, H, hd), self.dtype)
        return {
            "state": jnp.zeros((batch_size, H, hd, hd), jnp.float32),
            "q_conv": conv, "k_conv": conv, "v_conv": conv,
            "conv_segment_ids": jnp.full((batch_size, ks - 1), -1, jnp.int32),
            "segment_id": jnp.full((batch_size,), -1, jnp.int32),
            "index": jnp.zeros((), jnp.int32),
        }
