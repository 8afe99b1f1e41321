"""KDA's in-chunk cumulative log-decay as one Pallas (Triton) kernel, the gate optionally fused.

    chunk_local_cumsum(g, chunk_size)                   G = in-chunk inclusive cumsum of g
    chunk_local_gate_cumsum(g_raw, A_log, dt_bias, chunk_size=, length=, lower_bound=)
        G = in-chunk cumsum of kda_gate(g_raw, A_log, dt_bias, lower_bound), rows t >= length
        zeroed first (padding tokens: zero log-decay leaves the recurrent state unchanged)

Both take [B, Tp, H, K] arrays (Tp a multiple of the chunk C, K a power of two in [16, 256])
and return G float32 [B, Tp, H, K]; both have a hand-written backward (jax.custom_vjp).

Kernels: one program per (batch, chunk, head), block [C, K] of the [B, Tp, H, K] array:
  forward   gate (fp32) -> mask rows >= length -> jnp.cumsum over the C rows (Triton's scan)
  backward  the reverse in-chunk cumsum of dG, as total - cumsum + dG (`_suffix_sum`: Pallas
            lowers only the forward scan); the gated form then applies the gate's derivative
            in the same program and writes d g_raw, plus per-chunk partial sums over the C rows
            for dA_log and d dt_bias that XLA finishes (1/C of the elements each).
The grid runs heads fastest: programs in flight at one time then cover a contiguous
[chunks, H, K] slab of the array rather than one head's rows, H*K elements apart.

Traffic per element (the whole cost: a few flops per element, no reuse), gated form:
  forward  one read of g_raw (2 B bf16, 4 B fp32) + one write of G (4 B): 6 B for bf16
  backward one read of g_raw (2 B) and dG (4 B) + one write of d g_raw (2 B) + 8/C B of
           partial sums: 8.125 B at C = 64, bf16
  (chunk_local_cumsum: 4 + 4 B each way.) At B=1, T=131072, H=16, K=128 (268M elements) the
  bf16 forward moves 1.61 GB: a bound of 0.48 ms at 3.35 TB/s (H100 SXM), 0.34 ms at 4.8 TB/s
  (H200); not measured here.
  The grid there is 1 x 2048 x 16 = 32768 programs at C=64 (65536 at C=32), each moving 48 KiB.
num_warps (default 4): a [64, 128] fp32 block is 64 values per thread at 4 warps.
"""

from __future__ import annotations

import functools
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.kda.gate import check_gate_params

__all__ = ["chunk_local_cumsum", "chunk_local_gate_cumsum"]


class _Cfg(NamedTuple):
    """Static configuration (hashable: a nondiff argument of the custom_vjp functions)."""

    C: int
    length: int | None          # rows t >= length get g = 0; None: no row is masked
    gate: str | None            # None (plain cumsum), "softplus" or "sigmoid" (lower_bound)
    lower_bound: float | None
    bias: bool                  # dt_bias given
    dtype: jnp.dtype            # of g / g_raw, the dtype of its cotangent
    warps: int
    interpret: bool


# ----------------------------------------------------------------------------- kernel math
def _rows(C):
    """Global row index t of each element of this program's [C, 1] block (grid axis 1: chunks)."""
    return pl.program_id(1) * C + lax.broadcasted_iota(jnp.int32, (C, 1), 0)


def _softplus(x):
    """log(1 + e^x) without overflow: jnp.logaddexp(x, 0)'s formula, written out for Triton."""
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _gate_input(graw_ref, bias_ref, cfg):
    x = graw_ref[...].astype(jnp.float32)
    if cfg.bias:
        x = x + bias_ref[...][None, :]
    return x


def _gate(x, rate, cfg):
    """g = kda_gate at x = g_raw + dt_bias, rate = exp(A_log[h]) as [1, K]."""
    if cfg.gate == "softplus":
        return -rate * _softplus(x)
    return cfg.lower_bound * jax.nn.sigmoid(rate * x)


def _masked(v, cfg):
    if cfg.length is None:
        return v
    return jnp.where(_rows(cfg.C) < cfg.length, v, 0.0)


def _suffix_sum(d, C):
    """Reverse in-chunk cumsum sum_{s >= t} d_s as total - cumsum_t + d_t, total taken from the
    same scan's last row (so the last row is d exactly). Absolute error <= ~2 eps sum_s |d_s|
    over the chunk, the order of a reverse scan's own rounding over C = 64 terms."""
    cs = jnp.cumsum(d, axis=0)
    last = lax.broadcasted_iota(jnp.int32, d.shape, 0) == C - 1
    total = jnp.sum(jnp.where(last, cs, 0.0), axis=0, keepdims=True)  # one nonzero per column
    return (total - cs) + d


# ----------------------------------------------------------------------------- kernels
def _cumsum_kernel(g_ref, out_ref):
    out_ref[...] = jnp.cumsum(g_ref[...].astype(jnp.float32), axis=0)


def _suffix_sum_kernel(dG_ref, dg_ref, *, C):
    dg_ref[...] = _suffix_sum(dG_ref[...].astype(jnp.float32), C).astype(dg_ref.dtype)


def _gate_cumsum_kernel(graw_ref, rate_ref, *refs, cfg):
    bias_ref, out_ref = refs if cfg.bias else (None, *refs)
    rate = rate_ref[...][None, :]
    g = _masked(_gate(_gate_input(graw_ref, bias_ref, cfg), rate, cfg), cfg)
    out_ref[...] = jnp.cumsum(g, axis=0)


def _gate_cumsum_bwd_kernel(graw_ref, rate_ref, *refs, cfg):
    """d g_raw = dx (the cotangent of x = g_raw + dt_bias), and per chunk the column sums of
    dx (-> d dt_bias) and of dg dg/dA_log (-> dA_log), with dg the reverse cumsum of dG:
      softplus: g = -r softplus(x)     dg/dx = -r sigmoid(x)          dg/dA_log = g
      sigmoid:  g = lb sigmoid(r x)    dg/dx = lb r s (1 - s), s = sigmoid(r x)
                                       dg/dA_log = x dg/dx            (r = exp(A_log))"""
    if cfg.bias:
        bias_ref, dG_ref, dgraw_ref, da_ref, db_ref = refs
    else:
        bias_ref, db_ref = None, None
        dG_ref, dgraw_ref, da_ref = refs
    dg = _suffix_sum(dG_ref[...].astype(jnp.float32), cfg.C)
    rate = rate_ref[...][None, :]
    x = _gate_input(graw_ref, bias_ref, cfg)
    if cfg.gate == "softplus":
        dx = dg * (-rate * jax.nn.sigmoid(x))
        da = dg * _gate(x, rate, cfg)
    else:
        s = jax.nn.sigmoid(rate * x)
        dx = dg * (cfg.lower_bound * rate * (s * (1.0 - s)))
        da = dx * x
    dx, da = _masked(dx, cfg), _masked(da, cfg)  # masked rows: g = 0, constant
    dgraw_ref[...] = dx.astype(dgraw_ref.dtype)
    da_ref[...] = jnp.sum(da, axis=0)
    if cfg.bias:
        db_ref[...] = jnp.sum(dx, axis=0)


# ----------------------------------------------------------------------------- calls
def _specs(C, K):
    """Blocks of one program (b, n, h): [C, K] rows of a [B,Tp,H,K] array, the head's [K]
    row of an [H, K] tile, and the [K] partial sums of a [B, Tp/C, H, K] array."""
    return (pl.BlockSpec((None, C, None, K), lambda b, n, h: (b, n, h, 0)),
            pl.BlockSpec((None, K), lambda b, n, h: (h, 0)),
            pl.BlockSpec((None, None, None, K), lambda b, n, h: (b, n, h, 0)))


def _call(kernel, cfg, shape, in_specs, out_specs, out_shape, name):
    B, Tp, H, _ = shape
    return pl.pallas_call(
        kernel, grid=(B, Tp // cfg.C, H), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, name=name, interpret=cfg.interpret,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.warps, num_stages=1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _cumsum(cfg, g):
    rows, _, _ = _specs(cfg.C, g.shape[-1])
    return _call(_cumsum_kernel, cfg, g.shape, [rows], rows,
                 jax.ShapeDtypeStruct(g.shape, jnp.float32), "kda_chunk_cumsum")(g)


def _cumsum_fwd(cfg, g):
    return _cumsum(cfg, g), None


def _cumsum_bwd(cfg, _, dG):
    rows, _, _ = _specs(cfg.C, dG.shape[-1])
    dg = _call(functools.partial(_suffix_sum_kernel, C=cfg.C), cfg, dG.shape, [rows], rows,
               jax.ShapeDtypeStruct(dG.shape, cfg.dtype), "kda_chunk_cumsum_bwd")(dG)
    return (dg,)


_cumsum.defvjp(_cumsum_fwd, _cumsum_bwd)


def _head_tiles(A_log, dt_bias, H, K):
    """rate = exp(A_log[h]) and dt_bias as fp32 [H, K] tiles (rate by XLA, as kda_gate has it)."""
    rate = jnp.broadcast_to(jnp.exp(A_log.astype(jnp.float32).reshape(H, 1)), (H, K))
    return [rate] + ([dt_bias.astype(jnp.float32).reshape(H, K)] if dt_bias is not None else [])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gate_cumsum(cfg, g_raw, A_log, dt_bias):
    B, Tp, H, K = g_raw.shape
    rows, head, _ = _specs(cfg.C, K)
    tiles = _head_tiles(A_log, dt_bias, H, K)
    return _call(functools.partial(_gate_cumsum_kernel, cfg=cfg), cfg, g_raw.shape,
                 [rows] + [head] * len(tiles), rows,
                 jax.ShapeDtypeStruct(g_raw.shape, jnp.float32), "kda_gate_cumsum",
                 )(g_raw, *tiles)


def _gate_cumsum_fwd(cfg, g_raw, A_log, dt_bias):
    return _gate_cumsum(cfg, g_raw, A_log, dt_bias), (g_raw, A_log, dt_bias)


def _gate_cumsum_bwd(cfg, res, dG):
    g_raw, A_log, dt_bias = res
    B, Tp, H, K = g_raw.shape
    rows, head, part = _specs(cfg.C, K)
    tiles = _head_tiles(A_log, dt_bias, H, K)
    partial = jax.ShapeDtypeStruct((B, Tp // cfg.C, H, K), jnp.float32)
    outs = _call(functools.partial(_gate_cumsum_bwd_kernel, cfg=cfg), cfg, g_raw.shape,
                 [rows] + [head] * len(tiles) + [rows], [rows] + [part] * (1 + cfg.bias),
                 [jax.ShapeDtypeStruct(g_raw.shape, cfg.dtype)] + [partial] * (1 + cfg.bias),
                 "kda_gate_cumsum_bwd")(g_raw, *tiles, dG)
    d_raw, d_a = outs[0], outs[1]
    d_alog = jnp.sum(d_a, axis=(0, 1, 3)).reshape(A_log.shape).astype(A_log.dtype)
    d_bias = (None if dt_bias is None else
              jnp.sum(outs[2], axis=(0, 1)).reshape(dt_bias.shape).astype(dt_bias.dtype))
    return d_raw, d_alog, d_bias


_gate_cumsum.defvjp(_gate_cumsum_fwd, _gate_cumsum_bwd)


# ----------------------------------------------------------------------------- public
def _check(fn, name, x, chunk_size):
    """Shape checks shared by both functions; returns x's [B, Tp, H, K]."""
    if x.ndim != 4:
        raise ValueError(f"{fn}: {name} must be [B, Tp, H, K]; got shape {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{fn}: {name} must be a floating-point array; got {x.dtype}.")
    B, Tp, H, K = x.shape
    C = operator.index(chunk_size)
    if C < 1 or C & (C - 1) or Tp % C:
        raise ValueError(f"{fn}: chunk_size must be a power of two dividing {name}'s length "
                         f"Tp={Tp} (pad T to a multiple of the chunk); got {chunk_size}.")
    if K < 16 or K > 256 or K & (K - 1):
        raise ValueError(f"{fn}: {name}'s last dimension K must be a power of two in [16, 256] "
                         f"(a Triton block; pad the channels with zeros); got K={K}.")
    return B, Tp, H, K


def chunk_local_cumsum(g, chunk_size, *, num_warps=4, interpret=False):
    """In-chunk inclusive cumsum of g [B, Tp, H, K] along axis 1: G float32 [B, Tp, H, K].

    chunk_size: a power of two (32 or 64 for KDA) dividing Tp. K: a power of two in [16, 256].
    Differentiable (custom_vjp: the reverse in-chunk cumsum, also a Pallas kernel).
    interpret=True runs the kernel bodies in the Pallas interpreter (CPU tests)."""
    _check("chunk_local_cumsum", "g", g, chunk_size)
    cfg = _Cfg(C=int(chunk_size), length=None, gate=None, lower_bound=None, bias=False,
               dtype=g.dtype, warps=num_warps, interpret=interpret)
    return _cumsum(cfg, g)


def chunk_local_gate_cumsum(g_raw, A_log, dt_bias, *, chunk_size, length, lower_bound=None,
                            num_warps=4, interpret=False):
    """G = in-chunk cumsum of kda_gate(g_raw, A_log, dt_bias, lower_bound), rows t >= length
    set to g = 0 first; G float32 [B, Tp, H, K].

    g_raw [B, Tp, H, K] (bf16 or fp32; the gate is evaluated in fp32); A_log [H] (any shape
    with H elements); dt_bias [H*K] or [H, K] or None; length: static int <= Tp, the true
    sequence length before the caller padded T to Tp. lower_bound None: g = -exp(A_log[h])
    softplus(g_raw + dt_bias); lower_bound < 0: g = lower_bound sigmoid(exp(A_log[h])
    (g_raw + dt_bias)) (see pallas_kernels/kda/gate.py). Differentiable w.r.t. g_raw, A_log
    and dt_bias (custom_vjp; cotangents in the inputs' dtypes)."""
    fn = "chunk_local_gate_cumsum"
    B, Tp, H, K = _check(fn, "g_raw", g_raw, chunk_size)
    check_gate_params(fn, H, K, A_log, dt_bias, lower_bound)
    length = operator.index(length)
    if not 0 <= length <= Tp:
        raise ValueError(f"{fn}: length must be in [0, Tp={Tp}] (the unpadded sequence "
                         f"length); got {length}.")
    cfg = _Cfg(C=int(chunk_size), length=None if length == Tp else length,
               gate="softplus" if lower_bound is None else "sigmoid",
               lower_bound=None if lower_bound is None else float(lower_bound),
               bias=dt_bias is not None, dtype=g_raw.dtype, warps=num_warps, interpret=interpret)
    return _gate_cumsum(cfg, g_raw, A_log, dt_bias)
