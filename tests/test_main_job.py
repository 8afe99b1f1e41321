"""The main job end to end through its CLI: cached teacher -> student -> stages -> eval table."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_jax.pretrain import load_config_file
from tests.fixtures import load_script
from tests.test_pretrain_evaluate import TINY_CONFIG_FILE

REPO = Path(__file__).resolve().parents[1]
kl_before_after = load_script("kl_before_after").kl_before_after

RUN_CONFIG = '''
from hybrid_jax.config import default_config, stage_config

def get_config():
    c = default_config()
    c.teacher.build = "{teacher}"
    c.student.layer_spec = "attention:0;kda:1"
    c.student.mixers.kda = dict(chunk_size=32)
    c.train.batch_size = 4
    c.train.seq_len = 64
    c.train.progress = False
    c.train.tensorboard = False
    c.train.log_every = 2
    c.data.loss_mask = "completion"
    c.stages.align = stage_config(type="attention_alignment", steps=4, lr=1e-3)
    c.stages.kd = stage_config(type="logit_kd", steps=4, lr=1e-3)
    c.stage_order = "align,kd"
    c.eval.max_items = 4
    c.eval.max_new_tokens = 4
    c.export.enabled = False
    return c
'''


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("main_job")
    (root / "teacher_tiny.py").write_text(TINY_CONFIG_FILE)
    (root / "run.py").write_text(RUN_CONFIG.format(teacher=root / "teacher_tiny.py"))
    env = {"XDG_CACHE_HOME": str(root / "cache"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}

    def cli(workdir):
        return subprocess.run([sys.executable, "-m", "hybrid_jax.distill", f"--config={root / 'run.py'}",
                               f"--workdir={workdir}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    return root, cli


def test_main_job_end_to_end_and_rerun(run, monkeypatch):
    root, cli = run
    workdir = root / "w"
    first = cli(workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "first use; cached for later runs" in first.stdout
    assert "stage align: loss" in first.stdout and "stage kd: loss" in first.stdout
    table = (workdir / "eval" / "eval.md").read_text()
    assert "| teacher |" in table and "| student |" in table
    assert json.loads((workdir / "student_config.json").read_text())["layer_spec"] == "attention:0;kda:1"
    assert (workdir / "tokenizer" / "tokenizer.json").exists()
    steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]
    assert steps and steps[-1] == 8
    assert "training curves plotted" in first.stdout
    assert (workdir / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    # scripts/kl_before_after.py on this workdir (8 steps of a tiny teacher: the README reports
    # the quickstart's numbers; here only that it scores the right stage and checkpoint)
    monkeypatch.setenv("XDG_CACHE_HOME", str(root / "cache"))  # the CLI's cached teacher
    config = load_config_file(str(root / "run.py"))
    kl = kl_before_after(config, str(workdir), batches=2)
    assert kl["stage"] == "kd" and kl["step"] == 8 and kl["batches"] == 2
    assert all(0 <= kl[k] < float("inf") for k in ("init", "final")) and kl["init"] != kl["final"], kl
    with pytest.raises(ValueError, match="not one of the config's stages"):
        kl_before_after(config, str(workdir), stage="instruct")

    # The same command again: the teacher comes from the cache and the finished run is not retrained.
    again = cli(workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "using the cached teacher" in again.stdout and "resuming from" in again.stdout
    assert [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")] == steps


def test_main_job_without_a_teacher_fails_clearly(run, tmp_path):
    root, _ = run
    proc = subprocess.run([sys.executable, "-m", "hybrid_jax.distill", "--config=configs/quickstart.py",
                           "--config.teacher.build=", f"--workdir={tmp_path}"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert "teacher.path is empty but a stage needs a teacher" in proc.stderr


def test_allmem_randomisation_hook_draws_per_step_and_restores(tmp_path):
    import hybrid_jax as hj
    from hybrid_jax.config import default_config
    from hybrid_jax.distill.__main__ import allmem_step_hook, restore_allmem_hparams
    from tests.fixtures import write_tiny_checkpoint

    teacher = hj.load_pretrained(str(write_tiny_checkpoint(tmp_path, tokenizer=False)))
    student = hj.build_student(teacher, "allmem:0-1", mixer_config={"allmem": dict(window=16, sinks=0, chunk_size=8)})
    config = default_config()
    assert allmem_step_hook(config) is None  # off by default
    config.student.randomize.enabled = True
    config.student.randomize.window, config.student.randomize.chunk_size = (128, 1024), (128, 512)
    hook = allmem_step_hook(config)
    draws = []
    for step in (1, 2, 3, 1):
        hook(student, step)
        m = student.blocks[1].mixer
        assert student.blocks[0].mixer.window == m.window  # one draw for every layer
        assert 128 <= m.window <= 1024 and 128 <= m.chunk_size <= 512 and 0 <= m.sinks <= 256
        draws.append((m.window, m.sinks, m.chunk_size))
    assert draws[0] == draws[3]  # seeded by the step: a resumed run draws the same values
    assert len(set(draws)) > 1
    restore_allmem_hparams(student)
    assert [(b.mixer.window, b.mixer.sinks, b.mixer.chunk_size) for b in student.blocks] == [(16, 0, 8)] * 2
