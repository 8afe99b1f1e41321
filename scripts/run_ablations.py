"""The six GenDistill ablation axes on the micro-world, scored by log-likelihood and by generation.

    python scripts/run_ablations.py --out=docs/ablations [--scale=0.5] [--only=objective,masking]

Every variant is the quickstart recipe (configs/quickstart.py, the cached micro-world teacher)
with one thing changed:

    objective     forward KL (baseline) | reverse KL | KL + CE | SFT (cross-entropy on the data)
    masking       completion-only (baseline) | all tokens, in the instruction stage
    duration      0.5x | 1x (baseline) | 2x the logit-KD and instruction steps
    dataset       mixture: corpus KD then chat KD (baseline) | pretraining corpus only | chats only
    freezing      attention frozen in the instruction stage (baseline) | nothing | attention + MLPs
    architecture  KDA (baseline) | scalar-gate GDN | SWA | AllMem, at the same layer placement

Each run is evaluated on the same multiple-choice items by log-likelihood ranking and by
generation, and on open questions by generation. The report (OUT/ablations.md, OUT/*.png)
flags every pair of variants of an axis that the two scorings rank in opposite orders — the
papers' point that perplexity-style scoring can hide what generation reveals.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _quickstart():
    spec = importlib.util.spec_from_file_location("quickstart_config", os.path.join(REPO, "configs", "quickstart.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _set_loss(c, loss):
    for name in ("kd", "instruct"):
        c.stages[name].loss = loss


def _scale_steps(c, factor, names=("align", "blocks", "kd", "instruct")):
    for name in names:
        c.stages[name].steps = max(1, int(round(c.stages[name].steps * factor)))


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


def _set_spec(c, mixer):
    c.student.layer_spec = c.student.layer_spec.replace("kda:", f"{mixer}:")
    if mixer in ("swa", "allmem"):
        c.student.mixers[mixer] = dict(window=32) if mixer == "swa" else dict(window=32, chunk_size=32)


def run_variant(config, workdir: str) -> dict:
    from hybrid_jax.distill.__main__ import run

    done = os.path.join(workdir, "eval", "eval.json")
    if not os.path.exists(done):  # finished variants are reused: the runner itself resumes
        run(config, workdir, print_fn=lambda *_: None)
    return json.load(open(done))["qa"]["student"]


def disagreements(rows: dict[str, dict]) -> list[tuple[str, str]]:
    """Pairs (a, b) where log-likelihood ranks a above b and generation ranks b above a."""
    out = []
    for a, b in itertools.combinations(rows, 2):
        ll = rows[a]["mc_loglik_acc"] - rows[b]["mc_loglik_acc"]
        gen = (rows[a]["mc_generation_acc"] + rows[a]["open_generation_acc"]) - (
            rows[b]["mc_generation_acc"] + rows[b]["open_generation_acc"])
        if ll * gen < 0:
            out.append((a, b) if ll > 0 else (b, a))
    return out


def plot_axis(axis: str, rows: dict[str, dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(rows)
    keys = (("mc_loglik_acc", "MC log-likelihood"), ("mc_generation_acc", "MC generation"),
            ("open_generation_acc", "open generation"))
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(names), 3.4))
    for i, (k, label) in enumerate(keys):
        ax.bar(x + (i - 1) * 0.27, [100 * rows[n][k] for n in names], 0.27, label=label)
    ax.set_xticks(x, names)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"ablation: {axis}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/ablations")
    ap.add_argument("--workdir", default="runs/ablations")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (0.5 = half budget)")
    ap.add_argument("--only", default="", help="comma-separated axes (default: all six)")
    args = ap.parse_args()
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    axes = [a for a in (args.only.split(",") if args.only else AXES) if a]
    unknown = sorted(set(axes) - set(AXES))
    if unknown:
        raise SystemExit(f"--only: unknown axes {unknown}; choose from {sorted(AXES)}")
    os.makedirs(args.out, exist_ok=True)
    results: dict[str, dict[str, dict]] = {}
    t0 = time.time()
    for axis in axes:
        results[axis] = {}
        for name, change in AXES[axis].items():
            config = _quickstart()
            config.train.progress = False
            config.eval.max_new_tokens = 8
            _scale_steps(config, args.scale)
            change(config)
            # Variants equal to the baseline share its run directory.
            key = "baseline" if name == BASELINE[axis] else f"{axis}-{name}".replace(" ", "_").replace("+", "plus")
            print(f"[{time.time() - t0:6.0f}s] {axis}: {name}", flush=True)
            results[axis][name] = run_variant(config, os.path.join(args.workdir, key))
    lines = ["# GenDistill ablations on the micro-world", "",
             f"`python scripts/run_ablations.py --scale={args.scale}` — {time.time() - t0:.0f} s. Every variant is "
             "configs/quickstart.py with one change; scores are the student's on the same 180 facts.", ""]
    for axis, rows in results.items():
        lines += [f"## {axis}", "", f"![{axis}]({axis}.png)", "",
                  "| variant | MC log-lik | MC generation | open generation |", "|---|---|---|---|"]
        for name, r in rows.items():
            lines.append(f"| {name} | {100 * r['mc_loglik_acc']:.1f}% | {100 * r['mc_generation_acc']:.1f}% | "
                         f"{100 * r['open_generation_acc']:.1f}% |")
        flips = disagreements(rows)
        lines.append("")
        lines.append("Log-likelihood and generation rank these pairs in opposite orders: " +
                     (", ".join(f"**{a}** > {b} by log-likelihood, < by generation" for a, b in flips) if flips else "none") + ".")
        lines.append("")
        plot_axis(axis, rows, os.path.join(args.out, f"{axis}.png"))
    with open(os.path.join(args.out, "ablations.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(args.out, "ablations.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
