"""Mesh and logical-axis rules; a sharded train step on 8 fake CPU devices equals the 1-device step.

The 8-device part runs in a subprocess (`python -m tests.test_sharding OUT`) because the
device count is fixed when JAX starts.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from hybrid_jax.config import ConfigError
from hybrid_jax.sharding import logical_to_spec, mesh_shape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Mesh:  # logical_to_spec only reads axis sizes
    shape = {"data": 2, "fsdp": 2, "tensor": 4}


def test_logical_rules_respect_divisibility_and_use_each_mesh_axis_once():
    m = _Mesh()
    assert logical_to_spec(("vocab", "embed"), (64, 32), m) == P("tensor", "fsdp")
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (32, 2, 8), m) == P("fsdp", None, None)  # 2 heads on 4-way tensor
    assert logical_to_spec(("heads", "mlp"), (8, 16), m) == P("tensor", None)  # tensor already used
    assert logical_to_spec(("norm",), (32,), m) == P(None)
    assert logical_to_spec(None, (3,), m) == P()


def test_mesh_shape_fills_and_rejects():
    assert mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
    assert mesh_shape({"data": 1, "fsdp": 1, "tensor": 1}, 1) == (1, 1, 1)
    with pytest.raises(ConfigError, match="not a multiple of 3"):
        mesh_shape({"data": 3, "fsdp": -1, "tensor": 1}, 8)
    with pytest.raises(ConfigError, match="data×fsdp×tensor = 4 but 8 devices"):
        mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)


@pytest.mark.slow
def test_sharded_step_on_8_devices_equals_one_device(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    r = subprocess.run([sys.executable, "-m", "tests.test_sharding", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "result.json").read_text())
    print(res)  # shown with pytest -rP
    assert res["devices"] == 8
    assert res["embed_spec"] == ["tensor", "fsdp"]  # really sharded, not replicated
    for a, b in zip(res["loss_1"], res["loss_8"], strict=True):
        assert abs(a - b) <= 1e-5 * abs(a)
    assert res["max_rel_param_err_8"] <= 1e-5
    # Two microbatches per step on the same mesh (train.grad_accum): the same run to 1e-4
    # (tests/distill/test_grad_accum.py says why not 1e-5).
    for a, b in zip(res["loss_1"], res["loss_8_accum2"], strict=True):
        assert abs(a - b) <= 1e-4 * abs(a)
    assert res["max_rel_param_err_8_accum2"] <= 1e-4
    assert res["params_changed"]
    # A checkpoint written on 8 devices resumes on 1 (orbax reshards to the new mesh).
    resumed, err = res["resume_8_to_1"]
    assert resumed and err <= 1e-5
    split, whole = res["per_shard"]["split"], res["per_shard"]["whole"]
    assert split["max_err"] < 1e-5 and whole["max_err"] < 1e-5
    assert split["shard_map"] and split["q_spec_split"] and not split["q_spec_whole"]
    assert whole["shard_map"] and whole["q_spec_whole"] and not whole["q_spec_split"]
    # Data parallelism for real: on the trainer's default mesh (every device on fsdp) the
    # compiled KD gradient gathers parameters, never the batch's activations, whole or in
    # microbatches (without `sharding.constrain` it gathered 28 activations in each variant,
    # and on two H200s the distillation step ran no faster than on one).
    for gathers in res["kd_step_all_gathers"].values():  # the batch whole and in 2 microbatches
        assert gathers["params"] > 0, gathers
        assert gathers["activations"] == [], gathers
    # The logit-loss kernels (Pallas interpreter) run per shard of batch rows and equal the
    # one-device XLA loss.
    lk = res["logit_kernel"]
    assert lk["shard_map"] and lk["value_rel_err"] <= 1e-5 and lk["grad_rel_err"] <= 1e-5, lk


def _main(out):
    import jax
    from flax import nnx

    from hybrid_jax import config as C
    from hybrid_jax.distill.metrics import read_metrics
    from hybrid_jax.distill.trainer import FlatParams, Trainer
    from hybrid_jax.sharding import make_mesh
    from tests.distill.helpers import Batches, run_config, tiny_student, tiny_teacher

    jax.config.update("jax_default_matmul_precision", "highest")
    teacher = tiny_teacher(layers=2)
    init = tiny_student(teacher, new_layers=(1,))
    results, params = {}, {}
    one = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    cube = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    for n, accum, mesh in ((1, 1, one), (8, 1, cube), ("8_accum2", 2, cube)):
        c = run_config(batch_size=8)
        c.train.grad_accum = accum
        c.stages = {"kd": C.stage_config(type="logit_kd", steps=2, lr=1e-2, warmup_frac=0.0, loss="forward_kl:0.9,ce:0.1")}
        c.stage_order = "kd"
        student = nnx.clone(init)
        Trainer(c, student, teacher=teacher, mesh=mesh, workdir=f"{out}/run{n}", data_fn=lambda s: Batches(s.batch_size, s.seq_len)).run()
        results[f"loss_{n}"] = [r["loss"] for r in read_metrics(f"{out}/run{n}")]
        params[n] = {p: np.asarray(v) for p, v in FlatParams(nnx.state(student, nnx.Param)).values.items()}
        if n == 8:
            results["embed_spec"] = list(student.embed[...].sharding.spec)
    p0 = {p: np.asarray(v) for p, v in FlatParams(nnx.state(init, nnx.Param)).values.items()}
    for n in (8, "8_accum2"):
        results[f"max_rel_param_err_{n}"] = _max_rel_err(params[n], params[1])
    results["params_changed"] = all(not np.array_equal(params[1][p], p0[p]) for p in p0)
    results["devices"] = len(jax.devices())
    results["resume_8_to_1"] = _resume_on_one_device(out, teacher, init, one, cube)
    results["per_shard"] = _per_shard_checks(cube)
    results["kd_step_all_gathers"] = _kd_step_all_gathers(make_mesh(), teacher, batch=16)
    results["logit_kernel"] = _logit_kernel_check(cube)
    with open(f"{out}/result.json", "w") as f:
        json.dump(results, f)


def _max_rel_err(params, reference):
    """The largest relative RMS difference over parameter arrays {path: array}."""
    return max(float(np.sqrt(np.mean((params[p] - v) ** 2)) / np.sqrt(np.mean(v**2))) for p, v in reference.items())


def _resume_on_one_device(out, teacher, init, one, eight):
    """A KD stage checkpointed at step 2 on the 8-device mesh, crashed at step 4, then resumed
    from the same workdir on one device: (whether it said it resumed at step 2, the largest
    relative RMS difference of its final parameters from an uninterrupted one-device run)."""
    from flax import nnx

    from hybrid_jax import config as C
    from hybrid_jax.distill.trainer import FlatParams, Trainer
    from tests.distill.helpers import Batches, run_config

    class Crash(Batches):
        def __next__(self):
            if self.index == 3:
                raise RuntimeError("simulated crash before step 4")
            return super().__next__()

    c = run_config(batch_size=8)
    c.stages = {"kd": C.stage_config(type="logit_kd", steps=4, lr=1e-2, warmup_frac=0.0)}
    c.stage_order = "kd"
    final, printed = {}, []
    for name, mesh, data in (("whole", one, Batches), ("crashed", eight, Crash), ("crashed", one, Batches)):
        student = nnx.clone(init)
        try:
            Trainer(c, student, teacher=teacher, mesh=mesh, workdir=f"{out}/resume_{name}", print_fn=printed.append,
                    data_fn=lambda s, data=data: data(s.batch_size, s.seq_len)).run()
        except RuntimeError as e:
            assert "simulated crash" in str(e), e
            continue
        final[name] = {p: np.asarray(v) for p, v in FlatParams(nnx.state(student, nnx.Param)).values.items()}
    resumed = any("resuming from" in str(line) and "step 2" in str(line) for line in printed)
    return resumed, _max_rel_err(final["crashed"], final["whole"])


def _per_shard_checks(mesh):
    """per_shard around the GPU SWA kernel (Pallas interpreter) under an 8-device mesh: its output
    against the unsharded oracle, and the specs its shard_map got (batch 4 splits over
    data×fsdp, 4 query / 2 kv heads over tensor; batch 3 and 3 kv heads stay whole)."""
    import functools

    import jax
    import jax.numpy as jnp

    from hybrid_jax.sharding import per_shard
    from pallas_kernels.swa import swa_attention_reference
    from pallas_kernels.swa.gpu import swa_attention_gpu

    def attend(q, k, v, seg):
        fn = functools.partial(swa_attention_gpu, window=5, sinks=1, scale=0.35, interpret=True)
        return per_shard(fn, dict(q=q, k=k, v=v, segment_ids=seg),
                         dict(q="bthd", k="bthd", v="bthd", segment_ids="bt"), "bthd")

    out = {}
    for name, (b, hq, hkv) in {"split": (4, 4, 2), "whole": (3, 6, 3)}.items():
        ks = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(ks[0], (b, 16, hq, 8))
        k, v = (jax.random.normal(key, (b, 16, hkv, 8)) for key in ks[1:])
        seg = jnp.ones((b, 16), jnp.int32).at[:, 9:].set(2)
        with jax.set_mesh(mesh):
            got = jax.jit(attend)(q, k, v, seg)
            jaxpr = str(jax.make_jaxpr(attend)(q, k, v, seg))
        want = swa_attention_reference(q, k, v, window=5, sinks=1, segment_ids=seg, scale=0.35)
        out[name] = {"max_err": float(jnp.abs(got - want).max()),
                     "shard_map": "shard_map" in jaxpr,
                     "q_spec_split": "P(('data', 'fsdp'), None, 'tensor', None)" in jaxpr,
                     "q_spec_whole": "P(None, None, None, None)" in jaxpr}
    return out


def _logit_kernel_check(mesh, b=4, t=12, d=8, v=40):
    """KL + CE through the Pallas logit-loss kernels (interpreted) under `mesh` (rows split over
    data x fsdp by per_shard) against the XLA path on one device: relative errors of the value
    and of the gradients, and whether a shard_map ran."""
    import jax
    import jax.numpy as jnp

    from hybrid_jax.distill.losses import LogitLoss

    rng = np.random.default_rng(0)
    hs, ht = (jnp.float32(rng.normal(size=(b, t, d))) for _ in range(2))
    w, wt = (jnp.float32(rng.normal(size=(d, v))) for _ in range(2))
    batch = dict(input_ids=jnp.int32(rng.integers(0, v, (b, t))), segment_ids=jnp.ones((b, t), jnp.int32))
    loss = LogitLoss(terms=(("forward_kl", 0.9), ("ce", 0.1)), temperature=2.0)

    def value_and_grad(kernel):
        def f(hs, w):
            return loss.compute_loss_from_hidden(hs, w, ht, wt, batch, chunk=8, kernel=kernel)[0]
        return jax.value_and_grad(f, (0, 1)), f

    want, (want_dh, want_dw) = jax.jit(value_and_grad("xla")[0])(hs, w)
    fn, f = value_and_grad("pallas_interpret")
    with jax.set_mesh(mesh):
        got, (dh, dw) = jax.jit(fn)(hs, w)
        jaxpr = str(jax.make_jaxpr(f)(hs, w))
    rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    return {"value_rel_err": abs(float(got) - float(want)) / abs(float(want)),
            "grad_rel_err": max(rel(dh, want_dh), rel(dw, want_dw)), "shard_map": "shard_map" in jaxpr}


def _kd_step_all_gathers(mesh, teacher, batch, seq=16):
    """The all-gathers of the compiled gradient of a logit-KD stage's loss (teacher forward,
    KDA + attention student forward and backward, chunked loss), whole and in 2 accumulated
    microbatches, with parameters and batch sharded over `mesh`: per variant, how many gather
    parameters, and the shapes of those that gather floating-point activations (a leading
    [rows, seq] of the batch or a microbatch)."""
    import re

    import jax
    from flax import nnx

    import hybrid_jax as hj
    from hybrid_jax.config import resolved_stage
    from hybrid_jax.distill.stages import build_stage
    from hybrid_jax.distill.trainer import accumulated_value_and_grad
    from hybrid_jax.sharding import shard_batch, shard_model
    from tests.distill.helpers import run_config

    student = hj.build_student(teacher, "attention:0;kda:1", param_dtype="float32")
    shard_model(student, mesh)
    shard_model(teacher, mesh)
    c = run_config(batch_size=batch, seq_len=seq)
    c.stages.kd.logit_chunk = 8
    stage = build_stage(resolved_stage(c, "kd"), student, teacher)
    ids = np.random.default_rng(0).integers(0, teacher.config.vocab_size, (batch, seq)).astype(np.int32)
    pos = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq))
    tokens = shard_batch(dict(input_ids=ids, segment_ids=np.ones_like(ids), positions=pos, loss_mask=np.ones_like(ids)), mesh)
    (s_def, s_params, s_rest), t_model = nnx.split(student, nnx.Param, ...), nnx.split(teacher)

    def loss(params, t_model, tokens):
        return stage.compute_loss(nnx.merge(s_def, params, s_rest), nnx.merge(*t_model), tokens)

    grad = jax.value_and_grad(loss, has_aux=True)
    out = {}
    for accum, fn in ((1, grad), (2, accumulated_value_and_grad(grad, stage.loss_weight, 2))):
        with jax.set_mesh(mesh):
            hlo = jax.jit(fn).lower(s_params, t_model, tokens).compile().as_text()
        shapes = re.findall(r"= ([a-z0-9]+)\[([0-9,]*)\][^ ]* all-gather\(", hlo)
        floats = [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in shapes if t.startswith(("f", "bf"))]
        rows = {(batch, seq), (batch // accum, seq)}
        out[f"accum{accum}"] = {"params": sum(1 for _, d in floats if d[:2] not in rows),
                                "activations": [list(d) for _, d in floats if d[:2] in rows]}
    return out


if __name__ == "__main__":
    _main(sys.argv[1])
