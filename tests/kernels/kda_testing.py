"""Shared helpers for the KDA tests: random inputs and the RMS-relative error."""

import jax
import jax.numpy as jnp
import numpy as np


def rms_rel(x, ref):
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.sqrt(np.mean((x - ref) ** 2) / max(np.mean(ref ** 2), 1e-30)))


def make_inputs(seed, B, T, H, K, V, *, g_min=-3.0, beta_mode="random", dtype=jnp.float32,
                with_state=False, segments=False):
    """Random KDA inputs. g in [g_min, 0]; beta random, or pinned to 0/1 on some tokens."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    q = jax.random.normal(ks[0], (B, T, H, K), jnp.float32)
    k = jax.random.normal(ks[1], (B, T, H, K), jnp.float32)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (B, T, H, V), jnp.float32)
    g = g_min * jax.random.uniform(ks[3], (B, T, H, K), jnp.float32)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H), jnp.float32))
    if beta_mode == "extremes":
        pick = jax.random.randint(ks[5], (B, T, H), 0, 3)
        beta = jnp.where(pick == 0, 0.0, jnp.where(pick == 1, 1.0, beta))
    s0 = jax.random.normal(ks[6], (B, H, K, V), jnp.float32) if with_state else None
    seg = None
    if segments:
        # Left padding (segment 0) on row 0, several documents per row, one 1-token document.
        rng = np.random.default_rng(seed)
        seg = np.zeros((B, T), np.int32)
        for b in range(B):
            cuts = np.sort(rng.choice(np.arange(1, T), size=min(3, T - 1), replace=False)) \
                if T > 1 else np.array([], int)
            ids = np.searchsorted(cuts, np.arange(T), side="right") + (0 if b == 0 else 1)
            seg[b] = ids
        seg = jnp.asarray(seg)
    cast = lambda x: x.astype(dtype)
    return dict(q=cast(q), k=cast(k), v=cast(v), g=g, beta=beta), s0, seg
