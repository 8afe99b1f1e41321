"""TTT memory (AllMem): fused chunkwise scan vs the token-by-token jax.grad oracle."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ttt import (
    TTTState,
    init_state,
    ttt_memory,
    ttt_memory_reference,
    ttt_memory_step,
)

H, D, F = 2, 8, 16

fused = jax.jit(ttt_memory, static_argnames=("chunk_size", "output_final_state", "normalize"))
oracle = jax.jit(ttt_memory_reference, static_argnames=("chunk_size", "normalize"))


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / max(np.mean(b**2), 1e-30)))


def make_inputs(seed, B, T):
    ks = jax.random.split(jax.random.PRNGKey(seed), 9)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(jax.random.normal(ks[0], (B, T, H, D)))
    k = unit(jax.random.normal(ks[1], (B, T, H, D)))
    v = jax.random.normal(ks[2], (B, T, H, D))
    lr = 0.3 * jax.nn.softplus(jax.random.normal(ks[3], (B, T, H)))
    mom = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
    dec = jax.nn.sigmoid(jax.random.normal(ks[5], (B, T, H)) - 2.0)
    w0 = (
        jax.random.normal(ks[6], (H, D, F)) / np.sqrt(D),
        jax.random.normal(ks[7], (H, F, D)) / np.sqrt(F),
        jax.random.normal(ks[8], (H, D, F)) / np.sqrt(D),
    )
    return (q, k, v, lr, mom, dec), w0


def packed_segments(B, T):
    """Row 0: left padding, a 2-token document, then one starting mid-chunk; row 1: a
    document, right padding, then a document of its own; both change inside chunks."""
    seg = np.ones((B, T), np.int32)
    seg[0, :3] = 0
    seg[0, 3:5] = 1
    seg[0, 5:] = 2
    seg[1, 21:] = 0
    seg[1, 24:] = 7
    return jnp.asarray(seg)


@pytest.mark.parametrize("T,C,segmented", [(37, 8, True), (37, 8, False), (5, 8, False), (24, 1, True)])
def test_forward_matches_oracle(T, C, segmented):
    """Segments change mid-chunk, T is not a multiple of the chunk, T < chunk, chunk 1."""
    B = 2
    args, w0 = make_inputs(T + C, B, T)
    seg = packed_segments(B, T) if segmented else None
    o, st = fused(*args, weights0=w0, chunk_size=C, segment_ids=seg, output_final_state=True)
    o_ref, (w_ref, m_ref, n_ref) = oracle(*args, weights0=w0, chunk_size=C, segment_ids=seg)
    assert rel(o, o_ref) < 1e-5
    for got, want in zip(st.weights + st.momentum, w_ref + m_ref, strict=True):
        assert rel(got, want) < 1e-5
    np.testing.assert_array_equal(st.count, n_ref)


def test_unnormalised_read_matches_oracle():
    args, w0 = make_inputs(3, 2, 37)
    o, _ = fused(*args, weights0=w0, chunk_size=8, normalize=False)
    o_ref, _ = oracle(*args, weights0=w0, chunk_size=8, normalize=False)
    assert rel(o, o_ref) < 1e-5
    assert not np.allclose(np.sqrt(np.mean(np.asarray(o) ** 2, -1)), 1.0, atol=1e-2)


def test_packed_document_equals_document_alone():
    """Chunks count from each segment's start: a document packed at an offset computes
    exactly what it computes alone (the property left-padded prompts rely on)."""
    T, C = 37, 8
    args, w0 = make_inputs(5, 2, T)
    o, _ = fused(*args, weights0=w0, chunk_size=C, segment_ids=packed_segments(2, T))
    # Row 0's last document (tokens 5..36) and row 1's first (tokens 0..20), each alone,
    # stacked as one batch of two unsegmented rows of 32 tokens (row 1 right-padded).
    alone = [jnp.concatenate([a[:1, 5:], jnp.pad(a[1:, :21], [(0, 0), (0, 11)] + [(0, 0)] * (a.ndim - 2))])
             for a in args]
    seg_alone = jnp.asarray(np.r_[[1] * 32, [1] * 21 + [0] * 11].reshape(2, 32))
    o_alone, _ = fused(*alone, weights0=w0, chunk_size=C, segment_ids=seg_alone)
    assert rel(o[0, 5:], o_alone[0]) < 1e-6
    assert rel(o[1, :21], o_alone[1, :21]) < 1e-6


def test_gradients_match_oracle():
    """d/d(q, k, v, lr, momentum, decay, weights0) through the inner loop, with segments
    changing mid-chunk and a partial last chunk."""
    B, T, C = 2, 29, 8
    args, w0 = make_inputs(11, B, T)
    seg = packed_segments(B, T)
    cot = jax.random.normal(jax.random.PRNGKey(99), (B, T, H, D))

    def loss(fn, args, w0):
        o, _ = fn(*args, weights0=w0, chunk_size=C, segment_ids=seg)
        return jnp.sum(o * cot)

    g = jax.jit(jax.grad(functools.partial(loss, ttt_memory), argnums=(0, 1)))(args, w0)
    g_ref = jax.jit(jax.grad(functools.partial(loss, ttt_memory_reference), argnums=(0, 1)))(args, w0)
    for got, want in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        assert np.all(np.isfinite(got))
        assert rel(got, want) < 1e-4
    # momentum / decay only matter at chunk-closing tokens; make sure those got gradient.
    assert np.abs(np.asarray(g[0][4])).max() > 0 and np.abs(np.asarray(g[0][5])).max() > 0


def test_initial_state_continues_and_carries_gradient():
    """A call continued from a final_state equals one call on the whole sequence (split
    mid-chunk and on a chunk edge), and gradients reach the initial fast weights."""
    B, T, C = 2, 37, 8
    args, w0 = make_inputs(7, B, T)
    seg = packed_segments(B, T)
    o_ref, _ = oracle(*args, weights0=w0, chunk_size=C, segment_ids=seg)
    for split in (8, 19):
        o1, st = fused(*[a[:, :split] for a in args], weights0=w0, chunk_size=C,
                       segment_ids=seg[:, :split], output_final_state=True)
        o2, _ = fused(*[a[:, split:] for a in args], weights0=w0, chunk_size=C,
                      segment_ids=seg[:, split:], initial_state=st)
        assert rel(jnp.concatenate([o1, o2], 1), o_ref) < 1e-5

    # A fresh state whose segment is already 1 continues from its weights instead of
    # resetting, so d/d(state.weights) (through the carry) must equal d/d(weights0) of a
    # fresh call (through the reset; checked against the oracle in test_gradients_match_oracle).
    cot = jax.random.normal(jax.random.PRNGKey(3), (B, T, H, D))
    st0 = init_state(w0, B)._replace(segment=jnp.ones((B,), jnp.int32))

    def from_state(w):
        o, _ = ttt_memory(*args, weights0=w0, chunk_size=C, initial_state=st0._replace(weights=w))
        return jnp.sum(o * cot)

    def from_w0(w):
        o, _ = ttt_memory(*args, weights0=w, chunk_size=C)
        return jnp.sum(o * cot)

    g_state = jax.jit(jax.grad(from_state))(st0.weights)
    g_w0 = jax.jit(jax.grad(from_w0))(w0)
    for got, want in zip(g_state, g_w0, strict=True):
        assert rel(got.sum(0), want) < 1e-4


def test_decode_steps_equal_full_forward():
    """Decode token by token through chunk closings and a segment change, after a
    prefill and from a fresh state: equals one full forward (the oracle)."""
    B, T, C, P = 2, 30, 8, 10
    args, w0 = make_inputs(13, B, T)
    seg = np.ones((B, T), np.int32)
    seg[0, :2] = 0
    seg[1, 17:] = 2  # a new document starts during decode
    seg = jnp.asarray(seg)
    o_ref, (w_ref, _, _) = oracle(*args, weights0=w0, chunk_size=C, segment_ids=seg)
    step = jax.jit(functools.partial(ttt_memory_step, chunk_size=C))

    o_pre, st = fused(*[a[:, :P] for a in args], weights0=w0, chunk_size=C,
                      segment_ids=seg[:, :P], output_final_state=True)
    for start, outs in ((P, [o_pre]), (0, [])):
        if start == 0:
            st = init_state(w0, B)
        for t in range(start, T):
            o_t, st = step(*[a[:, t] for a in args], st, weights0=w0, segment_ids=seg[:, t])
            outs.append(o_t[:, None])
        assert rel(jnp.concatenate(outs, 1), o_ref) < 1e-5
        for got, want in zip(st.weights, w_ref, strict=True):
            assert rel(got, want) < 1e-5


def test_bf16_inputs_keep_float32_state():
    args, w0 = make_inputs(1, 1, 16)
    args16 = [a.astype(jnp.bfloat16) for a in args[:3]] + list(args[3:])
    o, st = fused(*args16, weights0=w0, chunk_size=4, output_final_state=True)
    assert o.dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in st.weights + st.momentum + st.grad)
    o_ref, _ = oracle(*args, weights0=w0, chunk_size=4)
    assert rel(o.astype(jnp.float32), o_ref) < 2e-2


def test_lowers_for_tpu_and_cuda():
    """The fused scan is plain XLA: forward and backward export for both accelerators."""
    args, w0 = make_inputs(0, 1, 16)

    def fwd_bwd(args, w0):
        return jax.grad(lambda a, w: jnp.sum(ttt_memory(*a, weights0=w, chunk_size=8)[0]), (0, 1))(args, w0)

    for platform in ("tpu", "cuda"):
        exp = jax.export.export(jax.jit(fwd_bwd), platforms=(platform,))(args, w0)
        assert exp.platforms == (platform,)


def test_bad_input_is_named():
    args, w0 = make_inputs(0, 1, 8)
    q, k, v, lr, mom, dec = args
    call = functools.partial(ttt_memory, weights0=w0, chunk_size=4)
    with pytest.raises(TypeError, match="k has dtype"):
        call(q, k.astype(jnp.bfloat16), v, lr, mom, dec)
    with pytest.raises(ValueError, match="v must have q's shape"):
        call(q, k, v[:, :4], lr, mom, dec)
    with pytest.raises(ValueError, match="lr must be"):
        call(q, k, v, lr[..., :1], mom, dec)
    with pytest.raises(ValueError, match="chunk_size"):
        ttt_memory(*args, weights0=w0, chunk_size=0)
    with pytest.raises(ValueError, match="w2"):
        ttt_memory(*args, weights0=(w0[0], w0[0], w0[2]), chunk_size=4)
    with pytest.raises(ValueError, match="segment_ids"):
        call(*args, segment_ids=jnp.ones((1, 7), jnp.int32))
    with pytest.raises(ValueError, match="no Pallas kernel"):
        call(*args, backend="pallas_gpu")
    with pytest.raises(ValueError, match="initial_state does not match"):
        call(*args, initial_state=init_state(w0, 2))
    with pytest.raises(TypeError, match="TTTState"):
        call(*args, initial_state=(w0, w0))
    assert isinstance(call(*args, output_final_state=True)[1], TTTState)


def test_fresh_state_owns_every_buffer():
    """A decode cache holds the bytes its shapes say (the efficiency benchmark's analytic
    count): momentum and gradient accumulators are separate buffers, not one shared zero."""
    _, w0 = make_inputs(0, 2, 4)
    leaves = jax.tree_util.tree_leaves(init_state(w0, 2))
    buffers = {x.unsafe_buffer_pointer(): x.nbytes for x in leaves}
    assert sum(buffers.values()) == sum(x.nbytes for x in leaves)
