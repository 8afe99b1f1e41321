"""KDA's short convolution, activation and per-head L2 norm as one Pallas (Triton) kernel.

    pre_t = sum_{j=0}^{ks-1} w[ks-1-j] * z_{t-j} * [t-j >= 0 and seg_{t-j} == seg_t]  (+ bias)
    y_t   = act(pre_t)                                     act: silu or identity
    out_t = y_t * rsqrt(sum_D y_t^2 + eps) * scale         if normalize (reference.l2norm), else y_t

z [B, T, H, D] (bf16 or fp32; D a power of two in [16, 256]); weight [ks, H, D] with the tap
layout of hybrid_jax/layers/short_conv.py (w[ks-1] multiplies the current token), ks in 1..4;
everything from pre to the norm in fp32, the output in out_dtype. Full sequences only (no conv
cache): training, and prefill into an empty cache.

Grid (B, ceil(T / block_t), H), heads fastest; a program owns block_t rows of one head. z (and
in the backward dout) are passed unblocked and read as [block_t, D] tiles at any row offset
through index arrays: tap j is the tile read j rows earlier. Rows move in the addresses, not in
registers (no selection-matrix products); each row stays one contiguous D-vector, and the
overlapping re-reads of neighbouring rows are meant to hit the cache. Rows outside [0, T) are
masked off (read as 0: Pallas Triton does not bound accesses, and the interpreter would clamp a
negative slice start, so rows are index arrays rather than pl.ds), so T need not be a multiple
of block_t and nothing is padded. The segment masks come precomputed as one int32 per token
(`_mask_bits`: bit j-1 = [t-j >= 0 and seg_{t-j} == seg_t]) rather than shifting segment ids
in the kernel: ids need not fit a float exactly, and the bits cost 4 B per token against H*D
elements of z. Each tap's bit is folded into its load mask.

Backward (jax.custom_vjp): nothing is saved but the inputs and the mask bits. With
    d y   (normalize) = scale r (dout - y r^2 sum_D(dout y)),  r = rsqrt(sum_D y^2 + eps)
    dpre  = dy * act'(pre)                 silu' = s (1 + pre (1 - s)), s = sigmoid(pre)
    dz_t  = sum_j w[ks-1-j] * dpre_{t+j} * [t+j < T and seg_{t+j} == seg_t]
two kernels on the forward's grid. Pass 1 (`_dpre_kernel`) recomputes pre of its rows, forms
dpre and stores it rounded to z's dtype ([B, T, H, D], a transient of z's size), with per-block
partial sums sum_t z_{t-j} dpre_t mask (d w) and sum_t dpre_t (d bias), [B, nblocks, H, ks', D]
fp32 (ks' = ks rounded up to a power of two), which XLA sums; both sums use the fp32 dpre. Pass
2 (`_dz_kernel`) is the forward's convolution run backwards in time: tap j is the dpre tile read
j rows later, masked by bit j-1 of row t+j. Under bf16 the rounding of dpre adds one bf16
rounding to each of dz's ks terms, the size of dz's own rounding to bf16.

Traffic per element, bf16 z and output: forward read z 2 B + write 2 B; backward pass 1 read z
and dout 2 + 2 B, write dpre 2 B, pass 2 read dpre 2 B, write dz 2 B (10 B against the 6 B
floor of reading z and dout and writing dz); 4/D B of mask bits per pass and 4 ks'/block_t B of
partial sums. The single-kernel backward this replaced (session 7: dpre of the block and the 3
rows after it through a per-program fp32 scratch in device memory, read back shifted after a
barrier) moved 4 (block_t + 4)/block_t B more per element, written to memory.

Measured (scripts/bench_short_conv.py, NVIDIA H200, jax 0.11.2, 2026-11-27; bf16, D=128,
ks=4, silu + norm; medians of back-to-back calls; floor = 4 B (forward) or 10 B (forward +
backward) per element at 4.8 TB/s; `z * 2`, which moves the forward's bytes, reaches 59% and 67%):
    B x T x H     forward ms (% floor) fwd+bwd ms (% floor) XLA path fwd / fwd+bwd ms
    8x4096x16     0.135 (42%)          0.707 (20%)          0.244 / 0.841
    1x131072x16   0.483 (46%)          2.73 (20%)           0.826 / 2.97
at the defaults block_t=16, num_warps=2 (the fastest forward+backward of 16x2, 16x4, 32x4,
32x8, 64x4, 64x8 at both shapes in an earlier call; forward within 4% of the best there).
The selection-product kernel this replaced: 0.219 / 1.78 ms and 0.809 / 6.90 ms at the same
block_t and warps. Recomputing dpre at each row t + j from z instead of the scratch (the
activation and norm ks times per element) took 1.7x as long forward+backward in the earlier
call (1.15 vs 0.68 ms, 4.44 vs 2.60 ms). The two-pass backward against that single-kernel one,
same call (NVIDIA H100, jax 0.11.2, 2026-12-07; floor at 3.35 TB/s; backward = fwd+bwd - fwd):
    B x T x H     fwd+bwd ms two-pass / single (% floor)   backward alone ms
    4x4096x16     0.312 / 0.388 (32% / 26%)                 0.228 / 0.305
    8x4096x16     0.587 / 0.745 (34% / 27%)                 0.442 / 0.601
    1x131072x16   2.243 / 2.870 (36% / 28%)                 1.722 / 2.352
The backward still moves its 10 B per element at about 1.5 TB/s, under the forward's 1.85.
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

__all__ = ["short_conv_norm"]

MAX_TAPS = 4
ACTIVATIONS = ("silu", "identity")


class _Cfg(NamedTuple):
    """Static configuration (hashable: a nondiff argument of the custom_vjp function)."""

    T: int
    D: int
    bt: int
    ks: int
    ksp: int                    # ks rounded up to a power of two (the weight tile's rows)
    act: str
    normalize: bool
    scale: float
    eps: float
    bias: bool
    out_dtype: jnp.dtype
    warps: int
    interpret: bool


# ----------------------------------------------------------------------------- kernel math
def _valid(start, n, cfg):
    """[n, 1] bool: rows start .. start+n-1 lie in [0, T)."""
    t = start + lax.broadcasted_iota(jnp.int32, (n, 1), 0)
    return (t >= 0) & (t < cfg.T)


def _tile(ref, b, start, h, n, cfg, keep=None):
    """fp32 [n, D] rows start .. start+n-1 of ref[b, :, h, :] ([B, T, H, D], unblocked), read at
    any row offset (negative too) through index arrays; rows outside [0, T), or where the [n, 1]
    `keep` is False, read as 0. Pallas Triton does not bound accesses, so the mask is what keeps
    the rows before t = 0 and past T unread; a zero keeps 0 * NaN out."""
    m = _valid(start, n, cfg) if keep is None else _valid(start, n, cfg) & keep
    rows = start + lax.broadcasted_iota(jnp.int32, (n, 1), 0)
    cols = lax.broadcasted_iota(jnp.int32, (1, cfg.D), 1)
    x = plgpu.load(ref.at[b, rows, h, cols], mask=jnp.broadcast_to(m, (n, cfg.D)), other=0)
    return x.astype(jnp.float32)


def _bits(ref, b, start, n, cfg):
    """[n, 1] int32 mask words of rows start .. (0 outside [0, T)) from the unblocked [B, T] ref,
    read as a column that broadcasts over D."""
    rows = start + lax.broadcasted_iota(jnp.int32, (n, 1), 0)
    return plgpu.load(ref.at[b, rows], mask=(rows >= 0) & (rows < cfg.T), other=0)


def _bit(bits, k):
    """[n, 1] bool: bit k of each row's mask word."""
    return ((bits >> k) & 1) == 1


def _conv(z_ref, bits_ref, w_ref, b_ref, b, start, h, n, cfg):
    """(masked taps, pre) of rows start .. start+n-1: taps[j] = z_{t-j} * mask (the tile read j
    rows earlier, its segment bit in the load mask), pre = sum_j w[j] taps[j] (+ bias), summed
    in tap order (causal_short_conv's)."""
    bits = _bits(bits_ref, b, start, n, cfg)
    taps = [_tile(z_ref, b, start, h, n, cfg)]
    taps += [_tile(z_ref, b, start - j, h, n, cfg, keep=_bit(bits, j - 1)) for j in range(1, cfg.ks)]
    pre = 0.0
    for j, x in enumerate(taps):
        pre = pre + x * w_ref[j, :][None, :]
    if cfg.bias:
        pre = pre + b_ref[...][None, :]
    return taps, pre


def _act(pre, cfg):
    return pre * jax.nn.sigmoid(pre) if cfg.act == "silu" else pre


def _norm_out(y, cfg):
    if not cfg.normalize:
        return y
    return y * lax.rsqrt(jnp.sum(y * y, axis=-1, keepdims=True) + cfg.eps) * cfg.scale


def _dpre(pre, dout, cfg):
    """Cotangent of pre from the output's (fp32), through the norm and the activation."""
    if cfg.act == "silu":
        s = jax.nn.sigmoid(pre)
        y, g = pre * s, s * (1.0 + pre * (1.0 - s))   # silu' = s (1 + pre (1 - s))
    else:
        y, g = pre, None
    dy = dout
    if cfg.normalize:
        r = lax.rsqrt(jnp.sum(y * y, axis=-1, keepdims=True) + cfg.eps)
        dy = cfg.scale * r * (dy - y * (r * r) * jnp.sum(dy * y, axis=-1, keepdims=True))
    return dy if g is None else dy * g


def _store_rows(ref, val, start, cfg):
    plgpu.store(ref, val.astype(ref.dtype), mask=jnp.broadcast_to(_valid(start, ref.shape[0], cfg), ref.shape))


# ----------------------------------------------------------------------------- kernels
def _fwd_kernel(z_ref, bits_ref, w_ref, *refs, cfg):
    b_ref, out_ref = refs if cfg.bias else (None, *refs)
    b, h, start = pl.program_id(0), pl.program_id(2), pl.program_id(1) * cfg.bt
    _, pre = _conv(z_ref, bits_ref, w_ref, b_ref, b, start, h, cfg.bt, cfg)
    _store_rows(out_ref, _norm_out(_act(pre, cfg), cfg), start, cfg)


def _dpre_kernel(z_ref, bits_ref, w_ref, *refs, cfg):
    """Backward pass 1: dpre of the program's rows (stored in dpre_ref's dtype) and this block's
    partial sums d w[j] = sum_t masked z_{t-j} dpre_t, d bias = sum_t dpre_t (from fp32 dpre)."""
    if cfg.bias:
        b_ref, dout_ref, dpre_ref, dw_ref, db_ref = refs
    else:
        (dout_ref, dpre_ref, dw_ref), b_ref, db_ref = refs, None, None
    b, h, start = pl.program_id(0), pl.program_id(2), pl.program_id(1) * cfg.bt
    taps, pre = _conv(z_ref, bits_ref, w_ref, b_ref, b, start, h, cfg.bt, cfg)
    dpre = _dpre(pre, _tile(dout_ref, b, start, h, cfg.bt, cfg), cfg)  # 0 at rows >= T (dout reads 0)
    for j in range(cfg.ksp):
        dw_ref[j, :] = jnp.sum(taps[j] * dpre, axis=0) if j < cfg.ks else jnp.zeros((cfg.D,), jnp.float32)
    if cfg.bias:
        db_ref[...] = jnp.sum(dpre, axis=0)
    _store_rows(dpre_ref, dpre, start, cfg)


def _dz_kernel(dpre_ref, bits_ref, w_ref, dz_ref, *, cfg):
    """Backward pass 2, the forward's convolution run backwards in time:
    dz_t = sum_j w[j] dpre_{t+j} [t+j < T and seg_{t+j} == seg_t], tap j the tile read j rows
    later; the term's mask is bit j-1 of row t+j's mask word."""
    b, h, start = pl.program_id(0), pl.program_id(2), pl.program_id(1) * cfg.bt
    dz = _tile(dpre_ref, b, start, h, cfg.bt, cfg) * w_ref[0, :][None, :]
    for j in range(1, cfg.ks):
        keep = _bit(_bits(bits_ref, b, start + j, cfg.bt, cfg), j - 1)
        dz = dz + _tile(dpre_ref, b, start + j, h, cfg.bt, cfg, keep=keep) * w_ref[j, :][None, :]
    _store_rows(dz_ref, dz, start, cfg)


# ----------------------------------------------------------------------------- calls
def _specs(cfg):
    """BlockSpecs of program (b, i, h): z, dout, the mask bits and the scratch unblocked (read at
    shifted rows), the output rows, the head's weight/bias tiles, the partial sums."""
    bt, D = cfg.bt, cfg.D
    return dict(
        full=pl.BlockSpec(),
        rows=pl.BlockSpec((None, bt, None, D), lambda b, i, h: (b, i, h, 0)),
        w=pl.BlockSpec((None, cfg.ksp, D), lambda b, i, h: (h, 0, 0)),
        b=pl.BlockSpec((None, D), lambda b, i, h: (h, 0)),
        dw=pl.BlockSpec((None, None, None, cfg.ksp, D), lambda b, i, h: (b, i, h, 0, 0)),
        db=pl.BlockSpec((None, None, None, D), lambda b, i, h: (b, i, h, 0)),
    )


def _call(kernel, cfg, shape, in_specs, out_specs, out_shape, name):
    B, T, H, _ = shape
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg), grid=(B, pl.cdiv(T, cfg.bt), H), in_specs=in_specs,
        out_specs=out_specs, out_shape=out_shape, name=name, interpret=cfg.interpret,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.warps, num_stages=1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _short_conv(cfg, z, w, bias, bits):
    s = _specs(cfg)
    ins = [s["full"], s["full"], s["w"]] + [s["b"]] * cfg.bias
    return _call(_fwd_kernel, cfg, z.shape, ins, s["rows"], jax.ShapeDtypeStruct(z.shape, cfg.out_dtype),
                 "kda_short_conv")(z, bits, w, *([bias] * cfg.bias))


def _short_conv_fwd(cfg, z, w, bias, bits):
    return _short_conv(cfg, z, w, bias, bits), (z, w, bias, bits)


def _short_conv_bwd(cfg, res, dout):
    z, w, bias, bits = res
    B, T, H, D = z.shape
    nb = pl.cdiv(T, cfg.bt)
    s = _specs(cfg)
    ins = [s["full"], s["full"], s["w"]] + [s["b"]] * cfg.bias + [s["full"]]
    outs = [s["rows"], s["dw"]] + [s["db"]] * cfg.bias
    shapes = ([jax.ShapeDtypeStruct(z.shape, z.dtype),  # dpre, rounded to z's dtype
               jax.ShapeDtypeStruct((B, nb, H, cfg.ksp, D), jnp.float32)]
              + [jax.ShapeDtypeStruct((B, nb, H, D), jnp.float32)] * cfg.bias)
    dpre, dw, *db = _call(_dpre_kernel, cfg, z.shape, ins, outs, shapes, "kda_short_conv_dpre")(
        z, bits, w, *([bias] * cfg.bias), dout)
    dz = _call(_dz_kernel, cfg, z.shape, [s["full"], s["full"], s["w"]], s["rows"],
               jax.ShapeDtypeStruct(z.shape, z.dtype), "kda_short_conv_dz")(dpre, bits, w)
    return dz, jnp.sum(dw, axis=(0, 1)), jnp.sum(db[0], axis=(0, 1)) if cfg.bias else None, None


_short_conv.defvjp(_short_conv_fwd, _short_conv_bwd)


# ----------------------------------------------------------------------------- public
def _mask_bits(segment_ids, B, T, ks):
    """int32 [B, T]: bit j-1 = [t-j >= 0 and seg_{t-j} == seg_t] for j = 1 .. ks-1 (XLA, one
    pass over [B, T])."""
    seg = (jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32))
    t = jnp.arange(T)[None, :]
    bits = jnp.zeros((B, T), jnp.int32)
    for j in range(1, ks):
        back = jnp.pad(seg, [(0, 0), (j, 0)])[:, :T]
        bits = bits | (((t >= j) & (back == seg)).astype(jnp.int32) << (j - 1))
    return bits


def short_conv_norm(z, weight, segment_ids, *, bias=None, activation="silu", normalize=False,
                    scale=1.0, eps=1e-6, out_dtype=None, block_t=16, num_warps=2, interpret=False):
    """act(causal depthwise conv of z (+ bias)), optionally L2-normalised over D and scaled.

    z [B, T, H, D] bf16 or fp32 (D a power of two in [16, 256]); weight [ks, H, D], ks in 1..4,
    w[ks-1] on the current token (causal_short_conv's layout); segment_ids [B, T] int (a token
    sees earlier tokens of its own segment only) or None (one segment); bias [H, D] or None;
    activation "silu" or "identity"; normalize: out = y * rsqrt(sum_D y^2 + eps) * scale
    (reference.l2norm, then the scale). Computed in fp32; the output in out_dtype (default
    z.dtype). block_t: tokens per program, a power of two (reduced for short T); num_warps: a power of two.
    Differentiable w.r.t. z, weight and bias (custom_vjp; cotangents in their dtypes).
    interpret=True runs the kernels in the Pallas interpreter (CPU tests)."""
    fn = "short_conv_norm"
    if z.ndim != 4 or not jnp.issubdtype(z.dtype, jnp.floating):
        raise ValueError(f"{fn}: z must be a floating-point [B, T, H, D] array; got {z.dtype} {z.shape}.")
    B, T, H, D = z.shape
    if D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"{fn}: z's last dimension D must be a power of two in [16, 256] "
                         f"(a Triton block; pad the channels with zeros); got D={D}.")
    if weight.ndim != 3 or not 1 <= weight.shape[0] <= MAX_TAPS or weight.shape[1:] != (H, D):
        raise ValueError(f"{fn}: weight must be [ks, H, D] = [ks, {H}, {D}] with ks in 1..{MAX_TAPS} "
                         f"taps; got shape {weight.shape}.")
    if bias is not None and bias.shape != (H, D):
        raise ValueError(f"{fn}: bias must be [H, D] = [{H}, {D}] or None; got shape {bias.shape}.")
    if segment_ids is not None and (segment_ids.shape != (B, T)
                                    or not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
        raise ValueError(f"{fn}: segment_ids must be an integer [B, T] = [{B}, {T}] array or None; "
                         f"got {segment_ids.dtype} {segment_ids.shape}.")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{fn}: activation {activation!r} unknown; use one of {ACTIVATIONS}.")
    bt = operator.index(block_t)
    if bt < 1 or bt & (bt - 1):
        raise ValueError(f"{fn}: block_t must be a power of two (a Triton block's rows); got {block_t}.")
    bt = min(bt, 1 << max(T - 1, 0).bit_length())
    nw = operator.index(num_warps)
    if nw < 1 or nw & (nw - 1):
        raise ValueError(f"{fn}: num_warps must be a power of two; got {num_warps}.")
    ks = weight.shape[0]
    ksp = 1 << (ks - 1).bit_length()
    # tap-reversed fp32 tile per head: w[h, j] multiplies z_{t-j}
    w = jnp.pad(weight.astype(jnp.float32)[::-1], [(0, ksp - ks), (0, 0), (0, 0)]).transpose(1, 0, 2)
    cfg = _Cfg(T=T, D=D, bt=bt, ks=ks, ksp=ksp, act=activation, normalize=bool(normalize),
               scale=float(scale), eps=float(eps), bias=bias is not None,
               out_dtype=jnp.dtype(out_dtype or z.dtype), warps=nw, interpret=interpret)
    b = None if bias is None else bias.astype(jnp.float32)
    return _short_conv(cfg, z, w, b, _mask_bits(segment_ids, B, T, ks))
