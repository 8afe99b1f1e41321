"""AllMem mixer: `SWA(xn) + alpha * Mem(xn)` with a learned per-channel gate alpha (init 0).

With alpha = 0 the mixer computes exactly what the sliding-window attention layer computes
(`y = swa + 0 * mem` is bitwise `swa`), so a freshly converted model equals the SWA model.
Memory-efficient fine-tuning trains only the memory and alpha: `allmem_trainable_filter`
(an nnx filter) or `ALLMEM_TRAINABLE_REGEX` (for the trainer's `re:` freeze groups) select
exactly those parameters.

Per-step randomisation (AllMem draws window 512-8192, sinks 0-256, chunk 512-4096):
`sample_allmem_hparams(rng)` draws values, `set_allmem_hparams(model, **values)` sets them on
every AllMem / SWA mixer of a model before the step. They are static attributes, so each
distinct value compiles once; the sampler rounds to `quantum` to bound the number of shapes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hybrid_jax.layers.params import param
from hybrid_jax.layers.swa import SlidingWindowAttention, check_window
from hybrid_jax.layers.ttt_memory import TTTMemory

# Parameter paths (nnx state paths joined by "/") of the memory and the gate of AllMem mixers.
ALLMEM_TRAINABLE_REGEX = r"(^|/)mixer/(memory|alpha)(/|$)"
_TRAINABLE = re.compile(ALLMEM_TRAINABLE_REGEX)


def allmem_trainable_filter(path, value) -> bool:
    """nnx filter: True for the AllMem memory and gate parameters, e.g. `nnx.state(model, allmem_trainable_filter)`."""
    return isinstance(value, nnx.Param) and _TRAINABLE.search("/".join(map(str, path))) is not None


class AllMem(nnx.Module):
    mixer_kind = "allmem"

    def __init__(self, swa: SlidingWindowAttention, memory: TTTMemory, hidden_size: int, *, alpha_init: float = 0.0,
                 param_dtype=jnp.float32):
        self.swa = swa
        self.memory = memory
        self.alpha = param(None, jnp.full((hidden_size,), alpha_init), (hidden_size,), ("embed",), param_dtype)

    # window / sinks / chunk_size live on the sub-layers; these properties are the trainer's knobs.
    @property
    def window(self) -> int:
        return self.swa.window

    @window.setter
    def window(self, value: int) -> None:
        check_window(value, self.swa.sinks, "AllMem")
        self.swa.window = value

    @property
    def sinks(self) -> int:
        return self.swa.sinks

    @sinks.setter
    def sinks(self, value: int) -> None:
        check_window(self.swa.window, value, "AllMem")
        self.swa.sinks = value

    @property
    def chunk_size(self) -> int:
        return self.memory.chunk_size

    @chunk_size.setter
    def chunk_size(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"AllMem: chunk_size must be an int >= 1, got {value!r}")
        self.memory.chunk_size = value

    def __call__(self, x, *, positions, segment_ids, cache=None):
        split = lambda prefix: None if cache is None else {
            **{k[len(prefix):]: v for k, v in cache.items() if k.startswith(prefix)}, "index": cache["index"]}
        y_swa, c_swa = self.swa(x, positions=positions, segment_ids=segment_ids, cache=split("swa/"))
        y_mem, c_mem = self.memory(x, positions=positions, segment_ids=segment_ids, cache=split("mem/"))
        y = y_swa + self.alpha[...].astype(y_swa.dtype) * y_mem.astype(y_swa.dtype)
        if cache is None:
            return y, None
        return y, self._join(c_swa, c_mem)

    @staticmethod
    def _join(c_swa, c_mem):
        out = {f"swa/{k}": v for k, v in c_swa.items() if k != "index"}
        out.update({f"mem/{k}": v for k, v in c_mem.items() if k != "index"})
        out["index"] = c_swa["index"]
        return out

    def init_cache(self, batch_size: int, max_length: int, dtype) -> dict[str, jax.Array]:
        return self._join(self.swa.init_cache(batch_size, max_length, dtype),
                          self.memory.init_cache(batch_size, max_length, dtype))


def _round_down(v: int, quantum: int, low: int) -> int:
    return max(low, (v // quantum) * quantum) if quantum > 1 else v


def sample_allmem_hparams(rng: np.random.Generator, *, window=(512, 8192), sinks=(0, 256), chunk_size=(512, 4096),
                          quantum: Mapping[str, int] | None = None) -> dict[str, int]:
    """Uniform draws within the inclusive ranges, rounded down to `quantum` (default window/chunk 128, sinks 64)."""
    q = {"window": 128, "sinks": 64, "chunk_size": 128, **(quantum or {})}
    out = {}
    for name, (lo, hi) in (("window", window), ("sinks", sinks), ("chunk_size", chunk_size)):
        if not 0 <= lo <= hi:
            raise ValueError(f"sample_allmem_hparams: {name} range ({lo}, {hi}) must satisfy 0 <= low <= high")
        out[name] = _round_down(int(rng.integers(lo, hi + 1)), q[name], lo)
    return out


def set_allmem_hparams(model, *, window: int | None = None, sinks: int | None = None,
                       chunk_size: int | None = None) -> int:
    """Set window / sinks (AllMem and SWA mixers) and chunk_size (AllMem) on every block; returns the count set."""
    n = 0
    for block in model.blocks:
        m = block.mixer
        if isinstance(m, (AllMem, SlidingWindowAttention)):
            if window is not None:
                m.window = window
            if sinks is not None:
                m.sinks = sinks
            if chunk_size is not None and isinstance(m, AllMem):
                m.chunk_size = chunk_size
            n += 1
    return n
