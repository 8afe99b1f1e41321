"""DecoderLM behaviour: padding/packing contract, forward outputs, caches, remat, dtypes, mixer swaps."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_jax.layers import attention as attention_mod
from hybrid_jax.layers.attention import Attention
from hybrid_jax.layers.params import logical_axes
from hybrid_jax.models.cache import init_cache
from hybrid_jax.models.qwen3 import DecoderLM, Qwen3, Qwen3Config, default_positions
from tests.fixtures import logits_of

CFG = Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, rope_theta=10000.0, initializer_range=0.2)


@pytest.fixture(scope="module")
def model():
    return Qwen3(CFG, rngs=nnx.Rngs(0))


def _ids(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, shape), jnp.int32)


def test_left_padding_computes_what_unpadded_computes(model):
    ids = _ids(0, (1, 9))
    padded = jnp.concatenate([jnp.zeros((1, 4), jnp.int32), ids], axis=1)
    mask = jnp.concatenate([jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 9), jnp.int32)], axis=1)
    np.testing.assert_allclose(logits_of(model, padded, mask)[:, 4:], logits_of(model, ids), atol=1e-5, rtol=0)


def test_packed_documents_compute_what_they_compute_alone(model):
    a, b = _ids(1, (1, 5)), _ids(2, (1, 7))
    packed = jnp.concatenate([a, b], axis=1)
    seg = jnp.asarray([[1] * 5 + [2] * 7])
    out = logits_of(model, packed, segment_ids=seg)
    np.testing.assert_allclose(out[:, :5], logits_of(model, a), atol=1e-5, rtol=0)
    np.testing.assert_allclose(out[:, 5:], logits_of(model, b), atol=1e-5, rtol=0)


def test_default_positions():
    seg = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 2, 2, 2], [1, 0, 1, 2, 2]])
    np.testing.assert_array_equal(default_positions(seg), [[0, 0, 0, 1, 2], [0, 1, 0, 1, 2], [0, 0, 1, 0, 1]])


def test_forward_outputs(model):
    ids = _ids(3, (2, 6))
    out = model.forward(ids, output_hidden_states=True, output_mixer_io=True)
    assert len(out.hidden_states) == CFG.num_hidden_layers + 1 and len(out.mixer_outputs) == CFG.num_hidden_layers
    for i, block in enumerate(model.blocks):
        np.testing.assert_allclose(out.mixer_inputs[i], block.input_norm(out.hidden_states[i]), atol=1e-6)
        y, _ = block.mixer(out.mixer_inputs[i], positions=default_positions(jnp.ones_like(ids)),
                           segment_ids=jnp.ones_like(ids))
        np.testing.assert_allclose(out.mixer_outputs[i], y, atol=1e-6)
    np.testing.assert_allclose(model.logits(model.norm(out.hidden_states[-1])), out.logits, atol=1e-5)


def test_cached_prefill_and_decode_match_full_forward(model):
    ids = _ids(4, (2, 10))
    mask = jnp.asarray([[1] * 10, [0] * 3 + [1] * 7])
    pos = default_positions(mask)
    full = logits_of(model, ids, mask)
    step = nnx.jit(lambda m, i, a, p, c: m.forward(i, a, positions=p, cache=c))
    cache = init_cache(model, 2, 16)
    out = step(model, ids[:, :6], mask[:, :6], pos[:, :6], cache)
    logits = [out.logits]
    cache = out.cache
    for t in range(6, 10):
        out = step(model, ids[:, t:t + 1], mask[:, t:t + 1], pos[:, t:t + 1], cache)
        logits.append(out.logits)
        cache = out.cache
    assert int(cache[0]["index"]) == 10
    got = jnp.concatenate(logits, axis=1)
    np.testing.assert_allclose(got[mask == 1], full[mask == 1], atol=1e-5, rtol=0)


def test_query_chunked_attention_matches(monkeypatch, model):
    ids = _ids(5, (2, 40))
    mask = jnp.asarray([[1] * 40, [0] * 9 + [1] * 31])
    ref = logits_of(model, ids, mask)
    monkeypatch.setattr(attention_mod, "_MAX_SCORE_BYTES", 2 * 4 * 24 * 40 * 4)  # forces 3 chunks of 16
    chunked = nnx.jit(lambda m, i, a: m(i, a))(model, ids, mask)  # a fresh trace sees the patched budget
    np.testing.assert_allclose(chunked[mask == 1], ref[mask == 1], atol=1e-5, rtol=0)


def test_mixers_are_swappable(model):
    ids = _ids(6, (1, 12))
    ref = logits_of(model, ids)
    swapped = Qwen3(CFG, rngs=nnx.Rngs(0))
    old = swapped.blocks[1].mixer
    swapped.blocks[1].mixer = Attention.from_config(CFG, window=3, rngs=nnx.Rngs(9))
    nnx.update(swapped.blocks[1].mixer, nnx.state(old))
    windowed = logits_of(swapped, ids)
    np.testing.assert_allclose(windowed[:, :3], ref[:, :3], atol=1e-5, rtol=0)  # window covers the whole prefix
    assert np.abs(windowed[:, 3:] - ref[:, 3:]).max() > 1e-3
    built = DecoderLM(CFG, mixers=[Attention.from_config(CFG, rngs=nnx.Rngs(i)) for i in range(2)],
                      rngs=nnx.Rngs(1))
    assert built(ids).shape == (1, 12, CFG.vocab_size)
    with pytest.raises(ValueError, match="got 1 mixers for num_hidden_layers=2"):
        DecoderLM(CFG, mixers=[old], rngs=nnx.Rngs(0))


def test_remat_same_values_and_grads():
    ids = _ids(7, (2, 8))
    plain = Qwen3(CFG, rngs=nnx.Rngs(3))
    remat = Qwen3(dataclasses.replace(CFG, remat=True), rngs=nnx.Rngs(3))

    def loss(m):
        return jnp.mean(jax.nn.log_softmax(m(ids))[..., 0])

    grad = nnx.jit(nnx.grad(loss))
    g1, g2 = grad(plain), grad(remat)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_bfloat16_close_to_float32():
    ids = _ids(8, (2, 8))
    m32 = Qwen3(CFG, rngs=nnx.Rngs(4))
    f32 = logits_of(m32, ids)
    m16 = Qwen3(dataclasses.replace(CFG, dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(4))
    assert m16.embed[...].dtype == jnp.bfloat16
    nnx.update(m16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(m32, nnx.Param)))
    out = logits_of(m16, ids)
    assert out.dtype == jnp.float32
    rms_rel = float(jnp.sqrt(jnp.mean((out - f32) ** 2) / jnp.mean(f32**2)))
    assert rms_rel < 0.05


def test_every_param_has_logical_axes(model):
    params = nnx.state(model, nnx.Param)
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert leaves
    for v in leaves:
        axes = logical_axes(v)
        assert axes is not None and len(axes) == v.ndim


def test_config_hf_round_trip_and_errors():
    cfg = dataclasses.replace(CFG, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                  "original_max_position_embeddings": 64})
    assert Qwen3Config.from_hf(cfg.to_hf()) == cfg
    legacy = {**cfg.to_hf(), "rope_parameters": None}  # transformers 4.x layout
    assert Qwen3Config.from_hf(legacy) == cfg
    with pytest.raises(ValueError, match="model_type 'llama' is not 'qwen3'"):
        Qwen3Config.from_hf({**cfg.to_hf(), "model_type": "llama"})
    with pytest.raises(ValueError, match="rope_scaling type .dynamic. is not supported"):
        Qwen3Config(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        Qwen3Config(num_attention_heads=6, num_key_value_heads=4)


def test_kernel_route_matches_masked_path(monkeypatch, model):
    """The route to pallas_kernels.swa (taken on GPU) computes what the masked jnp path computes.

    On CPU swa_attention's "auto" backend is its reference oracle, so this checks the plumbing:
    GQA, segment ids, zeroed padding, the window, and the empty-cache prefill branch.
    """
    ids = _ids(9, (2, 12))
    mask = jnp.asarray([[1] * 12, [0] * 5 + [1] * 7])
    ref = logits_of(model, ids, mask)
    cache_fwd = nnx.jit(lambda m, i, a, c: m.forward(i, a, positions=default_positions(a), cache=c).logits)
    ref_cached = cache_fwd(model, ids, mask, init_cache(model, 2, 16))
    monkeypatch.setattr(attention_mod, "_use_kernel", lambda q: True)
    got = nnx.jit(lambda m, i, a: m(i, a))(model, ids, mask)
    np.testing.assert_allclose(got[mask == 1], ref[mask == 1], atol=1e-5, rtol=0)
    got_cached = nnx.jit(lambda m, i, a, c: m.forward(i, a, positions=default_positions(a), cache=c).logits)(
        model, ids, mask, init_cache(model, 2, 16))
    np.testing.assert_allclose(got_cached[mask == 1], ref_cached[mask == 1], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def small_hybrid():
    import hybrid_jax as hj

    teacher = Qwen3(dataclasses.replace(CFG, num_hidden_layers=5), rngs=nnx.Rngs(0))
    return hj.build_student(teacher, "attention:0,3;kda:1,2,4")


def test_blocks_as_their_own_jit_compute_what_inline_blocks_compute(small_hybrid, monkeypatch):
    from hybrid_jax.models import qwen3

    graphdef, state = nnx.split(small_hybrid)
    ids = _ids(4, (2, 8))

    def loss_and_grad():  # a new function each time: a fresh trace, not jit's cached one
        def run(state, ids):
            def loss(s):
                return jnp.mean(nnx.merge(graphdef, s).forward(ids).logits ** 2)
            return jax.value_and_grad(loss)(state)
        return jax.jit(run)

    own = loss_and_grad()(state, ids)
    monkeypatch.setattr(qwen3, "JIT_BLOCKS", False)
    inline = loss_and_grad()(state, ids)
    for a, b in zip(jax.tree.leaves(own), jax.tree.leaves(inline), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_blocks_of_one_structure_lower_once(small_hybrid):
    """Each block runs as its own jit: blocks of one kind share one lowered function (called once
    per layer), so the model's lowering grows with the kinds of block, not the layers."""
    import re

    graphdef, state = nnx.split(small_hybrid)

    def forward(state, ids):
        return nnx.merge(graphdef, state).forward(ids).logits

    text = jax.jit(forward).lower(state, _ids(3, (1, 8))).as_text()
    defined = re.findall(r"func\.func private @(_block_call\w*)", text)
    called = re.findall(r"call @(_block_call\w*)\(", text)
    assert len(defined) == 2, defined  # one attention block, one KDA block
    assert sorted(called.count(name) for name in defined) == [2, 3]
