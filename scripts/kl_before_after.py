"""KL(teacher ‖ student) per target token, for the student as built from the teacher and for
the student a distillation workdir's last checkpoint holds, on the same batches.

    python scripts/kl_before_after.py --config=configs/quickstart.py --workdir=runs/quickstart

The batches are the first `--batches` of a stage's data stream (`--stage`, default the first
logit stage of the config's stage order; they are batches that stage trained on), scored at
every position whose next token is a target (the stage's loss mask). The number issue 5 asks
the quickstart to report: KL at the end far below its value at initialisation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LOGIT_STAGES = ("logit_kd", "instruct_kd")


def kl_before_after(config, workdir: str, *, batches: int = 8, stage: str | None = None,
                    print_fn=print) -> dict:
    """{"init", "final": mean KL per target token over the batches, "stage", "batches", "step"}."""
    import jax.numpy as jnp
    import numpy as np

    from hybrid_jax.config import resolved_stage, stage_names
    from hybrid_jax.distill.__main__ import load_student, load_teacher
    from hybrid_jax.distill.losses import forward_kl, prediction_mask
    from hybrid_jax.distill.trainer import BATCH_KEYS, pipeline_data_fn
    from hybrid_jax.export import load_workdir_student

    names = stage_names(config)
    if stage is None:
        stage = next((n for n in names if resolved_stage(config, n).type in LOGIT_STAGES), names[0])
    elif stage not in names:
        raise ValueError(f"--stage={stage!r} is not one of the config's stages {names}")
    teacher, tokenizer = load_teacher(config, print_fn)
    init = load_student(config, teacher, print_fn)
    final, step = load_workdir_student(workdir)
    it = pipeline_data_fn(config, tokenizer)(resolved_stage(config, stage))
    kl = {"init": [], "final": []}
    for _ in range(batches):
        b = {k: jnp.asarray(v) for k, v in next(it).items() if k in BATCH_KEYS}
        kw = dict(positions=b["positions"], segment_ids=b["segment_ids"])
        mask = prediction_mask(b)  # the logit stages' own weights
        t = teacher.forward(b["input_ids"], **kw).logits
        for name, model in (("init", init), ("final", final)):
            kl[name].append(float(forward_kl(model.forward(b["input_ids"], **kw).logits, t, mask)))
    return {"init": float(np.mean(kl["init"])), "final": float(np.mean(kl["final"])),
            "stage": stage, "batches": batches, "step": int(step)}


def main(argv=None):
    from hybrid_jax.pretrain import load_config_file

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="the run's config file")
    ap.add_argument("--workdir", required=True, help="the distillation workdir")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--stage", default=None, help="whose data stream to score on")
    args = ap.parse_args(argv)
    res = kl_before_after(load_config_file(args.config), args.workdir, batches=args.batches,
                          stage=args.stage)
    print(json.dumps(res))
    ratio = f" ({res['init'] / res['final']:.0f}x lower)" if res["final"] > 0 else ""
    print(f"KL(teacher || student) per target token over {res['batches']} batches of stage "
          f"{res['stage']!r}: {res['init']:.4g} as built from the teacher -> {res['final']:.4g} "
          f"at step {res['step']}{ratio}")


if __name__ == "__main__":
    main()
