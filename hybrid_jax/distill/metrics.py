"""Metrics to `<workdir>/metrics.jsonl` and, when tensorboardX is installed, TensorBoard events;
`plot_metrics` (also `python -m hybrid_jax.distill.metrics --workdir=DIR`) draws them.

Each JSONL line is {"step": global step, "stage": name, "stage_step": k, <metric>: value}.
On resume the file is cut back to the restored step and TensorBoard is told to purge later
events, so a resumed run's logs equal an uninterrupted run's. Only process 0 writes.
"""

from __future__ import annotations

import json
import logging
import math
import os

import jax

log = logging.getLogger(__name__)


def _tensorboard_writer(logdir: str, purge_step: int | None):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        log.warning("tensorboardX is not installed: writing metrics.jsonl only (pip install tensorboardX for TensorBoard events)")
        return None
    return SummaryWriter(logdir, purge_step=purge_step)


class MetricsWriter:
    """Append-only metrics log; `resume_step` drops records written after that step."""

    def __init__(self, workdir: str, *, resume_step: int | None = None, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if os.path.exists(self.path):
            keep = []
            with open(self.path) as f:
                for line in f:
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by a kill mid-write
                        continue
                    if resume_step is not None and rec.get("step", 0) <= resume_step:
                        keep.append(line if line.endswith("\n") else line + "\n")
            with open(self.path + ".tmp", "w") as f:
                f.writelines(keep)
            os.replace(self.path + ".tmp", self.path)
        self._file = open(self.path, "a")
        if tensorboard:
            # TensorBoard drops events at steps >= purge_step: those of a killed run after its checkpoint.
            self._tb = _tensorboard_writer(os.path.join(workdir, "tensorboard"), (resume_step or 0) + 1)

    def write(self, step: int, metrics: dict, **fields) -> None:
        if not self.enabled:
            return
        rec = {"step": int(step), **fields}
        for k, v in metrics.items():
            v = float(v)
            rec[k] = v if math.isfinite(v) else str(v)
            if self._tb is not None and math.isfinite(v):
                self._tb.add_scalar(f"{fields.get('stage', 'train')}/{k}", v, step)
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# (metric, panel title, log scale when every value is positive)
PLOTTED = (("loss_mean", "loss (mean since the previous line)", True),
           ("grad_norm", "gradient norm (before clipping)", True),
           ("lr", "learning rate", False),
           ("tokens_per_s", "tokens / s", False))


def metric_series(records: list[dict], name: str) -> dict[str, tuple[list[int], list[float]]]:
    """{stage: (global steps, values)} of one metric, in the order the stages first appear;
    records without the metric, and non-finite values (written as strings), are left out."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for rec in records:
        v = rec.get(name)
        if isinstance(v, int | float) and math.isfinite(v):
            steps, values = series.setdefault(rec.get("stage", "train"), ([], []))
            steps.append(int(rec["step"]))
            values.append(float(v))
    return series


def plot_metrics(workdir: str, path: str | None = None) -> str:
    """Plot `PLOTTED` from `<workdir>/metrics.jsonl` against the global step, one colour per
    stage and a dotted line where each later stage starts; returns the PNG's path (default
    `<workdir>/metrics.png`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    if not records:
        raise ValueError(f"{workdir}/metrics.jsonl holds no records to plot")
    stages = list(dict.fromkeys(rec.get("stage", "train") for rec in records))
    # a stage's first global step: step - stage_step + 1 on any of its lines
    starts = {s: min(r["step"] - r.get("stage_step", 1) + 1 for r in records
                     if r.get("stage", "train") == s) for s in stages}
    colours = {s: f"C{i % 10}" for i, s in enumerate(stages)}
    fig, axes = plt.subplots(len(PLOTTED), 1, figsize=(8, 2.2 * len(PLOTTED)), sharex=True)
    for ax, (name, title, log_scale) in zip(axes, PLOTTED, strict=True):
        series = metric_series(records, name)
        for stage, (steps, values) in series.items():
            ax.plot(steps, values, marker="." if len(steps) < 50 else None, color=colours[stage],
                    label=stage)
        if log_scale and series and all(v > 0 for _, vs in series.values() for v in vs):
            ax.set_yscale("log")
        for stage in stages[1:]:
            ax.axvline(starts[stage], color="grey", linestyle=":", linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title="stage", title_fontsize=8)
    axes[-1].set_xlabel("global step")
    fig.tight_layout()
    path = path or os.path.join(workdir, "metrics.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    """`python -m hybrid_jax.distill.metrics --workdir=DIR [--out=PNG]`: plot a run's metrics,
    also while it is still running."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", default=None, help="PNG path (default: WORKDIR/metrics.png)")
    args = ap.parse_args(argv)
    if not os.path.exists(os.path.join(args.workdir, "metrics.jsonl")):
        raise SystemExit(f"{args.workdir} has no metrics.jsonl (is it a distill --workdir?)")
    print(plot_metrics(args.workdir, args.out))


if __name__ == "__main__":
    main()
