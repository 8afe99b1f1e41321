"""Grouped-query softmax attention (Qwen3: q/k RMSNorm per head, RoPE, optional biases).

All attention math goes through two functions: `attention_core` (masked jnp, any queries against
any cached keys) and `self_attention` (queries and keys are the same tokens: training, scoring and
a prefill into an empty cache), which runs the flash kernel `pallas_kernels.swa.swa_attention` on
GPU. `Attention.window` (None = full) makes the same layer a sliding-window mixer.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from hybrid_jax.layers.norms import RMSNorm
from hybrid_jax.layers.params import param
from hybrid_jax.layers.rope import apply_rope, rope_frequencies
from hybrid_jax.models import cache as cache_lib
from hybrid_jax.sharding import per_shard

# "auto": `self_attention` uses the Pallas flash kernel on GPU (head_dim a power of two >= 16) and
# masked jnp elsewhere; "xla": masked jnp everywhere (the path the CPU tests check against transformers).
ATTENTION_BACKEND = "auto"

# Upper bound on one query chunk's float32 score tensor; longer prompts are processed in
# query chunks so a 32K-token prefill never materialises the full [T, S] score matrix.
_MAX_SCORE_BYTES = 1 << 30


def attention_mask(q_segment_ids, kv_segment_ids, q_index, kv_index, window=None):
    """Boolean [B, T, S]: same non-zero segment, causal by token index, within `window` if set."""
    mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (q_segment_ids[:, :, None] != 0)
    delta = q_index[:, None] - kv_index[None, :]
    causal = delta >= 0
    if window is not None:
        causal &= delta < window
    return mask & causal[None]


def masked_softmax_attend(q, k, v, mask, scale):
    """q [B,T,KH,G,D], k/v [B,S,KH,D], mask [B,T,S] -> [B,T,KH,G,D] (float32 softmax)."""
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    mask = mask[:, None, None]
    # Mask before exponentiating: every exponent is <= 0 and fully masked rows give 0, not NaN.
    scores = jnp.where(mask, scores, -jnp.inf)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    probs = jnp.where(mask, jnp.exp(scores - jnp.where(jnp.isfinite(peak), peak, 0.0)), 0.0)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    probs = probs / jnp.where(denom > 0, denom, 1.0)
    return jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)


def attention_core(q, k, v, *, q_segment_ids, kv_segment_ids, q_index, kv_index, window=None, scale):
    """Softmax attention with segments, causality and an optional sliding window.

    q [B, T, H, D]; k, v [B, S, KH, D] with H a multiple of KH (GQA); segment ids [B, T] / [B, S]
    (0 = padding, never attended; padded queries return 0); q_index [T] / kv_index [S] are the
    tokens' indices in the sequence (cache slots), used for causality and the window.
    Returns [B, T, H, D] in q's dtype.
    """
    b, t, h, d = q.shape
    kh = k.shape[2]
    if h % kh:
        raise ValueError(f"attention_core: {h} query heads are not a multiple of {kh} key/value heads")
    qg = q.reshape(b, t, kh, h // kh, d)
    s = k.shape[1]
    chunk = t
    while chunk > 16 and b * h * chunk * s * 4 > _MAX_SCORE_BYTES:
        chunk //= 2
    if chunk == t:
        out = masked_softmax_attend(qg, k, v, attention_mask(q_segment_ids, kv_segment_ids, q_index, kv_index, window), scale)
        return out.reshape(b, t, h, d).astype(q.dtype)

    n = -(-t // chunk)
    pad = n * chunk - t
    qg = jnp.pad(qg, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    qs = jnp.pad(q_segment_ids, ((0, 0), (0, pad)))  # padded queries: segment 0, dropped below
    qi = jnp.pad(q_index, (0, pad))

    def one(args):
        qc, sc, ic = args
        return masked_softmax_attend(qc, k, v, attention_mask(sc, kv_segment_ids, ic, kv_index, window), scale).astype(q.dtype)

    chunks = (
        qg.reshape(b, n, chunk, kh, h // kh, d).swapaxes(0, 1),
        qs.reshape(b, n, chunk).swapaxes(0, 1),
        qi.reshape(n, chunk),
    )
    out = jax.lax.map(one, chunks)  # [n, B, chunk, KH, G, D]
    return out.swapaxes(0, 1).reshape(b, n * chunk, h, d)[:, :t]


def _use_kernel(q) -> bool:
    d = q.shape[-1]
    return (ATTENTION_BACKEND == "auto" and jax.default_backend() == "gpu"
            and d >= 16 and d & (d - 1) == 0)


def swa_attention_per_shard(q, k, v, segment_ids, **kwargs):
    """pallas_kernels.swa.swa_attention(q, k, v, segment_ids=..., **kwargs), run per device shard
    under a mesh (sharding.per_shard: batch rows and heads are independent)."""
    from pallas_kernels.swa import swa_attention

    return per_shard(functools.partial(swa_attention, **kwargs),
                     dict(q=q, k=k, v=v, segment_ids=segment_ids),
                     dict(q="bthd", k="bthd", v="bthd", segment_ids="bt"), "bthd")


def self_attention(q, k, v, *, segment_ids, window=None, scale):
    """Causal attention of a sequence over itself (no cache); padded queries (segment 0) return 0.

    The kernel treats a document as a run of equal segment ids, which is the same as "equal ids"
    for left-padded and packed batches (the layouts the data pipeline and generation produce).
    """
    t = q.shape[1]
    if _use_kernel(q):
        o = swa_attention_per_shard(q, k.astype(q.dtype), v.astype(q.dtype), segment_ids.astype(jnp.int32),
                                    window=min(window or t, t), scale=float(scale))
        return jnp.where((segment_ids != 0)[:, :, None, None], o, 0).astype(q.dtype)
    index = jnp.arange(t, dtype=jnp.int32)
    return attention_core(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                          q_index=index, kv_index=index, window=window, scale=scale)


class Attention(nnx.Module):
    """Qwen3 attention mixer following the mixer contract of docs/architecture.md."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 rope_theta: float = 1e6, rope_scaling: Mapping | None = None,
                 max_position_embeddings: int | None = None, qk_norm: bool = True, bias: bool = False,
                 rms_norm_eps: float = 1e-6, window: int | None = None, dtype=jnp.float32,
                 param_dtype=jnp.float32, init_std: float = 0.02, rngs: nnx.Rngs):
        if num_heads % num_kv_heads:
            raise ValueError(f"Attention: num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        init = nnx.initializers.normal(init_std)
        zeros = nnx.initializers.zeros
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.window = window
        self.dtype = dtype
        self.scale = head_dim**-0.5
        inv_freq, self.rope_attention_factor = rope_frequencies(head_dim, rope_theta, rope_scaling, max_position_embeddings)
        self.rope_inv_freq = tuple(float(f) for f in inv_freq)  # static and hashable
        self.q_proj = param(rngs, init, (hidden_size, num_heads, head_dim), ("embed", "heads", "head_dim"), param_dtype)
        self.k_proj = param(rngs, init, (hidden_size, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.v_proj = param(rngs, init, (hidden_size, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.o_proj = param(rngs, init, (num_heads, head_dim, hidden_size), ("heads", "head_dim", "embed"), param_dtype)
        if bias:
            self.q_bias = param(rngs, zeros, (num_heads, head_dim), ("heads", "head_dim"), param_dtype)
            self.k_bias = param(rngs, zeros, (num_kv_heads, head_dim), ("kv_heads", "head_dim"), param_dtype)
            self.v_bias = param(rngs, zeros, (num_kv_heads, head_dim), ("kv_heads", "head_dim"), param_dtype)
            self.o_bias = param(rngs, zeros, (hidden_size,), ("embed",), param_dtype)
        else:
            self.q_bias = self.k_bias = self.v_bias = self.o_bias = None
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
            self.k_norm = RMSNorm(head_dim, eps=rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        else:
            self.q_norm = self.k_norm = None

    @classmethod
    def from_config(cls, config, *, window: int | None = None, rngs: nnx.Rngs) -> Attention:
        return cls(config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                   rope_theta=config.rope_theta, rope_scaling=config.rope_scaling,
                   max_position_embeddings=config.max_position_embeddings, bias=config.attention_bias,
                   rms_norm_eps=config.rms_norm_eps, window=window, dtype=config.jnp_dtype,
                   param_dtype=config.jnp_param_dtype, init_std=config.initializer_range, rngs=rngs)

    def _proj(self, x, w, b):
        y = jnp.einsum("btd,dhk->bthk", x, w[...].astype(self.dtype))
        return y if b is None else y + b[...].astype(self.dtype)

    def project_qkv(self, x, positions):
        """x [B,T,D] -> q [B,T,H,hd], k, v [B,T,KH,hd] with q/k normalised and rotated."""
        x = x.astype(self.dtype)
        q = self._proj(x, self.q_proj, self.q_bias)
        k = self._proj(x, self.k_proj, self.k_bias)
        v = self._proj(x, self.v_proj, self.v_bias)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = jnp.asarray(self.rope_inv_freq, jnp.float32)
        q = apply_rope(q, positions, inv_freq, self.rope_attention_factor)
        k = apply_rope(k, positions, inv_freq, self.rope_attention_factor)
        return q, k, v

    def output(self, o):
        """o [B,T,H,hd] -> [B,T,D]."""
        y = jnp.einsum("bthk,hkd->btd", o.astype(self.dtype), self.o_proj[...].astype(self.dtype))
        return y if self.o_bias is None else y + self.o_bias[...].astype(self.dtype)

    def __call__(self, x, *, positions, segment_ids, cache=None):
        q, k, v = self.project_qkv(x, positions)
        t = x.shape[1]
        if cache is None:
            o = self_attention(q, k, v, segment_ids=segment_ids, window=self.window, scale=self.scale)
            return self.output(o), None
        start = cache["index"]
        cache = cache_lib.append_kv(cache, k, v, segment_ids)

        def over_cache():
            return attention_core(q, cache["k"], cache["v"], q_segment_ids=segment_ids,
                                  kv_segment_ids=cache["segment_ids"],
                                  q_index=start + jnp.arange(t, dtype=jnp.int32),
                                  kv_index=jnp.arange(cache["k"].shape[1], dtype=jnp.int32),
                                  window=self.window, scale=self.scale).astype(q.dtype)

        if t > 1 and _use_kernel(q):
            # A prefill into an empty cache is plain self-attention: take the flash kernel.
            o = jax.lax.cond(start == 0, lambda: self_attention(
                q, k, v, segment_ids=segment_ids, window=self.window, scale=self.scale), over_cache)
        else:
            o = over_cache()
        return self.output(o), cache

    def init_cache(self, batch_size: int, max_length: int, dtype) -> dict[str, jax.Array]:
        return cache_lib.kv_cache(batch_size, max_length, self.num_kv_heads, self.head_dim, dtype)
