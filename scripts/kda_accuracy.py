"""RMS-relative error of `chunk_kda_gpu` variants (bf16 inputs) against the fp32 chunked oracle.

    python scripts/kda_accuracy.py --kernels '[{}, {"matmul_state": "bf16"}]' [--T 4096]

The forward output, the final state and every gradient, per kernel keyword set (the measurement
tests/gpu/test_kda_gpu.py bounds at 5e-3): use it before making a faster variant the default.
"""

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.kda.chunk_gpu import chunk_kda_gpu
from pallas_kernels.kda.reference import chunk_kda_reference


def rms_rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.sqrt(np.mean((x - ref) ** 2) / np.mean(ref ** 2)))


def inputs(B, T, H, K, V, segments, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    bf = jnp.bfloat16
    q = jax.random.normal(ks[0], (B, T, H, K)).astype(bf)
    k = jax.random.normal(ks[1], (B, T, H, K)).astype(bf)
    v = jax.random.normal(ks[2], (B, T, H, V)).astype(bf)
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, H, K)) * 2)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H))).astype(bf)
    s0 = jax.random.normal(ks[5], (B, H, K, V))
    seg = (jnp.cumsum(jax.random.uniform(ks[6], (B, T)) < 2e-3, axis=1).astype(jnp.int32)
           if segments else None)
    weights = (jax.random.normal(ks[7], (B, T, H, V)), jax.random.normal(ks[6], (B, H, K, V)))
    return (q, k, v, g, beta, s0), seg, weights


def errors(kernel_kw, *, B=1, T=4096, H=2, K=128, V=128, chunk_size=64, segments=False, seed=0):
    """{output, final state, each gradient: RMS-relative error}; inf where the kernel's is not finite."""
    args, seg, (w, ws) = inputs(B, T, H, K, V, segments, seed)

    def run(fn, *a):  # (o, final state)
        return fn(*a[:5], initial_state=a[5], output_final_state=True, segment_ids=seg,
                  use_qk_l2norm_in_kernel=True, chunk_size=chunk_size)

    def grads(fn, *a):
        def loss(*a):
            o, sT = run(fn, *a)
            return jnp.sum(o.astype(jnp.float32) * w) + jnp.sum(sT * ws), (o, sT)
        return jax.jit(jax.value_and_grad(loss, argnums=range(6), has_aux=True))(*a)

    with jax.default_matmul_precision("highest"):
        (_, (o_r, s_r)), g_r = grads(chunk_kda_reference, *(x.astype(jnp.float32) for x in args))
    kernel = functools.partial(chunk_kda_gpu, **kernel_kw)
    (_, (o, s)), g_o = grads(kernel, *args)
    # Not differentiated (a prefill): the forward that keeps nothing for a backward pass.
    o_p, s_p = jax.jit(functools.partial(run, kernel))(*args)
    out = {"o": rms_rel(o, o_r), "final_state": rms_rel(s, s_r),
           "o_prefill": rms_rel(o_p, o_r), "final_state_prefill": rms_rel(s_p, s_r)}
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "ds0"), g_o, g_r, strict=True):
        out[name] = rms_rel(a, b) if np.isfinite(np.asarray(a, np.float32)).all() else float("inf")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", default="[{}]", help="JSON list of chunk_kda_gpu keyword sets")
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--segments", action="store_true")
    a = ap.parse_args()
    for kw in json.loads(a.kernels):
        errs = errors(kw, T=a.T, segments=a.segments)
        print(json.dumps({"kernel": kw, "T": a.T, "segments": a.segments, "max": max(errs.values()),
                          **{k: float(f"{v:.3g}") for k, v in errs.items()}}), flush=True)


if __name__ == "__main__":
    main()
