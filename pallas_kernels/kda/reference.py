"""Pure-jnp oracles for Kimi Delta Attention (KDA).

Per head, with S_t in R^{K x V} (K = key head dim, V = value head dim):

    S_t = (I - b_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + b_t k_t v_t^T
    o_t = S_t^T (scale * q_t)

`segment_ids` (int, [B, T]) reset the state to zero at every change of segment id,
so each packed document computes exactly what it computes alone. The initial state
belongs to the segment of the first token. Segment 0 (padding) is an ordinary id here.

Two oracles:
* `recurrent_kda_reference`: token by token (lax.scan), the definition itself.
* `chunk_kda_reference`: chunkwise-parallel form (UT/WY transform inside each chunk,
  float32 state between chunks). The pairwise decay tensor is built for one chunk at a
  time inside a scan, masked before `exp` so no exponent is ever positive.

Both take inputs in the layout of fla / DESIGN.md: q, k, g [B,T,H,K], v [B,T,H,V],
beta [B,T,H], initial_state [B,H,K,V]; they return (o [B,T,H,V] in v.dtype,
final_state [B,H,K,V] float32 or None).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

L2NORM_EPS = 1e-6  # fla / transformers: x / sqrt(sum(x^2) + eps)



def unit_lower_inverse(L: jax.Array) -> jax.Array:
    """(I + L)^-1 for strictly lower-triangular L [..., C, C], by the doubling product
    (I - L)(I + L^2)(I + L^4)... (L is nilpotent, L^C = 0): matrix products only. A LAPACK
    triangular solve would also do, but jaxlib's CPU solver parallelises batches on XLA's
    intra-op pool and was seen to deadlock inside a jitted training step on 2 cores."""
    C = L.shape[-1]
    eye = jnp.eye(C, dtype=L.dtype)
    mm = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
    power, inverse, n = -L, eye - L, 2
    while n < C:
        power = mm(power, power)  # (-L)^n
        inverse = mm(inverse, eye + power)
        n *= 2
    return inverse

def l2norm(x: jax.Array, eps: float = L2NORM_EPS) -> jax.Array:
    """fla's L2 normalisation of the last axis (float32)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def prepare_qk(q, k, scale, use_qk_l2norm_in_kernel):
    """float32 q (normalised if asked, then scaled) and k (normalised if asked)."""
    q = q.astype(jnp.float32)
    k = k.astype(jnp.float32)
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return q * scale, k


def segment_resets(segment_ids: jax.Array | None, batch: int, length: int) -> jax.Array:
    """[B, T] bool: True where the state is reset before the token (segment change)."""
    if segment_ids is None:
        return jnp.zeros((batch, length), bool)
    seg = segment_ids.astype(jnp.int32)
    prev = jnp.concatenate([seg[:, :1], seg[:, :-1]], axis=1)
    return seg != prev


def recurrent_kda_reference(
    q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
    use_qk_l2norm_in_kernel=False, segment_ids=None,
):
    """Token-by-token KDA (the definition). See the module docstring."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k = prepare_qk(q, k, scale, use_qk_l2norm_in_kernel)
    reset = segment_resets(segment_ids, B, T)
    xs = (
        jnp.moveaxis(q, 1, 0), jnp.moveaxis(k, 1, 0),
        jnp.moveaxis(v.astype(jnp.float32), 1, 0), jnp.moveaxis(g.astype(jnp.float32), 1, 0),
        jnp.moveaxis(beta.astype(jnp.float32), 1, 0), jnp.moveaxis(reset, 1, 0),
    )
    s0 = (jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))

    def step(s, x):
        q_t, k_t, v_t, g_t, b_t, r_t = x
        s = jnp.where(r_t[:, None, None, None], 0.0, s)
        s = s * jnp.exp(g_t)[..., None]
        kv = jnp.einsum("bhk,bhkv->bhv", k_t, s)
        s = s + jnp.einsum("bhk,bhv->bhkv", k_t, b_t[..., None] * (v_t - kv))
        return s, jnp.einsum("bhk,bhkv->bhv", q_t, s)

    s, o = jax.lax.scan(step, s0, xs)
    o = jnp.moveaxis(o, 0, 1).astype(v.dtype)
    return o, (s if output_final_state else None)


def chunk_kda_reference(
    q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
    use_qk_l2norm_in_kernel=False, segment_ids=None, chunk_size=64,
):
    """Chunkwise KDA (UT transform per chunk, fp32 state between chunks)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = int(chunk_size)
    q, k = prepare_qk(q, k, scale, use_qk_l2norm_in_kernel)
    # Run ids (count of resets so far): unlike raw ids, equal only within one contiguous run.
    seg = jnp.cumsum(segment_resets(segment_ids, B, T), axis=1, dtype=jnp.int32)
    pad = (-T) % C
    n = (T + pad) // C

    def to_chunks(x):  # [B,T,H,...] -> [N,B,H,C,...]; zero tokens leave the state unchanged
        x = jnp.pad(x.astype(jnp.float32), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(B, n, C, H, *x.shape[3:])
        return jnp.moveaxis(jnp.moveaxis(x, 3, 2), 1, 0)

    qc, kc, vc, gc, bc = (to_chunks(x) for x in (q, k, v, g, beta))
    seg_p = jnp.pad(seg, [(0, 0), (0, pad)], mode="edge")
    # Run of the token before each chunk (for chunk 0: the first token's own).
    prev = jnp.concatenate([seg_p[:, :1], seg_p[:, C - 1:-1:C]], axis=1)  # [B,N]
    seg_c = jnp.moveaxis(seg_p.reshape(B, n, C), 1, 0)  # [N,B,C]
    prev_c = jnp.moveaxis(prev, 1, 0)  # [N,B]

    s0 = (jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))
    idx = jnp.arange(C)
    causal = idx[:, None] >= idx[None, :]
    strict = idx[:, None] > idx[None, :]

    def step(s, x):
        q_c, k_c, v_c, g_c, b_c, sg, sp = x  # [B,H,C,*], sg [B,C], sp [B]
        G = jnp.cumsum(g_c, axis=-2)  # [B,H,C,K]
        same = (sg[:, :, None] == sg[:, None, :])[:, None]  # [B,1,C,C]
        keep = same & causal[None, None]
        diff = G[..., :, None, :] - G[..., None, :, :]  # [B,H,C,C,K] (this chunk only)
        dec = jnp.exp(jnp.where(keep[..., None], diff, -jnp.inf))
        A = jnp.einsum("bhtk,bhjk,bhtjk->bhtj", k_c, k_c, dec) * strict
        P = jnp.einsum("bhtk,bhjk,bhtjk->bhtj", q_c, k_c, dec)
        # u = (I + diag(b) A)^-1 diag(b) (v - (k*Gamma) S0): the UT transform.
        Tm = unit_lower_inverse(b_c[..., :, None] * A) * b_c[..., None, :]
        from_start = (sg == sp[:, None])[:, None, :, None]  # no reset since chunk start
        gam = jnp.exp(jnp.where(from_start, G, -jnp.inf))  # [B,H,C,K]
        W = Tm @ (k_c * gam)
        u = Tm @ v_c - W @ s
        o = (q_c * gam) @ s + P @ u
        last_same = same[..., -1, :, None]  # [B,1,C,1]: token j shares the last token's segment
        kdec = k_c * jnp.exp(jnp.where(last_same, G[..., -1:, :] - G, -jnp.inf))
        s = gam[..., -1, :, None] * s + jnp.swapaxes(kdec, -1, -2) @ u
        return s, o

    s, o = jax.lax.scan(step, s0, (qc, kc, vc, gc, bc, seg_c, prev_c))
    o = jnp.moveaxis(jnp.moveaxis(o, 0, 1), 2, 3).reshape(B, n * C, H, V)[:, :T]
    return o.astype(v.dtype), (s if output_final_state else None)
