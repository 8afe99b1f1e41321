"""The seed paper's released layout (model_type "efficient_qwen"): checkpoints built by an independent PyTorch
reference of the released model import with the same logits and greedy tokens; students export into it and run
in that reference; load(save(x)) == x exactly; bad input is named."""

import dataclasses
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

import hybrid_jax as hj
from hybrid_jax.convert.hf_import import CheckpointError
from hybrid_jax.eval.generate import generate_tokens, left_pad
from hybrid_jax.models.hybrid import build_student_from_config, layer_kinds, student_config_dict
from hybrid_jax.models.qwen3 import Qwen3Config
from tests.convert.efficient_qwen_reference import (
    QWEN,
    efficient_config,
    reference_logits,
    reference_model,
    state_dict_of,
)
from tests.fixtures import logits_of, tiny_tokenizer

PAD = 256
CHECKPOINTS = {
    # the released defaults: identity conv activation, conv biases, GQA k/v (2 of 4 heads), no output norm
    "released": dict(cfg={}),
    # the other settings: SiLU convs without bias, the gated output norm, k/v with one head, tied embeddings,
    # KDA first, and the config's older `mixer_type` + `custom_mixer_layers` form instead of layer_specs
    "variant": dict(cfg={"layer_specs": [], "mixer_type": "efficient_kda", "custom_mixer_layers": [0, 1, 3],
                         "tie_word_embeddings": True},
                    ssm={"activation": "silu", "conv_bias": False, "use_post_ssm_norm": True, "n_k_heads": 1,
                         "n_v_heads": 1}),
}


def write_reference_checkpoint(path, name, seed=0):
    """A directory as the released code saves it: config.json + safetensors of the reference's state dict."""
    spec = CHECKPOINTS[name]
    cfg = efficient_config(**spec.get("ssm", {}))
    cfg.update(spec["cfg"])
    if not cfg["layer_specs"]:  # the reference model reads the kinds from layer_specs
        kinds = ["efficient_kda" if i in cfg["custom_mixer_layers"] else "attention" for i in range(4)]
        model = reference_model({**cfg, "layer_specs": ";".join(f"{k}:{i}" for i, k in enumerate(kinds))}, seed)
    else:
        model = reference_model(cfg, seed)
    path.mkdir(parents=True)
    save_file(state_dict_of(model, cfg), str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg))
    return path, model


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = write_reference_checkpoint(tmp_path_factory.mktemp(name) / "ckpt", name)
        return cache[name]

    return get


def params_of(model):
    return [(p, np.asarray(v)) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def prompts(seed, lengths=(9, 4, 13)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, PAD, n).tolist() for n in lengths]


def assert_logits_match(model, torch_model, rows):
    """JAX on the left-padded batch vs the reference on each row alone: the real tokens agree within 1e-4."""
    ids, mask = left_pad(rows, PAD)
    ours = np.asarray(logits_of(model, jnp.asarray(ids), jnp.asarray(mask)))
    errs = [np.abs(ours[i, -len(r):] - ref).max() for i, (r, ref) in enumerate(zip(rows, reference_logits(
        torch_model, rows)))]
    print(f"max |logit diff| per row {np.array(errs)} (logits up to {np.abs(ours).max():.1f})")
    assert max(errs) <= 1e-4
    return ours


def reference_greedy(torch_model, rows, n):
    out = []
    with torch.no_grad():
        for r in rows:
            seq = list(r)
            for _ in range(n):
                seq.append(int(torch_model(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
            out.append(seq[len(r):])
    return np.asarray(out)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_import_matches_the_reference_logits_and_greedy_tokens(reference, name):
    path, torch_model = reference(name)
    model = hj.load_pretrained(path)
    kinds = layer_kinds(model)
    assert kinds == (("attention", "kda", "attention", "kda") if name == "released" else ("kda", "kda", "attention", "kda"))
    assert_logits_match(model, torch_model, prompts(0))
    if name == "released":  # the cached decode path with GQA and biases (the variant's settings: tests/layers)
        rows = prompts(1, (6, 3))
        np.testing.assert_array_equal(generate_tokens(model, rows, 8), reference_greedy(torch_model, rows, 8))


def test_import_reads_the_activation_from_ssm_cfg(reference, tmp_path):
    """The same tensors with ssm_cfg's activation flipped give other logits: the comparison above can fail."""
    path, torch_model = reference("released")
    bad = shutil.copytree(path, tmp_path / "flipped")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["ssm_cfg"]["activation"] = "silu"
    (bad / "config.json").write_text(json.dumps(cfg))
    rows = prompts(0)
    ids, mask = left_pad(rows, PAD)
    ours = np.asarray(logits_of(hj.load_pretrained(bad), jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(ours[0, -len(rows[0]):] - reference_logits(torch_model, rows[:1])[0]).max() > 1e-2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_of_an_import_writes_the_same_checkpoint(reference, tmp_path, dtype):
    path, _ = reference("released")
    model = hj.load_pretrained(path, dtype=dtype)
    out = hj.save_pretrained(model, tmp_path / "out", tokenizer=tiny_tokenizer())  # the layout is chosen: efficient_qwen
    cfg, src_cfg = json.loads((out / "config.json").read_text()), json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "efficient_qwen" and cfg["layer_specs"] == src_cfg["layer_specs"]
    for key in ("d_conv", "n_q_heads", "n_k_heads", "n_v_heads", "activation", "conv_bias", "use_post_ssm_norm"):
        assert cfg["ssm_cfg"][key] == src_cfg["ssm_cfg"][key], key
    written, original = load_file(out / "model.safetensors"), load_file(path / "model.safetensors")
    assert sorted(written) == sorted(original)
    if dtype == "float32":
        for key in original:
            np.testing.assert_array_equal(written[key], original[key], err_msg=key)
    back = hj.load_pretrained(out, dtype=dtype)
    assert student_config_dict(back) == student_config_dict(model)
    assert nnx.graphdef(back) == nnx.graphdef(model)
    for (pa, a), (pb, b) in zip(params_of(model), params_of(back), strict=True):
        assert pa == pb and a.dtype == b.dtype
        np.testing.assert_array_equal(a.astype(np.float32), b.astype(np.float32))


CFG = Qwen3Config(**{k: v for k, v in QWEN.items() if k != "hidden_act"})
KDA = {"chunk_size": 8, "backend": "reference"}


def abstract_student(layer_spec, layers):
    """A student's structure without initialising it (nothing computed: fast on a busy CPU)."""
    base = dataclasses.asdict(CFG)
    return nnx.eval_shape(lambda: build_student_from_config({
        "model_type": "hybrid_qwen3", "base_config": base, "layer_spec": layer_spec, "layers": layers}))


def random_student(layer_spec, layers, seed=0):
    """Every parameter drawn on the host: A_log, dt_bias in their usual ranges, norm weights near 1."""
    student = abstract_student(layer_spec, layers)
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(student, nnx.Param)):
        key = "/".join(map(str, path))
        if key.endswith("A_log"):
            value = np.log(rng.uniform(1, 16, var.shape))
        elif key.endswith("dt_bias"):
            dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), var.shape))
            value = dt + np.log(-np.expm1(-dt))
        elif key.endswith("norm/weight"):
            value = 1 + 0.2 * rng.standard_normal(var.shape)
        else:
            value = 0.3 * rng.standard_normal(var.shape)
        var.set_value(jnp.asarray(value, var.dtype))
    return student


def test_a_student_exports_into_the_released_layout(tmp_path):
    """A hybrid_jax student (SiLU convs, no biases, output norm, one k/v head per query head) written with
    layout='efficient_qwen' loads strictly into the reference of the released model and computes the same logits."""
    student = random_student("attention:0,2;kda:1,3", [{}, KDA, {}, KDA])
    assert json.loads((hj.save_pretrained(student, tmp_path / "auto") / "config.json").read_text())[
        "model_type"] == "hybrid_qwen3"  # the automatic choice for students is unchanged
    out = hj.save_pretrained(student, tmp_path / "eq", layout="efficient_qwen")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["layer_specs"] == "attention:0,2;efficient_kda:1,3"
    assert {k: cfg["ssm_cfg"][k] for k in ("activation", "conv_bias", "use_post_ssm_norm", "n_k_heads")} == {
        "activation": "silu", "conv_bias": False, "use_post_ssm_norm": True, "n_k_heads": CFG.num_attention_heads}
    torch_model = reference_model(cfg)
    tensors = {k: torch.tensor(v) for k, v in load_file(out / "model.safetensors").items()}
    torch_model.load_state_dict(tensors, strict=True)  # no missing, no unexpected keys
    assert not tensors["model.layers.1.self_attn.mixer.g_proj.1.bias"].any()  # zero bias: our gate has none
    assert_logits_match(student, torch_model, prompts(2))
    back = hj.load_pretrained(out)  # and back into JAX, now with the (zero) gate biases
    ids, mask = left_pad(prompts(2), PAD)
    np.testing.assert_allclose(np.asarray(logits_of(back, jnp.asarray(ids), jnp.asarray(mask)))[mask == 1],
                               np.asarray(logits_of(student, jnp.asarray(ids), jnp.asarray(mask)))[mask == 1],
                               atol=1e-5, rtol=1e-5)


# --- bad input ---------------------------------------------------------------------------------


def _edit(path, tmp_path, *, ssm=None, **top):
    bad = shutil.copytree(path, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(top)
    cfg["ssm_cfg"].update(ssm or {})
    (bad / "config.json").write_text(json.dumps(cfg))
    return bad


@pytest.mark.parametrize("edit, message", [
    (dict(layer_specs="attention:0,2;discrete_mamba2:1,3"),
     r"mixer 'discrete_mamba2' cannot be converted; hybrid_jax reads 'attention' and 'efficient_kda' layers only"),
    (dict(layer_specs="attention:0,2;efficient_kda:1,2,3"), r"layer 2 is listed twice"),
    (dict(layer_specs="attention:0,2;efficient_kda:1,4"), r"layer 4 out of range for num_hidden_layers=4"),
    (dict(layer_specs="attention:0,2;efficient_kda:1-3"), r"'1-3' in group 'efficient_kda:1-3' is not a layer index"),
    (dict(ssm={"use_gva_setup": True}), r"ssm_cfg has use_gva_setup=True; .* only with use_gva_setup=False"),
    (dict(ssm={"allow_neg_eigval": True}), r"allow_neg_eigval=True"),
    (dict(ssm={"out_gate_activation": "silu"}), r"out_gate_activation='silu'"),
    (dict(ssm={"n_k_heads": 3, "n_v_heads": 3}), r"n_k_heads=3, n_v_heads=3; need n_k_heads == n_v_heads dividing"),
    (dict(do_laurel=True), r"do_laurel=True; hybrid_jax's decoder needs do_laurel=False"),
    (dict(num_key_heads=4), r"num_key_heads=4 != num_key_value_heads=2"),
])
def test_unsupported_checkpoints_are_named(reference, tmp_path, edit, message):
    bad = _edit(reference("released")[0], tmp_path, **edit)
    with pytest.raises(CheckpointError, match=message):
        hj.load_pretrained(bad)


def test_missing_and_unexpected_tensors_are_named(reference, tmp_path):
    path, _ = reference("released")
    bad = shutil.copytree(path, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.self_attn.mixer.o_norm.weight"] = np.ones(QWEN["head_dim"], np.float32)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unexpected keys .*model\.layers\.1\.self_attn\.mixer\.o_norm\.weight"):
        hj.load_pretrained(bad)  # an output norm the config's use_post_ssm_norm=false does not build
    del tensors["model.layers.1.self_attn.mixer.o_norm.weight"], tensors["model.layers.3.self_attn.mixer.g_proj.1.bias"]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing keys .*model\.layers\.3\.self_attn\.mixer\.g_proj\.1\.bias"):
        hj.load_pretrained(bad)


def test_models_the_layouts_cannot_hold_are_refused(reference, tmp_path):
    imported = hj.load_pretrained(reference("released")[0])
    with pytest.raises(ValueError, match=r"layer 1's KDA uses \{'num_kv_heads': 2, 'conv_activation': 'identity', "
                                         r"'conv_bias': True, 'output_gate_bias': True, 'output_norm': False\}.*"
                                         r"layout='efficient_qwen'"):
        hj.save_pretrained(imported, tmp_path / "h", layout="hybrid_qwen3")
    with pytest.raises(ValueError, match=r"layout='qwen4' is unknown; .*\['efficient_qwen', 'hybrid_qwen3'\]"):
        hj.save_pretrained(imported, tmp_path / "h", layout="qwen4")
    allmem = abstract_student("attention:0;allmem:1;attention:2,3", [{}] * 4)
    with pytest.raises(ValueError, match=r"layer 1 is a allmem layer; the efficient_qwen layout holds attention and"):
        hj.save_pretrained(allmem, tmp_path / "a", layout="efficient_qwen")
    mixed = abstract_student("attention:0,2;kda:1,3", [{}, {}, {}, {"conv_size": 2}])
    with pytest.raises(ValueError, match=r"KDA layers 1 and 3 differ in \{'conv_size': \(4, 2\)\}"):
        hj.save_pretrained(mixed, tmp_path / "m", layout="efficient_qwen")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written


def test_export_cli_layout_flag(reference, tmp_path):
    from hybrid_jax.export import export

    path, _ = reference("released")
    out = export(path, tmp_path / "again", layout="efficient_qwen", print_fn=lambda *a: None)
    assert (out / "model.safetensors").read_bytes() == hj.save_pretrained(
        hj.load_pretrained(path), tmp_path / "direct").joinpath("model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="hybrid_qwen3 layout cannot hold"):
        export(path, tmp_path / "h", layout="hybrid_qwen3", print_fn=lambda *a: None)
