"""Throughput of hybrid_jax.data.make_batches on the micro-world (real tokens per second).

    PYTHONPATH=. python scripts/bench_data_pipeline.py [--world large] [--seq_len 512] [--batch 64] [--seconds 8]

Builds the micro-world tokenizer for the world, then times packed batches of the
corpus + instruct mixture without and with background prefetching, in phases: the first
phase tokenises (chat rendering dominates), later ones read the document cache. First, the
index shuffle alone: grain's per-element shuffle against the pipeline's per-epoch one.
"""

import argparse
import os
import tempfile
import time

from hybrid_jax.data import make_batches
from hybrid_jax.data.tokenizer import build_tokenizer


def bench_shuffle(n=25_500, reads=20_000):
    """Side by side: grain's per-element index shuffle vs the pipeline's per-epoch
    permutation, reading the same records through a repeated MapDataset."""
    import grain

    from hybrid_jax.data.pipeline import _epoch_shuffle

    base = grain.MapDataset.source(list(range(n)))
    for name, ds in (("grain MapDataset.shuffle", base.shuffle(seed=1)),
                     ("per-epoch permutation", _epoch_shuffle(grain)(base, seed=1))):
        ds = ds.repeat()
        t = time.perf_counter()
        for i in range(reads):
            ds[i]
        print(f"{name}: {(time.perf_counter() - t) / reads * 1e6:.1f} us per record", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--world", default="large")
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--phases", type=int, default=3)
    a = p.parse_args()
    bench_shuffle()
    tok = build_tokenizer(tempfile.mkdtemp(), a.world, a.vocab_size)
    cfg = {"sources": [{"kind": "microworld", "task": "corpus", "world": a.world},
                       {"kind": "microworld", "task": "instruct", "world": a.world}]}
    print(f"cpus {os.cpu_count()}, world {a.world}, seq_len {a.seq_len}, batch {a.batch}")
    for prefetch in (0, 4):
        it = make_batches(cfg, tok, a.seq_len, a.batch, seed=0, shard=(0, 1), prefetch=prefetch)
        next(it)
        for phase in range(a.phases):
            t, n, batches = time.time(), 0, 0
            while time.time() - t < a.seconds:
                b = next(it)
                n += int((b["segment_ids"] > 0).sum())
                batches += 1
            dt = time.time() - t
            print(f"prefetch={prefetch} phase {phase}: {n / dt:,.0f} real tokens/s "
                  f"({batches / dt:.1f} batches/s, fill {n / (batches * a.batch * a.seq_len):.3f}); "
                  f"{it.stats}", flush=True)
        it.close()


if __name__ == "__main__":
    main()
