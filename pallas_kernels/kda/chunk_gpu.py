"""Chunked KDA in Pallas (Triton backend) with a hand-written backward (jax.custom_vjp).

Per chunk of C tokens (C = 32 or 64), with G = in-chunk cumsum of g (fp32, <= 0 and
decreasing), Gam_t = exp(G_t), S the state entering the chunk:

    A[t,j] = sum_d k_td k_jd exp(G_td - G_jd)   (j < t)        key-key decays
    P[t,j] = sum_d q_td k_jd exp(G_td - G_jd)   (j <= t)       query-key decays
    M = (I + diag(b) A)^-1,  T = M diag(b)                     UT transform
    W = T (k * Gam),  U = T v,  v_new = U - W S                "new values"
    o = (q * Gam) S + P v_new
    S_after = diag(exp(G_C)) S + (k * exp(G_C - G))^T v_new

Per-chunk quantities are whole [C, C] or [C, K-tile] matrices, so most of the work is a few
tensor-core products rather than many 16x16 ones:
  * A and P off the diagonal 16-blocks: for key block j, exp(G_t - G_s) factors through the
    reference row r = G[last row of j] as exp(G_t - r) exp(r - G_s), both exponents <= 0
    where kept (masked before exp elsewhere): one [C,bk]x[bk,C] product per key block.
    On the diagonal blocks no single reference is safe. The in-block levels split each block
    in halves over 4 levels, every pair meeting once through a reference between its two rows,
    as tensor-core products (`_level_pairs`): in the backward pass, and in the forward's diag
    kernel by default (diagonal="levels"; diagonal="loop" takes one key row per step there,
    pairwise and masked before exp).
  * M by block doubling: (I+D)^-1 = (I+N)(I+N^2)(I+N^4)(I+N^8) for the diagonal blocks D
    (N = -D), then (I+L)^-1 = (I - F)(I + F^2)(I+D)^-1 with F = (I+D)^-1 (L - D), F^4 = 0.

Kernels (fp32 accumulation; matmul operands per `matmul` mode; G itself comes from the
gate/cumsum kernel of gate_cumsum.py):
  forward   diag_pairs (B,H,16-row blocks)  the diagonal 16-blocks of A and P, compactly
            intra_fwd  (B,H,chunks)  W, U, P, kd = k exp(G_C - G), q Gam, M, A
            state_out_fwd (B,H,V tiles) sequential: o, S_T, h (state entering each chunk), v_new
  backward  intra_prep (B,H,chunks)  W, kd, q Gam (from M) and P^T do
            state_bwd  (B,H,V tiles) reverse: dS after each chunk, d v_new, dS_0
            bwd_pairs  (B,H,chunks)  dv, dbeta, dA, dP (reductions over K and V)
            bwd_channels (B,H,chunks x 16-row blocks x K tiles)  dq, dk, dG
Residuals kept by the forward pass: the inputs, h, v_new and the per-chunk P, M, A
(3C numbers per token and head, P in bf16 under bf16 products; recomputing them cost more
than the forward's intra kernel);
a forward pass that is not differentiated writes no M, A, h and v_new.
Segment resets enter as masks on A, P, Gam and the state update (run ids / flags), never as
-inf in G.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import multiprocessor_count
from pallas_kernels.kda.gate_cumsum import chunk_local_cumsum, chunk_local_gate_cumsum
from pallas_kernels.kda.reference import prepare_qk, segment_resets

BC = 16  # rows per sub-block inside a chunk (the smallest tensor-core tile)


# ----------------------------------------------------------------------------- helpers
# Matmul modes: "ieee" (fp32 operands, exact products: fp32 inputs and the CPU tests),
# "tf32" (fp32 operands on the tensor cores' tf32 path), "bf16" (bf16 operands).
_MODES = {"ieee": (jnp.float32, lax.Precision.HIGHEST),
          "tf32": (jnp.float32, lax.Precision.DEFAULT),
          "bf16": (jnp.bfloat16, lax.Precision.DEFAULT)}


def _dot(a, b, dims, mode):
    dtype, prec = _MODES[mode]
    return lax.dot_general(a.astype(dtype), b.astype(dtype), (dims, ((), ())),
                           precision=prec, preferred_element_type=jnp.float32)


def _mm(a, b, mode="ieee"):
    """a @ b, fp32 accumulation."""
    return _dot(a, b, ((1,), (0,)), mode)


def _mm_nt(a, b, mode="ieee"):
    """a @ b^T."""
    return _dot(a, b, ((1,), (1,)), mode)


def _mm_tn(a, b, mode="ieee"):
    """a^T @ b."""
    return _dot(a, b, ((0,), (0,)), mode)


def _f32(x):
    return x.astype(jnp.float32)


def _iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def _on_diagonal(n):
    """[n, n] mask of the diagonal."""
    return _iota((n, n), 0) == _iota((n, n), 1)


def _same_block(C):
    """[C, C] mask of the pairs inside one 16-row block (the diagonal blocks)."""
    return (_iota((C, C), 0) // BC) == (_iota((C, C), 1) // BC)


def _ktiles(K, bk, body, init):
    """fori_loop over K tiles of width bk (a loop, not unrolled, to keep the IR small)."""
    def step(t, carry):
        return body(pl.ds(pl.multiple_of(t * bk, bk), bk), carry)
    return lax.fori_loop(0, K // bk, step, init)


# ----------------------------------------------------------------------------- kernels
def _diag_pairs_kernel(q_ref, k_ref, g_ref, d_ref):
    """The diagonal 16x16 blocks of A and P for one 16-row block (all K channels), compactly:
    d[t, jj] = A[t, 16 b + jj] and d[t, 16 + jj] = P[t, 16 b + jj] (b: this block).
    No exp factoring is safe inside a block (G may fall by hundreds over 16 tokens), so each
    key row jj takes the pairwise exp(G_t - G_jj), masked before exp where t < jj."""
    G, k, q = _f32(g_ref[...]), _f32(k_ref[...]), _f32(q_ref[...])
    rin = _iota(G.shape, 0)

    def row(jj, carry):  # column jj of both blocks, stored straight to the output
        one = pl.ds(jj, 1)
        ke = _f32(k_ref[one, :]) * jnp.exp(jnp.where(rin >= jj, G - _f32(g_ref[one, :]), -jnp.inf))
        d_ref[:, pl.ds(jj, 1)] = jnp.sum(k * ke, axis=1, keepdims=True)
        d_ref[:, pl.ds(BC + jj, 1)] = jnp.sum(q * ke, axis=1, keepdims=True)
        return carry

    lax.fori_loop(0, BC, row, 0)


def _diag_levels_kernel(q_ref, k_ref, g_ref, d_ref, *, K, bk, mm):
    """The same compact diagonal blocks as `_diag_pairs_kernel` by the in-block levels: per K
    tile two [16,bk]x[bk,16] tensor-core products per level instead of 16 pairwise rows."""
    lmm = _levels_mm(mm)

    def tile(cols, acc):
        A, P = acc
        G, k, q = _f32(g_ref[:, cols]), _f32(k_ref[:, cols]), _f32(q_ref[:, cols])
        for pair, e_q, e_k in _in_block_levels(G, lmm):
            right = k * e_k
            A = A + jnp.where(pair, _mm_nt(k * e_q, right, lmm), 0.0)
            P = P + jnp.where(pair, _mm_nt(q * e_q, right, lmm), 0.0)
        # t = s (P only, decay 1) elementwise in fp32
        return A, P + jnp.where(_on_diagonal(BC), jnp.sum(q * k, axis=1, keepdims=True), 0.0)

    zero = jnp.zeros((BC, BC), jnp.float32)
    A, P = _ktiles(K, bk, tile, (zero, zero))
    d_ref[:, pl.ds(0, BC)] = A
    d_ref[:, pl.ds(BC, BC)] = P


def _level_pairs(n, width, L):
    """Pairs of one level of the in-block split, for sub-blocks of L rows (L = 16, 8, 4, 2)
    of an n-row tile: query rows are the second half of their sub-block, key rows the first,
    and the reference of both is the sub-block's last key row, so for every pair
    exp(G_t - G_s) = exp(G_t - r) exp(r - G_s) with both factors <= 1, whatever the decay.
    Returns sel [n,n] (row -> its reference row, for a selection product), the pair mask
    [n,n] and the query-row mask [n,width]."""
    t, c = _iota((n, n), 0), _iota((n, n), 1)
    sel = jnp.where(c == (t // L) * L + L // 2 - 1, 1.0, 0.0)
    pair = (t // L == c // L) & (t % L >= L // 2) & (c % L < L // 2)
    return sel, pair, _iota((n, width), 0) % L >= L // 2


LEVELS = (16, 8, 4, 2)  # the in-block split: every pair s < t of a 16-block at exactly one level


def _in_block_levels(G, mm):
    """Per level of the in-block split of a [16, width] tile G: the pair mask, exp(G - r) on
    query rows and exp(r - G) on key rows (zero elsewhere). r is G at the reference row as
    the selection product rounds it; the same r enters both factors, so the rounding cancels
    out of every pair."""
    n, width = G.shape
    for L in LEVELS:
        sel, pair, query_row = _level_pairs(n, width, L)
        r = _mm(sel, G, mm)
        e = jnp.exp(jnp.where(query_row, G - r, r - G))  # every row is a query or a key row
        yield pair, jnp.where(query_row, e, 0.0), jnp.where(query_row, 0.0, e)


def _levels_mm(mm):
    """Operand precision of the in-block level products: at least tf32. The nearest pairs
    carry the least decay, and bf16 operands there doubled dg's error (CPU, interpret)."""
    return "tf32" if mm == "bf16" else mm


def _chunk_pairs(q_ref, k_ref, g_ref, d_ref, *, C, K, bk, mm):
    """A (k-k) and P (q-k) decayed products of one chunk as whole [C, C] matrices.

    Off the diagonal 16-blocks, for each key block j the reference row r = G[last row of j]
    factors exp(G_t - G_s) = exp(G_t - r) exp(r - G_s) (both <= 1 where kept, masked before
    exp elsewhere): one [C,bk]x[bk,C] tensor-core product per key block. The diagonal
    blocks come from the diag kernel (`d_ref`, compact), expanded by an exact product.
    Returns A (strictly lower, diagonal entries not yet masked) and P (lower)."""
    nb = C // BC
    blk = _iota((C, bk), 0) // BC

    def tile(cols, acc):
        A, P = acc
        G, k, q = _f32(g_ref[:, cols]), _f32(k_ref[:, cols]), _f32(q_ref[:, cols])
        for j in range(nb - 1):
            r = _f32(g_ref[pl.ds(j * BC + BC - 1, 1), cols])
            # one exp per element: rows after block j are queries, block j's rows keys
            e = jnp.exp(jnp.where(blk > j, G - r, jnp.where(blk == j, r - G, -jnp.inf)))
            e_left = jnp.where(blk > j, e, 0.0)
            right = k * jnp.where(blk == j, e, 0.0)
            A = A + _mm_nt(k * e_left, right, mm)
            P = P + _mm_nt(q * e_left, right, mm)
        return A, P

    zero = jnp.zeros((C, C), jnp.float32)
    A, P = _ktiles(K, bk, tile, (zero, zero))
    same_blk, pick = _same_block(C), _block_pick(C)
    return (A + jnp.where(same_blk, _mm_nt(d_ref[:, pl.ds(0, BC)], pick), 0.0),
            P + jnp.where(same_blk, _mm_nt(d_ref[:, pl.ds(BC, BC)], pick), 0.0))


def _block_pick(C):
    """[C, 16]: pick[c, jj] = 1 where c is row jj of its 16-block (compact <-> [C, C] by an
    exact, "ieee", product)."""
    return jnp.where(_iota((C, BC), 0) % BC == _iota((C, BC), 1), 1.0, 0.0)


def _unit_lower_inverse(L, C, mm):
    """(I + L)^-1 for strictly lower L [C,C], C <= 64, by matrix products only.

    D = the diagonal 16-blocks of L: (I+D)^-1 = (I+N)(I+N^2)(I+N^4)(I+N^8), N = -D
    (nilpotent of order 16). With F = (I+D)^-1 (L - D), block strictly lower over at most
    4 blocks so F^4 = 0: (I+L)^-1 = (I+F)^-1 (I+D)^-1 = (I - F)(I + F^2) (I+D)^-1."""
    eye = jnp.where(_on_diagonal(C), 1.0, 0.0)
    D = jnp.where(_same_block(C), L, 0.0)
    n = -D
    md = eye + n
    for _ in range(3):
        n = _mm(n, n, mm)
        md = md + _mm(md, n, mm)
    F = _mm(md, L - D, mm)
    i_f = eye - F
    return _mm(i_f + _mm(i_f, _mm(F, F, mm), mm), md, mm)


def _keep_masks(run_ref, C, seg):
    """Which (row, column) pairs of a chunk's A (strictly lower) and P (lower) are kept:
    causal, and inside one run of tokens when segments are packed."""
    row, col = _iota((C, C), 0), _iota((C, C), 1)
    keep_a, keep_p = row > col, row >= col
    if seg:
        run = _f32(run_ref[...])
        same = run[:, None] == run[None, :]
        keep_a, keep_p = keep_a & same, keep_p & same
    return keep_a, keep_p


def _chunk_system(q_ref, k_ref, g_ref, b_ref, run_ref, d_ref, *, C, K, bk, seg, mm):
    """A (strictly lower), P (lower), beta and M = (I + diag(beta) A)^-1 of one chunk."""
    A, P = _chunk_pairs(q_ref, k_ref, g_ref, d_ref, C=C, K=K, bk=bk, mm=mm)
    keep_a, keep_p = _keep_masks(run_ref, C, seg)
    A, P = jnp.where(keep_a, A, 0.0), jnp.where(keep_p, P, 0.0)
    beta = _f32(b_ref[...])
    return A, P, beta, _unit_lower_inverse(beta[:, None] * A, C, mm)


def _decays(g_ref, fs_ref, ls_ref, cols, C, seg, rows=slice(None)):
    """G, Gam = exp(G) (zero after a reset inside the chunk), dec = exp(G_C - G) (zero
    before one) and exp(G_C) (zero if the chunk holds a reset) for one K tile (of `rows`)."""
    G = _f32(g_ref[rows, cols])
    Gl = _f32(g_ref[pl.ds(C - 1, 1), cols])
    if not seg:
        return G, jnp.exp(G), jnp.exp(Gl - G), jnp.exp(Gl)
    fs = _f32(fs_ref[rows])[:, None] > 0
    ls = _f32(ls_ref[rows])[:, None] > 0
    fs_last = _f32(fs_ref[pl.ds(C - 1, 1)])[:, None] > 0
    return (G, jnp.exp(jnp.where(fs, G, -jnp.inf)), jnp.exp(jnp.where(ls, Gl - G, -jnp.inf)),
            jnp.exp(jnp.where(fs_last, Gl, -jnp.inf)))


def _write_w_kd(T, k_ref, g_ref, fs_ref, ls_ref, w_ref, kd_ref, *, C, K, seg, bk, mm,
                q_ref=None, qg_ref=None):
    """Per K tile: W = T (k * Gam), kd = k * exp(G_C - G), and q * Gam when qg_ref is given."""
    def k_tile(cols, carry):
        _, gam, dec, _ = _decays(g_ref, fs_ref, ls_ref, cols, C, seg)
        k = _f32(k_ref[:, cols])
        w_ref[:, cols] = _mm(T, k * gam, mm).astype(w_ref.dtype)
        kd_ref[:, cols] = (k * dec).astype(kd_ref.dtype)
        if qg_ref is not None:
            qg_ref[:, cols] = (_f32(q_ref[:, cols]) * gam).astype(qg_ref.dtype)
        return carry

    _ktiles(K, bk, k_tile, 0)


def _intra_fwd_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, run_ref, fs_ref, ls_ref, d_ref,
                      w_ref, u_ref, p_ref, kd_ref, *extra_refs, C, K, V, seg, bk, bv, mm, residuals,
                      with_qg):
    """extra_refs: M and A for the backward pass (`residuals`), then q * Gam for the fused
    state-and-output kernel (`with_qg`)."""
    A, P, beta, M = _chunk_system(q_ref, k_ref, g_ref, b_ref, run_ref, d_ref, C=C, K=K, bk=bk,
                                  seg=seg, mm=mm)
    p_ref[...] = P.astype(p_ref.dtype)
    if residuals:
        m_ref, a_ref = extra_refs[:2]
        m_ref[...] = M
        a_ref[...] = A
    qg = dict(q_ref=q_ref, qg_ref=extra_refs[-1]) if with_qg else {}
    T = M * beta[None, :]
    _write_w_kd(T, k_ref, g_ref, fs_ref, ls_ref, w_ref, kd_ref, C=C, K=K, seg=seg, bk=bk, mm=mm, **qg)

    def v_tile(cols, carry):
        u_ref[:, cols] = _mm(T, v_ref[:, cols], mm)
        return carry

    _ktiles(V, bv, v_tile, 0)


def _intra_prep_bwd_kernel(q_ref, k_ref, g_ref, b_ref, fs_ref, ls_ref, m_ref, p_ref, do_ref,
                           w_ref, kd_ref, qg_ref, dvl_ref, *, C, K, V, seg, bk, bv, mm):
    """What the sequential backward reads per chunk: W, kd, q*Gam and P^T do (M and P are
    kept from the forward pass)."""
    _write_w_kd(m_ref[...] * _f32(b_ref[...])[None, :], k_ref, g_ref, fs_ref, ls_ref, w_ref,
                kd_ref, C=C, K=K, seg=seg, bk=bk, mm=mm, q_ref=q_ref, qg_ref=qg_ref)

    def v_tile(cols, carry):
        dvl_ref[:, cols] = _mm_tn(p_ref[...], do_ref[:, cols], mm)
        return carry

    _ktiles(V, bv, v_tile, 0)


def _end_decay(g_ref, fs_ref, t0, C, seg):
    """exp(G_C) of the chunk starting at t0 as a [K, 1] column (zero if the chunk holds a
    reset): the state's decay across the chunk, in the sequential kernels."""
    Gl = _f32(g_ref[pl.ds(t0 + C - 1, 1), :])
    if seg:
        Gl = jnp.where(_f32(fs_ref[pl.ds(t0 + C - 1, 1)])[:, None] > 0, Gl, -jnp.inf)
    return jnp.transpose(jnp.exp(Gl))


def _state_out_fwd_kernel(g_ref, fs_ref, w_ref, u_ref, kd_ref, qg_ref, p_ref, s0_ref, o_ref,
                          sT_ref, *residual_refs, C, NT, seg, mm_state, mm):
    """State and output in one pass: per chunk v_new = u - W S, o = (q * Gam) S + P v_new,
    S <- exp(G_C) S + kd^T v_new. residual_refs: (per-chunk entering states h, v_new) for the
    backward pass, or none (a pass that is not differentiated: neither goes to memory). S and
    v_new enter the output products with the operand rounding those stores give them."""
    def body(n, s):
        t0 = pl.multiple_of(n * C, C)
        rows = pl.ds(t0, C)
        vn = _f32(u_ref[rows, :]) - _mm(w_ref[rows, :], s, mm_state)
        if residual_refs:
            h_ref, vn_ref = residual_refs
            h_ref[n] = s.astype(h_ref.dtype)
            vn_ref[rows, :] = vn.astype(vn_ref.dtype)
        o = _mm(qg_ref[rows, :], s, mm) + _mm(p_ref[rows, :], vn, mm)
        o_ref[rows, :] = o.astype(o_ref.dtype)
        return _end_decay(g_ref, fs_ref, t0, C, seg) * s + _mm_tn(kd_ref[rows, :], vn, mm_state)

    sT_ref[...] = lax.fori_loop(0, NT, body, _f32(s0_ref[...]))


def _state_bwd_kernel(g_ref, fs_ref, w_ref, kd_ref, qg_ref, do_ref, dvl_ref, dsT_ref,
                      dh_ref, dvn_ref, ds0_ref, *, C, NT, seg, mm):
    """Reverse over chunks: dS_after (kept per chunk), d v_new, and dS entering the chunk."""
    def body(i, ds):
        n = NT - 1 - i
        t0 = pl.multiple_of(n * C, C)
        dh_ref[n] = ds.astype(dh_ref.dtype)
        dvn = _f32(dvl_ref[pl.ds(t0, C), :]) + _mm(kd_ref[pl.ds(t0, C), :], ds, mm)
        dvn_ref[pl.ds(t0, C), :] = dvn.astype(dvn_ref.dtype)
        return (_end_decay(g_ref, fs_ref, t0, C, seg) * ds
                + _mm_tn(qg_ref[pl.ds(t0, C), :], do_ref[pl.ds(t0, C), :], mm)
                - _mm_tn(w_ref[pl.ds(t0, C), :], dvn, mm))

    ds0_ref[...] = lax.fori_loop(0, NT, body, _f32(dsT_ref[...]))


def _intra_bwd_pairs_kernel(k_ref, v_ref, g_ref, b_ref, run_ref, fs_ref, ls_ref, m_ref, a_ref,
                            do_ref, h_ref, vn_ref, dvn_ref, dv_ref, db_ref, da_ref, dp_ref,
                            *, C, K, V, seg, bk, bv, mm):
    """Per chunk, the reductions over K and V: dv, dbeta and the pair gradients dA, dP.

    v_new = U - W S, U = T v, W = T (k Gam), T = M diag(beta), M = (I + diag(beta) A)^-1,
    o = (q Gam) S + P v_new."""
    keep_a, keep_p = _keep_masks(run_ref, C, seg)
    beta, M = _f32(b_ref[...]), m_ref[...]
    T = M * beta[None, :]
    dvn = _f32(dvn_ref[...])

    def k_red(cols, dT):
        _, gam, _, _ = _decays(g_ref, fs_ref, ls_ref, cols, C, seg)
        dW = -_mm_nt(dvn, h_ref[cols, :], mm)
        return dT + _mm_nt(dW, _f32(k_ref[:, cols]) * gam, mm)

    def v_red(cols, acc):
        dT, dP = acc
        du = _f32(dvn_ref[:, cols])
        dv_ref[:, cols] = _mm_tn(T, du, mm)
        return (dT + _mm_nt(du, v_ref[:, cols], mm),
                dP + _mm_nt(do_ref[:, cols], vn_ref[:, cols], mm))

    zero = jnp.zeros((C, C), jnp.float32)
    dT, dP = _ktiles(V, bv, v_red, (_ktiles(K, bk, k_red, zero), zero))
    dL = jnp.where(keep_a, -_mm_nt(_mm_tn(M, dT * beta[None, :], mm), M, mm), 0.0)  # -M^T dM M^T
    db_ref[...] = jnp.sum(dT * M, axis=0) + jnp.sum(dL * a_ref[...], axis=1)
    dA = beta[:, None] * dL
    dP = jnp.where(keep_p, dP, 0.0)
    da_ref[...] = dA
    dp_ref[...] = dP


def _intra_bwd_channels_kernel(q_ref, k_ref, g_ref, fs_ref, ls_ref, da_ref, dp_ref, do_ref,
                               vn_ref, dv_ref, h_ref, dh_ref, dq_ref, dk_ref, dg_ref, dgl_ref,
                               *, C, NK, seg, mm):
    """One 16-row block i of one chunk and one K tile, elementwise in the channel: dq, dk, dG.

    q/k/g refs hold the whole chunk's K tile; do, vn, dv (= T^T d v_new) the block's rows.
    With S_after = diag(exp(G_C)) S + (k dec)^T v_new and A, P as in the forward pass, the
    pairs (t, s) split into: s in an earlier block (this block's rows as queries), t in a
    later block (its rows as keys) and both in block i (`_block_pair_grads`).
    dgl gets this block's share of d/dG_C (summed over blocks by the caller)."""
    i = (pl.program_id(2) // NK) % (C // BC)
    r0 = pl.multiple_of(i * BC, BC)
    rows = pl.ds(r0, BC)
    cols = slice(None)
    G, gam, dec, gl = _decays(g_ref, fs_ref, ls_ref, cols, C, seg, rows)
    q, k = _f32(q_ref[rows, :]), _f32(k_ref[rows, :])
    hc, dhc = h_ref[...], dh_ref[...]
    dqg = _mm_nt(do_ref[...], hc, mm)
    dkd = _mm_nt(vn_ref[...], dhc, mm)
    dKg = -_mm_nt(dv_ref[...], hc, mm)  # T^T dW with dW = -d v_new S^T
    kd = k * dec
    dq = dqg * gam
    dk = dKg * gam + dkd * dec
    dG = (dKg * k + dqg * q) * gam - dkd * kd
    hdh = jnp.transpose(jnp.sum(_f32(hc) * _f32(dhc), axis=1, keepdims=True))
    dgl_ref[...] = (jnp.sum(dkd * kd, axis=0, keepdims=True)
                    + jnp.where(i == C // BC - 1, hdh * gl, 0.0))

    G_all, k_all, q_all = _f32(g_ref[...]), _f32(k_ref[...]), _f32(q_ref[...])
    row_all = _iota(G_all.shape, 0)
    # Keys in earlier blocks, through the reference r = G at this block's first row.
    r = _f32(g_ref[pl.ds(r0, 1), :])
    e_q = jnp.exp(G - r)
    k_e = k_all * jnp.exp(jnp.where(row_all < r0, r - G_all, -jnp.inf))
    dlq, dlk = _mm(dp_ref[rows, :], k_e, mm), _mm(da_ref[rows, :], k_e, mm)
    dq = dq + dlq * e_q
    dk = dk + dlk * e_q
    dG = dG + (dlq * q + dlk * k) * e_q
    # Queries in later blocks, through r = G at this block's last row.
    r = _f32(g_ref[pl.ds(r0 + BC - 1, 1), :])
    e_t = jnp.exp(jnp.where(row_all >= r0 + BC, G_all - r, -jnp.inf))
    blk_cols = pl.ds(r0, BC)
    dr = (_mm_tn(da_ref[:, blk_cols], k_all * e_t, mm)
          + _mm_tn(dp_ref[:, blk_cols], q_all * e_t, mm)) * jnp.exp(r - G)
    dk = dk + dr
    dG = dG - dr * k

    rq, rk, cs = _block_pair_grads(G, q, k, dp_ref[rows, blk_cols], da_ref[rows, blk_cols],
                                   _levels_mm(mm))
    dq_ref[...] = (dq + rq).astype(dq_ref.dtype)
    dk_ref[...] = (dk + rk + cs).astype(dk_ref.dtype)
    dg_ref[...] = dG + q * rq + k * rk - k * cs


def _block_pair_grads(G, q, k, dP, dA, mm):
    """Pairs inside one 16-row block by the in-block levels: rq = sum_s dP[t,s] k_s e(t,s),
    rk the same with dA, cs = sum_t (dP[t,s] q_t + dA[t,s] k_t) e(t,s), e = exp(G_t - G_s);
    dP, dA: the block's [16,16] diagonal block (masked). Two [16,16]x[16,bk] products per
    level and term."""
    rq = rk = cs = jnp.zeros_like(G)
    for pair, e_q, e_k in _in_block_levels(G, mm):
        dp, da = jnp.where(pair, dP, 0.0), jnp.where(pair, dA, 0.0)
        ke = k * e_k
        rq = rq + e_q * _mm(dp, ke, mm)
        rk = rk + e_q * _mm(da, ke, mm)
        cs = cs + e_k * (_mm_tn(dp, q * e_q, mm) + _mm_tn(da, k * e_q, mm))
    # t = s (P only, decay 1) elementwise in fp32: its dG terms q dP_tt k - k dP_tt q then
    # cancel exactly, which rounded matmul operands would not.
    d = jnp.sum(jnp.where(_on_diagonal(BC), dP, 0.0), axis=1, keepdims=True)
    return rq + d * k, rk, cs + d * q


# ----------------------------------------------------------------------------- calls
class _Cfg(tuple):
    """Static configuration (hashable): chunk, segments, interpret, tiles, warps."""

    __slots__ = ()
    fields = ("C", "seg", "interpret", "bv", "bk", "bk_intra", "bk_channels", "warps_intra", "warps_state",
              "warps_blocks", "warps_diag", "stages", "mm", "diag",
              "bv_state", "stages_state", "stages_state_bwd", "mm_state")

    def __new__(cls, **kw):
        return super().__new__(cls, tuple(kw[f] for f in cls.fields))

    def __getattr__(self, name):
        return self[self.fields.index(name)]


def _operand_dtype(mode):
    """Storage of an array whose readers use it only as an operand of products in matmul
    `mode`: bf16 when those take bf16 operands (the same rounding, half the bytes). W, kd and
    the backward's q*Gam follow the state kernels' mode (cfg.mm_state); h, dh, v_new and
    d v_new the per-chunk kernels' (cfg.mm; h and dh also enter the elementwise sum of d/dG_C),
    as fla stores them, and so do P and the forward's q*Gam, which enter only the output's
    products."""
    return jnp.bfloat16 if mode == "bf16" else jnp.float32


def _params(cfg, warps, stages=None):
    return dict(interpret=cfg.interpret,
                compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages or cfg.stages))


def _chunk_state_spec(K, V):
    """The [K, V] state of one (batch, head, chunk) in a [B, H, NT, K, V] array."""
    return pl.BlockSpec((None, None, None, K, V), lambda b, h, n: (b, h, n, 0, 0))


def _chunk_specs(C, K, V):
    """Per-(batch, head, chunk) blocks of [.,C,.,K], [.,C,.,V], [.,C,.,C], [.,C,.] and [.,C] arrays."""
    return (pl.BlockSpec((None, C, None, K), lambda b, h, n: (b, n, h, 0)),
            pl.BlockSpec((None, C, None, V), lambda b, h, n: (b, n, h, 0)),
            pl.BlockSpec((None, C, None, C), lambda b, h, n: (b, n, h, 0)),
            pl.BlockSpec((None, C, None), lambda b, h, n: (b, n, h)),
            pl.BlockSpec((None, C), lambda b, h, n: (b, n)))


def _diag_pairs(q, k, G, cfg):
    """Compact diagonal 16-blocks of A and P, [B, Tp, H, 32] (grid over 16-row blocks), by
    the loop or the levels (cfg.diag)."""
    B, Tp, H, K = q.shape
    rows = pl.BlockSpec((None, BC, None, K), lambda b, h, n: (b, n, h, 0))
    kern = (_diag_pairs_kernel if cfg.diag == "loop" else
            functools.partial(_diag_levels_kernel, K=K, bk=cfg.bk, mm=cfg.mm))
    return pl.pallas_call(
        kern, grid=(B, H, Tp // BC), in_specs=[rows] * 3,
        out_specs=pl.BlockSpec((None, BC, None, 2 * BC), lambda b, h, n: (b, n, h, 0)),
        out_shape=jax.ShapeDtypeStruct((B, Tp, H, 2 * BC), jnp.float32),
        name="kda_diag_pairs", **_params(cfg, cfg.warps_diag),
    )(q, k, G)


def _intra_fwd(q, k, v, G, beta, run, fs, ls, d, cfg, residuals=True, with_qg=False):
    """W, U, P, kd = k * exp(G_C - G), then with `residuals` M and A, then with `with_qg`
    q * Gam, per chunk (parallel over chunks); d: the compact diagonal blocks of A and P
    (`_diag_pairs`)."""
    B, Tp, H, K = q.shape
    V = v.shape[-1]
    C = cfg.C
    ck, cv, cp, cb, cm = _chunk_specs(C, K, V)
    f32 = jnp.float32
    return pl.pallas_call(
        functools.partial(_intra_fwd_kernel, C=C, K=K, V=V, seg=cfg.seg, bk=cfg.bk_intra,
                          bv=min(cfg.bv, V), mm=cfg.mm, residuals=residuals, with_qg=with_qg),
        grid=(B, H, Tp // C),
        in_specs=[ck, ck, cv, ck, cb, cm, cm, cm,
                  pl.BlockSpec((None, C, None, 2 * BC), lambda b, h, n: (b, n, h, 0))],
        out_specs=[ck, cv, cp, ck] + [cp, cp] * residuals + [ck] * with_qg,
        out_shape=[jax.ShapeDtypeStruct((B, Tp, H, K), _operand_dtype(cfg.mm_state)),
                   jax.ShapeDtypeStruct((B, Tp, H, V), f32),
                   jax.ShapeDtypeStruct((B, Tp, H, C), _operand_dtype(cfg.mm)),
                   jax.ShapeDtypeStruct((B, Tp, H, K), _operand_dtype(cfg.mm_state))]
        + [jax.ShapeDtypeStruct((B, Tp, H, C), f32)] * 2 * residuals
        + [jax.ShapeDtypeStruct((B, Tp, H, K), _operand_dtype(cfg.mm))] * with_qg,
        name="kda_intra_fwd", **_params(cfg, cfg.warps_intra),
    )(q, k, v, G, beta, run, fs, ls, d)


def _seq_specs(Tp, K, C, bv):
    return dict(
        k=pl.BlockSpec((None, Tp, None, K), lambda b, h, j: (b, 0, h, 0)),
        v=pl.BlockSpec((None, Tp, None, bv), lambda b, h, j: (b, 0, h, j)),
        m=pl.BlockSpec((None, Tp), lambda b, h, j: (b, 0)),
        h=pl.BlockSpec((None, None, Tp // C, K, bv), lambda b, h, j: (b, h, 0, 0, j)),
        s=pl.BlockSpec((None, None, K, bv), lambda b, h, j: (b, h, 0, j)),
    )


def _state_out_fwd(G, fs, w, u, kd, qg, p, s0, cfg, out_dtype, residuals=False):
    """o and the final state, and with `residuals` the per-chunk entering states h and v_new
    (sequential over chunks, `_state_out_fwd_kernel`)."""
    B, Tp, H, K = G.shape
    V = u.shape[-1]
    C, bv = cfg.C, min(cfg.bv_state, V)
    NT = Tp // C
    sp = _seq_specs(Tp, K, C, bv)
    pairs = pl.BlockSpec((None, Tp, None, C), lambda b, h, j: (b, 0, h, 0))
    kern = functools.partial(_state_out_fwd_kernel, C=C, NT=NT, seg=cfg.seg,
                             mm_state=cfg.mm_state, mm=cfg.mm)
    return pl.pallas_call(
        kern, grid=(B, H, V // bv),
        in_specs=[sp["k"], sp["m"], sp["k"], sp["v"], sp["k"], sp["k"], pairs, sp["s"]],
        out_specs=[sp["v"], sp["s"]] + [sp["h"], sp["v"]] * residuals,
        out_shape=[jax.ShapeDtypeStruct((B, Tp, H, V), out_dtype),
                   jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)]
        + [jax.ShapeDtypeStruct((B, H, NT, K, V), _operand_dtype(cfg.mm)),
           jax.ShapeDtypeStruct((B, Tp, H, V), _operand_dtype(cfg.mm))] * residuals,
        name="kda_state_out_fwd", **_params(cfg, cfg.warps_state, cfg.stages_state),
    )(G, fs, w, u, kd, qg, p, s0)


def _intra_prep_bwd(q, k, G, beta, fs, ls, M, P, do, cfg):
    B, Tp, H, K = q.shape
    V = do.shape[-1]
    C = cfg.C
    ck, cv, cp, cb, cm = _chunk_specs(C, K, V)
    kern = functools.partial(_intra_prep_bwd_kernel, C=C, K=K, V=V, seg=cfg.seg, bk=cfg.bk,
                             bv=min(cfg.bv, V), mm=cfg.mm)
    f32 = jnp.float32
    return pl.pallas_call(
        kern, grid=(B, H, Tp // C),
        in_specs=[ck, ck, ck, cb, cm, cm, cp, cp, cv], out_specs=[ck, ck, ck, cv],
        out_shape=[jax.ShapeDtypeStruct((B, Tp, H, K), _operand_dtype(cfg.mm_state))] * 3
        + [jax.ShapeDtypeStruct((B, Tp, H, V), f32)],
        name="kda_intra_prep_bwd", **_params(cfg, cfg.warps_intra),
    )(q, k, G, beta, fs, ls, M, P, do)


def _state_bwd(G, fs, w, kd, qg, do, dvl, dsT, cfg):
    B, Tp, H, K = G.shape
    V = do.shape[-1]
    C, bv = cfg.C, min(cfg.bv_state, V)
    NT = Tp // C
    sp = _seq_specs(Tp, K, C, bv)
    kern = functools.partial(_state_bwd_kernel, C=C, NT=NT, seg=cfg.seg, mm=cfg.mm_state)
    f32 = jnp.float32
    return pl.pallas_call(
        kern, grid=(B, H, V // bv),
        in_specs=[sp["k"], sp["m"], sp["k"], sp["k"], sp["k"], sp["v"], sp["v"], sp["s"]],
        out_specs=[sp["h"], sp["v"], sp["s"]],
        out_shape=[jax.ShapeDtypeStruct((B, H, NT, K, V), _operand_dtype(cfg.mm)),
                   jax.ShapeDtypeStruct((B, Tp, H, V), _operand_dtype(cfg.mm)),
                   jax.ShapeDtypeStruct((B, H, K, V), f32)],
        name="kda_state_bwd", **_params(cfg, cfg.warps_state, cfg.stages_state_bwd),
    )(G, fs, w, kd, qg, do, dvl, dsT)


def _intra_bwd_pairs(k, v, G, beta, run, fs, ls, M, A, do, h, vn, dvn, cfg):
    B, Tp, H, K = k.shape
    V = v.shape[-1]
    C = cfg.C
    ck, cv, cp, cb, cm = _chunk_specs(C, K, V)
    static = dict(C=C, K=K, V=V, seg=cfg.seg, bk=cfg.bk, bv=min(cfg.bv, V), mm=cfg.mm)
    f32 = jnp.float32
    return pl.pallas_call(
        functools.partial(_intra_bwd_pairs_kernel, **static), grid=(B, H, Tp // C),
        in_specs=[ck, cv, ck, cb, cm, cm, cm, cp, cp, cv, _chunk_state_spec(K, V), cv, cv],
        out_specs=[cv, cb, cp, cp],
        out_shape=[jax.ShapeDtypeStruct((B, Tp, H, V), f32), jax.ShapeDtypeStruct((B, Tp, H), f32)]
        + [jax.ShapeDtypeStruct((B, Tp, H, C), f32)] * 2,
        name="kda_intra_bwd_pairs", **_params(cfg, cfg.warps_intra),
    )(k, v, G, beta, run, fs, ls, M, A, do, h, vn, dvn)


def _intra_bwd_channels(q, k, G, fs, ls, dA, dP, do, vn, dv, h, dh, cfg):
    """Grid (B, H, chunks x 16-row blocks x K tiles). Returns dq, dk, dG and the per-block
    shares of d/dG_C, [B, Tp/16, H, K]."""
    B, Tp, H, K = q.shape
    V = do.shape[-1]
    C, bk = cfg.C, cfg.bk_channels
    NK, NB = K // bk, C // BC

    def chunk(width, tiled=False):
        return pl.BlockSpec((None, C, None, width),
                            lambda b, h, n: (b, n // (NB * NK), h, n % NK if tiled else 0))

    def block_rows(width, tiled=False):
        return pl.BlockSpec((None, BC, None, width),
                            lambda b, h, n: (b, n // NK, h, n % NK if tiled else 0))

    state = pl.BlockSpec((None, None, None, bk, V),
                         lambda b, h, n: (b, h, n // (NB * NK), n % NK, 0))
    flags = pl.BlockSpec((None, C), lambda b, h, n: (b, n // (NB * NK)))
    last = pl.BlockSpec((None, 1, None, bk), lambda b, h, n: (b, n // NK, h, n % NK))
    tile = chunk(bk, tiled=True)
    f32 = jnp.float32
    return pl.pallas_call(
        functools.partial(_intra_bwd_channels_kernel, C=C, NK=NK, seg=cfg.seg, mm=cfg.mm),
        grid=(B, H, Tp // C * NB * NK),
        in_specs=[tile, tile, tile, flags, flags, chunk(C), chunk(C),
                  block_rows(V), block_rows(V), block_rows(V), state, state],
        out_specs=[block_rows(bk, True)] * 3 + [last],
        out_shape=[jax.ShapeDtypeStruct((B, Tp, H, K), q.dtype),
                   jax.ShapeDtypeStruct((B, Tp, H, K), k.dtype),
                   jax.ShapeDtypeStruct((B, Tp, H, K), f32),
                   jax.ShapeDtypeStruct((B, Tp // BC, H, K), f32)],
        name="kda_intra_bwd_channels", **_params(cfg, cfg.warps_blocks),
    )(q, k, G, fs, ls, dA, dP, do, vn, dv, h, dh)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def _kda_core(q, k, v, G, beta, s0, run, fs, ls, cfg):
    # Not differentiated (prefill, evaluation): nothing is kept for a backward pass, so neither
    # M, A, the per-chunk states nor v_new go to memory.
    d = _diag_pairs(q, k, G, cfg)
    w, u, p, kd, qg = _intra_fwd(q, k, v, G, beta, run, fs, ls, d, cfg, residuals=False, with_qg=True)
    return _state_out_fwd(G, fs, w, u, kd, qg, p, s0, cfg, v.dtype)


def _kda_core_fwd(q, k, v, G, beta, s0, run, fs, ls, cfg):
    d = _diag_pairs(q, k, G, cfg)
    w, u, p, kd, M, A, qg = _intra_fwd(q, k, v, G, beta, run, fs, ls, d, cfg, with_qg=True)
    o, sT, h, vn = _state_out_fwd(G, fs, w, u, kd, qg, p, s0, cfg, v.dtype, residuals=True)
    return (o, sT), (q, k, v, G, beta, run, fs, ls, h, vn, p, M, A)


def _kda_core_bwd(cfg, res, cts):
    q, k, v, G, beta, run, fs, ls, h, vn, P, M, A = res
    do, dsT = cts
    do = do.astype(v.dtype)
    # The per-chunk [C, C] matrices P, M, A are kept (3 C numbers per token and head) rather
    # than recomputed; W, kd and q*Gam are cheap products of them, recomputed here.
    w, kd, qg, dvl = _intra_prep_bwd(q, k, G, beta, fs, ls, M, P, do, cfg)
    dh, dvn, ds0 = _state_bwd(G, fs, w, kd, qg, do, dvl, dsT, cfg)
    dv, db, dA, dP = _intra_bwd_pairs(k, v, G, beta, run, fs, ls, M, A, do, h, vn, dvn, cfg)
    dq, dk, dG, dGl = _intra_bwd_channels(q, k, G, fs, ls, dA, dP, do, vn, dv, h, dh, cfg)
    B, Tp, H, K = G.shape
    C = cfg.C
    dG = dG.reshape(B, Tp // C, C, H, K).at[:, :, C - 1].add(
        dGl.reshape(B, Tp // C, C // BC, H, K).sum(axis=2)).reshape(B, Tp, H, K)
    zero = jnp.zeros_like
    return (dq, dk, dv.astype(v.dtype), dG, db.astype(beta.dtype), ds0, zero(run), zero(fs),
            zero(ls))


_kda_core.defvjp(_kda_core_fwd, _kda_core_bwd)


def _state_tile(programs_per_tile, V, widths=(64, 32, 16)):
    """The widest V tile whose state-kernel grid still covers the multiprocessors: the chunk
    loop is sequential, so at B*H = 16 a 64-wide tile leaves three quarters of an H100/H200
    idle (1x128K, the state kernel before the output joined it: 13.9 ms at 64, 10.3 ms at 16)."""
    sms = multiprocessor_count()
    for w in widths:
        if programs_per_tile * max(V // w, 1) >= sms:
            return w
    return widths[-1]


def _state_settings(B, H, V, dtype, block_v_state=None, num_stages_state=None, matmul_state=None,
                    num_stages_state_bwd=None):
    """{bv_state, stages_state, stages_state_bwd, mm_state} of `_Cfg`, the defaults filled in
    (see chunk_kda_gpu)."""
    mm = matmul_state or ("ieee" if dtype == jnp.float32 else "bf16")
    bv = min(block_v_state or _state_tile(B * H, V), V)
    # H200: 3 forward stages 4.07 -> 3.34 ms at 1x131072x16 (tile 16), 0.72 -> 0.57 ms at
    # 8x4096x16 (tile 64); 3 backward stages were slower (0.85 -> 0.99 ms at 8x4096x16).
    return dict(bv_state=bv, stages_state=num_stages_state or (3 if mm == "bf16" else 1), mm_state=mm,
                stages_state_bwd=num_stages_state_bwd or (2 if mm == "bf16" else 1))


def _pow2_at_least_16(n):
    return max(16, 1 << (n - 1).bit_length())


def chunk_kda_gpu(
    q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
    use_qk_l2norm_in_kernel=False, segment_ids=None, chunk_size=64, interpret=False,
    block_v=64, block_k=32, block_k_intra=64, block_k_channels=64, num_warps_intra=4, num_warps_state=4,
    num_warps_blocks=4, num_warps_diag=1, num_stages=2, block_v_state=None, num_stages_state=None,
    num_stages_state_bwd=None, matmul=None, matmul_state=None, diagonal="levels", gate=None,
):
    """Chunked KDA with the Pallas Triton kernels (inputs validated by the caller).

    The jnp prologue (XLA-fused) normalises/scales q and k, takes the in-chunk cumsum of g
    in fp32, pads T to a multiple of the chunk and K, V to powers of two (zero tokens and
    zero channels leave the state unchanged), and turns segment ids into run masks.
    matmul: "ieee" | "tf32" | "bf16" (default: "ieee" for fp32 inputs, "bf16" otherwise: bf16
      operands and fp32 accumulation in the per-chunk products, as fla does, except the
      in-block pairs, which take at least tf32; with bf16, h, dh, v_new and d v_new are stored
      in bf16 too); matmul_state: the same for the state kernels' products (default: "ieee"
      for fp32 inputs, "bf16" otherwise, with fp32 state and accumulation).
    gate: None (g is the log-decay) or (A_log, dt_bias, lower_bound): g is the raw gate, and
      one kernel computes kda_gate and the in-chunk cumsum (`chunk_local_gate_cumsum`).
    diagonal: how the forward's diag kernel forms the pairs inside each 16-token block:
      "levels" (the in-block split of `_level_pairs`: tensor-core products whose factors are
      <= 1 at any decay; the default, 1.1 ms against 1.9 ms at B=8, T=4096, H=16 on an H200)
      or "loop" (one key row per step, pairwise exps). The backward always uses the levels.
    block_k / block_k_intra / block_k_channels: K tile of the per-chunk kernels, of the
      forward's intra kernel (64: 4.45 -> 3.77 ms at 1x131072x16 on an H200, where the diag
      kernel prefers 32) and of the backward's channel kernel (64: 5.20 -> 4.02 ms at
      8x4096x16 on an H200).
    num_stages: Triton pipeline stages of the per-chunk kernels (their K / V tile loops): 2
      (against 1 on an H200: diag 3.45 -> 2.73 ms at 1x131072x16; all eight kernels 10.8 ->
      10.0 ms at 8x4096x16, pairs_bwd and prep_bwd gaining most).
    block_v_state / num_stages_state / num_stages_state_bwd: V tile and pipeline stages of the
      two sequential state kernels (forward, backward), whose grid is only (B, H, V / tile);
      None picks the widest tile that still gives every multiprocessor a program
      (`_state_tile`). With bf16 products Triton then loads the next chunks' tiles during this
      chunk's products: 3 forward and 2 backward stages; 1 otherwise (2 stages with tf32
      products doubled state_bwd's time; docs/kda.md).
    """
    if diagonal not in ("levels", "loop"):
        raise ValueError(f"chunk_kda_gpu: diagonal must be 'levels' or 'loop', got {diagonal!r}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    dt = q.dtype
    qs, ks = prepare_qk(q, k, scale, use_qk_l2norm_in_kernel)
    Kp, Vp = _pow2_at_least_16(K), _pow2_at_least_16(V)
    Tp = -(-T // C) * C

    def pad(x, last=None):
        widths = [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2)
        if last is not None:
            widths[-1] = (0, last - x.shape[-1])
        return jnp.pad(x, widths)

    qs, ks = pad(qs.astype(dt), Kp), pad(ks.astype(dt), Kp)
    vp = pad(v, Vp)
    if gate is None:
        G = chunk_local_cumsum(pad(g.astype(jnp.float32), Kp), C, interpret=interpret)
    else:  # padded tokens (t >= T) get zero log-decay; padded channels meet zero q and k
        A_log, dt_bias, lower_bound = gate
        bias = (None if dt_bias is None else
                jnp.pad(dt_bias.reshape(H, K).astype(jnp.float32), [(0, 0), (0, Kp - K)]))
        G = chunk_local_gate_cumsum(pad(g, Kp), A_log, bias, chunk_size=C, length=T,
                                    lower_bound=lower_bound, interpret=interpret)
    bp = pad(beta.astype(jnp.float32))
    s0 = (jnp.zeros((B, H, Kp, Vp), jnp.float32) if initial_state is None else
          jnp.pad(initial_state.astype(jnp.float32), [(0, 0), (0, 0), (0, Kp - K), (0, Vp - V)]))
    seg = segment_ids is not None
    if seg:
        run = jnp.cumsum(segment_resets(segment_ids, B, T), axis=1, dtype=jnp.int32)
        run = jnp.pad(run, [(0, 0), (0, Tp - T)], mode="edge").reshape(B, Tp // C, C)
        before = jnp.concatenate([run[:, :1, :1], run[:, :-1, -1:]], axis=1)  # run before chunk
        fs = (run == before).reshape(B, Tp).astype(jnp.float32)
        ls = (run == run[:, :, -1:]).reshape(B, Tp).astype(jnp.float32)
        run = run.reshape(B, Tp).astype(jnp.float32)
    else:
        run = fs = ls = jnp.zeros((B, Tp), jnp.float32)
    cfg = _Cfg(C=C, seg=seg, interpret=interpret, bv=min(block_v, Vp), bk=min(block_k, Kp),
               bk_intra=min(block_k_intra, Kp), bk_channels=min(block_k_channels, Kp),
               warps_intra=num_warps_intra, warps_state=num_warps_state,
               warps_blocks=num_warps_blocks, warps_diag=num_warps_diag, stages=num_stages,
               mm=matmul or ("ieee" if dt == jnp.float32 else "bf16"), diag=diagonal,
               **_state_settings(B, H, Vp, dt, block_v_state, num_stages_state, matmul_state,
                                 num_stages_state_bwd))
    o, sT = _kda_core(qs, ks, vp, G, bp, s0, run, fs, ls, cfg)
    o = o[:, :T, :, :V]
    return o, (sT[:, :, :K, :V] if output_final_state else None)
