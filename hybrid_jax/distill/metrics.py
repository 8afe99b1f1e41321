"""Metrics to `<workdir>/metrics.jsonl` and, when tensorboardX is installed, TensorBoard events.

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
