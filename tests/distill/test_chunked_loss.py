"""The sequence-chunked logit loss (lm_head fused with the loss) against the unchunked one as oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_jax import config as C
from hybrid_jax.distill import losses as L
from hybrid_jax.distill.stages import build_stage
from hybrid_jax.distill.trainer import FlatParams
from tests.distill.helpers import Batches, tiny_student, tiny_teacher

B, T, D, V = 2, 13, 8, 37


def _rms_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sqrt(np.mean((a - b) ** 2)) / max(np.sqrt(np.mean(b**2)), 1e-30)


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    hs, ht = (jnp.float32(rng.normal(size=(B, T, D))) for _ in range(2))
    w, wt = (jnp.float32(rng.normal(size=(D, V))) for _ in range(2))
    seg = np.ones((B, T), np.int32)
    seg[0, 8:] = 2  # two packed documents
    seg[1, 10:] = 0  # right padding
    lm = np.ones((B, T), np.int32)
    lm[1, :4] = 0  # completion-only style mask
    batch = dict(input_ids=jnp.int32(rng.integers(0, V, (B, T))), segment_ids=jnp.int32(seg), loss_mask=jnp.int32(lm))
    return hs, w, ht, wt, batch


CASES = [
    dict(terms=(("forward_kl", 1.0),), temperature=2.0),
    dict(terms=(("reverse_kl", 1.0),), top_k=5),
    dict(terms=(("jsd", 1.0),), jsd_beta=0.3, temperature=2.0, top_k=5),
    dict(terms=(("ce", 1.0),)),
    dict(terms=(("forward_kl", 0.9), ("ce", 0.1)), temperature=2.0),
    dict(terms=(("forward_kl", 0.5), ("reverse_kl", 0.25), ("jsd", 0.25), ("ce", 0.1)), top_k=5),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "+".join(k for k, _ in c["terms"]) + f"-tau{c.get('temperature', 1)}-k{c.get('top_k', 0)}")
def test_chunked_equals_unchunked_value_metrics_and_gradients(case):
    hs, w, ht, wt, batch = _problem()
    loss = L.LogitLoss(**case)

    def oracle(hs, w):
        return loss.compute_loss(L.lm_head_logits(hs, w), L.lm_head_logits(ht, wt), batch)

    (v0, m0), g0 = jax.jit(jax.value_and_grad(oracle, (0, 1), has_aux=True))(hs, w)
    for chunk in (4, 13, 20):  # T not a multiple of the chunk, one chunk, a chunk longer than T
        def chunked(hs, w, chunk=chunk):
            return loss.compute_loss_from_hidden(hs, w, ht, wt, batch, chunk=chunk)

        (v1, m1), g1 = jax.jit(jax.value_and_grad(chunked, (0, 1), has_aux=True))(hs, w)
        assert abs(float(v1) - float(v0)) <= 1e-6 * abs(float(v0)), (chunk, float(v1), float(v0))
        for kind, _ in case["terms"]:
            assert abs(float(m1[kind]) - float(m0[kind])) <= 1e-6 * abs(float(m0[kind])), (chunk, kind)
        assert float(m1["target_tokens"]) == float(m0["target_tokens"])
        for name, a, b in zip(("hidden", "head"), g1, g0, strict=True):
            assert _rms_rel(a, b) <= 1e-6, (chunk, name, _rms_rel(a, b))
        assert float(jnp.max(jnp.abs(g1[0][1, 10:]))) == 0.0  # padding gets no gradient


def test_teacher_side_is_constant_and_an_empty_mask_gives_zero():
    hs, w, ht, wt, batch = _problem(1)
    loss = L.LogitLoss(terms=(("forward_kl", 0.9), ("ce", 0.1)))
    g = jax.jit(jax.grad(lambda ht, wt: loss.compute_loss_from_hidden(hs, w, ht, wt, batch, chunk=4)[0], (0, 1)))(ht, wt)
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in g)
    empty = {**batch, "loss_mask": jnp.zeros((B, T), jnp.int32)}
    v, gs = jax.jit(jax.value_and_grad(lambda hs, w: loss.compute_loss_from_hidden(hs, w, ht, wt, empty, chunk=4)[0], (0, 1)))(hs, w)
    assert float(v) == 0.0 and all(float(jnp.max(jnp.abs(x))) == 0.0 for x in gs)
    with pytest.raises(C.ConfigError, match="chunk must be > 0"):
        loss.compute_loss_from_hidden(hs, w, ht, wt, batch, chunk=0)


def test_peak_memory_scales_with_the_chunk_not_the_sequence():
    """Compiled value-and-grad scratch memory: unchunked holds several [B, T, V] float32
    arrays; 32-position chunks stay well below one of them."""
    b, t, d, v = 2, 512, 16, 4096
    hs, ht = jnp.zeros((b, t, d)), jnp.zeros((b, t, d))
    w, wt = jnp.zeros((d, v)), jnp.zeros((d, v))
    ones = jnp.ones((b, t), jnp.int32)
    batch = dict(input_ids=ones, segment_ids=ones, loss_mask=ones)
    loss = L.LogitLoss(terms=(("forward_kl", 0.9), ("ce", 0.1)))
    full_logits = b * t * v * 4

    def temp_bytes(fn):
        return jax.jit(jax.value_and_grad(fn, (0, 1))).lower(hs, w).compile().memory_analysis().temp_size_in_bytes

    unchunked = temp_bytes(lambda hs, w: loss.compute_loss(L.lm_head_logits(hs, w), L.lm_head_logits(ht, wt), batch)[0])
    chunked = temp_bytes(lambda hs, w: loss.compute_loss_from_hidden(hs, w, ht, wt, batch, chunk=32)[0])
    assert unchunked >= 3 * full_logits, unchunked
    assert chunked <= full_logits / 2, chunked


@pytest.fixture(scope="module")
def models():
    teacher = tiny_teacher(layers=2)
    return teacher, tiny_student(teacher, new_layers=(1,))


def test_stage_loss_with_logit_chunk_equals_unchunked(models):
    """Through Stage.compute_loss on real models (final norm, untied lm_head): value and every
    student gradient equal the unchunked stage's; an sft stage needs no teacher."""
    teacher, student = models
    batch = {k: jnp.asarray(v) for k, v in next(Batches(3, 16, seed=5, completion=True)).items()}
    graphdef, state = nnx.split(student, nnx.Param)
    flat = FlatParams(state)

    def stage(chunk, stage_type="logit_kd", loss="forward_kl:0.9,ce:0.1", teacher=teacher):
        c = C.default_config()
        c.stages = {"s": C.stage_config(type=stage_type, steps=1, loss=loss, temperature=1.5, logit_chunk=chunk)}
        c.stage_order = "s"
        return build_stage(C.resolved_stage(c, "s"), student, teacher)

    def value_and_grad(st):
        def f(values):
            return st.compute_loss(nnx.merge(graphdef, flat.unflatten(values)), teacher, batch)

        return jax.jit(jax.value_and_grad(f, has_aux=True))(flat.values)

    (v0, _), g0 = value_and_grad(stage(0))
    (v1, _), g1 = value_and_grad(stage(5))
    assert abs(float(v1) - float(v0)) <= 1e-6 * abs(float(v0))
    for p in g0:
        assert _rms_rel(g1[p], g0[p]) <= 1e-6, (p, _rms_rel(g1[p], g0[p]))
    sft = [stage(c, "sft", "ce", None).compute_loss(student, None, batch)[0] for c in (0, 5)]
    assert abs(float(sft[1]) - float(sft[0])) <= 1e-6 * abs(float(sft[0]))
    with pytest.raises(C.ConfigError, match="logit_chunk=-1"):
        stage(-1)


KERNEL_CASES = [
    dict(terms=(("forward_kl", 1.0),)),
    dict(terms=(("forward_kl", 1.0),), temperature=2.0),
    dict(terms=(("ce", 1.0),)),
    dict(terms=(("ce", 1.0),), temperature=0.5),  # CE ignores tau: the kernels' separate raw-logit pass
    dict(terms=(("forward_kl", 0.9), ("ce", 0.1)), temperature=2.0),
]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "+".join(k for k, _ in c["terms"]) + f"-tau{c.get('temperature', 1)}")
def test_pallas_logit_kernels_equal_the_unchunked_loss(case):
    """The Pallas stats + gradient kernels (interpret mode) against autodiff of the unchunked loss."""
    hs, w, ht, wt, batch = _problem(2)
    loss = L.LogitLoss(**case)

    def oracle(hs, w):
        return loss.compute_loss(L.lm_head_logits(hs, w), L.lm_head_logits(ht, wt), batch)

    (v0, m0), g0 = jax.jit(jax.value_and_grad(oracle, (0, 1), has_aux=True))(hs, w)

    def kernel(hs, w):
        return loss.compute_loss_from_hidden(hs, w, ht, wt, batch, chunk=4, kernel="pallas_interpret")

    (v1, m1), g1 = jax.jit(jax.value_and_grad(kernel, (0, 1), has_aux=True))(hs, w)
    assert abs(float(v1) - float(v0)) <= 1e-5 * abs(float(v0)), (float(v1), float(v0))
    for kind, _ in case["terms"]:
        assert abs(float(m1[kind]) - float(m0[kind])) <= 1e-5 * abs(float(m0[kind])), kind
    for name, a, b in zip(("hidden", "head"), g1, g0, strict=True):
        assert _rms_rel(a, b) <= 1e-5, (name, _rms_rel(a, b))
    assert float(jnp.max(jnp.abs(g1[0][1, 10:]))) == 0.0


def test_logit_kernel_choice():
    assert L.LogitLoss().resolve_kernel("auto", V) == ("pallas_gpu" if jax.default_backend() == "gpu" else "xla")
    assert L.LogitLoss(terms=(("reverse_kl", 1.0),)).resolve_kernel("auto", V) == "xla"
    with pytest.raises(C.ConfigError, match="forward_kl and ce without top_k"):
        L.LogitLoss(top_k=5).resolve_kernel("pallas_gpu", V)
    with pytest.raises(C.ConfigError, match="logit_kernel='triton'"):
        L.LogitLoss().resolve_kernel("triton", V)
