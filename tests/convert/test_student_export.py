"""Hybrid students -> HF "hybrid_qwen3" directories: transformers (trust_remote_code) computes the same logits and
greedy generations as JAX; load_pretrained(save_pretrained(x)) == x exactly; bad input; the export CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

import hybrid_jax as hj
from hybrid_jax.convert.hf_import import CheckpointError, load_tokenizer
from hybrid_jax.eval.generate import generate_tokens, left_pad
from hybrid_jax.models.hybrid import build_student, student_config_dict
from hybrid_jax.models.qwen3 import Qwen3, Qwen3Config
from tests.fixtures import logits_of, random_padded_batch, tiny_tokenizer

CFG = Qwen3Config(vocab_size=272, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=128, initializer_range=0.3,
                  tie_word_embeddings=False, bos_token_id=256, eos_token_id=256, pad_token_id=256)
KDA = {"chunk_size": 8, "backend": "reference"}  # the JAX oracle: chunk 8 is below the Pallas kernels' sizes
STUDENTS = {
    "hybrid_kda": ("attention:0,2;kda:1", {"kda": KDA}),
    # window / chunk far below the prompt lengths, so the ring, the sinks and chunk closings all happen
    "allmem": ("allmem:0-2", {"allmem": {"window": 3, "sinks": 1, "chunk_size": 2, "lr_init": 0.01}}),
    "gdn_swa_allmem": ("gdn:0;swa:1;allmem:2", {"gdn": KDA, "swa": {"window": 4, "sinks": 2},
                                                "allmem": {"window": 5, "sinks": 0, "chunk_size": 3}}),
}


@pytest.fixture(scope="module")
def teacher():
    return Qwen3(CFG, rngs=nnx.Rngs(1))


def make_student(teacher, name, **overrides):
    """A student whose new parameters are all perturbed: identity convs, a zero output gate and alpha = 0 hide bugs."""
    spec, mixer_config = STUDENTS[name]
    student = build_student(teacher, spec, mixer_config, **overrides)
    rng = np.random.default_rng(0)
    for path, var in nnx.to_flat_state(nnx.state(student, nnx.Param)):
        if "mixer" in path:  # host-side noise: no per-shape compiles on a busy CPU
            value = np.asarray(var[...], np.float32)
            var.set_value(jnp.asarray(value + 0.1 * rng.standard_normal(value.shape, np.float32), var.dtype))
    return student


@pytest.fixture(scope="module")
def student(teacher):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = make_student(teacher, name)
        return cache[name]

    return get


def load_torch(path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, dtype=torch.float32,
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def params_of(model):
    return [(p, np.asarray(v)) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]


@pytest.mark.parametrize("name", list(STUDENTS))
def test_transformers_matches_jax_logits_and_greedy_generation(student, tmp_path, name):
    student = student(name)
    # A distinct directory name per student: transformers caches remote code by directory name.
    out = hj.save_pretrained(student, tmp_path / f"hf_{name}", tokenizer=tiny_tokenizer(), max_shard_size=40_000)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "hybrid_qwen3" and cfg["layer_spec"] == student_config_dict(student)["layer_spec"]
    assert cfg["mixer_configs"] == student_config_dict(student)["layers"]
    assert set(cfg["auto_map"]) >= {"AutoConfig", "AutoModelForCausalLM"}
    assert len(set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    back = hj.load_pretrained(out)  # and JAX reads it back exactly
    assert student_config_dict(back) == student_config_dict(student)
    for (pa, a), (pb, b) in zip(params_of(student), params_of(back), strict=True):
        assert pa == pb
        np.testing.assert_array_equal(a, b)
    hf = load_torch(out)

    ids, mask = random_padded_batch(np.random.default_rng(0), 3, 20, 256)
    ours = np.asarray(logits_of(student, jnp.asarray(ids), jnp.asarray(mask)))
    with torch.no_grad():
        theirs = hf(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
    real = mask == 1
    assert np.isfinite(ours[real]).all()
    err = np.abs(theirs - ours)[real].max()
    print(f"{name}: max |logit diff| {err:.2e} (logits up to {np.abs(ours[real]).max():.1f})")
    assert err <= 1e-4

    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 256, n).tolist() for n in (7, 3, 12)]
    ours = generate_tokens(student, prompts, 32)
    ids, mask = left_pad(prompts, 256)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                             max_new_tokens=32, do_sample=False)[:, ids.shape[1]:].numpy()
    assert theirs.shape == ours.shape == (3, 32)
    np.testing.assert_array_equal(theirs, ours)


def test_load_of_save_is_exact_in_bfloat16(teacher, tmp_path):
    """bf16 parameters round-trip bitwise, and those the layers keep in float32 (A_log, TTT weights) stay float32."""
    student = make_student(teacher, "gdn_swa_allmem", dtype="bfloat16", param_dtype="bfloat16")
    back = hj.load_pretrained(hj.save_pretrained(student, tmp_path / "m"), dtype="bfloat16")
    assert student_config_dict(back) == student_config_dict(student)
    assert nnx.graphdef(back) == nnx.graphdef(student)
    dtypes = set()
    for (pa, a), (pb, b) in zip(params_of(student), params_of(back), strict=True):
        assert pa == pb and a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a.astype(np.float32), b.astype(np.float32))
        dtypes.add(str(a.dtype))
    assert dtypes == {"bfloat16", "float32"}


@pytest.fixture(scope="module")
def kda_dir(student, tmp_path_factory):
    return hj.save_pretrained(student("hybrid_kda"), tmp_path_factory.mktemp("kda") / "hf_bad_input")


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **changes}))


def test_export_records_the_live_window_sinks_and_chunk(student, tmp_path):
    from hybrid_jax.layers.allmem import set_allmem_hparams

    model = student("allmem")
    try:
        set_allmem_hparams(model, window=6, sinks=2, chunk_size=4)  # as a trainer's per-step draw leaves them
        out = hj.save_pretrained(model, tmp_path / "m")
    finally:
        set_allmem_hparams(model, **{k: STUDENTS["allmem"][1]["allmem"][k] for k in ("window", "sinks", "chunk_size")})
    layers = json.loads((out / "config.json").read_text())["mixer_configs"]
    assert [(hp["window"], hp["sinks"], hp["chunk_size"]) for hp in layers] == [(6, 2, 4)] * 3
    back = hj.load_pretrained(out)
    assert [(b.mixer.window, b.mixer.sinks, b.mixer.chunk_size) for b in back.blocks] == [(6, 2, 4)] * 3


def test_unknown_mixer_type_is_named(kda_dir, tmp_path):
    import shutil

    bad = shutil.copytree(kda_dir, tmp_path / "bad")
    _edit_config(bad, layer_spec="attention:0,2;mamba:1", mixer_types=None)
    with pytest.raises(CheckpointError, match="unknown mixer 'mamba'"):
        hj.load_pretrained(bad)
    from transformers import AutoConfig

    with pytest.raises(ValueError, match="unknown mixer 'mamba'"):
        AutoConfig.from_pretrained(str(bad), trust_remote_code=True)


def test_unknown_mixer_setting_and_missing_spec_are_named(kda_dir, tmp_path):
    import shutil

    bad = shutil.copytree(kda_dir, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    layers = cfg["mixer_configs"]
    layers[1] = {**layers[1], "state_size": 4}
    _edit_config(bad, mixer_configs=layers)
    with pytest.raises(CheckpointError, match=r"mixer_configs\[1\] has keys \['state_size'\] that a kda layer"):
        hj.load_pretrained(bad)
    cfg.pop("layer_spec")
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="lacks 'layer_spec'"):
        hj.load_pretrained(bad)


def test_missing_parameter_is_named(kda_dir, tmp_path):
    import shutil

    bad = shutil.copytree(kda_dir, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.1.linear_attn.A_log"]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing keys .*model\.layers\.1\.linear_attn\.A_log"):
        hj.load_pretrained(bad)


def test_failed_student_export_keeps_the_old_directory(student, kda_dir, tmp_path):
    import shutil

    out = shutil.copytree(kda_dir, tmp_path / "m")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    class Broken:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        hj.save_pretrained(student("allmem"), out, tokenizer=Broken())
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_torch_cache_paths_and_holed_mask(kda_dir):
    """Beam search and sampling with several sequences reorder / repeat HybridCache rows: with the cache they pick
    what the cache-free model picks. A holed attention mask is refused."""
    hf = load_torch(kda_dir)
    ids = torch.tensor([[256, 256, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    for kw in ({"num_beams": 3, "do_sample": False}, {"do_sample": True, "num_return_sequences": 2}):
        runs = []
        for use_cache in (True, False):
            torch.manual_seed(0)
            runs.append(hf.generate(ids, attention_mask=mask, max_new_tokens=6, use_cache=use_cache, **kw))
        torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="one contiguous run of ones"):
        hf(torch.ones(1, 5, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 0, 1, 1]]))


def test_export_cli_from_a_distill_workdir(student, tmp_path):
    from hybrid_jax.distill.checkpoint import Checkpointer
    from hybrid_jax.distill.trainer import FlatParams
    from hybrid_jax.export import export

    student = student("allmem")
    work = tmp_path / "run"
    work.mkdir()
    # What hybrid_jax.distill writes before training: the structure and the tokenizer; then checkpoints.
    (work / "student_config.json").write_text(json.dumps(student_config_dict(student)))
    tiny_tokenizer().save_pretrained(str(work / "tokenizer"))
    with pytest.raises(FileNotFoundError, match="no checkpoints/ directory"):
        export(work, tmp_path / "hf")
    ckpt = Checkpointer(str(work / "checkpoints"), async_save=False)
    flat = FlatParams(nnx.state(student, nnx.Param)).values
    ckpt.save(3, jax.tree.map(jnp.zeros_like, flat), (jnp.zeros(()),), {"global_step": 3})
    ckpt.save(7, flat, (jnp.zeros(()),), {"global_step": 7})
    ckpt.close()

    out = export(work, tmp_path / "hf", print_fn=lambda *a: None)  # latest step: 7
    back = hj.load_pretrained(out)
    for (pa, a), (pb, b) in zip(params_of(student), params_of(back), strict=True):
        assert pa == pb
        np.testing.assert_array_equal(a, b)
    assert load_tokenizer(out)("hi")["input_ids"] == tiny_tokenizer()("hi")["input_ids"]
    early = hj.load_pretrained(export(work, tmp_path / "hf3", step=3, print_fn=lambda *a: None))
    assert all(not b.any() for _, b in params_of(early))
    with pytest.raises(ValueError, match=r"--step=5 is not in .*saved steps: \[3, 7\]"):
        export(work, tmp_path / "hf5", step=5)

    again = export(out, tmp_path / "hf_again", print_fn=lambda *a: None)  # an HF directory re-exports as is
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    with pytest.raises(FileNotFoundError, match="neither student_config.json .* nor config.json"):
        export(tmp_path / "run" / "tokenizer", tmp_path / "x")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's KDA kernels need CUDA")
def test_fla_kernels_match_the_pytorch_kda(tmp_path, monkeypatch):
    """On CUDA with fla installed the exported model runs fla's chunk/recurrent KDA; the pure-PyTorch path agrees."""
    import sys

    pytest.importorskip("fla.ops.kda")
    cfg = CFG.replace(hidden_size=64, head_dim=16)
    student = build_student(Qwen3(cfg, rngs=nnx.Rngs(2)), "kda:0;attention:1;kda:2", {"kda": {"chunk_size": 64}})
    hf = load_torch(hj.save_pretrained(student, tmp_path / "hf_fla")).cuda()
    module = sys.modules[type(hf).__module__]
    assert module._fla_chunk_kda is not None
    ids, mask = random_padded_batch(np.random.default_rng(0), 3, 100, 256)
    ids, mask = torch.tensor(ids, dtype=torch.long).cuda(), torch.tensor(mask).cuda()
    runs = []
    for fla in (True, False):
        if not fla:
            monkeypatch.setattr(module, "_fla_chunk_kda", None)
        with torch.no_grad():
            logits = hf(ids, attention_mask=mask).logits[mask == 1]
            tokens = hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
        runs.append((logits, tokens))
    (a, ta), (b, tb) = runs
    rms = ((a - b).pow(2).mean() / b.pow(2).mean()).sqrt().item()
    print(f"fla vs PyTorch KDA: RMS-relative logit error {rms:.2e}, max abs {(a - b).abs().max().item():.2e}")
    assert rms < 1e-3
    assert (ta == tb).float().mean() > 0.9  # greedy paths may split at a near-tie after TF32 rounding
