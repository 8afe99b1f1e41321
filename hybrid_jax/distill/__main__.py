"""The main job: `python -m hybrid_jax.distill --config=configs/quickstart.py --workdir=DIR`.

1. Teacher: `teacher.path` (a Hugging Face directory or hub id), or — with `teacher.build`
   naming a pretraining config — the teacher `hybrid_jax.pretrain` trains on first use and
   caches (a log line says which).
2. Student: `student.path`, or `hj.build_student(teacher, student.preset | student.layer_spec,
   mixer_config=student.mixers)` initialised from the teacher.
3. Distillation: the stages of `stage_order`, in order (hybrid_jax.distill.trainer); tqdm
   progress, metrics.jsonl and TensorBoard events in DIR; checkpoints in DIR/checkpoints.
4. Evaluation: teacher and student on the same micro-world items, by log-likelihood and by
   generation (DIR/eval/eval.md), the table printed.
5. Export: the student as a Hugging Face directory (DIR/export).

The student's structure (DIR/student_config.json) and the tokenizer (DIR/tokenizer) are saved
before training, so `python -m hybrid_jax.export --checkpoint=DIR` can rebuild the student
from any checkpoint of the run.

Rerunning the same command on the same workdir resumes where it stopped.
"""

from __future__ import annotations

import os

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py", "Run configuration file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, eval, export).", required=True)


def load_teacher(config, print_fn=print):
    """(teacher, tokenizer) from teacher.path or the cached teacher of teacher.build."""
    import hybrid_jax as hj
    from hybrid_jax.config import ConfigError
    from hybrid_jax.data.tokenizer import load_tokenizer
    from hybrid_jax.evaluate import teacher_path

    path = teacher_path(config, print_fn)
    if path is None:
        raise ConfigError("config: no teacher; set teacher.path (a Hugging Face Qwen3 directory or hub id) or "
                          "teacher.build (a pretraining config such as configs/teacher_micro.py)")
    print_fn(f"teacher: {path}")
    return hj.load_pretrained(path, dtype=config.teacher.dtype), load_tokenizer(path)


def load_student(config, teacher, print_fn=print):
    import hybrid_jax as hj

    if config.student.path:
        print_fn(f"student: {config.student.path}")
        return hj.load_pretrained(config.student.path, dtype=config.train.param_dtype)
    spec = config.student.preset or config.student.layer_spec
    print_fn(f"student: {spec} built from the teacher")
    # Trained weights stay float32 master copies; compute runs in train.compute_dtype.
    return hj.build_student(teacher, spec, mixer_config=config.student.mixers.to_dict(),
                            dtype=config.train.compute_dtype, param_dtype=config.train.param_dtype,
                            remat=config.train.remat)


def save_run_files(workdir: str, student, tokenizer) -> None:
    """What an export needs besides the checkpoint: the student's structure and the tokenizer."""
    import json

    from hybrid_jax.models.hybrid import student_config_dict

    with open(os.path.join(workdir, "student_config.json"), "w") as f:
        json.dump(student_config_dict(student), f, indent=2)
    tokenizer.save_pretrained(os.path.join(workdir, "tokenizer"))


def allmem_step_hook(config):
    """Per-step draws of AllMem's window / sinks / chunk (seeded by the step, so a resumed run
    draws the same values), or None when `student.randomize.enabled` is off."""
    r = config.student.randomize
    if not r.enabled:
        return None
    import numpy as np

    from hybrid_jax.layers.allmem import sample_allmem_hparams, set_allmem_hparams

    def hook(student, step):
        draw = sample_allmem_hparams(np.random.default_rng([config.seed, step]), window=tuple(r.window),
                                     sinks=tuple(r.sinks), chunk_size=tuple(r.chunk_size))
        set_allmem_hparams(student, **draw)

    return hook


def restore_allmem_hparams(student) -> None:
    """Put back each AllMem/SWA layer's configured window, sinks and chunk after random draws."""
    for block in student.blocks:
        hp = dict(getattr(block.mixer, "hparams", ()))
        for key in ("window", "sinks", "chunk_size"):
            if key in hp and hasattr(block.mixer, key):
                setattr(block.mixer, key, hp[key])


def run(config, workdir: str, print_fn=print) -> dict:
    import jax

    import hybrid_jax as hj
    from hybrid_jax.config import validate_config
    from hybrid_jax.distill.metrics import plot_metrics
    from hybrid_jax.distill.trainer import Trainer, pipeline_data_fn
    from hybrid_jax.eval.report import evaluate_models, write_report

    validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    print_fn("resolved config:\n" + str(config))
    teacher, tokenizer = load_teacher(config, print_fn)
    student = load_student(config, teacher, print_fn)
    save_run_files(workdir, student, tokenizer)
    summary = Trainer(config, student, teacher=teacher, data_fn=pipeline_data_fn(config, tokenizer),
                      workdir=workdir, step_hook=allmem_step_hook(config), print_fn=print_fn).run()
    restore_allmem_hparams(student)
    for name, s in summary["stages"].items():
        print_fn(f"stage {name}: loss {s['first_loss']:.4g} -> {s['last_loss']:.4g} over {s['steps']} steps")
    if jax.process_index() == 0:
        print_fn(f"training curves plotted: {plot_metrics(workdir)}")
    out = {"summary": summary}
    if config.eval.enabled:
        from hybrid_jax.data import microworld

        results = evaluate_models({"teacher": teacher, "student": student}, tokenizer, config.eval,
                                  world=microworld.data_world(config.data), log=print_fn)
        paths = write_report(results, os.path.join(workdir, "eval"))
        print_fn(results["table"])
        print_fn(f"evaluation written to {paths['markdown']}")
        out["eval"] = results
    if config.export.enabled:
        export = os.path.join(workdir, "export")
        hj.save_pretrained(student, export, tokenizer=tokenizer)
        print_fn(f"student exported as a Hugging Face directory: {export}")
        out["export"] = export
    return out


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint file at INFO
        absl_logging.set_verbosity(absl_logging.WARNING)
    run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
