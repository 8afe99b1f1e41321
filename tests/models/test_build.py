"""Qwen3's piecewise compiled initialisation gives the parameters of one jit over the whole construction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_jax.layers.attention import Attention
from hybrid_jax.layers.mlp import SwiGLU
from hybrid_jax.models.qwen3 import DecoderLM, Qwen3, Qwen3Config

CFG = Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, rope_theta=10000.0, initializer_range=0.2)


def _whole_model_jit(config, rngs):
    """The previous `Qwen3`: the eager DecoderLM construction traced as one program."""
    return nnx.jit(lambda r: DecoderLM(config, rngs=r))(rngs)


def _leaves(model):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model))}


@pytest.mark.parametrize("tied,dtype,seed", [(True, "float32", 0), (False, "float32", 3), (False, "bfloat16", 1)])
def test_qwen3_is_bitwise_the_whole_model_jit(tied, dtype, seed):
    config = CFG.replace(tie_word_embeddings=tied, dtype=dtype, param_dtype=dtype)
    rngs_fast, rngs_ref = nnx.Rngs(seed, dropout=seed + 1), nnx.Rngs(seed, dropout=seed + 1)
    fast, ref = _leaves(Qwen3(config, rngs=rngs_fast)), _leaves(_whole_model_jit(config, rngs_ref))
    assert fast.keys() == ref.keys()
    assert any("lm_head" in k for k in fast) == (not tied)
    for k in ref:
        assert fast[k].dtype == ref[k].dtype and fast[k].shape == ref[k].shape, k
        np.testing.assert_array_equal(fast[k].view(np.uint8), ref[k].view(np.uint8), err_msg=k)
    # the caller's Rngs advance as far as the reference construction advanced them
    assert int(rngs_fast.params.count[...]) == int(rngs_ref.params.count[...]) > 0
    assert int(rngs_fast.dropout.count[...]) == int(rngs_ref.dropout.count[...])
    # and the next draw from them is the same
    np.testing.assert_array_equal(jax.random.key_data(rngs_fast.params()), jax.random.key_data(rngs_ref.params()))


def test_differently_seeded_layers_differ():
    """Reusing one compiled program per layer kind must still give every layer its own draw."""
    leaves = _leaves(Qwen3(CFG, rngs=nnx.Rngs(0)))
    q = [leaves[k] for k in sorted(leaves) if k.endswith("['mixer']['q_proj'].value")]
    assert len(q) == CFG.num_hidden_layers
    assert not np.array_equal(q[0], q[1]) and not np.array_equal(q[1], q[2])


def test_qwen3_builds_abstractly_inside_eval_shape():
    abstract = nnx.eval_shape(lambda: Qwen3(CFG, rngs=nnx.Rngs(0)))
    concrete = _leaves(Qwen3(CFG, rngs=nnx.Rngs(0)))
    shapes = {jax.tree_util.keystr(p): (v.shape, v.dtype)
              for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(abstract))}
    assert shapes == {k: (v.shape, v.dtype) for k, v in concrete.items()}


def test_direct_decoder_construction_keeps_eager_numbers():
    """`DecoderLM(...)` without jit_init draws op by op, as before (students are built this way): the same
    parameters as calling each piece's constructor eagerly in DecoderLM's order."""
    config = CFG.replace(tie_word_embeddings=False)
    built = _leaves(DecoderLM(config, rngs=nnx.Rngs(2)))
    r = nnx.Rngs(2)
    mixers = [Attention.from_config(config, rngs=r) for _ in range(config.num_hidden_layers)]
    init = nnx.initializers.normal(config.initializer_range)
    embed = init(r.params(), (config.vocab_size, config.hidden_size), jnp.float32)
    mlps = [SwiGLU(config.hidden_size, config.intermediate_size, init_std=config.initializer_range, rngs=r)
            for _ in mixers]
    lm_head = init(r.params(), (config.hidden_size, config.vocab_size), jnp.float32)
    np.testing.assert_array_equal(built["['embed'].value"], embed)
    np.testing.assert_array_equal(built["['lm_head'].value"], lm_head)
    for i, (m, mlp) in enumerate(zip(mixers, mlps)):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            np.testing.assert_array_equal(built[f"['blocks'][{i}]['mixer']['{name}'].value"], getattr(m, name)[...])
        for name in ("gate", "up", "down"):
            np.testing.assert_array_equal(built[f"['blocks'][{i}]['mlp']['{name}'].value"], getattr(mlp, name)[...])
