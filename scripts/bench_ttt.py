"""Benchmark the TTT memory (pallas_kernels.ttt.ttt_memory) on the accelerator at hand.

Side by side in one run: the fused chunkwise scan ("scan", what backend="auto" picks)
and the token-by-token jnp oracle ("reference"), bf16 inputs, forward and
forward+backward (grads wrt q, k, v, lr, momentum, decay, weights0), at several T to show
linear growth, plus one packed-documents row (segments changing mid-chunk).

    python scripts/bench_ttt.py --seq 2048,8192,32768,131072 --oracle-seq 2048,8192 --out ttt.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ttt import ttt_memory


def inputs(B, T, H, D, F, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 9)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    bf = jnp.bfloat16
    q = unit(jax.random.normal(ks[0], (B, T, H, D))).astype(bf)
    k = unit(jax.random.normal(ks[1], (B, T, H, D))).astype(bf)
    v = jax.random.normal(ks[2], (B, T, H, D)).astype(bf)
    lr = (0.1 * jax.nn.softplus(jax.random.normal(ks[3], (B, T, H)))).astype(bf)
    mom = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H))).astype(bf)
    dec = jax.nn.sigmoid(jax.random.normal(ks[5], (B, T, H)) - 4.0).astype(bf)
    w0 = (jax.random.normal(ks[6], (H, D, F)) / np.sqrt(D),
          jax.random.normal(ks[7], (H, F, D)) / np.sqrt(F),
          jax.random.normal(ks[8], (H, D, F)) / np.sqrt(D))
    return (q, k, v, lr, mom, dec), w0


def timed(fn, *args, reps):
    jax.block_until_ready(fn(*args))  # compile + warm up
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts), max(ts)


def flops_bytes(B, T, H, D, F, with_bwd):
    """Per token and head the fused scan does: read f_W(q) (3 matmuls D*F), inner forward
    of k (3), inner backward (dh, dW1, dW2, dW3: 4) = 10 matmuls of 2*D*F flops.  The outer
    backward recomputes the forward (checkpoint) and roughly doubles it: ~3x in total.
    Bytes: q, k, v read and o written once in bf16 (+ their grads for the backward)."""
    fwd = 10 * 2 * D * F * B * T * H
    io = 4 * B * T * H * D * 2
    return (fwd * 3, io * 2) if with_bwd else (fwd, io)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq", default="2048,8192,32768,131072")
    p.add_argument("--oracle-seq", default="2048,8192")
    p.add_argument("--oracle-bwd-max", type=int, default=2048,
                   help="the oracle's backward keeps its chunk buffer per token: skip it above this T")
    p.add_argument("--label", default="", help="free text printed with the device line")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--packed-seq", default="32768", help="T of the packed-documents row ('' to skip)")
    p.add_argument("--doc-len", type=int, default=3000, help="packed-documents row: mean doc length")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=400.0,
                   help="dense matmul rate to quote the fraction of (TF32 on Hopper ~400)")
    p.add_argument("--peak-gbs", type=float, default=3000.0)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    B, H, D, F, C = a.batch, a.heads, a.head_dim, a.hidden, a.chunk
    print(f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}  B={B} H={H} D={D} F={F} "
          f"chunk={C} bf16 {a.label}")

    def fwd(backend, seg):
        def f(args, w0):
            return ttt_memory(*args, weights0=w0, chunk_size=C, segment_ids=seg, backend=backend)[0]
        return jax.jit(f)

    def fwd_bwd(backend, seg):
        def loss(args, w0):
            o = ttt_memory(*args, weights0=w0, chunk_size=C, segment_ids=seg, backend=backend)[0]
            return jnp.sum(o.astype(jnp.float32) ** 3)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))

    rows = []
    oracle_seq = {int(s) for s in a.oracle_seq.split(",") if s}
    cases = [(int(T), "scan", False) for T in a.seq.split(",")]
    cases += [(T, "reference", False) for T in sorted(oracle_seq)]
    cases += [(int(T), "scan", True) for T in a.packed_seq.split(",") if T]
    for T, backend, packed in cases:
        args, w0 = inputs(B, T, H, D, F)
        seg = None
        if packed:  # documents of random length around doc_len, changing mid-chunk
            rng = np.random.default_rng(0)
            bounds = np.cumsum(rng.integers(a.doc_len // 2, 3 * a.doc_len // 2, size=T))
            seg = jnp.asarray(np.searchsorted(bounds, np.arange(T), side="right")[None] + 1,
                              jnp.int32).repeat(B, 0)
        for mode, make in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            if backend == "reference" and mode != "fwd" and T > a.oracle_bwd_max:
                continue
            reps = a.reps if backend == "scan" else 2
            med, lo, hi = timed(make(backend, seg), args, w0, reps=reps)
            fl, by = flops_bytes(B, T, H, D, F, mode != "fwd")
            row = dict(T=T, backend=backend, packed=packed, mode=mode, ms=med * 1e3,
                       ms_min=lo * 1e3, ms_max=hi * 1e3, tok_per_s=B * T / med,
                       tflops=fl / med / 1e12, frac_matmul_peak=fl / med / 1e12 / a.peak_tflops,
                       frac_bw=by / med / 1e9 / a.peak_gbs)
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(f"\n{'T':>7} {'backend':>9} {'packed':>6} {'mode':>8} {'ms':>9} {'tok/s':>11} {'TFLOP/s':>8} {'%peak':>6}")
    for r in rows:
        print(f"{r['T']:>7} {r['backend']:>9} {str(r['packed']):>6} {r['mode']:>8} {r['ms']:>9.2f} "
              f"{r['tok_per_s']:>11.0f} {r['tflops']:>8.2f} {100 * r['frac_matmul_peak']:>5.1f}%")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows,
                           config=vars(a)), f, indent=1)


if __name__ == "__main__":
    main()
