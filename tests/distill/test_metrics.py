"""metrics.jsonl: records, resume truncation, TensorBoard events or a JSONL-only fallback."""

import logging
import os
import sys

from hybrid_jax.distill.metrics import MetricsWriter, read_metrics


def test_jsonl_resume_cuts_back_to_the_restored_step(tmp_path):
    w = MetricsWriter(str(tmp_path), tensorboard=False)
    for s in (1, 2, 3):
        w.write(s, {"loss": 1.0 / s, "grad_norm": float("nan")}, stage="kd", stage_step=s)
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss"')  # a line cut by a kill mid-write
    w = MetricsWriter(str(tmp_path), resume_step=2, tensorboard=False)
    w.write(3, {"loss": 0.25}, stage="kd", stage_step=3)
    w.close()
    recs = read_metrics(str(tmp_path))
    assert [(r["step"], r["loss"]) for r in recs] == [(1, 1.0), (2, 0.5), (3, 0.25)]
    assert recs[0]["grad_norm"] == "nan" and recs[0]["stage"] == "kd"
    MetricsWriter(str(tmp_path), tensorboard=False).close()  # a fresh run starts a fresh log
    assert read_metrics(str(tmp_path)) == []


def test_tensorboard_events_or_a_warning_without_tensorboardx(tmp_path, monkeypatch, caplog):
    w = MetricsWriter(str(tmp_path / "a"))
    w.write(1, {"loss": 1.0}, stage="kd")
    w.close()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "a" / "tensorboard"))
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import now raises ImportError
    with caplog.at_level(logging.WARNING):
        w = MetricsWriter(str(tmp_path / "b"))
    w.write(1, {"loss": 1.0}, stage="kd")
    w.close()
    assert "tensorboardX is not installed" in caplog.text
    assert not (tmp_path / "b" / "tensorboard").exists()
    assert read_metrics(str(tmp_path / "b"))[0]["loss"] == 1.0
