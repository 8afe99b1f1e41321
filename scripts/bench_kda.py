"""Benchmark chunked KDA: our Pallas kernel vs fla's chunk_kda vs the jnp chunked oracle.

    python scripts/bench_kda.py --impl pallas,reference --out bench.jsonl
    python scripts/bench_kda.py --impl fla --out bench.jsonl          # PyTorch process
    python scripts/bench_kda.py --impl pallas --shapes 8x4096x16 --kernels '[{}, {"diagonal": "levels"}]'
    python scripts/bench_kda.py --shapes 8x4096x16 --breakdown '[{}, {"diag": "levels"}]'   # each kernel alone

JAX and PyTorch run in separate processes (each allocator wants the card) but one call on
one device. Inputs: q, k, v, beta bf16, g fp32 (log-decay from kda_gate's range), q/k
L2-normalised in the op. Times are medians of per-iteration device-synchronised times after
warm-up. The FLOP and byte counts are the model in docs/kda.md.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Ceilings measured on this workplace's cards (KINDS.md): copy bandwidth, bf16 matmul rate.
CEILINGS = {"H200": (4.3e12, 790e12), "H100": (3.0e12, 798e12)}


def flops(B, T, H, K, V, C=64):
    """Model FLOPs of the chunked algorithm; backward counted as twice the forward."""
    per_token = 3 * C * K + 2 * C * V + 6 * K * V
    fwd = B * T * H * per_token
    return fwd, 3 * fwd


def bytes_moved(B, T, H, K, V):
    """Each input read once, each output written once (bf16 q,k,v,beta,o; fp32 g)."""
    n = B * T * H
    fwd = n * (2 * K + 2 * K + 2 * V + 4 * K + 2 + 2 * V)
    bwd_extra = n * (2 * V + 2 * K + 2 * K + 2 * V + 4 * K + 2)  # read do; write dq,dk,dv,dg,db
    return fwd, fwd + bwd_extra


def make_np_inputs(B, T, H, K, V, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H, K), np.float32)
    k = rng.standard_normal((B, T, H, K), np.float32)
    v = rng.standard_normal((B, T, H, V), np.float32)
    g = -np.logaddexp(0, rng.standard_normal((B, T, H, K), np.float32)).astype(np.float32)
    beta = 1 / (1 + np.exp(-rng.standard_normal((B, T, H), np.float32)))
    do = rng.standard_normal((B, T, H, V), np.float32)
    return q, k, v, g, beta.astype(np.float32), do


def time_jax(fn, args, iters):
    """(median seconds per call, seconds of the first call: compile + run)."""
    import jax
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), first


def run_jax(impl, shape, iters, kernel_kw):
    import jax
    import jax.numpy as jnp

    from pallas_kernels.kda import chunk_kda

    B, T, H, K, V = shape
    q, k, v, g, beta, do = make_np_inputs(B, T, H, K, V)
    bf = jnp.bfloat16
    args = (jnp.asarray(q, bf), jnp.asarray(k, bf), jnp.asarray(v, bf), jnp.asarray(g),
            jnp.asarray(beta, bf))
    dov = jnp.asarray(do, bf)
    if impl == "pallas":
        def op(*a):
            from pallas_kernels.kda.chunk_gpu import chunk_kda_gpu
            return chunk_kda_gpu(*a, use_qk_l2norm_in_kernel=True, **kernel_kw)[0]
    else:
        def op(*a):
            return chunk_kda(*a, use_qk_l2norm_in_kernel=True, backend="reference")[0]

    fwd = jax.jit(op)

    @jax.jit
    def fwd_bwd(*a):
        o, vjp = jax.vjp(op, *a)
        return o, vjp(dov)

    res = {}
    for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        try:
            res[name], res[name + "_first_call_s"] = time_jax(fn, args, iters)
        except Exception as e:  # e.g. the oracle's backward running out of memory
            res[name] = None
            res[name + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return res, jax.devices()[0].device_kind


def run_fla(shape, iters):
    import torch
    print("importing fla", flush=True)
    from fla.ops.kda import chunk_kda as fla_chunk_kda
    print("fla imported", flush=True)

    B, T, H, K, V = shape
    q, k, v, g, beta, do = make_np_inputs(B, T, H, K, V)
    dev = "cuda"
    t = lambda x, dt: torch.from_numpy(x).to(dev, dt)
    bf = torch.bfloat16
    qt, kt, vt, gt, bt = t(q, bf), t(k, bf), t(v, bf), t(g, torch.float32), t(beta, bf)
    dot = t(do, bf)

    def fwd():
        with torch.no_grad():
            return fla_chunk_kda(qt, kt, vt, gt, bt, use_qk_l2norm_in_kernel=True)[0]

    leaves = [x.detach().requires_grad_(True) for x in (qt, kt, vt, gt, bt)]

    def fwd_bwd():
        o = fla_chunk_kda(*leaves, use_qk_l2norm_in_kernel=True)[0]
        o.backward(dot)
        return o

    def timed(fn):
        for i in range(3):
            fn()
            torch.cuda.synchronize()
            print("fla warm-up", i, flush=True)
        ts = []
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        return statistics.median(ts)

    res = {"fwd": timed(fwd)}
    print("fla fwd", res, flush=True)  # fla's backward autotuning can outlast a time limit
    res["fwd_bwd"] = timed(fwd_bwd)
    return res, torch.cuda.get_device_name()


# --breakdown keys: _Cfg field and the chunk_kda_gpu argument whose default it takes
SHORT = {"bv": ("bv", "block_v"), "bk": ("bk", "block_k"), "bki": ("bk_intra", "block_k_intra"),
         "bkc": ("bk_channels", "block_k_channels"),
         "wi": ("warps_intra", "num_warps_intra"),
         "ws": ("warps_state", "num_warps_state"), "wb": ("warps_blocks", "num_warps_blocks"),
         "wd": ("warps_diag", "num_warps_diag"), "st": ("stages", "num_stages"),
         "diag": ("diag", "diagonal"), "bvs": ("bv_state", "block_v_state"),
         "sst": ("stages_state", "num_stages_state"), "ssb": ("stages_state_bwd", "num_stages_state_bwd"),
         "mms": ("mm_state", "matmul_state")}


def kernel_cfg(shape, variant=None, interpret=False):
    """chunk_kda_gpu's static config (_Cfg) for bf16 inputs of `shape` without segments: its
    defaults, overridden by a variant's SHORT keys, "C" and "mm"."""
    import jax.numpy as jnp

    from pallas_kernels.kda import chunk_gpu as cg

    kw = variant or {}
    B, _, H, _, V = shape
    default = {a.name: a.default for a in inspect.signature(cg.chunk_kda_gpu).parameters.values()}
    fields = {field: kw.get(key, default[arg]) for key, (field, arg) in SHORT.items()}
    fields |= cg._state_settings(B, H, V, jnp.bfloat16, fields["bv_state"], fields["stages_state"],
                                 fields["mm_state"], fields["stages_state_bwd"])
    # mm: chunk_kda_gpu's default for bf16 inputs
    return cg._Cfg(C=kw.get("C", 64), seg=False, interpret=interpret, mm=kw.get("mm", "bf16"), **fields)


def breakdown(shape, iters, variants):
    """Time each Pallas kernel alone (fwd: diag, intra, state_out; bwd: prep, state, pairs,
    channels) per variant. A variant with "fwd_only" times the forward kernels of a pass that is
    not differentiated (intra_fwd writes no M and A, state_out_fwd no per-chunk states and
    v_new) and compiles no backward kernel."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.kda import chunk_gpu as cg

    B, T, H, K, V = shape
    q, k, v, g, beta, do = make_np_inputs(B, T, H, K, V)
    bf = jnp.bfloat16
    q, k = (jnp.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True), bf) for x in (q, k))
    v, dov = jnp.asarray(v, bf), jnp.asarray(do, bf)
    beta = jnp.asarray(beta)
    m = jnp.zeros((B, T), jnp.float32)
    s0 = jnp.zeros((B, H, K, V), jnp.float32)
    for kw in variants:
        row = dict(variant=kw, shape=shape)
        try:
            cfg = kernel_cfg(shape, kw, interpret=jax.default_backend() == "cpu")
            C = cfg.C
            G = jnp.cumsum(jnp.asarray(g).reshape(B, T // C, C, H, K), axis=2).reshape(B, T, H, K)
            row["state"] = {k: getattr(cfg, k) for k in ("bv_state", "stages_state", "stages_state_bwd", "mm_state")}

            def jit(f, cfg=cfg, **kws):
                return jax.jit(lambda *a: f(*a, cfg, **kws))

            # fwd_only: the prefill's kernels (intra without the M, A residuals), no backward
            fwd_only = bool(kw.get("fwd_only"))
            diag = jit(cg._diag_pairs)
            intra = jit(cg._intra_fwd, residuals=not fwd_only, with_qg=True)
            state_out = jit(cg._state_out_fwd, out_dtype=bf, residuals=not fwd_only)
            d = diag(q, k, G)
            w, u, p, kd, *MA, qg = intra(q, k, v, G, beta, m, m, m, d)
            _, _, *hvn = state_out(G, m, w, u, kd, qg, p, s0)
            timed = [("diag_fwd", diag, (q, k, G)),
                     ("intra_fwd", intra, (q, k, v, G, beta, m, m, m, d)),
                     ("state_out_fwd", state_out, (G, m, w, u, kd, qg, p, s0))]
            if not fwd_only:
                (h, vn), (M, A) = hvn, MA
                prep, sbwd = jit(cg._intra_prep_bwd), jit(cg._state_bwd)
                pairs, chans = jit(cg._intra_bwd_pairs), jit(cg._intra_bwd_channels)
                w, kd, qg, dvl = prep(q, k, G, beta, m, m, M, p, dov)
                dh, dvn, _ = sbwd(G, m, w, kd, qg, dov, dvl, s0)
                dv, db, dA, dP = pairs(k, v, G, beta, m, m, m, M, A, dov, h, vn, dvn)
                timed += [("prep_bwd", prep, (q, k, G, beta, m, m, M, p, dov)),
                          ("state_bwd", sbwd, (G, m, w, kd, qg, dov, dvl, s0)),
                          ("pairs_bwd", pairs, (k, v, G, beta, m, m, m, M, A, dov, h, vn, dvn)),
                          ("channels_bwd", chans, (q, k, G, m, m, dA, dP, dov, vn, dv, h, dh))]
            for name, fn, args in timed:
                row[name + "_ms"] = round(time_jax(fn, args, iters)[0] * 1e3, 3)
        except Exception as e:  # e.g. a variant over the shared-memory limit
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        print(json.dumps(row), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", default="pallas,reference")
    ap.add_argument("--shapes", default="8x4096x16,1x16384x16,1x65536x16")
    ap.add_argument("--head_dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--kernels", default="[{}]",
                    help="JSON list of chunk_kda_gpu keyword sets to time (pallas only)")
    ap.add_argument("--out", default="bench_kda.jsonl")
    ap.add_argument("--breakdown", default="", help="JSON list of kernel variants to time alone")
    a = ap.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) + (a.head_dim, a.head_dim)
              for s in a.shapes.split(",")]
    if a.breakdown:
        breakdown(shapes[0], a.iters, json.loads(a.breakdown))
        return
    variants = json.loads(a.kernels)
    for shape in shapes:
        B, T, H, K, V = shape
        f_fwd, f_all = flops(*shape)
        b_fwd, b_all = bytes_moved(*shape)
        for impl in a.impl.split(","):
            for kw in (variants if impl == "pallas" else [{}]):
                if impl == "fla":
                    res, dev = run_fla(shape, a.iters)
                else:
                    res, dev = run_jax(impl, shape, a.iters, kw)
                bw, peak = next((c for n, c in CEILINGS.items() if n in dev), (None, None))
                row = dict(impl=impl, B=B, T=T, H=H, K=K, V=V, device=dev, kernel=kw, **res)
                for name, fl, by in (("fwd", f_fwd, b_fwd), ("fwd_bwd", f_all, b_all)):
                    if res.get(name):
                        row[name + "_tflops"] = fl / res[name] / 1e12
                        if peak:
                            row[name + "_frac_flop_floor"] = fl / peak / res[name]
                            row[name + "_frac_byte_floor"] = by / bw / res[name]
                print(json.dumps(row), flush=True)
                with open(a.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

