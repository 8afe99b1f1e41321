"""Export a trained student (or any model) as a Hugging Face directory: `python -m hybrid_jax.export --checkpoint=DIR --out=HF_DIR`.

`--checkpoint` is either

* a distillation workdir (what `python -m hybrid_jax.distill --workdir=DIR` writes): the student's structure
  comes from DIR/student_config.json, its weights from the latest (or `--step`) checkpoint in
  DIR/checkpoints, the tokenizer from DIR/tokenizer; or
* a Hugging Face directory (config.json + safetensors), re-exported (e.g. to another dtype or shard size).

Students are written in the "hybrid_qwen3" format (docs/export.md): loadable by `hj.load_pretrained` and by
`transformers.AutoModelForCausalLM.from_pretrained(HF_DIR, trust_remote_code=True)`. `--layout=efficient_qwen`
writes the seed paper's released layout instead (loadable by its `gen_distill` package and by
`hj.load_pretrained`); models only that layout holds (e.g. an imported efficient_qwen checkpoint) get it by
default. The output directory is written atomically (a temporary directory renamed at the end).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def load_workdir_student(workdir, step: int | None = None):
    """(student with the checkpoint's weights, step) from a distillation workdir."""
    import jax
    from flax import nnx

    from hybrid_jax.distill.checkpoint import Checkpointer
    from hybrid_jax.distill.trainer import FlatParams
    from hybrid_jax.models.hybrid import build_student_from_config

    workdir = Path(workdir)
    cfg_path = workdir / "student_config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"export: {cfg_path} is not valid JSON ({e})") from e
    ckpt_dir = workdir / "checkpoints"
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"export: {workdir} has student_config.json but no checkpoints/ directory; "
                                "train first (python -m hybrid_jax.distill --workdir=...)")
    ckpt = Checkpointer(str(ckpt_dir), async_save=False)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"export: {ckpt_dir} holds no checkpoint yet")
        if step is None:
            step = ckpt.latest_step()
        elif step not in steps:
            raise ValueError(f"export: --step={step} is not in {ckpt_dir}; saved steps: {sorted(steps)}")
        # Built abstractly (no random init): the checkpoint supplies every parameter.
        abstract = nnx.eval_shape(lambda: build_student_from_config(cfg))
        graphdef, p_state, rest = nnx.split(abstract, nnx.Param, ...)
        if jax.tree.leaves(rest):
            raise ValueError(f"export: the student of {cfg_path} holds non-parameter state; it cannot be restored "
                             "from a parameter checkpoint")
        flat = FlatParams(p_state)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        like = {p: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device) for p, v in flat.values.items()}
        params, _, _ = ckpt.restore(step, like)
    finally:
        ckpt.close()
    return nnx.merge(graphdef, flat.unflatten(params), rest), step


def export(checkpoint, out, *, step: int | None = None, dtype: str | None = None,
           max_shard_size: int | None = None, layout: str | None = None, print_fn=print) -> Path:
    """Write the HF directory `out` from a distillation workdir or an HF directory; returns `out`.

    layout: None (chosen from the model), "hybrid_qwen3" or "efficient_qwen" (see `hj.save_pretrained`).
    """
    import hybrid_jax as hj
    from hybrid_jax.convert.hf_export import MAX_SHARD_SIZE
    from hybrid_jax.convert.hf_import import load_tokenizer

    src = Path(checkpoint)
    if not src.is_dir():
        raise FileNotFoundError(f"export: --checkpoint {str(src)!r} is not a directory; give a distillation "
                                "workdir or a Hugging Face directory")
    if os.path.abspath(src) == os.path.abspath(out):
        raise ValueError(f"export: --out must differ from --checkpoint ({src})")
    if (src / "student_config.json").is_file():
        model, step = load_workdir_student(src, step)
        tok_dir = src / "tokenizer"
        tokenizer = load_tokenizer(tok_dir) if tok_dir.is_dir() else None
        origin = f"{src} (checkpoint step {step})"
    elif (src / "config.json").is_file():
        if step is not None:
            raise ValueError("export: --step applies to a distillation workdir, not to a Hugging Face directory")
        model, tokenizer, origin = hj.load_pretrained(src), load_tokenizer(src), str(src)
    else:
        raise FileNotFoundError(f"export: {src} holds neither student_config.json (a distillation workdir) nor "
                                "config.json (a Hugging Face directory)")
    if tokenizer is None:
        print_fn(f"export: no tokenizer found beside {src}; the directory is written without one")
    path = hj.save_pretrained(model, out, tokenizer=tokenizer, dtype=dtype,
                              max_shard_size=max_shard_size or MAX_SHARD_SIZE, layout=layout)
    print_fn(f"exported {origin} -> {path}")
    return path


def main(argv):
    from absl import flags

    del argv
    f = flags.FLAGS
    export(f.checkpoint, f.out, step=f.step, dtype=f.dtype, max_shard_size=f.max_shard_size,
           layout=None if f.layout == "auto" else f.layout)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("checkpoint", None, "Distillation workdir or Hugging Face directory.", required=True)
    flags.DEFINE_string("out", None, "Output Hugging Face directory (replaced atomically).", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: the latest).")
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Tensor dtype in the files "
                      "(default: the model's parameter dtype).")
    flags.DEFINE_integer("max_shard_size", None, "Bytes per safetensors shard (default 5e9).")
    flags.DEFINE_enum("layout", "auto", ["auto", "hybrid_qwen3", "efficient_qwen"], "Directory layout: auto "
                      "(Qwen3 for all-attention models, hybrid_qwen3 for students, efficient_qwen for models only it "
                      "holds) or one by name; efficient_qwen is the seed paper's released layout.")
    app.run(main)
