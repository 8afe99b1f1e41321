"""KDA in-chunk cumsum kernels (Pallas interpret mode) vs jnp.cumsum of kda_gate; CUDA lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.kda.gate import kda_gate
from pallas_kernels.kda.gate_cumsum import chunk_local_cumsum, chunk_local_gate_cumsum


def max_rel(a, b):
    """max |a - b| / max |b| (fp32 arithmetic on the host)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all(), "non-finite kernel output (interpret mode poisons unwritten blocks)"
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def ref_cumsum(g, C):
    B, Tp, H, K = g.shape
    return jnp.cumsum(g.astype(jnp.float32).reshape(B, Tp // C, C, H, K), axis=2).reshape(g.shape)


def ref_gate_cumsum(g_raw, A_log, dt_bias, C, length, lower_bound):
    g = kda_gate(g_raw, A_log, dt_bias, lower_bound)
    g = jnp.where(jnp.arange(g.shape[1])[None, :, None, None] < length, g, 0.0)
    return ref_cumsum(g, C)


def gate_inputs(seed, B, Tp, H, K, bias_shape, dtype=jnp.float32):
    """Strong gates: g_raw up to +-20, exp(A_log) in [0.5, 16]."""
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    g_raw = jax.random.uniform(k[0], (B, Tp, H, K), minval=-20.0, maxval=20.0).astype(dtype)
    A_log = jax.random.uniform(k[1], (H,), minval=np.log(0.5), maxval=np.log(16.0))
    dt_bias = None if bias_shape is None else 2.0 * jax.random.normal(k[2], bias_shape)
    w = jax.random.normal(k[3], (B, Tp, H, K))  # the random linear functional of G
    return g_raw, A_log, dt_bias, w


@pytest.mark.parametrize("B,Tp,H,K,C", [(1, 64, 1, 16, 32), (2, 192, 3, 32, 64), (2, 192, 1, 16, 32)])
def test_chunk_local_cumsum_and_gradient_match_jnp(B, Tp, H, K, C):
    k = jax.random.split(jax.random.PRNGKey(Tp + K), 2)
    g = 10.0 * jax.random.normal(k[0], (B, Tp, H, K))
    w = jax.random.normal(k[1], (B, Tp, H, K))
    G = chunk_local_cumsum(g, C, interpret=True)
    assert G.dtype == jnp.float32
    assert max_rel(G, ref_cumsum(g, C)) <= 1e-6
    dg = jax.grad(lambda g: jnp.sum(chunk_local_cumsum(g, C, interpret=True) * w))(g)
    dg_ref = jax.grad(lambda g: jnp.sum(ref_cumsum(g, C) * w))(g)
    assert max_rel(dg, dg_ref) <= 1e-5


GATE_CASES = [  # B, Tp, H, K, C, dt_bias shape, lower_bound, length
    (1, 64, 1, 16, 32, (16,), None, 64),
    (2, 192, 3, 32, 64, (3, 32), None, 150),   # padding rows inside the last chunk
    (2, 192, 3, 16, 32, None, None, 192),
    (1, 192, 3, 32, 32, (96,), -5.0, 100),     # whole padded chunks
    (2, 64, 1, 32, 64, None, -5.0, 33),
]


@pytest.mark.parametrize("B,Tp,H,K,C,bias_shape,lower_bound,length", GATE_CASES)
def test_gate_cumsum_forward_and_gradients_match_reference(B, Tp, H, K, C, bias_shape,
                                                           lower_bound, length):
    g_raw, A_log, dt_bias, w = gate_inputs(B * Tp + K, B, Tp, H, K, bias_shape)
    kw = dict(C=C, length=length, lower_bound=lower_bound)

    def kernel(g_raw, A_log, dt_bias):
        return chunk_local_gate_cumsum(g_raw, A_log, dt_bias, chunk_size=C, length=length,
                                       lower_bound=lower_bound, interpret=True)

    G = kernel(g_raw, A_log, dt_bias)
    G_ref = ref_gate_cumsum(g_raw, A_log, dt_bias, **kw)
    assert max_rel(G, G_ref) <= 1e-6
    argnums = (0, 1) if dt_bias is None else (0, 1, 2)
    grads = jax.grad(lambda *a: jnp.sum(kernel(*a) * w), argnums)(g_raw, A_log, dt_bias)
    grads_ref = jax.grad(lambda *a: jnp.sum(ref_gate_cumsum(*a, **kw) * w), argnums)(
        g_raw, A_log, dt_bias)
    for name, a, b in zip(("g_raw", "A_log", "dt_bias"), grads, grads_ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert max_rel(a, b) <= 1e-5, name
    assert np.all(np.asarray(grads[0])[:, length:] == 0.0)


def test_bf16_g_raw_matches_reference_on_the_same_values():
    B, Tp, H, K, C, length = 1, 128, 2, 32, 64, 100
    g_raw, A_log, dt_bias, w = gate_inputs(7, B, Tp, H, K, (H, K), jnp.bfloat16)

    def kernel(g_raw, A_log, dt_bias):
        return chunk_local_gate_cumsum(g_raw, A_log, dt_bias, chunk_size=C, length=length,
                                       interpret=True)

    def ref(g_raw, A_log, dt_bias):
        return ref_gate_cumsum(g_raw, A_log, dt_bias, C, length, None)

    assert max_rel(kernel(g_raw, A_log, dt_bias), ref(g_raw, A_log, dt_bias)) <= 1e-6
    grads = jax.grad(lambda *a: jnp.sum(kernel(*a) * w), (0, 1, 2))(g_raw, A_log, dt_bias)
    grads_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * w), (0, 1, 2))(g_raw, A_log, dt_bias)
    assert grads[0].dtype == jnp.bfloat16
    # d g_raw is rounded to bf16 from fp32 values that agree to ~1e-7: at most one bf16 step.
    assert max_rel(grads[0], grads_ref[0]) <= 2.0 ** -8
    assert max_rel(grads[1], grads_ref[1]) <= 1e-5
    assert max_rel(grads[2], grads_ref[2]) <= 1e-5


def _gate_call(g_raw=None, A_log=None, dt_bias="default", chunk_size=32, length=64,
               lower_bound=None):
    g_raw = jnp.zeros((1, 64, 2, 16)) if g_raw is None else g_raw
    A_log = jnp.zeros((2,)) if A_log is None else A_log
    dt_bias = jnp.zeros((32,)) if isinstance(dt_bias, str) else dt_bias
    return chunk_local_gate_cumsum(g_raw, A_log, dt_bias, chunk_size=chunk_size, length=length,
                                   lower_bound=lower_bound, interpret=True)


@pytest.mark.parametrize("kwargs,match", [
    (dict(chunk_size=48), "chunk_size"),
    (dict(chunk_size=128), "chunk_size"),
    (dict(g_raw=jnp.zeros((1, 64, 2, 24))), "K must be a power of two"),
    (dict(g_raw=jnp.zeros((1, 64, 2, 8)), dt_bias=None), "K must be a power of two"),
    (dict(g_raw=jnp.zeros((64, 2, 16))), r"g_raw must be \[B, Tp, H, K\]"),
    (dict(A_log=jnp.zeros((3,))), "A_log must have H=2"),
    (dict(dt_bias=jnp.zeros((2, 8))), "dt_bias must have H\\*K=32"),
    (dict(lower_bound=0.0), "lower_bound must be negative"),
    (dict(lower_bound=2.0), "lower_bound must be negative"),
    (dict(length=65), "length must be in"),
])
def test_bad_gate_inputs_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _gate_call(**kwargs)


@pytest.mark.parametrize("shape,C,match", [
    ((1, 96, 1, 16), 64, "chunk_size"),
    ((1, 64, 1, 48), 32, "K must be a power of two"),
    ((1, 64, 1, 512), 32, "K must be a power of two"),
])
def test_bad_cumsum_inputs_raise_naming_the_argument(shape, C, match):
    with pytest.raises(ValueError, match=match):
        chunk_local_cumsum(jnp.zeros(shape), C, interpret=True)


def test_kernels_and_gradients_lower_for_cuda():
    B, Tp, H, K, C = 1, 128, 2, 128, 64
    raw = jnp.zeros((B, Tp, H, K), jnp.bfloat16)
    g = jnp.zeros((B, Tp, H, K))
    A_log, dt_bias = jnp.zeros((H,)), jnp.zeros((H, K))

    def cumsum_loss(g):
        return jnp.sum(chunk_local_cumsum(g, C))

    def gate_loss(lower_bound):
        return lambda r, a, d: jnp.sum(chunk_local_gate_cumsum(
            r, a, d, chunk_size=C, length=100, lower_bound=lower_bound))

    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    cases = [(cumsum_loss, (g,), 1), (jax.value_and_grad(cumsum_loss), (g,), 2)]
    for lb in (None, -5.0):
        cases += [(gate_loss(lb), (raw, A_log, dt_bias), 1),
                  (jax.value_and_grad(gate_loss(lb), (0, 1, 2)), (raw, A_log, dt_bias), 2),
                  (jax.grad(gate_loss(lb), (0, 1)), (raw, A_log, None), 1)]
    for fn, args, n in cases:
        exp = jax.export.export(jax.jit(fn), platforms=("cuda",), disabled_checks=checks)(*args)
        assert exp.mlir_module().count("__gpu$xla.gpu.triton") == n
