"""Forward KL and cross-entropy over [N, V] logit rows in two streaming passes (Pallas, Triton).

Distillation over a large vocabulary (Qwen3: V = 151,936) spends much of its loss time reading
float32 logit rows: XLA's log-softmax, KL and gradient fusions read the student's and the
teacher's [N, V] logits about ten times. Here each is read twice and the student's gradient is
written once, in the dtype its matmuls take:

    stats (grid: row blocks x vocabulary splits)  per split, online over its tiles of TV columns:
          max and sum of exp of s/tau and t/tau, sum of exp(t/tau - m_t) (t - s)/tau, and the
          max and sum of exp of s itself when cross-entropy meets tau != 1; the splits are then
          merged per row (`row_stats`).
    grad  (grid: row blocks x vocabulary tiles)   ds = g_kl (softmax(s/tau) - softmax(t/tau))
                                                     + g_ce (softmax(s) - onehot(label))

With p = softmax(t/tau), q = softmax(s/tau):  KL(p||q) = sum_v p_v (t_v - s_v)/tau - lse(t/tau)
+ lse(s/tau), and d[tau^2 KL]/ds = tau (q - p); CE = lse(s) - s_label, dCE/ds = softmax(s) - onehot.
A tile that would run past V is moved back to end at V, and the columns it shares with the
tile before are masked out of the sums (the gradient pass writes them twice, identically), so
no access leaves the array, whatever V is.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import multiprocessor_count

_NEG = -1e30  # running-max start: finite, so exp(_NEG - m) is 0 rather than exp(-inf + inf)


class RowStats(NamedTuple):
    """Per-row log-sum-exps and the KL cross term (all [N] float32; None where not asked)."""
    lse_s: jax.Array           # logsumexp(s / tau)
    lse_t: jax.Array | None    # logsumexp(t / tau)
    cross: jax.Array | None    # sum_v softmax(t/tau)_v (t_v - s_v) / tau
    lse_ce: jax.Array | None   # logsumexp(s) (cross-entropy; equals lse_s when tau == 1)


def _pow2_at_most(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


def _tiles(N, V, block_rows, block_v):
    """(rows, columns) of a tile: powers of two, the rows dividing N, the columns <= V."""
    BR = _pow2_at_most(min(block_rows, N))
    while N % BR:
        BR //= 2
    return BR, _pow2_at_most(min(block_v, V))


def _tile_window(j, V, TV):
    """Start of tile j (moved back to end at V) and the [., TV] mask of its columns not
    already covered by tile j - 1."""
    start = jnp.minimum(j * TV, V - TV)
    return start, lax.broadcasted_iota(jnp.int32, (1, TV), 1) + start >= j * TV


def _online(m, l, x):
    """One tile of a running (max, sum of exp) per row; x [BR, TV] with masked entries _NEG."""
    m_new = jnp.maximum(m, jnp.max(x, axis=1))
    return m_new, l * jnp.exp(m - m_new) + jnp.sum(jnp.exp(x - m_new[:, None]), axis=1)


def _stats_kernel(*refs, V, TV, tiles_per_split, inv_tau, kl, ce_raw):
    s_ref, *rest = refs
    t_ref = rest.pop(0) if kl else None
    outs = rest
    n_tiles = pl.cdiv(V, TV)
    lo = pl.program_id(1) * tiles_per_split
    hi = jnp.minimum(lo + tiles_per_split, n_tiles)
    BR = s_ref.shape[0]
    zero = jnp.zeros((BR,), jnp.float32)
    neg = jnp.full((BR,), _NEG, jnp.float32)

    def tile(j, carry):
        start, fresh = _tile_window(j, V, TV)
        s = s_ref[:, pl.ds(start, TV)].astype(jnp.float32)
        out = list(_online(carry[0], carry[1], jnp.where(fresh, s * inv_tau, _NEG)))
        if kl:
            m_t, l_t, a = carry[2:5]
            t = t_ref[:, pl.ds(start, TV)].astype(jnp.float32) * inv_tau
            m_new, l_new = _online(m_t, l_t, jnp.where(fresh, t, _NEG))
            e = jnp.where(fresh, jnp.exp(t - m_new[:, None]), 0.0)
            out += [m_new, l_new, a * jnp.exp(m_t - m_new) + jnp.sum(e * (t - s * inv_tau), axis=1)]
        if ce_raw:
            out += list(_online(carry[-2], carry[-1], jnp.where(fresh, s, _NEG)))
        return tuple(out)

    init = (neg, zero) + ((neg, zero, zero) if kl else ()) + ((neg, zero) if ce_raw else ())
    for ref, value in zip(outs, lax.fori_loop(lo, hi, tile, init), strict=True):
        ref[...] = value


def _merge(m, l):
    """(max, sum of exp) per split [N, S] -> logsumexp per row, and each split's rescale."""
    M = jnp.max(m, axis=1, keepdims=True)
    w = jnp.exp(m - M)
    return M[:, 0] + jnp.log(jnp.sum(l * w, axis=1)), w


# Tiles: [2 rows, 2048 columns] with 4 warps, from a sweep on an H200 (docs/benchmarks.md, "Logit
# loss"): 3.39 ms for both kernels at 4096 x 151,936 (77% of the copy bandwidth) against
# 7.76 ms at [8, 2048] (register spills) and 3.76 ms at [4, 1024].
BLOCK_ROWS, BLOCK_V, NUM_WARPS = 2, 2048, 4


def row_stats(s, t=None, *, temperature=1.0, ce=False, block_rows=BLOCK_ROWS, block_v=BLOCK_V, splits=None,
              num_warps=NUM_WARPS, num_stages=2, interpret=False) -> RowStats:
    """RowStats of student logits s [N, V] (and teacher logits t [N, V] for the KL terms).

    splits: vocabulary splits per row block (None: enough for about 4 programs per
    multiprocessor); block_rows / block_v: the [rows, columns] tile (powers of two; block_v is
    cut to the largest power of two <= V)."""
    N, V = s.shape
    kl = t is not None
    ce_raw = ce and temperature != 1.0
    BR, TV = _tiles(N, V, block_rows, block_v)
    n_tiles = pl.cdiv(V, TV)
    if splits is None:
        splits = max(1, min(n_tiles, -(-4 * multiprocessor_count() // (N // BR))))
    tps = pl.cdiv(n_tiles, splits)
    S = pl.cdiv(n_tiles, tps)
    rows = pl.BlockSpec((BR, V), lambda i, k: (i, 0))
    n_out = 2 + 3 * kl + 2 * ce_raw
    kern = functools.partial(_stats_kernel, V=V, TV=TV, tiles_per_split=tps, inv_tau=1.0 / temperature,
                             kl=kl, ce_raw=ce_raw)
    parts = pl.pallas_call(
        kern, grid=(N // BR, S),
        in_specs=[rows] * (1 + kl),
        out_specs=[pl.BlockSpec((None, BR), lambda i, k: (k, i))] * n_out,
        out_shape=[jax.ShapeDtypeStruct((S, N), jnp.float32)] * n_out,
        interpret=interpret, name="logit_loss_stats",
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
    )(s, *([t] if kl else []))
    parts = [p.T for p in parts]  # [N, S]
    lse_s, _ = _merge(parts[0], parts[1])
    lse_t = cross = None
    if kl:
        lse_t, w = _merge(parts[2], parts[3])
        cross = jnp.sum(parts[4] * w, axis=1) / jnp.sum(parts[3] * w, axis=1)
    lse_ce = (_merge(parts[-2], parts[-1])[0] if ce_raw else lse_s) if ce else None
    return RowStats(lse_s, lse_t, cross, lse_ce)


def _grad_kernel(*refs, V, TV, inv_tau, kl, ce):
    refs = list(refs)
    s_ref = refs.pop(0)
    if kl:
        t_ref, lse_s_ref, lse_t_ref, g_kl_ref = (refs.pop(0) for _ in range(4))
    if ce:
        lse_ce_ref, g_ce_ref, lab_ref = (refs.pop(0) for _ in range(3))
    (ds_ref,) = refs
    start, _ = _tile_window(pl.program_id(1), V, TV)
    cols = pl.ds(start, TV)
    s = s_ref[:, cols].astype(jnp.float32)
    d = jnp.zeros(s.shape, jnp.float32)
    if kl:
        t = t_ref[:, cols].astype(jnp.float32)
        q = jnp.exp(s * inv_tau - lse_s_ref[...][:, None])
        d = d + g_kl_ref[...][:, None] * (q - jnp.exp(t * inv_tau - lse_t_ref[...][:, None]))
    if ce:
        col = lax.broadcasted_iota(jnp.int32, s.shape, 1) + start
        onehot = jnp.where(col == lab_ref[...][:, None], 1.0, 0.0)
        d = d + g_ce_ref[...][:, None] * (jnp.exp(s - lse_ce_ref[...][:, None]) - onehot)
    ds_ref[:, cols] = d.astype(ds_ref.dtype)


def logits_grad(s, t, labels, stats: RowStats, g_kl=None, g_ce=None, *, temperature=1.0,
                out_dtype=jnp.float32, block_rows=BLOCK_ROWS, block_v=BLOCK_V, num_warps=NUM_WARPS, interpret=False):
    """ds [N, V] = g_kl (softmax(s/tau) - softmax(t/tau)) + g_ce (softmax(s) - onehot(labels)).

    g_kl / g_ce: per-row factors [N] (None drops the term; the KL term needs t and stats.lse_t,
    the CE term labels and stats.lse_ce)."""
    N, V = s.shape
    kl, ce = g_kl is not None, g_ce is not None
    if not (kl or ce):
        raise ValueError("logits_grad: give g_kl, g_ce or both")
    BR, TV = _tiles(N, V, block_rows, block_v)
    rows = pl.BlockSpec((BR, V), lambda i, j: (i, 0))
    vec = pl.BlockSpec((BR,), lambda i, j: (i,))
    args, specs = [s], [rows]
    if kl:
        args += [t, stats.lse_s, stats.lse_t, g_kl.astype(jnp.float32)]
        specs += [rows, vec, vec, vec]
    if ce:
        args += [stats.lse_ce, g_ce.astype(jnp.float32), labels.astype(jnp.int32)]
        specs += [vec, vec, vec]
    kern = functools.partial(_grad_kernel, V=V, TV=TV, inv_tau=1.0 / temperature, kl=kl, ce=ce)
    return pl.pallas_call(
        kern, grid=(N // BR, pl.cdiv(V, TV)), in_specs=specs,
        out_specs=pl.BlockSpec((BR, V), lambda i, j: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((N, V), out_dtype),
        interpret=interpret, name="logit_loss_grad",
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
    )(*args)
