"""Oracle for the TTT memory: a token-by-token `lax.scan` that keeps the partial chunk.

Independent of `chunk.py` on purpose: it stores the raw (k, v, lr) of the current chunk
in a buffer and, when the chunk is full, takes the inner gradient with `jax.grad` of the
chunk loss.  Slow (one scan step per token) but transparent.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _f(w, x):
    """Residual SwiGLU MLP, per (row, head): x [B,H,...,D]."""
    w1, w2, w3 = w
    a = jnp.einsum("bh...d,bhdf->bh...f", x, w1)
    b = jnp.einsum("bh...d,bhdf->bh...f", x, w3)
    return x + jnp.einsum("bh...f,bhfd->bh...d", jax.nn.silu(a) * b, w2)


def _chunk_loss(w, k, v, lr):
    """sum_t lr_t * 1/2 |f_W(k_t) - v_t|^2 over a buffer k, v [B,H,C,D], lr [B,H,C]."""
    r = _f(w, k) - v
    return 0.5 * jnp.sum(lr * jnp.sum(r * r, axis=-1))


def ttt_memory_reference(q, k, v, lr, momentum, decay, *, weights0, chunk_size,
                         segment_ids=None, normalize=True, eps=1e-6):
    """Same contract as `ttt_memory` (no initial state). Returns (o, (weights, momentum, count))."""
    B, T, H, D = q.shape
    C = chunk_size
    f32 = jnp.float32
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    w0 = tuple(jnp.broadcast_to(x.astype(f32), (B, *x.shape)) for x in weights0)
    zeros = tuple(jnp.zeros_like(x) for x in w0)
    buf = (jnp.zeros((B, H, C, D), f32), jnp.zeros((B, H, C, D), f32), jnp.zeros((B, H, C), f32))
    init = (w0, zeros, buf, jnp.zeros((B,), jnp.int32), jnp.full((B,), -1, jnp.int32))

    def rows(mask, x, y):
        return jax.tree.map(lambda a, b: jnp.where(mask.reshape((B,) + (1,) * (a.ndim - 1)), a, b), x, y)

    def step(carry, xs):
        w, s, (bk, bv, blr), n, segp = carry
        qt, kt, vt, lrt, mut, alt, sgt = xs  # [B,H,D] x3, [B,H] x3, [B]
        reset = sgt != segp
        w = rows(reset, w0, w)
        s = rows(reset, zeros, s)
        n = jnp.where(reset, 0, n)

        o = _f(w, qt)
        slot = (jnp.arange(C)[None, :] == n[:, None])[:, None, :]  # [B,1,C]
        bk = jnp.where(slot[..., None], kt[:, :, None, :], bk)
        bv = jnp.where(slot[..., None], vt[:, :, None, :], bv)
        blr = jnp.where(slot, lrt[:, :, None], blr)
        n = n + 1
        full = n == C

        def update(w, s):
            live = jnp.arange(C)[None, None, :] < n[:, None, None]
            g = jax.grad(_chunk_loss)(w, bk, bv, jnp.where(live, blr, 0.0))
            mu, al = mut[..., None, None], alt[..., None, None]
            s_new = tuple(mu * si - gi for si, gi in zip(s, g, strict=True))
            w_new = tuple((1.0 - al) * wi + si for wi, si in zip(w, s_new, strict=True))
            return rows(full, w_new, w), rows(full, s_new, s)

        w, s = jax.lax.cond(jnp.any(full), update, lambda w, s: (w, s), w, s)
        n = jnp.where(full, 0, n)
        return (w, s, (bk, bv, blr), n, sgt), o

    def tm(x):  # [B,T,H,...] -> [T,B,H,...]
        return jnp.moveaxis(x.astype(f32), 1, 0)

    xs = (tm(q), tm(k), tm(v), tm(lr), tm(momentum), tm(decay),
          jnp.moveaxis(segment_ids.astype(jnp.int32), 1, 0))
    # Checkpointed so the backward keeps one carry per token, not every token's chunk
    # activations.
    (w, s, _, n, _), o = jax.lax.scan(jax.checkpoint(step), init, xs)
    o = jnp.moveaxis(o, 0, 1)
    if normalize:
        o = o / jnp.sqrt(jnp.mean(o * o, axis=-1, keepdims=True) + eps)
    return o.astype(q.dtype), (w, s, n)
