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
