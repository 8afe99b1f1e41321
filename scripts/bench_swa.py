"""Sliding-window attention: our Pallas kernel vs cuDNN, side by side on one device.

    python scripts/bench_swa.py --seq 32768,131072 --out docs/bench_swa.json
    python scripts/bench_swa.py --seq 32768 --sweep      # block-size search for the kernel

Shapes follow issue 4: batch 1, 16 query / 8 kv heads, head_dim 128, window 4096, bf16.
Reports milliseconds (median of timed repeats), TFLOP/s, and the fraction of the
physical floor max(FLOPs / peak, bytes / bandwidth).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, ".")
from pallas_kernels.swa import gpu as swa_gpu  # noqa: E402
from pallas_kernels.swa import swa_attention  # noqa: E402

# Dense bf16 tensor-core peak and HBM bandwidth (vendor spec sheets, SXM parts).
PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}


def device_peaks():
    kind = jax.devices()[0].device_kind
    for name, peak in PEAKS.items():
        if name in kind:
            return kind, peak
    return kind, (None, None)


def visible_pairs(t, window):
    """Number of (query, key) pairs the causal window admits."""
    w = min(window, t)
    return w * (w + 1) // 2 + (t - w) * w


def floors(t, window, hq, hkv, d, itemsize):
    pairs = visible_pairs(t, window) * hq
    fwd_flops = 4 * pairs * d            # QK^T and PV
    bwd_flops = 8 * pairs * d            # dV, dP, dQ, dK (recomputing QK^T not counted)
    io = t * d * itemsize
    fwd_bytes = io * (2 * hq + 2 * hkv)                     # read q, k, v; write o
    bwd_bytes = io * (4 * hq + 4 * hkv) + fwd_bytes         # + read q, k, v, o, do; write dq, dk, dv
    return fwd_flops, fwd_bytes, fwd_flops + bwd_flops, bwd_bytes


def timeit(fn, args, repeats):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def make_fns(attn, do):
    fwd = jax.jit(attn)

    def fb(q, k, v):
        o, vjp = jax.vjp(attn, q, k, v)
        return o, vjp(do)
    return fwd, jax.jit(fb)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", default="32768,131072")
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="search kernel block sizes first")
    ap.add_argument("--features", action="store_true",
                    help="also time our kernel with sinks and packed documents")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    kind, (peak, bw) = device_peaks()
    print(f"device: {kind}  jax {jax.__version__}", flush=True)
    results = {"device": kind, "jax": jax.__version__, "window": args.window,
               "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
               "rows": []}
    cfg = {}
    for t in [int(s) for s in args.seq.split(",")]:
        ks = jax.random.split(jax.random.key(0), 4)
        shape_q = (1, t, args.heads, args.head_dim)
        shape_kv = (1, t, args.kv_heads, args.head_dim)
        q = jax.random.normal(ks[0], shape_q, jnp.bfloat16)
        k = jax.random.normal(ks[1], shape_kv, jnp.bfloat16)
        v = jax.random.normal(ks[2], shape_kv, jnp.bfloat16)
        do = jax.random.normal(ks[3], shape_q, jnp.bfloat16)
        ff, fb_, fbf, fbb = floors(t, args.window, args.heads, args.kv_heads, args.head_dim, 2)

        if args.sweep and not cfg:
            cfg = sweep(q, k, v, do, args.window, args.repeats)
            results["config"] = cfg

        def ours(q, k, v, sinks=0, segment_ids=None, **overrides):
            return swa_gpu.swa_attention_gpu(q, k, v, window=args.window, sinks=sinks,
                                             segment_ids=segment_ids,
                                             scale=args.head_dim ** -0.5, **dict(cfg, **overrides))  # noqa: B023 (timed within this iteration)

        def cudnn(q, k, v):
            return swa_attention(q, k, v, window=args.window, backend="cudnn")

        # pallas_gpu: the default (the Mosaic GPU forward on Hopper, else Triton; Triton backward);
        # pallas_gpu_triton_fwd: the Triton forward kernel, for the side-by-side.
        impls = [("cudnn", cudnn), ("pallas_gpu", ours),
                 ("pallas_gpu_triton_fwd", functools.partial(ours, fwd_kernel="triton"))]
        if args.features:
            # What cuDNN cannot express: sink tokens, and packed documents (8 per row).
            docs = jnp.repeat(jnp.arange(1, 9, dtype=jnp.int32), t // 8)[None, :]
            impls += [("pallas_gpu+sinks64", lambda q, k, v: ours(q, k, v, sinks=64)),
                      ("pallas_gpu+sinks64+8docs",
                       lambda q, k, v: ours(q, k, v, sinks=64, segment_ids=docs))]  # noqa: B023
        # Agreement check at full size (bf16 both sides, so a loose bound).
        a, c = jax.jit(ours)(q, k, v), jax.jit(cudnn)(q, k, v)
        err = float(jnp.sqrt(jnp.mean((a.astype(jnp.float32) - c.astype(jnp.float32)) ** 2)
                             / jnp.mean(c.astype(jnp.float32) ** 2)))
        print(f"T={t}: RMS-relative difference pallas_gpu vs cudnn = {err:.2e}", flush=True)
        results.setdefault("rms_rel_vs_cudnn", {})[t] = err
        for name, attn in impls:
            fwd, fb = make_fns(attn, do)
            for mode, fn, flops, nbytes in (("fwd", fwd, ff, fb_), ("fwd+bwd", fb, fbf, fbb)):
                ms = timeit(fn, (q, k, v), args.repeats)
                row = dict(seq=t, impl=name, mode=mode, ms=round(ms, 3),
                           tflops=round(flops / ms / 1e9, 1))
                if peak:
                    floor_ms = max(flops / peak, nbytes / bw) * 1e3
                    row.update(floor_ms=round(floor_ms, 3), of_floor=round(floor_ms / ms, 3))
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
        by = {(r["impl"], r["mode"]): r["ms"] for r in results["rows"] if r["seq"] == t}
        for mode in ("fwd", "fwd+bwd"):
            for name in ("pallas_gpu", "pallas_gpu_triton_fwd"):
                print(f"T={t} {mode}: {name} / cudnn = "
                      f"{by[(name, mode)] / by[('cudnn', mode)]:.2f}x", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


def sweep(q, k, v, do, window, repeats):
    """Tries a few block shapes; returns the fastest forward and backward settings."""
    scale = q.shape[-1] ** -0.5
    best = dict(swa_gpu.DEFAULT_CONFIG)
    def opts(prefix, shapes):
        return [{f"{prefix}block_q": bq, f"{prefix}block_k": bk, f"{prefix}num_warps": w,
                 f"{prefix}num_stages": s} for bq, bk, w, s in shapes]
    mosaic = [{"mosaic_block_kv": bk, "mosaic_stages": s} for bk, s in ((128, 2), (64, 3), (64, 4))]
    triton_fwd = [dict(o, fwd_kernel="triton") for o in opts("", [
        (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 2), (64, 128, 4, 2)])]
    stages = [
        (mosaic if swa_gpu.is_hopper() else triton_fwd, "fwd"),
        (opts("dq_", [(64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2), (128, 128, 8, 2),
                      (64, 64, 4, 3), (128, 32, 4, 2)]), "fwd+bwd"),
        (opts("dkv_", [(64, 64, 4, 2), (64, 128, 8, 2), (32, 128, 8, 2), (128, 64, 8, 2),
                       (32, 64, 4, 2), (64, 128, 4, 2)]), "fwd+bwd"),
    ]
    for options, mode in stages:
        timings = []
        for o in options:
            c = dict(best, **o)

            def attn(q, k, v, c=c):
                return swa_gpu.swa_attention_gpu(q, k, v, window=window, sinks=0,
                                                 segment_ids=None, scale=scale, **c)
            fwd, fb = make_fns(attn, do)
            try:
                ms = timeit(fwd if mode == "fwd" else fb, (q, k, v), max(5, repeats // 4))
            except Exception as e:  # a shape the compiler rejects (e.g. out of shared memory)
                print(f"sweep {mode} {o}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            print(f"sweep {mode} {o}: {ms:.3f} ms", flush=True)
            timings.append((ms, o))
        best.update(min(timings, key=lambda x: x[0])[1])
    print(f"sweep best: {best}", flush=True)
    return best


if __name__ == "__main__":
    main()
