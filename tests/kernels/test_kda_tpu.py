"""KDA TPU kernels (pallas_kernels/kda/chunk_tpu.py) on CPU.

No TPU is reachable here, so this proves what CPU can: the Mosaic kernels run under
Pallas's TPU interpreter (`pltpu.InterpretParams`, which fills every uninitialised buffer
with NaN, so a tile the kernel never writes shows up), forward and gradients are checked
against the token-by-token oracle, and forward and backward are lowered for TPU through
`jax.export` (which runs the Pallas -> Mosaic lowering, including its block-shape checks).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.kda.chunk_tpu import chunk_kda_tpu
from pallas_kernels.kda.reference import l2norm, recurrent_kda_reference

INTERPRET = pltpu.InterpretParams(uninitialized_memory="nan")


def rms_rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(b ** 2)) + 1e-30))


def make_inputs(B, T, H, K, V, *, seed, strong_decay, extreme_beta, normalise_k):
    ks = jax.random.split(jax.random.PRNGKey(seed), 7)
    q = jax.random.normal(ks[0], (B, T, H, K))
    k = jax.random.normal(ks[1], (B, T, H, K))
    if normalise_k:  # the kernel-side L2 norm is off: feed unit keys as the layer would
        k = l2norm(k)
    v = jax.random.normal(ks[2], (B, T, H, V))
    g = -jax.random.uniform(ks[3], (B, T, H, K), maxval=0.5)
    if strong_decay == "some":  # a quarter of the entries decay by up to e^-20 per token
        hard = jax.random.bernoulli(ks[4], 0.25, g.shape)
        g = jnp.where(hard, -20.0 * jax.random.uniform(ks[5], g.shape), g)
    elif strong_decay == "all":  # every channel of every token decays by e^-20
        g = jnp.full(g.shape, -20.0)
    beta = jax.random.uniform(ks[6], (B, T, H))
    if extreme_beta:
        beta = beta.at[:, ::5].set(0.0).at[:, 2::5].set(1.0)
    return q, k, v, g, beta


def packed_segments(B, T):
    """Left padding (segment 0), a change inside the first chunk, and a repeated id that must
    still reset (1, 2, 1 are three documents)."""
    rows = []
    for b in range(B):
        cuts = sorted({min(T, 3 + b), min(T, T // 3 + 5), min(T, 2 * T // 3)})
        ids = np.zeros(T, np.int32)
        for n, c in enumerate(cuts):
            ids[c:] = 1 + n % 2
        rows.append(ids)
    return jnp.asarray(np.stack(rows))


CASES = [
    # B, T, H, K, V, chunk, initial_state, segments, l2norm, strong_decay, extreme_beta
    pytest.param(1, 63, 1, 16, 32, 32, False, False, True, None, False, id="T63-c32-l2norm"),
    pytest.param(2, 130, 1, 32, 16, 64, True, True, False, "some", True,
                 id="T130-c64-state-segments-strongdecay-beta01"),
    pytest.param(1, 64, 2, 64, 64, 64, True, False, False, "some", False, id="T64-c64-H2-K64"),
    pytest.param(1, 257, 3, 16, 16, 64, True, True, True, "all", True,
                 id="T257-c64-H3-segments-g20everywhere-beta01"),
    pytest.param(1, 1, 1, 16, 16, 32, True, False, True, None, False, id="T1"),
]


@pytest.mark.parametrize("B,T,H,K,V,C,with_state,with_segments,l2,strong,extreme", CASES)
def test_forward_and_gradients_match_token_by_token_oracle(
        B, T, H, K, V, C, with_state, with_segments, l2, strong, extreme):
    q, k, v, g, beta = make_inputs(B, T, H, K, V, seed=T + K, strong_decay=strong,
                                   extreme_beta=extreme, normalise_k=not l2)
    h0 = jax.random.normal(jax.random.PRNGKey(7), (B, H, K, V)) if with_state else None
    seg = packed_segments(B, T) if with_segments else None
    kw = dict(output_final_state=True, use_qk_l2norm_in_kernel=l2, segment_ids=seg)

    def kernel(q, k, v, g, beta, h0):
        return chunk_kda_tpu(q, k, v, g, beta, initial_state=h0, chunk_size=C,
                             interpret=INTERPRET, **kw)

    def oracle(q, k, v, g, beta, h0):
        return recurrent_kda_reference(q, k, v, g, beta, initial_state=h0, **kw)

    args = (q, k, v, g, beta, h0 if with_state else jnp.zeros((B, H, K, V)))
    # Non-uniform cotangents for every output and the final state.
    o_ref, s_ref = oracle(*args)
    cts = (jax.random.normal(jax.random.PRNGKey(1), o_ref.shape),
           jax.random.normal(jax.random.PRNGKey(2), s_ref.shape))

    def value_and_vjp(fn):
        def run(*a):
            out, pullback = jax.vjp(fn, *a)
            return out, pullback(cts)
        return run

    (o, s), grads = jax.jit(value_and_vjp(kernel))(*args)
    _, grads_ref = value_and_vjp(oracle)(*args)
    assert np.isfinite(np.asarray(o)).all() and np.isfinite(np.asarray(s)).all()
    assert rms_rel(o, o_ref) <= 1e-5
    assert rms_rel(s, s_ref) <= 1e-5
    for name, gk, gr in zip(("q", "k", "v", "g", "beta", "initial_state"), grads, grads_ref, strict=True):
        assert np.isfinite(np.asarray(gk)).all(), name
        assert rms_rel(gk, gr) <= 1e-4, (name, rms_rel(gk, gr))


def test_interpreter_poisons_unwritten_outputs():
    """The NaN fill the tests rely on is live: a kernel that writes nothing returns NaN."""
    def writes_nothing(x_ref, o_ref):
        del x_ref, o_ref

    out = pl.pallas_call(writes_nothing, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
                         interpret=INTERPRET)(jnp.ones((8, 128)))
    assert np.isnan(np.asarray(out)).all()


@pytest.mark.parametrize("dtype,K,V,C,segments", [(jnp.bfloat16, 128, 128, 64, True),
                                                  (jnp.float32, 256, 192, 32, False)])
def test_forward_and_backward_lower_for_tpu(dtype, K, V, C, segments):
    B, T, H = 1, 200, 2
    q, k, v, g, beta = (jnp.zeros(s, dtype) for s in
                        ((B, T, H, K), (B, T, H, K), (B, T, H, V), (B, T, H, K), (B, T, H)))
    h0 = jnp.zeros((B, H, K, V), jnp.float32)
    seg = jnp.ones((B, T), jnp.int32) if segments else None

    def loss(q, k, v, g, beta, h0):
        o, s = chunk_kda_tpu(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                             use_qk_l2norm_in_kernel=True, segment_ids=seg, chunk_size=C)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    exported = jax.export.export(jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6)))),
                                 platforms=("tpu",))(q, k, v, g, beta, h0)
    text = exported.mlir_module()
    assert exported.platforms == ("tpu",)
    # Forward, recomputed forward states, and backward: three Mosaic custom calls.
    assert text.count("tpu_custom_call") >= 3
    for name in ("kda_fwd", "kda_fwd_states", "kda_bwd"):
        assert name in text, name


@pytest.mark.parametrize("change,match", [
    (dict(chunk_size=48), "chunk_size"),
    (dict(k_shape=(1, 8, 1, 300)), r"K \(q/k head dim\)=300"),
    (dict(beta_shape=(1, 8, 2)), "beta"),
    (dict(state_shape=(1, 1, 16, 8)), "initial_state"),
    (dict(seg_shape=(1, 7)), "segment_ids"),
])
def test_bad_input_raises_a_clear_error(change, match):
    K = change.get("k_shape", (1, 8, 1, 16))[-1]
    q = jnp.zeros((1, 8, 1, K))
    v = jnp.zeros((1, 8, 1, 16))
    beta = jnp.zeros(change.get("beta_shape", (1, 8, 1)))
    h0 = jnp.zeros(change.get("state_shape", (1, 1, K, 16)))
    seg = jnp.ones(change.get("seg_shape", (1, 8)), jnp.int32)
    with pytest.raises(ValueError, match=match):
        chunk_kda_tpu(q, q, v, q, beta, initial_state=h0, segment_ids=seg,
                      chunk_size=change.get("chunk_size", 64), interpret=INTERPRET)


def test_bfloat16_inputs_compute_in_float32():
    """bf16 in, bf16 out, fp32 inside: the only error left is the final rounding to bf16."""
    B, T, H, K, V = 1, 40, 1, 32, 32
    q, k, v, g, beta = make_inputs(B, T, H, K, V, seed=3, strong_decay=None,
                                   extreme_beta=False, normalise_k=False)
    q, k, v, g, beta = (x.astype(jnp.bfloat16) for x in (q, k, v, g, beta))
    o, s = jax.jit(lambda *a: chunk_kda_tpu(*a, output_final_state=True, chunk_size=32,
                                            use_qk_l2norm_in_kernel=True,
                                            interpret=INTERPRET))(q, k, v, g, beta)
    up = [x.astype(jnp.float32) for x in (q, k, v, g, beta)]
    o_ref, s_ref = recurrent_kda_reference(*up, output_final_state=True,
                                           use_qk_l2norm_in_kernel=True)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert rms_rel(o.astype(jnp.float32), o_ref) <= 5e-3
    assert rms_rel(s, s_ref) <= 1e-5


def test_export_runs_the_mosaic_lowering():
    """Guard for the lowering test above: export really lowers kernel bodies for Mosaic, so an
    illegal block shape (second-minor dim 1 of 64 rows) is rejected at export time."""
    def copy(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    spec = pl.BlockSpec((1, 128), lambda i: (i, 0))
    fn = pl.pallas_call(copy, grid=(64,), in_specs=[spec], out_specs=spec,
                        out_shape=jax.ShapeDtypeStruct((64, 128), jnp.float32))
    with pytest.raises(ValueError, match="divisible by 8 and 128"):
        jax.export.export(jax.jit(fn), platforms=("tpu",))(jnp.zeros((64, 128)))


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="compiles the Mosaic kernels: TPU only")
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 5e-3)])
def test_compiled_on_tpu_matches_oracle(dtype, tol):
    """Not run here (no TPU): the same checks, compiled by Mosaic, at a realistic head size."""
    B, T, H, K, V = 2, 1000, 2, 128, 128
    q, k, v, g, beta = make_inputs(B, T, H, K, V, seed=11, strong_decay="some",
                                   extreme_beta=True, normalise_k=False)
    seg = packed_segments(B, T)
    kw = dict(output_final_state=True, use_qk_l2norm_in_kernel=True, segment_ids=seg)
    args = tuple(x.astype(dtype) for x in (q, k, v, g, beta))
    cts = (jax.random.normal(jax.random.PRNGKey(1), (B, T, H, V)),
           jax.random.normal(jax.random.PRNGKey(2), (B, H, K, V)))

    def value_and_grads(fn, *a):
        out, pullback = jax.vjp(fn, *a)
        return out, pullback((cts[0].astype(out[0].dtype), cts[1]))

    (o, s), grads = jax.jit(lambda *a: value_and_grads(
        lambda *x: chunk_kda_tpu(*x, **kw), *a))(*args)
    up = tuple(x.astype(jnp.float32) for x in args)
    (o_ref, s_ref), grads_ref = jax.jit(lambda *a: value_and_grads(
        lambda *x: recurrent_kda_reference(*x, **kw), *a))(*up)
    assert rms_rel(o.astype(jnp.float32), o_ref) <= tol
    assert rms_rel(s, s_ref) <= tol
    for name, gk, gr in zip(("q", "k", "v", "g", "beta"), grads, grads_ref, strict=True):
        assert rms_rel(gk.astype(jnp.float32), gr) <= tol, name


def _float64_recurrence(q, k, v, g, beta, h0, scale):
    q, k, v, g, beta, s = (np.asarray(x, np.float64) for x in (q, k, v, g, beta, h0))
    o = np.zeros(v.shape)
    for t in range(q.shape[1]):
        s = s * np.exp(g[:, t])[..., None]
        err = v[:, t] - np.einsum("bhk,bhkv->bhv", k[:, t], s)
        s = s + np.einsum("bhk,bhv->bhkv", k[:, t], beta[:, t][..., None] * err)
        o[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t] * scale, s)
    return o


def test_strong_decay_accuracy_matches_float64_recurrence():
    """Exponents are sums over exactly the tokens they span: with a quarter of the channels
    decaying by up to e^-20 per token the kernel stays as close to a float64 recurrence as
    the fp32 token-by-token oracle (~1.6e-7); differences of in-chunk prefix sums gave 1.5e-6."""
    B, T, H, K, V = 1, 64, 1, 64, 64
    q, k, v, g, beta = make_inputs(B, T, H, K, V, seed=T + K, strong_decay="some",
                                   extreme_beta=False, normalise_k=True)
    h0 = jax.random.normal(jax.random.PRNGKey(7), (B, H, K, V))
    o, _ = jax.jit(lambda *a: chunk_kda_tpu(*a, initial_state=h0, chunk_size=64,
                                            interpret=INTERPRET))(q, k, v, g, beta)
    assert rms_rel(o, _float64_recurrence(q, k, v, g, beta, h0, K ** -0.5)) <= 5e-7


def test_public_op_dispatches_pallas_tpu_to_this_kernel():
    from pallas_kernels.kda import chunk_kda

    x = jnp.zeros((1, 70, 2, 64))
    beta = jnp.zeros((1, 70, 2))
    fn = jax.jit(lambda q: chunk_kda(q, x, x, x, beta, backend="pallas_tpu")[0])
    assert "kda_fwd" in jax.export.export(fn, platforms=("tpu",))(x).mlir_module()


def test_training_path_without_state():
    """The common training call: no initial state, no final state, gradients of o only."""
    B, T, H, K, V = 1, 40, 2, 16, 16
    q, k, v, g, beta = make_inputs(B, T, H, K, V, seed=5, strong_decay="some",
                                   extreme_beta=False, normalise_k=False)
    w = jax.random.normal(jax.random.PRNGKey(3), (B, T, H, V))

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a, use_qk_l2norm_in_kernel=True)[0] * w)

    kernel = lambda *a, **kw: chunk_kda_tpu(*a, chunk_size=32, interpret=INTERPRET, **kw)
    grads = jax.jit(jax.grad(loss(kernel), argnums=tuple(range(5))))(q, k, v, g, beta)
    grads_ref = jax.grad(loss(recurrent_kda_reference), argnums=tuple(range(5)))(q, k, v, g, beta)
    for name, gk, gr in zip(("q", "k", "v", "g", "beta"), grads, grads_ref, strict=True):
        assert rms_rel(gk, gr) <= 1e-4, name
