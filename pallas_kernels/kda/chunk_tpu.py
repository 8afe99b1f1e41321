"""Kimi Delta Attention, chunked Pallas kernels for TPU (Mosaic): forward and backward.

Per head, with the state S_t in R^{K x V} (see reference.py for the definition):

    S_t = (I - b_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + b_t k_t v_t^T,    o_t = S_t^T (scale q_t)

Inside a chunk of C tokens, with G the in-chunk cumulative sum of g (inclusive), S0 the
state entering the chunk and rows indexed by tokens:

    At[t,s] = sum_c k_t[c] k_s[c] exp(G_t[c] - G_s[c])     s < t   (pairwise decay products)
    P[t,s]  = sum_c q_t[c] k_s[c] exp(G_t[c] - G_s[c])     s <= t
    D       = (I + diag(b) At)^-1 diag(b) (V - (k*exp(G)) S0)      (UT transform)
    O       = (q*exp(G)) S0 + P D
    S1      = exp(G_C) * S0 + (k*exp(G_C - G))^T D

Design points (all for Mosaic TPU):
* Grid (batch, head, chunk); the chunk axis is "arbitrary" and the fp32 state lives in a
  VMEM scratch across it. The state is kept transposed (V x K) so that the per-channel
  decay is a row broadcast, never a vector transpose.
* The pairwise products are never formed as a [C, C, K] tensor. Rows are split into
  sub-blocks of 16 tokens: the part left of a sub-block is one MXU matmul, factorised
  through the last token r before the sub-block, exp(G_t - G_r) * exp(G_r - G_s), whose
  exponents are both <= 0 because s <= r < t; the 16 x 16 diagonal block is built column by
  column on the VPU, with the exponent masked to 0 above the diagonal before exp. No
  exponent is ever positive (for g <= 0, as the gate guarantees).
* Every exponent is a sum of g over exactly the tokens it spans (masked matmuls for the
  sub-block tables, running sums in the diagonal loops), never a difference of two
  in-chunk prefix sums: under strong decay |G| reaches hundreds and eps * |G| would
  swamp a small exponent (1.5e-6 vs 1.5e-7 RMS error against a float64 oracle).
* (I + A)^-1 for strictly lower-triangular A is the doubling product
  (I - A)(I + A^2)(I + A^4)... (log2 C factors): 2 log2(C) - 2 matmuls on the MXU instead
  of C dependent row substitutions. Cumulative sums are matmuls with triangular masks too.
* The backward pass recomputes the chunk-start states with the forward kernel
  ("states" mode), then runs the chunks in reverse carrying dS in VMEM, recomputing every
  in-chunk intermediate; nothing but the inputs is saved from the forward pass.
* segment_ids reset the state at every change of id (the initial state belongs to the
  segment of the first token): pairs across a change are masked, the state entering a
  chunk reaches only tokens of the segment it came from, and only tokens of the chunk's
  last segment reach the state leaving it.
* Inputs are padded in the wrapper: K and V to a multiple of 128 lanes (zero channels do
  not change the result), T to a multiple of C with zero tokens (b = 0, g = 0: the state
  passes through unchanged). All arithmetic is float32 whatever the input dtype.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.kda.reference import L2NORM_EPS
from pallas_kernels.kda.validate import validate_kda_inputs

_SUB = 16  # sub-block of the pairwise-decay products (diagonal blocks are built on the VPU)
_LANES = 128
_F32 = jnp.float32


# ----------------------------------------------------------------------------- helpers


def _mm(a, b, dims):
    return lax.dot_general(a, b, (dims, ((), ())), precision=lax.Precision.HIGHEST,
                           preferred_element_type=_F32)


def _dot(a, b):  # a @ b
    return _mm(a, b, ((1,), (0,)))


def _dot_nt(a, b):  # a @ b.T
    return _mm(a, b, ((1,), (1,)))


def _dot_tn(a, b):  # a.T @ b
    return _mm(a, b, ((0,), (0,)))


def _iota(shape, axis):
    return lax.broadcasted_iota(jnp.int32, shape, axis)


def _row(ref, i):
    return ref[pl.ds(i, 1), :]


class _Exps(NamedTuple):
    """VMEM tables of in-chunk log-decay sums. Every exponent used by the pairwise products is
    a sum of g over exactly the tokens between the pair (a masked matmul or a running sum),
    never a difference of two long prefix sums, whose rounding (eps * |G|, with |G| in the
    hundreds under strong decay) would swamp a small exponent."""
    g: object    # [C, K]  g itself (float32)
    lp: object   # [C, K]  sum of g from the token's sub-block start to the token (inclusive)
    ls: object   # [C, K]  sum of g after the token to its sub-block end (backward only)
    suf: object  # [nb*C, K] block i: sum of g over (s, start_i - 1] for s < start_i
    pre: object  # [nb*C, K] block j: sum of g over (end_j, t] for t > end_j (backward only)


def _fill_exps(ex, C, *, backward):
    g = ex.g[...]
    r, c = _iota((C, C), 0), _iota((C, C), 1)
    same_block = lax.div(r, _SUB) == lax.div(c, _SUB)  # jnp // lowers via sign, whose
    # Mosaic rule asks the attached TPU for its generation (breaks export from CPU)
    ex.lp[...] = _dot((same_block & (c <= r)).astype(_F32), g)
    if backward:
        ex.ls[...] = _dot((same_block & (c > r)).astype(_F32), g)
    # Rows of suf (block 0) and pre (last block) that are never written are never selected:
    # the products mask them with `where` (no token before block 0 / after the last block).
    for i in range(1, C // _SUB):
        lo = i * _SUB
        ex.suf[pl.ds(i * C, C), :] = _dot(((c > r) & (c < lo)).astype(_F32), g)
        if backward:  # block i - 1 ends at lo - 1
            ex.pre[pl.ds((i - 1) * C, C), :] = _dot(((c >= lo) & (c <= r)).astype(_F32), g)


def _pairwise(a_ref, b_ref, ex, out_ref, *, strict):
    """out[t,s] = sum_c a_t[c] b_s[c] exp(G_t[c] - G_s[c]) for s < t (strict) or s <= t."""
    C = a_ref.shape[0]
    b = b_ref[...]
    rows = _iota((C, 1), 0)
    lane = _iota((_SUB, C), 1)

    def sub_block(i, carry):
        lo = pl.multiple_of(i * _SUB, _SUB)
        a_i = a_ref[pl.ds(lo, _SUB), :]
        # Columns s < lo through the token r = lo - 1 (all zero for the first block):
        # exp(G_t - G_r) = exp(lp_t), exp(G_r - G_s) = exp(suf_i[s]).
        before = rows < lo
        suf = ex.suf[pl.ds(pl.multiple_of(i * C, C), C), :]
        right = jnp.where(before, b * jnp.exp(jnp.where(before, suf, 0.0)), 0.0)
        acc = _dot_nt(a_i * jnp.exp(ex.lp[pl.ds(lo, _SUB), :]), right)
        t = _iota((_SUB, 1), 0) + lo

        def diag_column(j, carry):  # s runs down the sub-block; e[t] = sum of g over (s, t]
            acc, e = carry
            s = lo + _SUB - 1 - j
            valid = t > s if strict else t >= s
            w = jnp.exp(jnp.where(valid, e, 0.0))
            col = jnp.sum(a_i * _row(b_ref, s) * w, axis=-1, keepdims=True)
            acc = jnp.where(lane == s, jnp.where(valid, col, 0.0), acc)
            return acc, e + jnp.where(t >= s, _row(ex.g, s), 0.0)

        e0 = jnp.zeros_like(a_i)
        out_ref[pl.ds(lo, _SUB), :] = lax.fori_loop(0, _SUB, diag_column, (acc, e0))[0]
        return carry

    lax.fori_loop(0, C // _SUB, sub_block, 0)


def _pairwise_rows_bwd(dm_ref, b_ref, ex, out_ref):
    """out[t] = sum_{s<=t} dM[t,s] b_s exp(G_t - G_s)  (dM is zero above the diagonal)."""
    C = dm_ref.shape[0]
    b = b_ref[...]
    rows = _iota((C, 1), 0)
    lane = _iota((_SUB, C), 1)

    def sub_block(i, carry):
        lo = pl.multiple_of(i * _SUB, _SUB)
        dm_i = dm_ref[pl.ds(lo, _SUB), :]
        before = rows < lo
        suf = ex.suf[pl.ds(pl.multiple_of(i * C, C), C), :]
        right = jnp.where(before, b * jnp.exp(jnp.where(before, suf, 0.0)), 0.0)
        x = jnp.exp(ex.lp[pl.ds(lo, _SUB), :]) * _dot(dm_i, right)
        t = _iota((_SUB, 1), 0) + lo

        def diag_column(j, carry):
            x, e = carry
            s = lo + _SUB - 1 - j
            col = jnp.sum(jnp.where(lane == s, dm_i, 0.0), axis=-1, keepdims=True)
            w = jnp.exp(jnp.where(t >= s, e, 0.0))
            return x + col * _row(b_ref, s) * w, e + jnp.where(t >= s, _row(ex.g, s), 0.0)

        out_ref[pl.ds(lo, _SUB), :] = lax.fori_loop(0, _SUB, diag_column,
                                                    (x, jnp.zeros_like(x)))[0]
        return carry

    lax.fori_loop(0, C // _SUB, sub_block, 0)
    return out_ref[...]


def _pairwise_cols_bwd(dmt_ref, a_ref, ex, out_ref):
    """out[s] = sum_{t>=s} dM[t,s] a_t exp(G_t - G_s), given dMt = dM^T (zero below diagonal)."""
    C = dmt_ref.shape[0]
    a = a_ref[...]
    rows = _iota((C, 1), 0)
    lane = _iota((_SUB, C), 1)

    def sub_block(j, carry):
        lo = pl.multiple_of(j * _SUB, _SUB)
        dmt_j = dmt_ref[pl.ds(lo, _SUB), :]
        # Rows t > r through r = the sub-block's last token (all zero for the last block):
        # exp(G_t - G_r) = exp(pre_j[t]), exp(G_r - G_s) = exp(ls_s).
        after = rows > lo + _SUB - 1
        pre = ex.pre[pl.ds(pl.multiple_of(j * C, C), C), :]
        right = jnp.where(after, a * jnp.exp(jnp.where(after, pre, 0.0)), 0.0)
        y = jnp.exp(ex.ls[pl.ds(lo, _SUB), :]) * _dot(dmt_j, right)
        s = _iota((_SUB, 1), 0) + lo

        def diag_column(i, carry):  # t runs up the sub-block; e[s] = sum of g over (s, t]
            y, e = carry
            t = lo + i
            e = e + jnp.where(s < t, _row(ex.g, t), 0.0)
            col = jnp.sum(jnp.where(lane == t, dmt_j, 0.0), axis=-1, keepdims=True)
            w = jnp.exp(jnp.where(s <= t, e, 0.0))
            return y + col * _row(a_ref, t) * w, e

        out_ref[pl.ds(lo, _SUB), :] = lax.fori_loop(0, _SUB, diag_column,
                                                    (y, jnp.zeros_like(y)))[0]
        return carry

    lax.fori_loop(0, C // _SUB, sub_block, 0)
    return out_ref[...]


def _unit_lower_inverse(a):
    """(I + a)^-1 for strictly lower-triangular a: (I - a)(I + a^2)(I + a^4)... on the MXU."""
    C = a.shape[0]
    eye = (_iota((C, C), 0) == _iota((C, C), 1)).astype(_F32)
    power = -a
    inv = eye + power
    for _ in range(int(math.log2(C)) - 1):
        power = _dot(power, power)
        inv = inv + _dot(inv, power)
    return inv


def _l2norm(x):
    rinv = lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2NORM_EPS)
    return x * rinv, rinv


class _Cfg(NamedTuple):
    chunk: int
    scale: float
    l2norm: bool
    segmented: bool
    interpret: object  # False or a pltpu.InterpretParams


class _Chunk(NamedTuple):
    """In-chunk quantities shared by the forward and backward kernels."""
    q: jax.Array      # normalised q (before scale)
    q_rinv: jax.Array
    k: jax.Array
    k_rinv: jax.Array
    beta: jax.Array   # [C, 1]
    At: jax.Array     # pairwise k.k decay products, strict, masked to the segment
    Tinv: jax.Array   # (I + diag(beta) At)^-1
    eG: jax.Array     # exp(G), zero for tokens the entering state does not reach
    W: jax.Array      # V - (k eG) S0
    D: jax.Array      # Tinv diag(beta) W
    dec: jax.Array    # [1, K] decay of the entering state across the chunk
    ed: jax.Array     # exp(G_C - G), zero for tokens not in the chunk's last segment


class _Scratch(NamedTuple):
    qs: object  # [C, K] normalised, scaled q
    k: object   # [C, K] normalised k
    ex: _Exps
    a: object   # [C, C] pairwise k.k decay products
    p: object   # [C, C] pairwise q.k decay products


def _chunk_math(cfg, ins, seg, scr, St, *, with_p, backward):
    """Recompute the chunk from its inputs (and fill the scratch tables)."""
    q_ref, k_ref, v_ref, g_ref, b_ref = ins
    C = cfg.chunk
    q = q_ref[...].astype(_F32)
    k = k_ref[...].astype(_F32)
    q_rinv = k_rinv = None
    if cfg.l2norm:
        q, q_rinv = _l2norm(q)
        k, k_rinv = _l2norm(k)
    scr.qs[...] = q * cfg.scale
    scr.k[...] = k
    g = g_ref[...].astype(_F32)
    scr.ex.g[...] = g
    _fill_exps(scr.ex, C, backward=backward)
    r, c = _iota((C, C), 0), _iota((C, C), 1)
    same = None
    if seg is not None:
        dcol_ref, drow_ref, carry_ref, toend_ref = seg
        same = dcol_ref[...] == drow_ref[...]  # [C,1] == [1,C]
    _pairwise(scr.k, scr.k, scr.ex, scr.a, strict=True)
    At = scr.a[...]
    if with_p:
        _pairwise(scr.qs, scr.k, scr.ex, scr.p, strict=False)
    if same is not None:
        At = jnp.where(same, At, 0.0)
        scr.a[...] = At
        if with_p:
            scr.p[...] = jnp.where(same, scr.p[...], 0.0)
    beta = b_ref[...].astype(_F32)
    Tinv = _unit_lower_inverse(beta * At)
    # Decays from the chunk start (inclusive) and to the chunk end (exclusive), both sums of
    # g over exactly the tokens concerned (cumulative sums on the MXU).
    eG = jnp.exp(_dot((c <= r).astype(_F32), g))
    ed = jnp.exp(_dot((c > r).astype(_F32), g))
    dec = jnp.exp(jnp.sum(g, axis=0, keepdims=True))
    if seg is not None:
        eG = eG * carry_ref[...]
        dec = dec * _row(carry_ref, C - 1)
        ed = ed * toend_ref[...]
    W = v_ref[...].astype(_F32) - _dot_nt(k * eG, St)
    D = _dot(Tinv, beta * W)
    return _Chunk(q, q_rinv, k, k_rinv, beta, At, Tinv, eG, W, D, dec, ed)


# ----------------------------------------------------------------------------- kernels


def _fwd_kernel(*refs, cfg, emit_states):
    n_seg = 4 if cfg.segmented else 0
    ins, h0_ref = refs[:5], refs[5]
    seg = refs[6:6 + n_seg] or None
    rest = refs[6 + n_seg:]
    n_out = 1 if emit_states else 2
    outs = rest[:n_out]
    s_ref, qs_s, k_s, g_s, lp_s, suf_s, a_s, p_s = rest[n_out:]
    scr = _Scratch(qs_s, k_s, _Exps(g_s, lp_s, None, suf_s, None), a_s, p_s)
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _():
        s_ref[...] = h0_ref[...]

    St = s_ref[...]  # [V, K]: the state entering this chunk, transposed
    ch = _chunk_math(cfg, ins, seg, scr, St, with_p=not emit_states, backward=False)
    new_St = St * ch.dec + _dot_tn(ch.D, ch.k * ch.ed)
    s_ref[...] = new_St
    if emit_states:
        outs[0][...] = St
        return
    o_ref, ht_ref = outs
    o = _dot_nt(qs_s[...] * ch.eG, St) + _dot(p_s[...], ch.D)
    o_ref[...] = o.astype(o_ref.dtype)

    @pl.when(i == pl.num_programs(2) - 1)
    def _():
        ht_ref[...] = new_St


def _bwd_kernel(*refs, cfg):
    n_seg = 4 if cfg.segmented else 0
    ins = refs[:5]
    brow_ref, h_ref, do_ref, dht_ref = refs[5:9]
    seg = refs[9:9 + n_seg] or None
    (dq_ref, dk_ref, dv_ref, dg_ref, db_ref, dh0_ref, ds_ref, qs_s, k_s, g_s, lp_s, ls_s, x_s,
     suf_s, pre_s, a_s, p_s, dm_s, dmt_s) = refs[9 + n_seg:]
    ex = _Exps(g_s, lp_s, ls_s, suf_s, pre_s)
    scr = _Scratch(qs_s, k_s, ex, a_s, p_s)
    C = cfg.chunk
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _():
        ds_ref[...] = dht_ref[...]

    St = h_ref[...]
    dSt = ds_ref[...]  # gradient w.r.t. the state leaving this chunk, transposed
    ch = _chunk_math(cfg, ins, seg, scr, St, with_p=True, backward=True)
    qs = qs_s[...]
    k = ch.k
    Qg = qs * ch.eG
    Kg = k * ch.eG
    Kd = k * ch.ed
    dO = do_ref[...].astype(_F32)
    D = ch.D

    dD = _dot_tn(p_s[...], dO) + _dot_nt(Kd, dSt)
    dU = _dot_tn(ch.Tinv, dD)
    r, c = _iota((C, C), 0), _iota((C, C), 1)
    lower, upper = r > c, r < c
    if seg is not None:
        same = seg[0][...] == seg[1][...]
        lower, upper = lower & same, upper & same
    dA = jnp.where(lower, -_dot_nt(dU, D), 0.0)
    dAt = jnp.where(upper, -_dot_nt(D, dU), 0.0)  # dA^T
    db_ref[...] = (jnp.sum(ch.W * dU, axis=-1, keepdims=True)
                   + jnp.sum(dA * ch.At, axis=-1, keepdims=True))
    dW = ch.beta * dU
    dv_ref[...] = dW
    dKg = -_dot(dW, St)
    dQg = _dot(dO, St)
    dKd = _dot(D, dSt)
    # dg gathers dG (the gradient w.r.t. the cumulative G) by a reverse cumsum. Two terms go
    # straight to dg instead, because as +x at one row and -x at another of dG they would
    # leave rounding noise of size x that swamps a true dg of size exp(-20) under strong
    # decay: Kd = k exp(G_C - G_t) depends on g_{t+1..C} only (an exclusive forward cumsum),
    # and the diagonal of P has exponent 0 (no g at all).
    kdk = Kd * dKd
    dG_last = ch.dec * jnp.sum(St * dSt, axis=0, keepdims=True)
    ds_ref[...] = dSt * ch.dec + _dot_tn(dO, Qg) - _dot_tn(dW, Kg)

    # Gradients through P (q side rows, k side columns; the diagonal apart) ...
    dP_diag = jnp.sum(dO * D, axis=-1, keepdims=True)
    dm_s[...] = jnp.where(lower, _dot_nt(dO, D), 0.0)
    dmt_s[...] = jnp.where(upper, _dot_nt(D, dO), 0.0)
    xp = _pairwise_rows_bwd(dm_s, k_s, ex, x_s)
    yp = _pairwise_cols_bwd(dmt_s, qs_s, ex, x_s)
    # ... and through At = k.k decay products (scaled by beta of the row token).
    dm_s[...] = ch.beta * dA
    dmt_s[...] = dAt * brow_ref[...].astype(_F32)
    xa = _pairwise_rows_bwd(dm_s, k_s, ex, x_s)
    ya = _pairwise_cols_bwd(dmt_s, k_s, ex, x_s)

    dqs = dQg * ch.eG + xp + dP_diag * k
    dk = dKg * ch.eG + dKd * ch.ed + yp + xa + ya + dP_diag * qs
    dG = Qg * dQg + Kg * dKg + qs * xp + k * (xa - yp - ya)
    dG = dG + jnp.where(_iota((C, 1), 0) == C - 1, dG_last, 0.0)
    dg_ref[...] = _dot((r <= c).astype(_F32), dG) + _dot((r > c).astype(_F32), kdk)
    dq = dqs * cfg.scale
    if cfg.l2norm:
        dq = (dq - ch.q * jnp.sum(ch.q * dq, axis=-1, keepdims=True)) * ch.q_rinv
        dk = (dk - k * jnp.sum(k * dk, axis=-1, keepdims=True)) * ch.k_rinv
    dq_ref[...] = dq
    dk_ref[...] = dk

    @pl.when(i == pl.num_programs(2) - 1)
    def _():
        dh0_ref[...] = ds_ref[...]


# ----------------------------------------------------------------------------- pallas_call


def _params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _scratch(cfg, Kp, Vp, *, backward):
    """State (V, K); [C, K] tables; [nb*C, K] boundary sums; [C, C] pairwise matrices."""
    C = cfg.chunk
    n_ck, n_tab, n_cc = (6, 2, 4) if backward else (4, 1, 2)
    return ([pltpu.VMEM((Vp, Kp), _F32)] + [pltpu.VMEM((C, Kp), _F32)] * n_ck
            + [pltpu.VMEM((C // _SUB * C, Kp), _F32)] * n_tab + [pltpu.VMEM((C, C), _F32)] * n_cc)


def _seg_specs(C, chunk_of):
    col = pl.BlockSpec((None, C, 1), lambda b, h, i: (b, chunk_of(i), 0))
    row = pl.BlockSpec((None, None, 1, C), lambda b, h, i: (b, chunk_of(i), 0, 0))
    return [col, row, col, col]


def _forward(cfg, q, k, v, g, beta_col, h0, seg, *, emit_states):
    B, H, Tp, Kp = q.shape
    Vp = v.shape[-1]
    C = cfg.chunk
    n = Tp // C
    ident = lambda i: i
    tok = lambda d: pl.BlockSpec((None, None, C, d), lambda b, h, i: (b, h, i, 0))
    state = pl.BlockSpec((None, None, Vp, Kp), lambda b, h, i: (b, h, 0, 0))
    in_specs = [tok(Kp), tok(Kp), tok(Vp), tok(Kp), tok(1), state]
    args = [q, k, v, g, beta_col, h0]
    if seg is not None:
        in_specs += _seg_specs(C, ident)
        args += list(seg)
    if emit_states:
        out_shape = jax.ShapeDtypeStruct((B, H, n, Vp, Kp), _F32)
        out_specs = pl.BlockSpec((None, None, None, Vp, Kp), lambda b, h, i: (b, h, i, 0, 0))
    else:
        out_shape = (jax.ShapeDtypeStruct((B, H, Tp, Vp), v.dtype),
                     jax.ShapeDtypeStruct((B, H, Vp, Kp), _F32))
        out_specs = (tok(Vp), state)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, emit_states=emit_states),
        grid=(B, H, n), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=_scratch(cfg, Kp, Vp, backward=False), compiler_params=_params(),
        interpret=cfg.interpret, name="kda_fwd_states" if emit_states else "kda_fwd",
    )(*args)


def _backward(cfg, q, k, v, g, beta_col, h, do, dht, seg):
    B, H, Tp, Kp = q.shape
    Vp = v.shape[-1]
    C = cfg.chunk
    n = Tp // C
    rev = lambda i: n - 1 - i
    tok = lambda d: pl.BlockSpec((None, None, C, d), lambda b, h, i: (b, h, rev(i), 0))
    state = pl.BlockSpec((None, None, Vp, Kp), lambda b, h, i: (b, h, 0, 0))
    beta_row = beta_col.reshape(B, H, n, 1, C)
    in_specs = [tok(Kp), tok(Kp), tok(Vp), tok(Kp), tok(1),
                pl.BlockSpec((None, None, None, 1, C), lambda b, h, i: (b, h, rev(i), 0, 0)),
                pl.BlockSpec((None, None, None, Vp, Kp), lambda b, h, i: (b, h, rev(i), 0, 0)),
                tok(Vp), state]
    args = [q, k, v, g, beta_col, beta_row, h, do, dht]
    if seg is not None:
        in_specs += _seg_specs(C, rev)
        args += list(seg)
    f32 = lambda d: jax.ShapeDtypeStruct((B, H, Tp, d), _F32)
    out_shape = (f32(Kp), f32(Kp), f32(Vp), f32(Kp), f32(1),
                 jax.ShapeDtypeStruct((B, H, Vp, Kp), _F32))
    out_specs = (tok(Kp), tok(Kp), tok(Vp), tok(Kp), tok(1), state)
    return pl.pallas_call(
        functools.partial(_bwd_kernel, cfg=cfg),
        grid=(B, H, n), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=_scratch(cfg, Kp, Vp, backward=True), compiler_params=_params(),
        interpret=cfg.interpret, name="kda_bwd",
    )(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kda(cfg, q, k, v, g, beta_col, h0, seg):
    return _forward(cfg, q, k, v, g, beta_col, h0, seg, emit_states=False)


def _kda_fwd(cfg, q, k, v, g, beta_col, h0, seg):
    out = _forward(cfg, q, k, v, g, beta_col, h0, seg, emit_states=False)
    return out, (q, k, v, g, beta_col, h0, seg)


def _kda_bwd(cfg, res, cts):
    q, k, v, g, beta_col, h0, seg = res
    do, dht = cts
    h = _forward(cfg, q, k, v, g, beta_col, h0, seg, emit_states=True)  # recompute states
    dq, dk, dv, dg, db, dh0 = _backward(cfg, q, k, v, g, beta_col, h, do, dht, seg)
    grads = tuple(d.astype(x.dtype) for d, x in
                  ((dq, q), (dk, k), (dv, v), (dg, g), (db, beta_col)))
    return grads + (dh0, None)


_kda.defvjp(_kda_fwd, _kda_bwd)


# ----------------------------------------------------------------------------- public entry


def _segment_inputs(segment_ids, T, Tp, C):
    """Per-token document index and the two chunk-boundary masks the kernels need."""
    seg = segment_ids.astype(jnp.int32)
    change = jnp.concatenate([jnp.zeros_like(seg[:, :1]), (seg[:, 1:] != seg[:, :-1])], axis=1)
    doc = jnp.cumsum(change.astype(jnp.int32), axis=1)
    doc = jnp.pad(doc, [(0, 0), (0, Tp - T)], mode="edge")  # padding tokens: last document
    B = doc.shape[0]
    chunks = doc.reshape(B, Tp // C, C)
    enter = jnp.concatenate([chunks[:, :1, :1], chunks[:, :-1, -1:]], axis=1)  # doc before chunk
    carry = (chunks == enter).astype(_F32).reshape(B, Tp, 1)
    toend = (chunks == chunks[:, :, -1:]).astype(_F32).reshape(B, Tp, 1)
    return doc.reshape(B, Tp, 1), doc.reshape(B, Tp // C, 1, C), carry, toend


def chunk_kda_tpu(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                  use_qk_l2norm_in_kernel=False, segment_ids=None, chunk_size=64,
                  interpret=False):
    """Chunked KDA on TPU (Pallas Mosaic), differentiable in q, k, v, g, beta, initial_state.

    q, k, g [B,T,H,K] (g: per-channel log-decay, <= 0), v [B,T,H,V], beta [B,T,H],
    initial_state [B,H,K,V] float32, segment_ids [B,T] int (the state resets at every change).
    Returns (o [B,T,H,V] in v.dtype, final_state [B,H,K,V] float32 or None).
    `interpret`: False (compile for TPU), True (Pallas's TPU interpreter on any backend) or a
    `pltpu.InterpretParams`.
    """
    B, T, H, K, V = validate_kda_inputs(
        "chunk_kda_tpu", q, k, v, g, beta, initial_state=initial_state,
        segment_ids=segment_ids, chunk_size=chunk_size, backend="pallas_tpu", scale=scale)
    C = int(chunk_size)
    Tp = -(-T // C) * C
    Kp = -(-K // _LANES) * _LANES
    Vp = -(-V // _LANES) * _LANES
    if interpret is True:
        interpret = pltpu.InterpretParams()
    cfg = _Cfg(C, float(K ** -0.5 if scale is None else scale), bool(use_qk_l2norm_in_kernel),
               segment_ids is not None, interpret)

    def layout(x, d, dp):  # [B,T,H,d] -> [B,H,Tp,dp], zero padded
        x = jnp.swapaxes(x, 1, 2)
        return jnp.pad(x, [(0, 0), (0, 0), (0, Tp - T), (0, dp - d)])

    qp, kp, gp = layout(q, K, Kp), layout(k, K, Kp), layout(g, K, Kp)
    vp = layout(v, V, Vp)
    bp = layout(beta[..., None], 1, 1)
    h0 = (jnp.zeros((B, H, Vp, Kp), _F32) if initial_state is None else
          jnp.pad(jnp.swapaxes(initial_state.astype(_F32), 2, 3),
                  [(0, 0), (0, 0), (0, Vp - V), (0, Kp - K)]))
    seg = None if segment_ids is None else _segment_inputs(segment_ids, T, Tp, C)
    o, ht = _kda(cfg, qp, kp, vp, gp, bp, h0, seg)
    o = jnp.swapaxes(o[:, :, :T, :V], 1, 2)
    final = jnp.swapaxes(ht[:, :, :V, :K], 2, 3) if output_final_state else None
    return o, final
