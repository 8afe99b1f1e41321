"""KDA Pallas kernel on the accelerator: bf16 inputs vs the fp32 jnp oracle (T=4096, K=V=128)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location(
    "kda_accuracy", Path(__file__).resolve().parents[2] / "scripts" / "kda_accuracy.py")
kda_accuracy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kda_accuracy)


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
