"""Hugging Face export: `hj.save_pretrained(model, out_dir, tokenizer=None)`.

Writes config.json, safetensors shards of at most `max_shard_size` bytes (with
model.safetensors.index.json when there is more than one), generation_config.json and the
tokenizer. Everything is written into a temporary sibling directory that is renamed onto
`out_dir` at the end, so a failure never leaves a half-written model.

Layouts: teacher-shaped models are written as plain Qwen3, students as "hybrid_qwen3"
(convert/hybrid_hf.py), and students whose KDA layers use the seed paper's options (identity
conv activation, conv / gate biases, GQA, no output norm) as "efficient_qwen"
(convert/efficient_qwen.py); `layout=` picks one by name.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from hybrid_jax.convert.hf_import import EXPORT_FORMATS, hf_key_map

MAX_SHARD_SIZE = 5 * 10**9  # bytes, as transformers' default "5GB"


def _hf_format(model, layout: str | None):
    """(config.json dict, extra files, key map): the format named `layout`, else the first registered format
    that applies, else Qwen3's."""
    if layout is not None:
        named = {f.name: f for f in EXPORT_FORMATS if f.name}
        if layout not in named:
            raise ValueError(f"save_pretrained: layout={layout!r} is unknown; use None (chosen from the model) or "
                             f"one of {sorted(named)}")
        fmt = named[layout]
    else:
        fmt = next((f for f in EXPORT_FORMATS if f.applies(model)), None)
    if fmt is not None:
        return fmt.config(model), fmt.files(), (fmt.key_map or hf_key_map)(model)
    to_hf = getattr(model.config, "to_hf", None)
    if to_hf is None:
        raise TypeError(f"save_pretrained: {type(model.config).__name__} has no to_hf(); cannot write config.json")
    return to_hf(), {}, hf_key_map(model)


def plan_shards(sizes: dict[str, int], max_shard_size: int) -> list[list[str]]:
    """Greedy, in key order: a new shard starts when the next tensor would overflow the current one."""
    shards, current, used = [], [], 0
    for key, size in sizes.items():
        if current and used + size > max_shard_size:
            shards.append(current)
            current, used = [], 0
        current.append(key)
        used += size
    if current:
        shards.append(current)
    return shards


def save_pretrained(model, out_dir, tokenizer=None, *, dtype: str | None = None,
                    max_shard_size: int = MAX_SHARD_SIZE, layout: str | None = None) -> Path:
    """Export `model` to an HF directory loadable by `transformers.AutoModelForCausalLM.from_pretrained`
    (the "efficient_qwen" layout: by the seed paper's own `gen_distill` package).

    dtype: tensor dtype in the files (default: the model's param_dtype).
    layout: None (chosen from the model: "qwen3", "hybrid_qwen3" or "efficient_qwen"), "hybrid_qwen3" or
      "efficient_qwen"; a layout that cannot hold the model raises naming the layer and setting.
    """
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    config, extra_files, table = _hf_format(model, layout)
    dtype = dtype or model.config.param_dtype
    config["torch_dtype"] = dtype
    # Tensors stored in the model's param_dtype are written in `dtype`; parameters a layer always keeps
    # in float32 (KDA's A_log / dt_bias, the TTT memory's fast weights and biases) stay float32.
    model_pdt = jnp.dtype(model.config.param_dtype)
    out_dtype = {k: jnp.dtype(dtype) if var.dtype == model_pdt else jnp.dtype(var.dtype) for k, (var, _) in table.items()}
    sizes = {k: math.prod(var.shape) * out_dtype[k].itemsize for k, (var, _) in table.items()}
    shards = plan_shards(sizes, max_shard_size)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        weight_map = {}
        for name, keys in zip(names, shards, strict=True):
            # Only one shard's tensors are converted and held at a time.
            tensors = {k: np.ascontiguousarray(table[k][1].to_hf(np.asarray(table[k][0][...]).astype(out_dtype[k])))
                       for k in keys}
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(keys, name))
            del tensors
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name, data in extra_files.items():
            (tmp / name).write_bytes(data)
        gen = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(model.generation_config).items()}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _replace_dir(new: Path, target: Path) -> None:
    """Rename `new` onto `target`; an existing `target` is moved aside first and removed after."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
