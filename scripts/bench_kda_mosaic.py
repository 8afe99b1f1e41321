"""KDA's forward output kernel in Pallas Mosaic GPU (Hopper: TMA copies, wgmma), checked and
timed side by side with the Pallas Triton kernel it ports (`out_fwd_triton` below: chunk_gpu's
output kernel until session 14, when the output moved into the sequential state kernel).

    python scripts/bench_kda_mosaic.py                               # both shapes, default configs
    python scripts/bench_kda_mosaic.py --shapes 8x4096x16 --configs '[[64, 2, 16, "wg"]]'
    python scripts/bench_kda_mosaic.py --lower_only                  # CPU: lower for CUDA only

Per (batch, head, chunk of C=64 tokens): o = (q * exp(G)) @ h_chunk + P @ v_new, bf16
operands and fp32 accumulation as the Triton kernel under the default bf16 matmul mode.
The inputs are the real intermediates of chunk_kda_gpu's forward pass (its own diag, intra
and state kernels, set up as scripts/bench_kda.py's --breakdown does), in the layouts
chunk_gpu stores them: q [B,T,H,K] bf16, G [B,T,H,K] fp32, P [B,T,H,C] bf16,
h [B,H,NT,K,V] bf16, v_new [B,T,H,V] bf16. No transposes: each block (one chunk of one head)
is a strided box that the TMA engine copies straight from these arrays.

Mosaic GPU kernel: one warpgroup per CTA; plgpu.kernel over the CUDA grid
(B, H, NT / inner, V / bv) and, inside each CTA, plgpu.emit_pipeline over its `inner` chunks
(max_concurrent_steps shared-memory buffers per operand: the next chunk's TMA loads run
during this chunk's products). jax 0.11.2 no longer lowers pl.pallas_call with Mosaic GPU
compiler params (no lowering rule is registered for them: a bare AssertionError), so the
gridded call is written as this kernel + pipeline. A V tile of 64 keeps two pipeline stages
within the 227 KB of shared memory (a stage of q, G, P, h, v_new and o is 88 KB at bv=64,
120 KB at bv=128); the V-tile axis is the fastest-varying CUDA grid axis so that the two
CTAs reading the same q, G, P tiles run side by side (L2 hits). Both lowering semantics
(per-lane and warpgroup) are offered; they compile to the same speed here.

Times: kernel time from CUPTI (jax's Mosaic GPU profiler, only the kernel itself), median
over --iters calls, two alternating rounds per kernel; a wall-clock loop of async calls as
a cross-check. Floors: bytes counted once (each input read once, o written once) over the
card's memory bandwidth; FLOPs of the two products over its dense bf16 rate.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu_mgpu

from pallas_kernels.kda import chunk_gpu as cg
from pallas_kernels.swa.mosaic_gpu import swizzled_tiling

# (bytes/s, dense bf16 FLOP/s): the datasheet HBM rate the lead asked for on the H200, the
# datasheet rate on the H100; the matmul rates measured on these cards (KINDS.md).
FLOORS = {"H200": (4.8e12, 790e12), "H100": (3.35e12, 798e12)}


def _out_step(_, q_ref, g_ref, p_ref, h_ref, vn_ref, o_ref):
    """One chunk, one V tile (shared-memory blocks). q*exp(G) and P go to the tensor cores
    from registers (wgmma's A operand), h and v_new from shared memory (its B operand)."""
    qg = (q_ref[...].astype(jnp.float32) * jnp.exp(g_ref[...])).astype(jnp.bfloat16)
    p16 = p_ref[...].astype(jnp.bfloat16)

    def products(acc_ref):
        plgpu_mgpu.wgmma(acc_ref, qg, h_ref)
        plgpu_mgpu.wgmma(acc_ref, p16, vn_ref)
        return acc_ref[...]  # waits for both

    o = pl.run_scoped(products, plgpu_mgpu.WGMMAAccumulatorRef(o_ref.shape, jnp.float32))
    o_ref[...] = o.astype(o_ref.dtype)


def out_fwd_triton(q, G, p, h, vn, cfg):
    """The Pallas Triton baseline, grid (B, H, T/C): o = (q * exp(G)) h_chunk + P v_new per
    chunk (no segments; products in cfg.mm)."""
    B, T, H, K = q.shape
    V = vn.shape[-1]

    def kernel(q_ref, g_ref, p_ref, h_ref, vn_ref, o_ref):
        qg = q_ref[...].astype(jnp.float32) * jnp.exp(g_ref[...])
        o = cg._mm(qg, h_ref[...], cfg.mm) + cg._mm(p_ref[...], vn_ref[...], cfg.mm)
        o_ref[...] = o.astype(o_ref.dtype)

    ck, cv, cp, _, _ = cg._chunk_specs(cfg.C, K, V)
    return pl.pallas_call(
        kernel, grid=(B, H, T // cfg.C), in_specs=[ck, ck, cp, cg._chunk_state_spec(K, V), cv],
        out_specs=cv, out_shape=jax.ShapeDtypeStruct((B, T, H, V), jnp.bfloat16),
        name="kda_out_fwd", **cg._params(cfg, cfg.warps_intra),
    )(q, G, p, h, vn)


SEMANTICS = {"lane": plgpu_mgpu.LoweringSemantics.Lane, "wg": plgpu_mgpu.LoweringSemantics.Warpgroup}


def out_fwd_mosaic(q, G, p, h, vn, *, C=64, bv=64, steps=2, inner=16, semantics="wg",
                   out_dtype=jnp.bfloat16):
    """The Mosaic GPU port of `out_fwd_triton` (seg=False, bf16 operands).

    plgpu.kernel over the CUDA grid (B, H, NT / inner, V / bv) and, inside each CTA,
    plgpu.emit_pipeline over its `inner` chunks (jax 0.11 lowers pl.pallas_call only to
    Triton on GPU; the Mosaic GPU form of a gridded call is this kernel + pipeline)."""
    B, T, H, K = q.shape
    V = vn.shape[-1]
    NT = T // C
    if T % C or NT % inner or V % bv or C != 64:
        raise ValueError(f"out_fwd_mosaic: need C=64 (got {C}), T % C == 0 (T={T}), "
                         f"NT % inner == 0 (NT={NT}, inner={inner}), V % bv == 0 (V={V}, bv={bv})")
    if not (q.dtype == h.dtype == vn.dtype == jnp.bfloat16):
        raise ValueError("out_fwd_mosaic: q, h and v_new must be bf16 (the bf16 matmul mode), got "
                         f"{q.dtype}, {h.dtype}, {vn.dtype}")

    def kda_out_fwd_mosaic(q_g, g_g, p_g, h_g, vn_g, o_g):
        b, hh, no, j = (lax.axis_index(n) for n in ("b", "h", "no", "j"))
        n = lambda ni: no * inner + ni

        def spec(block, index, dtype):
            return plgpu_mgpu.BlockSpec(block, index, transforms=swizzled_tiling(dtype, block[-1]))

        tok = lambda width, col, dtype: spec((None, C, None, width),
                                             lambda ni: (b, n(ni), hh, col), dtype)
        plgpu_mgpu.emit_pipeline(
            _out_step, grid=(inner,),
            in_specs=[tok(K, 0, q.dtype), tok(K, 0, G.dtype), tok(C, 0, p.dtype),
                      spec((None, None, None, K, bv), lambda ni: (b, hh, n(ni), 0, j), h.dtype),
                      tok(bv, j, vn.dtype)],
            out_specs=[tok(bv, j, out_dtype)],
            max_concurrent_steps=steps,
        )(q_g, g_g, p_g, h_g, vn_g, o_g)

    return plgpu_mgpu.kernel(
        kda_out_fwd_mosaic, out_type=jax.ShapeDtypeStruct((B, T, H, V), out_dtype),
        grid=(B, H, NT // inner, V // bv), grid_names=("b", "h", "no", "j"),
        compiler_params=plgpu_mgpu.CompilerParams(approx_math=True,
                                                  lowering_semantics=SEMANTICS[semantics]),
    )(q, G, p, h, vn)


def out_fwd_oracle(q, G, p, h, vn, C=64):
    """fp32 jnp form of the same formula on the same (stored) inputs."""
    B, T, H, K = q.shape
    f = lambda x: x.astype(jnp.float32).reshape(B, T // C, C, H, x.shape[-1])
    hi = lax.Precision.HIGHEST
    o = (jnp.einsum("bnchk,bhnkv->bnchv", f(q) * jnp.exp(f(G)), h.astype(jnp.float32), precision=hi)
         + jnp.einsum("bnchs,bnshv->bnchv", f(p), f(vn), precision=hi))
    return o.reshape(B, T, H, -1)


def kda_intermediates(shape, C=64, seed=0):
    """The out kernel's inputs as chunk_kda_gpu's forward makes them (bf16 inputs, bf16
    matmul mode), plus the Triton config. Inputs drawn as in bench_kda.make_np_inputs."""
    B, T, H, K, V = shape
    bf = jnp.bfloat16
    kq, kk, kv, kg, kb = jax.random.split(jax.random.key(seed), 5)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(jax.random.normal(kq, (B, T, H, K))).astype(bf)
    k = unit(jax.random.normal(kk, (B, T, H, K))).astype(bf)
    v = jax.random.normal(kv, (B, T, H, V)).astype(bf)
    g = -jax.nn.softplus(jax.random.normal(kg, (B, T, H, K)))
    beta = jax.nn.sigmoid(jax.random.normal(kb, (B, T, H)))
    G = jnp.cumsum(g.reshape(B, T // C, C, H, K), axis=2).reshape(B, T, H, K)
    m = jnp.zeros((B, T), jnp.float32)
    s0 = jnp.zeros((B, H, K, V), jnp.float32)

    from bench_kda import kernel_cfg  # a sibling script (scripts/ is on the path when run)

    cfg = kernel_cfg(shape, {"C": C})
    jit = lambda f, **kw: jax.jit(lambda *a: f(*a, cfg, **kw))
    d = jit(cg._diag_pairs)(q, k, G)
    w, u, p, kd, _, _, qg = jit(cg._intra_fwd, with_qg=True)(q, k, v, G, beta, m, m, m, d)
    _, _, h, vn = jit(cg._state_out_fwd, out_dtype=bf, residuals=True)(G, m, w, u, kd, qg, p, s0)
    return (q, G, p, h, vn), cfg


def out_bytes_flops(shape, C=64):
    """Minimum bytes (inputs read once, o written once, in the dtypes above) and the FLOPs of
    the two products, for the whole out kernel."""
    B, T, H, K, V = shape
    n = B * T * H
    nbytes = n * (2 * K + 4 * K + 2 * C + 2 * V + 2 * V) + B * H * (T // C) * K * V * 2
    flops = n * (2 * K * V + 2 * C * V)
    return nbytes, flops


def cupti_ms(fn, args, iters):
    from jax.experimental.mosaic.gpu import profiler
    _, ts = profiler.measure(fn, iterations=iters)(*args)
    return statistics.median(ts)


def wall_ms(fn, args, iters):
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    out = [fn(*args) for _ in range(iters)]
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / iters * 1e3


def poisoned_run(fn, args):
    """fn(*args) (compiled already) with its output buffer, where the allocator reuses it,
    just filled with NaN and freed: returns (out, whether out landed in that buffer). A
    landed output without NaN had every element written by the kernel."""
    aval = jax.eval_shape(fn, *args)
    poison = jax.block_until_ready(jnp.full(aval.shape, jnp.nan, aval.dtype))
    addr = poison.unsafe_buffer_pointer()
    poison.delete()
    out = jax.block_until_ready(fn(*args))
    return out, out.unsafe_buffer_pointer() == addr


def errors(x, ref):
    x, ref = x.astype(jnp.float32), ref.astype(jnp.float32)
    return dict(max_abs=float(jnp.max(jnp.abs(x - ref))),
                rms_rel=float(jnp.sqrt(jnp.mean((x - ref) ** 2) / jnp.mean(ref ** 2))),
                finite=bool(jnp.all(jnp.isfinite(x))))


def run_shape(shape, configs, iters, log):
    B, T, H, K, V = shape
    dev = jax.devices()[0].device_kind
    bw, peak = next((f for name, f in FLOORS.items() if name in dev), (None, None))
    nbytes, flops = out_bytes_flops(shape)
    args, cfg = kda_intermediates(shape)
    q, G, p, h, vn = args
    triton = jax.jit(lambda *a: out_fwd_triton(*a, cfg))
    triton(*args).delete()  # compile
    o_tri, landed = poisoned_run(triton, args)
    ref = jax.jit(out_fwd_oracle)(q, G, p, h, vn)
    head = dict(shape=shape, device=dev, bytes=nbytes, flops=flops,
                triton_vs_oracle=errors(o_tri, ref), triton_output_in_poisoned_buffer=landed)
    if bw:
        head |= dict(byte_floor_ms=nbytes / bw * 1e3, flop_floor_ms=flops / peak * 1e3)
    log(head)

    kernels = {"triton": (triton, args)}
    for bv, steps, inner, sem in configs:
        name = f"mosaic bv={bv} steps={steps} inner={inner} {sem}"
        try:
            fn = jax.jit(functools.partial(out_fwd_mosaic, bv=bv, steps=steps, inner=inner,
                                           semantics=sem))
            fn(q, G, p, h, vn).delete()  # compile
            o, landed = poisoned_run(fn, (q, G, p, h, vn))
            log(dict(kernel=name, vs_triton=errors(o, o_tri), vs_oracle=errors(o, ref),
                     output_in_poisoned_buffer=landed))
            del o
            kernels[name] = (fn, (q, G, p, h, vn))
        except Exception as e:  # report (the traceback's end) and go on with the other configs
            log(dict(kernel=name, error=f"{type(e).__name__}: {str(e)[:2000]}",
                     traceback=traceback.format_exc()[-3000:]))
    del o_tri, ref

    rows = {}
    for _ in range(2):  # alternating rounds: the spread between them is the noise
        for name, (fn, a) in kernels.items():
            r = rows.setdefault(name, dict(kernel=name, shape=shape, device=dev, cupti_ms=[], wall_ms=[]))
            try:
                r["cupti_ms"].append(round(cupti_ms(fn, a, iters), 4))
            except Exception as e:
                r["cupti_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            r["wall_ms"].append(round(wall_ms(fn, a, iters), 4))
    base = min(rows["triton"]["cupti_ms"] or rows["triton"]["wall_ms"])
    for r in rows.values():
        t = min(r["cupti_ms"] or r["wall_ms"])
        r |= dict(best_ms=t, triton_over_this=round(base / t, 3),
                  tb_per_s=round(nbytes / t / 1e9, 3), tflop_per_s=round(flops / t / 1e9, 2))
        if bw:
            r |= dict(frac_byte_floor=round(nbytes / bw / (t / 1e3), 3),
                      frac_flop_floor=round(flops / peak / (t / 1e3), 4))
        log(r)
    return rows


def lower_only(shape, configs):
    """CPU check: the Mosaic GPU kernel traces and lowers for CUDA (no device needed)."""
    B, T, H, K, V = shape
    sds = jax.ShapeDtypeStruct
    ins = (sds((B, T, H, K), jnp.bfloat16), sds((B, T, H, K), jnp.float32),
           sds((B, T, H, 64), jnp.bfloat16), sds((B, H, T // 64, K, V), jnp.bfloat16),
           sds((B, T, H, V), jnp.bfloat16))
    for bv, steps, inner, sem in configs:
        fn = jax.jit(functools.partial(out_fwd_mosaic, bv=bv, steps=steps, inner=inner,
                                       semantics=sem))
        jax.export.export(fn, platforms=("cuda",))(*ins)
        print(f"lowered for cuda: bv={bv} steps={steps} inner={inner} {sem} at {shape}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8x4096x16,1x65536x16")
    ap.add_argument("--head_dim", type=int, default=128)
    ap.add_argument("--configs", default='[[64, 2, 16, "wg"], [64, 2, 64, "wg"], [64, 2, 64, "lane"], '
                    '[128, 1, 16, "wg"], [128, 1, 64, "wg"]]',
                    help="JSON list of [bv, max_concurrent_steps, chunks per CTA, 'wg' | 'lane' "
                    "(Mosaic GPU lowering semantics: warpgroup or per-lane)]")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default="bench_kda_mosaic.jsonl")
    ap.add_argument("--lower_only", action="store_true")
    a = ap.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) + (a.head_dim, a.head_dim) for s in a.shapes.split(",")]
    configs = [tuple(c) for c in json.loads(a.configs)]
    if a.lower_only:
        for s in shapes:
            lower_only(s, configs)
        return

    def log(row):
        print(json.dumps(row), flush=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")

    table = []
    for s in shapes:
        table += list(run_shape(s, configs, a.iters, log).values())
    print("\nshape          kernel                               ms     triton/this  of byte floor  of flop floor")
    for r in table:
        print(f"{'x'.join(map(str, r['shape'][:3])):14s} {r['kernel']:36s} {r['best_ms']:7.4f}  "
              f"{r['triton_over_this']:6.3f}       {r.get('frac_byte_floor', float('nan')):6.3f}"
              f"         {r.get('frac_flop_floor', float('nan')):6.4f}")


if __name__ == "__main__":
    main()
