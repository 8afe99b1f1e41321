"""Config schema, validation and layer-spec parsing: every bad input gives one clear error."""

import ml_collections
import pytest

from hybrid_jax import config as C


def _cfg(tmp_path, **stage):
    c = C.default_config()
    c.teacher.path = str(tmp_path)
    c.stages.kd = C.stage_config(type="logit_kd", steps=10, **stage)
    c.stage_order = "kd"
    return c


def test_default_config_with_a_stage_validates(tmp_path):
    C.validate_config(_cfg(tmp_path))


def test_unknown_key_is_named_with_the_valid_ones(tmp_path):
    c = _cfg(tmp_path)
    with pytest.raises(AttributeError, match="lrr"):
        c.train.lrr = 1.0  # locked sections refuse at once
    plain = ml_collections.ConfigDict(c.to_dict())
    plain.train.lrr = 1.0
    with pytest.raises(C.ConfigError, match=r"unknown key 'train\.lrr'; valid keys in 'train': .*batch_size.*seq_len"):
        C.validate_config(plain)
    with pytest.raises(C.ConfigError, match=r"unknown key 'learning_rate'; valid keys: .*lr"):
        C.stage_config(type="sft", learning_rate=1e-3)
    plain = ml_collections.ConfigDict(c.to_dict())
    plain.stages.kd.temprature = 2.0
    with pytest.raises(C.ConfigError, match=r"unknown key 'stages\.kd\.temprature'.*temperature"):
        C.validate_config(plain)


def test_layer_spec_parses_ranges_and_orders_layers():
    assert C.parse_layer_spec("attention:0,2;kda:1,3") == ("attention", "kda", "attention", "kda")
    assert C.parse_layer_spec("kda:1-3;swa:0", 4) == ("swa", "kda", "kda", "kda")
    kinds = ("attention", "kda", "kda", "attention")
    assert C.parse_layer_spec(C.format_layer_spec(kinds)) == kinds


@pytest.mark.parametrize(
    "spec, n, message",
    [
        ("attention:0,2;kda:1,4", None, r"layer\(s\) \[3\] are not named"),  # gap
        ("attention:0,1;kda:1,2", None, r"layer 1 is named twice \(attention and kda\)"),  # duplicate
        ("attention:0;mamba:1", None, r"unknown mixer 'mamba'; known mixers: attention, kda, gdn, swa, allmem"),
        ("attention:0,1", 3, r"layer\(s\) \[2\] are not named"),  # last layer missing
        ("attention:0,5", 2, r"out of range for a model with 2 layers"),
        ("attention 0,1", None, "lacks ':'"),
        ("kda:x", None, "not a layer index"),
        ("", None, "empty"),
    ],
)
def test_bad_layer_specs(spec, n, message):
    with pytest.raises(C.ConfigError, match=message):
        C.parse_layer_spec(spec, n)


def test_hybrid_kda_preset_keeps_the_papers_attention_layers():
    kinds = C.parse_layer_spec("qwen3_0p6b_hybrid_kda", 28)
    assert [i for i, k in enumerate(kinds) if k == "attention"] == [0, 2, 6, 11, 13, 18, 21]
    assert kinds.count("kda") == 21
    assert C.parse_layer_spec("all_allmem", 3) == ("allmem",) * 3
    with pytest.raises(C.ConfigError, match="28-layer"):
        C.parse_layer_spec("qwen3_0p6b_hybrid_kda", 24)


def test_seq_len_beyond_the_model_limit():
    C.check_seq_len(4096, 40960)
    with pytest.raises(C.ConfigError, match=r"train\.seq_len=8192 exceeds the model's limit of 4096"):
        C.check_seq_len(8192, 4096)


def test_stage_order_and_budget_errors(tmp_path):
    c = _cfg(tmp_path)
    c.stage_order = "kd,sft"
    with pytest.raises(C.ConfigError, match="'sft', which is not in config.stages"):
        C.validate_config(c)
    c.stage_order = ""
    with pytest.raises(C.ConfigError, match="stage_order is empty"):
        C.validate_config(c)
    c = _cfg(tmp_path)
    c.stages.kd.tokens = 1000
    with pytest.raises(C.ConfigError, match="stages.kd: give exactly one of steps"):
        C.validate_config(c)
    c.stages.kd.steps = 0
    c.train.batch_size, c.train.seq_len = 2, 64
    assert C.resolved_stage(c, "kd").steps == 8  # ceil(1000 / 128)


def test_loss_specs():
    assert C.parse_loss("forward_kl:0.9, ce:0.1") == (("forward_kl", 0.9), ("ce", 0.1))
    with pytest.raises(C.ConfigError, match="unknown kind 'kl'"):
        C.parse_loss("kl")
    with pytest.raises(C.ConfigError, match="not a number"):
        C.parse_loss("ce:abc")


def test_stage_loss_must_fit_the_stage_type(tmp_path):
    c = _cfg(tmp_path)
    c.stages.align = C.stage_config(type="attention_alignment", steps=1, loss="forward_kl")
    c.stage_order = "align"
    with pytest.raises(C.ConfigError, match="its loss must be 'mse'"):
        C.validate_config(c)


def test_missing_teacher_path(tmp_path):
    c = _cfg(tmp_path)
    c.teacher.path = str(tmp_path / "nope")
    with pytest.raises(C.ConfigError, match="teacher.path .*nope' does not exist"):
        C.validate_config(c)
    c.teacher.path = ""
    with pytest.raises(C.ConfigError, match="teacher.path is empty but a stage needs a teacher"):
        C.validate_config(c)
    c.stages.kd.type, c.stages.kd.loss = "sft", "ce"  # no teacher needed
    C.validate_config(c)


def test_resolved_stage_inherits_and_defaults(tmp_path):
    c = _cfg(tmp_path)
    c.stages.inst = C.stage_config(type="instruct_kd", steps=3, batch_size=2)
    c.stage_order = "kd,inst"
    r = C.resolved_stage(c, "inst")
    assert (r.batch_size, r.seq_len, r.loss) == (2, c.train.seq_len, "forward_kl")
    assert r.freeze == ("attention",) and r.trainable == ()
    assert r.data.loss_mask == "completion" and r.data.source == c.data.source


def test_open_sections_take_new_keys(tmp_path):
    c = _cfg(tmp_path)
    c.student.mixers.kda = {"chunk_size": 32}  # checked by the student builder
    c.stages.extra = C.stage_config(type="sft", steps=1, loss="ce")
    C.validate_config(c)
