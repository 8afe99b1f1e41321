"""Test-time-training memory (AllMem): a residual SwiGLU MLP whose fast weights learn in context.

Public ops:

    o, state = ttt_memory(q, k, v, lr, momentum, decay, weights0=(w1, w2, w3), chunk_size=512)
    o_t, state = ttt_memory_step(q_t, k_t, v_t, lr_t, momentum_t, decay_t, state,
                                 weights0=(w1, w2, w3), chunk_size=512)

See docs/ttt.md for the exact semantics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.ttt.chunk import TTTState, init_state, ttt_memory_chunked
from pallas_kernels.ttt.reference import ttt_memory_reference

__all__ = ["TTTState", "init_state", "ttt_memory", "ttt_memory_step", "ttt_memory_reference"]

_BACKENDS = ("auto", "scan", "reference", "pallas_gpu", "pallas_tpu", "interpret")


def _check(q, k, v, lr, momentum, decay, weights0, chunk_size, segment_ids, initial_state):
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, H, D], got shape {q.shape}")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {q.shape}, got {x.shape}")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}; cast q, k, v to one dtype")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise TypeError(f"q, k, v must be floating point, got {q.dtype}")
    B, T, H, D = q.shape
    if T < 1:
        raise ValueError(f"q, k, v need at least one token, got T={T}")
    for name, x in (("lr", lr), ("momentum", momentum), ("decay", decay)):
        if x.shape != (B, T, H):
            raise ValueError(f"{name} must be [B, T, H] = {(B, T, H)}, got {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive Python int, got {chunk_size!r}")
    if not (isinstance(weights0, (tuple, list)) and len(weights0) == 3):
        raise ValueError("weights0 must be a tuple (w1 [H,D,F], w2 [H,F,D], w3 [H,D,F])")
    w1, w2, w3 = weights0
    if w1.ndim != 3 or w1.shape[:2] != (H, D):
        raise ValueError(f"weights0[0] (w1) must be [H, D, F] with H={H}, D={D}, got {w1.shape}")
    F = w1.shape[2]
    if w2.shape != (H, F, D):
        raise ValueError(f"weights0[1] (w2) must be [H, F, D] = {(H, F, D)}, got {w2.shape}")
    if w3.shape != (H, D, F):
        raise ValueError(f"weights0[2] (w3) must be [H, D, F] = {(H, D, F)}, got {w3.shape}")
    if segment_ids is not None:
        if segment_ids.shape != (B, T):
            raise ValueError(f"segment_ids must be [B, T] = {(B, T)}, got {segment_ids.shape}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise TypeError(f"segment_ids must be integers, got {segment_ids.dtype}")
    if initial_state is not None:
        if not isinstance(initial_state, TTTState):
            raise TypeError("initial_state must be a TTTState (the final_state of an earlier call, "
                            "or pallas_kernels.ttt.init_state(weights0, batch_size))")
        ref = init_state(weights0, B)
        for got, want in zip(jax.tree.leaves(initial_state), jax.tree.leaves(ref), strict=True):
            if got.shape != want.shape or got.dtype != want.dtype:
                raise ValueError(f"initial_state does not match B={B}, H={H}, D={D}, F={F}: leaf "
                                 f"{got.shape} {got.dtype}, expected {want.shape} {want.dtype}")


def ttt_memory(q, k, v, lr, momentum, decay, *, weights0, chunk_size=512, segment_ids=None,
               initial_state=None, output_final_state=False, normalize=True, eps=1e-6,
               backend="auto"):
    """AllMem test-time-training memory, read-then-update per chunk.

    Args:
      q, k, v: [B, T, H, D] (one dtype). The memory reads f_W(q) and learns k -> v.
      lr: [B, T, H] per-token inner learning rate (e.g. softplus output, >= 0).
      momentum: [B, T, H] momentum factor in (0, 1); the value at a chunk's closing token is used.
      decay: [B, T, H] forgetting factor alpha in (0, 1): W <- (1 - alpha) W + S; read at the
        chunk's closing token, like `momentum`.
      weights0: (w1 [H,D,F], w2 [H,F,D], w3 [H,D,F]) initial fast weights (learned params);
        every segment starts from them.
      chunk_size: tokens per update, counted from each segment's start.
      segment_ids: [B, T] ints; the memory resets to weights0 at every change (0 = padding,
        treated as any other segment). None: one segment.
      initial_state: TTTState to continue from (see `init_state`); None: fresh.
      output_final_state: also return the state after the last token.
      normalize: RMS-normalise each head's read over D (no learned scale).
      backend: "auto" or "scan" (fused chunkwise scan, all platforms) or "reference"
        (token-by-token oracle; no initial_state).

    Returns:
      (o [B, T, H, D] in q's dtype, final TTTState or None).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend in ("pallas_gpu", "pallas_tpu", "interpret"):
        raise ValueError(f"ttt_memory has no Pallas kernel (backend={backend!r}); the fused "
                         "lax.scan ('scan', what 'auto' picks) is its fast path on every platform")
    _check(q, k, v, lr, momentum, decay, weights0, chunk_size, segment_ids, initial_state)
    if backend == "reference":
        if initial_state is not None or output_final_state:
            raise ValueError("backend='reference' neither takes nor returns a TTTState; "
                             "use backend='scan' for initial_state / output_final_state")
        o, _ = ttt_memory_reference(q, k, v, lr, momentum, decay, weights0=weights0,
                                    chunk_size=chunk_size, segment_ids=segment_ids,
                                    normalize=normalize, eps=eps)
        return o, None
    o, final = ttt_memory_chunked(q, k, v, lr, momentum, decay, weights0=tuple(weights0),
                                  chunk_size=chunk_size, segment_ids=segment_ids,
                                  initial_state=initial_state, normalize=normalize, eps=eps)
    return o, (final if output_final_state else None)


def ttt_memory_step(q, k, v, lr, momentum, decay, state, *, weights0, chunk_size=512,
                    segment_ids=None, normalize=True, eps=1e-6):
    """One decode token: q, k, v [B, H, D]; lr, momentum, decay [B, H]; segment_ids [B] or None.

    Returns (o [B, H, D], new TTTState). Running `ttt_memory` on a prompt with
    output_final_state=True and then this step per new token equals `ttt_memory` on the
    whole sequence.
    """
    if state is None:
        raise ValueError("state is required: pass init_state(weights0, batch_size) or the "
                         "final_state of a prefill call")
    if q.ndim != 3:
        raise ValueError(f"q must be one token [B, H, D], got shape {q.shape}")
    seq = lambda x: None if x is None else x[:, None]
    o, new = ttt_memory(seq(q), seq(k), seq(v), seq(lr), seq(momentum), seq(decay),
                        weights0=weights0, chunk_size=chunk_size, segment_ids=seq(segment_ids),
                        initial_state=state, output_final_state=True, normalize=normalize,
                        eps=eps, backend="scan")
    return o[:, 0], new
