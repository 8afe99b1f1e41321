"""bf16 sliding-window attention on the accelerator against the float32 oracle."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.swa import gpu as swa_gpu
from pallas_kernels.swa import swa_attention
from pallas_kernels.swa.reference import swa_attention_reference

ON_GPU = jax.devices()[0].platform == "gpu"


def rms_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


def inputs(b, t, hq, hkv, d, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, t, hq, d), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, t, hkv, d), jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, t, hkv, d), jnp.float32).astype(jnp.bfloat16)
    do = jax.random.normal(ks[3], (b, t, hq, d), jnp.float32).astype(jnp.bfloat16)
    return q, k, v, do


def packed_segments(b, t):
    # Left padding (0) on row 0, three documents on every row.
    seg = np.ones((b, t), np.int32)
    seg[:, t // 3:] = 2
    seg[:, 2 * t // 3:] = 3
    seg[0, :17] = 0
    return jnp.asarray(seg)


def fwd_bwd(attention, q, k, v, do):
    o, vjp = jax.vjp(attention, q, k, v)
    return (o, *vjp(do))


def oracle(q, k, v, do, **kw):
    up = [x.astype(jnp.float32) for x in (q, k, v, do)]
    o, vjp = jax.vjp(lambda q, k, v: swa_attention_reference(q, k, v, **kw), *up[:3])
    return (o, *vjp(up[3]))


BACKENDS = ["pallas_gpu", "cudnn"] if ON_GPU else ["pallas_tpu"]
CASES = [
    dict(window=128, sinks=0, segments=False),
    dict(window=100, sinks=0, segments=False),
    dict(window=4096, sinks=0, segments=False),  # window >= T: full causal
    dict(window=64, sinks=4, segments=False),
    dict(window=200, sinks=8, segments=True),
    dict(window=1, sinks=0, segments=False),
    dict(window=5000, sinks=130, segments=True),  # sinks spanning two key blocks
]


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "w{window}-s{sinks}-seg{segments}".format(**c))
@pytest.mark.parametrize("d", [64, 128])
def test_bf16_matches_fp32_oracle(backend, case, d):
    b, t, hq, hkv = 2, 1000, 4, 2  # T not a multiple of any block size
    if backend == "cudnn" and (case["sinks"] or case["segments"]):
        pytest.skip("cuDNN has no sinks / packed segments; auto falls back to the kernel")
    q, k, v, do = inputs(b, t, hq, hkv, d)
    kw = dict(window=case["window"], sinks=case["sinks"],
              segment_ids=packed_segments(b, t) if case["segments"] else None)
    attention = functools.partial(swa_attention, backend=backend, **kw)
    check_against_oracle(attention, case, q, k, v, do, **kw)


@pytest.mark.skipif(not ON_GPU, reason="the Triton and Mosaic GPU forwards need a GPU")
@pytest.mark.parametrize("fwd_kernel", ["triton", "mosaic"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "w{window}-s{sinks}-seg{segments}".format(**c))
def test_both_forward_kernels_match_fp32_oracle(fwd_kernel, case):
    # Mosaic GPU needs Hopper, bf16/fp16 and head_dim 128; the backward is Triton in both.
    if fwd_kernel == "mosaic" and not swa_gpu.is_hopper():
        pytest.skip("the Mosaic GPU forward is for Hopper GPUs")
    b, t, hq, hkv, d = 2, 1000, 4, 2, 128
    q, k, v, do = inputs(b, t, hq, hkv, d)
    kw = dict(window=case["window"], sinks=case["sinks"],
              segment_ids=packed_segments(b, t) if case["segments"] else None)
    attention = functools.partial(swa_gpu.swa_attention_gpu, scale=d ** -0.5,
                                  fwd_kernel=fwd_kernel, **kw)
    check_against_oracle(attention, case, q, k, v, do, **kw)


def check_against_oracle(attention, case, q, k, v, do, **kw):
    got = jax.jit(lambda *a: fwd_bwd(attention, *a))(q, k, v, do)
    want = jax.jit(lambda *a: oracle(*a, **kw))(q, k, v, do)
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        assert g.dtype == jnp.bfloat16
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        if case["window"] == 1 and name in ("dq", "dk"):
            # One visible key: softmax is constant, so these gradients are exactly 0.
            assert float(jnp.abs(g.astype(jnp.float32)).max()) < 1e-2, name
            continue
        err = rms_rel(g, w)
        assert err < 2e-2, f"{name}: RMS-relative error {err:.3e}"
