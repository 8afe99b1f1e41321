"""Sliding-window flash attention: Pallas kernels for GPU (Triton backend).

Layout stays [B, T, H, D] (no transposes): each program owns one (batch, head,
block) and slices the keys/values/queries it needs straight from HBM with dynamic
`pl.ds` loads, so only blocks inside the window (plus sink blocks) are touched.
Scores use exp2 with log2(e) folded into the scale; the forward saves the base-2
log-sum-exp, which the backward uses to rebuild probabilities without a rescan.
Blocks where every (query, key) pair is visible skip the mask arithmetic.
On Hopper the forward is mosaic_gpu.py's kernel instead (`fwd_kernel`, see forward_kernel);
it writes the same output and log-sum-exp, so these backward kernels serve both.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.swa.common import (
    LOG2E,
    MASK_VALUE,
    flash_vjp,
    key_block_query_range,
    pad_time,
    padded_starts,
    round_up,
    visible,
)

F32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _dot(a, b, dims=_NN):
    return lax.dot_general(a, b, dims, preferred_element_type=F32)


def _query_block_loops(q0, first, last, body, carry, *, bq, bk, nk, window, sinks):
    """Runs body(j, carry, masked) over the key blocks query block [q0, q0+bq) needs."""
    q1 = q0 + bq
    lo_blk = lax.div(jnp.maximum(q0 - window + 1, first), bk)
    hi_blk = jnp.minimum(pl.cdiv(q1, bk), nk)
    full_lo = jnp.clip(pl.cdiv(jnp.maximum(q1 - window, last), bk), lo_blk, hi_blk)
    full_hi = jnp.clip(lax.div(q0 + 1, bk), full_lo, hi_blk)
    masked = functools.partial(body, masked=True)
    if sinks:
        sb0 = lax.div(first, bk)
        sb1 = jnp.minimum(pl.cdiv(first + sinks, bk), lo_blk)
        carry = lax.fori_loop(sb0, sb1, masked, carry)
    carry = lax.fori_loop(lo_blk, full_lo, masked, carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(full_hi, hi_blk, masked, carry)


def _fwd_kernel(starts_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale2, window, sinks,
                full_causal, bq, bk, nk):
    q0 = pl.program_id(2) * bq
    q = q_ref[...]
    qstart = starts_ref[pl.ds(q0, bq)]
    qpos = q0 + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)

    def body(j, carry, *, masked):
        acc, m, l = carry
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        s = _dot(q, k, _NT)  # unscaled: scale2 > 0 commutes with max, and folds into the FMA
        if masked:
            kpos = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
            s = jnp.where(visible(qpos, kpos, qstart[:, None], window, sinks, full_causal),
                          s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=1) * scale2)
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s * scale2 - m_new[:, None])
        l = alpha * l + p.sum(axis=1)
        acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
        return acc, m_new, l

    d = q.shape[-1]
    carry = (jnp.zeros((bq, d), F32), jnp.full((bq,), MASK_VALUE, F32), jnp.zeros((bq,), F32))
    acc, m, l = _query_block_loops(q0, qstart.min(), qstart.max(), body, carry, bq=bq, bk=bk,
                                   nk=nk, window=window, sinks=sinks)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log2(l)


def _dq_kernel(starts_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale,
               scale2, window, sinks, full_causal, bq, bk, nk):
    q0 = pl.program_id(2) * bq
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...][:, None]
    delta = delta_ref[...][:, None]
    qstart = starts_ref[pl.ds(q0, bq)]
    qpos = q0 + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)

    def body(j, dq, *, masked):
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        s = _dot(q, k, _NT)
        if masked:
            kpos = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
            s = jnp.where(visible(qpos, kpos, qstart[:, None], window, sinks, full_causal),
                          s, MASK_VALUE)
        p = jnp.exp2(s * scale2 - lse)
        ds = p * (_dot(do, v, _NT) - delta)
        return dq + _dot(ds.astype(k.dtype), k)

    dq = _query_block_loops(q0, qstart.min(), qstart.max(), body,
                            jnp.zeros(q.shape, F32), bq=bq, bk=bk, nk=nk, window=window,
                            sinks=sinks)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_kernel(starts_ref, qend_ref, fullend_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                 delta_ref, dk_ref, dv_ref, *, scale, scale2, window, sinks, full_causal,
                 groups, bq, bk, nq):
    j = pl.program_id(2)
    k0 = j * bk
    k = k_ref[...]
    v = v_ref[...]
    kpos = k0 + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
    # Query blocks [lo, hi) see this key block; [full_lo, full_hi) see all of it.
    lo = lax.div(k0, bq)
    hi = jnp.minimum(pl.cdiv(qend_ref[j], bq), nq)
    full_lo = jnp.clip(pl.cdiv(k0 + bk - 1, bq), lo, hi)
    full_hi = jnp.clip(lax.div(fullend_ref[j], bq), full_lo, hi)

    def make_body(g):
        def body(i, carry, *, masked):
            dk, dv = carry
            q = q_ref[pl.ds(i * bq, bq), g, :]
            do = do_ref[pl.ds(i * bq, bq), g, :]
            lse = lse_ref[g, pl.ds(i * bq, bq)][None, :]
            delta = delta_ref[g, pl.ds(i * bq, bq)][None, :]
            st = _dot(k, q, _NT)  # [bk, bq]: keys on rows
            if masked:
                qpos = i * bq + lax.broadcasted_iota(jnp.int32, (1, bq), 1)
                qstart = starts_ref[pl.ds(i * bq, bq)][None, :]
                st = jnp.where(visible(qpos, kpos, qstart, window, sinks, full_causal),
                               st, MASK_VALUE)
            pt = jnp.exp2(st * scale2 - lse)
            dv = dv + _dot(pt.astype(do.dtype), do)
            dst = pt * (_dot(v, do, _NT) - delta)
            dk = dk + _dot(dst.astype(q.dtype), q)
            return dk, dv
        return body

    carry = (jnp.zeros(k.shape, F32), jnp.zeros(v.shape, F32))
    for g in range(groups):
        body = make_body(g)
        masked = functools.partial(body, masked=True)
        carry = lax.fori_loop(lo, full_lo, masked, carry)
        carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
        carry = lax.fori_loop(full_hi, hi, masked, carry)
    dk, dv = carry
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _params(num_warps, num_stages, interpret):
    if interpret:
        return {"interpret": True}
    from jax.experimental.pallas import triton as plgpu
    return {"compiler_params": plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)}


def _forward(q, k, v, starts, cfg):
    if cfg["fwd_kernel"] == "mosaic":
        from pallas_kernels.swa.mosaic_gpu import swa_forward_mosaic
        return swa_forward_mosaic(q, k, v, starts, window=cfg["window"], sinks=cfg["sinks"],
                                  scale=cfg["scale"], block_q=cfg["mosaic_block_q"],
                                  block_kv=cfg["mosaic_block_kv"], stages=cfg["mosaic_stages"])
    b, tp, hq, d = q.shape
    hkv = k.shape[2]
    groups = hq // hkv
    bq, bk = cfg["block_q"], cfg["block_k"]
    kernel = functools.partial(
        _fwd_kernel, scale2=cfg["scale"] * LOG2E, window=cfg["window"], sinks=cfg["sinks"],
        full_causal=cfg["window"] >= tp, bq=bq, bk=bk, nk=tp // bk)
    return pl.pallas_call(
        kernel,
        grid=(b, hq, tp // bq),
        in_specs=[
            pl.BlockSpec((None, tp), lambda b_, h, i: (b_, 0)),
            pl.BlockSpec((None, bq, None, d), lambda b_, h, i: (b_, i, h, 0)),
            pl.BlockSpec((None, tp, None, d), lambda b_, h, i: (b_, 0, h // groups, 0)),
            pl.BlockSpec((None, tp, None, d), lambda b_, h, i: (b_, 0, h // groups, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bq, None, d), lambda b_, h, i: (b_, i, h, 0)),
            pl.BlockSpec((None, None, bq), lambda b_, h, i: (b_, h, i)),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, hq, tp), F32)],
        name="swa_fwd",
        **_params(cfg["num_warps"], cfg["num_stages"], cfg["interpret"]),
    )(starts, q, k, v)


def _backward(q, k, v, o, lse, do, starts, cfg):
    b, tp, hq, d = q.shape
    hkv = k.shape[2]
    groups = hq // hkv
    window, sinks = cfg["window"], cfg["sinks"]
    common = dict(scale=cfg["scale"], scale2=cfg["scale"] * LOG2E, window=window, sinks=sinks,
                  full_causal=window >= tp)
    # delta_t = sum_d o_td * do_td = sum_s p_ts dp_ts (the softmax-backward row term).
    delta = jnp.einsum("bthd,bthd->bht", o.astype(F32), do.astype(F32))
    bq, bk = cfg["dq_block_q"], cfg["dq_block_k"]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, bq=bq, bk=bk, nk=tp // bk, **common),
        grid=(b, hq, tp // bq),
        in_specs=[
            pl.BlockSpec((None, tp), lambda b_, h, i: (b_, 0)),
            pl.BlockSpec((None, bq, None, d), lambda b_, h, i: (b_, i, h, 0)),
            pl.BlockSpec((None, tp, None, d), lambda b_, h, i: (b_, 0, h // groups, 0)),
            pl.BlockSpec((None, tp, None, d), lambda b_, h, i: (b_, 0, h // groups, 0)),
            pl.BlockSpec((None, bq, None, d), lambda b_, h, i: (b_, i, h, 0)),
            pl.BlockSpec((None, None, bq), lambda b_, h, i: (b_, h, i)),
            pl.BlockSpec((None, None, bq), lambda b_, h, i: (b_, h, i)),
        ],
        out_specs=pl.BlockSpec((None, bq, None, d), lambda b_, h, i: (b_, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="swa_bwd_dq",
        **_params(cfg["dq_num_warps"], cfg["dq_num_stages"], cfg["interpret"]),
    )(starts, q, k, v, do, lse, delta)

    bq, bk = cfg["dkv_block_q"], cfg["dkv_block_k"]

    q_end, full_end = key_block_query_range(starts, window=window, sinks=sinks, block_k=bk)
    nk = tp // bk
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, groups=groups, bq=bq, bk=bk, nq=tp // bq, **common),
        grid=(b, hkv, nk),
        in_specs=[
            pl.BlockSpec((None, tp), lambda b_, h, j: (b_, 0)),
            pl.BlockSpec((None, nk), lambda b_, h, j: (b_, 0)),
            pl.BlockSpec((None, nk), lambda b_, h, j: (b_, 0)),
            pl.BlockSpec((None, tp, groups, d), lambda b_, h, j: (b_, 0, h, 0)),
            pl.BlockSpec((None, bk, None, d), lambda b_, h, j: (b_, j, h, 0)),
            pl.BlockSpec((None, bk, None, d), lambda b_, h, j: (b_, j, h, 0)),
            pl.BlockSpec((None, tp, groups, d), lambda b_, h, j: (b_, 0, h, 0)),
            pl.BlockSpec((None, groups, tp), lambda b_, h, j: (b_, h, 0)),
            pl.BlockSpec((None, groups, tp), lambda b_, h, j: (b_, h, 0)),
        ],
        out_specs=[pl.BlockSpec((None, bk, None, d), lambda b_, h, j: (b_, j, h, 0))] * 2,
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        name="swa_bwd_dkdv",
        **_params(cfg["dkv_num_warps"], cfg["dkv_num_stages"], cfg["interpret"]),
    )(starts, q_end, full_end, q, k, v, do, lse, delta)
    return dq, dk, dv


_swa = flash_vjp(_forward, _backward)

# Fastest of scripts/bench_swa.py --sweep on an H200 (D=128, window 4096, bf16).
DEFAULT_CONFIG = dict(block_q=128, block_k=128, num_warps=8, num_stages=3,
                      dq_block_q=64, dq_block_k=64, dq_num_warps=4, dq_num_stages=2,
                      dkv_block_q=64, dkv_block_k=64, dkv_num_warps=4, dkv_num_stages=2,
                      fwd_kernel="auto", mosaic_block_q=64, mosaic_block_kv=128, mosaic_stages=2)
BLOCK_KEYS = ("block_q", "block_k", "dq_block_q", "dq_block_k", "dkv_block_q", "dkv_block_k",
              "mosaic_block_kv")


def is_hopper():
    device = jax.devices()[0]
    capability = str(getattr(device, "compute_capability", ""))
    return device.platform == "gpu" and (capability.startswith("9.")
                                         or any(n in device.device_kind for n in ("H100", "H200")))


def forward_kernel(requested, dtype, head_dim, interpret):
    """'mosaic' or 'triton' for fwd_kernel='auto' | 'mosaic' | 'triton'.

    auto: the Mosaic GPU forward (mosaic_gpu.py: 1.3-1.4x faster than the Triton one, at
    cuDNN's speed, docs/benchmarks.md) where it applies: a Hopper GPU, bf16/fp16 and head_dim
    128; the Triton forward elsewhere and in interpret mode (Mosaic GPU has no CPU interpreter)."""
    if requested not in ("auto", "mosaic", "triton"):
        raise ValueError(f"swa_attention_gpu: fwd_kernel must be 'auto', 'mosaic' or 'triton', "
                         f"got {requested!r}")
    fits = dtype in (jnp.bfloat16, jnp.float16) and head_dim == 128
    if requested == "mosaic" and (interpret or not fits):
        raise ValueError("swa_attention_gpu(fwd_kernel='mosaic') needs a compiled (not interpreted) "
                         f"call with bf16/fp16 inputs and head_dim 128, got {jnp.dtype(dtype).name}, "
                         f"head_dim {head_dim}, interpret={interpret}")
    if requested == "auto":
        return "mosaic" if fits and not interpret and is_hopper() else "triton"
    return requested


def swa_attention_gpu(q, k, v, *, window, sinks, segment_ids, scale, interpret=False,
                      **overrides):
    """Validated inputs -> o [B, T, Hq, D]; pads T to the block size internally."""
    cfg = dict(DEFAULT_CONFIG, **overrides)
    b, t, _, d = q.shape
    # Triton tiles need power-of-two sizes: zero head-dim columns change no dot product.
    dp = max(16, 1 << (d - 1).bit_length())
    cfg["fwd_kernel"] = forward_kernel(cfg["fwd_kernel"], q.dtype, dp, interpret)
    tp = round_up(t, max([cfg[key] for key in BLOCK_KEYS] + [2 * cfg["mosaic_block_q"]]))
    starts = padded_starts(segment_ids, b, t, tp)
    cfg.update(window=min(window, tp), sinks=min(sinks, tp), scale=scale, interpret=interpret)
    q, k, v = (jnp.pad(pad_time(x, tp), ((0, 0), (0, 0), (0, 0), (0, dp - d))) for x in (q, k, v))
    o = _swa(q, k, v, starts, tuple(sorted(cfg.items())))
    return o[:, :t, :, :d]
