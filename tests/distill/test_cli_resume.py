"""SIGKILL `python -m hybrid_jax.distill` mid-stage and rerun the same command: the resumed run's
final parameters (the exported student), metrics.jsonl and evaluation equal an uninterrupted run's.

The kill comes from outside, as an operator's would: the test polls the workdir until a
checkpoint written in the middle of the `kd` stage is final, then SIGKILLs the process. The
`kd` stage is long enough (many steps, a checkpoint every two) that the run is still
training when the signal lands; the rerun must report a mid-stage resume point.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hybrid_jax.distill.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
ALIGN_STEPS, KD_STEPS, EVERY = 2, 16, 2

CONFIG = '''
from hybrid_jax.config import default_config, stage_config

def get_config():
    c = default_config()
    c.teacher.path = "{teacher}"
    c.student.layer_spec = "attention:0;kda:1"
    c.student.mixers.kda = dict(chunk_size=32)
    c.train.batch_size = 2
    c.train.seq_len = 32
    c.train.progress = False
    c.train.tensorboard = False
    c.train.log_every = 1
    c.train.checkpoint_every = {every}
    c.stages.align = stage_config(type="attention_alignment", steps={align}, lr=1e-3)
    # logit_chunk < seq_len: the fused chunked loss runs over two chunks
    c.stages.kd = stage_config(type="logit_kd", steps={kd}, lr=1e-3, loss="forward_kl:0.9,ce:0.1", logit_chunk=16)
    c.stage_order = "align,kd"
    c.eval.max_items = 2
    c.eval.batch_size = 2
    c.eval.max_new_tokens = 3
    return c
'''


def _write_teacher(root: Path) -> Path:
    """A tiny random-weight Qwen3 with the micro-world tokenizer, as a Hugging Face directory."""
    from flax import nnx

    import hybrid_jax as hj
    from hybrid_jax.data.tokenizer import micro_tokenizer
    from hybrid_jax.models.qwen3 import Qwen3, Qwen3Config

    tok = micro_tokenizer(cache_dir=str(root / "tok"))
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True,
                      bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    path = root / "teacher"
    hj.save_pretrained(Qwen3(cfg, rngs=nnx.Rngs(0)), path, tokenizer=tok)
    return path


def _checkpoint_steps(workdir: Path) -> list[int]:
    """Finalised checkpoint steps (orbax writes a temporary directory and renames it when complete)."""
    try:
        return sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())
    except FileNotFoundError:
        return []


@pytest.mark.slow
def test_cli_sigkill_mid_stage_then_rerun_equals_uninterrupted(tmp_path):
    (tmp_path / "run.py").write_text(CONFIG.format(teacher=_write_teacher(tmp_path), every=EVERY, align=ALIGN_STEPS, kd=KD_STEPS))
    env = {
        "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu", "XDG_CACHE_HOME": str(tmp_path / "cache"),
        # the three runs compile the same programs: share the executables
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }

    def command(workdir):
        return [sys.executable, "-m", "hybrid_jax.distill", f"--config={tmp_path / 'run.py'}", f"--workdir={workdir}"]

    full, killed = tmp_path / "full", tmp_path / "killed"
    r = subprocess.run(command(full), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    # Kill once a checkpoint from inside the kd stage (not its last step) is final.
    first_mid_kd = ALIGN_STEPS + EVERY
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(command(killed), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while not any(s >= first_mid_kd for s in _checkpoint_steps(killed)):
            assert proc.poll() is None, f"the run ended before a mid-kd checkpoint: {(tmp_path / 'killed.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no mid-kd checkpoint within 240 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (killed / "export").exists()

    r = subprocess.run(command(killed), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"resuming from \S+: stage '(\w+)' step (\d+), global step (\d+)", r.stdout)
    assert m, r.stdout[-3000:]
    assert m.group(1) == "kd" and 0 < int(m.group(2)) < KD_STEPS, m.group(0)  # resumed mid-stage

    # Final parameters: the exported student, bitwise.
    from safetensors.numpy import load_file

    files = sorted(p.name for p in (full / "export").glob("*.safetensors"))
    assert files and files == sorted(p.name for p in (killed / "export").glob("*.safetensors"))
    for name in files:
        a, b = load_file(full / "export" / name), load_file(killed / "export" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), (name, k)
    # Metrics: every logged step (those after the resume point included), timing aside.
    strip = lambda rows: [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in rows]
    ma, mb = strip(read_metrics(full)), strip(read_metrics(killed))
    assert [row["step"] for row in ma] == list(range(1, ALIGN_STEPS + KD_STEPS + 1))
    assert ma == mb
    # Final evaluation: accuracies and the generated replies of teacher and student.
    ea, eb = (json.loads((w / "eval" / "eval.json").read_text()) for w in (full, killed))
    assert ea["qa"]["student"] and ea == eb
