"""Parameter creation with logical axis names (see docs/architecture.md, "Parameters").

Every parameter in the project is made here so that the logical axis names live in one
metadata key (`out_sharding`, Flax's name for them) that `hybrid_jax.sharding` reads.
Eager sharding is off: modules are built on any device count and placed afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

LOGICAL_AXES = ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "conv", "norm", "layers")


def param(
    rngs: nnx.Rngs | None,
    init: Callable[..., jax.Array] | jax.Array,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype=jnp.float32,
) -> nnx.Param:
    """An `nnx.Param` of `shape` with logical `axes`; `init` is an initializer or a value."""
    if len(axes) != len(shape):
        raise ValueError(f"param: {len(shape)}-d shape {tuple(shape)} needs {len(shape)} axis names, got {tuple(axes)}")
    for a in axes:
        if a is not None and a not in LOGICAL_AXES:
            raise ValueError(f"param: unknown logical axis {a!r}; known: {LOGICAL_AXES}")
    if callable(init):
        value = init(rngs.params(), tuple(shape), dtype)
    else:
        value = jnp.asarray(init, dtype).reshape(shape)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def logical_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names of a variable, or None if it carries none."""
    return variable.get_metadata().get("out_sharding")
