"""Benchmark the distillation logit loss: Pallas kernels (pallas_kernels.logit_loss) vs XLA.

    python scripts/bench_logit_loss.py --rows 1024,4096 --out bench_logit_loss.jsonl

Two levels, each timed for kernel = "xla" and "pallas_gpu" in one process:
  * loss   the forward KL of a Qwen3-0.6B-shaped lm_head (D = 1024, V = 151,936) on `rows`
           positions: both lm_head matmuls, the loss and the student's logit gradient, and the
           two gradient matmuls (`LogitLoss.compute_loss_from_hidden`, one chunk of `rows`),
           value and gradient under jit;
  * core   the loss and logit gradient alone on given float32 logits [rows, V]: the part the
           kernels replace. Its byte floor: the student's and the teacher's logits read twice
           (statistics, then gradient) and the bf16 gradient written once.
  * --sweep  the two kernels alone (row_stats + logits_grad) under each given tiling, on the
           same logits, to choose their defaults.
Times are medians of device-synchronised iterations after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_kda import time_jax  # noqa: E402  (median of device-synchronised calls after a warm-up)

D, V = 1024, 151936
COPY_BW = {"H200": 4.3e12, "H100": 3.0e12}  # measured copy bandwidth (device KINDS.md)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1024,4096", help="positions per chunk (batch x logit_chunk)")
    ap.add_argument("--kernels", default="xla,pallas_gpu")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--vocab", type=int, default=V)
    ap.add_argument("--sweep", default="[]",
                    help='JSON list of tilings, e.g. [{"block_rows": 4, "block_v": 1024, "num_warps": 4}]')
    ap.add_argument("--out", default="bench_logit_loss.jsonl")
    args = ap.parse_args()
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    head, t_head = (jnp.asarray(rng.normal(size=(D, args.vocab)) * 0.05, jnp.bfloat16) for _ in range(2))
    for rows in (int(r) for r in args.rows.split(",")):
        bench_rows(rows, args, rng, head, t_head)


def bench_rows(rows, args, rng, head, t_head):
    import jax
    import jax.numpy as jnp

    from hybrid_jax.distill import losses as L
    from pallas_kernels import logit_loss as LL

    kind = jax.devices()[0].device_kind
    bw = next((v for k, v in COPY_BW.items() if k in kind), None)
    loss = L.LogitLoss()
    bf = jnp.bfloat16
    hs, ht = (jnp.asarray(rng.normal(size=(1, rows, D)), bf) for _ in range(2))
    batch = dict(input_ids=jnp.asarray(rng.integers(0, args.vocab, (1, rows))),
                 segment_ids=jnp.ones((1, rows), jnp.int32))
    s_logits, t_logits = L.lm_head_logits(hs, head, bf), L.lm_head_logits(ht, t_head, bf)
    mask, labels = L.prediction_mask(batch), L.next_token_labels(batch["input_ids"])
    inv_den = 1.0 / jnp.sum(mask)
    floor_bytes = 2 * 2 * rows * args.vocab * 4 + rows * args.vocab * 2
    for kernel in args.kernels.split(","):
        row = dict(device=kind, jax=jax.__version__, rows=rows, vocab=args.vocab, kernel=kernel)

        def whole(hs, head, kernel=kernel):
            return loss.compute_loss_from_hidden(hs, head, ht, t_head, batch, chunk=rows, student_dtype=bf,
                                                 teacher_dtype=bf, kernel=kernel)[0]

        def core(s, t, kernel=kernel):
            return L._chunk_sums_and_logit_grad(loss, kernel, s, t, mask, labels, inv_den, bf)

        row["loss_ms"] = 1e3 * time_jax(jax.jit(jax.value_and_grad(whole, (0, 1))), (hs, head), args.iters)[0]
        row["core_ms"] = 1e3 * time_jax(jax.jit(core), (s_logits, t_logits), args.iters)[0]
        row["core_floor_ms"] = 1e3 * floor_bytes / bw if bw else None
        row["core_share_of_bandwidth"] = floor_bytes / (row["core_ms"] / 1e3) / bw if bw else None
        emit(row, args.out)
    for tiling in json.loads(args.sweep):
        stats_kw = {k: v for k, v in tiling.items() if k != "grad_warps"}
        grad_kw = dict(block_rows=tiling.get("block_rows", LL.BLOCK_ROWS), block_v=tiling.get("block_v", LL.BLOCK_V),
                       num_warps=tiling.get("grad_warps", tiling.get("num_warps", LL.NUM_WARPS)))

        def kernels(s, t, stats_kw=stats_kw, grad_kw=grad_kw):
            st = LL.row_stats(s, t, **stats_kw)
            return st, LL.logits_grad(s, t, labels.reshape(-1), st, mask.reshape(-1), None, out_dtype=bf, **grad_kw)

        row = dict(device=kind, rows=rows, vocab=args.vocab, tiling=tiling)
        try:
            row["kernels_ms"] = 1e3 * time_jax(jax.jit(kernels), (s_logits[0], t_logits[0]), args.iters)[0]
            row["share_of_bandwidth"] = floor_bytes / (row["kernels_ms"] / 1e3) / bw if bw else None
        except Exception as e:  # e.g. a tiling over the register or shared-memory limit
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        emit(row, args.out)


def emit(row, path):
    print(json.dumps(row), flush=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
