"""KDA oracles: chunked form vs the token recurrence vs transformers' PyTorch KDA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kda_testing import make_inputs, rms_rel

from pallas_kernels.kda import chunk_kda, fused_recurrent_kda, kda_gate
from pallas_kernels.kda.reference import chunk_kda_reference, recurrent_kda_reference

CASES = [  # (B, T, H, K, V, chunk, g_min, with_state, segments, beta_mode)
    (1, 1, 1, 16, 16, 64, -3.0, False, False, "random"),
    (2, 130, 3, 64, 32, 64, -20.0, True, True, "extremes"),
    (1, 257, 1, 32, 32, 32, -1.0, True, True, "random"),
]


@pytest.mark.parametrize("B,T,H,K,V,C,g_min,with_state,segments,beta_mode", CASES)
def test_chunk_matches_token_recurrence(B, T, H, K, V, C, g_min, with_state, segments,
                                        beta_mode):
    x, s0, seg = make_inputs(T + K, B, T, H, K, V, g_min=g_min, with_state=with_state,
                             segments=segments, beta_mode=beta_mode)
    kw = dict(initial_state=s0, segment_ids=seg, output_final_state=True,
              use_qk_l2norm_in_kernel=True, scale=0.3)
    o_ref, s_ref = recurrent_kda_reference(**x, **kw)
    o, s = chunk_kda_reference(**x, chunk_size=C, **kw)
    assert np.isfinite(np.asarray(o)).all() and np.isfinite(np.asarray(s)).all()
    assert rms_rel(o, o_ref) <= 1e-5
    assert rms_rel(s, s_ref) <= 1e-5


def test_chunk_gradients_match_token_recurrence():
    x, s0, seg = make_inputs(3, 2, 45, 1, 16, 16, g_min=-20.0, with_state=True, segments=True,
                             beta_mode="extremes")
    w = jax.random.normal(jax.random.PRNGKey(9), (2, 45, 1, 16))
    ws = jax.random.normal(jax.random.PRNGKey(10), (2, 1, 16, 16))

    def loss(fn, q, k, v, g, beta, s):
        o, sf = fn(q, k, v, g, beta, initial_state=s, segment_ids=seg, output_final_state=True,
                   use_qk_l2norm_in_kernel=True)
        return jnp.sum(o * w) + jnp.sum(sf * ws)

    args = (x["q"], x["k"], x["v"], x["g"], x["beta"], s0)
    gr = jax.grad(lambda *a: loss(recurrent_kda_reference, *a), argnums=range(6))(*args)
    gc = jax.grad(lambda *a: loss(lambda *b, **kw: chunk_kda_reference(*b, chunk_size=16, **kw),
                                  *a), argnums=range(6))(*args)
    for name, a, b in zip("q k v g beta s0".split(), gc, gr, strict=True):
        assert np.isfinite(np.asarray(a)).all(), name
        assert rms_rel(a, b) <= 1e-4, name


def test_segments_equal_separate_documents():
    x, _, _ = make_inputs(5, 1, 96, 2, 16, 16, g_min=-2.0)
    seg = jnp.asarray(np.repeat([0, 1, 2, 3], [7, 40, 1, 48])[None], jnp.int32)
    o, _ = chunk_kda(**x, segment_ids=seg, backend="reference")
    starts = [0, 7, 47, 48, 96]
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        part = {n: t[:, a:b] for n, t in x.items()}
        o_alone, _ = recurrent_kda_reference(**part)
        assert rms_rel(o[:, a:b], o_alone) <= 1e-5


def test_prefill_then_decode_equals_full_sequence():
    x, s0, _ = make_inputs(7, 2, 100, 2, 32, 16, g_min=-3.0, with_state=True)
    o_full, s_full = recurrent_kda_reference(**x, initial_state=s0, output_final_state=True)
    pre = {n: t[:, :97] for n, t in x.items()}
    o_pre, s = chunk_kda(**pre, initial_state=s0, output_final_state=True, backend="reference")
    outs = [o_pre]
    for t in range(97, 100):
        step = {n: a[:, t:t + 1] for n, a in x.items()}
        o_t, s = fused_recurrent_kda(**step, initial_state=s, output_final_state=True)
        outs.append(o_t)
    assert rms_rel(jnp.concatenate(outs, axis=1), o_full) <= 1e-5
    assert rms_rel(s, s_full) <= 1e-5


torch = pytest.importorskip("torch")


@pytest.mark.parametrize("l2norm", [True, False])
def test_matches_transformers_kimi_linear(l2norm):
    from transformers.models.kimi_linear import modeling_kimi_linear as hf

    x, s0, _ = make_inputs(11, 2, 75, 2, 32, 16, g_min=-4.0, with_state=True)
    if not l2norm:  # un-normalised keys make the recurrence explode; keep them modest
        x["k"] = x["k"] * 0.9
    tt = {n: torch.from_numpy(np.asarray(a)) for n, a in x.items()}
    ts0 = torch.from_numpy(np.asarray(s0))
    # transformers fixes scale = K**-0.5 (our default).
    o_hf, s_hf = hf.chunk_kimi_delta_attention(
        tt["q"], tt["k"], tt["v"], tt["g"], tt["beta"], chunk_size=64, initial_state=ts0.clone(),
        output_final_state=True, use_qk_l2norm_in_kernel=l2norm)
    o_hr, s_hr = hf.recurrent_kimi_delta_attention(
        tt["q"], tt["k"], tt["v"], tt["g"], tt["beta"], initial_state=ts0.clone(),
        output_final_state=True, use_qk_l2norm_in_kernel=l2norm)
    for fn in (chunk_kda_reference, recurrent_kda_reference):
        o, s = fn(**x, initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=l2norm)
        assert rms_rel(o, o_hr.numpy()) <= 1e-5
        assert rms_rel(o, o_hf.numpy()) <= 1e-5
        assert rms_rel(s, s_hr.numpy()) <= 1e-5


def _softplus(x):
    return np.logaddexp(0.0, x)


@pytest.mark.parametrize("lower_bound", [None, -5.0])
def test_kda_gate_closed_form_and_gradient(lower_bound):
    rng = np.random.default_rng(0)
    g_raw = rng.normal(size=(2, 5, 3, 8)).astype(np.float32) * 4
    A_log = rng.normal(size=(3,)).astype(np.float32)
    dt_bias = rng.normal(size=(24,)).astype(np.float32)
    out = kda_gate(jnp.asarray(g_raw, jnp.bfloat16), jnp.asarray(A_log), jnp.asarray(dt_bias),
                   lower_bound=lower_bound)
    assert out.dtype == jnp.float32
    x = g_raw.astype(jnp.bfloat16).astype(np.float64) + dt_bias.reshape(3, 8)
    a = np.exp(A_log.astype(np.float64)).reshape(3, 1)
    want = (-a * _softplus(x) if lower_bound is None
            else lower_bound / (1 + np.exp(-a * x)))
    assert rms_rel(out, want) <= 1e-6
    assert (np.asarray(out) <= 0).all()
    # d/dg_raw in closed form
    grad = jax.grad(lambda gr: jnp.sum(kda_gate(gr, jnp.asarray(A_log), jnp.asarray(dt_bias),
                                                lower_bound=lower_bound)))(jnp.asarray(g_raw))
    x = g_raw.astype(np.float64) + dt_bias.reshape(3, 8)
    sig = lambda z: 1 / (1 + np.exp(-z))
    want = (-a * sig(x) if lower_bound is None
            else lower_bound * a * sig(a * x) * (1 - sig(a * x)))
    assert rms_rel(grad, want) <= 1e-5
