"""Padding and block metadata shared by the GPU and TPU kernels.

Both kernels implement the rule of ``reference.py`` with per-query document starts
(``starts[t]``, nondecreasing in t).  A query block [q0, q1) needs keys from
    window part: [max(q0 - window + 1, starts[q0]), q1)
    sink part:   [starts[q0], starts[q0] + sinks)
(documents that begin inside the block have their sinks inside [q0, q1) already),
so cost grows with T * (window + sinks), not T^2.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.swa.reference import segment_starts

LOG2E = 1.4426950408889634
# Finite, so a row whose keys are all masked in one block gives exp2(MASK - m) = 0
# later instead of inf - inf; every query sees itself, so each row ends with a real max.
MASK_VALUE = -1e30


def visible(qpos, kpos, qstart, window, sinks, full_causal=False):
    """The rule of reference.py on broadcastable in-kernel arrays of query positions, key
    positions and the queries' document starts; `full_causal` (window >= T, no sinks) skips the
    window test."""
    vis = (kpos >= qstart) & (kpos <= qpos)
    if full_causal and not sinks:
        return vis
    near = qpos - kpos < window
    if sinks:
        near = near | (kpos < qstart + sinks)
    return vis & near


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def pad_time(x, length):
    pad = length - x.shape[1]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths)


def padded_starts(segment_ids, batch, length, padded_length):
    """Document starts [B, Tp] int32; the padded tail is one extra document."""
    starts = segment_starts(segment_ids, batch, length)
    if padded_length > length:
        tail = jnp.full((batch, padded_length - length), length, jnp.int32)
        starts = jnp.concatenate([starts, tail], axis=1)
    return starts


def document_ends(starts):
    """One past the last token of each token's document, int32 [B, Tp]."""
    length = starts.shape[1]
    pos = jnp.arange(length, dtype=jnp.int32)
    is_last = jnp.concatenate(
        [starts[:, 1:] != starts[:, :-1], jnp.ones((starts.shape[0], 1), bool)], axis=1)
    # Reverse cumulative min over "my index + 1 if I end a document".
    cand = jnp.where(is_last, pos[None, :] + 1, length)
    return jax.lax.cummin(cand, axis=1, reverse=True)


def key_block_query_range(starts, *, window, sinks, block_k):
    """Per key block j: (q_end, full_end), int32 [B, nk] each.

    q_end: queries >= q_end never see block j (window reach, sinks' documents, and
      the document of the block's last key bound it).
    full_end: queries t with t < full_end and t >= the block's last key see every
      key of the block (used to skip masking).
    """
    b, length = starts.shape
    nk = length // block_k
    pos = jnp.arange(length, dtype=jnp.int32)
    ends = document_ends(starts)
    k0 = pos[::block_k]
    k1 = k0 + block_k
    reach = jnp.minimum(k1 - 1 + window, length)[None, :]
    if sinks:
        is_sink = (pos[None, :] - starts) < sinks
        sink_reach = jnp.where(is_sink, ends, 0).reshape(b, nk, block_k).max(-1)
        reach = jnp.maximum(reach, sink_reach)
    q_end = jnp.minimum(reach, ends[:, block_k - 1::block_k])
    full_end = jnp.minimum(k0[None, :] + window, ends[:, ::block_k])
    return q_end.astype(jnp.int32), full_end.astype(jnp.int32)


def flash_vjp(forward, backward):
    """`f(q, k, v, starts, cfg)` with a custom VJP from a kernel pair: `forward(q, k, v, starts,
    cfg) -> (o, lse)` and `backward(q, k, v, o, lse, do, starts, cfg) -> (dq, dk, dv)`.
    `cfg` is a hashable tuple of settings (passed to the kernels as a dict)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
    def f(q, k, v, starts, cfg):
        return forward(q, k, v, starts, dict(cfg))[0]

    def fwd(q, k, v, starts, cfg):
        o, lse = forward(q, k, v, starts, dict(cfg))
        return o, (q, k, v, o, lse, starts)

    def bwd(cfg, res, do):
        q, k, v, o, lse, starts = res
        return (*backward(q, k, v, o, lse, do, starts, dict(cfg)), None)

    f.defvjp(fwd, bwd)
    return f
