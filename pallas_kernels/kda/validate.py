"""Argument checks shared by every KDA backend (run before any kernel is traced)."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

BACKENDS = ("auto", "pallas_gpu", "pallas_tpu", "interpret", "reference")
MAX_HEAD_DIM = 256  # K and V limit of the Pallas kernels
KERNEL_CHUNK_SIZES = (32, 64)


class KDADims(NamedTuple):
    B: int
    T: int
    H: int
    K: int
    V: int


def _shape(x):
    return tuple(getattr(x, "shape", ()))


def validate_kda_inputs(
    op, q, k, v, g, beta, *, initial_state=None, segment_ids=None, chunk_size=64,
    backend="auto", scale=None,
) -> KDADims:
    """Raise ValueError naming the offending argument; return the dimensions."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r} is not one of {BACKENDS}.")
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        dtype = getattr(x, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{op}: {name} must be a floating-point array; got {dtype}.")
    if len(_shape(q)) != 4:
        raise ValueError(f"{op}: q must be [B, T, H, K]; got shape {_shape(q)}.")
    B, T, H, K = _shape(q)
    if T == 0:
        raise ValueError(f"{op}: q has an empty time axis (T=0); pass at least one token.")
    if _shape(k) != (B, T, H, K):
        raise ValueError(f"{op}: k must have q's shape {(B, T, H, K)}; got {_shape(k)}.")
    if len(_shape(v)) != 4 or _shape(v)[:3] != (B, T, H):
        raise ValueError(f"{op}: v must be [B, T, H, V] = [{B}, {T}, {H}, V]; got {_shape(v)}.")
    V = _shape(v)[3]
    if _shape(g) != (B, T, H, K):
        raise ValueError(f"{op}: g (per-channel log-decay) must be [B, T, H, K] = "
                         f"{(B, T, H, K)}; got {_shape(g)}.")
    if _shape(beta) != (B, T, H):
        raise ValueError(f"{op}: beta must be [B, T, H] = {(B, T, H)}; got {_shape(beta)}.")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"{op}: q, k and v must share one dtype; got q {q.dtype}, "
                         f"k {k.dtype}, v {v.dtype}. Cast them to one dtype first.")
    if initial_state is not None:
        if _shape(initial_state) != (B, H, K, V):
            raise ValueError(f"{op}: initial_state must be [B, H, K, V] = {(B, H, K, V)}; "
                             f"got {_shape(initial_state)}.")
        if initial_state.dtype != jnp.float32:
            raise ValueError(f"{op}: initial_state must be float32 (states are kept in fp32); "
                             f"got {initial_state.dtype}.")
    if segment_ids is not None:
        if _shape(segment_ids) != (B, T):
            raise ValueError(f"{op}: segment_ids must be [B, T] = {(B, T)}; "
                             f"got {_shape(segment_ids)}.")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"{op}: segment_ids must be an integer array; "
                             f"got {segment_ids.dtype}.")
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"{op}: scale must be a Python number or None; got {type(scale)}.")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"{op}: chunk_size must be a positive int; got {chunk_size!r}.")
    if backend != "reference":
        if chunk_size not in KERNEL_CHUNK_SIZES:
            raise ValueError(f"{op}: chunk_size={chunk_size} is not supported by the Pallas "
                             f"kernels; use one of {KERNEL_CHUNK_SIZES} (or backend='reference').")
        for name, d in (("K (q/k head dim)", K), ("V (v head dim)", V)):
            if d > MAX_HEAD_DIM:
                raise ValueError(f"{op}: {name}={d} exceeds the kernel limit {MAX_HEAD_DIM}; "
                                 f"split heads or use backend='reference'.")
    return KDADims(B, T, H, K, V)
