"""SWA layer, TTT memory layer and AllMem mixer: oracles, decode = forward with packing, gate, knobs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_jax.layers.allmem import AllMem, sample_allmem_hparams
from hybrid_jax.layers.attention import Attention
from hybrid_jax.layers.swa import SlidingWindowAttention
from hybrid_jax.layers.ttt_memory import TTTMemory
from tests.layers.helpers import randomize, run, run_in_pieces

D, H, KH, HD, T = 32, 4, 2, 8, 13
# row 0: 3 pads then one document; row 1: two packed documents, the second starting inside
# the multi-token continuation (tokens 5..7) of the decode test.
SEG = jnp.asarray([[0] * 3 + [1] * 10, [1] * 6 + [2] * 7], jnp.int32)


def positions(seg):
    from hybrid_jax.models.qwen3 import default_positions
    return default_positions(seg)


def swa(window, sinks, seed=0):
    return SlidingWindowAttention(D, H, KH, HD, window=window, sinks=sinks, rope_theta=100.0, init_std=0.3,
                                  rngs=nnx.Rngs(seed))


def allmem(window=3, sinks=2, chunk=2, alpha=0.7):
    memory = TTTMemory(D, H, HD, memory_hidden=12, chunk_size=chunk, lr_init=0.1, init_std=0.3, rngs=nnx.Rngs(2))
    return AllMem(swa(window, sinks), memory, D, alpha_init=alpha)


def decode_matches_forward(layer, x, seg):
    pos = positions(seg)
    full = run(layer, x, pos, seg)
    cache = layer.init_cache(2, 16, jnp.float32)  # max_length 16 < window 20: a 16-slot ring
    # prefill, multi-token continuation, decode
    got, cache = run_in_pieces(layer, x, pos, seg, cache, [5, 3] + [1] * (T - 8))
    got = np.asarray(got)
    real = np.asarray(seg) != 0
    np.testing.assert_allclose(got[real], np.asarray(full)[real], atol=2e-5, rtol=2e-5)
    assert int(cache["index"]) == T


X = jax.random.normal(jax.random.PRNGKey(0), (2, T, D), jnp.float32)


@pytest.mark.parametrize("window", [1, 4, T])
def test_swa_equals_windowed_teacher_attention(window):
    """Without sinks, the layer (swa_attention) equals the teacher's Attention masking the same window."""
    layer = swa(window, 0)
    teacher = Attention(D, H, KH, HD, rope_theta=100.0, window=None if window >= T else window, rngs=nnx.Rngs(9))
    nnx.update(teacher, nnx.state(layer, nnx.Param))
    pos = positions(SEG)
    real = np.asarray(SEG) != 0  # padded queries: attention returns 0, swa_attention attends among pads
    np.testing.assert_allclose(np.asarray(run(layer, X, pos, SEG))[real], np.asarray(run(teacher, X, pos, SEG))[real],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window, sinks", [(3, 2), (1, 1), (20, 0)])
def test_swa_decode_equals_forward(window, sinks):
    decode_matches_forward(swa(window, sinks), X, SEG)


def test_ttt_memory_decode_equals_forward():
    layer = TTTMemory(D, H, HD, memory_hidden=12, chunk_size=3, lr_init=0.1, init_std=0.3, rngs=nnx.Rngs(1))
    randomize(layer, 1, scale=0.1)
    decode_matches_forward(layer, X, SEG)


def test_allmem_decode_equals_forward():
    layer = allmem()
    randomize(layer, 3, scale=0.1)
    decode_matches_forward(layer, X, SEG)


def test_allmem_with_zero_gate_is_exactly_swa():
    layer = allmem(alpha=0.0)
    pos = positions(SEG)
    y = np.asarray(run(layer, X, pos, SEG))
    np.testing.assert_array_equal(y, np.asarray(run(layer.swa, X, pos, SEG)))
    layer.alpha.set_value(jnp.full((D,), 0.5))
    assert np.abs(np.asarray(run(layer, X, pos, SEG)) - y).max() > 1e-3  # the memory does contribute


def test_knobs_change_the_computation_and_validate():
    layer = allmem(window=3, sinks=0)
    pos = positions(SEG)
    before = np.asarray(run(layer, X, pos, SEG))
    layer.window, layer.sinks, layer.chunk_size = 2, 1, 4
    assert (layer.swa.window, layer.swa.sinks, layer.memory.chunk_size) == (2, 1, 4)
    ref = allmem(window=2, sinks=1, chunk=4)
    np.testing.assert_array_equal(np.asarray(run(layer, X, pos, SEG)), np.asarray(run(ref, X, pos, SEG)))
    assert np.abs(before - np.asarray(run(layer, X, pos, SEG))).max() > 1e-4
    with pytest.raises(ValueError, match="window"):
        layer.window = 0
    with pytest.raises(ValueError, match="sinks"):
        layer.sinks = -1
    with pytest.raises(ValueError, match="chunk_size"):
        layer.chunk_size = 0
    with pytest.raises(ValueError, match="window"):
        swa(0, 0)


def test_sampler_stays_in_ranges():
    rng = np.random.default_rng(0)
    draws = [sample_allmem_hparams(rng) for _ in range(200)]
    for d in draws:
        assert 512 <= d["window"] <= 8192 and d["window"] % 128 == 0
        assert 0 <= d["sinks"] <= 256 and d["sinks"] % 64 == 0
        assert 512 <= d["chunk_size"] <= 4096 and d["chunk_size"] % 128 == 0
    assert len({d["window"] for d in draws}) > 10
    with pytest.raises(ValueError, match="window range"):
        sample_allmem_hparams(rng, window=(10, 5))
