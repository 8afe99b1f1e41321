"""Train a Qwen3 teacher from scratch: `python -m hybrid_jax.pretrain --config=configs/teacher_micro.py --workdir=DIR`.

Where no pretrained weights can be downloaded, distillation still needs a teacher that knows
something a student can lose. This entry point trains one on the micro-world (or any data the
`data` section names) with the trainer's `sft` stages, saves it as a Hugging Face directory
(DIR/export), and scores it on the micro-world questions (DIR/eval) of the world it trained
on. DIR/pretrain_results.json records the model's size, the FLOPs per token, the measured
training throughput (tokens/s, model FLOP/s, MFU against the device's peak), the time of
each phase and the evaluation's accuracies. Rerunning the same command on the same workdir
resumes.

`cached_teacher("configs/teacher_micro.py")` is what `hybrid_jax.distill` calls when
`teacher.path` is empty and `teacher.build` names a pretraining config: it trains the teacher
once into a cache directory keyed by the config's contents and reuses it afterwards.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.util
import json
import logging
import os
import time
from pathlib import Path

import jax
import numpy as np
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
    from hybrid_jax.data import microworld
    from hybrid_jax.data.tokenizer import load_tokenizer, micro_tokenizer

    if config.tokenizer.path:
        return load_tokenizer(config.tokenizer.path)
    return micro_tokenizer(world=microworld.data_world(config.data), vocab_size=config.tokenizer.vocab_size)


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


def flops_per_token(cfg: Qwen3Config, seq_len: int) -> dict:
    """Training FLOPs per token position of a Qwen3 step (forward + backward = 3x forward).

    dense: 6 x the parameters that multiply activations (q/k/v/o, gate/up/down of every layer,
    and the LM head; the input embedding is a lookup, so an untied embedding table is not
    counted — tied, it is counted once, as the head). attention: QK^T and PV over a causal row
    of `seq_len` positions, i.e. seq_len / 2 keys per query on average, 2 FLOPs per
    multiply-add and 3x for the backward: 6 * layers * q_heads * head_dim * seq_len. Packed
    documents are masked inside the row, so this counts the causal work of a full row
    (flash kernels that skip only causally masked blocks do about this much).
    """
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * cfg.intermediate_size
    matmul_params = layers * per_layer + cfg.vocab_size * d
    dense = 6 * matmul_params
    attention = 6 * layers * q * seq_len
    return {"matmul_params": matmul_params, "dense": dense, "attention": attention, "total": dense + attention}


# Dense bf16 peak FLOP/s by device kind (vendors' datasheets, without sparsity); the first
# entry whose name is in `device_kind` wins, so more specific names come first.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.4e12), ("H200", 989.4e12),
    ("A100", 312e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v6 lite", 918e12),
)


def peak_flops(device_kind: str) -> float | None:
    """The dense bf16 peak of one device of this kind, or None when unknown (CPUs)."""
    for name, flops in PEAK_BF16_FLOPS:
        if name.lower() in device_kind.lower():
            return flops
    return None


class StepClock:
    """Times training steps from the data side, without touching the trainer.

    `wrap(data_fn)` returns a data_fn whose iterators note when each batch is asked for, how
    long the pipeline took to hand it over, and its real (non-padding) and total token
    counts. The trainer brings every step's metrics to the host before it asks for the next
    batch, so the time between two requests is one whole step (data wait, host work and
    device compute). The last iterator made for a stage is the one it trained from (the
    trainer first opens one to check a batch).
    """

    def __init__(self):
        self.stages: dict[str, tuple] = {}  # name -> (resolved stage config, records)

    def wrap(self, data_fn):
        def timed_data_fn(stage):
            records: list[tuple[float, float, int, int]] = []
            self.stages[stage.name] = (stage, records)
            return _TimedIterator(data_fn(stage), records)

        return timed_data_fn


class _TimedIterator:
    def __init__(self, it, records):
        self._it, self._records = it, records

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        batch = next(self._it)
        seg = np.asarray(batch["segment_ids"])
        self._records.append((t0, time.perf_counter() - t0, int(np.sum(seg > 0)), int(seg.size)))
        return batch

    def __getattr__(self, name):  # get_state, set_state, close, stats: the wrapped iterator's
        return getattr(self._it, name)


def step_throughput(records, flops_per_token: float, *, peak: float | None = None, n_devices: int = 1,
                    hosts: int = 1, skip_frac: float = 0.1) -> dict:
    """Steady-state rates from `StepClock` records [(t_request, wait_s, real_tokens, tokens)].

    The first `skip_frac` of the steps (at least the first, which compiles) is left out; the
    window ends at the last request, so the last step (whose end is not seen) is left out too.
    `tokens` counts every position of a batch (what the device computes), `real` only
    non-padding ones; both are per host, times `hosts`. MFU is the model FLOP rate over
    `n_devices` x `peak`.
    """
    n = len(records)
    out: dict = {"steps_timed": 0, "first_step_s": records[1][0] - records[0][0] if n >= 2 else None}
    if n < 3:
        return out
    skip = min(max(1, int(n * skip_frac)), n - 2)
    window = records[skip:]
    done = window[:-1]
    seconds = window[-1][0] - window[0][0]
    tokens = hosts * sum(r[3] for r in done)
    real = hosts * sum(r[2] for r in done)
    wait = sum(r[1] for r in done)
    flops = tokens * flops_per_token / seconds
    out.update(steps_timed=len(done), first_timed_step=skip + 1, seconds=seconds, step_s=seconds / len(done),
               tokens_per_s=tokens / seconds, real_tokens_per_s=real / seconds, model_flops_per_s=flops,
               data_wait_s=wait, data_wait_frac=wait / seconds,
               mfu=flops / (n_devices * peak) if peak else None)
    return out


def _write_json(path: str, obj) -> None:
    if jax.process_index():
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def pretrain(config, workdir: str, *, print_fn=print, peak_flops_per_device: float | None = None) -> str:
    """Train, export to WORKDIR/export, evaluate into WORKDIR/eval; returns the export path.

    WORKDIR/pretrain_results.json gets the model's size, FLOPs per token, measured throughput
    and MFU per stage, the phases' wall times and (after evaluation) the accuracies; it is
    written right after training and again after evaluation. `peak_flops_per_device`
    overrides the datasheet peak looked up from the device kind (`PEAK_BF16_FLOPS`).
    """
    import hybrid_jax as hj
    from hybrid_jax.data import microworld
    from hybrid_jax.distill.trainer import Trainer, pipeline_data_fn
    from hybrid_jax.eval.report import evaluate_models, write_report

    t_start = time.perf_counter()
    validate_config(config)
    for name in stage_names(config):
        if resolved_stage(config, name).type != "sft":
            raise ConfigError(f"pretrain: stage {name!r} is {config.stages[name].type!r}; pretraining has no teacher, "
                              "so every stage must be type 'sft'")
    world = microworld.data_world(config.data)  # the teacher is evaluated on the world it learns
    tokenizer = run_tokenizer(config)
    cfg = model_config(config, tokenizer)
    model = Qwen3(cfg, rngs=nnx.Rngs(config.seed))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
    print_fn(f"pretraining a {n_params / 1e6:.2f}M-parameter Qwen3 ({cfg.num_hidden_layers} layers, hidden "
             f"{cfg.hidden_size}, vocab {cfg.vocab_size}) in {workdir}")
    for name in stage_names(config):
        st = resolved_stage(config, name)
        fpt, positions = flops_per_token(cfg, st.seq_len), st.steps * st.batch_size * st.seq_len
        print_fn(f"stage {name!r}: {st.steps} steps x {st.batch_size} x {st.seq_len} = {positions / 1e6:.1f}M token "
                 f"positions at {fpt['total'] / 1e6:.1f} MFLOP each (dense {fpt['dense'] / 1e6:.1f} + causal "
                 f"attention {fpt['attention'] / 1e6:.1f}) = {positions * fpt['total'] / 1e15:.2f} PFLOP")
    device = jax.devices()[0]
    peak = peak_flops_per_device or peak_flops(device.device_kind)
    results_path = os.path.join(workdir, "pretrain_results.json")
    results = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_kind": device.device_kind, "device_count": jax.device_count(), "jax_version": jax.__version__,
        "peak_flops_per_device": peak,
        "peak_source": "given" if peak_flops_per_device else ("datasheet dense bf16" if peak else "unknown device"),
        "model": {"parameters": int(n_params), "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
                  "intermediate_size": cfg.intermediate_size, "attention_heads": cfg.num_attention_heads,
                  "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
                  "tie_word_embeddings": cfg.tie_word_embeddings, "compute_dtype": cfg.dtype,
                  "param_dtype": cfg.param_dtype},
        "world": {**dataclasses.asdict(world), "fingerprint": world.fingerprint()},
        "seconds": {"setup": time.perf_counter() - t_start},
    }

    clock = StepClock()
    t0 = time.perf_counter()
    summary = Trainer(config, model, data_fn=clock.wrap(pipeline_data_fn(config, tokenizer)), workdir=workdir,
                      print_fn=print_fn).run()
    results["seconds"]["train"] = time.perf_counter() - t0
    results["train"] = summary
    results["throughput"] = {}
    for name, (stage, records) in clock.stages.items():
        fpt = flops_per_token(cfg, stage.seq_len)
        rates = step_throughput(records, fpt["total"], peak=peak, n_devices=jax.device_count(),
                                hosts=jax.process_count())
        results["throughput"][name] = {"batch_size": stage.batch_size, "seq_len": stage.seq_len,
                                       "steps_run": len(records), "flops_per_token": fpt, **rates}
        print_fn(_throughput_line(name, rates, fpt, device.device_kind, peak))
    _write_json(results_path, results)

    t0 = time.perf_counter()
    export = os.path.join(workdir, "export")
    hj.save_pretrained(model, export, tokenizer=tokenizer)
    results["seconds"]["export"] = time.perf_counter() - t0
    print_fn(f"saved the teacher as a Hugging Face checkpoint: {export}")
    if config.eval.enabled:
        t0 = time.perf_counter()
        evaluation = evaluate_models({"teacher": model}, tokenizer, config.eval, world=world,
                                     log=print_fn)
        paths = write_report(evaluation, os.path.join(workdir, "eval"))
        results["seconds"]["eval"] = time.perf_counter() - t0
        results["eval"] = evaluation["qa"]["teacher"]
        print_fn(evaluation["table"])
        print_fn(f"evaluation written to {paths['markdown']}")
    results["seconds"]["total"] = time.perf_counter() - t_start
    _write_json(results_path, results)
    print_fn(f"results (throughput, timings, accuracy) written to {results_path}")
    return export


def _throughput_line(name, rates, fpt, device_kind, peak) -> str:
    if not rates["steps_timed"]:
        return f"throughput of stage {name!r}: too few steps to time (need 3 or more)"
    mfu = (f"{100 * rates['mfu']:.1f}% MFU of {device_kind} at {peak / 1e12:.0f} TFLOP/s" if rates["mfu"] is not None
           else f"no MFU: unknown peak for {device_kind!r} (pass --peak_tflops)")
    return (f"throughput of stage {name!r} over steps {rates['first_timed_step']}-"
            f"{rates['first_timed_step'] + rates['steps_timed'] - 1}: {rates['tokens_per_s']:,.0f} tokens/s "
            f"({rates['real_tokens_per_s']:,.0f} non-padding), {rates['step_s'] * 1e3:.1f} ms/step, "
            f"{fpt['total'] / 1e6:.1f} MFLOP/token -> {rates['model_flops_per_s'] / 1e12:.1f} TFLOP/s, {mfu}; "
            f"first step (compile) {rates['first_step_s']:.1f} s; waited for data {100 * rates['data_wait_frac']:.1f}%")


def _cache_root() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hybrid_jax")


def cached_teacher(config_path: str, *, cache_root: str | None = None, print_fn=print) -> str:
    """The HF directory of the teacher that `config_path` trains, trained on first use."""
    from hybrid_jax.data import microworld

    config = load_config_file(config_path)
    # The micro-world's fingerprint joins the key: a changed generator means a new teacher.
    world = microworld.data_world(config.data).fingerprint()
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
    peak = flags.FLAGS.peak_tflops * 1e12 if flags.FLAGS.peak_tflops > 0 else None
    pretrain(flags.FLAGS.config, flags.FLAGS.workdir, peak_flops_per_device=peak)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/teacher_micro.py", "Pretraining configuration file.")
    flags.DEFINE_string("workdir", None, "Output directory (checkpoints, metrics, export, eval).", required=True)
    flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s of one device for the MFU figure; 0 looks the device "
                       "kind up in PEAK_BF16_FLOPS (dense bf16 datasheet values).")
    app.run(main)
