"""configs/teacher_micro_gpu.py and what the pretraining entry point measures: FLOPs per token,
step throughput / MFU, the evaluation world; the config scaled down runs through the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_jax.config import resolved_stage, validate_config
from hybrid_jax.data import microworld
from hybrid_jax.models.qwen3 import Qwen3, Qwen3Config
from hybrid_jax.pretrain import flops_per_token, load_config_file, peak_flops, step_throughput

REPO = Path(__file__).resolve().parents[1]
GPU_CONFIG = REPO / "configs" / "teacher_micro_gpu.py"


def _param_count(cfg: Qwen3Config) -> int:
    model = nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))


def test_gpu_teacher_config_is_a_100m_qwen3_on_the_large_world():
    config = load_config_file(str(GPU_CONFIG))
    validate_config(config)
    m = config.model
    cfg = Qwen3Config(vocab_size=config.tokenizer.vocab_size, hidden_size=m.hidden_size,
                      intermediate_size=m.intermediate_size, num_hidden_layers=m.num_hidden_layers,
                      num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_key_value_heads,
                      head_dim=m.head_dim, tie_word_embeddings=m.tie_word_embeddings)
    assert 95e6 < _param_count(cfg) < 110e6
    assert m.num_key_value_heads < m.num_attention_heads  # grouped-query attention
    assert (config.train.compute_dtype, config.train.param_dtype) == ("bfloat16", "float32")
    stage = resolved_stage(config, "pretrain")
    assert stage.type == "sft" and stage.batch_size * stage.seq_len == 64 * 512
    assert microworld.data_world(config.data) == microworld.LARGE_WORLD
    assert config.eval.enabled and config.eval.max_items == 0  # every fact, both scorings


@pytest.mark.parametrize("tie", [True, False])
def test_flops_per_token_counts_the_parameters_that_multiply(tie):
    cfg = Qwen3Config(vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=tie)
    model = nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0)))
    matrices = sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)) if x.ndim >= 2)
    lookup = 0 if tie else cfg.vocab_size * cfg.hidden_size  # an untied input table is only indexed
    f = flops_per_token(cfg, seq_len=128)
    assert f["matmul_params"] == matrices - lookup
    assert f["dense"] == 6 * f["matmul_params"]
    assert f["attention"] == 6 * 3 * (4 * 16) * 128 and f["total"] == f["dense"] + f["attention"]


def test_flops_per_token_matches_xla_cost_analysis():
    """XLA's own FLOP count of a compiled forward pass (it computes the full T x T scores, so
    twice the causal attention term) agrees with the closed form to within elementwise work."""
    cfg = Qwen3Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512)
    graphdef, state = nnx.split(Qwen3(cfg, rngs=nnx.Rngs(0)))
    b, t = 2, 128
    ids = jnp.zeros((b, t), jnp.int32)
    cost = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x).sum()).lower(state, ids).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    f = flops_per_token(cfg, t)
    expected = b * t * (f["dense"] / 3 + 2 * f["attention"] / 3)  # forward = 1/3; full scores = 2x causal
    assert cost["flops"] == pytest.approx(expected, rel=0.03)


def test_step_throughput_closed_form():
    # 10 steps of 0.5 s; batch = 1000 positions, 900 real; 0.1 s of each step waiting for data.
    # The first step compiles for 20 s. Records: (time of the request, wait, real, positions).
    records = [(0.0, 0.1, 900, 1000)] + [(20.0 + 0.5 * (i - 1), 0.1, 900, 1000) for i in range(1, 10)]
    r = step_throughput(records, flops_per_token=1e6, peak=1e12, n_devices=2)
    assert r["first_step_s"] == pytest.approx(20.0)
    assert r["steps_timed"] == 8 and r["first_timed_step"] == 2  # steps 2..9; step 10's end is unseen
    assert r["tokens_per_s"] == pytest.approx(2000.0) and r["real_tokens_per_s"] == pytest.approx(1800.0)
    assert r["model_flops_per_s"] == pytest.approx(2e9) and r["mfu"] == pytest.approx(1e-3)
    assert r["data_wait_frac"] == pytest.approx(0.2)
    assert step_throughput(records[:2], 1e6)["steps_timed"] == 0  # only the compiling step: no rate


def test_peak_flops_by_device_kind():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989.4e12
    assert peak_flops("cpu") is None


def test_data_world():
    large = microworld.LARGE_WORLD
    assert microworld.data_world({"world": "large"}) == large
    assert microworld.data_world({"world": None, "source": "micro_world"}) == microworld.WorldConfig()
    sources = {"a": {"kind": "microworld", "task": "corpus", "world": {"num_people": 5}},
               "b": {"kind": "microworld", "task": "instruct", "world": {"num_people": 5}},
               "c": {"kind": "jsonl", "path": "x.jsonl"}}
    assert microworld.data_world({"sources": sources}) == microworld.WorldConfig(num_people=5)
    assert microworld.data_world({"sources": [{"kind": "tfds", "name": "microworld/corpus_large"}]}) == large
    with pytest.raises(ValueError, match="set data.world"):
        microworld.data_world({"sources": [{"kind": "microworld", "task": "corpus"},
                                           {"kind": "tfds", "name": "microworld/open_large"}]})


def test_gpu_config_scaled_down_runs_through_the_cli(tmp_path):
    """The same config and code path as the GPU run, with a tiny model, batch and eval."""
    workdir = tmp_path / "w"
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16)
    overrides = [f"--config.model.{k}={v}" for k, v in small.items()] + [
        "--config.train.batch_size=4", "--config.train.seq_len=128", "--config.stages.pretrain.steps=3",
        "--config.eval.max_items=4", "--config.eval.batch_size=4", "--config.eval.max_new_tokens=4"]
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "hybrid_jax.pretrain", f"--config={GPU_CONFIG}",
                           f"--workdir={workdir}", *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "throughput of stage 'pretrain' over steps 2-2" in proc.stdout
    assert "pretrain: 100%" in proc.stderr  # the tqdm bar
    results = json.loads((workdir / "pretrain_results.json").read_text())
    tp = results["throughput"]["pretrain"]
    assert tp["steps_run"] == 3 and tp["steps_timed"] == 1 and tp["tokens_per_s"] > 0
    assert tp["batch_size"] == 4 and tp["seq_len"] == 128
    cfg = Qwen3Config(vocab_size=results["model"]["vocab_size"], **small)
    assert tp["flops_per_token"] == flops_per_token(cfg, 128)
    assert tp["model_flops_per_s"] == pytest.approx(tp["tokens_per_s"] * tp["flops_per_token"]["total"])
    assert results["device_kind"] == jax.devices()[0].device_kind and results["model"]["compute_dtype"] == "bfloat16"
    assert set(results["seconds"]) == {"setup", "train", "export", "eval", "total"}
    assert set(results["eval"]) >= {"mc_loglik_acc", "mc_loglik_acc_norm", "mc_generation_acc", "open_generation_acc"}
    # Evaluated on the world it trained on: the large world's questions, not the default world's.
    asked = [e["question"] for e in results["eval"]["examples"]]
    large = [q["question"] for q in microworld.World(microworld.LARGE_WORLD).open_questions()[:4]]
    assert asked == large and asked != [q["question"] for q in microworld.World().open_questions()[:4]]
    assert results["world"]["fingerprint"] == microworld.LARGE_WORLD.fingerprint()
    assert (workdir / "export" / "config.json").exists() and (workdir / "eval" / "eval.json").exists()
    assert np.isfinite([r["loss"] for r in map(json.loads, open(workdir / "metrics.jsonl"))]).all()
