"""Run configuration: ml_collections schemas, validation and layer-spec parsing.

A run config is `default_config()` filled in by a `configs/*.py` file (and `--config.a.b=v`
flags). Every section is locked, so a misspelt key fails at once; `validate_config` checks a
config built any other way against the same schema and checks values before any compute.

Stages live in `config.stages` under user-chosen names and run in the order of
`config.stage_order` (comma-separated), so any subset runs with `--config.stage_order=kd`.
ConfigDict sorts its keys, which is why the order is a separate field.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence

import ml_collections

MIXERS = ("attention", "kda", "gdn", "swa", "allmem")

STAGE_TYPES = {
    # type: (needs a teacher, default trainable groups, default frozen groups, default loss)
    "attention_alignment": (True, ("aligned_mixers",), (), "mse"),
    "hidden_alignment": (True, ("aligned_blocks",), (), "mse"),
    "logit_kd": (True, (), (), "forward_kl"),
    "instruct_kd": (True, (), ("attention",), "forward_kl"),
    "sft": (False, (), (), "ce"),
}

LOSS_KINDS = ("forward_kl", "reverse_kl", "jsd", "ce", "mse")
SCHEDULES = ("wsd", "cosine", "constant")
DTYPES = ("float32", "bfloat16", "float16")
MASK_MODES = ("all", "completion")

# Qwen3-0.6B (28 layers) → Hybrid-KDA: the softmax layers GenDistill keeps (1 attention : 3 KDA).
QWEN3_0P6B_KDA_ATTENTION = (0, 2, 6, 11, 13, 18, 21)


class ConfigError(ValueError):
    """A user mistake in the run configuration; the message names the key and the fix."""


# --------------------------------------------------------------------------- schemas


def _locked(d: Mapping) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict({k: (_locked(v) if isinstance(v, Mapping) else v) for k, v in d.items()})
    c.lock()
    return c


def _stage_defaults() -> dict:
    return dict(
        type="logit_kd",
        # Budget: exactly one of steps / tokens is > 0; tokens → ceil(tokens / (batch · seq_len)) steps.
        steps=0,
        tokens=0,
        # Per-stage batch shape; 0 inherits train.batch_size / train.seq_len.
        batch_size=0,
        seq_len=0,
        # Optimiser (AdamW) and learning-rate schedule.
        lr=1e-4,
        schedule="wsd",
        warmup_frac=0.1,
        decay_frac=0.1,
        min_lr_ratio=0.0,
        weight_decay=0.01,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        clip_norm=1.0,
        # Freezing: comma-separated groups or `re:<regex>` over parameter paths (see distill/freeze.py).
        # `trainable` empty = everything not frozen; None = the stage type's default.
        trainable=None,
        freeze=None,
        # Objective: a loss kind or a weighted mix "forward_kl:0.9,ce:0.1".
        loss="",
        temperature=1.0,
        top_k=0,
        jsd_beta=0.5,
        # Logit stages: sequence positions per chunk of the fused lm_head + logit loss, which never
        # holds [batch, seq_len, vocab] logits (peak O(batch · logit_chunk · vocab)); 0 = unchunked.
        logit_chunk=1024,
        # How each chunk's loss and logit gradient are formed: "auto" (Pallas kernels on a GPU for
        # forward KL / cross-entropy without top-k, else XLA), "xla", "pallas_gpu", "pallas_interpret".
        logit_kernel="auto",
        # Alignment stages: comma-separated layer indices; "" = every layer whose mixer is new.
        layers="",
        # Data for this stage; empty fields inherit the top-level `data` section.
        data=dict(source="", path="", split="", loss_mask=""),
    )


def _schema() -> dict:
    return dict(
        seed=0,
        teacher=dict(
            path="",  # HF directory or hub id; "" only when every stage is `sft` or `build` is set
            dtype="float32",
            # A pretraining config file (e.g. configs/teacher_micro.py): with `path` empty, the
            # teacher is trained by `hybrid_jax.pretrain` on first use and cached.
            build="",
        ),
        # The Qwen3 shape of a model trained from scratch (`python -m hybrid_jax.pretrain`).
        model=dict(
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=4096,
            rope_theta=10000.0,
            tie_word_embeddings=True,
        ),
        # "" path: the micro-world byte-level BPE (hybrid_jax.data.tokenizer), built once and cached.
        tokenizer=dict(path="", vocab_size=1024),
        # Evaluation at the end of a run (hybrid_jax.eval): the micro-world QA scored by
        # log-likelihood and by generation; long-context lengths as "1024,4096" ("" = skip).
        eval=dict(
            enabled=True,
            max_items=0,  # 0 = every question
            batch_size=32,
            max_new_tokens=16,
            truncation="error",  # prompts beyond the model's limit: "error" or "left"
            passkey_lengths="",
            mqar_lengths="",
            long_context_chat=False,  # ask passkey / MQAR as a chat's user turn (models trained on chats)
        ),
        export=dict(enabled=True),  # write WORKDIR/export as a Hugging Face directory
        student=dict(
            layer_spec="",  # e.g. "attention:0,2,6;kda:1,3,4,5"; or a preset name below
            preset="",
            init_from_teacher=True,
            path="",  # start from an existing student checkpoint instead of building one
            # Mixer hyperparameters {kind: {key: value}} (and {"layers": {i: {...}}}) passed to
            # build_student; keys and defaults in hybrid_jax.models.hybrid.DEFAULT_MIXER_CONFIG.
            mixers={},
            # AllMem/SWA window, sinks and memory chunk drawn per training step within these
            # inclusive ranges (AllMem's recipe); the configured values return for eval/export.
            randomize=dict(enabled=False, window=(512, 8192), sinks=(0, 256), chunk_size=(512, 4096)),
        ),
        # The `data` section is read by hybrid_jax.data.pipeline.make_batches (docs/data.md):
        # either the single-source shorthand source/path/split or a `sources` mixture list.
        data=dict(
            source="micro_world",
            path="",
            split="train",
            world=None,  # micro-world settings (hybrid_jax.data.microworld.WorldConfig fields)
            data_dir=None,  # TFDS data directory
            sources=[],  # [{"kind": "jsonl", "path": ..., "weight": 1.0, "loss_mask": ...}, ...]
            loss_mask="all",  # "completion": loss only on assistant tokens (from the chat template)
            chat_template="tokenizer",  # or "builtin" (Qwen3-style)
            overlong="split",  # documents longer than seq_len: "split" or "drop"
            shuffle=True,
            append_eos=True,
            cache_documents=500_000,
        ),
        mesh=dict(data=1, fsdp=-1, tensor=1),  # -1: all remaining devices
        train=dict(
            batch_size=8,
            seq_len=128,
            compute_dtype="float32",  # the models' `dtype`: bfloat16 computes in bf16 ...
            param_dtype="float32",  # ... while trained weights stay float32 master copies
            remat=False,  # rematerialise each block in the backward pass
            grad_accum=1,  # microbatches per step: gradients summed (token-weighted), then one update
            log_every=10,
            checkpoint_every=100,
            keep_checkpoints=3,
            async_checkpoints=True,
            max_nonfinite=10,  # stop after this many non-finite steps in a row
            progress=True,  # tqdm bar per stage
            tensorboard=True,  # TensorBoard events beside metrics.jsonl (needs tensorboardX)
        ),
        stage_order="",
        stages={},
    )


def stage_config(**overrides) -> ml_collections.ConfigDict:
    """A locked stage ConfigDict with the given fields; unknown fields raise `ConfigError`."""
    d = _stage_defaults()
    for k, v in overrides.items():
        if k not in d:
            raise ConfigError(f"stage: unknown key {k!r}; valid keys: {', '.join(sorted(d))}")
        if k == "data":
            for dk in v:
                if dk not in d["data"]:
                    raise ConfigError(f"stage.data: unknown key {dk!r}; valid keys: {', '.join(sorted(d['data']))}")
            d["data"] = {**d["data"], **v}
        else:
            d[k] = v
    c = _locked(d)
    return c


def default_config() -> ml_collections.ConfigDict:
    """The full schema with defaults; every section is locked except the names under `stages`."""
    c = _locked({k: v for k, v in _schema().items() if k != "stages"})
    with c.unlocked():
        c.stages = ml_collections.ConfigDict()
    with c.student.unlocked():
        c.student.mixers = ml_collections.ConfigDict()
    c.stages.unlock()  # stage names are the user's; each stage itself is locked (stage_config)
    c.student.mixers.unlock()  # mixer kinds are checked by build_student against its defaults
    return c


# --------------------------------------------------------------------------- validation


def _is_dict(x) -> bool:
    return isinstance(x, (Mapping, ml_collections.ConfigDict))


def _check_keys(cfg, schema: Mapping, where: str) -> None:
    for k in cfg.keys():
        if k not in schema:
            section = f" in '{where.rstrip('.')}'" if where else ""
            raise ConfigError(f"config: unknown key '{where}{k}'; valid keys{section}: {', '.join(sorted(schema))}")
        if _is_dict(schema[k]) and schema[k] and _is_dict(cfg[k]):
            _check_keys(cfg[k], schema[k], f"{where}{k}.")


def _choice(value, choices, key):
    if value not in choices:
        raise ConfigError(f"config: {key}={value!r}; choose one of {', '.join(choices)}")


def parse_loss(spec: str) -> tuple[tuple[str, float], ...]:
    """`"forward_kl"` or `"forward_kl:0.9,ce:0.1"` → ((kind, weight), ...)."""
    terms = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        kind, _, w = part.partition(":")
        kind = kind.strip()
        if kind not in LOSS_KINDS:
            raise ConfigError(f"loss: unknown kind {kind!r} in {spec!r}; known: {', '.join(LOSS_KINDS)}")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            raise ConfigError(f"loss: weight {w!r} of {kind!r} in {spec!r} is not a number") from None
        if not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"loss: weight of {kind!r} must be finite and >= 0, got {weight}")
        terms.append((kind, weight))
    if not terms:
        raise ConfigError("loss: empty loss spec; give a kind such as 'forward_kl' or a mix 'forward_kl:0.9,ce:0.1'")
    return tuple(terms)


def parse_groups(value) -> tuple[str, ...]:
    """Freeze/trainable groups: a comma-separated string or a sequence of strings."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(g.strip() for g in value.split(",") if g.strip())
    return tuple(str(g) for g in value)


def stage_names(config) -> tuple[str, ...]:
    """The stages to run, in order."""
    names = tuple(n.strip() for n in config.stage_order.split(",") if n.strip())
    if not names:
        raise ConfigError(
            f"config: stage_order is empty; name the stages to run in order, e.g. "
            f"--config.stage_order={','.join(config.stages.keys()) or 'kd'}"
        )
    for n in names:
        if n not in config.stages:
            raise ConfigError(f"config: stage_order names {n!r}, which is not in config.stages ({', '.join(config.stages.keys()) or 'none defined'})")
    if len(set(names)) != len(names):
        raise ConfigError(f"config: stage_order {config.stage_order!r} names a stage twice")
    return names


def resolved_stage(config, name: str) -> ml_collections.ConfigDict:
    """A stage with inherited fields (batch, seq_len, data, loss, freeze defaults) filled in."""
    s = config.stages[name]
    needs_teacher, trainable, frozen, loss = STAGE_TYPES[s.type]
    out = ml_collections.ConfigDict(s.to_dict(), type_safe=False)
    out.name = name
    out.needs_teacher = needs_teacher
    out.batch_size = s.batch_size or config.train.batch_size
    out.seq_len = s.seq_len or config.train.seq_len
    out.loss = s.loss or loss
    out.trainable = parse_groups(trainable if s.trainable is None else s.trainable)
    out.freeze = parse_groups(frozen if s.freeze is None else s.freeze)
    out.data = {**config.data.to_dict(), **{k: v for k, v in s.data.items() if v}}
    if s.type == "instruct_kd" and not s.data.loss_mask:
        out.data["loss_mask"] = "completion"
    out.steps = stage_steps(s, out.batch_size, out.seq_len, name=name)
    return out


def stage_steps(stage, batch_size: int, seq_len: int, *, name: str = "") -> int:
    if (stage.steps > 0) == (stage.tokens > 0):
        raise ConfigError(f"config: stages.{name or '?'}: give exactly one of steps ({stage.steps}) or tokens ({stage.tokens}) > 0")
    if stage.steps > 0:
        return int(stage.steps)
    return max(1, math.ceil(stage.tokens / (batch_size * seq_len)))


def validate_config(config) -> None:
    """Check keys and values of a run config; raises `ConfigError` naming the key and the fix."""
    schema = _schema()
    _check_keys({k: v for k, v in config.items() if k != "stages"}, {k: v for k, v in schema.items() if k != "stages"}, "")
    sdefaults = _stage_defaults()
    for name, s in config.stages.items():
        _check_keys(s, sdefaults, f"stages.{name}.")
    names = stage_names(config)
    _choice(config.teacher.dtype, DTYPES, "teacher.dtype")
    _choice(config.train.compute_dtype, DTYPES, "train.compute_dtype")
    _choice(config.train.param_dtype, DTYPES, "train.param_dtype")
    _choice(config.data.loss_mask, MASK_MODES, "data.loss_mask")
    for k in ("batch_size", "seq_len", "grad_accum", "checkpoint_every", "keep_checkpoints", "max_nonfinite", "log_every"):
        if config.train[k] <= 0:
            raise ConfigError(f"config: train.{k} must be > 0, got {config.train[k]}")
    for ax in ("data", "fsdp", "tensor"):
        if config.mesh[ax] == 0 or config.mesh[ax] < -1:
            raise ConfigError(f"config: mesh.{ax}={config.mesh[ax]}; use a positive size or -1 (all remaining devices)")
    if [config.mesh[a] for a in ("data", "fsdp", "tensor")].count(-1) > 1:
        raise ConfigError("config: at most one mesh axis may be -1")
    if config.student.layer_spec and config.student.preset:
        raise ConfigError("config: set student.layer_spec or student.preset, not both")
    if config.student.preset and config.student.preset not in PRESETS:
        raise ConfigError(f"config: student.preset={config.student.preset!r}; known presets: {', '.join(PRESETS)}")
    if config.student.layer_spec:
        parse_layer_spec(config.student.layer_spec)
    teacher_needed = False
    for name in names:
        s = config.stages[name]
        _choice(s.type, tuple(STAGE_TYPES), f"stages.{name}.type")
        _choice(s.schedule, SCHEDULES, f"stages.{name}.schedule")
        if s.data.loss_mask:
            _choice(s.data.loss_mask, MASK_MODES, f"stages.{name}.data.loss_mask")
        r = resolved_stage(config, name)
        terms = parse_loss(r.loss)
        if s.type in ("attention_alignment", "hidden_alignment") and any(k != "mse" for k, _ in terms):
            raise ConfigError(f"config: stages.{name} ({s.type}) aligns activations; its loss must be 'mse', got {r.loss!r}")
        if s.type == "sft" and any(k != "ce" for k, _ in terms):
            raise ConfigError(f"config: stages.{name} is sft (no teacher); its loss must be 'ce', got {r.loss!r}")
        if not r.lr > 0:
            raise ConfigError(f"config: stages.{name}.lr must be > 0, got {r.lr}")
        if not (s.warmup_frac >= 0 and s.decay_frac >= 0 and s.warmup_frac + s.decay_frac <= 1):
            raise ConfigError(f"config: stages.{name}: warmup_frac + decay_frac must lie in [0, 1], got {s.warmup_frac} + {s.decay_frac}")
        if s.temperature <= 0:
            raise ConfigError(f"config: stages.{name}.temperature must be > 0, got {s.temperature}")
        if not 0 < s.jsd_beta < 1:
            raise ConfigError(f"config: stages.{name}.jsd_beta must lie in (0, 1), got {s.jsd_beta}")
        if s.top_k < 0:
            raise ConfigError(f"config: stages.{name}.top_k must be >= 0 (0 = full vocabulary), got {s.top_k}")
        teacher_needed |= r.needs_teacher
    if teacher_needed and not config.teacher.build:
        check_teacher_path(config.teacher.path)
    if config.teacher.build and not config.teacher.path and not os.path.exists(config.teacher.build):
        raise ConfigError(f"config: teacher.build={config.teacher.build!r} does not exist; give a pretraining config "
                          "file such as configs/teacher_micro.py")
    _choice(config.eval.truncation, ("error", "left"), "eval.truncation")


def check_teacher_path(path: str) -> None:
    if not path:
        raise ConfigError("config: teacher.path is empty but a stage needs a teacher; set --config.teacher.path=DIR (a HF checkpoint directory)")
    if os.path.exists(os.path.expanduser(path)):
        return
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path):  # a hub id such as Qwen/Qwen3-0.6B; the loader fetches it
        return
    raise ConfigError(f"config: teacher.path {path!r} does not exist; point it at a HF checkpoint directory or a hub id")


def check_seq_len(seq_len: int, max_positions: int, *, what: str = "train.seq_len") -> None:
    """seq_len must fit the model's position limit (max_position_embeddings)."""
    if seq_len > max_positions:
        raise ConfigError(f"config: {what}={seq_len} exceeds the model's limit of {max_positions} positions (max_position_embeddings); lower it")


# --------------------------------------------------------------------------- layer specs


def parse_layer_spec(spec: str, num_layers: int | None = None) -> tuple[str, ...]:
    """`"attention:0,2;kda:1,3"` → per-layer mixer names ("attention", "kda", "attention", "kda").

    Every layer 0..num_layers-1 must be named exactly once (num_layers=None: inferred from
    the largest index). Ranges `a-b` (inclusive) are accepted.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("layer spec: empty; write e.g. 'attention:0,2,6;kda:1,3,4,5'")
    spec = PRESETS[spec](num_layers) if spec in PRESETS else spec
    owner: dict[int, str] = {}
    for group in [g.strip() for g in spec.split(";") if g.strip()]:
        mixer, sep, idx = group.partition(":")
        mixer = mixer.strip()
        if not sep:
            raise ConfigError(f"layer spec: group {group!r} lacks ':'; write '<mixer>:<layers>', e.g. 'kda:1,3'")
        if mixer not in MIXERS:
            raise ConfigError(f"layer spec: unknown mixer {mixer!r}; known mixers: {', '.join(MIXERS)}")
        for tok in [t.strip() for t in idx.split(",") if t.strip()]:
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", tok)
            if not m:
                raise ConfigError(f"layer spec: {tok!r} in group {group!r} is not a layer index or range a-b")
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            for i in range(lo, hi + 1):
                if i in owner:
                    raise ConfigError(f"layer spec: layer {i} is named twice ({owner[i]} and {mixer}); name every layer exactly once")
                owner[i] = mixer
    if not owner:
        raise ConfigError(f"layer spec {spec!r} names no layers")
    n = max(owner) + 1 if num_layers is None else num_layers
    beyond = sorted(i for i in owner if i >= n)
    if beyond:
        raise ConfigError(f"layer spec: layer(s) {beyond} out of range for a model with {n} layers (0-indexed: 0..{n - 1})")
    missing = [i for i in range(n) if i not in owner]
    if missing:
        raise ConfigError(f"layer spec: layer(s) {missing} are not named; every layer 0..{n - 1} needs exactly one mixer")
    return tuple(owner[i] for i in range(n))


def format_layer_spec(kinds: Sequence[str]) -> str:
    """Per-layer mixer names → the canonical spec string (mixers in first-use order)."""
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(kinds):
        groups.setdefault(k, []).append(i)
    return ";".join(f"{k}:{','.join(map(str, v))}" for k, v in groups.items())


def _hybrid_kda_0p6b(num_layers):
    if num_layers not in (None, 28):
        raise ConfigError(f"preset qwen3_0p6b_hybrid_kda is for the 28-layer Qwen3-0.6B, not {num_layers} layers")
    return format_layer_spec(["attention" if i in QWEN3_0P6B_KDA_ATTENTION else "kda" for i in range(28)])


def _all(mixer):
    def make(num_layers):
        if num_layers is None:
            raise ConfigError(f"preset all_{mixer} needs the teacher's layer count")
        return format_layer_spec([mixer] * num_layers)

    return make


PRESETS = {
    "qwen3_0p6b_hybrid_kda": _hybrid_kda_0p6b,
    "all_allmem": _all("allmem"),
    "all_kda": _all("kda"),
}
