"""KDA's short convolution + SiLU + per-head L2 norm: XLA's fusions against the Pallas kernel.

    python scripts/bench_short_conv.py --shapes 8x4096x16,1x131072x16 --configs 16x4,32x4,32x8

"jnp" is XLA's path, the KDA layer's with fused_conv=False (causal_short_conv, SiLU, then the
op's l2norm in fp32, cast back to the input dtype); "pallas bt=N w=W" is `short_conv_norm` with
block_t N and num_warps W; "copy" is z * 2 (reads and writes what the forward does: the
achievable memory rate). Each is timed forward and forward+backward (jax.vjp: the output, then
d z and d weight for a random d out), bf16, D=128, kernel size 4, one segment per row. Times
are medians of 5 batches of `--iters` calls dispatched back to back (one sync per batch), so
host dispatch overlaps the device. The byte floor counts z read and out written once
(forward, 4 B per element), plus z and dout read and dz written (backward, 6 B): 10 B per
element for forward+backward, at the datasheet HBM rate (H200 4.8 TB/s, H100 3.35 TB/s).
`--fwd_only_configs` times more configs forward only.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time


def time_pipelined(fn, args, iters):
    """Median over 5 batches of seconds per call, `iters` calls dispatched back to back."""
    import jax
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    per = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        per.append((time.perf_counter() - t) / iters)
    return statistics.median(per)


def main():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from hybrid_jax.layers.short_conv import causal_short_conv
    from pallas_kernels.kda.reference import l2norm
    from pallas_kernels.kda.short_conv import short_conv_norm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8x4096x16,1x131072x16", help="BxTxH list (D=128)")
    ap.add_argument("--configs", default="16x4,32x4,32x8,64x8", help="block_t x num_warps list (fwd and fwd+bwd)")
    ap.add_argument("--fwd_only_configs", default="", help="block_t x num_warps list, forward only")
    ap.add_argument("--variant", default="", help="module:function list of other short_conv_norm versions to time beside")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default="")
    a = ap.parse_args()

    D, ks = 128, 4
    scale = D ** -0.5
    interpret = jax.default_backend() == "cpu"

    def jnp_path(z, w, seg):
        y = jax.nn.silu(causal_short_conv(z, w, seg)[0])
        return (l2norm(y) * scale).astype(z.dtype)

    def pallas(impl, bt, nw):
        return lambda z, w, seg: impl(z, w, seg, normalize=True, scale=scale, block_t=bt, num_warps=nw,
                                      interpret=interpret)

    def configs(s):
        return [tuple(int(v) for v in c.split("x")) for c in s.split(",") if c]

    impls = {"jnp": (jnp_path, True), "copy": (lambda z, w, seg: z * 2, False)}
    impls.update({f"pallas bt={bt} w={nw}": (pallas(short_conv_norm, bt, nw), True) for bt, nw in configs(a.configs)})
    for variant in filter(None, a.variant.split(",")):
        mod, fn = variant.split(":")
        other = getattr(importlib.import_module(mod), fn)
        impls.update({f"{mod} bt={bt} w={nw}": (pallas(other, bt, nw), True) for bt, nw in configs(a.configs)})
    impls.update({f"pallas bt={bt} w={nw} (fwd)": (pallas(short_conv_norm, bt, nw), False)
                  for bt, nw in configs(a.fwd_only_configs)})

    rows = []
    for shape in a.shapes.split(","):
        B, T, H = (int(x) for x in shape.split("x"))
        rng = np.random.default_rng(0)
        z = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.bfloat16)
        dout = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.bfloat16)
        w = jnp.asarray(rng.standard_normal((ks, H, D)) * 0.5, jnp.float32)
        seg = jnp.ones((B, T), jnp.int32)
        n = B * T * H * D
        floor_fwd, floor_all = 4 * n, 10 * n  # bytes (bf16)
        kind = jax.devices()[0].device_kind
        bw = 4.8e12 if "H200" in kind else 3.35e12
        ref = ref_dz = None
        for name, (fn, grad) in impls.items():
            fwd = jax.jit(fn)
            out = fwd(z, w, seg)
            row = dict(shape=shape, impl=name, device=kind)
            if name != "copy":
                if ref is None:
                    ref = out.astype(jnp.float32)
                row["fwd_max_abs_diff_vs_jnp"] = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
            t_f = time_pipelined(fwd, (z, w, seg), a.iters)
            row.update(fwd_ms=round(t_f * 1e3, 4), fwd_floor_frac=round(floor_fwd / bw / t_f, 3))
            if grad:
                def vjp(z, w, seg, dout, fn=fn):
                    out, back = jax.vjp(lambda z, w: fn(z, w, seg), z, w)
                    return out, back(dout)
                both = jax.jit(vjp)
                _, (dz, _) = both(z, w, seg, dout)
                dz = dz.astype(jnp.float32)
                if ref_dz is None:
                    ref_dz = dz
                row["dz_rms_rel_vs_jnp"] = float(jnp.sqrt(jnp.mean((dz - ref_dz) ** 2) / jnp.mean(ref_dz ** 2)))
                t_g = time_pipelined(both, (z, w, seg, dout), a.iters)
                row.update(fwd_bwd_ms=round(t_g * 1e3, 4), fwd_bwd_floor_frac=round(floor_all / bw / t_g, 3))
            print(json.dumps(row), flush=True)
            rows.append(row)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
