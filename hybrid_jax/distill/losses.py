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
* `LogitLoss.compute_loss_from_hidden` computes the same loss from final-normed hidden states
  and the output projections, `chunk` sequence positions at a time, so no [B, T, V] array is
  ever materialised: peak memory is O(B · chunk · V) in the forward and the backward pass (the
  gradient is formed chunk by chunk during the forward, as in fused linear cross-entropy).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from hybrid_jax.config import LOSS_KINDS, ConfigError
from hybrid_jax.models.qwen3 import lm_head_logits
from hybrid_jax.sharding import constrain, mesh_axis_size, per_shard

LOGIT_KERNELS = ("auto", "xla", "pallas_gpu", "pallas_interpret")


def real_token_mask(batch) -> jax.Array:
    """[B,T] float32: 1 at every real (segment > 0) token, what the alignment losses average over."""
    return (jnp.asarray(batch["segment_ids"]) > 0).astype(jnp.float32)


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
    def weights(self) -> jax.Array:
        """[K] float32: each term's weight, in the order of `terms`."""
        return jnp.asarray([w for _, w in self.terms], jnp.float32)

    @property
    def needs_teacher(self) -> bool:
        return any(k != "ce" for k, _ in self.terms)

    def resolve_kernel(self, kernel: str, vocab: int) -> str:
        """`kernel` of compute_loss_from_hidden made concrete: "auto" takes the Pallas kernels on
        a GPU when they compute this objective (forward KL and cross-entropy, no top-k) and the
        vocabulary is not split over a tensor-parallel mesh axis, else XLA."""
        if kernel not in LOGIT_KERNELS:
            raise ConfigError(f"logit_kernel={kernel!r}; use one of {LOGIT_KERNELS}")
        fits = all(k in ("forward_kl", "ce") for k, _ in self.terms) and not 0 < self.top_k < vocab
        if kernel == "auto":
            on_gpu = jax.default_backend() in ("gpu", "cuda")
            return "pallas_gpu" if fits and on_gpu and mesh_axis_size("tensor") == 1 else "xla"
        if kernel != "xla" and not fits:
            raise ConfigError(f"logit_kernel={kernel!r} computes forward_kl and ce without top_k only; "
                              f"this loss has terms {self.terms} and top_k={self.top_k}: use 'xla' or 'auto'")
        return kernel

    def per_token(self, student_logits, teacher_logits, labels) -> list[jax.Array]:
        """Each term's per-position value (unweighted), in the order of `terms`."""
        kw = dict(temperature=self.temperature, top_k=self.top_k)
        out = []
        for kind, _ in self.terms:
            if kind == "ce":
                out.append(cross_entropy_per_token(student_logits, labels))
            elif kind == "forward_kl":
                out.append(forward_kl_per_token(student_logits, teacher_logits, **kw))
            elif kind == "reverse_kl":
                out.append(reverse_kl_per_token(student_logits, teacher_logits, **kw))
            else:
                out.append(jsd_per_token(student_logits, teacher_logits, beta=self.jsd_beta, **kw))
        return out

    def compute_loss(self, student_logits, teacher_logits, batch):
        mask = prediction_mask(batch)
        labels = next_token_labels(jnp.asarray(batch["input_ids"]))
        total = jnp.zeros((), jnp.float32)
        metrics = {}
        for (kind, w), v in zip(self.terms, self.per_token(student_logits, teacher_logits, labels), strict=True):
            metrics[kind] = masked_mean(v, mask)
            total = total + w * metrics[kind]
        metrics["loss"] = total
        metrics["target_tokens"] = jnp.sum(mask)
        return total, metrics

    def compute_loss_from_hidden(self, student_hidden, student_head, teacher_hidden, teacher_head, batch, *, chunk: int,
                                 student_dtype=jnp.float32, teacher_dtype=jnp.float32, kernel: str = "auto"):
        """`compute_loss` on logits `lm_head_logits(hidden, head, dtype)`, `chunk` positions at a time.

        hidden: final-normed [B, T, D]; head: the [D, V] output projection; dtype: the model's
        compute dtype. The teacher side is constant (no gradient). The total is differentiable
        with respect to the student's hidden states and head; the per-term metrics are not
        (stop_gradient), since only the weighted total's gradient is formed in the forward pass.
        kernel: how each chunk's loss and logit gradient are formed (`LOGIT_KERNELS`): "xla"
        (autodiff of `per_token`), "pallas_gpu" / "pallas_interpret" (pallas_kernels.logit_loss:
        forward KL and cross-entropy without top-k only) or "auto" (pallas_gpu where it applies
        on a GPU, else xla).
        """
        if chunk <= 0:
            raise ConfigError(f"compute_loss_from_hidden: chunk must be > 0 positions, got {chunk}")
        kernel = self.resolve_kernel(kernel, student_head.shape[-1])
        mask = prediction_mask(batch)
        labels = next_token_labels(jnp.asarray(batch["input_ids"]))
        if self.needs_teacher:
            teacher_hidden, teacher_head = jax.lax.stop_gradient((teacher_hidden, teacher_head))
        else:
            teacher_hidden = teacher_head = None
        loss, values = _fused_logit_loss(self, chunk, jnp.dtype(student_dtype), jnp.dtype(teacher_dtype), kernel)(
            student_hidden, student_head, teacher_hidden, teacher_head, mask, labels)
        values = jax.lax.stop_gradient(values)
        metrics = {kind: values[i] for i, (kind, _) in enumerate(self.terms)}
        metrics.update(loss=loss, target_tokens=jnp.sum(mask))
        return loss, metrics


def _fused_logit_loss(loss: LogitLoss, chunk: int, s_dtype, t_dtype, kernel: str):
    """(student_hidden, student_head, teacher_hidden, teacher_head, mask, labels) -> (total, values[K]).

    A custom VJP whose forward scans over sequence chunks: per chunk it forms both logit
    blocks [B, chunk, V], the masked per-term sums and the gradient of the weighted total
    (scaled by 1/den) with respect to the student's logits (`_chunk_sums_and_logit_grad`), in
    the student's compute dtype; the chunk's gradients for the student hidden states and head
    are then two matmuls in that dtype (bf16 operands in a bf16 model, where autodiff of the
    float32 logits would have made them float32 matmuls). The backward pass only scales those
    by the incoming cotangent, so nothing [B, T, V]-sized is stored or recomputed. Zero-padded
    positions beyond T carry mask 0.
    """

    def blocks(x, n):  # [B, T, ...] -> [n, B, chunk, ...], zero padded to n * chunk positions
        b, t = x.shape[:2]
        x = jnp.pad(x, [(0, 0), (0, n * chunk - t)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

    def forward_and_grads(hs, head, ht, t_head, mask, labels):
        b, t = mask.shape
        n = -(-t // chunk)
        inv_den = 1.0 / jnp.maximum(jnp.sum(mask), 1.0)
        head_c = head.astype(s_dtype)
        # XLA's CPU dot thunk has no bf16 x bf16 -> f32 kernel for the transposed head-gradient
        # product: on CPU the gradient matmuls take the same bf16 values as float32 operands
        # (bf16 products are exact in float32, so only the summation order differs).
        mm_dtype = jnp.float32 if jax.default_backend() == "cpu" else s_dtype

        def body(d_head, xs):
            hs_c, ht_c, m_c, lab_c = xs
            s_logits = lm_head_logits(hs_c, head_c, s_dtype)
            t_logits = None if ht_c is None else lm_head_logits(ht_c, t_head, t_dtype)
            sums, ds = _chunk_sums_and_logit_grad(loss, kernel, s_logits, t_logits, m_c, lab_c, inv_den, s_dtype)
            ds = constrain(ds, "b.h").astype(mm_dtype)
            dh_c = jnp.einsum("...v,dv->...d", ds, head_c.astype(mm_dtype), preferred_element_type=jnp.float32)
            dw_c = jnp.einsum("...d,...v->dv", hs_c.astype(s_dtype).astype(mm_dtype), ds,
                              preferred_element_type=jnp.float32)
            return d_head + dw_c, (sums, dh_c.astype(hs_c.dtype))

        xs = (blocks(hs, n), None if ht is None else blocks(ht, n), blocks(mask, n), blocks(labels, n))
        d_head, (sums, dh) = jax.lax.scan(body, jnp.zeros(head.shape, jnp.float32), xs)
        values = jnp.sum(sums, axis=0) * inv_den
        dh = jnp.moveaxis(dh, 0, 1).reshape(b, n * chunk, -1)[:, :t]
        return (jnp.dot(loss.weights, values), values), (dh, d_head.astype(head.dtype))

    @jax.custom_vjp
    def fused(hs, head, ht, t_head, mask, labels):
        return forward_and_grads(hs, head, ht, t_head, mask, labels)[0]

    def fwd(hs, head, ht, t_head, mask, labels):
        return forward_and_grads(hs, head, ht, t_head, mask, labels)

    def bwd(res, g):
        dh, d_head = res
        g_total, _ = g  # `values` leave through stop_gradient: their cotangent is always zero
        return (dh * g_total.astype(dh.dtype), d_head * g_total.astype(d_head.dtype), None, None, None, None)

    fused.defvjp(fwd, bwd)
    return fused


def _masked_sum(v, m):
    return jnp.sum(jnp.where(m > 0, v, 0.0) * m)


def _chunk_sums_and_logit_grad(loss: LogitLoss, kernel: str, s_logits, t_logits, m, labels, inv_den, grad_dtype):
    """Per-term masked sums [K] of one chunk and d(weights . sums * inv_den)/d s_logits in
    `grad_dtype` (the dtype of the student's gradient matmuls)."""
    if kernel == "xla":
        def total(s):
            sums = jnp.stack([_masked_sum(v, m) for v in loss.per_token(s, t_logits, labels)])
            return jnp.dot(loss.weights, sums), sums

        _, vjp, sums = jax.vjp(total, s_logits, has_aux=True)
        return sums, vjp(inv_den)[0].astype(grad_dtype)
    # The Triton kernels load only where they run, as the KDA and SWA backends' do.
    from pallas_kernels import logit_loss

    tau = loss.temperature
    kinds = {k for k, _ in loss.terms}
    kl, ce = "forward_kl" in kinds, "ce" in kinds
    w_kl = sum(w for k, w in loss.terms if k == "forward_kl")
    w_ce = sum(w for k, w in loss.terms if k == "ce")
    interpret = kernel == "pallas_interpret"

    def rows(s, t, m, labels, inv_den):  # per shard of batch rows
        b, c, V = s.shape
        s2, lab = s.reshape(b * c, V), labels.reshape(b * c)
        t2 = t.reshape(b * c, V) if kl else None
        st = logit_loss.row_stats(s2, t2, temperature=tau, ce=ce, interpret=interpret)
        keep = jnp.where(m > 0, m, 0.0).reshape(b * c) * inv_den
        kl_rows = tau**2 * (st.cross - st.lse_t + st.lse_s) if kl else jnp.zeros_like(keep)
        ce_rows = st.lse_ce - jnp.take_along_axis(s2, lab[:, None], axis=1)[:, 0] if ce else jnp.zeros_like(keep)
        ds = logit_loss.logits_grad(s2, t2, lab, st, w_kl * tau * keep if kl else None, w_ce * keep if ce else None,
                                    temperature=tau, out_dtype=grad_dtype, interpret=interpret)
        return kl_rows.reshape(b, c), ce_rows.reshape(b, c), ds.reshape(b, c, V)

    kl_rows, ce_rows, ds = per_shard(rows, dict(s=s_logits, t=t_logits if kl else None, m=m, labels=labels, inv_den=inv_den),
                                     dict(s="b..", t="b..", m="b.", labels="b.", inv_den=""), ("b.", "b.", "b.."))
    sums = jnp.stack([_masked_sum(kl_rows if k == "forward_kl" else ce_rows, m) for k, _ in loss.terms])
    return sums, ds


@dataclasses.dataclass(frozen=True)
class ActivationMSE:
    """Mean over layers of the per-token MSE between student and teacher activations."""

    def compute_loss(self, student_acts, teacher_acts, batch, layer_ids):
        mask = real_token_mask(batch)
        metrics = {}
        total = jnp.zeros((), jnp.float32)
        for i, s, t in zip(layer_ids, student_acts, teacher_acts, strict=True):
            v = mse(s, t, mask)
            metrics[f"mse/layer_{i}"] = v
            total = total + v
        total = total / max(len(layer_ids), 1)
        metrics["loss"] = total
        return total, metrics
