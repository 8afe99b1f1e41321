"""The six GenDistill ablation axes on the micro-world, scored by log-likelihood and by generation.

    python scripts/run_ablations.py [--out=docs/ablations] [--workdir=runs/ablations] [--seeds=0,1,2] [--only=objective,masking]

Every variant is the ablation baseline (`base_config()`: configs/quickstart.py, its cached
micro-world teacher, with the short step budget `STEPS` and the KD rate `ABLATION_KD_LR`)
with one thing changed:

    objective     forward KL (baseline) | reverse KL | KL + CE | SFT (cross-entropy on the data)
    masking       completion-only (baseline) | all tokens, in the instruction stage
    duration      0.5x | 1x (baseline) | 2x the logit-KD and instruction steps
    dataset       mixture: corpus KD then chat KD (baseline) | pretraining corpus only | chats only
    freezing      attention frozen in the instruction stage (baseline) | nothing | attention + MLPs
    architecture  KDA (baseline) | scalar-gate GDN | SWA | AllMem, at the same layer placement

Why a short budget: at the quickstart's budget the student answers every question (it starts
from the teacher's weights and the world is small), and so did both masking variants at a
quarter of it: nothing separates. With `STEPS` the students are still learning the answer
format when training stops, which is where the recipe's choices show. Every variant trains
once per data-order seed (--seeds) and the report gives the mean and range.

Each student is scored on the same items as the teacher: the 180 multiple-choice questions by
log-likelihood ranking of the options and by generation (the options shown, the reply
parsed), and the 180 open questions by generation (exact match). The report (OUT/ablations.md,
one PNG per axis, OUT/scorings.png, OUT/ablations.json) flags every pair of variants of an
axis that log-likelihood and generation rank in opposite orders, and the pairs log-likelihood
scores equal while generation separates them — the papers' point that perplexity-style scoring
can hide what generation reveals. docs/ablations/README.md describes the committed run.

Runs share work: a run is identified by its stages so far (everything that determines the
student's weights), and a variant whose first stages equal an earlier run's starts from that
run's checkpoint at the stage boundary (the trainer's resume, which equals an uninterrupted
run). Finished runs under --workdir are reused; use a fresh --workdir for a timed run.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import itertools
import json
import os
import shlex
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# The ablation baseline's steps per stage (the quickstart runs 60/60/200/150).
STEPS = dict(align=15, blocks=15, kd=30, instruct=4)
# SWA / AllMem window (tokens): shorter than every evaluation prompt (19-37 tokens with the
# chat template), so, as at long context, the window cannot hold the whole prompt.
WINDOW = 16


def _quickstart():
    spec = importlib.util.spec_from_file_location("quickstart_config", os.path.join(REPO, "configs", "quickstart.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


# The KD stage's rate in the committed tables (docs/ablations); the quickstart's 200-step KD
# has run at 3e-4 since, and these 30-step runs keep the rate they were measured with.
ABLATION_KD_LR = 1e-3


def base_config():
    """The ablation baseline: the quickstart recipe with the `STEPS` budget and the KD rate
    `ABLATION_KD_LR`."""
    c = _quickstart()
    for name, steps in STEPS.items():
        c.stages[name].steps = steps
    c.stages.kd.lr = ABLATION_KD_LR
    c.eval.max_new_tokens = 8  # the longest answer is 4 tokens
    c.export.enabled = False
    c.train.progress = False
    c.train.tensorboard = False
    c.train.checkpoint_every = 10**6  # only stage ends, where variants branch
    return c


def _set_loss(c, loss):
    for name in ("kd", "instruct"):
        c.stages[name].loss = loss


def _scale_steps(c, factor, names):
    for name in names:
        c.stages[name].steps = max(1, int(round(c.stages[name].steps * factor)))


def _set_spec(c, mixer):
    c.student.layer_spec = c.student.layer_spec.replace("kda:", f"{mixer}:")
    c.student.mixers[mixer] = {
        "gdn": dict(chunk_size=c.student.mixers.kda.chunk_size),
        "swa": dict(window=WINDOW),
        "allmem": dict(window=WINDOW, chunk_size=WINDOW),
    }[mixer]


AXES = {
    "objective": {
        "forward KL": lambda c: None,
        "reverse KL": lambda c: _set_loss(c, "reverse_kl"),
        "KL + CE": lambda c: _set_loss(c, "forward_kl:1.0,ce:1.0"),
        "SFT": lambda c: _set_loss(c, "ce"),
    },
    "masking": {
        "completion-only": lambda c: None,
        "all tokens": lambda c: setattr(c.stages.instruct.data, "loss_mask", "all"),
    },
    "duration": {
        "0.5x": lambda c: _scale_steps(c, 0.5, ("kd", "instruct")),
        "1x": lambda c: None,
        "2x": lambda c: _scale_steps(c, 2.0, ("kd", "instruct")),
    },
    "dataset": {
        "mixture": lambda c: None,
        "pretraining only": lambda c: setattr(c, "stage_order", "align,blocks,kd"),
        "instruction only": lambda c: setattr(c, "stage_order", "align,blocks,instruct"),
    },
    "freezing": {
        "attention": lambda c: None,
        "none": lambda c: setattr(c.stages.instruct, "freeze", ""),
        "attention + MLP": lambda c: setattr(c.stages.instruct, "freeze", "attention,mlp"),
    },
    "architecture": {
        "KDA": lambda c: None,
        "GDN (scalar gate)": lambda c: _set_spec(c, "gdn"),
        "SWA": lambda c: _set_spec(c, "swa"),
        "AllMem": lambda c: _set_spec(c, "allmem"),
    },
}
BASELINE = {"objective": "forward KL", "masking": "completion-only", "duration": "1x", "dataset": "mixture",
            "freezing": "attention", "architecture": "KDA"}


def variant_config(axis: str, name: str, seed: int = 0):
    """A variant; `seed` sets the order of the training data (the only random draw in a run)."""
    c = base_config()
    c.seed = seed
    AXES[axis][name](c)
    return c


def prefix_key(config, n: int) -> str:
    """Identifies the student after the first n stages: every setting that shapes its weights
    (teacher, student, data, train, seed and those n stages, resolved), none that only scores."""
    from hybrid_jax.config import resolved_stage, stage_names

    d = {k: v for k, v in config.to_dict().items() if k not in ("eval", "export", "stages", "stage_order")}
    d["stages"] = [[name, resolved_stage(config, name).to_dict()] for name in stage_names(config)[:n]]
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return "-".join(stage_names(config)[:n]) + "-" + hashlib.sha256(blob).hexdigest()[:10]


def _latest_step(workdir: str) -> int:
    steps = [int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()]
    return max(steps)


class Runner:
    """Trains and scores variants with one teacher in memory, sharing equal stage prefixes."""

    def __init__(self, workdir: str, log=print):
        import jax

        from hybrid_jax.distill.__main__ import load_teacher

        self.workdir, self.log = workdir, log
        # Variants repeat the same train steps (same stage, loss and freezing): compile each once.
        jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        self.teacher, self.tokenizer = load_teacher(base_config(), print_fn=log)
        self.trained_steps = 0

    def _evaluate(self, model, eval_cfg) -> dict:
        from hybrid_jax.eval.report import evaluate_models

        return evaluate_models({"m": model}, self.tokenizer, eval_cfg, log=lambda *_: None)["qa"]["m"]

    def teacher_scores(self) -> dict:
        path = os.path.join(self.workdir, "teacher_eval.json")
        if not os.path.exists(path):
            os.makedirs(self.workdir, exist_ok=True)
            _dump(self._evaluate(self.teacher, base_config().eval), path)
        return json.load(open(path))

    def run(self, config) -> dict:
        """The student's scores after the config's stages (trained, or reused from disk)."""
        from hybrid_jax.config import stage_names, validate_config
        from hybrid_jax.distill.__main__ import (
            allmem_step_hook,
            load_student,
            restore_allmem_hparams,
        )
        from hybrid_jax.distill.trainer import Trainer, pipeline_data_fn

        validate_config(config)
        names = stage_names(config)
        dirs = [os.path.join(self.workdir, "runs", prefix_key(config, n)) for n in range(1, len(names) + 1)]
        result = os.path.join(dirs[-1], "eval.json")
        if os.path.exists(result):
            return json.load(open(result))
        student = load_student(config, self.teacher, print_fn=lambda *_: None)
        for i, d in enumerate(dirs):
            done = os.path.join(d, "stage.json")
            if os.path.exists(done) and i < len(dirs) - 1:
                continue  # the last prefix always runs: it restores the trained weights into `student`
            if not os.path.exists(d):
                self._branch(dirs[i - 1] if i else None, d)
            c = copy.deepcopy(config)
            c.stage_order = ",".join(names[: i + 1])
            t0 = time.time()
            summary = Trainer(c, student, teacher=self.teacher, data_fn=pipeline_data_fn(c, self.tokenizer), workdir=d,
                              step_hook=allmem_step_hook(c), print_fn=lambda *_: None).run()
            if not os.path.exists(done):
                stage = config.stages[names[i]]
                self.trained_steps += stage.steps
                self.log(f"    trained {names[i]} ({stage.steps} steps, {time.time() - t0:.0f} s) in {os.path.basename(d)}")
                _dump({"stage": names[i], "seconds": time.time() - t0, **summary["stages"][names[i]]}, done)
        restore_allmem_hparams(student)
        scores = self._evaluate(student, config.eval)
        scores["stages"] = {n: json.load(open(os.path.join(d, "stage.json"))) for n, d in zip(names, dirs)}
        _dump(scores, result)
        return scores

    @staticmethod
    def _branch(parent: str | None, d: str) -> None:
        """A new run directory; from a parent, its checkpoint at the stage boundary."""
        tmp = d + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        if parent is not None:
            step = str(_latest_step(parent))
            shutil.copytree(os.path.join(parent, "checkpoints", step), os.path.join(tmp, "checkpoints", step))
        os.rename(tmp, d)


def _dump(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)


SCORES = (("mc_loglik_acc", "MC log-likelihood"), ("mc_generation_acc", "MC generation"),
          ("open_generation_acc", "open generation"))
GENERATION_KEYS = SCORES[1:]
MEAN_KEYS = ("mc_loglik_acc", "mc_loglik_acc_norm", "mc_generation_acc", "mc_generation_unparsed", "open_generation_acc")


def summarise(per_seed: list[dict]) -> dict:
    """Each score's mean over the seeds, its [min, max], and the per-seed scores."""
    out: dict = {k: sum(r[k] for r in per_seed) / len(per_seed) for k in MEAN_KEYS}
    out["range"] = {k: [min(r[k] for r in per_seed), max(r[k] for r in per_seed)] for k in MEAN_KEYS}
    out["per_seed"] = [{k: r[k] for k in MEAN_KEYS} for r in per_seed]
    return out


def disagreements(rows: dict[str, dict], gen_key: str = "mc_generation_acc") -> list[tuple[str, str]]:
    """Pairs (a, b) that MC log-likelihood ranks a > b and generation (`gen_key`) ranks b > a."""
    out = []
    for a, b in itertools.combinations(rows, 2):
        ll = rows[a]["mc_loglik_acc"] - rows[b]["mc_loglik_acc"]
        gen = rows[a][gen_key] - rows[b][gen_key]
        if ll * gen < 0:
            out.append((a, b) if ll > 0 else (b, a))
    return out


def loglik_ties(rows: dict[str, dict], gen_key: str = "mc_generation_acc") -> list[tuple[str, str]]:
    """Pairs (a, b) with equal MC log-likelihood accuracy that generation ranks a > b."""
    out = []
    for a, b in itertools.combinations(rows, 2):
        if abs(rows[a]["mc_loglik_acc"] - rows[b]["mc_loglik_acc"]) < 1e-9 and rows[a][gen_key] != rows[b][gen_key]:
            out.append((a, b) if rows[a][gen_key] > rows[b][gen_key] else (b, a))
    return out


def seeds_flipped(a: dict, b: dict, gen_key: str) -> int:
    """In how many seeds log-likelihood ranks a above b while generation ranks b above a."""
    return sum(x["mc_loglik_acc"] > y["mc_loglik_acc"] and x[gen_key] < y[gen_key]
               for x, y in zip(a["per_seed"], b["per_seed"], strict=True))


def _pts(x: float) -> str:
    return f"{100 * x:+.1f} pts"


def _flip_text(rows: dict[str, dict], gen_key: str, gen_name: str) -> str:
    flips = [f"**{a}** > {b} by log-likelihood ({_pts(rows[a]['mc_loglik_acc'] - rows[b]['mc_loglik_acc'])}) but < by "
             f"{gen_name} ({_pts(rows[a][gen_key] - rows[b][gen_key])}; in {seeds_flipped(rows[a], rows[b], gen_key)} "
             f"of {len(rows[a]['per_seed'])} seeds)" for a, b in disagreements(rows, gen_key)]
    ties = [f"{a} > {b} ({_pts(rows[a][gen_key] - rows[b][gen_key])})" for a, b in loglik_ties(rows, gen_key)]
    return (f"- log-likelihood vs {gen_name}: opposite orders: {'; '.join(flips) or 'none'}. "
            f"Equal by log-likelihood, apart by {gen_name}: {', '.join(ties) or 'none'}.")


def plot_axis(axis: str, rows: dict[str, dict], teacher: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(rows)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.8 + 1.7 * len(names), 3.6))
    for i, (k, label) in enumerate(SCORES):
        mean = np.array([100 * rows[n][k] for n in names])
        lo, hi = (np.array([100 * rows[n]["range"][k][j] for n in names]) for j in (0, 1))
        bars = ax.bar(x + (i - 1) * 0.27, mean, 0.27, yerr=[mean - lo, hi - mean], capsize=2, label=label, color=f"C{i}")
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
        ax.axhline(100 * teacher[k], color=f"C{i}", ls=":", lw=1)
    ax.set_xticks(x, names)
    ax.set_ylabel("student accuracy (%)")
    ax.set_ylim(0, 115)
    ax.set_title(f"ablation: {axis} (mean and range over seeds; dotted: teacher)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scorings(results: dict[str, dict[str, dict]], teacher: dict, path: str) -> str:
    """Every distinct variant (the baseline once), sorted by MC generation: the three scorings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {}
    for axis, variants in results.items():
        for name, r in variants.items():
            rows["baseline" if name == BASELINE[axis] else f"{axis}: {name}"] = r
    names = sorted(rows, key=lambda n: (rows[n]["mc_generation_acc"], rows[n]["open_generation_acc"]))
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.32 * len(names)))
    for i, ((key, label), marker) in enumerate(zip(SCORES, "osD", strict=True)):
        ax.scatter([100 * rows[n][key] for n in names], [y + 0.2 * (1 - i) for y in range(len(names))], marker=marker,
                   s=28, color=f"C{i}", label=label, zorder=3)  # offset rows: equal scores stay visible
        ax.axvline(100 * teacher[key], color=f"C{i}", ls=":", lw=1)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("student accuracy (%), mean over seeds (dotted: teacher)")
    ax.set_title("every variant under the three scorings", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cell(r: dict, key: str) -> str:
    lo, hi = r["range"][key]
    return f"{100 * r[key]:.1f}%" + (f" ({100 * lo:.1f}–{100 * hi:.1f})" if hi > lo else "")


def report(results: dict[str, dict[str, dict]], teacher: dict, out: str, header: str) -> str:
    """OUT/ablations.md (returned), one PNG per axis and OUT/scorings.png."""
    lines = ["# GenDistill ablations on the micro-world", "", header, "",
             f"Teacher: MC log-likelihood {100 * teacher['mc_loglik_acc']:.1f}%, MC generation "
             f"{100 * teacher['mc_generation_acc']:.1f}%, open generation {100 * teacher['open_generation_acc']:.1f}%. "
             "Cells: mean over seeds (min–max when they differ); one item is 0.56 points.", "",
             "![log-likelihood vs generation](scorings.png)", ""]
    for axis, rows in results.items():
        lines += [f"## {axis}", "", f"![{axis}]({axis}.png)", "",
                  "| variant | MC log-lik | MC log-lik (norm) | MC generation | MC unparsed | open generation | LL − MC gen |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in rows.items():
            mark = " (baseline)" if name == BASELINE[axis] else ""
            lines.append(f"| {name}{mark} | {_cell(r, 'mc_loglik_acc')} | {100 * r['mc_loglik_acc_norm']:.1f}% | "
                         f"{_cell(r, 'mc_generation_acc')} | {100 * r['mc_generation_unparsed']:.1f}% | "
                         f"{_cell(r, 'open_generation_acc')} | {_pts(r['mc_loglik_acc'] - r['mc_generation_acc'])} |")
        lines += ["", "How the two scorings rank the variants (seed means):", ""]
        lines += [_flip_text(rows, k, label) for k, label in GENERATION_KEYS]
        lines.append("")
        plot_axis(axis, rows, teacher, os.path.join(out, f"{axis}.png"))
    plot_scorings(results, teacher, os.path.join(out, "scorings.png"))
    text = "\n".join(lines)
    with open(os.path.join(out, "ablations.md"), "w") as f:
        f.write(text)
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/ablations")
    ap.add_argument("--workdir", default="runs/ablations")
    ap.add_argument("--only", default="", help="comma-separated axes (default: all six)")
    ap.add_argument("--seeds", default="0,1,2", help="data-order seeds; every variant trains once per seed")
    args = ap.parse_args()
    axes = [a for a in (args.only.split(",") if args.only else AXES) if a]
    unknown = sorted(set(axes) - set(AXES))
    if unknown:
        raise SystemExit(f"--only: unknown axes {unknown}; choose from {sorted(AXES)}")
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--seeds={args.seeds!r}: give comma-separated integers, e.g. 0,1,2") from None
    if not seeds:
        raise SystemExit("--seeds: give at least one seed")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    runner = Runner(args.workdir)
    teacher = runner.teacher_scores()
    results: dict[str, dict[str, dict]] = {}
    for axis in axes:
        results[axis] = {}
        for name in AXES[axis]:
            per_seed = []
            for seed in seeds:
                print(f"[{time.time() - t0:6.0f}s] {axis}: {name}, seed {seed}", flush=True)
                per_seed.append(runner.run(variant_config(axis, name, seed)))
            results[axis][name] = summarise(per_seed)
    seconds = time.time() - t0
    steps = ", ".join(f"{k} {v}" for k, v in STEPS.items())
    header = (f"`{shlex.join(['python', *sys.argv])}`: {seconds / 60:.1f} min on {os.cpu_count()} CPU cores, "
              f"{runner.trained_steps} training steps. Every variant is configs/quickstart.py with the budget {steps} "
              f"steps (batch 16 x 128 tokens), KD at lr {ABLATION_KD_LR:g}, and one change, trained once per data-order seed ({', '.join(map(str, seeds))}); "
              f"SWA and AllMem use a {WINDOW}-token window.")
    _dump({"teacher": teacher, "axes": results, "seconds": seconds, "trained_steps": runner.trained_steps,
           "steps": STEPS, "window": WINDOW, "seeds": seeds}, os.path.join(args.out, "ablations.json"))
    print(report(results, teacher, args.out, header))


if __name__ == "__main__":
    main()
