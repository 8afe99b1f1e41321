"""Kimi Delta Attention: public ops and backend dispatch.

    chunk_kda(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
              use_qk_l2norm_in_kernel=False, segment_ids=None, chunk_size=64, backend="auto",
              use_gate_in_kernel=False, A_log=None, dt_bias=None, lower_bound=None)
        -> (o [B,T,H,V] in v.dtype, final_state [B,H,K,V] float32 or None)
    fused_recurrent_kda(...same...)   decode path: one or a few tokens, state in and out
    kda_gate(g_raw, A_log, dt_bias=None, lower_bound=None) -> g float32

Backends: "auto" (Pallas on GPU / TPU, the chunked jnp oracle elsewhere), "pallas_gpu"
(Pallas Triton), "pallas_tpu" (Pallas Mosaic TPU), "interpret" (the GPU kernel bodies run
by the Pallas interpreter, for CPU tests), "reference" (the chunked jnp oracle).
"""

from __future__ import annotations

import jax

from pallas_kernels.kda.gate import kda_gate
from pallas_kernels.kda.reference import chunk_kda_reference, recurrent_kda_reference
from pallas_kernels.kda.validate import validate_kda_inputs

__all__ = ["chunk_kda", "fused_recurrent_kda", "kda_gate"]


def resolve_backend(backend: str) -> str:
    if backend != "auto":
        return backend
    platform = jax.default_backend()
    if platform == "gpu" or platform == "cuda":
        return "pallas_gpu"
    if platform == "tpu":
        return "pallas_tpu"
    return "reference"


def _tpu_kernel():
    try:
        from pallas_kernels.kda.chunk_tpu import chunk_kda_tpu
    except ImportError as e:  # the Mosaic TPU kernel lives in its own module
        raise NotImplementedError(
            "chunk_kda: backend='pallas_tpu' needs pallas_kernels/kda/chunk_tpu.py "
            f"(chunk_kda_tpu), which could not be imported ({e}). Use backend='reference'."
        ) from e
    return chunk_kda_tpu


def _check_gate_args(op, use_gate_in_kernel, A_log, dt_bias, lower_bound):
    """A_log is needed with use_gate_in_kernel and meaningless without it (`check_gate_params`,
    run by kda_gate or the fused gate kernel, checks their sizes and lower_bound's sign)."""
    if use_gate_in_kernel and A_log is None:
        raise ValueError(f"{op}: use_gate_in_kernel=True needs A_log (one value per head).")
    if not use_gate_in_kernel:
        for name, x in (("A_log", A_log), ("dt_bias", dt_bias), ("lower_bound", lower_bound)):
            if x is not None:
                raise ValueError(f"{op}: {name} is only used with use_gate_in_kernel=True "
                                 "(g is then the raw gate); pass the log-decay g alone otherwise.")


def chunk_kda(
    q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
    use_qk_l2norm_in_kernel=False, segment_ids=None, chunk_size=64, backend="auto",
    use_gate_in_kernel=False, A_log=None, dt_bias=None, lower_bound=None,
):
    """Chunkwise-parallel KDA over a whole sequence (training / prefill).

    q, k [B,T,H,K]; v [B,T,H,V]; g [B,T,H,K] per-channel log-decay (<= 0); beta [B,T,H];
    initial_state [B,H,K,V] float32; segment_ids [B,T] int (state reset at every change;
    the initial state belongs to the first token's segment). scale defaults to K**-0.5.
    use_gate_in_kernel: g is the raw gate and the log-decay is kda_gate(g, A_log, dt_bias,
    lower_bound), as fla's flag of that name; the GPU kernel then computes it together with
    the in-chunk cumsum in one pass (pallas_kernels/kda/gate_cumsum.py).
    """
    validate_kda_inputs("chunk_kda", q, k, v, g, beta, initial_state=initial_state,
                        segment_ids=segment_ids, chunk_size=chunk_size, backend=backend,
                        scale=scale)
    kwargs = dict(scale=scale, initial_state=initial_state,
                  output_final_state=output_final_state,
                  use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                  segment_ids=segment_ids, chunk_size=chunk_size)
    backend = resolve_backend(backend)
    _check_gate_args("chunk_kda", use_gate_in_kernel, A_log, dt_bias, lower_bound)
    if use_gate_in_kernel and backend in ("pallas_gpu", "interpret"):
        kwargs["gate"] = (A_log, dt_bias, lower_bound)
    elif use_gate_in_kernel:
        g = kda_gate(g, A_log, dt_bias, lower_bound)
    if backend == "reference":
        return chunk_kda_reference(q, k, v, g, beta, **kwargs)
    if backend == "pallas_tpu":
        return _tpu_kernel()(q, k, v, g, beta, **kwargs)
    if backend == "pallas_gpu" and jax.default_backend() not in ("gpu", "cuda"):
        raise ValueError(f"chunk_kda: backend='pallas_gpu' needs a GPU, but JAX runs on "
                         f"{jax.default_backend()!r}; use backend='interpret' (same kernels, "
                         f"Pallas interpreter) or 'reference'.")
    from pallas_kernels.kda.chunk_gpu import chunk_kda_gpu
    return chunk_kda_gpu(q, k, v, g, beta, interpret=(backend == "interpret"), **kwargs)


def fused_recurrent_kda(
    q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
    use_qk_l2norm_in_kernel=False, segment_ids=None, chunk_size=64, backend="auto",
    use_gate_in_kernel=False, A_log=None, dt_bias=None, lower_bound=None,
):
    """Token-by-token KDA for decoding a few tokens with the state in and out.

    Same arguments and results as `chunk_kda` (chunk_size is accepted for signature
    compatibility and ignored). Decoding is bandwidth-bound on the K x V state; a jnp scan
    is what every backend runs (XLA fuses the per-token update).
    """
    validate_kda_inputs("fused_recurrent_kda", q, k, v, g, beta, initial_state=initial_state,
                        segment_ids=segment_ids, chunk_size=chunk_size, backend=backend,
                        scale=scale)
    _check_gate_args("fused_recurrent_kda", use_gate_in_kernel, A_log, dt_bias, lower_bound)
    if use_gate_in_kernel:
        g = kda_gate(g, A_log, dt_bias, lower_bound)
    return recurrent_kda_reference(
        q, k, v, g, beta, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, segment_ids=segment_ids)
