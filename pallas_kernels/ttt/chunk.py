"""Fused chunkwise TTT memory: one `lax.scan` step per chunk, hand-derived inner gradients.

Per (batch row, head) the memory is a residual SwiGLU MLP with fast weights
``W = (w1 [D,F], w2 [F,D], w3 [D,F])``::

    f_W(x) = x + (silu(x w1) * (x w3)) w2

Chunks are counted from the start of each segment (a document computes what it computes
alone).  Every token reads the weights in effect, then adds
``lr_t * grad_W 1/2 |f_W(k_t) - v_t|^2`` (evaluated at those same weights) to an
accumulator ``G``.  When the segment's chunk is full (``chunk_size`` tokens) the weights
move, with momentum ``mu`` and forgetting ``alpha`` read at that closing token::

    S <- mu S - G ;  W <- (1 - alpha) W + S ;  G <- 0

Because every token of a chunk is evaluated at the same weights, the accumulated ``G``
is exactly the gradient of the chunk's summed loss: the decode state carries ``G`` and
the count instead of the chunk's raw (k, v, lr).

The scan walks fixed blocks of ``block = min(chunk_size, T)`` positions.  A block holds
at most one update (the one of the segment alive at its first token) and any number of
segment starts; tokens of segments that start inside the block read the initial weights
``W0``.  Those two irregular cases are computed under `lax.cond`, so an unpacked
sequence pays for one MLP read and one inner gradient per token.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Weights = tuple[jax.Array, jax.Array, jax.Array]


class TTTState(NamedTuple):
    """Decode/continuation state of `ttt_memory` (float32 except the int32 counters).

    weights:  fast weights (w1 [B,H,D,F], w2 [B,H,F,D], w3 [B,H,D,F]).
    momentum: momentum buffers, same shapes.
    grad:     lr-weighted inner gradient of the tokens since the last update, evaluated
              at `weights` (the partial chunk, in the form the update needs).
    count:    [B] tokens of the current segment since its last update (< chunk_size).
    segment:  [B] segment id of the last token seen; -1 before any token.
    """

    weights: Weights
    momentum: Weights
    grad: Weights
    count: jax.Array
    segment: jax.Array


def init_state(weights0: Weights, batch_size: int) -> TTTState:
    """Fresh state: `weights0` broadcast over the batch, zero momentum and accumulator."""
    w = tuple(jnp.broadcast_to(x.astype(jnp.float32), (batch_size, *x.shape)) for x in weights0)
    def zeros():  # separate buffers for momentum and gradient, so a cache holds both
        return tuple(jnp.zeros_like(x) for x in w)

    return TTTState(
        weights=w,
        momentum=zeros(),
        grad=zeros(),
        count=jnp.zeros((batch_size,), jnp.int32),
        segment=jnp.full((batch_size,), -1, jnp.int32),
    )


# Inside the scan the fast weights (and their momentum and gradient) are kept as the pair
# (w13 = [w1 | w3] [B,H,D,2F], w2 [B,H,F,D]) so that q and k go through one matmul with w13
# and one with w2: 5 batched matmuls per block instead of 10 (the scan is launch-bound).
Packed = tuple[jax.Array, jax.Array]


def _pack(w: Weights) -> Packed:
    return jnp.concatenate([w[0], w[2]], axis=-1), w[1]


def _unpack(p: Packed) -> Weights:
    f = p[1].shape[-2]
    return p[0][..., :f], p[1], p[0][..., f:]


def _read_and_grad(w: Packed, q, k, v, wt):
    """Reads f_W(q) and the inner gradient grad_W sum_t wt_t * 1/2 |f_W(k_t) - v_t|^2
    (derived by hand), both at weights w; q, k, v [B,H,L,D], wt [B,H,L]."""
    w13, w2 = w
    L, F = q.shape[-2], w2.shape[-2]
    x = jnp.concatenate([q, k], axis=-2)
    ab = jnp.einsum("bhld,bhdf->bhlf", x, w13)
    a, b = ab[..., :F], ab[..., F:]
    s = jax.nn.silu(a)
    h = s * b
    y = x + jnp.einsum("bhlf,bhfd->bhld", h, w2)
    read, yk, ak, bk, sk, hk = y[..., :L, :], y[..., L:, :], a[..., L:, :], b[..., L:, :], s[..., L:, :], h[..., L:, :]
    e = (yk - v) * wt[..., None]
    g2 = jnp.einsum("bhlf,bhld->bhfd", hk, e)
    dh = jnp.einsum("bhld,bhfd->bhlf", e, w2)
    sig = jax.nn.sigmoid(ak)
    da = dh * bk * sig * (1.0 + ak * (1.0 - sig))  # silu'(a) = sig(a) (1 + a (1 - sig(a)))
    db = dh * sk
    g13 = jnp.einsum("bhld,bhlf->bhdf", k, jnp.concatenate([da, db], axis=-1))
    return read, (g13, g2)


def _select(mask_b: jax.Array, x, y):
    """Per batch row: x where mask_b else y (tuples of [B,...] arrays)."""
    return tuple(jnp.where(mask_b.reshape((-1,) + (1,) * (xi.ndim - 1)), xi, yi) for xi, yi in zip(x, y, strict=True))


def _zeros_like(w):
    return tuple(jnp.zeros_like(x) for x in w)


def _block_step(carry, xs, *, w0: Packed, chunk_size: int, may_post: bool, may_start: bool):
    """One block of L <= chunk_size positions for all rows; carry = (w, m, g, count, segment)
    with packed weights. Returns (carry, raw reads [B,H,L,D]).

    may_post / may_start: whether a chunk can close before the block's end (the carried
    count is not 0) and whether a segment can start after the block's first token; when
    statically impossible the branch is not built (a GPU conditional syncs with the host).
    """
    c_w, c_m, c_g, c_count, c_seg = carry
    q, k, v, lr, mom, dec, seg, valid = xs  # q,k,v [B,H,L,D]; lr,mom,dec [B,H,L]; seg [B,L]; valid [L]
    L = seg.shape[1]
    idx = jnp.arange(L)
    w0b = tuple(jnp.broadcast_to(x, c.shape) for x, c in zip(w0, c_w, strict=True))

    # A new segment at the block's first token restarts from W0.
    reset = seg[:, 0] != c_seg
    w = _select(reset, w0b, c_w)
    mbuf = _select(reset, _zeros_like(w), c_m)
    gacc = _select(reset, _zeros_like(w), c_g)
    count = jnp.where(reset, 0, c_count)

    # first[j]: token j belongs to the segment of the block's first token;
    # last[j]: token j belongs to the segment of the block's last token.
    same = seg[:, 1:] == seg[:, :-1]
    ones = jnp.ones((seg.shape[0], 1), bool)
    first = jnp.cumprod(jnp.concatenate([ones, same], 1), axis=1).astype(bool)
    last = jnp.cumprod(jnp.concatenate([same, ones], 1)[:, ::-1], axis=1)[:, ::-1].astype(bool)

    close = chunk_size - 1 - count  # offset of the token that completes the chunk
    pre = first & (idx[None] <= close[:, None]) & valid[None]
    post = first & (idx[None] > close[:, None]) & valid[None]
    later = ~first & valid[None]
    at_close = (idx[None] == close[:, None]) & first & valid[None]
    update = jnp.any(at_close, axis=1)

    def per_head(m):  # [B,L] token mask -> [B,1,L] to broadcast over heads
        return m[:, None, :].astype(jnp.float32)

    # Reads and gradient at the carried weights.
    read_a, g_pre = _read_and_grad(w, q, k, v, lr * per_head(pre))
    g_a = tuple(x + y for x, y in zip(gacc, g_pre, strict=True))

    sel = per_head(at_close)
    mu = jnp.sum(mom * sel, axis=-1)[..., None, None]  # [B,H,1,1]
    alpha = jnp.sum(dec * sel, axis=-1)[..., None, None]
    m_new = tuple(mu * mi - gi for mi, gi in zip(mbuf, g_a, strict=True))
    w_new = tuple((1.0 - alpha) * wi + mi for wi, mi in zip(w, m_new, strict=True))
    w_new = _select(update, w_new, w)
    m_new = _select(update, m_new, mbuf)

    def nothing():
        return jnp.zeros_like(q), _zeros_like(w)

    # Tokens after the update read (and accumulate at) the new weights.
    def after_update():
        return _read_and_grad(w_new, q, k, v, lr * per_head(post))

    read_b, g_b = jax.lax.cond(jnp.any(post), after_update, nothing) if may_post else nothing()

    # Tokens of segments that start inside the block read W0; only the block's last
    # segment survives into the carry, so only its tokens accumulate.
    def new_segments():
        return _read_and_grad(w0b, q, k, v, lr * per_head(last & later))

    read_0, g_0 = jax.lax.cond(jnp.any(later), new_segments, nothing) if may_start else nothing()

    pre_h, post_h = pre[:, None, :, None], post[:, None, :, None]
    read = jnp.where(pre_h, read_a, jnp.where(post_h, read_b, read_0))

    continues = first[:, -1]  # the block's first segment reaches its end
    n_pre = jnp.sum(pre, axis=1, dtype=jnp.int32)
    n_post = jnp.sum(post, axis=1, dtype=jnp.int32)
    n_last = jnp.sum(last & later, axis=1, dtype=jnp.int32)

    cont_g = _select(update, g_b, g_a)
    cont_n = jnp.where(update, n_post, count + n_pre)
    new = (
        _select(continues, w_new, w0b),
        _select(continues, m_new, _zeros_like(w)),
        _select(continues, cont_g, g_0),
        jnp.where(continues, cont_n, n_last),
        seg[:, -1],
    )
    return new, read


def ttt_memory_chunked(q, k, v, lr, momentum, decay, *, weights0, chunk_size, segment_ids,
                       initial_state, normalize, eps):
    """Core of `ttt_memory` (inputs already validated; segment_ids None = one segment).
    Returns (o [B,T,H,D], TTTState)."""
    B, T, H, D = q.shape
    f32 = jnp.float32
    w0 = tuple(x.astype(f32) for x in weights0)
    state = init_state(w0, B) if initial_state is None else initial_state
    carry = (_pack(state.weights), _pack(state.momentum), _pack(state.grad), state.count, state.segment)
    block = min(chunk_size, T)
    n_blocks = -(-T // block)
    pad = n_blocks * block - T

    def blocks(x):  # [B,T,H,...] -> [N,B,H,block,...] float32
        x = jnp.pad(x.astype(f32), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(B, n_blocks, block, *x.shape[2:])
        return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 2, 3)

    # Without segments or a carried count, every block starts on a chunk boundary and
    # holds a single segment, so the irregular branches cannot fire.
    may_post = block > 1 and (segment_ids is not None or initial_state is not None)
    may_start = block > 1 and segment_ids is not None
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    # Padding positions repeat the last segment id and are masked out by `valid`.
    seg = jnp.pad(segment_ids.astype(jnp.int32), [(0, 0), (0, pad)], mode="edge")
    seg = jnp.moveaxis(seg.reshape(B, n_blocks, block), 1, 0)
    valid = (jnp.arange(n_blocks * block) < T).reshape(n_blocks, block)
    xs = (blocks(q), blocks(k), blocks(v), blocks(lr), blocks(momentum), blocks(decay), seg, valid)

    step = jax.checkpoint(lambda c, x: _block_step(c, x, w0=_pack(w0), chunk_size=chunk_size,
                                                   may_post=may_post, may_start=may_start))
    (w, m, g, count, segment), reads = jax.lax.scan(step, carry, xs)
    final = TTTState(_unpack(w), _unpack(m), _unpack(g), count, segment)
    o = jnp.moveaxis(reads, 0, 1).transpose(0, 1, 3, 2, 4).reshape(B, n_blocks * block, H, D)[:, :T]
    if normalize:
        o = o * jax.lax.rsqrt(jnp.mean(o * o, axis=-1, keepdims=True) + eps)
    return o.astype(q.dtype), final
