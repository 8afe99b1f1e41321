"""Freeze groups over parameter paths, the trainable table, weight-decay masks and lr schedules."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hybrid_jax.config import ConfigError, stage_config
from hybrid_jax.distill import freeze
from hybrid_jax.distill.optim import current_lr, lr_schedule, make_optimizer, no_weight_decay

PATHS = [
    "embed", "lm_head", "norm/weight",
    "blocks/0/input_norm/weight", "blocks/0/mixer/q_proj", "blocks/0/mixer/q_norm/weight", "blocks/0/mlp/gate",
    "blocks/1/input_norm/weight", "blocks/1/mixer/A_log", "blocks/1/mixer/dt_bias", "blocks/1/mixer/q_proj", "blocks/1/mlp/gate",
    "blocks/2/mixer/mem/w1", "blocks/2/mlp/gate",
]
KINDS = ("attention", "kda", "allmem")


def test_groups_select_by_component_and_layer_kind():
    sel = lambda *g, **kw: sorted(freeze.select(PATHS, g, layer_kinds=KINDS, **kw))
    assert sel("embeddings", "lm_head") == ["embed", "lm_head"]
    assert sel("norms") == ["blocks/0/input_norm/weight", "blocks/0/mixer/q_norm/weight", "blocks/1/input_norm/weight", "norm/weight"]
    assert sel("attention") == ["blocks/0/mixer/q_norm/weight", "blocks/0/mixer/q_proj"]
    assert sel("mixer:kda") == ["blocks/1/mixer/A_log", "blocks/1/mixer/dt_bias", "blocks/1/mixer/q_proj"]
    assert sel("mixer:allmem") == ["blocks/2/mixer/mem/w1"]
    assert sel("mixer:new", new_layers=(1, 2)) == sel("mixer:kda", "mixer:allmem")
    assert sel("aligned_blocks", aligned=(2,)) == ["blocks/2/mixer/mem/w1", "blocks/2/mlp/gate"]
    assert sel("re:mlp/gate$") == ["blocks/0/mlp/gate", "blocks/1/mlp/gate", "blocks/2/mlp/gate"]
    with pytest.raises(ConfigError, match="unknown group 'mixers:kda'; known groups: .*mixer:kda"):
        sel("mixers:kda")
    with pytest.raises(ConfigError, match="bad regex"):
        sel("re:(")


def test_trainable_is_trainable_minus_frozen_and_never_empty():
    got = freeze.trainable_paths(PATHS, (), ("attention", "embeddings", "lm_head", "norms", "mlp"), layer_kinds=KINDS)
    assert got == ["blocks/1/mixer/A_log", "blocks/1/mixer/dt_bias", "blocks/1/mixer/q_proj", "blocks/2/mixer/mem/w1"]
    with pytest.raises(ConfigError, match="stage 'x'.*leaves no parameter to train"):
        freeze.trainable_paths(PATHS, ("mlp",), ("mlp",), layer_kinds=KINDS, stage="x")


def test_trainable_table_counts():
    sizes = {p: 10 for p in PATHS}
    table = freeze.trainable_table(sizes, freeze.select(PATHS, ["mixer:kda"], layer_kinds=KINDS), layer_kinds=KINDS)
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[1:]}
    assert rows["mixer:kda"] == ["30", "30", "100.0%"]  # A_log, dt_bias, q_proj (no norm in the kda mixer here)
    assert rows["total"] == ["140", "30", "21.4%"]


def test_no_weight_decay_on_gates_norms_and_biases():
    assert [p for p in PATHS if no_weight_decay(p)] == [
        "norm/weight", "blocks/0/input_norm/weight", "blocks/0/mixer/q_norm/weight", "blocks/1/input_norm/weight",
        "blocks/1/mixer/A_log", "blocks/1/mixer/dt_bias",
    ]
    assert no_weight_decay("blocks/0/mixer/q_bias") and no_weight_decay("blocks/0/mixer/bias")
    assert not no_weight_decay("blocks/0/mixer/b_proj")


def test_schedules_closed_form():
    wsd = lr_schedule(lr=1.0, steps=10, schedule="wsd", warmup_frac=0.2, decay_frac=0.3, min_lr_ratio=0.1)
    got = [float(wsd(i)) for i in range(10)]
    want = [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1 - 0.9 / 4, 1 - 0.9 * 2 / 4, 1 - 0.9 * 3 / 4]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    cos = lr_schedule(lr=2.0, steps=11, schedule="cosine", warmup_frac=0.0, min_lr_ratio=0.0)
    np.testing.assert_allclose([float(cos(i)) for i in (0, 5, 10)], [2.0, 1.0, 0.0], atol=1e-6)
    const = lr_schedule(lr=3.0, steps=4, schedule="constant", warmup_frac=0.5)
    np.testing.assert_allclose([float(const(i)) for i in range(4)], [1.5, 3.0, 3.0, 3.0], rtol=1e-6)
    with pytest.raises(ConfigError, match="unknown schedule 'linear'"):
        lr_schedule(lr=1.0, steps=4, schedule="linear")


def test_optimizer_matches_optax_adamw_with_mask_and_clipping():
    st = stage_config(lr=0.1, schedule="constant", warmup_frac=0.0, weight_decay=0.5, clip_norm=1.0)
    params = {"blocks/0/mlp/gate": jnp.array([1.0, -2.0]), "blocks/0/mixer/A_log": jnp.array([0.5])}
    grads = {"blocks/0/mlp/gate": jnp.array([3.0, 4.0]), "blocks/0/mixer/A_log": jnp.array([0.0])}
    tx, sched = make_optimizer(st, 10, params)
    state = tx.init(params)
    assert float(current_lr(state, sched)) == pytest.approx(0.1)
    upd, _ = tx.update(grads, state, params)
    ref = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.5,
                                                                  mask={"blocks/0/mlp/gate": True, "blocks/0/mixer/A_log": False}))
    ref_upd, _ = ref.update(grads, ref.init(params), params)
    for k in params:
        np.testing.assert_allclose(upd[k], ref_upd[k], rtol=1e-6)
    assert float(upd["blocks/0/mixer/A_log"][0]) == 0.0  # zero gradient and no decay: no change
