"""The ablation runner: every variant is a valid config differing from the baseline; rank flips."""

import importlib.util
from pathlib import Path

import pytest

from hybrid_jax.config import resolved_stage, validate_config

spec = importlib.util.spec_from_file_location("run_ablations", Path(__file__).parents[1] / "scripts" / "run_ablations.py")
ablations = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablations)


@pytest.mark.parametrize("axis", sorted(ablations.AXES))
def test_every_variant_is_valid_and_only_the_baseline_equals_quickstart(axis):
    baseline = ablations._quickstart().to_json(sort_keys=True)
    for name, change in ablations.AXES[axis].items():
        config = ablations._quickstart()
        change(config)
        validate_config(config)
        same = config.to_json(sort_keys=True) == baseline
        assert same == (name == ablations.BASELINE[axis]), (axis, name)


def test_variants_change_what_they_say():
    c = ablations._quickstart()
    ablations.AXES["masking"]["all tokens"](c)
    assert resolved_stage(c, "instruct").data.loss_mask == "all"
    c = ablations._quickstart()
    ablations.AXES["architecture"]["AllMem"](c)
    assert c.student.layer_spec == "attention:0;allmem:1,2,3"
    c = ablations._quickstart()
    ablations.AXES["duration"]["2x"](c)
    assert c.stages.kd.steps == 2 * ablations._quickstart().stages.kd.steps


def test_disagreements_flags_opposite_rankings():
    rows = {
        "a": dict(mc_loglik_acc=0.9, mc_generation_acc=0.2, open_generation_acc=0.1),
        "b": dict(mc_loglik_acc=0.8, mc_generation_acc=0.5, open_generation_acc=0.4),
        "c": dict(mc_loglik_acc=0.7, mc_generation_acc=0.1, open_generation_acc=0.1),
    }
    # a beats b by log-likelihood but loses by generation; a and c agree; b and c agree.
    assert ablations.disagreements(rows) == [("a", "b")]
