"""The ablation runner: every variant is a valid config differing from the baseline in what it
names; runs share exactly the stage prefixes that are equal; rank flips; the report."""


import pytest

from hybrid_jax.config import resolved_stage, stage_names, validate_config
from tests.fixtures import load_script

ablations = load_script("run_ablations")


@pytest.mark.parametrize("axis", sorted(ablations.AXES))
def test_every_variant_is_valid_and_only_the_baseline_equals_the_base_config(axis):
    baseline = ablations.base_config().to_json(sort_keys=True)
    assert ablations.BASELINE[axis] in ablations.AXES[axis]
    for name in ablations.AXES[axis]:
        config = ablations.variant_config(axis, name)
        validate_config(config)
        same = config.to_json(sort_keys=True) == baseline
        assert same == (name == ablations.BASELINE[axis]), (axis, name)


def test_base_config_is_the_quickstart_with_the_short_budget():
    quick, base = ablations._quickstart(), ablations.base_config()
    for name, steps in ablations.STEPS.items():
        assert base.stages[name].steps == steps < quick.stages[name].steps
        base.stages[name].steps = quick.stages[name].steps
    assert base.stages.kd.lr == ablations.ABLATION_KD_LR != quick.stages.kd.lr
    base.stages.kd.lr = quick.stages.kd.lr
    assert base.student.to_json(sort_keys=True) == quick.student.to_json(sort_keys=True)
    assert base.stages.to_json(sort_keys=True) == quick.stages.to_json(sort_keys=True)
    assert base.stage_order == quick.stage_order and base.seed == quick.seed


def test_variants_change_what_they_say():
    base = ablations.base_config()
    c = ablations.variant_config("masking", "all tokens")
    assert resolved_stage(c, "instruct").data.loss_mask == "all"
    assert resolved_stage(base, "instruct").data.loss_mask == "completion"
    c = ablations.variant_config("architecture", "AllMem")
    assert c.student.layer_spec == "attention:0;allmem:1,2,3"
    assert c.student.mixers.allmem.window == ablations.WINDOW
    c = ablations.variant_config("architecture", "GDN (scalar gate)")
    assert c.student.mixers.gdn.chunk_size == base.student.mixers.kda.chunk_size
    c = ablations.variant_config("duration", "2x")
    assert (c.stages.kd.steps, c.stages.instruct.steps) == (2 * base.stages.kd.steps, 2 * base.stages.instruct.steps)
    assert c.stages.align.steps == base.stages.align.steps
    assert stage_names(ablations.variant_config("dataset", "instruction only")) == ("align", "blocks", "instruct")
    for loss in ("reverse_kl", "ce"):
        name = {"reverse_kl": "reverse KL", "ce": "SFT"}[loss]
        c = ablations.variant_config("objective", name)
        assert resolved_stage(c, "kd").loss == resolved_stage(c, "instruct").loss == loss
    c = ablations.variant_config("freezing", "attention + MLP")
    assert tuple(resolved_stage(c, "instruct").freeze) == ("attention", "mlp")
    assert tuple(resolved_stage(ablations.variant_config("freezing", "none"), "instruct").freeze) == ()
    assert tuple(resolved_stage(base, "instruct").freeze) == ("attention",)  # the instruct_kd default


def _shared(config, other) -> int:
    """How many leading stages two configs share by `prefix_key`."""
    n = 0
    while (n < min(len(stage_names(config)), len(stage_names(other)))
           and ablations.prefix_key(config, n + 1) == ablations.prefix_key(other, n + 1)):
        n += 1
    return n


@pytest.mark.parametrize("axis,name,shared", [
    ("masking", "all tokens", 3),  # only the instruction stage differs
    ("freezing", "none", 3),
    ("dataset", "pretraining only", 3),  # the baseline's first three stages exactly
    ("dataset", "instruction only", 2),  # its third stage is the instruction stage
    ("objective", "reverse KL", 2),  # the KD stage already differs
    ("duration", "2x", 2),
    ("architecture", "SWA", 0),  # a different student from the first stage on
])
def test_runs_share_only_equal_stage_prefixes(axis, name, shared):
    assert _shared(ablations.base_config(), ablations.variant_config(axis, name)) == shared


def test_prefix_key_ignores_scoring_settings_only():
    a, b = ablations.base_config(), ablations.base_config()
    b.eval.max_new_tokens = 3
    b.export.enabled = True
    assert ablations.prefix_key(a, 4) == ablations.prefix_key(b, 4)
    b.seed = 1
    assert ablations.prefix_key(a, 1) != ablations.prefix_key(b, 1)
    b = ablations.base_config()
    b.data.source = "jsonl"  # the stages inherit the top-level data section
    assert ablations.prefix_key(a, 1) != ablations.prefix_key(b, 1)


def test_disagreements_flags_opposite_rankings():
    rows = {
        "a": dict(mc_loglik_acc=0.9, mc_generation_acc=0.2, open_generation_acc=0.1),
        "b": dict(mc_loglik_acc=0.8, mc_generation_acc=0.5, open_generation_acc=0.05),
        "c": dict(mc_loglik_acc=0.7, mc_generation_acc=0.1, open_generation_acc=0.1),
        "d": dict(mc_loglik_acc=0.7, mc_generation_acc=0.9, open_generation_acc=0.9),  # ties c by log-likelihood
    }
    # By MC generation: a>b by LL but b>a; a>d and b>d by LL but d wins; c vs d tie by LL: not a flip.
    assert ablations.disagreements(rows, "mc_generation_acc") == [("a", "b"), ("a", "d"), ("b", "d")]
    # By open generation: b>c by LL but c>b; b>d likewise; a vs d.
    assert ablations.disagreements(rows, "open_generation_acc") == [("a", "d"), ("b", "c"), ("b", "d")]


def test_loglik_ties_lists_pairs_only_generation_separates():
    rows = {
        "a": dict(mc_loglik_acc=1.0, mc_generation_acc=0.6),
        "b": dict(mc_loglik_acc=1.0, mc_generation_acc=0.9),
        "c": dict(mc_loglik_acc=1.0, mc_generation_acc=0.9),  # ties b both ways: nothing to show
        "d": dict(mc_loglik_acc=0.9, mc_generation_acc=0.1),
    }
    assert ablations.loglik_ties(rows) == [("b", "a"), ("c", "a")]


def _row(ll, gen, opn):
    return dict(mc_loglik_acc=ll, mc_loglik_acc_norm=ll, mc_generation_acc=gen, mc_generation_unparsed=0.0,
                open_generation_acc=opn)


def test_summarise_means_ranges_and_per_seed_flip_counts():
    a = ablations.summarise([_row(1.0, 0.5, 0.9), _row(1.0, 0.6, 0.9)])
    b = ablations.summarise([_row(0.9, 0.7, 0.9), _row(0.9, 0.5, 0.9)])
    assert a["mc_generation_acc"] == pytest.approx(0.55) and a["range"]["mc_generation_acc"] == [0.5, 0.6]
    assert ablations.seeds_flipped(a, b, "mc_generation_acc") == 1  # seed 0 flips (0.5 < 0.7), seed 1 does not
    assert ablations.seeds_flipped(b, a, "mc_generation_acc") == 0


def test_report_writes_table_flags_and_plots(tmp_path):
    results = {"masking": {
        "completion-only": ablations.summarise([_row(1.0, 0.5, 0.9), _row(1.0, 0.6, 0.9)]),
        "all tokens": ablations.summarise([_row(0.9, 0.7, 0.9), _row(0.9, 0.5, 0.9)]),
    }}
    text = ablations.report(results, _row(1.0, 1.0, 1.0), str(tmp_path), "header")
    assert "| completion-only (baseline) | 100.0% | 100.0% | 55.0% (50.0–60.0) | 0.0% | 90.0% | +45.0 pts |" in text
    assert ("**completion-only** > all tokens by log-likelihood (+10.0 pts) but < by MC generation "
            "(-5.0 pts; in 1 of 2 seeds)") in text
    assert "log-likelihood vs open generation: opposite orders: none. Equal by log-likelihood, apart by open generation: none." in text
    assert (tmp_path / "ablations.md").read_text() == text
    for png in ("masking.png", "scorings.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
