"""The Qwen3 teacher as one generic decoder (`DecoderLM`) whose blocks take any mixer.

A `DecoderLM` is embeddings, a list of `DecoderBlock(mixer, mlp, input_norm, post_attention_norm)`,
a final RMSNorm and an lm_head (tied to the embeddings or not). The Qwen3 teacher is a DecoderLM
whose mixers are all `Attention`; hybrid students pass their own per-layer mixers, or replace
`model.blocks[i].mixer` after construction. Mixers follow docs/architecture.md's contract.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict

from hybrid_jax.layers.attention import Attention
from hybrid_jax.layers.mlp import SwiGLU
from hybrid_jax.layers.norms import RMSNorm
from hybrid_jax.layers.params import param
from hybrid_jax.layers.rope import ROPE_TYPES, rope_type
from hybrid_jax.sharding import constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _dtype_name(d) -> str:
    name = d if isinstance(d, str) else jnp.dtype(d).name
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use one of {sorted(DTYPES)}")
    return name


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Qwen3 hyper-parameters (HF names), plus compute `dtype`, storage `param_dtype` and `remat`."""

    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 1_000_000.0
    rope_scaling: Mapping[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    max_position_embeddings: int = 40960
    initializer_range: float = 0.02
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151645
    pad_token_id: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False

    model_type = "qwen3"

    def __post_init__(self):
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        object.__setattr__(self, "param_dtype", _dtype_name(self.param_dtype))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"Qwen3Config: num_attention_heads={self.num_attention_heads} must be a multiple "
                             f"of num_key_value_heads={self.num_key_value_heads}")
        if rope_type(self.rope_scaling) not in ROPE_TYPES:
            raise ValueError(f"Qwen3Config: rope_scaling type {rope_type(self.rope_scaling)!r} is not supported; "
                             f"use one of {ROPE_TYPES}")

    def __hash__(self):  # rope_scaling is a dict; the config is a static part of the model graph
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str))

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    @property
    def jnp_param_dtype(self):
        return DTYPES[self.param_dtype]

    def replace(self, **kw) -> Qwen3Config:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], **overrides) -> Qwen3Config:
        """From a transformers config dict (4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`)."""
        model_type = d.get("model_type")
        if model_type != cls.model_type:
            raise ValueError(f"Qwen3Config.from_hf: model_type {model_type!r} is not {cls.model_type!r}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"Qwen3Config.from_hf: hidden_act {d['hidden_act']!r} is not supported (only 'silu')")
        if d.get("use_sliding_window"):
            raise ValueError("Qwen3Config.from_hf: use_sliding_window=true is not supported for the teacher")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or d.get("rope_theta", 10000.0)
        rope.pop("partial_rotary_factor", None)
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        scaling = rope if rope_type(rope) != "default" else None
        heads = d["num_attention_heads"]
        kw = dict(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads, rope_theta=float(theta), rope_scaling=scaling,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), tie_word_embeddings=d.get("tie_word_embeddings", False),
            attention_bias=d.get("attention_bias", False),
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            initializer_range=d.get("initializer_range", 0.02), bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"),
        )
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers 4.51+ and 5.x load as Qwen3ForCausalLM."""
        scaling = dict(self.rope_scaling) if self.rope_scaling else None
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return {
            "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "hidden_act": "silu", "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range, "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
            "attention_dropout": 0.0, "use_sliding_window": False, "sliding_window": None,
            "rope_theta": self.rope_theta, "rope_scaling": scaling,
            "rope_parameters": {"rope_type": "default", **(scaling or {}), "rope_theta": self.rope_theta},
            "bos_token_id": self.bos_token_id, "eos_token_id": eos, "pad_token_id": self.pad_token_id,
            "torch_dtype": self.param_dtype, "use_cache": True,
        }


def jit_construct(ctor, *args, rngs: nnx.Rngs, **kwargs):
    """`ctor(*args, rngs=rngs, **kwargs)` run as one compiled program, cached per (ctor, args, kwargs).

    Gives the parameters (bit for bit) and the advance of `rngs` of the same construction traced inside
    any larger jit, so a model whose repeated layers are built this way compiles each kind of layer once
    instead of one program for the whole model, whose XLA compile grows with depth (20 s on CPU for
    Qwen3-0.6B). Not the numbers of an eager call: XLA folds an initialiser's constant scale into the
    sampler (1 ulp in float32). `args` and `kwargs` must be hashable.
    """
    return _jit_construct(ctor, args, tuple(sorted(kwargs.items())), rngs)


@functools.partial(nnx.jit, static_argnums=(0, 1, 2))
def _jit_construct(ctor, args, kwargs, rngs):
    return ctor(*args, rngs=rngs, **dict(kwargs))


def _eager_construct(ctor, *args, rngs: nnx.Rngs, **kwargs):
    return ctor(*args, rngs=rngs, **kwargs)


def _normal_param(shape, axes, std, dtype, *, rngs: nnx.Rngs) -> nnx.Param:
    return param(rngs, nnx.initializers.normal(std), shape, axes, dtype)


class ModelOutput(NamedTuple):
    logits: jax.Array | None  # [B, T, V] float32 (or [B, 1, V] with logits="last")
    cache: list[dict] | None  # updated per-layer caches when a cache was passed
    hidden_states: tuple[jax.Array, ...] | None  # residual entering each block, then the final residual (pre-norm)
    mixer_inputs: tuple[jax.Array, ...] | None  # normalised input of each block's mixer
    mixer_outputs: tuple[jax.Array, ...] | None  # each mixer's output (before the residual add)


def lm_head_logits(hidden, head, dtype=jnp.float32):
    """hidden [B, ..., D] @ head [D, V] as a `dtype` matmul, float32 logits; under a mesh split
    by batch rows and over the vocabulary on the tensor axis."""
    logits = jnp.einsum("...d,dv->...v", hidden.astype(dtype), head.astype(dtype), preferred_element_type=jnp.float32)
    return constrain(logits, "b" + "." * (logits.ndim - 2) + "h")


class DecoderBlock(nnx.Module):
    """`x + mixer(input_norm(x))`, then `x + mlp(post_attention_norm(x))`."""

    def __init__(self, mixer: nnx.Module, mlp: nnx.Module, input_norm: nnx.Module, post_attention_norm: nnx.Module):
        self.mixer = mixer
        self.mlp = mlp
        self.input_norm = input_norm
        self.post_attention_norm = post_attention_norm

    def __call__(self, x, *, positions, segment_ids, cache=None):
        """Returns (x_out, new_cache, mixer_input, mixer_output). Under a mesh every [B, T, D]
        activation stays split by batch rows (`sharding.constrain`)."""
        h = constrain(self.input_norm(x), "btd")
        y, new_cache = self.mixer(h, positions=positions, segment_ids=segment_ids, cache=cache)
        x = x + constrain(y.astype(x.dtype), "btd")
        x = x + constrain(self.mlp(self.post_attention_norm(x)).astype(x.dtype), "btd")
        return x, new_cache, h, y


# False: blocks are traced inline, one copy per layer (for scripts/bench_lowering.py's comparison).
JIT_BLOCKS = True


def _run_block(block, x, positions, segment_ids, cache):
    if JIT_BLOCKS:
        return _block_call(*nnx.split(block), x, positions, segment_ids, cache)
    return block(x, positions=positions, segment_ids=segment_ids, cache=cache)


@functools.partial(jax.jit, static_argnums=0)
def _block_call(graphdef, state, x, positions, segment_ids, cache):
    """`DecoderBlock.__call__` as its own jit, traced and lowered once per distinct block.

    Blocks of one structure (every KDA block of a student, every attention block) have equal
    graphdefs and parameter shapes, so inside a model's trace they hit one cached trace and
    become calls of one lowered function: the model's lowering (its Pallas kernels lowered to
    Triton or Mosaic in Python) costs about one block of each kind instead of one per layer.
    XLA inlines the calls, so the compiled program is the same."""
    return nnx.merge(graphdef, state)(x, positions=positions, segment_ids=segment_ids, cache=cache)


def default_positions(segment_ids: jax.Array) -> jax.Array:
    """Position of each token within its segment (counting only real tokens); padding gets 0."""
    b, t = segment_ids.shape
    real = segment_ids != 0
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    # Segment of the previous real token (padding holes do not start a new document).
    last_real = jax.lax.cummax(jnp.where(real, idx, -1), axis=1)
    prev = jnp.concatenate([jnp.full((b, 1), -1, jnp.int32), last_real[:, :-1]], axis=1)
    prev_seg = jnp.where(prev >= 0, jnp.take_along_axis(segment_ids, jnp.maximum(prev, 0), axis=1), -1)
    start = real & (segment_ids != prev_seg)
    count = jnp.cumsum(real.astype(jnp.int32), axis=1) - 1
    first = jax.lax.cummax(jnp.where(start, count, 0), axis=1)
    return jnp.where(real, count - first, 0).astype(jnp.int32)


def fold_segment_ids(input_ids, attention_mask=None, segment_ids=None) -> jax.Array:
    """segment_ids (default 1) times the attention mask: 0 marks padding."""
    if segment_ids is None:
        # The barrier keeps the default ids from being a compile-time constant: the scans over them
        # (positions, document starts in the attention/KDA kernels) would otherwise be constant-folded
        # by XLA, which on GPU evaluates a `map` element by element (~2 s per scan at T = 128K).
        seg = jax.lax.optimization_barrier(jnp.ones(input_ids.shape, jnp.int32))
    else:
        seg = segment_ids.astype(jnp.int32)
    if attention_mask is not None:
        seg = seg * (attention_mask != 0).astype(jnp.int32)
    return seg


class DecoderLM(nnx.Module):
    """Embeddings + `DecoderBlock`s + final norm + lm_head. Qwen3 when every mixer is `Attention`."""

    def __init__(self, config: Qwen3Config, mixers: Sequence[nnx.Module] | None = None, *, rngs: nnx.Rngs,
                 generation_config: Mapping[str, Any] | None = None, jit_init: bool = False):
        """jit_init: build each default attention mixer, MLP and embedding table with `jit_construct` (one
        cached program per distinct piece: the numbers of one jit over the whole construction, as `Qwen3`
        gives); False: op by op, the numbers of an eager construction."""
        c = config
        build = jit_construct if jit_init else _eager_construct
        if mixers is None:
            mixers = [build(Attention.from_config, c, rngs=rngs) for _ in range(c.num_hidden_layers)]
        if len(mixers) != c.num_hidden_layers:
            raise ValueError(f"DecoderLM: got {len(mixers)} mixers for num_hidden_layers={c.num_hidden_layers}")
        dt, pdt = c.jnp_dtype, c.jnp_param_dtype
        self.config = c
        self.embed = build(_normal_param, (c.vocab_size, c.hidden_size), ("vocab", "embed"), c.initializer_range, pdt,
                           rngs=rngs)

        def norm(dim):
            return RMSNorm(dim, eps=c.rms_norm_eps, dtype=dt, param_dtype=pdt)

        self.blocks = nnx.List([
            DecoderBlock(m, build(SwiGLU, c.hidden_size, c.intermediate_size, dtype=dt, param_dtype=pdt,
                                  init_std=c.initializer_range, rngs=rngs),
                         norm(c.hidden_size), norm(c.hidden_size))
            for m in mixers
        ])
        self.norm = norm(c.hidden_size)
        self.lm_head = None if c.tie_word_embeddings else build(
            _normal_param, (c.hidden_size, c.vocab_size), ("embed", "vocab"), c.initializer_range, pdt, rngs=rngs)
        if generation_config is None:
            generation_config = {k: getattr(c, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        self.generation_config = FrozenDict(generation_config)

    def lm_head_weight(self) -> jax.Array:
        """[D, V] output projection (the transposed embeddings when tied)."""
        return self.embed[...].T if self.lm_head is None else self.lm_head[...]

    def logits(self, h: jax.Array) -> jax.Array:
        """Final-normed hidden states [..., D] -> float32 logits [..., V]."""
        return lm_head_logits(h, self.lm_head_weight(), self.config.jnp_dtype)

    def __call__(self, input_ids, attention_mask=None, **kwargs) -> jax.Array:
        """Logits [B, T, V] (float32)."""
        return self.forward(input_ids, attention_mask, **kwargs).logits

    def forward(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None, cache=None,
                output_hidden_states: bool = False, output_mixer_io: bool = False,
                logits: str = "all") -> ModelOutput:
        """Full forward. `logits`: "all", "last" (only the last position, for prefill) or "none".

        With a cache, pass `positions` (generation does); the default restarts at 0 per segment,
        which is only right for the first call on an empty cache.
        """
        if logits not in ("all", "last", "none"):
            raise ValueError(f"forward: logits={logits!r}; use 'all', 'last' or 'none'")
        if cache is not None and len(cache) != len(self.blocks):
            raise ValueError(f"forward: cache has {len(cache)} layers, the model {len(self.blocks)}")
        seg = fold_segment_ids(input_ids, attention_mask, segment_ids)
        if positions is None:
            positions = default_positions(seg)
        x = constrain(jnp.take(self.embed[...], input_ids, axis=0).astype(self.config.jnp_dtype), "btd")
        hidden, m_in, m_out, new_cache = [], [], [], []
        for i, block in enumerate(self.blocks):
            hidden.append(x)
            layer_cache = None if cache is None else cache[i]
            if self.config.remat and cache is None:
                x, c, h, y = nnx.remat(lambda blk, x_, p_, s_: _run_block(blk, x_, p_, s_, None))(
                    block, x, positions, seg)
            else:
                x, c, h, y = _run_block(block, x, positions, seg, layer_cache)
            new_cache.append(c)
            m_in.append(h)
            m_out.append(y)
        hidden.append(x)
        h_final = self.norm(x if logits != "last" else x[:, -1:])
        return ModelOutput(
            logits=None if logits == "none" else self.logits(h_final),
            cache=None if cache is None else new_cache,
            hidden_states=tuple(hidden) if output_hidden_states else None,
            mixer_inputs=tuple(m_in) if output_mixer_io else None,
            mixer_outputs=tuple(m_out) if output_mixer_io else None,
        )


def Qwen3(config: Qwen3Config, *, rngs: nnx.Rngs | None = None, **kwargs) -> DecoderLM:
    """The Qwen3 teacher: a DecoderLM with an `Attention` mixer in every block (random init).

    Each distinct piece (attention, MLP, embeddings) is initialised by one cached compiled program
    (`jit_init`): the parameters of one jit over the whole model, without compiling the whole model.
    """
    return DecoderLM(config, rngs=rngs or nnx.Rngs(0), jit_init=True, **kwargs)
