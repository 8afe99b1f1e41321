"""SIGKILL a two-stage run mid-stage, rerun the same command: the result equals an uninterrupted run."""

import os
import subprocess
import sys

import numpy as np
import pytest

from hybrid_jax.distill.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(workdir, cache, *kill):
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        # the three runs compile the same steps: share the compiled executables
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    return subprocess.run([sys.executable, "-m", "tests.distill.helpers", str(workdir), *map(str, kill)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _strip(records):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


@pytest.mark.slow
def test_sigkill_mid_stage_then_rerun_equals_uninterrupted(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = _run(full, tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    # 1. killed right after the asynchronous save at step 2 of stage 2 started (usually mid-save:
    #    only orbax's temporary directory is left, and the run resumes from the end of stage 1)
    r = _run(killed, tmp_path / "cache", "kd", 2)
    assert r.returncode == -9, r.stderr[-3000:]
    # 2. rerun, killed again at step 4 of stage 2 with synchronous saves: step 2's checkpoint is complete
    r = _run(killed, tmp_path / "cache", "kd", 3, "sync")
    assert r.returncode == -9, r.stderr[-3000:]
    assert not (killed / "final.npz").exists()
    # 3. rerun: resumes mid-stage (optimiser state, data position) and finishes
    r = _run(killed, tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout and "stage 'kd' step 2, global step 5" in r.stdout, r.stdout
    a, b = np.load(full / "final.npz"), np.load(killed / "final.npz")
    assert a.files == b.files
    for k in a.files:
        assert np.array_equal(a[k], b[k]), k
    ma, mb = _strip(read_metrics(full)), _strip(read_metrics(killed))
    assert [(r["stage"], r["stage_step"]) for r in ma] == [("align", 3), ("kd", 3), ("kd", 5)]
    assert ma == mb
