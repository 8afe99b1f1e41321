"""Train a Qwen3 teacher from scratch: `python -m hybrid_jax.pretrain --config=configs/teacher_micro.py --workdir=DIR`.

Where no pretrained weights can be downloaded, distillation still needs a teacher that knows
something a student can lose. This entry point trains one on the micro-world (or any data the
`data` section names) with the trainer's `sft` stages, saves it as a Hugging Face directory
(DIR/export), and scores it on the micro-world questions (DIR/eval). Rerunning the same
command on the same workdir resumes.

`cached_teacher("configs/teacher_micro.py")` is what `hybrid_jax.distill` calls when
`teacher.path` is empty and `teacher.build` names a pretraining config: it trains the teacher
once into a cache directory keyed by the config's contents and reuses it afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path

import jax
from flax import nnx

from hybrid_jax.config import ConfigError, resolved_stage, stage_names, validate_config
from hybrid_jax.models.qwen3 import Qwen3, Qwen3Config

log = logging.getLogger(__name__)

GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def load_config_file(path: str):
    """`get_config()` of a Python config file (what `--config=path` loads)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"_hybrid_jax_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def run_tokenizer(config):
    """The tokenizer a run trains with: `tokenizer.path`, or the micro-world's (cached)."""
    from hybrid_jax.data.tokenizer import load_tokenizer, micro_tokenizer

    if config.tokenizer.path:
        return load_tokenizer(config.tokenizer.path)
    return micro_tokenizer(world=config.data.world or "default", vocab_size=config.tokenizer.vocab_size)


def model_config(config, tokenizer) -> Qwen3Config:
    """The Qwen3 shape of `config.model`, with the tokenizer's vocabulary and special tokens."""
    m = config.model
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads, head_dim=m.head_dim,
        max_position_embeddings=m.max_position_embeddings, rope_theta=m.rope_theta,
        tie_word_embeddings=m.tie_word_embeddings, bos_token_id=None, eos_token_id=eos, pad_token_id=pad,
        dtype=config.train.compute_dtype, param_dtype=config.train.param_dtype, remat=config.train.remat)


def pretrain(config, workdir: str, *, print_fn=print) -> str:
    """Train, export to WORKDIR/export, evaluate into WORKDIR/eval; returns the export path."""
    import hybrid_jax as hj
    from hybrid_jax.distill.trainer import Trainer, pipeline_data_fn
    from hybrid_jax.eval.report import evaluate_models, write_report

    validate_config(config)
    for name in stage_names(config):
        if resolved_stage(config, name).type != "sft":
            raise ConfigError(f"pretrain: stage {name!r} is {config.stages[name].type!r}; pretraining has no teacher, "
                              "so every stage must be type 'sft'")
    tokenizer = run_tokenizer(config)
    cfg = model_config(config, tokenizer)
    model = Qwen3(cfg, rngs=nnx.Rngs(config.seed))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
    print_fn(f"pretraining a {n_params / 1e6:.2f}M-parameter Qwen3 ({cfg.num_hidden_layers} layers, hidden "
             f"{cfg.hidden_size}, vocab {cfg.vocab_size}) in {workdir}")
    Trainer(config, model, data_fn=pipeline_data_fn(config, tokenizer), workdir=workdir, print_fn=print_fn).run()
    export = os.path.join(workdir, "export")
    hj.save_pretrained(model, export, tokenizer=tokenizer)
    print_fn(f"saved the teacher as a Hugging Face checkpoint: {export}")
    if config.eval.enabled:
        results = evaluate_models({"teacher": model}, tokenizer, config.eval, log=print_fn)
        paths = write_report(results, os.path.join(workdir, "eval"))
        print_fn(results["table"])
        print_fn(f"evaluation written to {paths['markdown']}")
    return export


def _cache_root() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hybrid_jax")


def cached_teacher(config_path: str, *, cache_root: str | None = None, print_fn=print) -> str:
    """The HF directory of the teacher that `config_path` trains, trained on first use."""
    from hybrid_jax.data import microworld

    config = load_config_file(config_path)
    # The micro-world's fingerprint joins the key: a changed generator means a new teacher.
    world = microworld.WorldConfig.from_dict(config.data.world or "default").fingerprint()
    key = hashlib.sha256((config.to_json(sort_keys=True) + world).encode()).hexdigest()[:12]
    workdir = os.path.join(cache_root or _cache_root(), f"teacher-{Path(config_path).stem}-{key}")
    export = os.path.join(workdir, "export")
    if os.path.exists(os.path.join(export, "config.json")):
        print_fn(f"using the cached teacher {export} (built earlier from {config_path})")
        return export
    print_fn(f"no teacher at teacher.path: training one from {config_path} into {workdir} "
             "(first use; cached for later runs)")
    return pretrain(config, workdir, print_fn=print_fn)


def main(argv):
    from absl import flags
    from absl import logging as absl_logging

    del argv
    if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint file at INFO
        absl_logging.set_verbosity(absl_logging.WARNING)
    pretrain(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/teacher_micro.py", "Pretraining configuration file.")
    flags.DEFINE_string("workdir", None, "Output directory (checkpoints, metrics, export, eval).", required=True)
    app.run(main)
