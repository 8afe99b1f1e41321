"""Losses against float64 numpy closed forms; masks; numerical safety."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.distill import losses as L

B, T, V = 2, 5, 11


def _logits(seed, scale=3.0):
    return np.random.default_rng(seed).normal(size=(B, T, V)) * scale


def _logsm(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl(logp, logq):
    return (np.exp(logp) * (logp - logq)).sum(-1)


MASK = np.array([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], np.float32)


def _mean(x, m=MASK):
    return (x * m).sum() / m.sum()


def _close(a, b, tol=1e-5):
    assert abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b))), (float(a), float(b))


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_forward_and_reverse_kl(tau):
    s, t = _logits(0), _logits(1)
    lp, lq = _logsm(t / tau), _logsm(s / tau)
    _close(L.forward_kl(jnp.float32(s), jnp.float32(t), MASK, temperature=tau), _mean(_kl(lp, lq)) * tau**2)
    _close(L.reverse_kl(jnp.float32(s), jnp.float32(t), MASK, temperature=tau), _mean(_kl(lq, lp)) * tau**2)


def test_generalized_jsd_closed_form_and_bound():
    s, t = _logits(2), _logits(3)
    lp, lq = _logsm(t), _logsm(s)
    for beta in (0.1, 0.5, 0.9):
        m = np.log(beta * np.exp(lp) + (1 - beta) * np.exp(lq))
        want = _mean(beta * _kl(lp, m) + (1 - beta) * _kl(lq, m))
        _close(L.generalized_jsd(jnp.float32(s), jnp.float32(t), MASK, beta=beta), want)
    # symmetric JSD is bounded by log 2, reached for disjoint distributions
    far = float(L.generalized_jsd(jnp.float32(s * 50), jnp.float32(-s * 50), MASK, beta=0.5))
    assert np.log(2) * 0.9 < far <= np.log(2) + 1e-6


def test_top_k_teacher():
    s, t = _logits(4), _logits(5)
    k = 3
    idx = np.argsort(-t, axis=-1)[..., :k]
    lp = _logsm(np.take_along_axis(t, idx, -1))
    lq_full = np.take_along_axis(_logsm(s), idx, -1)  # forward KL: student not renormalised
    _close(L.forward_kl(jnp.float32(s), jnp.float32(t), MASK, top_k=k), _mean(_kl(lp, lq_full)))
    lq = _logsm(np.take_along_axis(s, idx, -1))  # reverse KL: both on the top-k support
    _close(L.reverse_kl(jnp.float32(s), jnp.float32(t), MASK, top_k=k), _mean(_kl(lq, lp)))
    assert float(L.forward_kl(jnp.float32(s), jnp.float32(t), MASK, top_k=k)) >= 0


def test_cross_entropy_and_mse():
    s = _logits(6)
    labels = np.random.default_rng(7).integers(0, V, size=(B, T))
    want = _mean(-np.take_along_axis(_logsm(s), labels[..., None], -1)[..., 0])
    _close(L.cross_entropy(jnp.float32(s), jnp.int32(labels), MASK), want)
    x, y = _logits(8), _logits(9)
    _close(L.mse(jnp.float32(x), jnp.float32(y), MASK), _mean(((x - y) ** 2).mean(-1)))


def test_masks_follow_segments_and_loss_mask():
    batch = {
        "input_ids": jnp.array([[5, 6, 7, 8, 9, 0]]),
        "segment_ids": jnp.array([[1, 1, 1, 2, 2, 0]]),
        "loss_mask": jnp.array([[1, 0, 1, 1, 1, 1]]),
    }
    np.testing.assert_array_equal(L.token_mask(batch), [[1, 0, 1, 1, 1, 0]])
    # position t counts when token t+1 is a target of the same segment
    np.testing.assert_array_equal(L.prediction_mask(batch), [[0, 1, 0, 1, 0, 0]])
    np.testing.assert_array_equal(L.next_token_labels(batch["input_ids"]), [[6, 7, 8, 9, 0, 0]])


def test_zero_mask_and_padded_vocabulary_give_finite_values_and_gradients():
    s = jnp.float32(_logits(10))
    t = jnp.float32(_logits(11)).at[..., -2:].set(-jnp.inf)  # padded vocabulary entries
    zero = jnp.zeros((B, T))
    for fn in (L.forward_kl, L.reverse_kl, L.generalized_jsd):
        assert float(fn(s, jnp.float32(_logits(11)), zero)) == 0.0
        g = jax.grad(lambda x, fn=fn: fn(x, jnp.float32(_logits(11)), zero))(s)
        assert float(jnp.max(jnp.abs(g))) == 0.0, fn.__name__
    for fn in (L.forward_kl, L.generalized_jsd):  # reverse KL is rightly infinite there
        assert bool(jnp.isfinite(fn(s, t, MASK))), fn.__name__
        g = jax.grad(lambda x, fn=fn: fn(x, t, MASK))(s)
        assert bool(jnp.all(jnp.isfinite(g))), fn.__name__


def test_logit_loss_mix_is_the_weighted_sum():
    rng = np.random.default_rng(12)
    batch = {
        "input_ids": jnp.int32(rng.integers(0, V, size=(B, T))),
        "segment_ids": jnp.ones((B, T), jnp.int32),
        "loss_mask": jnp.ones((B, T), jnp.int32),
    }
    s, t = jnp.float32(_logits(13)), jnp.float32(_logits(14))
    loss, m = L.LogitLoss(terms=(("forward_kl", 0.9), ("ce", 0.1)), temperature=2.0).compute_loss(s, t, batch)
    mask = L.prediction_mask(batch)
    want = 0.9 * L.forward_kl(s, t, mask, temperature=2.0) + 0.1 * L.cross_entropy(s, L.next_token_labels(batch["input_ids"]), mask)
    _close(loss, want)
    assert set(m) >= {"forward_kl", "ce", "loss"}
    with pytest.raises(ValueError, match="not a logit objective"):
        L.LogitLoss(terms=(("mse", 1.0),))
