"""KDA public ops: argument validation (before tracing) and backend dispatch."""

import jax
import jax.numpy as jnp
import pytest
from kda_testing import make_inputs, rms_rel

import pallas_kernels.kda as kda
from pallas_kernels.kda import chunk_kda, fused_recurrent_kda


def _x(B=1, T=8, H=2, K=16, V=16, dtype=jnp.float32):
    x, _, _ = make_inputs(0, B, T, H, K, V, dtype=dtype)
    return x


BAD = [
    (dict(q=jnp.zeros((1, 8, 2))), "q must be"),
    (dict(k=jnp.zeros((1, 8, 2, 8))), "k must have"),
    (dict(v=jnp.zeros((1, 7, 2, 16))), "v must be"),
    (dict(g=jnp.zeros((1, 8, 2, 8))), "g (per-channel log-decay)"),
    (dict(beta=jnp.zeros((1, 8, 2, 1))), "beta must be"),
    (dict(v=jnp.zeros((1, 8, 2, 16), jnp.bfloat16)), "share one dtype"),
    (dict(q=jnp.zeros((1, 8, 2, 16), jnp.int32)), "q must be a floating-point"),
    (dict(initial_state=jnp.zeros((1, 2, 16, 8))), "initial_state must be"),
    (dict(initial_state=jnp.zeros((1, 2, 16, 16), jnp.bfloat16)), "initial_state must be float32"),
    (dict(segment_ids=jnp.zeros((1, 9), jnp.int32)), "segment_ids must be"),
    (dict(segment_ids=jnp.zeros((1, 8))), "segment_ids must be an integer"),
    (dict(chunk_size=48, backend="interpret"), "chunk_size=48"),
    (dict(backend="cuda"), "backend='cuda'"),
]


@pytest.mark.parametrize("op", [chunk_kda, fused_recurrent_kda])
@pytest.mark.parametrize("override,msg", BAD)
def test_bad_input_names_the_argument(op, override, msg):
    x = _x()
    x.update({n: a for n, a in override.items() if n in x})
    rest = {n: a for n, a in override.items() if n not in x}
    with pytest.raises(ValueError) as e:
        op(**x, **rest)
    assert msg in str(e.value)


def test_head_dim_limit():
    x = _x(K=272, V=16)
    with pytest.raises(ValueError, match="K .* exceeds"):
        chunk_kda(**x, backend="interpret")
    # the jnp oracle has no such limit
    chunk_kda(**x, backend="reference")


def test_auto_picks_reference_on_cpu():
    assert jax.default_backend() == "cpu"
    assert kda.resolve_backend("auto") == "reference"
    x = _x()
    o_auto, _ = chunk_kda(**x)
    o_ref, _ = chunk_kda(**x, backend="reference")
    assert rms_rel(o_auto, o_ref) == 0.0


def test_pallas_gpu_without_gpu_says_so():
    with pytest.raises(ValueError, match="needs a GPU"):
        chunk_kda(**_x(), backend="pallas_gpu")


def test_pallas_tpu_routes_to_chunk_kda_tpu(monkeypatch):
    import importlib
    try:
        importlib.import_module("pallas_kernels.kda.chunk_tpu")
    except ImportError:
        with pytest.raises(NotImplementedError, match="chunk_tpu"):
            chunk_kda(**_x(), backend="pallas_tpu")
        return
    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs)
        return "tpu"

    monkeypatch.setattr("pallas_kernels.kda.chunk_tpu.chunk_kda_tpu", fake)
    assert chunk_kda(**_x(), backend="pallas_tpu", chunk_size=32) == "tpu"
    assert seen["chunk_size"] == 32 and "backend" not in seen


@pytest.mark.parametrize("backend,lower_bound", [("interpret", None), ("interpret", -5.0),
                                                 ("reference", None)])
def test_gate_in_kernel_equals_gating_first(backend, lower_bound):
    # use_gate_in_kernel=True (on the Pallas path: the fused gate + chunk-cumsum kernel) computes
    # what chunk_kda computes on kda_gate's output, output, final state and the gradients of the
    # raw gate, A_log and dt_bias; T=70 is not a multiple of the chunk, so padded rows must keep
    # zero log-decay for the final state to match.
    B, T, H, K, V = 1, 70, 2, 16, 16
    x = _x(B, T, H, K, V)
    keys = jax.random.split(jax.random.PRNGKey(7), 3)
    raw = jax.random.normal(keys[0], (B, T, H, K)) * 3
    A_log = jnp.log(jax.random.uniform(keys[1], (H,), minval=1.0, maxval=16.0))
    dt_bias = jax.random.normal(keys[2], (H, K))

    def run(fused, raw, A_log, dt_bias):
        if fused:
            g, kw = raw, dict(use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias, lower_bound=lower_bound)
        else:
            g, kw = kda.kda_gate(raw, A_log, dt_bias, lower_bound), {}
        o, s = chunk_kda(x["q"], x["k"], x["v"], g, x["beta"], output_final_state=True,
                         use_qk_l2norm_in_kernel=True, chunk_size=32, backend=backend, **kw)
        return jnp.sum(o * jnp.cos(o)) + jnp.sum(s * s), (o, s)

    grad = jax.value_and_grad(run, argnums=(1, 2, 3), has_aux=True)
    (_, (o1, s1)), g1 = grad(True, raw, A_log, dt_bias)
    (_, (o0, s0)), g0 = grad(False, raw, A_log, dt_bias)
    assert rms_rel(o1, o0) <= 1e-5 and rms_rel(s1, s0) <= 1e-5
    for a, b in zip(g1, g0, strict=True):
        assert rms_rel(a, b) <= 1e-5


def test_gate_arguments_are_checked_by_name():
    x = _x()
    with pytest.raises(ValueError, match="needs A_log"):
        chunk_kda(**x, use_gate_in_kernel=True)
    with pytest.raises(ValueError, match="dt_bias is only used with use_gate_in_kernel"):
        fused_recurrent_kda(**x, dt_bias=jnp.zeros((2, 16)))
