"""The seed paper's released checkpoint layout (model_type "efficient_qwen"): import and export.

The paper's inference package (`gen_distill`: `EfficientQwenConfig`, `EfficientQwenForCausalLM`,
`EfficientKDA`) stores a Qwen3 backbone whose layers are listed in `layer_specs`
("attention:0,2,6;efficient_kda:1,3,4,5"; unlisted layers are attention) and whose KDA settings are
one `ssm_cfg` dict shared by every KDA layer. `hj.load_pretrained(dir)` reads such a directory;
`hj.save_pretrained(model, dir, layout="efficient_qwen")` writes one that the paper's code loads.

Keys (prefix `model.layers.{i}.`; torch Linear weights are [out, in]; H query heads, KH key/value
heads, hd = head_dim, D = hidden size, K = d_conv):

    attention       self_attn.{q,k,v,o}_proj.weight, self_attn.{q,k}_norm.weight            (= Qwen3)
    efficient_kda   self_attn.mixer.q_proj.weight [H*hd, D], self_attn.mixer.{k,v}_proj.weight [KH*hd, D],
                    self_attn.mixer.{q,k,v}_conv1d.weight [C, 1, K] (+ .bias [C] with conv_bias),
                    self_attn.mixer.A_log [H], self_attn.mixer.dt_bias [H*hd],
                    self_attn.mixer.f_proj.0.weight [hd, D], self_attn.mixer.f_proj.1.weight [H*hd, hd],
                    self_attn.mixer.b_proj.weight [H, D],
                    self_attn.mixer.g_proj.0.weight [hd, D], self_attn.mixer.g_proj.1.{weight [H*hd, hd], bias [H*hd]},
                    self_attn.mixer.o_norm.weight [hd] (with use_post_ssm_norm), self_attn.mixer.out_proj.weight [D, H*hd]
    every layer     mlp.{gate,up,down}_proj.weight, input_layernorm.weight, post_attention_layernorm.weight

An `efficient_kda` layer becomes `hybrid_jax.layers.kda.KDA` with the released layer's options:
`conv_activation` (ssm_cfg "activation": "identity", or "silu"), `conv_bias`, `output_gate_bias=True`
(g_proj.1 always has a bias), `num_kv_heads` (n_k_heads; k/v repeated to the query heads) and
`output_norm` (use_post_ssm_norm). Settings this converter cannot represent exactly (GVA, expand != 1,
allow_neg_eigval, a SiLU output gate, no short convolution, LAUREL blocks, no MLP, other mixers) are
refused with an error naming the setting, never approximated.

Padding: here every KDA layer restarts its state at each sequence's first real token, so a left-padded
prompt computes what it computes alone. The released code marks that token as a document start by
setting the decay-gate *pre-activation* to 0, which does not clear the state, and does not receive the
2D mask at all from its decoder; unpadded (and right-padded) rows compute the same function in both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from hybrid_jax.config import format_layer_spec
from hybrid_jax.convert import hf_import
from hybrid_jax.convert.hf_import import CheckpointError, Copy, Flatten, KeyMap, Linear, ModelType
from hybrid_jax.convert.hybrid_hf import Conv, efficient_only_layers
from hybrid_jax.layers.attention import Attention
from hybrid_jax.layers.kda import KDA
from hybrid_jax.models.hybrid import DEFAULT_MIXER_CONFIG, layer_kinds, make_mixer
from hybrid_jax.models.qwen3 import DecoderLM, Qwen3Config

MODEL_TYPE = "efficient_qwen"
# Mixer names in `layer_specs` <-> ours.
LAYER_NAMES = {"attention": "attention", "efficient_kda": "kda"}
PAPER_NAMES = {v: k for k, v in LAYER_NAMES.items()}

# EfficientKDA's constructor defaults: what the released code uses for a key missing from a stored ssm_cfg.
EFFICIENT_KDA_DEFAULTS = dict(
    d_state=128, n_q_heads=16, n_k_heads=8, n_v_heads=8, d_conv=4, expand_q=1.0, expand_k=1.0, expand_v=1.0,
    use_short_conv=True, allow_neg_eigval=False, conv_bias=True, rms_norm_eps=1e-5, activation="identity",
    out_gate_activation="sigmoid", use_gqa_setup=True, use_gva_setup=False, use_post_ssm_norm=True,
)
# Short-convolution activations of the released BoundaryAwareShortConvolution -> ours.
CONV_ACTIVATIONS = {None: "identity", "identity": "identity", "silu": "silu", "swish": "silu"}


def parse_layer_specs(spec: str, num_layers: int) -> tuple[str, ...]:
    """`"attention:0,2;efficient_kda:1,3"` -> our per-layer kinds; layers it does not list are attention, as
    in the released code. Unknown mixers, malformed groups, repeated or out-of-range layers raise."""
    where = f"load_pretrained: efficient_qwen layer_specs {spec!r}"
    kinds: dict[int, str] = {}
    for group in [g.strip() for g in spec.split(";") if g.strip()]:
        name, sep, indices = group.partition(":")
        name = name.strip()
        if not sep:
            raise CheckpointError(f"{where}: group {group!r} is not '<mixer>:<layer>,<layer>,...'")
        if name not in LAYER_NAMES:
            raise CheckpointError(f"{where}: mixer {name!r} cannot be converted; hybrid_jax reads "
                                  f"{' and '.join(repr(n) for n in LAYER_NAMES)} layers only")
        for tok in [t.strip() for t in indices.split(",") if t.strip()]:
            if not tok.isdigit():
                raise CheckpointError(f"{where}: {tok!r} in group {group!r} is not a layer index")
            i = int(tok)
            if i >= num_layers:
                raise CheckpointError(f"{where}: layer {i} out of range for num_hidden_layers={num_layers}")
            if i in kinds:
                raise CheckpointError(f"{where}: layer {i} is listed twice")
            kinds[i] = LAYER_NAMES[name]
    return tuple(kinds.get(i, "attention") for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class EfficientQwenHFConfig:
    """What `load_pretrained` needs to rebuild an efficient_qwen checkpoint (hashable)."""

    base: Qwen3Config
    kinds: tuple[str, ...]  # "attention" / "kda" per layer
    kda: tuple[tuple[str, Any], ...]  # the KDA hyperparameters (make_mixer's), shared by every KDA layer

    @property
    def tie_word_embeddings(self) -> bool:
        return self.base.tie_word_embeddings


def _ssm_cfg(d: Mapping[str, Any], base: Qwen3Config) -> dict[str, Any]:
    """The KDA settings the released code builds from config.json: its stored `ssm_cfg` over EfficientKDA's
    defaults, or (no ssm_cfg) the one EfficientQwenConfig derives from the top-level fields."""
    stored = d.get("ssm_cfg")
    if stored is not None:
        if not isinstance(stored, Mapping):
            raise CheckpointError(f"load_pretrained: efficient_qwen ssm_cfg must be an object, got {stored!r}")
        return {**EFFICIENT_KDA_DEFAULTS, **stored}
    top = lambda key, default: default if d.get(key) is None else d[key]
    return {
        **EFFICIENT_KDA_DEFAULTS,
        "d_state": top("d_state", base.head_dim), "d_conv": 4,
        "n_q_heads": top("num_query_heads", base.num_attention_heads),
        "n_k_heads": top("num_key_heads", base.num_key_value_heads),
        "n_v_heads": top("num_value_heads", base.num_key_value_heads),
        "expand_q": top("expand_q", 1), "expand_k": top("expand_k", 1), "expand_v": top("expand_v", 1),
        "activation": d.get("ssm_activation") or "identity", "conv_bias": True, "rms_norm_eps": base.rms_norm_eps,
        "allow_neg_eigval": top("allow_neg_eigval", False), "use_post_ssm_norm": top("use_post_ssm_norm", False),
        "use_short_conv": top("use_short_conv", True), "out_gate_activation": top("out_gate_activation", "sigmoid"),
        "use_gqa_setup": top("use_gqa_setup", True), "use_gva_setup": top("use_gva_setup", False),
    }


def _kda_hparams(ssm: Mapping[str, Any], base: Qwen3Config) -> dict[str, Any]:
    """make_mixer's KDA hyperparameters for the released layer described by `ssm`, or a CheckpointError."""
    where = "load_pretrained: efficient_qwen ssm_cfg"
    required = {"use_short_conv": True, "allow_neg_eigval": False, "out_gate_activation": "sigmoid",
                "use_gqa_setup": True, "use_gva_setup": False, "expand_q": 1, "expand_k": 1, "expand_v": 1}
    for key, want in required.items():
        if ssm[key] != want:
            raise CheckpointError(f"{where} has {key}={ssm[key]!r}; hybrid_jax's KDA computes the released layer "
                                  f"only with {key}={want!r}")
    if ssm["activation"] not in CONV_ACTIVATIONS:
        raise CheckpointError(f"{where} has activation={ssm['activation']!r}; supported: "
                              f"{sorted(k for k in CONV_ACTIVATIONS if k)}")
    H, KH = ssm["n_q_heads"], ssm["n_k_heads"]
    if (H, ssm["d_state"]) != (base.num_attention_heads, base.head_dim):
        raise CheckpointError(f"{where} has n_q_heads={H}, d_state={ssm['d_state']}; hybrid_jax's KDA layers use the "
                              f"model's num_attention_heads={base.num_attention_heads}, head_dim={base.head_dim}")
    if ssm["n_v_heads"] != KH or KH < 1 or H % KH:
        raise CheckpointError(f"{where} has n_q_heads={H}, n_k_heads={KH}, n_v_heads={ssm['n_v_heads']}; need "
                              "n_k_heads == n_v_heads dividing n_q_heads")
    if ssm["use_post_ssm_norm"] and ssm["rms_norm_eps"] != base.rms_norm_eps:
        raise CheckpointError(f"{where} has rms_norm_eps={ssm['rms_norm_eps']} for the output norm; hybrid_jax's KDA "
                              f"uses the model's rms_norm_eps={base.rms_norm_eps}")
    hp = dict(DEFAULT_MIXER_CONFIG["kda"])
    hp.update(init="random", conv_size=int(ssm["d_conv"]), num_kv_heads=None if KH == H else int(KH),
              conv_activation=CONV_ACTIVATIONS[ssm["activation"]], conv_bias=bool(ssm["conv_bias"]),
              output_gate_bias=True, output_norm=bool(ssm["use_post_ssm_norm"]))
    return hp


def efficient_config_from_hf(d: Mapping[str, Any], **overrides) -> EfficientQwenHFConfig:
    where = "load_pretrained: efficient_qwen config.json"
    for key, want in (("do_laurel", False), ("run_mlp_component", True)):
        if d.get(key, want) != want:
            raise CheckpointError(f"{where} has {key}={d[key]!r}; hybrid_jax's decoder needs {key}={want!r}")
    for key, qwen_key in (("num_query_heads", "num_attention_heads"), ("num_key_heads", "num_key_value_heads"),
                          ("num_value_heads", "num_key_value_heads")):
        if d.get(key) is not None and d[key] != d.get(qwen_key):
            raise CheckpointError(f"{where} has {key}={d[key]} != {qwen_key}={d.get(qwen_key)}; its attention layers "
                                  f"would use {d[key]} heads, which hybrid_jax's Qwen3 attention does not")
    try:
        base = Qwen3Config.from_hf({**d, "model_type": "qwen3"}, **overrides)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from e
    spec = d.get("layer_specs")
    if isinstance(spec, str) and spec.strip():
        kinds = parse_layer_specs(spec, base.num_hidden_layers)
    else:  # the released config's older form: `mixer_type` on the layers in `custom_mixer_layers`
        mixer = d.get("mixer_type", "attention")
        custom = set(d.get("custom_mixer_layers") or [])
        if custom and mixer not in LAYER_NAMES:
            raise CheckpointError(f"{where} has mixer_type={mixer!r}; hybrid_jax reads attention and efficient_kda")
        kinds = tuple(LAYER_NAMES[mixer] if i in custom else "attention" for i in range(base.num_hidden_layers))
    kda = _kda_hparams(_ssm_cfg(d, base), base) if "kda" in kinds else {}
    return EfficientQwenHFConfig(base, kinds, tuple(sorted(kda.items())))


def build_efficient(config: EfficientQwenHFConfig, *, rngs, generation_config=None) -> DecoderLM:
    """A DecoderLM with the checkpoint's layers, tagged like `build_student`'s so `layer_kinds` and
    `student_config_dict` describe it."""
    kda = dict(config.kda)
    mixers = []
    for kind in config.kinds:
        hp = kda if kind == "kda" else {}
        mixer = make_mixer(kind, config.base, hp, rngs)
        mixer.mixer_kind = kind
        mixer.hparams = tuple(sorted(hp.items()))
        mixers.append(mixer)
    return DecoderLM(config.base, mixers, rngs=rngs, generation_config=generation_config)


# --- keys --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Settings:
    """The one ssm_cfg all KDA layers of a model share."""

    conv_size: int
    conv_activation: str
    conv_bias: bool
    num_kv_heads: int
    output_norm: bool


def kda_settings(model) -> _Settings | None:
    """The shared KDA settings of `model` (None without KDA layers); layers the efficient_qwen layout cannot
    hold, or KDA layers whose settings differ, raise naming the layer."""
    c = model.config
    found: dict[_Settings, int] = {}
    for i, (kind, block) in enumerate(zip(layer_kinds(model), model.blocks)):
        m = block.mixer
        if kind == "attention" and isinstance(m, Attention):
            continue
        if not (isinstance(m, KDA) and m.gate == "channel"):
            raise ValueError(f"save_pretrained: layer {i} is a {kind} layer; the efficient_qwen layout holds "
                             "attention and (per-channel gate) KDA layers only")
        if (m.num_heads, m.head_dim) != (c.num_attention_heads, c.head_dim):
            raise ValueError(f"save_pretrained: layer {i}'s KDA has {m.num_heads} heads of {m.head_dim}; the "
                             f"efficient_qwen layout needs the model's {c.num_attention_heads} heads of {c.head_dim}")
        if m.o_norm is not None and m.o_norm.eps != c.rms_norm_eps:
            raise ValueError(f"save_pretrained: layer {i}'s KDA output norm has eps={m.o_norm.eps}; the "
                             f"efficient_qwen layout uses rms_norm_eps={c.rms_norm_eps}")
        s = _Settings(m.q_conv.kernel_size, m.conv_activation, m.q_conv_bias is not None, m.num_kv_heads,
                      m.o_norm is not None)
        found.setdefault(s, i)
    # Bias presence may differ between layers: a layer without one is written with a zero bias (exact).
    shared = {dataclasses.replace(s, conv_bias=False): i for s, i in found.items()}
    if len(shared) > 1:
        (a, i), (b, j) = list(shared.items())[:2]
        diff = {f.name: (getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
                if getattr(a, f.name) != getattr(b, f.name)}
        raise ValueError(f"save_pretrained: KDA layers {i} and {j} differ in {diff}; the efficient_qwen layout "
                         "stores one ssm_cfg for all KDA layers")
    if not found:
        return None
    return dataclasses.replace(next(iter(found)), conv_bias=any(s.conv_bias for s in found))


def _zeros_like_param(shape, model) -> nnx.Param:
    """A zero bias for a layer that has none (written on export only; loading always builds the biases)."""
    return nnx.Param(jnp.zeros(shape, model.config.jnp_param_dtype))


def _kda_keys(m: KDA, prefix: str, settings: _Settings, model, export: bool) -> KeyMap:
    p = prefix + "self_attn.mixer."

    def bias(var, shape, key):
        if var is not None:
            return var
        if not export:
            raise CheckpointError(f"load_pretrained: {key} has no parameter in the model built from config.json")
        return _zeros_like_param(shape, model)

    keys = {p + f"{n}_proj.weight": (getattr(m, f"{n}_proj"), Linear(1)) for n in ("q", "k", "v")}
    for n, heads in (("q", m.num_heads), ("k", m.num_kv_heads), ("v", m.num_kv_heads)):
        keys[p + f"{n}_conv1d.weight"] = (getattr(m, f"{n}_conv").weight, Conv())
        if settings.conv_bias:
            key = p + f"{n}_conv1d.bias"
            keys[key] = (bias(getattr(m, f"{n}_conv_bias"), (heads, m.head_dim), key), Flatten())
    key = p + "g_proj.1.bias"
    keys.update({
        p + "A_log": (m.A_log, Copy()), p + "dt_bias": (m.dt_bias, Flatten()),
        p + "f_proj.0.weight": (m.f_down, Linear(1)), p + "f_proj.1.weight": (m.f_up, Linear(1)),
        p + "b_proj.weight": (m.b_proj, Linear(1)),
        p + "g_proj.0.weight": (m.g_down, Linear(1)), p + "g_proj.1.weight": (m.g_up, Linear(1)),
        key: (bias(m.g_bias, (m.num_heads, m.head_dim), key), Flatten()),
        p + "out_proj.weight": (m.o_proj, Linear(2)),
    })
    if m.o_norm is not None:
        keys[p + "o_norm.weight"] = (m.o_norm.weight, Copy())
    return keys


def efficient_key_map(model, *, export: bool = False) -> KeyMap:
    """Every parameter of `model` with its efficient_qwen key (export: zero biases for layers without)."""
    settings = kda_settings(model)
    mixer_keys = {Attention: hf_import._attention_keys,
                  KDA: lambda m, prefix: _kda_keys(m, prefix, settings, model, export)}
    return hf_import.hf_key_map(model, mixer_keys, layout=MODEL_TYPE)


# --- config.json -------------------------------------------------------------------------------


def efficient_hf_config(model) -> dict[str, Any]:
    """config.json in the form EfficientQwenConfig reads: the Qwen3 fields, `layer_specs` and the `ssm_cfg`."""
    s = kda_settings(model)
    c = model.config
    cfg = c.to_hf()
    kinds = layer_kinds(model)
    cfg.update({"architectures": ["EfficientQwenForCausalLM"], "model_type": MODEL_TYPE,
                "layer_specs": format_layer_spec([PAPER_NAMES[k] for k in kinds]),
                "mixer_type": "attention", "custom_mixer_layers": [], "do_laurel": False, "run_mlp_component": True})
    if s is None:
        return cfg
    ssm = {
        "d_state": c.head_dim, "d_conv": s.conv_size, "n_q_heads": c.num_attention_heads, "n_k_heads": s.num_kv_heads,
        "n_v_heads": s.num_kv_heads, "expand_q": 1, "expand_k": 1, "expand_v": 1, "activation": s.conv_activation,
        "chunk_size": 64, "bias": False, "conv_bias": s.conv_bias, "rms_norm_eps": c.rms_norm_eps,
        "allow_neg_eigval": False, "use_qk_norm": False, "use_post_ssm_norm": s.output_norm, "use_short_conv": True,
        "out_gate_activation": "sigmoid", "use_gqa_setup": True, "use_gva_setup": False,
    }
    # The top-level fields mirror ssm_cfg (the stored ssm_cfg is what the released code uses). The KDA's key/value
    # heads live only in ssm_cfg: a top-level num_key_heads would change the attention layers too.
    cfg.update({"ssm_cfg": ssm, "ssm_activation": s.conv_activation, "use_post_ssm_norm": s.output_norm,
                "use_qk_norm": False, "use_short_conv": True, "out_gate_activation": "sigmoid", "use_gqa_setup": True,
                "use_gva_setup": False, "allow_neg_eigval": False, "d_state": c.head_dim,
                "expand_q": 1, "expand_k": 1, "expand_v": 1})
    return cfg


hf_import.register_model_type(MODEL_TYPE, ModelType(
    config_from_hf=efficient_config_from_hf,
    build=build_efficient,
    # A tied checkpoint may still store lm_head.weight (a copy of the embeddings); the released model ties it.
    ignorable_keys=lambda config: {"lm_head.weight"} if config.tie_word_embeddings else set(),
    key_map=efficient_key_map,
))

hf_import.register_export_format(hf_import.ExportFormat(
    # Chosen automatically for models only this layout holds (KDA with the released layer's options).
    applies=lambda model: bool(efficient_only_layers(model)), config=efficient_hf_config, name=MODEL_TYPE,
    key_map=lambda model: efficient_key_map(model, export=True),
))
