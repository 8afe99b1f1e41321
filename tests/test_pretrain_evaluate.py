"""Teacher pretraining entry point and the evaluate CLI on a tiny configuration."""

import json
import os

import numpy as np
import pytest

from hybrid_jax import evaluate as evaluate_cli
from hybrid_jax import pretrain
from hybrid_jax.config import ConfigError, stage_config

TINY_CONFIG_FILE = '''
from hybrid_jax.config import default_config, stage_config

def get_config():
    c = default_config()
    c.model.hidden_size = 32
    c.model.intermediate_size = 64
    c.model.num_hidden_layers = 2
    c.model.num_attention_heads = 2
    c.model.num_key_value_heads = 1
    c.model.head_dim = 16
    c.model.max_position_embeddings = 256
    c.tokenizer.vocab_size = 300
    c.data.loss_mask = "completion"
    c.train.batch_size = 4
    c.train.seq_len = 64
    c.train.progress = False
    c.train.tensorboard = False
    c.train.log_every = 5
    c.stages.pretrain = stage_config(type="sft", steps=20, lr=3e-3, schedule="constant", warmup_frac=0.0, decay_frac=0.0)
    c.stage_order = "pretrain"
    c.eval.max_items = 4
    c.eval.max_new_tokens = 4
    return c
'''


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    cfg_file = root / "teacher_tiny.py"
    cfg_file.write_text(TINY_CONFIG_FILE)
    logs = []
    export = pretrain.cached_teacher(str(cfg_file), cache_root=str(root / "cache"), print_fn=logs.append)
    return cfg_file, root, export, logs


def test_pretrain_trains_exports_and_evaluates(tiny_teacher):
    from transformers import AutoModelForCausalLM

    _, _, export, logs = tiny_teacher
    workdir = os.path.dirname(export)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]  # 20 steps of SFT lower the loss
    hf = AutoModelForCausalLM.from_pretrained(export)  # transformers loads the teacher as plain Qwen3
    assert hf.config.model_type == "qwen3" and hf.config.num_hidden_layers == 2
    results = json.load(open(os.path.join(workdir, "eval", "eval.json")))
    acc = results["qa"]["teacher"]
    assert set(acc) >= {"mc_loglik_acc", "mc_generation_acc", "open_generation_acc"}
    assert any("first use; cached" in line for line in logs)


def test_cached_teacher_is_reused(tiny_teacher):
    cfg_file, root, export, _ = tiny_teacher
    mtime = os.path.getmtime(os.path.join(export, "config.json"))
    logs = []
    again = pretrain.cached_teacher(str(cfg_file), cache_root=str(root / "cache"), print_fn=logs.append)
    assert again == export and os.path.getmtime(os.path.join(export, "config.json")) == mtime
    assert any("using the cached teacher" in line for line in logs)


def test_pretraining_rejects_stages_that_need_a_teacher(tmp_path, tiny_teacher):
    cfg_file, *_ = tiny_teacher
    config = pretrain.load_config_file(str(cfg_file))
    config.stages.kd = stage_config(type="logit_kd", steps=1)
    config.stage_order = "pretrain,kd"
    config.teacher.path = str(tmp_path)
    with pytest.raises(ConfigError, match="stage 'kd' is 'logit_kd'"):
        pretrain.pretrain(config, str(tmp_path / "w"))


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="config file 'nope.py' does not exist"):
        pretrain.load_config_file("nope.py")


def test_evaluate_cli_scores_teacher_and_checkpoint(tiny_teacher, tmp_path):
    cfg_file, root, export, _ = tiny_teacher
    config = pretrain.load_config_file(str(cfg_file))
    config.teacher.path = export
    # The workdir form of --checkpoint resolves to its export/; the teacher equals it, so it is scored once.
    results = evaluate_cli.evaluate(config, os.path.dirname(export), out=str(tmp_path / "ev"), print_fn=lambda *_: None)
    assert list(results["qa"]) == ["model"]
    saved = json.load(open(tmp_path / "ev" / "eval.json"))
    np.testing.assert_allclose(saved["qa"]["model"]["mc_loglik_acc"], results["qa"]["model"]["mc_loglik_acc"])
    assert "| model |" in open(tmp_path / "ev" / "eval.md").read()


def test_evaluate_cli_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_cli.resolve_checkpoint(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        evaluate_cli.resolve_checkpoint(str(tmp_path))
