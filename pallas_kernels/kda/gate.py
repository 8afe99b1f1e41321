"""KDA log-decay gate (float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def kda_gate(g_raw, A_log, dt_bias=None, lower_bound=None):
    """Per-channel log-decay g <= 0 of KDA, in float32.

    g_raw [..., H, K]; A_log [H] (any shape with H elements); dt_bias [H*K] or [H, K] or None.
      lower_bound is None:  g = -exp(A_log[h]) * softplus(g_raw + dt_bias)
      lower_bound < 0:      g = lower_bound * sigmoid(exp(A_log[h]) * (g_raw + dt_bias))
    (fla's `naive_kda_gate` / `naive_kda_lowerbound_gate`.) Differentiable by jax autodiff;
    softplus and sigmoid are the numerically stable jax.nn forms.
    """
    if g_raw.ndim < 2:
        raise ValueError(f"kda_gate: g_raw must be [..., H, K]; got shape {g_raw.shape}.")
    H, K = g_raw.shape[-2:]
    check_gate_params("kda_gate", H, K, A_log, dt_bias, lower_bound)
    x = g_raw.astype(jnp.float32)
    if dt_bias is not None:
        x = x + dt_bias.astype(jnp.float32).reshape(H, K)
    rate = jnp.exp(A_log.astype(jnp.float32).reshape(H, 1))
    if lower_bound is None:
        return -rate * jax.nn.softplus(x)
    return lower_bound * jax.nn.sigmoid(rate * x)


def check_gate_params(fn, H, K, A_log, dt_bias, lower_bound):
    """ValueError naming the argument: A_log with H elements, dt_bias with H*K or None,
    lower_bound negative or None (every form of the gate: kda_gate and gate_cumsum.py)."""
    if A_log.size != H:
        raise ValueError(f"{fn}: A_log must have H={H} elements (one per head); "
                         f"got shape {A_log.shape}.")
    if dt_bias is not None and dt_bias.size != H * K:
        raise ValueError(f"{fn}: dt_bias must have H*K={H * K} elements ([H*K] or [H, K]); "
                         f"got shape {dt_bias.shape}.")
    if lower_bound is not None and not lower_bound < 0:
        raise ValueError(f"{fn}: lower_bound must be negative (a log-decay floor) or None; "
                         f"got {lower_bound}.")
