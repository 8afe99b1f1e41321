"""Chunked KDA in Pallas (Triton backend) with a hand-written backward (jax.custom_vjp).

Per chunk of C tokens (C = 32 or 64), with G = in-chunk cumsum of g (fp32, <= 0 and
decreasing), Gam_t = exp(G_t), S0 the state entering the chunk:

    A[t,j] = sum_d k_td k_jd exp(G_td - G_jd)   (j < t)        key-key decays
    P[t,j] = sum_d q_td k_jd exp(G_td - G_jd)   (j <= t)       query-key decays
    M = (I + diag(b) A)^-1,  T = M diag(b)                     UT transform
    W = T (k * Gam),  U = T v,  u = U - W S0                   "new values"
    o = (q * Gam) S0 + P u
    S1 = diag(exp(G_C)) S0 + (k * exp(G_C - G))^T u

Kernels (all fp32 accumulation; matmul operands in the input dtype):
  _intra_fwd   grid (B,H,NT), parallel over chunks: A, P, M, W, U. The chunk is split into
               16-row blocks. Off-diagonal blocks (I > J) factor exp(G_t - G_j) through a
               reference row r = G[last row of J]: exp(G_t - r) * exp(r - G_j), both
               exponents <= 0, so the product is a tensor-core matmul. Diagonal blocks are
               built pairwise ([16,16,BK] tiles, masked before exp). M is the block
               inverse: diagonal 16x16 blocks by the doubling product
               (I+N)(I+N^2)(I+N^4)(I+N^8), N = -diag(b)A, off-diagonal blocks by block
               substitution M_IJ = -M_II sum_m L_Im M_mJ (matrix products, no row loop).
  _state_fwd   grid (B,H,V/BV), sequential over chunks: state recurrence, o, per-chunk
               states h (kept for the backward pass).
  _state_bwd   grid (B,H,V/BV), reverse over chunks: dS, du, and the V-partial sums of
               dW, dP, d(q*Gam), d(k*exp(G_C-G)), d exp(G_C).
  _intra_bwd   grid (B,H,NT): recomputes A, M, T and turns those into dq, dk, dv, dG, db.
Segment resets enter as masks on A, P, Gam and the state update (run ids / flags),
never as -inf in G.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

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


def _tri(n, strict):
    r = lax.broadcasted_iota(jnp.int32, (n, n), 0)
    c = lax.broadcasted_iota(jnp.int32, (n, n), 1)
    return (r > c) if strict else (r >= c)


def _blk(ref, i, cols=None):
    """Rows [16i, 16i+16) of a 2-D ref (optionally a column slice), as float32."""
    if cols is None:
        return _f32(ref[pl.ds(i * BC, BC), :])
    return _f32(ref[pl.ds(i * BC, BC), cols])


def _vec(ref, i):
    return _f32(ref[pl.ds(i * BC, BC)])


class _Chunk:
    """Loads of one chunk's blocks inside an intra kernel (refs are [C, ...])."""

    def __init__(self, q_ref, k_ref, g_ref, run_ref, fs_ref, K, seg, bk):
        self.q, self.k, self.g = q_ref, k_ref, g_ref
        self.run, self.fs = run_ref, fs_ref
        self.K, self.seg, self.bk = K, seg, bk

    def same(self, i, j):
        if not self.seg:
            return None
        return _vec(self.run, i)[:, None] == _vec(self.run, j)[None, :]

    def gam(self, i):
        """exp(G) of block i, zero on rows cut off from the chunk start by a reset."""
        G = _blk(self.g, i)
        if self.seg:
            G = jnp.where(_vec(self.fs, i)[:, None] > 0, G, -jnp.inf)
        return jnp.exp(G)

    def off_factors(self, i, j):
        """(exp(G_i - r), exp(r - G_j)) for i > j, r = last row of block j; both <= 1."""
        r = _f32(self.g[pl.ds(j * BC + BC - 1, 1), :])  # [1, K]
        return jnp.exp(_blk(self.g, i) - r), jnp.exp(r - _blk(self.g, j))


def _ktiles(K, bk, body, init):
    """fori_loop over K tiles of width bk (a loop, not unrolled, to keep the IR small)."""
    def step(t, carry):
        return body(pl.ds(pl.multiple_of(t * bk, bk), bk), carry)
    return lax.fori_loop(0, K // bk, step, init)


def _diag_rows(ch, i, cols, want_p):
    """Diagonal block (A_ii, P_ii) of one K tile by a loop over the key row j: [16,bk] tiles."""
    G, k = _blk(ch.g, i, cols), _blk(ch.k, i, cols)
    q = _blk(ch.q, i, cols) if want_p else None
    row = lax.broadcasted_iota(jnp.int32, G.shape, 0)
    col = lax.broadcasted_iota(jnp.int32, (BC, BC), 1)

    def body(j, acc):
        a, p = acc
        r = i * BC + j
        ke = _f32(ch.k[pl.ds(r, 1), cols]) * jnp.exp(
            jnp.where(row >= j, G - _f32(ch.g[pl.ds(r, 1), cols]), -jnp.inf))
        a = a + jnp.where(col == j, jnp.sum(k * ke, axis=1, keepdims=True), 0.0)
        if want_p:
            p = p + jnp.where(col == j, jnp.sum(q * ke, axis=1, keepdims=True), 0.0)
        return a, p

    zero = jnp.zeros((BC, BC), jnp.float32)
    return lax.fori_loop(0, BC, body, (zero, zero))


def _pairwise(ch, nb, mm, want_p):
    """A (strictly lower) and P (lower) as dicts of 16x16 blocks {(i, j): block}, i >= j."""
    def diag_tile(cols, acc):
        out = []
        for i in range(nb):
            a, p = _diag_rows(ch, i, cols, want_p)
            out += [acc[2 * i] + a, acc[2 * i + 1] + p]
        return tuple(out)

    zero = jnp.zeros((BC, BC), jnp.float32)
    diag = _ktiles(ch.K, ch.bk, diag_tile, (zero,) * (2 * nb))
    strict = _tri(BC, strict=True)
    A, P = {}, {}
    for i in range(nb):
        A[i, i] = jnp.where(strict, diag[2 * i], 0.0)
        P[i, i] = diag[2 * i + 1]
        for j in range(i):
            fi, fj = ch.off_factors(i, j)
            kj = _blk(ch.k, j) * fj
            A[i, j] = _mm_nt(_blk(ch.k, i) * fi, kj, mm)
            if want_p:
                P[i, j] = _mm_nt(_blk(ch.q, i) * fi, kj, mm)
        if ch.seg:
            for j in range(i + 1):
                same = ch.same(i, j)
                A[i, j] = jnp.where(same, A[i, j], 0.0)
                if want_p:
                    P[i, j] = jnp.where(same, P[i, j], 0.0)
    return A, P


def _inverse(A, betas, nb):
    """Blocks of M = (I + L)^-1, L = diag(b) A (block lower triangular): fp32 products."""
    eye = jnp.where(lax.broadcasted_iota(jnp.int32, (BC, BC), 0)
                    == lax.broadcasted_iota(jnp.int32, (BC, BC), 1), 1.0, 0.0)
    L = {(i, j): betas[i][:, None] * A[i, j] for i in range(nb) for j in range(i + 1)}
    M = {}
    for i in range(nb):
        n = -L[i, i]
        m = eye + n
        for _ in range(3):  # (I+N)(I+N^2)(I+N^4)(I+N^8): N is 16x16 nilpotent
            n = _mm(n, n)
            m = m + _mm(m, n)
        M[i, i] = m
        for j in range(i):
            s = _mm(L[i, j], M[j, j])
            for m_ in range(j + 1, i):
                s = s + _mm(L[i, m_], M[m_, j])
            M[i, j] = -_mm(M[i, i], s)
    return M


# ----------------------------------------------------------------------------- kernels
def _iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def _chunk_pairs(q_ref, k_ref, g_ref, *, C, K, bk, mm):
    """A (k-k) and P (q-k) decayed products of one chunk as whole [C, C] matrices.

    Off the diagonal 16-blocks, for each key block j the reference row r = G[last row of j]
    factors exp(G_t - G_s) = exp(G_t - r) exp(r - G_s) (both <= 1 where kept, masked before
    exp elsewhere): one [C,bk]x[bk,C] tensor-core product per key block. On the diagonal
    blocks the 16 key rows of every block are handled together: step jj broadcasts row jj of
    each block to that block's rows ([C,bk] tiles) and fills column 16*block + jj.
    Returns A (strictly lower, diagonal entries not yet masked) and P (lower)."""
    nb = C // BC
    blk = _iota((C, bk), 0) // BC
    rin = _iota((C, bk), 0) % BC
    diag_col = (_iota((C, C), 0) // BC) * BC  # first column of the row's diagonal block
    col = _iota((C, C), 1)

    def tile(cols, acc):
        A, P = acc
        G, k, q = _f32(g_ref[:, cols]), _f32(k_ref[:, cols]), _f32(q_ref[:, cols])
        for j in range(nb - 1):
            r = _f32(g_ref[pl.ds(j * BC + BC - 1, 1), cols])
            e_left = jnp.exp(jnp.where(blk > j, G - r, -jnp.inf))
            right = k * jnp.exp(jnp.where(blk == j, r - G, -jnp.inf))
            A = A + _mm_nt(k * e_left, right, mm)
            P = P + _mm_nt(q * e_left, right, mm)

        def row(jj, acc):
            A, P = acc
            Gj = jnp.zeros_like(G)
            kj = jnp.zeros_like(G)
            for i in range(nb):
                Gj = jnp.where(blk == i, _f32(g_ref[pl.ds(i * BC + jj, 1), cols]), Gj)
                kj = jnp.where(blk == i, _f32(k_ref[pl.ds(i * BC + jj, 1), cols]), kj)
            ke = kj * jnp.exp(jnp.where(rin >= jj, G - Gj, -jnp.inf))
            sel = col == diag_col + jj
            A = A + jnp.where(sel, jnp.sum(k * ke, axis=1, keepdims=True), 0.0)
            P = P + jnp.where(sel, jnp.sum(q * ke, axis=1, keepdims=True), 0.0)
            return A, P

        return lax.fori_loop(0, BC, row, (A, P))

    zero = jnp.zeros((C, C), jnp.float32)
    return _ktiles(K, bk, tile, (zero, zero))


def _unit_lower_inverse(L, C, mm):
    """(I + L)^-1 for strictly lower L [C,C], C <= 64, by matrix products only.

    D = the diagonal 16-blocks of L: (I+D)^-1 = (I+N)(I+N^2)(I+N^4)(I+N^8), N = -D
    (nilpotent of order 16). With F = (I+D)^-1 (L - D), block strictly lower over at most
    4 blocks so F^4 = 0: (I+L)^-1 = (I+F)^-1 (I+D)^-1 = (I - F)(I + F^2) (I+D)^-1."""
    eye = jnp.where(_iota((C, C), 0) == _iota((C, C), 1), 1.0, 0.0)
    same_blk = (_iota((C, C), 0) // BC) == (_iota((C, C), 1) // BC)
    D = jnp.where(same_blk, L, 0.0)
    n = -D
    md = eye + n
    for _ in range(3):
        n = _mm(n, n, mm)
        md = md + _mm(md, n, mm)
    F = _mm(md, L - D, mm)
    i_f = eye - F
    return _mm(i_f + _mm(i_f, _mm(F, F, mm), mm), md, mm)


def _intra_fwd_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, run_ref, fs_ref, ls_ref,
                      w_ref, u_ref, p_ref, kd_ref, *, C, K, V, seg, bk, bv, mm):
    A, P = _chunk_pairs(q_ref, k_ref, g_ref, C=C, K=K, bk=bk, mm=mm)
    strict = _iota((C, C), 0) > _iota((C, C), 1)
    A = jnp.where(strict, A, 0.0)
    P = jnp.where(strict | (_iota((C, C), 0) == _iota((C, C), 1)), P, 0.0)
    if seg:
        run = _f32(run_ref[...])
        same = run[:, None] == run[None, :]
        A, P = jnp.where(same, A, 0.0), jnp.where(same, P, 0.0)
    p_ref[...] = P
    beta = _f32(b_ref[...])
    T = _unit_lower_inverse(beta[:, None] * A, C, mm) * beta[None, :]
    fs = _f32(fs_ref[...])[:, None] > 0 if seg else None
    ls = _f32(ls_ref[...])[:, None] > 0 if seg else None

    def k_tile(cols, carry):
        G, k = _f32(g_ref[:, cols]), _f32(k_ref[:, cols])
        Gl = _f32(g_ref[pl.ds(C - 1, 1), cols])
        gam = jnp.exp(jnp.where(fs, G, -jnp.inf) if seg else G)
        dec = jnp.exp(jnp.where(ls, Gl - G, -jnp.inf) if seg else Gl - G)
        w_ref[:, cols] = _mm(T, k * gam, mm)
        kd_ref[:, cols] = k * dec
        return carry

    def v_tile(cols, carry):
        u_ref[:, cols] = _mm(T, v_ref[:, cols], mm)
        return carry

    _ktiles(K, bk, k_tile, 0)
    _ktiles(V, bv, v_tile, 0)


def _state_fwd_kernel(g_ref, fs_ref, w_ref, u_ref, kd_ref, s0_ref, h_ref, vn_ref, sT_ref,
                      *, C, NT, seg, mm):
    """The sequential part only: per chunk v_new = u - W S, S <- exp(G_C) S + kd^T v_new."""
    def body(n, s):
        t0 = pl.multiple_of(n * C, C)
        h_ref[n] = s
        vn = _f32(u_ref[pl.ds(t0, C), :]) - _mm(w_ref[pl.ds(t0, C), :], s, mm)
        vn_ref[pl.ds(t0, C), :] = vn
        Gl = _f32(g_ref[pl.ds(t0 + C - 1, 1), :])  # [1, K]
        if seg:
            Gl = jnp.where(_f32(fs_ref[pl.ds(t0 + C - 1, 1)])[:, None] > 0, Gl, -jnp.inf)
        return jnp.transpose(jnp.exp(Gl)) * s + _mm_tn(kd_ref[pl.ds(t0, C), :], vn, mm)

    sT_ref[...] = lax.fori_loop(0, NT, body, _f32(s0_ref[...]))


def _out_fwd_kernel(q_ref, g_ref, fs_ref, p_ref, h_ref, vn_ref, o_ref, *, seg, mm):
    """o = (q * exp(G)) S_chunk + P v_new: independent per chunk."""
    G = _f32(g_ref[...])
    if seg:
        G = jnp.where(_f32(fs_ref[...])[:, None] > 0, G, -jnp.inf)
    qg = _f32(q_ref[...]) * jnp.exp(G)
    o = _mm(qg, h_ref[...], mm) + _mm(p_ref[...], vn_ref[...], mm)
    o_ref[...] = o.astype(o_ref.dtype)


def _chunk_terms(q_ref, k_ref, g_ref, fs_ref, ls_ref, t0, C, seg):
    """q*Gam, k*exp(G_C - G), exp(G_C) for the chunk starting at t0 (sequence refs)."""
    G = _f32(g_ref[pl.ds(t0, C), :])
    Gl = _f32(g_ref[pl.ds(t0 + C - 1, 1), :])  # [1, K]
    if seg:
        fs = _f32(fs_ref[pl.ds(t0, C)])[:, None] > 0
        ls = _f32(ls_ref[pl.ds(t0, C)])[:, None] > 0
        gam = jnp.exp(jnp.where(fs, G, -jnp.inf))
        kdec = jnp.exp(jnp.where(ls, Gl - G, -jnp.inf))
        fs_last = _f32(fs_ref[pl.ds(t0 + C - 1, 1)])[:, None] > 0  # [1, 1]
        gl = jnp.exp(jnp.where(fs_last, Gl, -jnp.inf))
    else:
        gam, kdec, gl = jnp.exp(G), jnp.exp(Gl - G), jnp.exp(Gl)
    qg = _f32(q_ref[pl.ds(t0, C), :]) * gam
    kd = _f32(k_ref[pl.ds(t0, C), :]) * kdec
    return qg, kd, gl


def _state_bwd_kernel(q_ref, k_ref, g_ref, fs_ref, ls_ref, w_ref, u_ref, p_ref, h_ref,
                      do_ref, dsT_ref, du_ref, dw_ref, dp_ref, dqg_ref, dkd_ref, dgl_ref,
                      ds0_ref, *, C, NT, seg, mm):
    def body(i, ds):
        n = NT - 1 - i
        t0 = pl.multiple_of(n * C, C)
        qg, kd, gl = _chunk_terms(q_ref, k_ref, g_ref, fs_ref, ls_ref, t0, C, seg)
        s = h_ref[n]
        w = w_ref[pl.ds(t0, C), :]
        u = _f32(u_ref[pl.ds(t0, C), :]) - _mm(w, s, mm)
        do = do_ref[pl.ds(t0, C), :]
        du = _mm_tn(p_ref[pl.ds(t0, C), :], do, mm) + _mm(kd, ds, mm)
        du_ref[pl.ds(t0, C), :] = du
        dw_ref[pl.ds(t0, C), :] = -_mm_nt(du, s, mm)
        dp_ref[pl.ds(t0, C), :] = _mm_nt(do, u, mm)
        dqg_ref[pl.ds(t0, C), :] = _mm_nt(do, s, mm)
        dkd_ref[pl.ds(t0, C), :] = _mm_nt(u, ds, mm)
        dgl_ref[pl.ds(n, 1), :] = jnp.transpose(jnp.sum(s * ds, axis=1, keepdims=True))
        return (_mm_tn(qg, do, mm) + jnp.transpose(gl) * ds
                - _mm_tn(w, du, mm))

    ds0_ref[...] = lax.fori_loop(0, NT, body, _f32(dsT_ref[...]))


def _diag_rows_bwd(ch, i, cols, G, q, k, dP, dA):
    """Diagonal-block terms of the backward by a loop over the key row j ([16,bk] tiles):
    rq_t = sum_j dP_tj k_j E_tj, rk_t = sum_j dA_tj k_j E_tj,
    c_j = sum_t (dP_tj q_t + dA_tj k_t) E_tj, with E_tj = exp(G_t - G_j) for j <= t."""
    row = lax.broadcasted_iota(jnp.int32, G.shape, 0)
    col = lax.broadcasted_iota(jnp.int32, (BC, BC), 1)

    def body(j, acc):
        rq, rk, cj = acc
        r = i * BC + j
        e = jnp.exp(jnp.where(row >= j, G - _f32(ch.g[pl.ds(r, 1), cols]), -jnp.inf))
        dp = jnp.sum(jnp.where(col == j, dP, 0.0), axis=1, keepdims=True)  # column j
        da = jnp.sum(jnp.where(col == j, dA, 0.0), axis=1, keepdims=True)
        ke = _f32(ch.k[pl.ds(r, 1), cols]) * e
        c = jnp.sum((dp * q + da * k) * e, axis=0, keepdims=True)
        return rq + dp * ke, rk + da * ke, cj + jnp.where(row == j, c, 0.0)

    zero = jnp.zeros(G.shape, jnp.float32)
    return lax.fori_loop(0, BC, body, (zero, zero, zero))


def _intra_bwd_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, run_ref, fs_ref, ls_ref,
                      dw_ref, du_ref, dp_ref, dqg_ref, dkd_ref, dgl_ref,
                      dq_ref, dk_ref, dv_ref, dg_ref, db_ref, *, C, K, seg, bk, mm):
    nb = C // BC
    ch = _Chunk(q_ref, k_ref, g_ref, run_ref, fs_ref, K, seg, bk)
    # Phase 1 (reductions over K and V): dT, dM, dA, db, dv.
    A, _ = _pairwise(ch, nb, mm, want_p=False)
    betas = [_vec(b_ref, i) for i in range(nb)]
    M = _inverse(A, betas, nb)
    T = {(i, j): M[i, j] * betas[j][None, :] for i in range(nb) for j in range(i + 1)}
    db = [jnp.zeros((BC,), jnp.float32) for _ in range(nb)]
    dM = {}
    for j in range(nb):  # W = T (k*Gam), U = T v
        kg = _blk(k_ref, j) * ch.gam(j)
        v = _blk(v_ref, j)
        dv = jnp.zeros((BC, dv_ref.shape[-1]), jnp.float32)
        for i in range(j, nb):
            du = _blk(du_ref, i)
            dv = dv + _mm_tn(T[i, j], du, mm)
            dT = _mm_nt(_blk(dw_ref, i), kg, mm) + _mm_nt(du, v, mm)
            db[j] = db[j] + jnp.sum(dT * M[i, j], axis=0)
            dM[i, j] = dT * betas[j][None, :]
        dv_ref[pl.ds(j * BC, BC), :] = dv.astype(dv_ref.dtype)
    X = {}  # M = (I + L)^-1:  dL = -M^T dM M^T restricted to the strictly lower part
    for i in range(nb):
        for c in range(i + 1):
            X[i, c] = sum(_mm_tn(M[a, i], dM[a, c]) for a in range(i, nb))
    strict = _tri(BC, strict=True)
    dA, dP = {}, {}
    for i in range(nb):
        for j in range(i + 1):
            dl = -sum(_mm_nt(X[i, c], M[j, c]) for c in range(j + 1))
            if i == j:
                dl = jnp.where(strict, dl, 0.0)
            db[i] = db[i] + jnp.sum(dl * A[i, j], axis=1)  # L = diag(b) A
            dA[i, j] = betas[i][:, None] * dl
            dP[i, j] = _f32(dp_ref[pl.ds(i * BC, BC), pl.ds(j * BC, BC)])
            if seg:
                same = ch.same(i, j)
                dA[i, j] = jnp.where(same, dA[i, j], 0.0)
                dP[i, j] = jnp.where(same, dP[i, j], 0.0)
    for i in range(nb):
        db_ref[pl.ds(i * BC, BC)] = db[i]

    # Phase 2: per K tile, everything is elementwise in the channel d.
    fs_last = _f32(fs_ref[pl.ds(C - 1, 1)])[:, None] > 0 if seg else None
    row = lax.broadcasted_iota(jnp.int32, (BC, bk), 0)

    def tile(cols, carry):
        Gl = _f32(g_ref[pl.ds(C - 1, 1), cols])  # [1, bk]
        gl = jnp.exp(jnp.where(fs_last, Gl, -jnp.inf)) if seg else jnp.exp(Gl)
        last = _f32(dgl_ref[:, cols]) * gl  # d/dG_C of exp(G_C) S0
        dq, dk, dG = {}, {}, {}
        for i in range(nb):
            G = _blk(g_ref, i, cols)
            q, k = _blk(q_ref, i, cols), _blk(k_ref, i, cols)
            gam = jnp.exp(jnp.where(_vec(fs_ref, i)[:, None] > 0, G, -jnp.inf)) if seg \
                else jnp.exp(G)
            dec = jnp.exp(jnp.where(_vec(ls_ref, i)[:, None] > 0, Gl - G, -jnp.inf)) if seg \
                else jnp.exp(Gl - G)
            dkg = sum(_mm_tn(T[a, i], _blk(dw_ref, a, cols), mm) for a in range(i, nb))
            dqg, dkd = _blk(dqg_ref, i, cols), _blk(dkd_ref, i, cols)
            kd = k * dec
            dq[i] = dqg * gam
            dk[i] = dkg * gam + dkd * dec
            dG[i] = dkg * k * gam + dqg * q * gam - dkd * kd
            last = last + jnp.sum(dkd * kd, axis=0, keepdims=True)
            rq, rk, cj = _diag_rows_bwd(ch, i, cols, G, q, k, dP[i, i], dA[i, i])
            dq[i] = dq[i] + rq
            dk[i] = dk[i] + rk + cj
            dG[i] = dG[i] + q * rq + k * rk - k * cj
        for i in range(nb):  # off-diagonal blocks via the reference row of block j
            for j in range(i):
                r = _f32(g_ref[pl.ds(j * BC + BC - 1, 1), cols])
                fi = jnp.exp(_blk(g_ref, i, cols) - r)
                fj = jnp.exp(r - _blk(g_ref, j, cols))
                qi, ki = _blk(q_ref, i, cols) * fi, _blk(k_ref, i, cols) * fi
                kj = _blk(k_ref, j, cols) * fj
                dqi = _mm(dP[i, j], kj, mm)
                dki = _mm(dA[i, j], kj, mm)
                dkj = _mm_tn(dP[i, j], qi, mm) + _mm_tn(dA[i, j], ki, mm)
                dq[i] = dq[i] + dqi * fi
                dk[i] = dk[i] + dki * fi
                dk[j] = dk[j] + dkj * fj
                dG[i] = dG[i] + dqi * qi + dki * ki
                dG[j] = dG[j] - dkj * kj
        dG[nb - 1] = dG[nb - 1] + jnp.where(row == BC - 1, last, 0.0)
        for i in range(nb):
            dq_ref[pl.ds(i * BC, BC), cols] = dq[i].astype(dq_ref.dtype)
            dk_ref[pl.ds(i * BC, BC), cols] = dk[i].astype(dk_ref.dtype)
            dg_ref[pl.ds(i * BC, BC), cols] = dG[i]
        return carry

    _ktiles(K, bk, tile, 0)


# ----------------------------------------------------------------------------- calls
class _Cfg(tuple):
    """Static configuration (hashable): chunk, segments, interpret, tiles, warps."""

    __slots__ = ()
    fields = ("C", "seg", "interpret", "bv", "bk", "warps_intra", "warps_state", "stages",
              "mm")

    def __new__(cls, **kw):
        return super().__new__(cls, tuple(kw[f] for f in cls.fields))

    def __getattr__(self, name):
        return self[self.fields.index(name)]


def _params(cfg, warps):
    return dict(interpret=cfg.interpret,
                compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=cfg.stages))


def _chunk_specs(C, K, V):
    """Per-(batch, head, chunk) blocks of [.,C,.,K], [.,C,.,V], [.,C,.,C], [.,C,.] and [.,C] arrays."""
    return (pl.BlockSpec((None, C, None, K), lambda b, h, n: (b, n, h, 0)),
            pl.BlockSpec((None, C, None, V), lambda b, h, n: (b, n, h, 0)),
            pl.BlockSpec((None, C, None, C), lambda b, h, n: (b, n, h, 0)),
            pl.BlockSpec((None, C, None), lambda b, h, n: (b, n, h)),
            pl.BlockSpec((None, C), lambda b, h, n: (b, n)))


def _intra_fwd(q, k, v, G, beta, run, fs, ls, cfg):
    """W, U, P and kd = k * exp(G_C - G) per chunk (parallel over chunks)."""
    B, Tp, H, K = q.shape
    V = v.shape[-1]
    C = cfg.C
    ck, cv, cp, cb, cm = _chunk_specs(C, K, V)
    kern = functools.partial(_intra_fwd_kernel, C=C, K=K, V=V, seg=cfg.seg, bk=cfg.bk,
                             bv=min(cfg.bv, V), mm=cfg.mm)
    f32 = jnp.float32
    return pl.pallas_call(
        kern, grid=(B, H, Tp // C),
        in_specs=[ck, ck, cv, ck, cb, cm, cm, cm], out_specs=[ck, cv, cp, ck],
        out_shape=[jax.ShapeDtypeStruct((B, Tp, H, K), f32),
                   jax.ShapeDtypeStruct((B, Tp, H, V), f32),
                   jax.ShapeDtypeStruct((B, Tp, H, C), f32),
                   jax.ShapeDtypeStruct((B, Tp, H, K), f32)],
        name="kda_intra_fwd", **_params(cfg, cfg.warps_intra),
    )(q, k, v, G, beta, run, fs, ls)


def _seq_specs(B, Tp, H, K, C, bv):
    return dict(
        k=pl.BlockSpec((None, Tp, None, K), lambda b, h, j: (b, 0, h, 0)),
        v=pl.BlockSpec((None, Tp, None, bv), lambda b, h, j: (b, 0, h, j)),
        p=pl.BlockSpec((None, Tp, None, C), lambda b, h, j: (b, 0, h, 0)),
        m=pl.BlockSpec((None, Tp), lambda b, h, j: (b, 0)),
        h=pl.BlockSpec((None, None, Tp // C, K, bv), lambda b, h, j: (b, h, 0, 0, j)),
        s=pl.BlockSpec((None, None, K, bv), lambda b, h, j: (b, h, 0, j)),
        pk=pl.BlockSpec((None, None, Tp, None, K), lambda b, h, j: (j, b, 0, h, 0)),
        pp=pl.BlockSpec((None, None, Tp, None, C), lambda b, h, j: (j, b, 0, h, 0)),
        pg=pl.BlockSpec((None, None, Tp // C, None, K), lambda b, h, j: (j, b, 0, h, 0)),
    )


def _state_fwd(G, fs, w, u, kd, s0, cfg):
    """Per-chunk entering states h, v_new and the final state (sequential over chunks)."""
    B, Tp, H, K = G.shape
    V = u.shape[-1]
    C, bv = cfg.C, min(cfg.bv, V)
    NT = Tp // C
    sp = _seq_specs(B, Tp, H, K, C, bv)
    kern = functools.partial(_state_fwd_kernel, C=C, NT=NT, seg=cfg.seg, mm=cfg.mm)
    f32 = jnp.float32
    return pl.pallas_call(
        kern, grid=(B, H, V // bv),
        in_specs=[sp["k"], sp["m"], sp["k"], sp["v"], sp["k"], sp["s"]],
        out_specs=[sp["h"], sp["v"], sp["s"]],
        out_shape=[jax.ShapeDtypeStruct((B, H, NT, K, V), f32),
                   jax.ShapeDtypeStruct((B, Tp, H, V), f32),
                   jax.ShapeDtypeStruct((B, H, K, V), f32)],
        name="kda_state_fwd", **_params(cfg, cfg.warps_state),
    )(G, fs, w, u, kd, s0)


def _out_fwd(q, G, fs, p, h, vn, cfg, out_dtype):
    B, Tp, H, K = q.shape
    V = vn.shape[-1]
    C = cfg.C
    ck, cv, cp, _, cm = _chunk_specs(C, K, V)
    ch = pl.BlockSpec((None, None, None, K, V), lambda b, h, n: (b, h, n, 0, 0))
    return pl.pallas_call(
        functools.partial(_out_fwd_kernel, seg=cfg.seg, mm=cfg.mm),
        grid=(B, H, Tp // C),
        in_specs=[ck, ck, cm, cp, ch, cv], out_specs=cv,
        out_shape=jax.ShapeDtypeStruct((B, Tp, H, V), out_dtype),
        name="kda_out_fwd", **_params(cfg, cfg.warps_intra),
    )(q, G, fs, p, h, vn)


def _state_bwd(q, k, G, fs, ls, w, u, p, h, do, dsT, cfg):
    B, Tp, H, K = q.shape
    V = u.shape[-1]
    C, bv = cfg.C, min(cfg.bv, V)
    NT, NV = Tp // C, V // bv
    sp = _seq_specs(B, Tp, H, K, C, bv)
    kern = functools.partial(_state_bwd_kernel, C=C, NT=NT, seg=cfg.seg, mm=cfg.mm)
    f32 = jnp.float32
    return pl.pallas_call(
        kern, grid=(B, H, NV),
        in_specs=[sp["k"], sp["k"], sp["k"], sp["m"], sp["m"], sp["k"], sp["v"], sp["p"],
                  sp["h"], sp["v"], sp["s"]],
        out_specs=[sp["v"], sp["pk"], sp["pp"], sp["pk"], sp["pk"], sp["pg"], sp["s"]],
        out_shape=[jax.ShapeDtypeStruct((B, Tp, H, V), f32),
                   jax.ShapeDtypeStruct((NV, B, Tp, H, K), f32),
                   jax.ShapeDtypeStruct((NV, B, Tp, H, C), f32),
                   jax.ShapeDtypeStruct((NV, B, Tp, H, K), f32),
                   jax.ShapeDtypeStruct((NV, B, Tp, H, K), f32),
                   jax.ShapeDtypeStruct((NV, B, NT, H, K), f32),
                   jax.ShapeDtypeStruct((B, H, K, V), f32)],
        name="kda_state_bwd", **_params(cfg, cfg.warps_state),
    )(q, k, G, fs, ls, w, u, p, h, do, dsT)


def _intra_bwd(q, k, v, G, beta, run, fs, ls, dw, du, dp, dqg, dkd, dgl, cfg):
    B, Tp, H, K = q.shape
    V = v.shape[-1]
    C = cfg.C
    ck, cv, cp, cb, cm = _chunk_specs(C, K, V)
    cg = pl.BlockSpec((None, 1, None, K), lambda b, h, n: (b, n, h, 0))
    kern = functools.partial(_intra_bwd_kernel, C=C, K=K, seg=cfg.seg, bk=cfg.bk,
                             mm=cfg.mm)
    f32 = jnp.float32
    return pl.pallas_call(
        kern, grid=(B, H, Tp // C),
        in_specs=[ck, ck, cv, ck, cb, cm, cm, cm, ck, cv, cp, ck, ck, cg],
        out_specs=[ck, ck, cv, ck, cb],
        out_shape=[jax.ShapeDtypeStruct((B, Tp, H, K), f32),
                   jax.ShapeDtypeStruct((B, Tp, H, K), f32),
                   jax.ShapeDtypeStruct((B, Tp, H, V), f32),
                   jax.ShapeDtypeStruct((B, Tp, H, K), f32),
                   jax.ShapeDtypeStruct((B, Tp, H), f32)],
        name="kda_intra_bwd", **_params(cfg, cfg.warps_intra),
    )(q, k, v, G, beta, run, fs, ls, dw, du, dp, dqg, dkd, dgl)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def _kda_core(q, k, v, G, beta, s0, run, fs, ls, cfg):
    o, _, sT = _core_fwd(q, k, v, G, beta, s0, run, fs, ls, cfg)
    return o, sT


def _core_fwd(q, k, v, G, beta, s0, run, fs, ls, cfg):
    w, u, p, kd = _intra_fwd(q, k, v, G, beta, run, fs, ls, cfg)
    h, vn, sT = _state_fwd(G, fs, w, u, kd, s0, cfg)
    return _out_fwd(q, G, fs, p, h, vn, cfg, v.dtype), h, sT


def _kda_core_fwd(q, k, v, G, beta, s0, run, fs, ls, cfg):
    o, h, sT = _core_fwd(q, k, v, G, beta, s0, run, fs, ls, cfg)
    return (o, sT), (q, k, v, G, beta, run, fs, ls, h)


def _kda_core_bwd(cfg, res, cts):
    q, k, v, G, beta, run, fs, ls, h = res
    do, dsT = cts
    # Recompute W, U, P rather than keeping them from the forward pass.
    w, u, p, _ = _intra_fwd(q, k, v, G, beta, run, fs, ls, cfg)
    du, dw, dp, dqg, dkd, dgl, ds0 = _state_bwd(q, k, G, fs, ls, w, u, p, h,
                                                do.astype(v.dtype), dsT, cfg)
    dw, dp, dqg, dkd, dgl = (x.sum(0) for x in (dw, dp, dqg, dkd, dgl))
    dq, dk, dv, dG, db = _intra_bwd(q, k, v, G, beta, run, fs, ls, dw, du, dp, dqg, dkd,
                                    dgl, cfg)
    zero = jnp.zeros_like
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dG,
            db.astype(beta.dtype), ds0, zero(run), zero(fs), zero(ls))


_kda_core.defvjp(_kda_core_fwd, _kda_core_bwd)


def _pow2_at_least_16(n):
    return max(16, 1 << (n - 1).bit_length())


def chunk_kda_gpu(
    q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
    use_qk_l2norm_in_kernel=False, segment_ids=None, chunk_size=64, interpret=False,
    block_v=64, block_k=32, num_warps_intra=4, num_warps_state=4, num_stages=1,
    matmul=None,
):
    """Chunked KDA with the Pallas Triton kernels (inputs validated by the caller).

    The jnp prologue (XLA-fused) normalises/scales q and k, takes the in-chunk cumsum of g
    in fp32, pads T to a multiple of the chunk and K, V to powers of two (zero tokens and
    zero channels leave the state unchanged), and turns segment ids into run masks.
    matmul: "ieee" | "tf32" | "bf16" (default: "ieee" for fp32 inputs, "tf32" otherwise).
    """
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
    gp = pad(g.astype(jnp.float32), Kp)
    G = jnp.cumsum(gp.reshape(B, Tp // C, C, H, Kp), axis=2).reshape(B, Tp, H, Kp)
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
               warps_intra=num_warps_intra, warps_state=num_warps_state, stages=num_stages,
               mm=matmul or ("ieee" if dt == jnp.float32 else "tf32"))
    o, sT = _kda_core(qs, ks, vp, G, bp, s0, run, fs, ls, cfg)
    o = o[:, :T, :, :V]
    return o, (sT[:, :, :K, :V] if output_final_state else None)
