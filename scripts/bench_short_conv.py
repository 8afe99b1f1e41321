"""KDA's short convolution + SiLU + per-head L2 norm: XLA's fusions against the Pallas kernel.

    python scripts/bench_short_conv.py --shapes 8x4096x16,1x131072x16 --block_t 16,32,64

"jnp" is the unfused path the KDA layer takes by default (causal_short_conv, SiLU, then the
op's l2norm in fp32, cast back to the input dtype); "pallas bt=N" is `short_conv_norm` with
block_t N. Each is timed forward and forward+backward (d z and d weight of sum(out * dout)),
bf16, D=128, kernel size 4, one segment per row. The byte floor counts z read and out written
once (forward), plus z, dout read and dz written (backward).
"""

from __future__ import annotations

import argparse
import json

from bench_kda import time_jax


def main():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from hybrid_jax.layers.short_conv import causal_short_conv
    from pallas_kernels.kda.reference import l2norm
    from pallas_kernels.kda.short_conv import short_conv_norm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8x4096x16,1x131072x16", help="BxTxH list (D=128)")
    ap.add_argument("--block_t", default="16,32,64", help="Pallas block_t values to time")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default="")
    a = ap.parse_args()

    D, ks = 128, 4
    scale = D ** -0.5
    interpret = jax.default_backend() == "cpu"

    def jnp_path(z, w, seg):
        y = jax.nn.silu(causal_short_conv(z, w, seg)[0])
        return (l2norm(y) * scale).astype(z.dtype)

    impls = {"jnp": jnp_path}
    for bt in (int(x) for x in a.block_t.split(",") if x):
        impls[f"pallas bt={bt}"] = (lambda bt: lambda z, w, seg: short_conv_norm(
            z, w, seg, normalize=True, scale=scale, block_t=bt, interpret=interpret))(bt)

    rows = []
    for shape in a.shapes.split(","):
        B, T, H = (int(x) for x in shape.split("x"))
        rng = np.random.default_rng(0)
        z = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.bfloat16)
        dout = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.bfloat16)
        w = jnp.asarray(rng.standard_normal((ks, H, D)) * 0.5, jnp.float32)
        seg = jnp.ones((B, T), jnp.int32)
        n = B * T * H * D
        floor_fwd, floor_bwd = 4 * n, 4 * n + 6 * n  # bytes (bf16)
        bw = 4.8e12 if "H200" in jax.devices()[0].device_kind else 3.35e12
        ref = None
        for name, fn in impls.items():
            fwd = jax.jit(fn)
            grad = jax.jit(jax.grad(lambda z, w, f=fn: jnp.sum(f(z, w, seg).astype(jnp.float32)
                                                             * dout.astype(jnp.float32)), argnums=(0, 1)))
            out = fwd(z, w, seg)
            if ref is None:
                ref = out.astype(jnp.float32)
            err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
            t_f, _ = time_jax(fwd, (z, w, seg), a.iters)
            t_g, _ = time_jax(grad, (z, w), a.iters)
            row = dict(shape=shape, impl=name, fwd_ms=round(t_f * 1e3, 4), fwd_bwd_ms=round(t_g * 1e3, 4),
                       fwd_floor_frac=round(floor_fwd / bw / t_f, 3),
                       fwd_bwd_floor_frac=round((floor_fwd + floor_bwd) / bw / t_g, 3),
                       max_abs_diff_vs_jnp=err, device=jax.devices()[0].device_kind)
            print(json.dumps(row), flush=True)
            rows.append(row)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
