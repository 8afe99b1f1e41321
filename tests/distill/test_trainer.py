"""Trainer behaviour on a tiny Qwen3 teacher and a student with a toy recurrent mixer."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_jax import config as C
from hybrid_jax.distill.checkpoint import Checkpointer
from hybrid_jax.distill.metrics import read_metrics
from hybrid_jax.distill.trainer import FlatParams, NonFiniteError, Trainer
from tests.distill.helpers import Batches, run_config, tiny_student, tiny_teacher


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher(layers=2)


def _params(model) -> dict:
    return {p: np.asarray(v) for p, v in FlatParams(nnx.state(model, nnx.Param)).values.items()}


def _data(s):
    return Batches(s.batch_size, s.seq_len, seed=3)


def _one_stage(stage, **train):
    c = run_config()
    c.stages = {"only": stage}
    c.stage_order = "only"
    for k, v in train.items():
        c.train[k] = v
    return c


def test_stage1_changes_only_the_new_mixers(teacher, tmp_path):
    from hybrid_jax.models.hybrid import build_student

    student = build_student(teacher, "attention:0;kda:1", mixer_config={"kda": {"chunk_size": 32}})
    before = _params(student)
    cfg = _one_stage(C.stage_config(type="attention_alignment", steps=3, lr=3e-2, warmup_frac=0.0))
    data_fn = lambda s: Batches(s.batch_size, s.seq_len, fixed=True)
    summary = Trainer(cfg, student, teacher=teacher, workdir=tmp_path, data_fn=data_fn).run()
    after = _params(student)
    changed = sorted(p for p in before if not np.array_equal(before[p], after[p]))
    assert changed == sorted(p for p in before if p.startswith("blocks/1/mixer/"))  # every KDA parameter, nothing else
    s = summary["stages"]["only"]
    assert s["last_loss"] < s["first_loss"]


def test_frozen_parameters_are_bitwise_unchanged(teacher, tmp_path):
    student = tiny_student(teacher, new_layers=(1,))
    before = _params(student)
    # instruct_kd freezes attention by default; also freeze the embeddings by regex
    cfg = _one_stage(C.stage_config(type="instruct_kd", steps=2, lr=1e-2, freeze="attention,re:^embed$"))
    Trainer(cfg, student, teacher=teacher, workdir=tmp_path, data_fn=lambda s: Batches(s.batch_size, s.seq_len, completion=True)).run()
    after = _params(student)
    frozen = [p for p in before if p.startswith("blocks/0/mixer/") or p == "embed"]
    assert len(frozen) == 7  # q, k, v, o, q_norm, k_norm of the attention layer, and embed
    for p in frozen:
        assert np.array_equal(before[p], after[p]), p
    assert not np.array_equal(before["blocks/0/mlp/gate"], after["blocks/0/mlp/gate"])
    assert not np.array_equal(before["blocks/1/mixer/v_proj"], after["blocks/1/mixer/v_proj"])


POISON = 60  # a token id the batches never use; the poisoned teacher maps it to NaN


class PoisonedBatches(Batches):
    """Batch indices in `bad` carry the poison token inside a target span."""

    bad = (0, 2, 3, 4)

    def __next__(self):
        i = self.index
        b = super().__next__()
        if i in self.bad:
            b["input_ids"][:, 3] = POISON
            b["loss_mask"][:, 2:5] = 1
        return b


def test_nonfinite_steps_are_skipped_and_a_streak_stops_the_run(teacher, tmp_path):
    poisoned = nnx.clone(teacher)
    poisoned.embed[...] = poisoned.embed[...].at[POISON].set(jnp.nan)
    student = tiny_student(teacher, new_layers=(1,))
    before = _params(student)
    cfg = _one_stage(C.stage_config(type="logit_kd", steps=10, lr=1e-2), checkpoint_every=1, keep_checkpoints=10, max_nonfinite=3)
    trainer = Trainer(cfg, student, teacher=poisoned, workdir=tmp_path, data_fn=lambda s: PoisonedBatches(s.batch_size, s.seq_len))
    with pytest.raises(NonFiniteError, match=r"3 non-finite steps in a row.*last good checkpoint is .*checkpoints/4"):
        trainer.run()
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    assert ckpt.all_steps() == [1, 2, 3, 4]  # step 5 ended the streak before any save
    like = {p: jnp.asarray(v) for p, v in before.items()}
    p1, p2, p4 = (ckpt.restore(s, like)[0] for s in (1, 2, 4))
    ckpt.close()
    for p in before:
        assert np.array_equal(np.asarray(p1[p]), before[p]), p  # step 1 (poisoned) applied no update
        assert np.array_equal(np.asarray(p4[p]), np.asarray(p2[p])), p  # nor did steps 3 and 4
        assert np.all(np.isfinite(np.asarray(p4[p])))
    assert any(not np.array_equal(np.asarray(p2[p]), before[p]) for p in before)  # step 2 trained
    recs = read_metrics(tmp_path)
    assert [r["nonfinite_total"] for r in recs][-1] == 4


def test_checkpoint_roundtrip_and_unfinished_saves_are_ignored(tmp_path):
    params = {"blocks/0/w": jnp.arange(6.0).reshape(2, 3), "embed": jnp.ones((4,), jnp.bfloat16)}
    opt = (jnp.zeros(()), {"mu": {"blocks/0/w": jnp.full((2, 3), 2.0)}})
    ck = Checkpointer(str(tmp_path), keep=2, async_save=True)
    for step in (1, 2, 3):
        ck.save(step, {k: v + step for k, v in params.items()}, opt, {"step": step, "data_state": {"index": step}})
    ck.wait()
    assert ck.all_steps() == [2, 3]  # keep the last 2
    ck.close()
    # a save killed mid-write leaves only orbax's temporary directory: never listed, never restored
    shutil.copytree(tmp_path / "3", tmp_path / "4.orbax-checkpoint-tmp-1234")
    shutil.rmtree(tmp_path / "4.orbax-checkpoint-tmp-1234" / "params")
    ck = Checkpointer(str(tmp_path))
    assert ck.latest_step() == 3
    got, got_opt, meta = ck.restore(3, params, opt)
    ck.close()
    assert meta == {"step": 3, "data_state": {"index": 3}}
    for k, v in params.items():
        assert got[k].dtype == v.dtype and np.array_equal(np.asarray(got[k]), np.asarray(v + 3))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), got_opt, opt))


def test_bad_inputs_fail_before_any_compute(teacher, tmp_path):
    student = tiny_student(teacher)
    cfg = _one_stage(C.stage_config(type="logit_kd", steps=2, seq_len=128))
    with pytest.raises(C.ConfigError, match="seq_len .* exceeds the model's limit of 64"):
        Trainer(cfg, student, teacher=teacher, workdir=tmp_path, data_fn=_data)
    cfg = _one_stage(C.stage_config(type="logit_kd", steps=2))
    trainer = Trainer(cfg, student, teacher=teacher, workdir=tmp_path, data_fn=lambda s: Batches(s.batch_size, s.seq_len, limit=0))
    with pytest.raises(C.ConfigError, match="'only': dataset .* is empty"):
        trainer.run()
    assert not os.path.exists(tmp_path / "checkpoints" / "1")
    cfg = _one_stage(C.stage_config(type="logit_kd", steps=2))
    with pytest.raises(C.ConfigError, match="needs a teacher model"):
        Trainer(cfg, student, teacher=None, workdir=tmp_path, data_fn=_data)
    for kernel, match in (("triton", "logit_kernel='triton'; use one of"), ("pallas_gpu", "without top_k only")):
        cfg = _one_stage(C.stage_config(type="logit_kd", steps=2, loss="reverse_kl", logit_kernel=kernel))
        with pytest.raises(C.ConfigError, match=match):
            Trainer(cfg, student, teacher=teacher, workdir=tmp_path, data_fn=_data)
    cfg = _one_stage(C.stage_config(type="attention_alignment", steps=2))
    with pytest.raises(C.ConfigError, match="no layer to align"):
        Trainer(cfg, nnx.clone(teacher), teacher=teacher, workdir=tmp_path, data_fn=_data)


def test_step_hook_sets_static_attributes_before_each_step(teacher, tmp_path):
    student = tiny_student(teacher, new_layers=(1,))
    calls = []

    def hook(model, step):  # odd steps silence the new mixer (a different static configuration)
        calls.append(step)
        model.blocks[1].mixer.gain = 0.0 if step % 2 else 1.0

    cfg = _one_stage(C.stage_config(type="attention_alignment", steps=3, lr=1e-2))
    Trainer(cfg, student, teacher=teacher, workdir=tmp_path, data_fn=lambda s: Batches(s.batch_size, s.seq_len, fixed=True), step_hook=hook).run()
    assert calls == [1, 2, 3]
    b = Batches(cfg.train.batch_size, cfg.train.seq_len, fixed=True).__next__()
    out = teacher.forward(jnp.asarray(b["input_ids"]), positions=jnp.asarray(b["positions"]), segment_ids=jnp.asarray(b["segment_ids"]), output_mixer_io=True)
    y = np.asarray(out.mixer_outputs[1], np.float64)
    real = b["segment_ids"] > 0
    silent = float((y**2).mean(-1)[real].mean())  # MSE against a mixer that outputs 0
    losses = [r["loss"] for r in read_metrics(tmp_path)]
    assert abs(losses[0] - silent) <= 1e-5 * silent and abs(losses[2] - silent) <= 1e-5 * silent
    assert abs(losses[1] - silent) > 1e-3 * silent


def test_hidden_alignment_trains_only_aligned_blocks_then_sft_trains_all(teacher, tmp_path):
    student = tiny_student(teacher, new_layers=(1,))
    before = _params(student)
    cfg = run_config()
    cfg.stages = {
        "hidden": C.stage_config(type="hidden_alignment", steps=1, lr=1e-2),
        "sft": C.stage_config(type="sft", steps=1, lr=1e-2),
    }
    cfg.stage_order = "hidden,sft"
    cfg.train.checkpoint_every = 1
    summary = Trainer(cfg, student, teacher=teacher, workdir=tmp_path, data_fn=_data).run()
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    after_hidden = ckpt.restore(1, {p: jnp.asarray(v) for p, v in before.items()})[0]
    ckpt.close()
    changed = sorted(p for p in before if not np.array_equal(before[p], np.asarray(after_hidden[p])))
    assert changed == sorted(p for p in before if p.startswith("blocks/1/"))  # the new layer's whole block
    after = _params(student)
    assert all(not np.array_equal(np.asarray(after_hidden[p]), after[p]) for p in before)
    assert summary["global_step"] == 2
