"""The main job end to end: tiny random teacher -> evaluation table -> HF export -> exact reload."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quickstart_main_job_exports_a_loadable_teacher(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hybrid_jax.distill", "--config=configs/quickstart.py",
                           f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TINY RANDOM Qwen3" in proc.stderr
    assert "reloaded logits differ by 0.0" in proc.stdout
    results = json.loads((tmp_path / "teacher_eval.json").read_text())
    assert len(results["generations"]) == 3 and results["perplexity"] > 1

    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
