"""Cached generation against transformers' generate, sampling filters and text post-processing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hybrid_jax as hj
from hybrid_jax.convert.hf_import import load_tokenizer
from hybrid_jax.eval.generate import bucket_length, generate_tokens, left_pad, sample_logits
from tests.fixtures import load_hf, write_tiny_checkpoint

PAD = 256


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("gen"), num_key_value_heads=1)


@pytest.fixture(scope="module")
def model(ckpt):
    return hj.load_pretrained(ckpt)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, n).tolist() for n in (3, 9, 17, 6)]


def _hf_generate(ckpt, prompts, max_new_tokens, eos):
    ids, mask = left_pad(prompts, PAD)
    with torch.no_grad():
        out = load_hf(ckpt).generate(torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(),
                                     max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                     pad_token_id=PAD)
    return out[:, ids.shape[1]:].numpy()


def test_greedy_matches_transformers(ckpt, model, prompts):
    ours = generate_tokens(model, prompts, 32, eos_token_id=[], pad_token_id=PAD)
    np.testing.assert_array_equal(ours, _hf_generate(ckpt, prompts, 32, None))
    # Same tokens through the python-loop decode (one jitted step per token).
    np.testing.assert_array_equal(generate_tokens(model, prompts, 32, eos_token_id=[], pad_token_id=PAD,
                                                  loop="python"), ours)


def test_eos_stops_rows_like_transformers(ckpt, model, prompts):
    free = generate_tokens(model, prompts, 16, eos_token_id=[], pad_token_id=PAD)
    eos = int(free[1, 4])  # a token row 1 emits mid-way, so at least one row stops early
    ours = generate_tokens(model, prompts, 16, eos_token_id=eos, pad_token_id=PAD)
    ref = _hf_generate(ckpt, prompts, 16, eos)
    np.testing.assert_array_equal(ours[:, : ref.shape[1]], ref)
    assert (ours[:, ref.shape[1]:] == PAD).all()
    stop = int(np.argmax(ours[1] == eos))
    assert stop <= 4 and (ours[1, stop + 1:] == PAD).all()


def test_sampling_filters():
    logits = jnp.asarray([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    key = jax.random.key(0)
    np.testing.assert_array_equal(sample_logits(logits, key), [1, 0])
    draws = jax.vmap(lambda k: sample_logits(logits, k, temperature=1.0, top_k=2))(jax.random.split(key, 400))
    assert set(np.unique(draws[:, 0]).tolist()) == {1, 3}
    # top_p: row 0 keeps {1, 3} (p(1)+p(3) ~ 0.9), row 1 keeps only its dominant token
    draws = jax.vmap(lambda k: sample_logits(logits, k, temperature=1.0, top_p=0.8))(jax.random.split(key, 400))
    assert set(np.unique(draws[:, 0]).tolist()) == {1, 3} and set(np.unique(draws[:, 1]).tolist()) == {0}
    draws = jax.vmap(lambda k: sample_logits(logits, k, temperature=1.0))(jax.random.split(key, 2000))
    assert set(np.unique(draws[:, 0]).tolist()) == {0, 1, 2, 3}


def test_sampled_generation_is_seeded(model, prompts):
    kw = dict(temperature=0.8, top_k=20, top_p=0.9, eos_token_id=[], pad_token_id=PAD)
    a = generate_tokens(model, prompts, 8, seed=3, **kw)
    np.testing.assert_array_equal(a, generate_tokens(model, prompts, 8, seed=3, **kw))
    assert (a != generate_tokens(model, prompts, 8, seed=4, **kw)).any()


def test_text_generate_and_stop_strings(ckpt, model):
    tok = load_tokenizer(ckpt)
    texts = ["Hello there", "A"]
    full = hj.generate(model, tok, texts, max_new_tokens=12, eos_token_id=[])
    ids = generate_tokens(model, [tok(t)["input_ids"] for t in texts], 12, eos_token_id=[], pad_token_id=PAD)
    assert full == [tok.decode(r, skip_special_tokens=True) for r in ids.tolist()]
    stop = full[0][3:5]
    assert hj.generate(model, tok, texts, max_new_tokens=12, eos_token_id=[], stop=[stop])[0] == \
        full[0][: full[0].find(stop)]


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_tokens(model, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="max_new_tokens=0 must be >= 1"):
        generate_tokens(model, [[1]], 0)
    assert [bucket_length(n) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]
