"""Hugging Face format of hybrid students (model_type "hybrid_qwen3"): key tables, config.json, registration.

A student directory is a Qwen3 directory plus:

* config.json: every Qwen3 field, `model_type: "hybrid_qwen3"`, `layer_spec` ("attention:0,2;kda:1,3"),
  `mixer_types` (one name per layer), `mixer_configs` (one dict of hyperparameters per layer, exactly
  `student_config_dict(student)["layers"]`) and `auto_map` naming the two Python files below.
* configuration_hybrid_qwen3.py / modeling_hybrid_qwen3.py (copied from hf_modeling/), so that
  `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` builds the PyTorch model.

Parameter keys per layer i (prefix `model.layers.{i}.`; torch Linear weights are [out, in]):

    attention, swa   self_attn.{q,k,v,o}_proj.weight, self_attn.{q,k}_norm.weight    (= Qwen3)
    kda, gdn         linear_attn.{q,k,v}_proj.weight [H*hd, D], linear_attn.{q,k,v}_conv1d.weight [H*hd, 1, K],
                     linear_attn.f_a_proj.weight [hd, D] + f_b_proj.weight [H*hd, hd] (kda) or
                     linear_attn.f_proj.weight [H, D] (gdn), linear_attn.A_log [H],
                     linear_attn.dt_bias [H*hd] (kda) or [H] (gdn), linear_attn.b_proj.weight [H, D],
                     linear_attn.g_a_proj.weight [hd, D], linear_attn.g_b_proj.weight [H*hd, hd],
                     linear_attn.o_norm.weight [hd], linear_attn.o_proj.weight [D, H*hd]
    allmem           self_attn.* (the SWA part, = Qwen3) and memory.{q,k,v}_proj.weight [H*hd, D],
                     memory.o_proj.weight [D, H*hd], memory.{lr,momentum,decay}_proj.weight [H, D],
                     memory.{lr,momentum,decay}_bias [H], memory.w1 [H, hd, F], memory.w2 [H, F, hd],
                     memory.w3 [H, hd, F], memory.alpha [D]
    every layer      mlp.{gate,up,down}_proj.weight, input_layernorm.weight, post_attention_layernorm.weight

Importing this module registers the mixers' keys with `hf_import` and the exporter with `hf_export`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hybrid_jax.config import ConfigError, parse_layer_spec
from hybrid_jax.convert import hf_import
from hybrid_jax.convert.hf_import import CheckpointError, Copy, Flatten, KeyMap, Linear, ModelType
from hybrid_jax.layers.allmem import AllMem
from hybrid_jax.layers.kda import KDA
from hybrid_jax.layers.swa import SlidingWindowAttention
from hybrid_jax.models.hybrid import (
    DEFAULT_MIXER_CONFIG,
    STUDENT_MODEL_TYPE,
    build_student_from_config,
    layer_kinds,
    student_config_dict,
)
from hybrid_jax.models.qwen3 import Qwen3Config

MODELING_DIR = Path(__file__).with_name("hf_modeling")
MODELING_FILES = ("configuration_hybrid_qwen3.py", "modeling_hybrid_qwen3.py")
AUTO_MAP = {
    "AutoConfig": "configuration_hybrid_qwen3.HybridQwen3Config",
    "AutoModel": "modeling_hybrid_qwen3.HybridQwen3Model",
    "AutoModelForCausalLM": "modeling_hybrid_qwen3.HybridQwen3ForCausalLM",
}
MIXER_KINDS = tuple(DEFAULT_MIXER_CONFIG)


@dataclasses.dataclass(frozen=True)
class Conv:
    """Depthwise conv taps [K, H, hd] (tap K-1 = current token) <-> torch Conv1d weight [H*hd, 1, K]."""

    def hf_shape(self, shape):
        return (shape[1] * shape[2], 1, shape[0])

    def to_jax(self, x, shape):
        return x[:, 0, :].T.reshape(shape)

    def to_hf(self, x):
        return x.reshape(x.shape[0], -1).T[:, None, :]


# --- key tables ---------------------------------------------------------------------------------


def _kda_keys(m: KDA, prefix: str) -> KeyMap:
    p = prefix + "linear_attn."
    keys = {p + f"{n}_proj.weight": (getattr(m, f"{n}_proj"), Linear(1)) for n in ("q", "k", "v")}
    keys.update({p + f"{n}_conv1d.weight": (getattr(m, f"{n}_conv").weight, Conv()) for n in ("q", "k", "v")})
    if m.gate == "channel":
        keys[p + "f_a_proj.weight"] = (m.f_down, Linear(1))
        keys[p + "f_b_proj.weight"] = (m.f_up, Linear(1))
    else:
        keys[p + "f_proj.weight"] = (m.f_proj, Linear(1))
    keys.update({
        p + "A_log": (m.A_log, Copy()), p + "dt_bias": (m.dt_bias, Flatten()),
        p + "b_proj.weight": (m.b_proj, Linear(1)),
        p + "g_a_proj.weight": (m.g_down, Linear(1)), p + "g_b_proj.weight": (m.g_up, Linear(1)),
        p + "o_norm.weight": (m.o_norm.weight, Copy()), p + "o_proj.weight": (m.o_proj, Linear(2)),
    })
    return keys


def _allmem_keys(m: AllMem, prefix: str) -> KeyMap:
    keys = hf_import._attention_keys(m.swa, prefix)
    mem, p = m.memory, prefix + "memory."
    keys.update({p + f"{n}_proj.weight": (getattr(mem, f"{n}_proj"), Linear(1)) for n in ("q", "k", "v")})
    keys[p + "o_proj.weight"] = (mem.o_proj, Linear(2))
    for n in ("lr", "momentum", "decay"):
        keys[p + f"{n}_proj.weight"] = (getattr(mem, f"{n}_proj"), Linear(1))
        keys[p + f"{n}_bias"] = (getattr(mem, f"{n}_bias"), Copy())
    keys.update({p + n: (getattr(mem, n), Copy()) for n in ("w1", "w2", "w3")})
    keys[p + "alpha"] = (m.alpha, Copy())
    return keys


hf_import.register_mixer_keys(KDA, _kda_keys)
hf_import.register_mixer_keys(SlidingWindowAttention, hf_import._attention_keys)
hf_import.register_mixer_keys(AllMem, _allmem_keys)


# --- config.json --------------------------------------------------------------------------------


def is_student(model) -> bool:
    """True when some layer is not plain attention (an all-attention model is exported as Qwen3)."""
    return any(k != "attention" for k in layer_kinds(model))


def kda_extra_options(mixer: KDA) -> dict[str, Any]:
    """The KDA settings of the seed paper's EfficientKDA that `mixer` uses (empty for transformers' KDA).

    The hybrid_qwen3 files (config.json and the PyTorch model) do not hold them; the efficient_qwen layout does.
    """
    out: dict[str, Any] = {}
    if mixer.num_kv_heads != mixer.num_heads:
        out["num_kv_heads"] = mixer.num_kv_heads
    if mixer.conv_activation != "silu":
        out["conv_activation"] = mixer.conv_activation
    if mixer.q_conv_bias is not None:
        out["conv_bias"] = True
    if mixer.g_bias is not None:
        out["output_gate_bias"] = True
    if mixer.o_norm is None:
        out["output_norm"] = False
    return out


def efficient_only_layers(model) -> dict[int, dict[str, Any]]:
    """Layer index -> `kda_extra_options` of every KDA layer that uses some."""
    return {i: opts for i, b in enumerate(model.blocks) if isinstance(b.mixer, KDA) and (opts := kda_extra_options(b.mixer))}


def student_hf_config(model) -> dict[str, Any]:
    """config.json of a student: the Qwen3 fields plus the layer spec and per-layer mixer hyperparameters."""
    extra = efficient_only_layers(model)
    if extra:
        i, opts = next(iter(extra.items()))
        raise ValueError(f"save_pretrained: layer {i}'s KDA uses {opts} ({len(extra)} such layers), which the "
                         "hybrid_qwen3 layout cannot hold; save with layout='efficient_qwen' (or layout=None, which "
                         "picks it)")
    sc = student_config_dict(model)
    # Window, sinks and chunk sizes are plain attributes a trainer may change after building (AllMem's per-step
    # draws): the file records what the model computes now, not what it was built with.
    for hp, block in zip(sc["layers"], model.blocks):
        for key in ("window", "sinks", "chunk_size"):
            if key in hp and hasattr(block.mixer, key):
                hp[key] = getattr(block.mixer, key)
    cfg = model.config.to_hf()
    cfg.update({
        "architectures": ["HybridQwen3ForCausalLM"], "model_type": STUDENT_MODEL_TYPE, "auto_map": dict(AUTO_MAP),
        "layer_spec": sc["layer_spec"], "mixer_types": list(layer_kinds(model)), "mixer_configs": sc["layers"],
    })
    return cfg


@dataclasses.dataclass(frozen=True)
class StudentHFConfig:
    """What `load_pretrained` needs to rebuild a student from config.json (hashable)."""

    base: Qwen3Config
    layer_spec: str
    layers_json: str  # JSON list of per-layer hyperparameter dicts

    @property
    def tie_word_embeddings(self) -> bool:
        return self.base.tie_word_embeddings


def student_config_from_hf(d: Mapping[str, Any], **overrides) -> StudentHFConfig:
    where = "load_pretrained: config.json of a hybrid_qwen3 model"
    for key in ("layer_spec", "mixer_configs"):
        if key not in d:
            raise CheckpointError(f"{where} lacks {key!r}; it was not written by hybrid_jax's student export")
    base = Qwen3Config.from_hf({**d, "model_type": "qwen3"}, **overrides)
    try:
        kinds = parse_layer_spec(d["layer_spec"], base.num_hidden_layers)
    except ConfigError as e:
        raise CheckpointError(f"{where}: bad layer_spec {d['layer_spec']!r}: {e}") from e
    layers = d["mixer_configs"]
    if not isinstance(layers, list) or len(layers) != base.num_hidden_layers:
        raise CheckpointError(f"{where}: mixer_configs must be a list of {base.num_hidden_layers} dicts (one per "
                              f"layer), got {type(layers).__name__} of length {len(layers) if isinstance(layers, list) else '-'}")
    types = d.get("mixer_types")
    if types is not None and list(types) != list(kinds):
        raise CheckpointError(f"{where}: mixer_types {types} disagree with layer_spec {d['layer_spec']!r}")
    for i, (kind, hp) in enumerate(zip(kinds, layers)):
        unknown = sorted(set(hp) - set(DEFAULT_MIXER_CONFIG[kind]))
        if unknown:
            raise CheckpointError(f"{where}: mixer_configs[{i}] has keys {unknown} that a {kind} layer does not "
                                  f"know; known: {sorted(DEFAULT_MIXER_CONFIG[kind]) or '(none)'}")
    return StudentHFConfig(base, d["layer_spec"], json.dumps(layers, sort_keys=True))


def build_from_hf_config(config: StudentHFConfig, *, rngs, generation_config=None):
    base = dataclasses.asdict(config.base)
    return build_student_from_config({
        "model_type": STUDENT_MODEL_TYPE, "base_config": base, "layer_spec": config.layer_spec,
        "layers": json.loads(config.layers_json), "generation_config": generation_config,
    }, rngs)


hf_import.register_model_type(STUDENT_MODEL_TYPE, ModelType(
    config_from_hf=student_config_from_hf,
    build=build_from_hf_config,
    ignorable_keys=lambda config: {"lm_head.weight"} if config.tie_word_embeddings else set(),
))


def modeling_files() -> dict[str, bytes]:
    """The PyTorch files written into every student directory."""
    missing = [n for n in MODELING_FILES if not (MODELING_DIR / n).is_file()]
    if missing:
        raise FileNotFoundError(f"save_pretrained: {missing} missing from {MODELING_DIR}; the hybrid_jax install is "
                                "incomplete")
    return {n: (MODELING_DIR / n).read_bytes() for n in MODELING_FILES}


hf_import.register_export_format(hf_import.ExportFormat(
    applies=lambda model: is_student(model) and not efficient_only_layers(model), config=student_hf_config,
    files=modeling_files, name=STUDENT_MODEL_TYPE))
