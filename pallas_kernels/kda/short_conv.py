"""KDA's short convolution, activation and per-head L2 norm as one Pallas (Triton) kernel.

    pre_t = sum_{j=0}^{ks-1} w[ks-1-j] * z_{t-j} * [t-j >= 0 and seg_{t-j} == seg_t]  (+ bias)
    y_t   = act(pre_t)                                     act: silu or identity
    out_t = y_t * rsqrt(sum_D y_t^2 + eps) * scale         if normalize (reference.l2norm), else y_t

z [B, T, H, D] (bf16 or fp32; D a power of two in [16, 256]); weight [ks, H, D] with the tap
layout of hybrid_jax/layers/short_conv.py (w[ks-1] multiplies the current token), ks in 1..4;
everything from pre to the norm in fp32, the output in out_dtype. Full sequences only (no conv
cache): training, and prefill into an empty cache.

Grid (B, ceil(T / block_t), H), heads fastest. A program reads its [block_t, D] rows of z and,
through a second BlockSpec on the same array, the 16 rows before them (the halo; block index
max(i*block_t/16 - 1, 0), rows before t = 0 zeroed). Rows move by j tokens through products
with 0/1 selection matrices (one 1 per row, so the fp32 accumulation is exact): bf16 operands
take one bf16 product; fp32 operands are split into three bf16 pieces hi + mid + lo == x (8 bits
each of the 24-bit significand), which keeps the tensor cores and stays exact. The segment
masks come precomputed as one int32 per token (`_mask_bits`: bit j-1 = [t-j >= 0 and
seg_{t-j} == seg_t], bit 3+j-1 = [t+j < T and seg_{t+j} == seg_t]) rather than shifting segment
ids in the kernel: ids need not fit a float exactly, and the bits cost 4 B per token against
H*D elements per token of z. T need not be a multiple of block_t (nor of 16): rows are read
with masked loads (rows outside [0, T) read as 0, before any product) and written with masked
stores, since Pallas Triton does not bound a partial block's accesses; no padding copy.

Backward (jax.custom_vjp): nothing is saved but the inputs and the mask bits. A program
recomputes pre and y of its rows and of the 16 rows after them (the next block's halo: z and
dy through BlockSpecs with index min((i+1)*block_t/16, last)), then
    d y   (normalize) = scale r (dout - y r^2 sum_D(dout y)),  r = rsqrt(sum_D y^2 + eps)
    dpre  = dy * act'(pre)                 silu' = s (1 + pre (1 - s)), s = sigmoid(pre)
    dz_t  = sum_j w[ks-1-j] * dpre_{t+j} * [t+j < T and seg_{t+j} == seg_t]
and writes per-block partial sums sum_t z_{t-j} dpre_t mask (d w) and sum_t dpre_t (d bias),
[B, nblocks, H, ks', D] fp32 (ks' = ks rounded up to a power of two), which XLA sums.

Traffic per element, bf16 z and output: forward read z 2 B + write 2 B, plus 16/block_t halo
re-reads and 4/D B of mask bits (one int32 per token and head program); backward read z and
dout 2 + 2 B, write dz 2 B, plus 32/block_t halo re-reads and 4 ks'/block_t B of partial sums.
At B=1, T=131072, H=16, D=128 the forward moves 1.07 GB: 0.22 ms at 4.8 TB/s (H200), not
measured here. The selection products cost 2 (ks-1)(block_t + 16) flops per element in the
forward (bf16 operands; 480 at ks=4, block_t=64), about 4x that in the backward (the bf16
recomputes, three bf16 pieces of the fp32 dpre moved up): block_t trades them against the
halo re-reads (a device sweep of 16/32/64 is still to do).
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

HALO = 16        # rows of the neighbouring block a program reads (>= ks - 1; a tensor-core tile)
MAX_TAPS = 4
ACTIVATIONS = ("silu", "identity")


class _Cfg(NamedTuple):
    """Static configuration (hashable: a nondiff argument of the custom_vjp function)."""

    T: int
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
def _sel(S, x):
    """S @ x for a 0/1 matrix S with at most one 1 per row, exactly (fp32 result)."""
    dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32)
    S = S.astype(jnp.bfloat16)
    if x.dtype == jnp.bfloat16:
        return dot(S, x)
    x = x.astype(jnp.float32)
    hi = x.astype(jnp.bfloat16)
    r = x - hi.astype(jnp.float32)
    mid = r.astype(jnp.bfloat16)
    lo = (r - mid.astype(jnp.float32)).astype(jnp.bfloat16)
    return (dot(S, hi) + dot(S, mid)) + dot(S, lo)


def _offset_eye(n, m, k):
    """[n, m] 0/1 matrix with ones where column == row + k."""
    r = lax.broadcasted_iota(jnp.int32, (n, m), 0)
    c = lax.broadcasted_iota(jnp.int32, (n, m), 1)
    return (c == r + k).astype(jnp.bfloat16)


def _bit(bits, k):
    """[n, 1] bool: bit k of each row's mask word."""
    return ((bits >> k) & 1)[:, None] == 1


def _tap(w, j):
    """Row j of the [ks', D] weight tile (w[j] multiplies z_{t-j}) as [1, D]."""
    rows = lax.broadcasted_iota(jnp.int32, w.shape, 0)
    return jnp.sum(jnp.where(rows == j, w, 0.0), axis=0, keepdims=True)


def _act(pre, cfg):
    return pre * jax.nn.sigmoid(pre) if cfg.act == "silu" else pre


def _act_grad(pre, cfg):
    if cfg.act == "identity":
        return None
    s = jax.nn.sigmoid(pre)
    return s * (1.0 + pre * (1.0 - s))


def _conv(x, shifted, bits, w, b, cfg):
    """pre = sum_j w[j] * masked shifted_j (+ bias), summed in tap order j = 0, 1, ...
    (causal_short_conv's order); shifted[j - 1] holds the rows moved down by j."""
    pre = 0.0 + x.astype(jnp.float32) * _tap(w, 0)
    for j in range(1, cfg.ks):
        pre = pre + jnp.where(_bit(bits, j - 1), shifted[j - 1], 0.0) * _tap(w, j)
    if cfg.bias:
        pre = pre + b
    return pre


def _norm_out(y, cfg):
    if not cfg.normalize:
        return y
    return y * lax.rsqrt(jnp.sum(y * y, axis=-1, keepdims=True) + cfg.eps) * cfg.scale


def _dpre(pre, dout, cfg):
    """Cotangent of pre from the output's, through the norm and the activation."""
    y = _act(pre, cfg)
    dy = dout.astype(jnp.float32)
    if cfg.normalize:
        r = lax.rsqrt(jnp.sum(y * y, axis=-1, keepdims=True) + cfg.eps)
        dy = cfg.scale * r * (dy - y * (r * r) * jnp.sum(dy * y, axis=-1, keepdims=True))
    g = _act_grad(pre, cfg)
    return dy if g is None else dy * g


def _rows(start, n):
    """[n, 1] global token index of n rows from start."""
    return start + lax.broadcasted_iota(jnp.int32, (n, 1), 0)


def _valid(start, n, cfg):
    """[n, 1] bool: the rows' token index lies in [0, T)."""
    t = _rows(start, n)
    return (t >= 0) & (t < cfg.T)


def _load_rows(ref, start, cfg):
    """The ref's [n, D] rows, those with token index outside [0, T) read as 0 (the halo before
    t = 0, the last block's tail): Pallas Triton neither bounds nor masks a block's accesses
    (a partial block would read past the array), and a zero row keeps 0 * NaN out of products."""
    return plgpu.load(ref, mask=jnp.broadcast_to(_valid(start, ref.shape[0], cfg), ref.shape), other=0)


def _load_bits(ref, start, cfg):
    return plgpu.load(ref, mask=_valid(start, ref.shape[0], cfg)[:, 0], other=0)


def _store_rows(ref, val, start, cfg):
    plgpu.store(ref, val.astype(ref.dtype), mask=jnp.broadcast_to(_valid(start, ref.shape[0], cfg), ref.shape))


def _shift_down(x, prev, j):
    """Rows t -> x_{t-j}, the first j from the halo `prev` (the HALO rows before x)."""
    n = x.shape[0]
    return _sel(_offset_eye(n, n, -j), x) + _sel(_offset_eye(n, HALO, HALO - j), prev)


def _shift_up(x, nxt, j):
    """Rows t -> x_{t+j}, the last j from `nxt` (the HALO rows after x)."""
    n = x.shape[0]
    return _sel(_offset_eye(n, n, j), x) + _sel(_offset_eye(n, HALO, j - n), nxt)


# ----------------------------------------------------------------------------- kernels
def _fwd_kernel(z_ref, zp_ref, bits_ref, w_ref, *refs, cfg):
    b_ref, out_ref = refs if cfg.bias else (None, *refs)
    i = pl.program_id(1)
    x = _load_rows(z_ref, i * cfg.bt, cfg)
    prev = _load_rows(zp_ref, i * cfg.bt - HALO, cfg)
    shifted = [_shift_down(x, prev, j) for j in range(1, cfg.ks)]
    b = b_ref[...][None, :] if cfg.bias else None
    pre = _conv(x, shifted, _load_bits(bits_ref, i * cfg.bt, cfg), w_ref[...], b, cfg)
    _store_rows(out_ref, _norm_out(_act(pre, cfg), cfg), i * cfg.bt, cfg)


def _bwd_kernel(z_ref, zp_ref, zn_ref, bits_ref, bitsn_ref, w_ref, *refs, cfg):
    if cfg.bias:
        b_ref, dout_ref, doutn_ref, dz_ref, dw_ref, db_ref = refs
        b = b_ref[...][None, :]
    else:
        (dout_ref, doutn_ref, dz_ref, dw_ref), b, db_ref = refs, None, None
    bt, ks = cfg.bt, cfg.ks
    i = pl.program_id(1)
    start, nstart = i * bt, (i + 1) * bt
    w = w_ref[...]
    bits, bitsn = _load_bits(bits_ref, start, cfg), _load_bits(bitsn_ref, nstart, cfg)
    x = _load_rows(z_ref, start, cfg)
    prev = _load_rows(zp_ref, start - HALO, cfg)
    nxt = _load_rows(zn_ref, nstart, cfg)
    # this block's rows: pre, then dpre (0 at rows >= T, where dout reads as 0)
    shifted = [_shift_down(x, prev, j) for j in range(1, ks)]
    pre = _conv(x, shifted, bits, w, b, cfg)
    dpre = _dpre(pre, _load_rows(dout_ref, start, cfg), cfg)
    # d pre of the next HALO rows, which dz of the last ks-1 rows reads
    dz = dpre * _tap(w, 0)
    if ks > 1:
        shifted_n = [_sel(_offset_eye(HALO, bt, bt - j), x) + _sel(_offset_eye(HALO, HALO, -j), nxt)
                     for j in range(1, ks)]
        pre_n = _conv(nxt, shifted_n, bitsn, w, b, cfg)
        dpre_n = _dpre(pre_n, _load_rows(doutn_ref, nstart, cfg), cfg)
        for j in range(1, ks):
            up = _shift_up(dpre, dpre_n, j)
            dz = dz + jnp.where(_bit(bits, 3 + j - 1), up, 0.0) * _tap(w, j)
    _store_rows(dz_ref, dz, start, cfg)
    # partial sums over this block's rows: d w[j] = sum_t masked z_{t-j} dpre_t, d bias
    taps = lax.broadcasted_iota(jnp.int32, (cfg.ksp, x.shape[1]), 0)
    dw = jnp.where(taps == 0, jnp.sum(x.astype(jnp.float32) * dpre, axis=0, keepdims=True), 0.0)
    for j in range(1, ks):
        col = jnp.sum(jnp.where(_bit(bits, j - 1), shifted[j - 1], 0.0) * dpre, axis=0, keepdims=True)
        dw = jnp.where(taps == j, col, dw)
    dw_ref[...] = dw
    if cfg.bias:
        db_ref[...] = jnp.sum(dpre, axis=0)


# ----------------------------------------------------------------------------- calls
def _specs(cfg, D):
    """BlockSpecs of program (b, i, h): its rows, the HALO rows before and after them (of a
    [B, T, H, D] array), the same three of the [B, T] mask bits, and the head's tiles."""
    bt, per = cfg.bt, cfg.bt // HALO
    last = (cfg.T - 1) // HALO
    return dict(
        rows=pl.BlockSpec((None, bt, None, D), lambda b, i, h: (b, i, h, 0)),
        prev=pl.BlockSpec((None, HALO, None, D), lambda b, i, h: (b, jnp.maximum(i * per - 1, 0), h, 0)),
        next=pl.BlockSpec((None, HALO, None, D),
                          lambda b, i, h: (b, jnp.minimum((i + 1) * per, last), h, 0)),
        bits=pl.BlockSpec((None, bt), lambda b, i, h: (b, i)),
        bits_next=pl.BlockSpec((None, HALO), lambda b, i, h: (b, jnp.minimum((i + 1) * per, last))),
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
    s = _specs(cfg, z.shape[-1])
    ins = [s["rows"], s["prev"], s["bits"], s["w"]] + [s["b"]] * cfg.bias
    args = [z, z, bits, w] + [bias] * cfg.bias
    return _call(_fwd_kernel, cfg, z.shape, ins, s["rows"],
                 jax.ShapeDtypeStruct(z.shape, cfg.out_dtype), "kda_short_conv")(*args)


def _short_conv_fwd(cfg, z, w, bias, bits):
    return _short_conv(cfg, z, w, bias, bits), (z, w, bias, bits)


def _short_conv_bwd(cfg, res, dout):
    z, w, bias, bits = res
    B, T, H, D = z.shape
    nb = pl.cdiv(T, cfg.bt)
    s = _specs(cfg, D)
    ins = ([s["rows"], s["prev"], s["next"], s["bits"], s["bits_next"], s["w"]] + [s["b"]] * cfg.bias
           + [s["rows"], s["next"]])
    args = [z, z, z, bits, bits, w] + [bias] * cfg.bias + [dout, dout]
    outs = [s["rows"], s["dw"]] + [s["db"]] * cfg.bias
    shapes = ([jax.ShapeDtypeStruct(z.shape, z.dtype),
               jax.ShapeDtypeStruct((B, nb, H, cfg.ksp, D), jnp.float32)]
              + [jax.ShapeDtypeStruct((B, nb, H, D), jnp.float32)] * cfg.bias)
    res = _call(_bwd_kernel, cfg, z.shape, ins, outs, shapes, "kda_short_conv_bwd")(*args)
    dw = jnp.sum(res[1], axis=(0, 1))
    db = jnp.sum(res[2], axis=(0, 1)) if cfg.bias else None
    return res[0], dw, db, None


_short_conv.defvjp(_short_conv_fwd, _short_conv_bwd)


# ----------------------------------------------------------------------------- public
def _mask_bits(segment_ids, B, T, ks):
    """int32 [B, T]: bit j-1 = [t-j >= 0 and seg_{t-j} == seg_t], bit 3+j-1 = [t+j < T and
    seg_{t+j} == seg_t], for j = 1 .. ks-1 (XLA, one pass over [B, T])."""
    seg = (jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32))
    t = jnp.arange(T)[None, :]
    bits = jnp.zeros((B, T), jnp.int32)
    for j in range(1, ks):
        back = jnp.pad(seg, [(0, 0), (j, 0)])[:, :T]
        fwd = jnp.pad(seg, [(0, 0), (0, j)])[:, j:]
        bits = bits | (((t >= j) & (back == seg)).astype(jnp.int32) << (j - 1))
        bits = bits | (((t + j < T) & (fwd == seg)).astype(jnp.int32) << (3 + j - 1))
    return bits


def short_conv_norm(z, weight, segment_ids, *, bias=None, activation="silu", normalize=False,
                    scale=1.0, eps=1e-6, out_dtype=None, block_t=64, num_warps=4, interpret=False):
    """act(causal depthwise conv of z (+ bias)), optionally L2-normalised over D and scaled.

    z [B, T, H, D] bf16 or fp32 (D a power of two in [16, 256]); weight [ks, H, D], ks in 1..4,
    w[ks-1] on the current token (causal_short_conv's layout); segment_ids [B, T] int (a token
    sees earlier tokens of its own segment only) or None (one segment); bias [H, D] or None;
    activation "silu" or "identity"; normalize: out = y * rsqrt(sum_D y^2 + eps) * scale
    (reference.l2norm, then the scale). Computed in fp32; the output in out_dtype (default
    z.dtype). block_t: tokens per program, a power of two >= 16 (reduced for short T).
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
    if bt < HALO or bt & (bt - 1):
        raise ValueError(f"{fn}: block_t must be a power of two >= {HALO}; got {block_t}.")
    bt = min(bt, max(HALO, 1 << (T - 1).bit_length()))
    ks = weight.shape[0]
    ksp = 1 << (ks - 1).bit_length()
    # tap-reversed fp32 tile per head: w[h, j] multiplies z_{t-j}
    w = jnp.pad(weight.astype(jnp.float32)[::-1], [(0, ksp - ks), (0, 0), (0, 0)]).transpose(1, 0, 2)
    cfg = _Cfg(T=T, bt=bt, ks=ks, ksp=ksp, act=activation, normalize=bool(normalize),
               scale=float(scale), eps=float(eps), bias=bias is not None,
               out_dtype=jnp.dtype(out_dtype or z.dtype), warps=num_warps, interpret=interpret)
    b = None if bias is None else bias.astype(jnp.float32)
    return _short_conv(cfg, z, w, b, _mask_bits(segment_ids, B, T, ks))
