"""Sliding-window flash attention: Pallas kernels for TPU (Mosaic).

Mosaic pipelines whole blocks through VMEM, so block skipping is done with scalar
prefetch: per query block, a table lists the key blocks it needs (sink blocks, then the
window), and the grid's last axis walks that table.  Steps past a block's count repeat
its last index (Mosaic skips the copy of an unchanged block) and do no work.  The
backward's dK/dV kernel walks, per key block, the contiguous range of query blocks
that see it.  Arrays are laid out [B, H, T, D] so blocks obey the (8, 128) tiling;
per-query scalars (document start, log-sum-exp, delta) travel as [.., T, 1] columns
for the row-major kernels and [.., 1, T] rows for the dK/dV kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.swa.common import (
    MASK_VALUE,
    flash_vjp,
    key_block_query_range,
    pad_time,
    padded_starts,
    round_up,
    visible,
)

F32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))


def _dot(a, b, dims=(((1,), (0,)), ((), ()))):
    return lax.dot_general(a, b, dims, preferred_element_type=F32)


def _key_tables(starts, *, window, sinks, bq, bk):
    """Per query block: key-block table [B, nq, S] and counts [B, nq] (int32)."""
    b, tp = starts.shape
    nq, nk = tp // bq, tp // bk
    q0 = jnp.arange(nq, dtype=jnp.int32) * bq
    first = starts[:, ::bq]
    lo_blk = jnp.maximum(q0 - window + 1, first) // bk
    hi_blk = jnp.minimum(-(-(q0 + bq) // bk), nk)
    n_win = hi_blk - lo_blk
    steps = min(nk, (window + bq - 3) // bk + 2 + ((sinks - 2) // bk + 2 if sinks else 0))
    s = jnp.arange(steps, dtype=jnp.int32)
    if sinks:
        sb0 = first // bk
        n_sink = jnp.maximum(jnp.minimum(-(-(first + sinks) // bk), lo_blk) - sb0, 0)
    else:
        sb0 = n_sink = jnp.zeros_like(first)
    count = n_sink + n_win
    blk = jnp.where(s < n_sink[..., None], sb0[..., None] + s,
                    lo_blk[..., None] + s - n_sink[..., None])
    blk = jnp.where(s < count[..., None], blk, (hi_blk - 1)[..., None])
    return blk.astype(jnp.int32), count.astype(jnp.int32)


def _query_tables(starts, *, window, sinks, bq, bk):
    """Per key block: query-block table [B, nk, S] and counts [B, nk] (int32)."""
    b, tp = starts.shape
    nq, nk = tp // bq, tp // bk
    q_end, _ = key_block_query_range(starts, window=window, sinks=sinks, block_k=bk)
    lo = (jnp.arange(nk, dtype=jnp.int32) * bk // bq)[None, :]
    hi = jnp.minimum(-(-q_end // bq), nq)
    count = hi - lo
    steps = nq if sinks else min(nq, (window + bk - 3) // bq + 2)
    s = jnp.arange(steps, dtype=jnp.int32)
    blk = jnp.where(s < count[..., None], lo[..., None] + s, (hi - 1)[..., None])
    return blk.astype(jnp.int32), count.astype(jnp.int32)


def _fwd_kernel(tbl_ref, cnt_ref, qstart_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
                m_sc, l_sc, acc_sc, *, scale, window, sinks, bq, bk, steps):
    b, i, s = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(s == 0)
    def _():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, F32)
        l_sc[...] = jnp.zeros(l_sc.shape, F32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, F32)

    @pl.when(s < cnt_ref[b, i])
    def _():
        qpos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
        kpos = tbl_ref[b, i, s] * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        sc = _dot(q_ref[...], k_ref[...], _NT)
        sc = jnp.where(visible(qpos, kpos, qstart_ref[...], window, sinks), sc, MASK_VALUE)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, sc.max(axis=1, keepdims=True) * scale)
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(sc * scale - m_new)
        l_sc[...] = alpha * l_sc[...] + p.sum(axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + _dot(p.astype(v_ref.dtype), v_ref[...])
        m_sc[...] = m_new

    @pl.when(s == steps - 1)
    def _():
        o_ref[...] = (acc_sc[...] / l_sc[...]).astype(o_ref.dtype)
        lse_ref[...] = m_sc[...] + jnp.log(l_sc[...])


def _dq_kernel(tbl_ref, cnt_ref, qstart_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               dq_ref, dq_sc, *, scale, window, sinks, bq, bk, steps):
    b, i, s = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(s == 0)
    def _():
        dq_sc[...] = jnp.zeros(dq_sc.shape, F32)

    @pl.when(s < cnt_ref[b, i])
    def _():
        qpos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
        kpos = tbl_ref[b, i, s] * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        k = k_ref[...]
        sc = _dot(q_ref[...], k, _NT)
        sc = jnp.where(visible(qpos, kpos, qstart_ref[...], window, sinks), sc, MASK_VALUE)
        p = jnp.exp(sc * scale - lse_ref[...])
        ds = p * (_dot(do_ref[...], v_ref[...], _NT) - delta_ref[...])
        dq_sc[...] += _dot(ds.astype(k.dtype), k)

    @pl.when(s == steps - 1)
    def _():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkdv_kernel(tbl_ref, cnt_ref, qstart_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                 dk_ref, dv_ref, dk_sc, dv_sc, *, scale, window, sinks, bq, bk, groups, steps):
    b, j, g, s = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((g == 0) & (s == 0))
    def _():
        dk_sc[...] = jnp.zeros(dk_sc.shape, F32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, F32)

    @pl.when(s < cnt_ref[b, j])
    def _():
        kpos = j * bk + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
        qpos = tbl_ref[b, j, s] * bq + lax.broadcasted_iota(jnp.int32, (1, bq), 1)
        q, do = q_ref[...], do_ref[...]
        st = _dot(k_ref[...], q, _NT)  # [bk, bq]: keys on rows, queries on lanes
        st = jnp.where(visible(qpos, kpos, qstart_ref[...], window, sinks), st, MASK_VALUE)
        pt = jnp.exp(st * scale - lse_ref[...])
        dv_sc[...] += _dot(pt.astype(do.dtype), do)
        dst = pt * (_dot(v_ref[...], do, _NT) - delta_ref[...])
        dk_sc[...] += _dot(dst.astype(q.dtype), q)

    @pl.when((g == groups - 1) & (s == steps - 1))
    def _():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _interpret_arg(interpret):
    if not interpret:
        return {}
    params = getattr(pltpu, "InterpretParams", None)
    return {"interpret": params() if params is not None else True}


def _compiler(semantics, interpret):
    if interpret:
        return _interpret_arg(True)
    return {"compiler_params": pltpu.CompilerParams(dimension_semantics=semantics)}


def _forward(q, k, v, starts, cfg):
    b, hq, tp, d = q.shape
    groups = hq // k.shape[1]
    bq, bk = cfg["block_q"], cfg["block_k"]
    window, sinks = cfg["window"], cfg["sinks"]
    tbl, cnt = _key_tables(starts, window=window, sinks=sinks, bq=bq, bk=bk)
    steps = tbl.shape[-1]
    kernel = functools.partial(_fwd_kernel, scale=cfg["scale"], window=window, sinks=sinks,
                               bq=bq, bk=bk, steps=steps)
    q_spec = pl.BlockSpec((None, None, bq, d), lambda b_, h, i, s, t, c: (b_, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d),
                           lambda b_, h, i, s, t, c: (b_, lax.div(h, groups), t[b_, i, s], 0))
    col_spec = pl.BlockSpec((None, None, bq, 1), lambda b_, h, i, s, t, c: (b_, h, i, 0))
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, hq, tp // bq, steps),
            in_specs=[pl.BlockSpec((None, bq, 1), lambda b_, h, i, s, t, c: (b_, i, 0)),
                      q_spec, kv_spec, kv_spec],
            out_specs=[q_spec, col_spec],
            scratch_shapes=[pltpu.VMEM((bq, 1), F32), pltpu.VMEM((bq, 1), F32),
                            pltpu.VMEM((bq, d), F32)]),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, hq, tp, 1), F32)],
        name="swa_fwd_tpu",
        **_compiler(("parallel", "parallel", "parallel", "arbitrary"), cfg["interpret"]),
    )(tbl, cnt, starts[..., None], q, k, v)


def _backward(q, k, v, o, lse, do, starts, cfg):
    b, hq, tp, d = q.shape
    hkv = k.shape[1]
    groups = hq // hkv
    window, sinks, scale = cfg["window"], cfg["sinks"], cfg["scale"]
    delta = jnp.einsum("bhtd,bhtd->bht", o.astype(F32), do.astype(F32))[..., None]

    bq, bk = cfg["dq_block_q"], cfg["dq_block_k"]
    tbl, cnt = _key_tables(starts, window=window, sinks=sinks, bq=bq, bk=bk)
    steps = tbl.shape[-1]
    q_spec = pl.BlockSpec((None, None, bq, d), lambda b_, h, i, s, t, c: (b_, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d),
                           lambda b_, h, i, s, t, c: (b_, lax.div(h, groups), t[b_, i, s], 0))
    col_spec = pl.BlockSpec((None, None, bq, 1), lambda b_, h, i, s, t, c: (b_, h, i, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, window=window, sinks=sinks, bq=bq, bk=bk,
                          steps=steps),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, hq, tp // bq, steps),
            in_specs=[pl.BlockSpec((None, bq, 1), lambda b_, h, i, s, t, c: (b_, i, 0)),
                      q_spec, kv_spec, kv_spec, q_spec, col_spec, col_spec],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bq, d), F32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="swa_bwd_dq_tpu",
        **_compiler(("parallel", "parallel", "parallel", "arbitrary"), cfg["interpret"]),
    )(tbl, cnt, starts[..., None], q, k, v, do, lse, delta)

    bq, bk = cfg["dkv_block_q"], cfg["dkv_block_k"]
    tbl, cnt = _query_tables(starts, window=window, sinks=sinks, bq=bq, bk=bk)
    steps = tbl.shape[-1]
    qh_spec = pl.BlockSpec(
        (None, None, bq, d), lambda b_, h, j, g, s, t, c: (b_, h * groups + g, t[b_, j, s], 0))
    row_spec = pl.BlockSpec(
        (None, None, 1, bq), lambda b_, h, j, g, s, t, c: (b_, h * groups + g, 0, t[b_, j, s]))
    kv_spec = pl.BlockSpec((None, None, bk, d), lambda b_, h, j, g, s, t, c: (b_, h, j, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, scale=scale, window=window, sinks=sinks, bq=bq, bk=bk,
                          groups=groups, steps=steps),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, hkv, tp // bk, groups, steps),
            in_specs=[pl.BlockSpec((None, 1, bq), lambda b_, h, j, g, s, t, c: (b_, 0, t[b_, j, s])),
                      qh_spec, kv_spec, kv_spec, qh_spec, row_spec, row_spec],
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[pltpu.VMEM((bk, d), F32), pltpu.VMEM((bk, d), F32)]),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        name="swa_bwd_dkdv_tpu",
        **_compiler(("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
                    cfg["interpret"]),
    )(tbl, cnt, starts[:, None, :], q, k, v, do, lse.reshape(b, hq, 1, tp),
      delta.reshape(b, hq, 1, tp))
    return dq, dk, dv


_swa = flash_vjp(_forward, _backward)

DEFAULT_CONFIG = dict(block_q=512, block_k=512, dq_block_q=512, dq_block_k=512,
                      dkv_block_q=512, dkv_block_k=512)


def swa_attention_tpu(q, k, v, *, window, sinks, segment_ids, scale, interpret=False,
                      **overrides):
    """Validated inputs -> o [B, T, Hq, D]; pads T to the block size internally."""
    cfg = dict(DEFAULT_CONFIG, **overrides)
    b, t = q.shape[:2]
    blocks = max(cfg.values())
    if not interpret and any(v_ % 128 for v_ in cfg.values()):
        raise ValueError(f"swa_attention(backend='pallas_tpu'): block sizes must be multiples "
                         f"of 128 on TPU, got {cfg}")
    # Short sequences need no 512-row blocks; shrink to one 128-aligned block.
    tp = round_up(t, blocks)
    if not overrides and t < blocks:
        tp = round_up(t, 128)
        cfg = {key: tp for key in cfg}
    starts = padded_starts(segment_ids, b, t, tp)
    cfg.update(window=min(window, tp), sinks=min(sinks, tp), scale=scale, interpret=interpret)
    qt, kt, vt = (pad_time(x, tp).transpose(0, 2, 1, 3) for x in (q, k, v))
    o = _swa(qt, kt, vt, starts, tuple(sorted(cfg.items())))
    return o.transpose(0, 2, 1, 3)[:, :t]
