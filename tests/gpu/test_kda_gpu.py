"""KDA Pallas kernel on the accelerator: bf16 inputs vs the fp32 jnp oracle (T=4096, K=V=128)."""


import numpy as np
import pytest

from tests.fixtures import load_script

kda_accuracy = load_script("kda_accuracy")


@pytest.mark.parametrize("chunk_size,segments,diagonal", [
    (64, False, "levels"), (64, True, "levels"), (32, False, "levels"), (64, True, "loop")])
def test_bf16_kernel_matches_fp32_oracle(chunk_size, segments, diagonal):
    # Output, final state and the gradients of q, k, v, g, beta and the initial state.
    errs = kda_accuracy.errors(dict(diagonal=diagonal), chunk_size=chunk_size, segments=segments,
                               seed=chunk_size + segments)
    print(errs)
    assert all(np.isfinite(e) for e in errs.values()), errs
    assert all(e <= 5e-3 for e in errs.values()), errs


def test_gate_in_kernel_matches_gating_first_on_gpu():
    # The fused gate + chunk-cumsum kernel (use_gate_in_kernel=True) against kda_gate followed by
    # chunk_kda, both on the GPU kernels with bf16 inputs: output and the raw gate's gradient.
    import jax
    import jax.numpy as jnp

    from pallas_kernels.kda import chunk_kda, kda_gate

    (q, k, v, _, beta, _), _, (w, _) = kda_accuracy.inputs(1, 4096, 2, 128, 128, False, seed=5)
    keys = jax.random.split(jax.random.PRNGKey(6), 3)
    raw = (jax.random.normal(keys[0], q.shape) * 2).astype(jnp.bfloat16)
    A_log = jnp.log(jax.random.uniform(keys[1], (2,), minval=1.0, maxval=16.0))
    dt_bias = jax.random.normal(keys[2], (2, 128)) - 3.0

    def loss(raw, fused):
        g, kw = ((raw, dict(use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias)) if fused
                 else (kda_gate(raw, A_log, dt_bias), {}))
        o, _ = chunk_kda(q, k, v, g, beta, use_qk_l2norm_in_kernel=True, backend="pallas_gpu", **kw)
        return jnp.sum(o.astype(jnp.float32) * w), o

    run = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (_, o1), d1 = run(raw, True)
    (_, o0), d0 = run(raw, False)
    assert kda_accuracy.rms_rel(o1, o0) <= 1e-3
    assert kda_accuracy.rms_rel(d1, d0) <= 1e-3


def test_short_conv_kernel_matches_jnp_on_gpu():
    # pallas_kernels.kda.short_conv compiled by Triton (bf16 input, T not a multiple of the block,
    # packed segments) against the jnp convolution + silu + L2 norm in fp32: output and the
    # gradients of z and the weight.
    import jax
    import jax.numpy as jnp

    from hybrid_jax.layers.short_conv import causal_short_conv
    from pallas_kernels.kda.reference import l2norm
    from pallas_kernels.kda.short_conv import short_conv_norm

    B, T, H, D = 2, 1000, 4, 128
    keys = jax.random.split(jax.random.PRNGKey(9), 3)
    z = jax.random.normal(keys[0], (B, T, H, D)).astype(jnp.bfloat16)
    w = jax.random.normal(keys[1], (4, H, D)) * 0.5
    seg = jnp.cumsum(jax.random.uniform(keys[2], (B, T)) < 0.01, axis=1).astype(jnp.int32)
    cot = jnp.cos(jnp.arange(B * T * H * D, dtype=jnp.float32).reshape(B, T, H, D))

    def ours(z, w):
        return jnp.sum(short_conv_norm(z, w, seg, normalize=True, scale=0.5, out_dtype=jnp.float32) * cot)

    def ref(z, w):
        y = jax.nn.silu(causal_short_conv(z.astype(jnp.float32), w, seg)[0])
        return jnp.sum(l2norm(y) * 0.5 * cot)

    v1, (dz1, dw1) = jax.jit(jax.value_and_grad(ours, argnums=(0, 1)))(z, w)
    v0, (dz0, dw0) = jax.jit(jax.value_and_grad(ref, argnums=(0, 1)))(z, w)
    assert abs(float(v1) - float(v0)) <= 1e-3 * abs(float(v0)) + 1e-3
    assert kda_accuracy.rms_rel(dz1.astype(jnp.float32), dz0) <= 1e-2
    assert kda_accuracy.rms_rel(dw1, dw0) <= 1e-3
