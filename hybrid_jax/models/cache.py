"""Decode caches: one flat dict of arrays per layer, built by each mixer's `init_cache`.

The model's cache is a list with one dict per block; every dict holds an int32 scalar "index"
(tokens already written, equal for all rows because prompts are left-padded). The generation
loop only calls `init_cache` and passes the list through the model, so a new mixer (KDA state,
ring buffer, TTT memory) adds its own keys without touching the loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def kv_cache(batch_size: int, max_length: int, num_kv_heads: int, head_dim: int, dtype) -> dict[str, jax.Array]:
    """Attention cache: keys/values [B, S, KH, hd] and key segment ids [B, S] (0 = empty or padding)."""
    return {
        "k": jnp.zeros((batch_size, max_length, num_kv_heads, head_dim), dtype),
        "v": jnp.zeros((batch_size, max_length, num_kv_heads, head_dim), dtype),
        "segment_ids": jnp.zeros((batch_size, max_length), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def append_kv(cache: dict, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> dict:
    """Write T new keys/values at `cache["index"]` and advance it by T."""
    i = cache["index"]
    return {
        **cache,
        "k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, i, 0, 0)),
        "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, i, 0, 0)),
        "segment_ids": jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids.astype(jnp.int32), (0, i)),
        "index": i + k.shape[1],
    }


def init_cache(model, batch_size: int, max_length: int, dtype=None) -> list[dict[str, jax.Array]]:
    """One cache dict per block of `model` (a DecoderLM), from each mixer's own `init_cache`."""
    dtype = dtype or model.config.jnp_dtype
    return [block.mixer.init_cache(batch_size, max_length, dtype) for block in model.blocks]


def cache_index(cache: list[dict]) -> jax.Array:
    """Tokens already written (all layers advance together)."""
    return cache[0]["index"]


def cache_bytes(cache: list[dict]) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache))
