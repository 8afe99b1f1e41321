"""KDA Pallas kernel on the accelerator: bf16 inputs vs the fp32 jnp oracle (T=4096, K=V=128)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.kda.chunk_gpu import chunk_kda_gpu
from pallas_kernels.kda.reference import chunk_kda_reference


def _rms_rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.sqrt(np.mean((x - ref) ** 2) / np.mean(ref ** 2)))


@pytest.mark.parametrize("chunk_size,segments,diagonal", [
    (64, False, "levels"), (64, True, "levels"), (32, False, "levels"), (64, True, "loop")])
def test_bf16_kernel_matches_fp32_oracle(chunk_size, segments, diagonal):
    B, T, H, K, V = 1, 4096, 2, 128, 128
    ks = jax.random.split(jax.random.PRNGKey(chunk_size + segments), 8)
    bf = jnp.bfloat16
    q = jax.random.normal(ks[0], (B, T, H, K)).astype(bf)
    k = jax.random.normal(ks[1], (B, T, H, K)).astype(bf)
    v = jax.random.normal(ks[2], (B, T, H, V)).astype(bf)
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, H, K)) * 2)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H))).astype(bf)
    s0 = jax.random.normal(ks[5], (B, H, K, V))
    seg = (jnp.cumsum(jax.random.uniform(ks[6], (B, T)) < 2e-3, axis=1).astype(jnp.int32)
           if segments else None)
    w = jax.random.normal(ks[7], (B, T, H, V))
    ws = jax.random.normal(ks[6], (B, H, K, V))

    def loss(fn, *a):
        o, sT = fn(*a[:5], initial_state=a[5], output_final_state=True, segment_ids=seg,
                   use_qk_l2norm_in_kernel=True, chunk_size=chunk_size)
        return jnp.sum(o.astype(jnp.float32) * w) + jnp.sum(sT * ws), (o, sT)

    ours = jax.jit(jax.value_and_grad(
        lambda *a: loss(lambda *b, **kw: chunk_kda_gpu(*b, diagonal=diagonal, **kw), *a),
        argnums=range(6), has_aux=True))
    ref = jax.jit(jax.value_and_grad(lambda *a: loss(chunk_kda_reference, *a),
                                     argnums=range(6), has_aux=True))
    args = (q, k, v, g, beta, s0)
    with jax.default_matmul_precision("highest"):
        (_, (o_r, s_r)), g_r = ref(*(x.astype(jnp.float32) for x in args))
    (_, (o, s)), g_o = ours(*args)
    errs = {"o": _rms_rel(o, o_r), "final_state": _rms_rel(s, s_r)}
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "ds0"), g_o, g_r, strict=True):
        assert np.isfinite(np.asarray(a, np.float32)).all(), name
        errs[name] = _rms_rel(a, b)
    print(errs)
    assert all(e <= 5e-3 for e in errs.values()), errs
