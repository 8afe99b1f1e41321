"""AdamW with warmup-stable-decay / cosine / constant schedules and gradient clipping.

The optimiser sees only the trainable parameters (a flat dict path → fp32 array): frozen
parameters carry no state. Master weights stay float32; bf16 compute is a cast inside the
train step, so updates accumulate in fp32. Weight decay skips A_log, dt_bias, norm scales
and biases (selected by path).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import jax.numpy as jnp
import optax

from hybrid_jax.config import ConfigError

_NO_DECAY = re.compile(r"(^|/)(A_log|dt_bias|bias|[^/]*_bias)(/|$)|(^|/)[^/]*norm[^/]*(/|$)")


def no_weight_decay(path: str) -> bool:
    """True for parameters that weight decay must not pull towards 0."""
    return _NO_DECAY.search(path) is not None


def lr_schedule(*, lr: float, steps: int, schedule: str = "wsd", warmup_frac: float = 0.1, decay_frac: float = 0.1, min_lr_ratio: float = 0.0):
    """Learning rate as a function of the update count (0-based).

    Warmup rises linearly to `lr` reaching it at update `warmup` (the first update already
    uses lr/warmup, never 0). `wsd` then holds `lr` and decays linearly over the last
    `decay_frac` of the steps towards `min_lr_ratio·lr`; `cosine` follows a half cosine from
    the end of warmup to `min_lr_ratio·lr` at the last step; `constant` holds `lr`.
    """
    if steps <= 0:
        raise ConfigError(f"lr_schedule: steps must be > 0, got {steps}")
    warmup = int(round(warmup_frac * steps))
    decay = int(round(decay_frac * steps)) if schedule == "wsd" else 0
    lr_min = lr * min_lr_ratio

    def fn(count):
        c = jnp.asarray(count, jnp.float32)
        warm = lr * jnp.minimum((c + 1.0) / max(warmup, 1), 1.0) if warmup else jnp.float32(lr)
        if schedule == "constant":
            return warm
        if schedule == "wsd":
            start = steps - decay
            frac = jnp.clip((c - start + 1.0) / (decay + 1), 0.0, 1.0) if decay else 0.0
            return jnp.where(c < warmup, warm, lr - (lr - lr_min) * frac)
        if schedule == "cosine":
            span = max(steps - warmup - 1, 1)
            t = jnp.clip((c - warmup) / span, 0.0, 1.0)
            return jnp.where(c < warmup, warm, lr_min + 0.5 * (lr - lr_min) * (1.0 + jnp.cos(math.pi * t)))
        raise ConfigError(f"lr_schedule: unknown schedule {schedule!r}; use wsd, cosine or constant")

    fn(0)  # validates the schedule name eagerly
    return fn


def make_optimizer(stage, steps: int, trainable_paths: Iterable[str]):
    """(AdamW transformation, lr schedule) for one stage over a dict {path: param}.

    `stage` is a resolved stage config. The chain is optax.adamw's (scale_by_adam,
    masked add_decayed_weights, scale_by_learning_rate) behind optional global-norm
    clipping, spelt out so `current_lr` can read the schedule's step count.
    """
    paths = list(trainable_paths)
    sched = lr_schedule(
        lr=stage.lr, steps=steps, schedule=stage.schedule, warmup_frac=stage.warmup_frac, decay_frac=stage.decay_frac, min_lr_ratio=stage.min_lr_ratio
    )
    mask = {p: not no_weight_decay(p) for p in paths}
    parts = [optax.clip_by_global_norm(stage.clip_norm)] if stage.clip_norm and stage.clip_norm > 0 else []
    parts += [
        optax.scale_by_adam(b1=stage.b1, b2=stage.b2, eps=stage.eps),
        optax.add_decayed_weights(stage.weight_decay, mask),
        optax.scale_by_learning_rate(sched),
    ]
    return optax.chain(*parts), sched


def current_lr(opt_state, schedule):
    """The learning rate the next update of `make_optimizer`'s chain uses."""
    return schedule(opt_state[-1].count)
