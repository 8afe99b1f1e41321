"""Pure-jnp oracle for sliding-window attention (masked softmax, float32).

Visibility rule (shared by every backend): a document is a maximal run of equal
segment ids (segment 0 = padding is just another run, so padded rows stay finite).
Query t, whose document starts at ``start[t]``, sees key s iff

    start[t] <= s <= t   and   (t - s < window  or  s < start[t] + sinks)

i.e. the last ``window`` tokens of its own document (itself included) plus that
document's first ``sinks`` tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_starts(segment_ids: jax.Array | None, batch: int, length: int) -> jax.Array:
    """Index of the first token of each token's document, int32 [B, T]."""
    pos = jnp.arange(length, dtype=jnp.int32)
    if segment_ids is None:
        return jnp.zeros((batch, length), jnp.int32)
    seg = segment_ids.astype(jnp.int32)
    is_start = jnp.concatenate(
        [jnp.ones((batch, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    return jax.lax.cummax(jnp.where(is_start, pos[None, :], 0), axis=1)


def visibility_mask(starts: jax.Array, window: int, sinks: int) -> jax.Array:
    """Boolean [B, T(query), T(key)] mask of the visibility rule above."""
    length = starts.shape[1]
    t = jnp.arange(length, dtype=jnp.int32)[:, None]
    s = jnp.arange(length, dtype=jnp.int32)[None, :]
    st = starts[:, :, None]
    return (s >= st) & (s <= t) & ((t - s < window) | (s < st + sinks))


def swa_attention_reference(q, k, v, *, window, sinks=0, segment_ids=None, scale=None,
                            return_lse=False):
    """Masked-softmax attention in float32; output in q.dtype.

    q [B,T,Hq,D], k/v [B,T,Hkv,D] -> o [B,T,Hq,D] (and lse [B,Hq,T] float32 if asked).
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    qf = q.astype(jnp.float32).reshape(b, t, hkv, hq // hkv, d)
    kf = k.astype(jnp.float32)
    vf = v.astype(jnp.float32)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qf, kf,
                        precision=jax.lax.Precision.HIGHEST) * scale
    mask = visibility_mask(segment_starts(segment_ids, b, t), window, sinks)
    logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    # Every query sees at least itself, so the row max is finite.
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p / denom, vf,
                   precision=jax.lax.Precision.HIGHEST)
    o = o.reshape(b, t, hq, d).astype(q.dtype)
    if return_lse:
        lse = (m + jnp.log(denom))[..., 0].reshape(b, hq, t)
        return o, lse
    return o
