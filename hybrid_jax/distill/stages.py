"""Stage types: what a step computes, given the student, the teacher and a batch.

* attention_alignment  each new mixer, fed its teacher layer's mixer input, reproduces the
                       teacher mixer's output (MSE); layers are independent, only the
                       aligned mixers train.
* hidden_alignment     each aligned block, fed the teacher's residual stream entering it,
                       reproduces the teacher's residual leaving it (MSE); blocks independent.
* logit_kd             end-to-end KD on the student's logits (forward KL by default).
* instruct_kd          logit KD on chat data with completion-only masks; attention frozen.
* sft                  cross-entropy on next tokens, no teacher (also pretrains a teacher).

Logit stages compute lm_head and loss together, `logit_chunk` positions at a time
(`LogitLoss.compute_loss_from_hidden`), unless `logit_chunk` = 0.

Models follow the DecoderLM contract (hybrid_jax/models/qwen3.py): `forward(input_ids, *,
positions, segment_ids, output_hidden_states, output_mixer_io)` returns `.logits`,
`.hidden_states` (residual entering each block, then the final residual), `.mixer_inputs`,
`.mixer_outputs`; blocks live in `model.blocks`, each with a `.mixer` following the mixer
contract of docs/architecture.md. Batches are dicts with input_ids, segment_ids, positions
and loss_mask [B, T].
"""

from __future__ import annotations

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.config import ConfigError, parse_loss
from hybrid_jax.distill.losses import ActivationMSE, LogitLoss, prediction_mask, real_token_mask


def mixer_kind(mixer) -> str:
    """A mixer's name in layer specs: its `mixer_kind` attribute, else inferred from its class."""
    kind = getattr(mixer, "mixer_kind", None)
    if isinstance(kind, str):
        return kind
    name = type(mixer).__name__.lower()
    if name == "attention":
        return "swa" if getattr(mixer, "window", None) else "attention"
    for k in ("allmem", "gdn", "kda", "swa"):
        if k in name:
            return k
    return name


def layer_kinds(model) -> tuple[str, ...]:
    return tuple(mixer_kind(b.mixer) for b in model.blocks)


def new_layers(student, teacher) -> tuple[int, ...]:
    """Layers whose student mixer is not the teacher's kind of mixer."""
    s, t = layer_kinds(student), layer_kinds(teacher)
    if len(s) != len(t):
        raise ConfigError(f"student has {len(s)} layers but the teacher {len(t)}; build the student from this teacher")
    return tuple(i for i, (a, b) in enumerate(zip(s, t, strict=True)) if a != b)


def _forward(model, batch, **kw):
    """Model forward on a batch; asks for no logits when only activations are used (if supported)."""
    if kw.pop("no_logits", False) and "logits" in inspect.signature(model.forward).parameters:
        kw["logits"] = "none"
    return model.forward(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"], **kw)


def _final_hidden(model, batch):
    """(final-normed hidden states [B, T, D], lm_head weight [D, V]): what `model.logits` multiplies."""
    out = _forward(model, batch, output_hidden_states=True, no_logits=True)
    return model.norm(out.hidden_states[-1]), model.lm_head_weight()


@dataclasses.dataclass(frozen=True)
class Stage:
    """One resolved stage: budget, optimiser settings (in `cfg`), aligned layers and objective."""

    name: str
    type: str
    steps: int
    batch_size: int
    seq_len: int
    cfg: object  # the resolved stage ConfigDict (config.resolved_stage)
    layers: tuple[int, ...] = ()
    logit_loss: LogitLoss | None = None

    @property
    def needs_teacher(self) -> bool:
        return self.logit_loss is None or self.logit_loss.needs_teacher

    def loss_weight(self, batch) -> jax.Array:
        """The number of positions `compute_loss` averages over for this batch (its loss is a
        mean over them): the real tokens for the alignment stages, the target positions for
        the logit stages. Gradient accumulation weights microbatches by it, so the summed
        gradient equals the whole batch's."""
        if self.type in ("attention_alignment", "hidden_alignment"):
            return jnp.sum(real_token_mask(batch))
        return jnp.sum(prediction_mask(batch))

    def compute_loss(self, student, teacher, batch):
        """(scalar float32 loss, metrics) for one batch; gradients flow only into the student."""
        if self.type == "attention_alignment":
            t = jax.lax.stop_gradient(_forward(teacher, batch, output_mixer_io=True, no_logits=True))
            ys = [
                student.blocks[i].mixer(t.mixer_inputs[i], positions=batch["positions"], segment_ids=batch["segment_ids"])[0]
                for i in self.layers
            ]
            return ActivationMSE().compute_loss(ys, [t.mixer_outputs[i] for i in self.layers], batch, self.layers)
        if self.type == "hidden_alignment":
            t = jax.lax.stop_gradient(_forward(teacher, batch, output_hidden_states=True, no_logits=True))
            ys = [
                student.blocks[i](t.hidden_states[i], positions=batch["positions"], segment_ids=batch["segment_ids"])[0]
                for i in self.layers
            ]
            return ActivationMSE().compute_loss(ys, [t.hidden_states[i + 1] for i in self.layers], batch, self.layers)
        chunk = self.cfg.logit_chunk
        if chunk:
            s_hidden, s_head = _final_hidden(student, batch)
            t_hidden = t_head = None
            t_dtype = s_dtype = student.config.jnp_dtype
            if self.logit_loss.needs_teacher:
                t_hidden, t_head = jax.lax.stop_gradient(_final_hidden(teacher, batch))
                t_dtype = teacher.config.jnp_dtype
            return self.logit_loss.compute_loss_from_hidden(s_hidden, s_head, t_hidden, t_head, batch, chunk=chunk,
                                                            student_dtype=s_dtype, teacher_dtype=t_dtype,
                                                            kernel=self.cfg.logit_kernel)
        s_logits = _forward(student, batch).logits
        t_logits = None
        if self.logit_loss.needs_teacher:
            t_logits = jax.lax.stop_gradient(_forward(teacher, batch).logits)
        return self.logit_loss.compute_loss(s_logits, t_logits, batch)


def _parse_layers(text: str, num_layers: int, stage: str) -> tuple[int, ...]:
    try:
        layers = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise ConfigError(f"stage {stage!r}: layers={text!r} must be comma-separated layer indices") from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"stage {stage!r}: layers {bad} out of range for {num_layers} layers")
    return layers


def build_stage(cfg, student, teacher=None) -> Stage:
    """A Stage from a resolved stage config (`config.resolved_stage`)."""
    terms = parse_loss(cfg.loss)
    layers: tuple[int, ...] = ()
    logit_loss = None
    if cfg.type in ("attention_alignment", "hidden_alignment"):
        if teacher is None:
            raise ConfigError(f"stage {cfg.name!r} ({cfg.type}) needs a teacher model")
        n = len(student.blocks)
        layers = _parse_layers(cfg.layers, n, cfg.name) if cfg.layers else new_layers(student, teacher)
        if not layers:
            raise ConfigError(
                f"stage {cfg.name!r} ({cfg.type}): no layer to align (the student's mixers all match the teacher's); "
                f"set stages.{cfg.name}.layers or drop the stage"
            )
    else:
        logit_loss = LogitLoss(terms=terms, temperature=cfg.temperature, top_k=cfg.top_k, jsd_beta=cfg.jsd_beta)
        if logit_loss.needs_teacher and teacher is None:
            raise ConfigError(f"stage {cfg.name!r}: loss {cfg.loss!r} needs a teacher model; load one (teacher.path) or use loss 'ce'")
        if cfg.logit_chunk < 0:
            raise ConfigError(f"stages.{cfg.name}.logit_chunk={cfg.logit_chunk}; use a positive number of positions per chunk, or 0 for unchunked logits")
        if cfg.logit_chunk:
            for model, what in ((student, "student"), (teacher if logit_loss.needs_teacher else None, "teacher")):
                if model is not None and not all(hasattr(model, a) for a in ("norm", "lm_head_weight", "config")):
                    raise ConfigError(f"stages.{cfg.name}.logit_chunk={cfg.logit_chunk} needs a DecoderLM {what} (final `norm`, "
                                      f"`lm_head_weight()`); this {what} is a {type(model).__name__}: set logit_chunk=0")
            logit_loss.resolve_kernel(cfg.logit_kernel, student.config.vocab_size)
    return Stage(
        name=cfg.name, type=cfg.type, steps=cfg.steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, cfg=cfg, layers=layers, logit_loss=logit_loss
    )


def count_tokens(batch) -> int:
    """Real (non-padding) tokens in a host batch."""
    return int(np.sum(np.asarray(batch["segment_ids"]) > 0))
