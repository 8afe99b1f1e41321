"""Sliding-window flash attention with sinks, GQA and packed segments.

    from pallas_kernels.swa import swa_attention
    o = swa_attention(q, k, v, window=4096, sinks=0, segment_ids=None)

See ``reference.py`` for the exact visibility rule every backend implements.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.swa.reference import swa_attention_reference

BACKENDS = ("auto", "pallas_gpu", "pallas_tpu", "interpret", "reference", "cudnn")


def _check_int(name, value, minimum, fix):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"swa_attention: `{name}` must be a Python int (it shapes the kernel's "
                        f"block loops), got {type(value).__name__} {value!r}; {fix}")
    if value < minimum:
        raise ValueError(f"swa_attention: `{name}` must be >= {minimum}, got {value}; {fix}")
    return int(value)


def validate(q, k, v, *, window, sinks, segment_ids, scale, backend):
    """Checks every argument; returns (window, sinks) as ints."""
    window = _check_int("window", window, 1,
                        "use window >= T for full causal attention")
    sinks = _check_int("sinks", sinks, 0, "use sinks=0 for no sink tokens")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"swa_attention: `{name}` must be 4-D [batch, time, heads, head_dim], "
                             f"got shape {getattr(x, 'shape', None)}")
    if k.shape != v.shape:
        raise ValueError(f"swa_attention: `k` {k.shape} and `v` {v.shape} must have the same shape")
    b, t, hq, d = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, t, d):
        raise ValueError(f"swa_attention: `k` shape {k.shape} must match `q` shape {q.shape} in "
                         "batch, time and head_dim (only the head count may differ, for GQA)")
    hkv = k.shape[2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"swa_attention: the kv head count of `k`/`v` ({hkv}) must divide the "
                         f"query head count of `q` ({hq}) (grouped-query attention)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"swa_attention: `q`, `k`, `v` must share one dtype, got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}; cast them before the call")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise TypeError(f"swa_attention: `q` must be a floating dtype, got {q.dtype}")
    if segment_ids is not None:
        if getattr(segment_ids, "shape", None) != (b, t):
            raise ValueError(f"swa_attention: `segment_ids` must have shape [batch, time] = "
                             f"{(b, t)}, got {getattr(segment_ids, 'shape', None)}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise TypeError(f"swa_attention: `segment_ids` must be integer, got {segment_ids.dtype}")
    if scale is not None and (not isinstance(scale, numbers.Real) or not scale > 0):
        raise ValueError(f"swa_attention: `scale` must be a positive Python float or None "
                         f"(default head_dim ** -0.5), got {scale!r}")
    if backend not in BACKENDS:
        raise ValueError(f"swa_attention: `backend` must be one of {BACKENDS}, got {backend!r}")
    return window, sinks


def swa_attention(q, k, v, *, window, sinks=0, segment_ids=None, scale=None, backend="auto"):
    """Causal attention over the last `window` tokens plus `sinks` first tokens per document.

    Args:
      q: [B, T, Hq, D] queries.
      k, v: [B, T, Hkv, D] keys and values; Hkv divides Hq (grouped-query attention).
      window: keys t-window+1 .. t are visible to query t (window >= T: full causal).
      sinks: the first `sinks` tokens of the query's document stay visible.
      segment_ids: optional int [B, T]; a document is a run of equal ids, 0 = padding
        (its own run, so padded rows stay finite). Queries never see other documents.
      scale: logit scale, default D ** -0.5.
      backend: "auto" | "pallas_gpu" | "pallas_tpu" | "interpret" | "reference" | "cudnn".
        "auto": on GPU cuDNN where it can express the call, else "pallas_gpu" (a Mosaic GPU
        forward on Hopper, Triton elsewhere; Triton backward); the Mosaic kernel on TPU; the
        reference elsewhere. "interpret" runs the TPU kernel in Pallas's interpreter (any
        platform). "cudnn" is jax.nn.dot_product_attention(implementation="cudnn"): no sinks
        or segments.

    Returns:
      o: [B, T, Hq, D] in q.dtype.
    """
    window, sinks = validate(q, k, v, window=window, sinks=sinks, segment_ids=segment_ids,
                             scale=scale, backend=backend)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    kwargs = dict(window=window, sinks=sinks, segment_ids=segment_ids, scale=scale)
    if backend == "auto":
        backend = _auto_backend(q, sinks, segment_ids)
    if backend == "reference":
        return swa_attention_reference(q, k, v, **kwargs)
    if backend == "cudnn":
        return _cudnn(q, k, v, **kwargs)
    if backend == "pallas_gpu":
        from pallas_kernels.swa.gpu import swa_attention_gpu
        return swa_attention_gpu(q, k, v, **kwargs)
    from pallas_kernels.swa.tpu import swa_attention_tpu
    return swa_attention_tpu(q, k, v, interpret=backend == "interpret", **kwargs)


def _cudnn_can(q, sinks, segment_ids):
    return (sinks == 0 and segment_ids is None and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)


def _auto_backend(q, sinks, segment_ids):
    platform = jax.default_backend()
    if platform == "gpu":
        # Forward, our Mosaic GPU kernel and cuDNN tie; forward+backward, cuDNN measured
        # 1.18-1.20x faster (docs/benchmarks.md). So cuDNN takes every call it can express.
        if _cudnn_can(q, sinks, segment_ids):
            return "cudnn"
        return "pallas_gpu"
    if platform == "tpu":
        return "pallas_tpu"
    return "reference"


def _cudnn(q, k, v, *, window, sinks, segment_ids, scale):
    if not _cudnn_can(q, sinks, segment_ids):
        raise ValueError("swa_attention(backend='cudnn') needs sinks=0, segment_ids=None, a "
                         "bfloat16/float16 dtype and head_dim <= 128 (multiple of 8); use "
                         "backend='pallas_gpu' for the rest")
    t = q.shape[1]
    # local_window_size=(left, right): query i sees keys i-left .. i+right.
    local = None if window >= t else (window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                        local_window_size=local, implementation="cudnn")


__all__ = ["swa_attention", "swa_attention_reference", "BACKENDS"]
