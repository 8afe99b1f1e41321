"""Evaluate a model against its teacher: `python -m hybrid_jax.evaluate --config=CONFIG --checkpoint=DIR`.

`--checkpoint` is a Hugging Face directory (what `hybrid_jax.export` and `hj.save_pretrained`
write) or a run's workdir (its `export/` is used). The teacher is the config's `teacher.path`,
or the teacher `teacher.build` trains (cached); without either only the checkpoint is scored.
Both are scored on the same micro-world items by log-likelihood and by generation
(`config.eval`); the table is printed and written with eval.json to `--out`
(default: the checkpoint's run directory / eval).
"""

from __future__ import annotations

import os


def resolve_checkpoint(path: str) -> str:
    """The HF directory behind `path` (itself, or a workdir's export/)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--checkpoint {path!r} does not exist; give a Hugging Face directory or a run's workdir")
    for candidate in (path, os.path.join(path, "export")):
        if os.path.exists(os.path.join(candidate, "config.json")):
            return candidate
    raise FileNotFoundError(f"--checkpoint {path!r} holds no config.json (nor export/config.json); "
                            "export a run first with `python -m hybrid_jax.export`")


def teacher_path(config, print_fn=print) -> str | None:
    if config.teacher.path:
        return config.teacher.path
    if config.teacher.build:
        from hybrid_jax.pretrain import cached_teacher

        return cached_teacher(config.teacher.build, print_fn=print_fn)
    return None


def evaluate(config, checkpoint: str, out: str | None = None, print_fn=print) -> dict:
    import hybrid_jax as hj
    from hybrid_jax.data.tokenizer import load_tokenizer
    from hybrid_jax.eval.report import evaluate_models, write_report

    model_dir = resolve_checkpoint(checkpoint)
    models = {}
    t_path = teacher_path(config, print_fn)
    if t_path and os.path.abspath(t_path) != os.path.abspath(model_dir):
        models["teacher"] = hj.load_pretrained(t_path, dtype=config.teacher.dtype)
    models["student" if models else "model"] = hj.load_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir)
    from hybrid_jax.data import microworld

    results = evaluate_models(models, tokenizer, config.eval, world=microworld.data_world(config.data),
                              log=print_fn)
    out = out or os.path.join(os.path.dirname(os.path.abspath(model_dir)), "eval")
    paths = write_report(results, out)
    print_fn(results["table"])
    print_fn(f"evaluation written to {paths['markdown']}")
    return results


def main(argv):
    from absl import flags
    from absl import logging as absl_logging

    del argv
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    evaluate(flags.FLAGS.config, flags.FLAGS.checkpoint, flags.FLAGS.out)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/quickstart.py", "Run configuration file.")
    flags.DEFINE_string("checkpoint", None, "HF directory or run workdir to evaluate.", required=True)
    flags.DEFINE_string("out", None, "Where eval.json / eval.md go (default: beside the checkpoint).")
    app.run(main)
