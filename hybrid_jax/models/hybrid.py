"""Hybrid students: a Qwen3 `DecoderLM` whose mixers follow a layer spec, initialised from a teacher.

    student = hj.build_student(teacher, "attention:0,2;kda:1,3", mixer_config={"kda": {"chunk_size": 64}})
    cfg = student_config_dict(student)            # JSON-serialisable (layer spec + every mixer's hparams)
    same_shape = build_student_from_config(cfg)   # random init, ready for loading weights

Mixer kinds: attention (the teacher's layer, copied), kda, gdn (KDA with a scalar gate per
head), swa (the teacher's attention with a window and sinks) and allmem (SWA + gated TTT
memory). What is copied from the teacher and how new parameters start is documented in
docs/students.md; every choice is a key of `mixer_config[kind]` (see `DEFAULT_MIXER_CONFIG`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from hybrid_jax.config import ConfigError, format_layer_spec, parse_layer_spec
from hybrid_jax.layers.allmem import AllMem
from hybrid_jax.layers.attention import Attention
from hybrid_jax.layers.kda import KDA
from hybrid_jax.layers.swa import SlidingWindowAttention
from hybrid_jax.layers.ttt_memory import TTTMemory
from hybrid_jax.models.qwen3 import DecoderLM, Qwen3Config

STUDENT_MODEL_TYPE = "hybrid_qwen3"

_KDA_DEFAULTS = dict(
    init="teacher",  # "teacher": q/k/v/o from the teacher's attention (GQA k/v repeated); "random"
    conv_size=4,
    conv_init="identity",  # "identity" (only the current-token tap = 1) or "random"
    A_init_range=(1.0, 16.0),  # A ~ U(low, high), stored as A_log
    dt_init_range=(1e-3, 1e-1),  # dt ~ logU(low, high), dt_bias = softplus^-1(dt)
    output_gate_init="half",  # "half": g_up = 0 so sigmoid(gate) = 0.5 exactly; "random"
    chunk_size=64,
    backend="auto",
    # One Pallas kernel for each of the q/k/v short convolutions + activation (+ q/k L2 norm) on
    # the GPU, in forwards without a cache (training, scoring) and prefills into an empty one
    # (pallas_kernels/kda/short_conv.py; the distillation step 1.12x faster on an H200).
    fused_conv=True,
    # Options of the seed paper's released KDA layer (docs/export.md, efficient_qwen); the
    # defaults are this project's layer.
    num_kv_heads=None,  # None: as many k/v heads as query heads; else GQA k/v, repeated
    conv_activation="silu",  # "silu" or "identity" after the short convolutions
    conv_bias=False,
    output_gate_bias=False,
    output_norm=True,  # gated RMSNorm on the output; False: o * sigmoid(gate)
)

DEFAULT_MIXER_CONFIG: dict[str, dict[str, Any]] = {
    "attention": {},
    "kda": dict(_KDA_DEFAULTS),
    "gdn": dict(_KDA_DEFAULTS),
    # The teacher's attention (all parameters copied) over a sliding window plus sink tokens.
    "swa": dict(window=512, sinks=0, backend="auto"),
    "allmem": dict(
        window=512,
        sinks=0,
        chunk_size=512,  # memory update every chunk_size tokens
        memory_hidden=0,  # fast-weight MLP width F; 0 = head_dim
        lr_init=1e-3,  # softplus bias so the inner learning rate starts near this value
        momentum_init=0.9,  # sigmoid bias of the momentum gate
        decay_init=1e-3,  # sigmoid bias of the forgetting gate
        qk_l2norm=True,  # L2-normalise the memory's q and k
        alpha_init=0.0,  # 0: the converted model computes exactly the SWA model
        memory_init="teacher",  # "teacher": memory q/k/v/o from the teacher's attention; "random"
        swa_backend="auto",
        memory_backend="auto",
    ),
}


def resolve_mixer_config(mixer_config: Mapping | None) -> dict[str, dict[str, Any]]:
    """Defaults merged with the user's `{kind: {key: value}}`; unknown kinds or keys raise ConfigError.

    `mixer_config["layers"] = {i: {key: value}}` overrides keys for single layers (of that layer's kind).
    """
    out = copy.deepcopy(DEFAULT_MIXER_CONFIG)
    out["layers"] = {}
    for kind, values in (mixer_config or {}).items():
        if kind == "layers":
            out["layers"] = {int(i): dict(v) for i, v in values.items()}
            continue
        if kind not in DEFAULT_MIXER_CONFIG:
            raise ConfigError(f"mixer_config: unknown mixer {kind!r}; known: {', '.join(DEFAULT_MIXER_CONFIG)}")
        for key, value in dict(values).items():
            if key not in DEFAULT_MIXER_CONFIG[kind]:
                known = ", ".join(DEFAULT_MIXER_CONFIG[kind]) or "(none)"
                raise ConfigError(f"mixer_config[{kind!r}]: unknown key {key!r}; known keys: {known}")
            out[kind][key] = value
    return out


def _layer_hparams(kind: str, i: int, resolved: Mapping) -> dict[str, Any]:
    hp = dict(resolved[kind])
    for key, value in resolved["layers"].get(i, {}).items():
        if key not in hp:
            raise ConfigError(f"mixer_config['layers'][{i}]: key {key!r} is not a {kind} setting; "
                              f"known: {', '.join(hp) or '(none)'}")
        hp[key] = value
    return hp


def make_mixer(kind: str, config: Qwen3Config, hparams: Mapping[str, Any], rngs: nnx.Rngs) -> nnx.Module:
    """A randomly initialised mixer of `kind` for a model with `config`."""
    c = config
    for key in ("init", "memory_init"):
        if key in hparams and hparams[key] not in ("teacher", "random"):
            raise ConfigError(f"mixer_config[{kind!r}][{key!r}]={hparams[key]!r}; use 'teacher' or 'random'")
    common = dict(dtype=c.jnp_dtype, param_dtype=c.jnp_param_dtype, init_std=c.initializer_range, rngs=rngs)
    if kind == "attention":
        return Attention.from_config(c, rngs=rngs)
    if kind in ("kda", "gdn"):
        hp = {k: v for k, v in hparams.items() if k != "init"}
        return KDA(c.hidden_size, c.num_attention_heads, c.head_dim, gate="channel" if kind == "kda" else "scalar",
                   norm_eps=c.rms_norm_eps, **hp, **common)
    if kind == "swa":
        return SlidingWindowAttention.from_config(c, rngs=rngs, **hparams)
    if kind == "allmem":
        hp = dict(hparams)
        swa = SlidingWindowAttention.from_config(c, window=hp["window"], sinks=hp["sinks"], backend=hp["swa_backend"],
                                                 rngs=rngs)
        memory = TTTMemory(c.hidden_size, c.num_attention_heads, c.head_dim, memory_hidden=hp["memory_hidden"] or None,
                           chunk_size=hp["chunk_size"], lr_init=hp["lr_init"], momentum_init=hp["momentum_init"],
                           decay_init=hp["decay_init"], qk_l2norm=hp["qk_l2norm"], backend=hp["memory_backend"],
                           **common)
        return AllMem(swa, memory, c.hidden_size, alpha_init=hp["alpha_init"], param_dtype=c.jnp_param_dtype)
    raise ConfigError(f"unknown mixer kind {kind!r}")


# --------------------------------------------------------------------------- copying from the teacher


def _copy_state(dst: nnx.Module, src: nnx.Module, dtype) -> None:
    """dst's parameters := src's (same tree), as fresh arrays (never aliasing the teacher's buffers)."""
    nnx.update(dst, jax.tree.map(lambda x: jnp.array(x, dtype=dtype, copy=True), nnx.state(src, nnx.Param)))


def _set(var: nnx.Param, value) -> None:
    if tuple(var.shape) != tuple(value.shape):
        raise ValueError(f"teacher init: shape {tuple(value.shape)} does not fit parameter {tuple(var.shape)}")
    var.set_value(jnp.array(value, dtype=var[...].dtype, copy=True))


def _repeat_kv(w: jax.Array, groups: int) -> jax.Array:
    """[D, KH, hd] -> [D, KH*groups, hd]: query head h reads kv head h // groups (GQA)."""
    return jnp.repeat(w, groups, axis=1)


def _init_qkvo_from_attention(mixer, attn: Attention) -> None:
    """A mixer with q [D,H,hd], k/v [D,KH,hd] and o [H,hd,D] takes the teacher's projections:
    the teacher's k/v heads repeated to KH heads (KH a multiple of the teacher's k/v heads)."""
    kv_heads = mixer.k_proj[...].shape[1]
    if kv_heads % attn.num_kv_heads:
        raise ConfigError(f"cannot initialise {kv_heads} k/v heads from the teacher's {attn.num_kv_heads}: "
                          "use a multiple of the teacher's num_key_value_heads, or init='random'")
    groups = kv_heads // attn.num_kv_heads
    _set(mixer.q_proj, attn.q_proj[...])
    _set(mixer.k_proj, _repeat_kv(attn.k_proj[...], groups))
    _set(mixer.v_proj, _repeat_kv(attn.v_proj[...], groups))
    _set(mixer.o_proj, attn.o_proj[...])


def build_student(teacher: DecoderLM, layer_spec: str, mixer_config: Mapping | None = None,
                  rngs: nnx.Rngs | None = None, *, init_from_teacher: bool = True, **config_overrides) -> DecoderLM:
    """A hybrid `DecoderLM` with the teacher's shapes and the mixers of `layer_spec`.

    layer_spec: `"attention:0,2;kda:1,3"` (every layer once, 0-indexed) or a preset name of
      `hybrid_jax.config.PRESETS` (e.g. "qwen3_0p6b_hybrid_kda", "all_allmem").
    mixer_config: `{kind: {key: value}}` over `DEFAULT_MIXER_CONFIG`, plus optional
      `{"layers": {i: {key: value}}}` per-layer overrides.
    init_from_teacher: copy embeddings, norms, MLPs, lm_head and kept attention, and initialise
      new mixers from the teacher's attention (docs/students.md); False: random init.
    config_overrides: fields of the student's Qwen3Config (e.g. dtype="bfloat16", remat=True).
    """
    if not isinstance(teacher, DecoderLM):
        raise TypeError(f"build_student: teacher must be a DecoderLM (hj.load_pretrained), got {type(teacher).__name__}")
    config = teacher.config.replace(**config_overrides) if config_overrides else teacher.config
    kinds = parse_layer_spec(layer_spec, config.num_hidden_layers)
    student = _build(config, kinds, resolve_mixer_config(mixer_config), rngs or nnx.Rngs(0),
                     dict(teacher.generation_config))
    if init_from_teacher:
        _init_from_teacher(student, teacher)
    return student


def _build(config: Qwen3Config, kinds, resolved, rngs, generation_config=None) -> DecoderLM:
    for i in resolved["layers"]:
        if not 0 <= i < len(kinds):
            raise ConfigError(f"mixer_config['layers']: layer {i} out of range for {len(kinds)} layers")
    hparams = [{key: tuple(v) if isinstance(v, list) else v for key, v in _layer_hparams(k, i, resolved).items()}
               for i, k in enumerate(kinds)]
    mixers = [make_mixer(k, config, hp, rngs) for k, hp in zip(kinds, hparams)]
    for m, k, hp in zip(mixers, kinds, hparams):
        m.mixer_kind = k
        # static and hashable (part of the graph definition); student_config_dict reads it
        m.hparams = tuple(sorted((key, tuple(v) if isinstance(v, list) else v) for key, v in hp.items()))
    return DecoderLM(config, mixers, rngs=rngs, generation_config=generation_config)


def _init_from_teacher(student: DecoderLM, teacher: DecoderLM) -> None:
    dt = student.config.jnp_param_dtype
    _set(student.embed, teacher.embed[...])
    if student.lm_head is not None:
        _set(student.lm_head, teacher.lm_head[...])
    _copy_state(student.norm, teacher.norm, dt)
    for sb, tb in zip(student.blocks, teacher.blocks):
        for name in ("mlp", "input_norm", "post_attention_norm"):
            _copy_state(getattr(sb, name), getattr(tb, name), dt)
        kind = sb.mixer.mixer_kind
        attn = tb.mixer
        if not isinstance(attn, Attention):
            raise TypeError(f"build_student: teacher layer mixers must be Attention, got {type(attn).__name__}")
        hp = dict(sb.mixer.hparams)
        if kind in ("attention", "swa"):
            _copy_state(sb.mixer, attn, dt)
        elif kind in ("kda", "gdn") and hp["init"] == "teacher":
            _init_qkvo_from_attention(sb.mixer, attn)
        elif kind == "allmem":
            _copy_state(sb.mixer.swa, attn, dt)
            if hp["memory_init"] == "teacher":
                _init_qkvo_from_attention(sb.mixer.memory, attn)


# --------------------------------------------------------------------------- serialisation


def layer_kinds(model: DecoderLM) -> tuple[str, ...]:
    """Per-layer mixer kinds of a student (or a teacher: all "attention")."""
    return tuple(getattr(b.mixer, "mixer_kind", "attention") for b in model.blocks)


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


# Settings a trainer may change after construction (set_allmem_hparams): serialised as they are now.
_LIVE_KEYS = ("window", "sinks", "chunk_size")


def _live_hparams(mixer) -> dict[str, Any]:
    hp = {k: _jsonable(v) for k, v in getattr(mixer, "hparams", ())}
    for k in _LIVE_KEYS:
        if k in hp:
            hp[k] = getattr(mixer, k)
    return hp


def student_config_dict(model: DecoderLM) -> dict[str, Any]:
    """Everything needed to rebuild the student's structure: base config, layer spec, per-layer hparams."""
    kinds = layer_kinds(model)
    base = dataclasses.asdict(model.config)
    base["rope_scaling"] = dict(base["rope_scaling"]) if base["rope_scaling"] else None
    base["eos_token_id"] = _jsonable(base["eos_token_id"])
    return {
        "model_type": STUDENT_MODEL_TYPE,
        "base_config": base,
        "layer_spec": format_layer_spec(kinds),
        "layers": [_live_hparams(b.mixer) for b in model.blocks],
        "generation_config": {k: _jsonable(v) for k, v in dict(model.generation_config).items()},
    }


def build_student_from_config(cfg: Mapping[str, Any], rngs: nnx.Rngs | None = None) -> DecoderLM:
    """Inverse of `student_config_dict`: the same structure with random parameters."""
    if cfg.get("model_type") != STUDENT_MODEL_TYPE:
        raise ConfigError(f"build_student_from_config: model_type {cfg.get('model_type')!r} is not "
                          f"{STUDENT_MODEL_TYPE!r}")
    config = Qwen3Config(**cfg["base_config"])
    kinds = parse_layer_spec(cfg["layer_spec"], config.num_hidden_layers)
    resolved = resolve_mixer_config(None)
    resolved["layers"] = {i: dict(hp) for i, hp in enumerate(cfg["layers"]) if hp}
    return _build(config, kinds, resolved, rngs or nnx.Rngs(0), cfg.get("generation_config"))
