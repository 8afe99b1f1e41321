"""metrics.jsonl: records, resume truncation, TensorBoard events or a JSONL-only fallback, and
the metrics plot."""

import logging
import os
import struct
import sys

import pytest

from hybrid_jax.distill.metrics import (
    PLOTTED,
    MetricsWriter,
    main,
    metric_series,
    plot_metrics,
    read_metrics,
)


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


def _two_stage_log(workdir):
    w = MetricsWriter(str(workdir), tensorboard=False)
    for s in (1, 2, 3):
        w.write(s, {"loss_mean": 1.0 / s, "grad_norm": float("inf") if s == 2 else 2.0 * s,
                    "lr": 1e-3, "tokens_per_s": 100.0}, stage="align", stage_step=s)
    for s in (4, 5):
        w.write(s, {"loss_mean": 0.1 * (6 - s), "grad_norm": 1.0, "lr": 5e-4,
                    "tokens_per_s": 90.0}, stage="kd", stage_step=s - 3)
    w.close()


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_metric_series_per_stage_without_non_finite_values(tmp_path):
    _two_stage_log(tmp_path)
    recs = read_metrics(str(tmp_path))
    assert metric_series(recs, "loss_mean") == {"align": ([1, 2, 3], [1.0, 0.5, 1.0 / 3]),
                                                "kd": ([4, 5], [0.2, 0.1])}
    assert metric_series(recs, "grad_norm")["align"] == ([1, 3], [2.0, 6.0])  # inf left out
    assert metric_series(recs, "no_such_metric") == {}


def test_plot_metrics_writes_a_png_and_the_cli_too(tmp_path, capsys):
    _two_stage_log(tmp_path)
    path = plot_metrics(str(tmp_path))
    assert path == str(tmp_path / "metrics.png")
    assert _png_size(path) == (880, round(110 * 2.2 * len(PLOTTED)))
    main([f"--workdir={tmp_path}", f"--out={tmp_path / 'again.png'}"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "again.png")
    assert _png_size(tmp_path / "again.png") == _png_size(path)
    with pytest.raises(SystemExit, match="has no metrics.jsonl"):
        main([f"--workdir={tmp_path / 'missing'}"])
    MetricsWriter(str(tmp_path / "empty"), tensorboard=False).close()
    with pytest.raises(ValueError, match="no records"):
        plot_metrics(str(tmp_path / "empty"))
