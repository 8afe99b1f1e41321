"""Hybrid students: decode = forward per mixer, packing, teacher initialisation, specs, serialisation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_jax.config import QWEN3_0P6B_KDA_ATTENTION, ConfigError
from hybrid_jax.models.cache import init_cache
from hybrid_jax.models.hybrid import (
    build_student,
    build_student_from_config,
    layer_kinds,
    student_config_dict,
)
from hybrid_jax.models.qwen3 import Qwen3, Qwen3Config, default_positions

CFG = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=128, initializer_range=0.2,
                  tie_word_embeddings=False)
FAST = {"kda": {"chunk_size": 8, "backend": "reference"}, "gdn": {"chunk_size": 8, "backend": "reference"}}


@pytest.fixture(scope="module")
def teacher():
    return Qwen3(CFG, rngs=nnx.Rngs(1))


def randomize_new_params(model, seed=0):
    """Identity convs, a zero output-gate projection and alpha = 0 would hide bugs: perturb every parameter."""
    key = jax.random.PRNGKey(seed)
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and "mixer" in path:
            key, sub = jax.random.split(key)
            var.set_value(var[...] + 0.1 * jax.random.normal(sub, var.shape, var.dtype))


@nnx.jit
def _forward(model, ids, mask, seg):
    return model(ids, mask, segment_ids=seg)


@nnx.jit
def _cached(model, ids, mask, pos, cache):
    out = model.forward(ids, mask, positions=pos, cache=cache)
    return out.logits, out.cache


def check_decode_equals_forward(model, prompt_len=5, chunk=3, T=11):
    """Left-padded batch: prefill, a multi-token continuation, then token-by-token decode."""
    ids = jax.random.randint(jax.random.PRNGKey(0), (2, T), 0, CFG.vocab_size)
    mask = jnp.ones((2, T), jnp.int32).at[0, :3].set(0)
    full = _forward(model, ids, mask, jnp.ones_like(mask))
    pos = default_positions(mask)
    cache = init_cache(model, 2, 16)
    outs, t = [], 0
    for n in [prompt_len, chunk] + [1] * (T - prompt_len - chunk):
        logits, cache = _cached(model, ids[:, t:t + n], mask[:, t:t + n], pos[:, t:t + n], cache)
        outs.append(logits)
        t += n
    got = np.asarray(jnp.concatenate(outs, axis=1))
    real = np.asarray(mask) != 0
    np.testing.assert_allclose(got[real], np.asarray(full)[real], atol=1e-4, rtol=1e-4)
    assert int(cache[0]["index"]) == T


def check_packing(model, T=11):
    """Row 0 packs two documents; row 1 is the second document alone, left-padded: same logits."""
    ids = jax.random.randint(jax.random.PRNGKey(5), (1, T), 0, CFG.vocab_size)
    ids = jnp.concatenate([ids, ids], axis=0)
    seg = jnp.asarray([[1] * 4 + [2] * (T - 4), [1] * T], jnp.int32)
    mask = jnp.asarray([[1] * T, [0] * 4 + [1] * (T - 4)], jnp.int32)
    out = np.asarray(_forward(model, ids, mask, seg))
    np.testing.assert_allclose(out[0, 4:], out[1, 4:], atol=1e-4, rtol=1e-4)


STUDENTS = {
    "hybrid_kda": ("attention:0,2;kda:1", FAST),
    "mixed_gdn": ("gdn:0;attention:1;allmem:2", {**FAST, "allmem": {"window": 3, "chunk_size": 3}}),
    "swa": ("swa:0-2", {"swa": {"window": 3, "sinks": 2}}),
    "allmem": ("allmem:0-2", {"allmem": {"window": 3, "sinks": 1, "chunk_size": 2, "lr_init": 0.1}}),
}


@pytest.mark.parametrize("name", list(STUDENTS))
def test_decode_equals_forward_and_packing(teacher, name):
    spec, mixer_config = STUDENTS[name]
    student = build_student(teacher, spec, mixer_config)
    randomize_new_params(student)
    check_decode_equals_forward(student)
    check_packing(student)


def test_allmem_with_zero_gate_equals_the_swa_model_exactly(teacher):
    window = {"window": 3, "sinks": 1}
    swa = build_student(teacher, "swa:0-2", {"swa": window})
    mem = build_student(teacher, "allmem:0-2", {"allmem": {**window, "chunk_size": 2, "lr_init": 0.1}})
    ids = jax.random.randint(jax.random.PRNGKey(5), (2, 11), 0, CFG.vocab_size)
    mask = jnp.ones((2, 11), jnp.int32).at[1, :2].set(0)
    np.testing.assert_array_equal(np.asarray(_forward(mem, ids, mask, None)), np.asarray(_forward(swa, ids, mask, None)))


def test_allmem_filter_selects_exactly_memory_and_gate(teacher):
    import re

    from hybrid_jax.layers.allmem import ALLMEM_TRAINABLE_REGEX, allmem_trainable_filter

    student = build_student(teacher, "kda:0;allmem:1,2", FAST)
    paths = lambda state: {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(state)}
    every = paths(nnx.state(student, nnx.Param))
    chosen = paths(nnx.state(student, allmem_trainable_filter))
    expected = {p for p in every if p.split("/")[:4] in (["blocks", "1", "mixer", "memory"], ["blocks", "2", "mixer", "memory"])
                or p in ("blocks/1/mixer/alpha", "blocks/2/mixer/alpha")}
    assert chosen == expected
    assert {"blocks/1/mixer/memory/w1", "blocks/2/mixer/alpha", "blocks/1/mixer/memory/lr_bias"} <= chosen
    assert not any("/swa/" in p or p.startswith("blocks/0/") for p in chosen)
    assert {p for p in every if re.search(ALLMEM_TRAINABLE_REGEX, p)} == expected


def test_build_student_copies_exactly_what_it_should(teacher):
    student = build_student(teacher, "attention:0;kda:1;gdn:2", FAST)
    eq = lambda a, b: np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))
    eq(student.embed, teacher.embed)
    eq(student.lm_head, teacher.lm_head)
    eq(student.norm.weight, teacher.norm.weight)
    for sb, tb in zip(student.blocks, teacher.blocks):
        for name in ("gate", "up", "down"):
            eq(getattr(sb.mlp, name), getattr(tb.mlp, name))
        eq(sb.input_norm.weight, tb.input_norm.weight)
        eq(sb.post_attention_norm.weight, tb.post_attention_norm.weight)
    assert layer_kinds(student) == ("attention", "kda", "gdn")
    for i in (0,):
        s_state = nnx.state(student.blocks[i].mixer, nnx.Param)
        t_state = nnx.state(teacher.blocks[i].mixer, nnx.Param)
        jax.tree.map(np.testing.assert_array_equal, s_state, t_state)
    g = CFG.num_attention_heads // CFG.num_key_value_heads
    for i in (1, 2):
        m, a = student.blocks[i].mixer, teacher.blocks[i].mixer
        eq(m.q_proj, a.q_proj)
        eq(m.o_proj, a.o_proj)
        for h in range(CFG.num_attention_heads):  # query head h reads kv head h // g
            np.testing.assert_array_equal(np.asarray(m.k_proj[...][:, h]), np.asarray(a.k_proj[...][:, h // g]))
            np.testing.assert_array_equal(np.asarray(m.v_proj[...][:, h]), np.asarray(a.v_proj[...][:, h // g]))
        w = np.asarray(m.k_conv.weight[...])
        assert (w[-1] == 1).all() and not w[:-1].any()
        assert not np.asarray(m.g_up[...]).any()  # output gate sigmoid(0) = 0.5
        A = np.exp(np.asarray(m.A_log[...]))
        assert ((A >= 1) & (A <= 16)).all()
    # Fresh buffers: the student never aliases the teacher's arrays (donation would delete them).
    assert student.embed[...].unsafe_buffer_pointer() != teacher.embed[...].unsafe_buffer_pointer()


def test_random_init_copies_nothing(teacher):
    student = build_student(teacher, "attention:0,2;kda:1", FAST, init_from_teacher=False, rngs=nnx.Rngs(7))
    assert not np.array_equal(np.asarray(student.embed[...]), np.asarray(teacher.embed[...]))


def test_config_round_trip(teacher):
    student = build_student(teacher, "kda:0,2;attention:1",
                            {**FAST, "layers": {2: {"A_init_range": [2.0, 4.0]}}})
    cfg = json.loads(json.dumps(student_config_dict(student)))
    assert cfg["layer_spec"] == "kda:0,2;attention:1"
    assert cfg["layers"][2]["A_init_range"] == [2.0, 4.0] and cfg["layers"][0]["A_init_range"] == [1.0, 16.0]
    clone = build_student_from_config(cfg, rngs=nnx.Rngs(3))
    assert student_config_dict(clone) == cfg
    nnx.update(clone, nnx.state(student))
    ids = jnp.arange(8)[None] % CFG.vocab_size
    np.testing.assert_array_equal(np.asarray(_forward(clone, ids, None, None)),
                                  np.asarray(_forward(student, ids, None, None)))


def test_gqa_kda_student_takes_the_teachers_kv_heads_and_round_trips(teacher):
    """A KDA layer with the teacher's k/v head count (the released layer's GQA option) copies
    the teacher's k/v unrepeated; its settings survive student_config_dict."""
    mixers = {"kda": {**FAST["kda"], "num_kv_heads": CFG.num_key_value_heads, "conv_activation": "identity",
                      "conv_bias": True, "output_norm": False}}
    student = build_student(teacher, "attention:0;kda:1,2", mixers)
    for i in (1, 2):
        m, a = student.blocks[i].mixer, teacher.blocks[i].mixer
        np.testing.assert_array_equal(np.asarray(m.k_proj[...]), np.asarray(a.k_proj[...]))
        np.testing.assert_array_equal(np.asarray(m.v_proj[...]), np.asarray(a.v_proj[...]))
    cfg = json.loads(json.dumps(student_config_dict(student)))
    assert cfg["layers"][1]["num_kv_heads"] == CFG.num_key_value_heads and cfg["layers"][1]["output_norm"] is False
    clone = build_student_from_config(cfg, rngs=nnx.Rngs(3))
    nnx.update(clone, nnx.state(student))
    ids = jnp.arange(8)[None] % CFG.vocab_size
    np.testing.assert_array_equal(np.asarray(_forward(clone, ids, None, None)),
                                  np.asarray(_forward(student, ids, None, None)))
    with pytest.raises(ConfigError, match="multiple of the teacher"):
        build_student(teacher, "attention:0;kda:1,2", {"kda": {**FAST["kda"], "num_kv_heads": 1}})


def test_presets(teacher):
    import hybrid_jax as hj
    from hybrid_jax.config import parse_layer_spec
    from hybrid_jax.layers.allmem import set_allmem_hparams

    student = hj.build_student(teacher, "all_allmem", init_from_teacher=False)
    assert layer_kinds(student) == ("allmem",) * 3
    # Knobs a trainer changed are what the serialised config records.
    assert set_allmem_hparams(student, window=7, sinks=3, chunk_size=5) == 3
    layers = student_config_dict(student)["layers"]
    assert all((hp["window"], hp["sinks"], hp["chunk_size"]) == (7, 3, 5) for hp in layers)
    # Hybrid-KDA for the 28-layer Qwen3-0.6B keeps attention at {0,2,6,11,13,18,21}; it refuses other depths.
    kinds = parse_layer_spec("qwen3_0p6b_hybrid_kda", 28)
    assert {i for i, k in enumerate(kinds) if k == "attention"} == set(QWEN3_0P6B_KDA_ATTENTION)
    assert kinds.count("kda") == 21
    with pytest.raises(ConfigError, match="28-layer"):
        build_student(teacher, "qwen3_0p6b_hybrid_kda")


@pytest.mark.parametrize("spec, match", [
    ("attention:0;kda:1", r"layer\(s\) \[2\] are not named"),
    ("attention:0,1;kda:1,2", "named twice"),
    ("attention:0,2;mamba:1", "unknown mixer 'mamba'"),
    ("attention:0,2;kda:1,3", "out of range"),
    ("attention 0,2", "lacks ':'"),
])
def test_layer_spec_errors(teacher, spec, match):
    with pytest.raises(ConfigError, match=match):
        build_student(teacher, spec)


def test_mixer_config_errors(teacher):
    with pytest.raises(ConfigError, match="unknown key 'chunk'"):
        build_student(teacher, "attention:0,2;kda:1", {"kda": {"chunk": 8}})
    with pytest.raises(ConfigError, match="unknown mixer 'mamba'"):
        build_student(teacher, "attention:0,2;kda:1", {"mamba": {}})
    with pytest.raises(ConfigError, match="out of range"):
        build_student(teacher, "attention:0,2;kda:1", {"layers": {9: {}}})
    with pytest.raises(ConfigError, match="not a kda setting"):
        build_student(teacher, "attention:0,2;kda:1", {"layers": {1: {"window": 4}}})
    with pytest.raises(ConfigError, match="'teacher' or 'random'"):
        build_student(teacher, "attention:0,2;kda:1", {"kda": {"init": "copy"}})
