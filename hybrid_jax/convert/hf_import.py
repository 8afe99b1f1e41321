"""Hugging Face checkpoint import: `hj.load_pretrained(path_or_hub_id, dtype="float32")`.

A local directory (config.json, model.safetensors or model.safetensors.index.json + shards,
optional tokenizer files and generation_config.json) or a Hub id when the network allows.
The model is built abstractly (no random init) and every tensor is streamed into its parameter
one at a time through a key-mapping table, so peak host memory stays near one model copy.

Extending: `register_model_type` adds a config class + builder for a new `model_type`, and
`register_mixer_keys` maps a new mixer class's parameters to HF keys; export uses the same table.
A layout with other key names (the seed paper's "efficient_qwen", convert/efficient_qwen.py) gives
its ModelType / ExportFormat its own `key_map`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from hybrid_jax.layers.attention import Attention
from hybrid_jax.models.qwen3 import DecoderLM, Qwen3Config


class CheckpointError(ValueError):
    """A checkpoint that does not match what the model expects (keys, shapes, dtypes, format)."""


# --- key-mapping table -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Copy:
    """Same layout in HF and here (embeddings, norm weights)."""

    def hf_shape(self, shape):
        return tuple(shape)

    def to_jax(self, x, shape):
        return x

    def to_hf(self, x):
        return x


@dataclasses.dataclass(frozen=True)
class Linear:
    """torch Linear weight [out, in] <-> kernel [*in_dims, *out_dims] with `n_in` leading input dims."""

    n_in: int = 1

    def hf_shape(self, shape):
        return (math.prod(shape[self.n_in:]), math.prod(shape[: self.n_in]))

    def to_jax(self, x, shape):
        return x.T.reshape(shape)

    def to_hf(self, x):
        return x.reshape(math.prod(x.shape[: self.n_in]), -1).T


@dataclasses.dataclass(frozen=True)
class Flatten:
    """A flat HF vector (bias [H*hd]) <-> a multi-dim parameter ([H, hd])."""

    def hf_shape(self, shape):
        return (math.prod(shape),)

    def to_jax(self, x, shape):
        return x.reshape(shape)

    def to_hf(self, x):
        return x.reshape(-1)


KeyMap = dict[str, tuple[nnx.Variable, Any]]  # HF key -> (parameter, transform)
_MIXER_KEYS: dict[type, Callable[[nnx.Module, str], KeyMap]] = {}


def register_mixer_keys(mixer_cls: type, fn: Callable[[nnx.Module, str], KeyMap]) -> None:
    """`fn(mixer, layer_prefix)` returns the HF keys of one mixer, e.g. 'model.layers.3.self_attn.q_proj.weight'."""
    _MIXER_KEYS[mixer_cls] = fn


def _attention_keys(m: Attention, prefix: str) -> KeyMap:
    p = prefix + "self_attn."
    keys = {p + "q_proj.weight": (m.q_proj, Linear(1)), p + "k_proj.weight": (m.k_proj, Linear(1)),
            p + "v_proj.weight": (m.v_proj, Linear(1)), p + "o_proj.weight": (m.o_proj, Linear(2))}
    if m.q_bias is not None:
        keys.update({p + "q_proj.bias": (m.q_bias, Flatten()), p + "k_proj.bias": (m.k_bias, Flatten()),
                     p + "v_proj.bias": (m.v_bias, Flatten()), p + "o_proj.bias": (m.o_bias, Copy())})
    if m.q_norm is not None:
        keys.update({p + "q_norm.weight": (m.q_norm.weight, Copy()), p + "k_norm.weight": (m.k_norm.weight, Copy())})
    return keys


register_mixer_keys(Attention, _attention_keys)


def hf_key_map(model: DecoderLM, mixer_keys: Mapping[type, Callable[[nnx.Module, str], KeyMap]] | None = None,
               layout: str | None = None) -> KeyMap:
    """Every parameter of a DecoderLM with its HF key and layout transform.

    mixer_keys: per mixer class, its keys in another layout (named `layout` in errors); default: the
    registered hybrid_qwen3 / Qwen3 table. Embeddings, MLPs, norms and lm_head are the same in every layout.
    """
    keys: KeyMap = {"model.embed_tokens.weight": (model.embed, Copy())}
    for i, block in enumerate(model.blocks):
        prefix = f"model.layers.{i}."
        fn = (_MIXER_KEYS if mixer_keys is None else mixer_keys).get(type(block.mixer))
        if fn is None and mixer_keys is not None:
            raise CheckpointError(f"layer {i}: the {layout} layout has no keys for a {type(block.mixer).__name__} "
                                  f"mixer; it holds {', '.join(sorted(c.__name__ for c in mixer_keys))} layers only")
        if fn is None:
            raise CheckpointError(f"layer {i}: no HF key mapping for mixer {type(block.mixer).__name__}; "
                                  "register one with hybrid_jax.convert.hf_import.register_mixer_keys")
        keys.update(fn(block.mixer, prefix))
        mlp = block.mlp
        keys.update({prefix + "mlp.gate_proj.weight": (mlp.gate, Linear(1)),
                     prefix + "mlp.up_proj.weight": (mlp.up, Linear(1)),
                     prefix + "mlp.down_proj.weight": (mlp.down, Linear(1)),
                     prefix + "input_layernorm.weight": (block.input_norm.weight, Copy()),
                     prefix + "post_attention_layernorm.weight": (block.post_attention_norm.weight, Copy())})
    keys["model.norm.weight"] = (model.norm.weight, Copy())
    if model.lm_head is not None:
        keys["lm_head.weight"] = (model.lm_head, Linear(1))
    return keys


# --- model types -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelType:
    config_from_hf: Callable[..., Any]  # (config.json dict, dtype=..., param_dtype=...) -> config
    build: Callable[..., nnx.Module]  # (config, rngs=..., generation_config=...) -> model
    ignorable_keys: Callable[[Any], set[str]] = lambda config: set()
    key_map: Callable[[nnx.Module], KeyMap] | None = None  # None: hf_key_map


MODEL_TYPES: dict[str, ModelType] = {}


def register_model_type(model_type: str, spec: ModelType) -> None:
    MODEL_TYPES[model_type] = spec


@dataclasses.dataclass(frozen=True)
class ExportFormat:
    """How `save_pretrained` writes a model that `applies(model)` (default: Qwen3's `config.to_hf()`).

    `save_pretrained(..., layout=name)` picks a format by name whether or not it applies; its `config`
    then raises when the model cannot be written in that layout.
    """

    applies: Callable[[nnx.Module], bool]
    config: Callable[[nnx.Module], dict]  # the config.json dict
    files: Callable[[], dict[str, bytes]] = dict  # extra files (e.g. remote-code modeling files)
    name: str | None = None  # the `layout=` name
    key_map: Callable[[nnx.Module], KeyMap] | None = None  # None: hf_key_map


EXPORT_FORMATS: list[ExportFormat] = []


def register_export_format(fmt: ExportFormat) -> None:
    """Formats are tried in registration order; the first that applies writes the directory."""
    EXPORT_FORMATS.append(fmt)


register_model_type("qwen3", ModelType(
    config_from_hf=Qwen3Config.from_hf,
    build=lambda config, **kw: DecoderLM(config, **kw),
    # Some tied checkpoints still store a copy of the embeddings as lm_head; transformers ignores it too.
    ignorable_keys=lambda config: {"lm_head.weight"} if config.tie_word_embeddings else set(),
))


# --- files -------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_checkpoint(path_or_hub_id: str | os.PathLike) -> Path:
    """A local directory, or a Hub snapshot downloaded when `path_or_hub_id` looks like 'org/name'."""
    p = Path(path_or_hub_id)
    if p.is_dir():
        return p
    if p.exists():
        raise FileNotFoundError(f"load_pretrained: {p} is a file; pass the checkpoint directory that holds config.json")
    if not _HUB_ID.match(str(path_or_hub_id)):
        raise FileNotFoundError(f"load_pretrained: no such directory {p}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path_or_hub_id), allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "vocab*", "merges.txt"]))
    except Exception as e:  # network, auth or a wrong id: one message naming both readings
        raise FileNotFoundError(f"load_pretrained: {path_or_hub_id!r} is not a local directory and downloading it "
                                f"from the Hugging Face Hub failed: {type(e).__name__}: {e}") from e


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"load_pretrained: missing {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"load_pretrained: {path} is not valid JSON ({e})") from e


def weight_files(root: Path) -> dict[str, Path]:
    """HF key -> the safetensors file that holds it (single file or sharded index)."""
    index = root / "model.safetensors.index.json"
    single = root / "model.safetensors"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"load_pretrained: {index} has no 'weight_map' object")
        out = {}
        for key, name in weight_map.items():
            f = root / name
            if not f.is_file():
                raise FileNotFoundError(f"load_pretrained: shard {f} listed in {index.name} for key {key!r} is missing")
            out[key] = f
        return out
    if single.is_file():
        return {key: single for key in _safetensors_keys(single)}
    hint = " (PyTorch .bin weights are not read; re-save them with safe_serialization=True)" if any(
        root.glob("pytorch_model*.bin")) else ""
    raise FileNotFoundError(f"load_pretrained: {root} has neither model.safetensors nor "
                            f"model.safetensors.index.json{hint}")


def _open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="numpy")
    except Exception as e:
        raise CheckpointError(f"load_pretrained: cannot read safetensors file {path}: corrupt or not safetensors "
                              f"({type(e).__name__}: {e})") from e


def _safetensors_keys(path: Path) -> list[str]:
    with _open(path) as f:
        return list(f.keys())


def load_tokenizer(path_or_hub_id):
    """The checkpoint's tokenizer (transformers AutoTokenizer), or None when it has no tokenizer files."""
    root = resolve_checkpoint(path_or_hub_id)
    if not any((root / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(root))


def load_pretrained(path_or_hub_id, dtype: str = "float32", param_dtype: str | None = None, *,
                    sharding: Callable[[nnx.Variable], jax.sharding.Sharding] | None = None, **config_overrides):
    """Build the model named by config.json's model_type and stream its safetensors weights into it.

    dtype: compute dtype; param_dtype: storage dtype (default: dtype). `sharding(param)` may return a
    sharding for each parameter (from its logical axes) so tensors land sharded as they stream in.
    """
    root = resolve_checkpoint(path_or_hub_id)
    cfg = read_json(root / "config.json")
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"load_pretrained: {root / 'config.json'} has model_type {model_type!r}; "
                              f"supported model types: {sorted(MODEL_TYPES)}")
    spec = MODEL_TYPES[model_type]
    config = spec.config_from_hf(cfg, dtype=dtype, param_dtype=param_dtype or dtype, **config_overrides)
    gen_path = root / "generation_config.json"
    gen = read_json(gen_path) if gen_path.is_file() else None
    model = nnx.eval_shape(lambda: spec.build(config, rngs=nnx.Rngs(0), generation_config=_gen_config(config, gen)))

    table = (spec.key_map or hf_key_map)(model)
    files = weight_files(root)
    ignorable = spec.ignorable_keys(config)
    unexpected = sorted(k for k in files if k not in table and k not in ignorable)
    if unexpected:
        raise CheckpointError(f"load_pretrained: unexpected keys in {root} ({len(unexpected)}), e.g. "
                              f"{unexpected[:5]} in {files[unexpected[0]].name}; they match no parameter of a "
                              f"{model_type} model with this config.json")
    missing = sorted(k for k in table if k not in files)
    if missing:
        raise CheckpointError(f"load_pretrained: missing keys in {root} ({len(missing)}), e.g. {missing[:5]}; "
                              f"a {model_type} model with this config.json needs them")

    by_file: dict[Path, list[str]] = {}
    for key, f in files.items():
        if key in table:
            by_file.setdefault(f, []).append(key)
    for f, keys in by_file.items():
        with _open(f) as reader:
            for key in keys:
                var, tf = table[key]
                _load_one(reader, f, key, var, tf, sharding)
    return model


def _load_one(reader, file: Path, key: str, var: nnx.Variable, tf, sharding) -> None:
    shape, dtype = var.shape, var.dtype
    sl = reader.get_slice(key)
    got_shape = tuple(sl.get_shape())
    want = tf.hf_shape(shape)
    if got_shape != want:
        raise CheckpointError(f"load_pretrained: {key} in {file.name} has shape {got_shape}, expected {want}")
    got_dtype = sl.get_dtype()
    if got_dtype not in ("F32", "F16", "BF16", "F64"):
        raise CheckpointError(f"load_pretrained: {key} in {file.name} has dtype {got_dtype}, expected a floating "
                              "point tensor (F32, BF16, F16)")
    try:
        x = reader.get_tensor(key)
    except Exception as e:
        raise CheckpointError(f"load_pretrained: cannot read {key} from {file}: {type(e).__name__}: {e}") from e
    # Layout and dtype changes happen in numpy: one host copy of one tensor, no per-shape compiles.
    x = np.ascontiguousarray(tf.to_jax(x, shape)).astype(dtype, copy=False)
    var.set_value(jax.device_put(x, sharding(var) if sharding is not None else None))


def _gen_config(config, gen: Mapping | None) -> dict:
    out = {k: getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    for k, v in (gen or {}).items():
        if k == "transformers_version":
            continue
        out[k] = tuple(v) if isinstance(v, list) else v
    return out


# Student formats (model_type "hybrid_qwen3", and the seed paper's "efficient_qwen"): register their mixer keys,
# model types and export formats. Imported last because they build on the registries above.
import hybrid_jax.convert.efficient_qwen  # noqa: E402,F401
import hybrid_jax.convert.hybrid_hf  # noqa: E402,F401
