"""Quickstart run: `python -m hybrid_jax.distill --config=configs/quickstart.py --workdir=DIR`.

With `teacher.path` empty the job builds a tiny random Qwen3 teacher (CPU, seconds); point
`--config.teacher.path=DIR_OR_HUB_ID` at a Hugging Face Qwen3 checkpoint to use a real one.
"""

from hybrid_jax.config import default_config


def get_config():
    config = default_config()
    config.teacher.path = ""
    config.teacher.dtype = "float32"
    return config
