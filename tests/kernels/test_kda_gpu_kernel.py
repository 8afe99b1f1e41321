"""KDA Pallas (Triton) kernels on CPU: interpret mode vs the token oracle, CUDA lowering."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from kda_testing import make_inputs, rms_rel

from pallas_kernels.kda import chunk_kda, fused_recurrent_kda
from pallas_kernels.kda.reference import recurrent_kda_reference
from tests.fixtures import load_script

# A fixed sample of the grid B in {1,2}, T in {1,63,64,130,257}, H in {1,3}, K,V in {16,32,64}
# (interpret mode is slow on CPU); each case mixes the hard parts.
CASES = [  # B, T, H, K, V, chunk, g_min, initial state, segments, beta, kernel tiles
    # the forward's in-block pairs by the row loop (diagonal="loop");
    # two V tiles: the backward's per-V-tile partial sums
    (2, 63, 1, 16, 32, 32, -20.0, True, True, "extremes", dict(block_v=16, diagonal="loop")),
    # two K tiles: the loops over channel tiles
    (1, 130, 3, 32, 16, 64, -3.0, False, False, "random",
     dict(block_k=16, block_k_channels=16, diagonal="loop")),
    (1, 1, 1, 16, 16, 32, -20.0, True, False, "extremes", dict(diagonal="loop")),
    # the default, the in-block levels, at the strongest decay
    (2, 63, 1, 16, 32, 32, -20.0, True, True, "extremes", dict(block_v=16)),
    (1, 130, 3, 32, 16, 64, -20.0, False, False, "random", dict(block_k=16, block_k_channels=16)),
]


def _run(fn, q, k, v, g, beta, s, seg):  # (o, final state)
    return fn(q, k, v, g, beta, initial_state=s, output_final_state=True, segment_ids=seg,
              use_qk_l2norm_in_kernel=True, scale=0.2)


def _loss_and_grads(fn, x, s0, seg, w, ws):
    def loss(q, k, v, g, beta, s):
        o, sT = _run(fn, q, k, v, g, beta, s, seg)
        return jnp.sum(o * w) + jnp.sum(sT * ws), (o, sT)

    args = (x["q"], x["k"], x["v"], x["g"], x["beta"], s0)
    (_, (o, sT)), grads = jax.value_and_grad(loss, argnums=range(6), has_aux=True)(*args)
    return o, sT, grads


@pytest.mark.parametrize("B,T,H,K,V,C,g_min,with_state,segments,beta_mode,tiles", CASES)
def test_kernel_forward_and_gradients_match_token_oracle(B, T, H, K, V, C, g_min, with_state,
                                                         segments, beta_mode, tiles):
    from pallas_kernels.kda.chunk_gpu import chunk_kda_gpu

    x, s0, seg = make_inputs(B * T + K, B, T, H, K, V, g_min=g_min, with_state=True,
                             segments=segments, beta_mode=beta_mode)
    if not with_state:
        s0 = jnp.zeros_like(s0)  # still differentiated: d(initial_state) must be right
    kw = jax.random.split(jax.random.PRNGKey(T), 2)
    w = jax.random.normal(kw[0], (B, T, H, V))
    ws = jax.random.normal(kw[1], (B, H, K, V))
    # Pallas interpret mode fills every output with NaN before the kernel runs, so any
    # tile the kernel leaves unwritten would show up below (see the poison test).
    kernel = functools.partial(chunk_kda_gpu, interpret=True, chunk_size=C, **tiles)
    o, sT, grads = _loss_and_grads(kernel, x, s0, seg, w, ws)
    o_r, sT_r, grads_r = _loss_and_grads(recurrent_kda_reference, x, s0, seg, w, ws)
    # Not differentiated (a prefill): the forward that keeps nothing for a backward pass.
    o_p, sT_p = _run(kernel, x["q"], x["k"], x["v"], x["g"], x["beta"], s0, seg)
    for out in (o, sT, o_p, sT_p):
        assert np.isfinite(np.asarray(out)).all()
    assert rms_rel(o, o_r) <= 1e-5 and rms_rel(o_p, o_r) <= 1e-5
    assert rms_rel(sT, sT_r) <= 1e-5 and rms_rel(sT_p, sT_r) <= 1e-5
    for name, a, b in zip(("q", "k", "v", "g", "beta", "initial_state"), grads, grads_r, strict=True):
        assert np.isfinite(np.asarray(a)).all(), name
        assert rms_rel(a, b) <= 1e-4, name


def test_interpret_mode_poisons_unwritten_outputs():
    # The guarantee the kernel tests lean on: an output block the kernel never writes is NaN.
    def half(x_ref, o_ref):
        o_ref[pl.ds(0, 8), :] = x_ref[pl.ds(0, 8), :]

    out = pl.pallas_call(half, out_shape=jax.ShapeDtypeStruct((16, 16), jnp.float32),
                         interpret=True)(jnp.ones((16, 16)))
    assert np.isfinite(np.asarray(out[:8])).all() and np.isnan(np.asarray(out[8:])).all()


def test_chunked_prefill_then_recurrent_decode():
    x, s0, _ = make_inputs(21, 1, 68, 2, 16, 16, g_min=-3.0, with_state=True)
    o_full, s_full = recurrent_kda_reference(**x, initial_state=s0, output_final_state=True)
    pre = {n: a[:, :65] for n, a in x.items()}
    o, s = chunk_kda(**pre, initial_state=s0, output_final_state=True, backend="interpret",
                     chunk_size=32)
    outs = [o]
    for t in range(65, 68):
        o_t, s = fused_recurrent_kda(**{n: a[:, t:t + 1] for n, a in x.items()},
                                     initial_state=s, output_final_state=True)
        outs.append(o_t)
    assert rms_rel(jnp.concatenate(outs, axis=1), o_full) <= 1e-5
    assert rms_rel(s, s_full) <= 1e-5


@pytest.mark.parametrize("segments,diagonal", [(False, "loop"), (True, "loop"), (True, "levels")])
def test_kernels_lower_for_cuda_forward_and_backward(segments, diagonal):
    from pallas_kernels.kda.chunk_gpu import chunk_kda_gpu

    B, T, H, K, V = 1, 128, 2, 64, 128
    bf = jnp.bfloat16
    q = jnp.ones((B, T, H, K), bf)
    v = jnp.ones((B, T, H, V), bf)
    g = jnp.zeros((B, T, H, K))
    beta = jnp.ones((B, T, H), bf)
    seg = jnp.ones((B, T), jnp.int32) if segments else None

    def loss(q, k, v, g, beta):
        o, s = chunk_kda_gpu(q, k, v, g, beta, segment_ids=seg, output_final_state=True,
                             use_qk_l2norm_in_kernel=True, diagonal=diagonal)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    for fn in (loss, jax.grad(loss, argnums=range(5))):
        exp = jax.export.export(jax.jit(fn), platforms=("cuda",), disabled_checks=checks)(
            q, q, v, g, beta)
        text = exp.mlir_module()
        assert text.count("__gpu$xla.gpu.triton") >= (2 if fn is loss else 4)
        # state and output in one sequential kernel, differentiated or not
        assert "kda_state_out_fwd" in text and "kda_out_fwd" not in text
        assert ("kda_state_bwd" in text) == (fn is not loss)


def test_unknown_diagonal_form_is_rejected_by_name():
    from pallas_kernels.kda.chunk_gpu import chunk_kda_gpu

    q = jnp.zeros((1, 16, 1, 16))
    with pytest.raises(ValueError, match="diagonal must be 'levels' or 'loop'"):
        chunk_kda_gpu(q, q, q, q, jnp.zeros((1, 16, 1)), interpret=True, diagonal="rows")


def test_bf16_defaults_in_interpret_mode_match_fp32_oracle():
    # The GPU defaults for bf16 inputs (bf16 matmul operands, h / v_new / dh / d v_new and
    # W / kd / q*Gam stored in bf16) run here in interpret mode against the fp32 oracle: the
    # same measurement tests/gpu/test_kda_gpu.py bounds at T=4096, at a CPU-sized shape.
    kda_accuracy = load_script("kda_accuracy")
    errs = kda_accuracy.errors(dict(interpret=True), T=192, H=2, K=32, V=32, segments=True, seed=3)
    assert all(np.isfinite(e) for e in errs.values()), errs
    assert all(e <= 5e-3 for e in errs.values()), errs
