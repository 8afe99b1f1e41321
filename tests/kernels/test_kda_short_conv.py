"""KDA short convolution + activation + L2 norm kernel (Pallas interpret mode) vs an fp32 oracle
written from the formula, vs causal_short_conv + reference.l2norm; bad inputs; CUDA lowering."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.layers.short_conv import causal_short_conv
from pallas_kernels.kda.reference import l2norm
from pallas_kernels.kda.short_conv import short_conv_norm


def max_rel(a, b):
    """max |a - b| / max |b| (float64 on the host)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all(), "non-finite kernel output (interpret mode poisons unwritten blocks)"
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def oracle(z, weight, seg, bias, activation, normalize, scale, eps=1e-6):
    """The module docstring's formula in fp32, tap by tap with explicit shifts and masks."""
    B, T, H, D = z.shape
    ks = weight.shape[0]
    z, weight = z.astype(jnp.float32), weight.astype(jnp.float32)
    pre = jnp.zeros(z.shape, jnp.float32)
    for j in range(ks):
        zj = jnp.pad(z, [(0, 0), (j, 0), (0, 0), (0, 0)])[:, :T]
        sj = jnp.pad(seg, [(0, 0), (j, 0)])[:, :T]
        keep = (jnp.arange(T)[None, :] >= j) & (sj == seg)
        pre = pre + jnp.where(keep[..., None, None], zj, 0.0) * weight[ks - 1 - j]
    if bias is not None:
        pre = pre + bias.astype(jnp.float32)
    y = jax.nn.silu(pre) if activation == "silu" else pre
    if normalize:
        y = y * jax.lax.rsqrt(jnp.sum(y * y, axis=-1, keepdims=True) + eps) * scale
    return y


def segments(B, T, bt):
    """Row 0: resets inside the first block, exactly at the first block boundary, a one-token
    segment, inside a later block. Row 1: one segment (0, the padding id) then another."""
    seg = np.zeros((B, T), np.int32)
    cuts = sorted({c for c in (3, bt, bt + 1, bt + 5, 2 * bt + 7) if 0 < c < T})
    seg[0] = 1 + np.searchsorted(np.array(cuts), np.arange(T), side="right")
    seg[1] = (np.arange(T) >= T // 2).astype(np.int32)
    return jnp.asarray(seg)


def inputs(seed, B, T, H, D, ks, bias):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    z = jax.random.normal(k[0], (B, T, H, D))
    w = jax.random.normal(k[1], (ks, H, D)) * ks**-0.5
    b = 0.5 * jax.random.normal(k[2], (H, D)) if bias else None
    c = jax.random.normal(k[3], (B, T, H, D))  # the random linear functional of the output
    return z, w, b, c


CASES = [  # ks, activation, normalize, bias, H, D, T, block_t
    (4, "silu", True, True, 3, 32, 80, 32),      # T not a multiple of block_t
    (3, "identity", False, False, 1, 16, 70, 16),
    (2, "silu", False, True, 1, 16, 64, 32),
    (1, "identity", True, False, 3, 16, 40, 16),
    (4, "identity", True, True, 1, 16, 11, 64),  # T < 16: one block, reduced to 16 rows
    (4, "silu", True, False, 2, 16, 37, 8),      # 8-row blocks: resets within 3 rows of a block boundary
]


@pytest.mark.parametrize("ks,act,normalize,bias,H,D,T,bt", CASES)
def test_forward_and_gradients_match_fp32_oracle(ks, act, normalize, bias, H, D, T, bt):
    B = 2
    z, w, b, c = inputs(T + ks, B, T, H, D, ks, bias)
    seg = segments(B, T, bt)
    scale = 0.7 if normalize else 1.0
    kw = dict(activation=act, normalize=normalize, scale=scale, block_t=bt, interpret=True)

    def fwd_bwd(z, w, b):
        out, vjp = jax.vjp(lambda z, w, b: short_conv_norm(z, w, seg, bias=b, **kw), z, w, b)
        return out, vjp(c)

    def loss_ref(z, w, b):
        return jnp.sum(oracle(z, w, seg, b, act, normalize, scale) * c)

    out, grads = jax.jit(fwd_bwd)(z, w, b)
    assert out.dtype == jnp.float32 and out.shape == z.shape
    assert max_rel(out, oracle(z, w, seg, b, act, normalize, scale)) <= 1e-5
    argnums = (0, 1, 2) if bias else (0, 1)
    grads_ref = jax.jit(jax.grad(loss_ref, argnums))(z, w, b)
    for name, g, r in zip(("z", "weight", "bias"), grads, grads_ref):
        assert g.dtype == jnp.float32 and g.shape == r.shape, name
        assert max_rel(g, r) <= 1e-4, name


def test_matches_causal_short_conv_and_l2norm():
    """The existing layer path: causal_short_conv (pre-activation in z.dtype) + bias, silu,
    reference.l2norm, the scale; fp32 to 1e-5, bf16 within bf16 rounding of the fp32 oracle."""
    B, T, H, D, ks = 2, 48, 2, 32, 4
    z, w, b, _ = inputs(7, B, T, H, D, ks, True)
    seg = segments(B, T, 16)
    scale = D**-0.5
    fn = jax.jit(lambda z: short_conv_norm(z, w, seg, bias=b, normalize=True, scale=scale,
                                           block_t=16, interpret=True))
    existing = l2norm(jax.nn.silu(causal_short_conv(z, w, seg)[0] + b)) * scale
    assert max_rel(fn(z), existing) <= 1e-5
    zb = z.astype(jnp.bfloat16)
    out = fn(zb)
    assert out.dtype == jnp.bfloat16
    assert max_rel(out, oracle(zb, w, seg, b, "silu", True, scale)) <= 1e-2
    pre = causal_short_conv(zb, w.astype(jnp.bfloat16), seg)[0] + b.astype(jnp.bfloat16)
    assert max_rel(out, l2norm(jax.nn.silu(pre)) * scale) <= 2e-2  # the bf16 path rounds pre twice


def test_bf16_input_fp32_output_and_gradient():
    B, T, H, D, ks = 2, 40, 1, 16, 3
    z, w, b, c = inputs(3, B, T, H, D, ks, True)
    zb, seg = z.astype(jnp.bfloat16), segments(B, T, 16)
    fn = lambda z: short_conv_norm(z, w, seg, bias=b, normalize=True, out_dtype=jnp.float32,
                                   block_t=16, interpret=True)
    out = jax.jit(fn)(zb)
    assert out.dtype == jnp.float32
    assert max_rel(out, oracle(zb, w, seg, b, "silu", True, 1.0)) <= 1e-5  # exact bf16 shifts
    dz = jax.jit(jax.grad(lambda z: jnp.sum(fn(z) * c)))(zb)
    dz_ref = jax.jit(jax.grad(lambda z: jnp.sum(oracle(z, w, seg, b, "silu", True, 1.0) * c)))(zb.astype(jnp.float32))
    assert dz.dtype == jnp.bfloat16
    assert max_rel(dz, dz_ref) <= 1e-2  # dz rounded to bf16


@pytest.mark.parametrize("change,name", [
    (dict(z=jnp.zeros((1, 8, 2, 24))), "D"),
    (dict(z=jnp.zeros((1, 8, 2, 512)), weight=jnp.zeros((4, 2, 512))), "D"),
    (dict(z=jnp.zeros((8, 2, 16))), "z"),
    (dict(weight=jnp.zeros((5, 2, 16))), "weight"),
    (dict(weight=jnp.zeros((0, 2, 16))), "weight"),
    (dict(weight=jnp.zeros((4, 3, 16))), "weight"),
    (dict(bias=jnp.zeros((2, 32))), "bias"),
    (dict(segment_ids=jnp.zeros((1, 9), jnp.int32)), "segment_ids"),
    (dict(segment_ids=jnp.zeros((1, 8), jnp.float32)), "segment_ids"),
    (dict(activation="gelu"), "activation"),
    (dict(block_t=24), "block_t"),
    (dict(num_warps=3), "num_warps"),
])
def test_bad_inputs_raise_naming_the_argument(change, name):
    args = dict(z=jnp.zeros((1, 8, 2, 16)), weight=jnp.zeros((4, 2, 16)),
                segment_ids=jnp.zeros((1, 8), jnp.int32))
    args.update(change)
    with pytest.raises(ValueError, match=name):
        short_conv_norm(args.pop("z"), args.pop("weight"), args.pop("segment_ids"), interpret=True, **args)


@pytest.mark.parametrize("dtype,ks,bias", [(jnp.bfloat16, 4, True), (jnp.float32, 3, False)])
def test_forward_and_backward_lower_for_cuda(dtype, ks, bias):
    B, T, H, D = 1, 200, 2, 128
    z = jnp.zeros((B, T, H, D), dtype)
    w, b = jnp.zeros((ks, H, D)), (jnp.zeros((H, D)) if bias else None)
    seg = jnp.zeros((B, T), jnp.int32)

    def loss(z, w, b):
        return jnp.sum(short_conv_norm(z, w, seg, bias=b, normalize=True).astype(jnp.float32))

    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    # the forward kernel; with the gradient also the backward's two passes (dpre, then dz)
    for fn, n in [(loss, 1), (jax.value_and_grad(loss, (0, 1, 2) if bias else (0, 1)), 3)]:
        exp = jax.export.export(jax.jit(fn), platforms=("cuda",), disabled_checks=checks)(z, w, b)
        assert exp.mlir_module().count("__gpu$xla.gpu.triton") == n
