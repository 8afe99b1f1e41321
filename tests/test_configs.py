"""Every shipped config loads and validates; the paper recipes carry the papers' numbers."""

from pathlib import Path

import pytest

from hybrid_jax.config import resolved_stage, validate_config
from hybrid_jax.pretrain import load_config_file

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_validates(path):
    config = load_config_file(str(path))
    if not config.teacher.path and not config.teacher.build and path.stem.startswith("qwen3"):
        config.teacher.path = "Qwen/Qwen3-0.6B"  # the user's checkpoint; a hub id passes validation
    validate_config(config)


def test_gendistill_recipe_budgets():
    config = load_config_file(str(CONFIGS[0].parent / "qwen3_0p6b_kda.py"))
    tokens = {n: resolved_stage(config, n).tokens for n in config.stage_order.split(",")}
    assert tokens == {"align": 30_000_000, "blocks": 30_000_000, "kd": 500_000_000, "instruct": 250_000_000}
    assert config.train.batch_size * config.train.seq_len == 64 * 4096
    for n in tokens:
        s = resolved_stage(config, n)
        assert (s.lr, s.schedule, s.warmup_frac, s.decay_frac) == (2.5e-5, "wsd", 0.1, 0.1)
    assert resolved_stage(config, "instruct").data.loss_mask == "completion"
