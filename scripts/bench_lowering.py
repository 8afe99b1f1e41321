"""Tracing and lowering time of the Qwen3-0.6B-shaped teacher and Hybrid-KDA student, with each
decoder block as its own jit (`hybrid_jax.models.qwen3.JIT_BLOCKS`, the default) and inline.

    python scripts/bench_lowering.py                                  # GPU programs, on any machine
    python scripts/bench_lowering.py --targets prefill --seq_len 131072 --out DIR

Before XLA compiles anything, JAX traces the model to a jaxpr and lowers it to StableHLO; the
Pallas kernels are lowered to Triton (GPU) or Mosaic (TPU) in Python at that point. Both steps
run on one CPU thread whatever the accelerator, so their time is measured here on the host alone:
`jax.default_backend` is made to answer `--platform` while tracing (and, for cuda, the card to
count as a Hopper), so the layers pick the kernels they pick on an H100 / H200 or TPU, and the
lowering targets that platform. Nothing is allocated (abstract inputs). Targets: `prefill` (the efficiency benchmark's prefill, last-position logits) and
`train` (the teacher's forward and the student's forward and backward to a loss of both
models' logits, as a distillation step computes them, without the optimiser). XLA's own
compile time needs the accelerator and is not measured here.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KERNEL_MARKERS = {"cuda": ("custom_call @__gpu$xla.gpu.triton", "custom_call @mosaic_gpu"),
                  "tpu": ("custom_call @tpu_custom_call",)}


def programs(teacher, student, target: str, batch: int, seq_len: int):
    """{model: (function, abstract arguments)} for one target."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from hybrid_jax.eval import efficiency

    ids = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)

    def abstract(model):
        graphdef, state = nnx.split(model)
        return graphdef, jax.tree.map(efficiency._abstract, state)

    if target == "prefill":
        out = {}
        for name, model in (("teacher", teacher), ("hybrid-kda", student)):
            graphdef, state = abstract(model)
            out[name] = functools.partial(efficiency._prefill, graphdef, cache_length=seq_len + 64), (state, ids)
        return out
    if target == "train":
        t_def, t_state = abstract(teacher)
        s_def, s_state = abstract(student)

        def step(s_state, t_state, ids):
            target_logits = jax.lax.stop_gradient(nnx.merge(t_def, t_state).forward(ids).logits)

            def loss(s):
                logits = nnx.merge(s_def, s).forward(ids).logits
                return jnp.mean(jax.nn.log_softmax(logits) * jax.nn.softmax(target_logits))

            return jax.value_and_grad(loss)(s_state)

        return {"teacher forward + student forward/backward": (step, (s_state, t_state, ids))}
    raise SystemExit(f"--targets: unknown {target!r}; choose prefill, train")


def measure(fn, args, platform: str) -> dict:
    import jax

    jax.clear_caches()  # every trace from scratch, the blocks' own jit included
    t0 = time.perf_counter()
    traced = jax.jit(fn).trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower(lowering_platforms=(platform,))
    t2 = time.perf_counter()
    text = lowered.as_text()
    return dict(trace_s=t1 - t0, lower_s=t2 - t1, stablehlo_mb=len(text) / 1e6,
                kernel_calls=sum(text.count(m) for m in KERNEL_MARKERS.get(platform, ("custom_call @",))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench_lowering")
    ap.add_argument("--targets", default="prefill,train")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq_len", type=int, default=4096)
    ap.add_argument("--platform", default="cuda", help="lowering target: cuda or tpu")
    args = ap.parse_args()

    import jax

    real_backend = jax.default_backend()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_efficiency import QWEN3_0P6B, build_models

    from hybrid_jax.models import qwen3

    models = build_models(QWEN3_0P6B, "bfloat16", 4096, 512, ["teacher", "hybrid-kda"])
    # Trace the program that the platform runs: the kernel dispatch asks jax.default_backend(),
    # and the attention forward's choice of the Mosaic kernel asks whether the card is a Hopper.
    jax.default_backend = lambda: "gpu" if args.platform == "cuda" else args.platform
    if args.platform == "cuda":
        from pallas_kernels.swa import gpu as swa_gpu

        swa_gpu.is_hopper = lambda: True
    rows = []
    for target in args.targets.split(","):
        for name, (fn, fn_args) in programs(models["teacher"], models["hybrid-kda"], target,
                                            args.batch, args.seq_len).items():
            for jit_blocks in (True, False):
                qwen3.JIT_BLOCKS = jit_blocks
                row = dict(target=target, model=name, blocks="own jit" if jit_blocks else "inline",
                           **measure(fn, fn_args, args.platform))
                rows.append(row)
                print(json.dumps(row), flush=True)
    qwen3.JIT_BLOCKS = True
    print(f"\nhost backend {real_backend}, jax {jax.__version__}, lowered for {args.platform}, "
          f"batch {args.batch} x {args.seq_len}\n")
    print("| target | model | blocks | trace (s) | lower (s) | StableHLO (MB) | kernel calls |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['target']} | {r['model']} | {r['blocks']} | {r['trace_s']:.1f} | {r['lower_s']:.1f} | "
              f"{r['stablehlo_mb']:.1f} | {r['kernel_calls']} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "lowering.json"), "w") as f:
        json.dump({"jax": jax.__version__, "platform": args.platform, "batch": args.batch,
                   "seq_len": args.seq_len, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
