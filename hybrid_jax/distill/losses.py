"""Distillation objectives: forward/reverse KL, generalised JSD, cross-entropy, MSE, weighted mixes.

Conventions
* Logits `[B, T, V]`; position t holds the distribution over token t+1. All losses are
  computed in float32 from `log_softmax`, never from `log(softmax)`.
* Masks `[B, T]`: `prediction_mask(batch)` keeps position t when token t+1 is a target
  (`loss_mask[t+1] = 1`, not padding) of the same segment; `loss_mask` marks target tokens
  (completion-only data sets it on assistant tokens). A mask of all zeros gives loss 0, not NaN.
* Temperature τ divides both logit sets; KL-type losses are multiplied by τ² so gradient
  scales stay comparable across temperatures (Hinton et al.).
* `top_k > 0` keeps the teacher's k largest logits, renormalised over that support. Forward
  KL compares them with the student's full-vocabulary log-probabilities (the student is
  still penalised for mass outside the support); reverse KL and JSD need both
  distributions on one support, so there the student is renormalised over it too.
* Loss objects follow tunix: small frozen dataclasses with
  `compute_loss(student_logits, teacher_logits, batch) -> (loss, metrics)`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from hybrid_jax.config import LOSS_KINDS, ConfigError


def token_mask(batch) -> jax.Array:
    """[B,T] float32: 1 where a token is a real (segment > 0) target (loss_mask = 1)."""
    seg = jnp.asarray(batch["segment_ids"])
    lm = jnp.asarray(batch.get("loss_mask", jnp.ones_like(seg)))
    return ((seg > 0) & (lm > 0)).astype(jnp.float32)


def prediction_mask(batch) -> jax.Array:
    """[B,T] float32: 1 at position t when token t+1 is a target of the same segment."""
    seg = jnp.asarray(batch["segment_ids"])
    tm = token_mask(batch)
    keep = (tm[:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1])
    return jnp.pad(keep.astype(jnp.float32), ((0, 0), (0, 1)))


def next_token_labels(input_ids: jax.Array) -> jax.Array:
    """Token t+1 at position t (the last position gets 0 and is masked by prediction_mask)."""
    return jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)))


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of x over mask > 0 (zeros where masked, so NaN/inf there cannot leak)."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(jnp.where(mask > 0, x, 0.0) * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _kl_terms(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """Σ_v p (log p − log q) over the last axis, with 0·log 0 = 0."""
    p = jnp.exp(logp)
    return jnp.sum(jnp.where(p > 0, p * (logp - logq), 0.0), axis=-1)


def _log_probs(student_logits, teacher_logits, temperature: float, top_k: int, renorm_student: bool):
    """Teacher and student log-probabilities on a common support (full vocab or teacher top-k)."""
    s = student_logits.astype(jnp.float32) / temperature
    t = teacher_logits.astype(jnp.float32) / temperature
    if top_k and top_k < t.shape[-1]:
        t_top, idx = jax.lax.top_k(t, top_k)
        logp_t = jax.nn.log_softmax(t_top, axis=-1)
        if renorm_student:
            logq_s = jax.nn.log_softmax(jnp.take_along_axis(s, idx, axis=-1), axis=-1)
        else:
            logq_s = jnp.take_along_axis(jax.nn.log_softmax(s, axis=-1), idx, axis=-1)
        return logp_t, logq_s
    return jax.nn.log_softmax(t, axis=-1), jax.nn.log_softmax(s, axis=-1)


def forward_kl_per_token(student_logits, teacher_logits, *, temperature=1.0, top_k=0):
    """KL(teacher ‖ student) per position [B,T], × τ²."""
    logp_t, logq_s = _log_probs(student_logits, teacher_logits, temperature, top_k, renorm_student=False)
    return _kl_terms(logp_t, logq_s) * temperature**2


def reverse_kl_per_token(student_logits, teacher_logits, *, temperature=1.0, top_k=0):
    """KL(student ‖ teacher) per position [B,T], × τ²."""
    logp_t, logq_s = _log_probs(student_logits, teacher_logits, temperature, top_k, renorm_student=True)
    return _kl_terms(logq_s, logp_t) * temperature**2


def jsd_per_token(student_logits, teacher_logits, *, beta=0.5, temperature=1.0, top_k=0):
    """Generalised JSD_β = β·KL(P_t‖M) + (1−β)·KL(P_s‖M), M = β·P_t + (1−β)·P_s, × τ².

    JSD_β / β → KL(teacher‖student) as β → 0 and JSD_β / (1−β) → KL(student‖teacher) as
    β → 1 (GKD, Agarwal et al.); β = 0.5 is the symmetric JSD. β must lie inside (0, 1).
    """
    if not 0.0 < beta < 1.0:
        raise ConfigError(f"jsd: beta must lie in (0, 1), got {beta}")
    logp_t, logq_s = _log_probs(student_logits, teacher_logits, temperature, top_k, renorm_student=True)
    log_m = jnp.logaddexp(logp_t + math.log(beta), logq_s + math.log1p(-beta))
    return (beta * _kl_terms(logp_t, log_m) + (1.0 - beta) * _kl_terms(logq_s, log_m)) * temperature**2


def cross_entropy_per_token(logits, labels):
    """−log softmax(logits)[label] per position [B,T]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def mse_per_token(x, y):
    """Mean over features of (x − y)² per position [B,T]."""
    d = x.astype(jnp.float32) - y.astype(jnp.float32)
    return jnp.mean(d * d, axis=-1)


def forward_kl(student_logits, teacher_logits, mask, **kw):
    return masked_mean(forward_kl_per_token(student_logits, teacher_logits, **kw), mask)


def reverse_kl(student_logits, teacher_logits, mask, **kw):
    return masked_mean(reverse_kl_per_token(student_logits, teacher_logits, **kw), mask)


def generalized_jsd(student_logits, teacher_logits, mask, **kw):
    return masked_mean(jsd_per_token(student_logits, teacher_logits, **kw), mask)


def cross_entropy(logits, labels, mask):
    return masked_mean(cross_entropy_per_token(logits, labels), mask)


def mse(x, y, mask):
    return masked_mean(mse_per_token(x, y), mask)


@dataclasses.dataclass(frozen=True)
class LogitLoss:
    """A weighted mix of logit objectives, e.g. ((\"forward_kl\", 0.9), (\"ce\", 0.1))."""

    terms: tuple[tuple[str, float], ...] = (("forward_kl", 1.0),)
    temperature: float = 1.0
    top_k: int = 0
    jsd_beta: float = 0.5

    def __post_init__(self):
        for kind, _ in self.terms:
            if kind not in LOSS_KINDS or kind == "mse":
                raise ConfigError(f"LogitLoss: {kind!r} is not a logit objective; use forward_kl, reverse_kl, jsd or ce")

    @property
    def needs_teacher(self) -> bool:
        return any(k != "ce" for k, _ in self.terms)

    def compute_loss(self, student_logits, teacher_logits, batch):
        mask = prediction_mask(batch)
        kw = dict(temperature=self.temperature, top_k=self.top_k)
        total = jnp.zeros((), jnp.float32)
        metrics = {}
        for kind, w in self.terms:
            if kind == "ce":
                v = cross_entropy(student_logits, next_token_labels(jnp.asarray(batch["input_ids"])), mask)
            elif kind == "forward_kl":
                v = forward_kl(student_logits, teacher_logits, mask, **kw)
            elif kind == "reverse_kl":
                v = reverse_kl(student_logits, teacher_logits, mask, **kw)
            else:
                v = generalized_jsd(student_logits, teacher_logits, mask, beta=self.jsd_beta, **kw)
            metrics[kind] = v
            total = total + w * v
        metrics["loss"] = total
        metrics["target_tokens"] = jnp.sum(mask)
        return total, metrics


@dataclasses.dataclass(frozen=True)
class ActivationMSE:
    """Mean over layers of the per-token MSE between student and teacher activations."""

    def compute_loss(self, student_acts, teacher_acts, batch, layer_ids):
        mask = (jnp.asarray(batch["segment_ids"]) > 0).astype(jnp.float32)
        metrics = {}
        total = jnp.zeros((), jnp.float32)
        for i, s, t in zip(layer_ids, student_acts, teacher_acts, strict=True):
            v = mse(s, t, mask)
            metrics[f"mse/layer_{i}"] = v
            total = total + v
        total = total / max(len(layer_ids), 1)
        metrics["loss"] = total
        return total, metrics
