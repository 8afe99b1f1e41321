"""Gradient accumulation (`train.grad_accum`): the same update as the whole batch at once.

Rows carry different numbers of loss positions (padding, completion-only masks), so a plain
mean of microbatch means would differ from the batch mean; the trainer weights each
microbatch by its positions (`Stage.loss_weight`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_jax.config import ConfigError, resolved_stage, validate_config
from hybrid_jax.distill.losses import prediction_mask
from hybrid_jax.distill.metrics import read_metrics
from hybrid_jax.distill.stages import build_stage
from hybrid_jax.distill.trainer import FlatParams, Trainer, accumulated_value_and_grad
from tests.distill.helpers import Batches, run_config, tiny_student, tiny_teacher


def _train(tmp_path, accum, *, batch_size=4, completion=True):
    teacher = tiny_teacher(layers=2)
    student = tiny_student(teacher, new_layers=(1,))
    c = run_config(steps=(2, 2), batch_size=batch_size)
    c.train.grad_accum = accum
    workdir = tmp_path / f"accum{accum}"
    Trainer(c, student, teacher=teacher, workdir=str(workdir),
            data_fn=lambda s: Batches(s.batch_size, s.seq_len, completion=completion)).run()
    params = {p: np.asarray(v) for p, v in FlatParams(nnx.state(student, nnx.Param)).values.items()}
    return read_metrics(str(workdir)), params


@pytest.mark.parametrize("stage_name", ["align", "kd"])
def test_accumulated_gradient_equals_whole_batch(stage_name):
    """Loss, metrics and every parameter's gradient of one stage's loss, the batch at once
    against 2 and 4 token-weighted microbatches (fp32)."""
    teacher = tiny_teacher(layers=2)
    student = tiny_student(teacher, new_layers=(1,))
    stage = build_stage(resolved_stage(run_config(), stage_name), student, teacher)
    graphdef, params, rest = nnx.split(student, nnx.Param, ...)

    def loss(p, batch):
        return stage.compute_loss(nnx.merge(graphdef, p, rest), teacher, batch)

    batch = {k: jnp.asarray(v) for k, v in next(Batches(8, 16, completion=True)).items()}
    with jax.default_matmul_precision("highest"):
        (want_loss, want_m), want_g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, batch)
        for accum in (2, 4):
            f = jax.jit(accumulated_value_and_grad(jax.value_and_grad(loss, has_aux=True), stage.loss_weight, accum))
            (got_loss, got_m), got_g = f(params, batch)
            assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-6)
            assert got_m.keys() == want_m.keys()
            for k in want_m:
                assert float(got_m[k]) == pytest.approx(float(want_m[k]), rel=1e-6), k
            for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_g), jax.tree.leaves(want_g), strict=True):
                assert g.dtype == w.dtype
                err = float(jnp.linalg.norm(g - w) / jnp.maximum(jnp.linalg.norm(w), 1e-30))
                assert err <= 1e-5, (accum, jax.tree_util.keystr(path), err)


def test_accumulated_training_follows_the_whole_batch(tmp_path):
    """Through the Trainer, both stages (two steps each): the logged losses, gradient norms and
    parameters agree to 1e-4 (Adam's normalisation amplifies fp32 rounding in near-zero
    gradient entries, and later steps start from those parameters; the gradients of one step
    agree to 1e-5 above). Unweighted microbatch means would be off by ~0.5% in the KD loss."""
    with jax.default_matmul_precision("highest"):
        whole_m, whole_p = _train(tmp_path, 1)
        for accum in (2, 4):
            m, p = _train(tmp_path, accum)
            assert [r["stage"] for r in m] == [r["stage"] for r in whole_m] == ["align"] * 2 + ["kd"] * 2
            for a, b in zip(m, whole_m, strict=True):
                for key in ("loss", "grad_norm") + (("forward_kl", "ce") if a["stage"] == "kd" else ()):
                    assert a[key] == pytest.approx(b[key], rel=1e-4), (accum, a["stage"], key)
                if a["stage"] == "kd":
                    assert a["target_tokens"] == b["target_tokens"]
            for name, v in whole_p.items():
                err = np.sqrt(np.mean((p[name] - v) ** 2)) / max(np.sqrt(np.mean(v**2)), 1e-12)
                assert err <= 1e-4, (accum, name, err)


def test_microbatches_hold_different_numbers_of_targets():
    """What makes the tests above sensitive to the weighting: the microbatches' target counts
    differ, so a plain mean of their losses would not be the batch's."""
    batch = next(Batches(8, 16, completion=True))
    for accum in (2, 4):
        counts = {float(np.sum(prediction_mask({k: v[i::accum] for k, v in batch.items()}))) for i in range(accum)}
        assert len(counts) > 1


def test_grad_accum_must_split_the_batch(tmp_path):
    teacher = tiny_teacher(layers=2)
    c = run_config(batch_size=6)
    c.train.grad_accum = 4
    with pytest.raises(ConfigError, match="grad_accum=4 microbatches"):
        Trainer(c, tiny_student(teacher), teacher=teacher, workdir=str(tmp_path), data_fn=lambda s: Batches(s.batch_size, s.seq_len))
    c.train.grad_accum = 0
    with pytest.raises(ConfigError, match="grad_accum must be > 0"):
        validate_config(c)
    with pytest.raises(ConfigError, match="grad_accum must be > 0"):
        Trainer(c, tiny_student(teacher), teacher=teacher, workdir=str(tmp_path), data_fn=lambda s: Batches(s.batch_size, s.seq_len))
