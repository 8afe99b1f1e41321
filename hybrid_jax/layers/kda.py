"""Kimi Delta Attention mixer (and its scalar-gate GDN ablation), following docs/architecture.md.

    q, k, v = act(conv(x W_q) + b_q), act(conv(x W_k) + b_k), act(conv(x W_v) + b_v)
    g       = -exp(A_log[h]) * softplus(f_up(f_down(x)) + dt_bias)            per channel (KDA)
            = -exp(A_log[h]) * softplus(x W_a + dt_bias)  broadcast over hd   per head    (GDN)
    beta    = sigmoid(x W_b)
    o       = chunk_kda(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)       (decode: fused_recurrent_kda)
    y       = o_proj(RMSNorm_head(o) * sigmoid(g_up(g_down(x)) + b_g))

Defaults (transformers' `KimiDeltaAttention`): act = silu, no conv biases b_q/b_k/b_v, no gate bias
b_g, the per-head RMSNorm on, and H key/value heads. The seed paper's released `EfficientKDA`
(checkpoint layout `efficient_qwen`, hybrid_jax/convert/efficient_qwen.py) is the same layer with
`conv_activation="identity"`, `conv_bias=True`, `output_gate_bias=True`,
`num_kv_heads=num_key_value_heads` (k/v projected to fewer heads, convolved, then each repeated to
num_heads // num_kv_heads query heads, GQA) and, by default, `output_norm=False` (o * sigmoid(gate)).

Parameter names and layouts mirror transformers' `KimiDeltaAttention` (q/k/v/o projections,
f_a/f_b -> f_down/f_up, g_a/g_b -> g_down/g_up, A_log, dt_bias, b_proj, o_norm), stored
head-split like the teacher's Attention: `[D, H, hd]` in, `[H, hd, D]` out.
`fused_conv=True`: on the Pallas backends, in forwards without a cache and in prefills (more than
one token) into an empty cache (index 0), one kernel (`pallas_kernels.kda.short_conv.short_conv_norm`)
computes each of q/k/v's convolution, activation and (q, k) per-head L2 norm and scale, and the op
then skips its own normalisation; decoding and prefills continuing a cache take the jnp path.
Cache: recurrent state [B,H,hd,hd] float32, the three conv states (last kernel-1 inputs and
their segment ids; k/v with num_kv_heads heads), the last segment id per row and the token index.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from hybrid_jax.layers.norms import RMSNorm
from hybrid_jax.layers.params import param
from hybrid_jax.layers.short_conv import ACTIVATIONS, ShortConv, append_to_state
from hybrid_jax.sharding import per_shard
from pallas_kernels.kda import chunk_kda, fused_recurrent_kda, kda_gate, resolve_backend
from pallas_kernels.kda.short_conv import short_conv_norm


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
                 norm_eps: float = 1e-6, num_kv_heads: int | None = None, conv_activation: str = "silu",
                 conv_bias: bool = False, output_gate_bias: bool = False, output_norm: bool = True,
                 backend: str = "auto", fused_conv: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
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
        if conv_activation not in ACTIVATIONS:
            raise ValueError(f"KDA: conv_activation={conv_activation!r}; use one of {sorted(ACTIVATIONS)}")
        KH = num_heads if num_kv_heads is None else num_kv_heads
        if not (isinstance(KH, int) and KH >= 1 and num_heads % KH == 0):
            raise ValueError(f"KDA: num_kv_heads={num_kv_heads!r} must be a positive divisor of num_heads={num_heads} "
                             "(or None for one key/value head per query head)")
        H, hd, D = num_heads, head_dim, hidden_size
        init = nnx.initializers.normal(init_std)
        zeros = nnx.initializers.zeros
        self.mixer_kind = "kda" if gate == "channel" else "gdn"
        self.gate = gate
        self.num_heads, self.num_kv_heads, self.head_dim = H, KH, hd
        self.conv_activation = conv_activation
        self.chunk_size = chunk_size
        self.backend = backend
        self.fused_conv = fused_conv
        self.dtype = dtype
        kv_axis = "heads" if KH == H else "kv_heads"
        self.q_proj = param(rngs, init, (D, H, hd), ("embed", "heads", "head_dim"), param_dtype)
        self.k_proj = param(rngs, init, (D, KH, hd), ("embed", kv_axis, "head_dim"), param_dtype)
        self.v_proj = param(rngs, init, (D, KH, hd), ("embed", kv_axis, "head_dim"), param_dtype)

        def conv(heads):
            # The activation is applied here after the optional bias, so ShortConv returns the plain convolution.
            return ShortConv(heads, hd, conv_size, activation="identity", init=conv_init, dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs)

        def conv_b(heads, axis):
            return param(rngs, zeros, (heads, hd), (axis, "head_dim"), param_dtype) if conv_bias else None

        self.q_conv, self.k_conv, self.v_conv = conv(H), conv(KH), conv(KH)
        self.q_conv_bias = conv_b(H, "heads")
        self.k_conv_bias, self.v_conv_bias = conv_b(KH, kv_axis), conv_b(KH, kv_axis)
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
        self.g_bias = param(rngs, zeros, (H, hd), ("heads", "head_dim"), param_dtype) if output_gate_bias else None
        self.o_norm = RMSNorm(hd, eps=norm_eps, dtype=jnp.float32, param_dtype=param_dtype) if output_norm else None
        self.o_proj = param(rngs, init, (H, hd, D), ("heads", "head_dim", "embed"), param_dtype)

    def _w(self, p):
        return p[...].astype(self.dtype)

    def raw_gate(self, x):
        """The per-channel gate before kda_gate, [B,T,H,hd] (KDA only)."""
        return jnp.einsum("btr,rhk->bthk", x @ self._w(self.f_down), self._w(self.f_up))

    def log_decay(self, x):
        """g [B,T,H,hd] float32 (<= 0)."""
        if self.gate == "channel":
            return kda_gate(self.raw_gate(x), self.A_log[...], self.dt_bias[...])
        raw = jnp.einsum("btd,dh->bth", x, self._w(self.f_proj))[..., None]
        g = kda_gate(raw, self.A_log[...], self.dt_bias[...])
        return jnp.broadcast_to(g, (*g.shape[:-1], self.head_dim))

    def _projection_and_bias(self, name, x):
        """x W for name in q/k/v, and the convolution's bias (or None) in the compute dtype."""
        bias = getattr(self, f"{name}_conv_bias")
        return (jnp.einsum("btd,dhk->bthk", x, self._w(getattr(self, f"{name}_proj"))),
                None if bias is None else self._w(bias))

    def _short_conv(self, name, x, segment_ids, c):
        """act(conv(x W) + bias) for name in q/k/v, with the conv's new state and state segment ids."""
        z, bias = self._projection_and_bias(name, x)
        y, state, ids = getattr(self, f"{name}_conv")(z, segment_ids, c.get(f"{name}_conv"), c.get("conv_segment_ids"))
        if bias is not None:
            y = y + bias
        return ACTIVATIONS[self.conv_activation](y), state, ids

    def _fused_short_conv(self, name, x, segment_ids, c, *, normalize, scale, interpret):
        """act(conv(x W) + bias), L2-normalised and scaled per head when `normalize`, by one Pallas
        kernel (`short_conv_norm`), which reads no conv state (a forward without a cache, or a
        prefill into an empty one); with a cache also the new conv state and its segment ids,
        as causal_short_conv returns them: the last kernel-1 rows of [old state, x W]."""
        z, bias = self._projection_and_bias(name, x)
        conv = functools.partial(short_conv_norm, activation=self.conv_activation, normalize=normalize,
                                 scale=scale, interpret=interpret)
        y = per_shard(conv, dict(z=z, weight=getattr(self, f"{name}_conv").weight[...],
                                 segment_ids=segment_ids, bias=bias),
                      dict(z="bthd", weight="khd", segment_ids="bt", bias="hd"), "bthd")
        if not c:
            return y, None, None
        t = z.shape[1]
        zs, ids = append_to_state(z, segment_ids, c[f"{name}_conv"], c["conv_segment_ids"])
        return y, zs[:, t:], ids[:, t:]

    def _recurrence(self, op, arrays, *, output_final_state, **kw):
        """(o, final state or None) of the chunked / recurrent op, per device shard under a mesh
        (batch rows and heads are independent)."""
        def run(**a):
            o, final = op(**a, output_final_state=output_final_state, chunk_size=self.chunk_size,
                          backend=self.backend, **kw)
            return (o, final) if output_final_state else o

        # g and dt_bias per channel ([B,T,H,K], [H,K]) or per head ([B,T,H], [H]: gdn)
        dims = dict(q="bthk", k="bthk", v="bthv", beta="bth", initial_state="bhkv", segment_ids="bt",
                    A_log="h", g="bthk"[:arrays["g"].ndim])
        if "dt_bias" in arrays:
            dims["dt_bias"] = "hk"[:arrays["dt_bias"].ndim]
        out = per_shard(run, arrays, dims,
                        ("bthv", "bhkv") if output_final_state else "bthv")
        return out if output_final_state else (out, None)

    def _fusable(self, backend):
        hd = self.head_dim
        return self.fused_conv and backend in ("pallas_gpu", "interpret") and 16 <= hd <= 256 and hd & (hd - 1) == 0

    def __call__(self, x, *, positions, segment_ids, cache=None):
        del positions  # KDA has no positional encoding
        x = x.astype(self.dtype)
        b, t, _ = x.shape
        c = cache or {}
        backend = resolve_backend(self.backend)
        if self.gate == "channel":  # the ops apply kda_gate (on GPU fused with the chunk cumsum)
            g, gate_kw = self.raw_gate(x), dict(use_gate_in_kernel=True)
            gate_arrays = dict(A_log=self.A_log[...], dt_bias=self.dt_bias[...])
        else:
            g, gate_arrays, gate_kw = self.log_decay(x), {}, {}
        beta = jax.nn.sigmoid(jnp.einsum("btd,dh->bth", x, self._w(self.b_proj)).astype(jnp.float32))
        state = None
        if cache is not None:
            # The carried state belongs to the row's last segment; a new segment starts from zero.
            same = cache["segment_id"] == segment_ids[:, 0]
            state = jnp.where(same[:, None, None, None], cache["state"], 0.0)
        op = fused_recurrent_kda if (cache is not None and t == 1) else chunk_kda

        def mix(fused):
            """(o, final state, (q/k/v conv states, their segment ids)) through the fused kernel or
            the jnp convolutions."""
            if fused:
                # q and k leave the kernel normalised (q also scaled), so the op skips both.
                conv = functools.partial(self._fused_short_conv, x=x, segment_ids=segment_ids, c=c,
                                         interpret=backend == "interpret")
                q, q_state, q_ids = conv("q", normalize=True, scale=self.head_dim ** -0.5)
                k, k_state, _ = conv("k", normalize=True, scale=1.0)
                v, v_state, _ = conv("v", normalize=False, scale=1.0)
                qk_kw = dict(use_qk_l2norm_in_kernel=False, scale=1.0)
            else:
                q, q_state, q_ids = self._short_conv("q", x, segment_ids, c)
                k, k_state, _ = self._short_conv("k", x, segment_ids, c)
                v, v_state, _ = self._short_conv("v", x, segment_ids, c)
                qk_kw = dict(use_qk_l2norm_in_kernel=True)
            if self.num_kv_heads != self.num_heads:  # GQA: query head h reads key/value head h // groups
                groups = self.num_heads // self.num_kv_heads
                k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
            o, final = self._recurrence(op, dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=state,
                                                 segment_ids=segment_ids, **gate_arrays),
                                        output_final_state=cache is not None, **qk_kw, **gate_kw)
            return o, final, (q_state, k_state, v_state, q_ids)

        if not self._fusable(backend) or (cache is not None and t == 1):
            o, final, conv_states = mix(False)
        elif cache is None:
            o, final, conv_states = mix(True)
        else:
            # Prefill: the kernel reads no conv state, so it serves an empty cache (index 0, as
            # init_cache makes it); a prefill continuing a cache takes the jnp convolutions.
            o, final, conv_states = jax.lax.cond(cache["index"] == 0, lambda: mix(True), lambda: mix(False))
        gate = jnp.einsum("btr,rhk->bthk", x @ self._w(self.g_down), self._w(self.g_up))
        if self.g_bias is not None:
            gate = gate + self._w(self.g_bias)
        o = o.astype(jnp.float32)
        if self.o_norm is not None:
            o = self.o_norm(o)
        o = o * jax.nn.sigmoid(gate.astype(jnp.float32))
        y = jnp.einsum("bthk,hkd->btd", o.astype(self.dtype), self._w(self.o_proj))
        if cache is None:
            return y, None
        q_state, k_state, v_state, q_ids = conv_states
        new_cache = {
            "state": final, "q_conv": q_state, "k_conv": k_state, "v_conv": v_state,
            "conv_segment_ids": q_ids, "segment_id": segment_ids[:, -1].astype(jnp.int32),
            "index": cache["index"] + t,
        }
        return y, new_cache

    def init_cache(self, batch_size: int, max_length: int, dtype) -> dict[str, jax.Array]:
        del max_length  # constant-size state
        H, KH, hd = self.num_heads, self.num_kv_heads, self.head_dim
        ks = self.q_conv.kernel_size
        conv = lambda heads: jnp.zeros((batch_size, ks - 1, heads, hd), self.dtype)
        return {
            "state": jnp.zeros((batch_size, H, hd, hd), jnp.float32),
            "q_conv": conv(H), "k_conv": conv(KH), "v_conv": conv(KH),
            "conv_segment_ids": jnp.full((batch_size, ks - 1), -1, jnp.int32),
            "segment_id": jnp.full((batch_size,), -1, jnp.int32),
            "index": jnp.zeros((), jnp.int32),
        }
