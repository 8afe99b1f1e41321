"""Qwen3 logits against transformers' PyTorch Qwen3ForCausalLM on tiny random checkpoints (float32)."""

import jax.numpy as jnp
import numpy as np
import pytest

import hybrid_jax as hj
from hybrid_jax.models.qwen3 import default_positions
from tests.fixtures import hf_logits, logits_of, random_padded_batch, write_tiny_checkpoint

CASES = {
    "untied_gqa2": dict(num_key_value_heads=2),
    "tied_gqa1_headdim24": dict(tie_word_embeddings=True, num_key_value_heads=4, head_dim=24),
    "tied_gqa4_headdim8": dict(tie_word_embeddings=True, num_key_value_heads=1, head_dim=8),
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32}),
    "linear_bias": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, attention_bias=True),
}


def _batch(seed=0, batch=3, length=14):
    ids, mask = random_padded_batch(np.random.default_rng(seed), batch, length, 272)
    return ids, mask, np.asarray(default_positions(jnp.asarray(mask)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    path = write_tiny_checkpoint(tmp_path, **CASES[case])
    model = hj.load_pretrained(path)
    ids, mask, pos = _batch()
    ours = np.asarray(logits_of(model, jnp.asarray(ids), jnp.asarray(mask)))
    ref = hf_logits(path, ids, mask, pos)
    err = np.abs(ours - ref)[mask == 1].max()
    assert err <= 1e-4, f"{case}: max |dlogits| {err}"


def test_yarn_is_not_a_no_op(tmp_path):
    """The yarn case above would pass vacuously if rope scaling were ignored; it is not."""
    path = write_tiny_checkpoint(tmp_path, **CASES["yarn"])
    ids, mask, _ = _batch()
    scaled = np.asarray(logits_of(hj.load_pretrained(path), jnp.asarray(ids), jnp.asarray(mask)))
    plain = np.asarray(logits_of(hj.load_pretrained(path, rope_scaling=None), jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(scaled - plain)[mask == 1].max() > 1e-2
