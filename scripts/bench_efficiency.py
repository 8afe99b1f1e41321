"""Cache size, time to first token and decode throughput: teacher vs Hybrid-KDA vs AllMem, one device.

    python scripts/bench_efficiency.py --out=DIR                       # Qwen3-0.6B config, random bf16
    python scripts/bench_efficiency.py --tiny --contexts=256,1024      # a CPU smoke run of the same code
    python scripts/bench_efficiency.py --analytic                      # cache bytes only (any machine)
    python scripts/bench_efficiency.py --merge=a/eff.log,b/efficiency.json --out=DIR   # one table, one plot

The three models are built from the real Qwen3-0.6B config (random weights; speed does not
depend on them): the teacher, the Hybrid-KDA student (attention kept at {0,2,6,11,13,18,21},
KDA elsewhere) and the AllMem student (every layer SWA + TTT memory). For each context length:
decode-cache bytes per sequence (analytic, and the allocator's growth where the device reports
it), time to first token at batch 1, and greedy decode tokens/s at batch `--decode_batch`.
Writes DIR/efficiency.json and DIR/efficiency.png and prints a markdown table with the
teacher/student ratios. A configuration that runs out of memory is recorded as OOM. Rows are
printed, and efficiency.json rewritten, as they are measured, so a run cut short keeps what it
finished; `--merge` makes one table and plot from several runs' efficiency.json files or logs
(a later file's row replaces an earlier one's). `--analytic` skips the timed measurements (the
cache sizes need no accelerator). Before the first timed run, every executable the measurements
need is compiled, `--compile_workers` at a time (compilation dominated a serial run's wall
time); the timed runs themselves stay one after another.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QWEN3_0P6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1_000_000.0,
                  max_position_embeddings=131072, tie_word_embeddings=True, rms_norm_eps=1e-6)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=8192, tie_word_embeddings=True)


MODELS = ("teacher", "hybrid-kda", "allmem", "hybrid-kda-xla-conv")


def build_models(shape: dict, dtype: str, window: int, chunk: int, names=MODELS[:3]):
    """The teacher (always: the students are built from it) and the students of `names` among
    Hybrid-KDA, AllMem and "hybrid-kda-xla-conv", Hybrid-KDA with XLA's short convolutions and
    L2 norm (fused_conv=False) for a side-by-side TTFT."""
    import jax
    from flax import nnx

    import hybrid_jax as hj
    from hybrid_jax.models.qwen3 import Qwen3, Qwen3Config

    if unknown := set(names) - set(MODELS):
        raise SystemExit(f"--models: unknown {sorted(unknown)}; choose from {sorted(MODELS)}")
    t0 = time.perf_counter()
    teacher = Qwen3(Qwen3Config(**shape, dtype=dtype, param_dtype=dtype), rngs=nnx.Rngs(0))
    jax.block_until_ready(nnx.state(teacher))
    print(f"teacher built in {time.perf_counter() - t0:.1f} s", flush=True)  # a slow build shows in the log
    layers = shape["num_hidden_layers"]
    kept = [i for i in (0, 2, 6, 11, 13, 18, 21) if i < layers] or [0]
    spec = f"attention:{','.join(map(str, kept))};kda:{','.join(str(i) for i in range(layers) if i not in kept)}"
    students = {
        "hybrid-kda": lambda: hj.build_student(teacher, spec),
        "allmem": lambda: hj.build_student(teacher, f"allmem:0-{layers - 1}",
                                           mixer_config={"allmem": dict(window=window, chunk_size=chunk)}),
        "hybrid-kda-xla-conv": lambda: hj.build_student(teacher, spec, mixer_config={"kda": {"fused_conv": False}}),
    }
    models = {"teacher": teacher} | {name: students[name]() for name in names if name != "teacher"}
    jax.block_until_ready([nnx.state(m) for m in models.values()])
    print(f"students built in {time.perf_counter() - t0:.1f} s (cumulative)", flush=True)
    return models


def measure(models: dict, contexts: list[int], decode_batch: int, steps: int, analytic: bool,
            repeats: int = 3, ttft_only: bool = False, compile_workers: int = 0,
            on_row=lambda rows: None) -> list[dict]:
    """One row per context and model; with `compile_workers` > 1, everything the timed runs will
    execute is compiled first, that many at a time. `on_row(rows so far)` after each row."""
    from hybrid_jax.eval import efficiency

    if not analytic and compile_workers > 1:
        t0 = time.perf_counter()
        runs = [(1, False)] if ttft_only else [(1, False), (decode_batch, True)]  # (batch, decode)
        done = efficiency.precompile(
            [efficiency.Measurement(model, ctx, batch, steps, decode)
             for ctx in contexts for model in models.values() for batch, decode in runs],
            compile_workers)
        oom = f"; {done.out_of_memory} out of memory, left to their measurements"
        print(f"precompiled {done.compiled} executables in {time.perf_counter() - t0:.1f} s "
              f"({compile_workers} threads; the first {done.lowering_seconds:.1f} s also tracing "
              f"and lowering){oom if done.out_of_memory else ''}", flush=True)
    rows = []
    for ctx in contexts:
        for name, model in models.items():
            row = dict(model=name, context=ctx, cache_bytes=efficiency.cache_bytes_analytic(model, ctx))
            rows.append(row)
            try:
                if not analytic:
                    if not ttft_only:
                        row["cache_bytes_measured"] = efficiency.cache_bytes_measured(model, ctx)
                    row["ttft_s"] = efficiency.time_to_first_token(model, ctx, repeats=repeats,
                                                                   max_new_tokens=steps)
                    if not ttft_only:
                        row["decode_tok_s"] = efficiency.decode_tokens_per_second(
                            model, ctx, batch_size=decode_batch, steps=steps, repeats=repeats)
            except Exception as e:  # noqa: BLE001 - an out-of-memory size is a result, recorded as such
                if not efficiency.is_out_of_memory(e):
                    raise
                row["error"] = "OOM"
            print(json.dumps(row), flush=True)
            on_row(rows)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| context | model | cache / sequence | vs teacher | TTFT (ms) | teacher / model TTFT | decode tok/s |",
             "|---|---|---|---|---|---|---|"]
    teacher = {r["context"]: r for r in rows if r["model"] == "teacher"}
    for r in sorted(rows, key=lambda r: -r["context"]):  # merged runs: longest context first
        t = teacher.get(r["context"], {})
        ttft = f"{1e3 * r['ttft_s']:.1f}" if "ttft_s" in r else r.get("error", "–")
        speed = f"{t['ttft_s'] / r['ttft_s']:.2f}x" if "ttft_s" in r and "ttft_s" in t else ""
        share = f"{100 * r['cache_bytes'] / t['cache_bytes']:.1f}%" if t else ""
        dec = f"{r['decode_tok_s']:,.0f}" if "decode_tok_s" in r else ""
        lines.append(f"| {r['context']} | {r['model']} | {r['cache_bytes'] / 2**20:,.1f} MiB | "
                     f"{share} | {ttft} | {speed} | {dec} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_efficiency")
    ap.add_argument("--contexts", default="4096,16384,32768,65536,131072")
    ap.add_argument("--decode_batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--window", type=int, default=4096, help="AllMem sliding window")
    ap.add_argument("--chunk", type=int, default=512, help="AllMem memory chunk")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke run)")
    ap.add_argument("--analytic", action="store_true", help="cache bytes only, no timed runs")
    ap.add_argument("--models", default="teacher,hybrid-kda,allmem",
                    help="which to measure: teacher, hybrid-kda, allmem, and hybrid-kda-xla-conv "
                    "(Hybrid-KDA with fused_conv=False)")
    ap.add_argument("--ttft_only", action="store_true",
                    help="time to first token only (no measured cache bytes, no decode loop to compile)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs per measurement (median); 1 saves device time at long contexts")
    ap.add_argument("--compile_workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="threads compiling every executable before the first timed run; "
                    "0 or 1: each compiles at its first (untimed) call, as the measurements go")
    ap.add_argument("--merge", default="",
                    help="comma-separated efficiency.json files or logs of earlier runs: write their "
                    "rows' table and plot to --out, measuring nothing")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    from hybrid_jax.eval.efficiency import efficiency_plot, load_rows

    def save(rows, **about):
        with open(os.path.join(args.out, "efficiency.json"), "w") as f:
            json.dump({**about, "rows": rows}, f, indent=2)

    if args.merge:
        rows = load_rows(args.merge.split(","))
        save(rows, merged_from=args.merge.split(","))
        efficiency_plot(rows, os.path.join(args.out, "efficiency.png"))
        print(table(rows))
        return
    import jax

    wanted = args.models.split(",")
    if "teacher" not in wanted:
        raise SystemExit("--models must include the teacher: every ratio is against it")
    dtype = "float32" if args.tiny else "bfloat16"
    models = build_models(TINY if args.tiny else QWEN3_0P6B, dtype, args.window, args.chunk, wanted)
    device = jax.devices()[0].device_kind
    rows = measure(models, [int(c) for c in args.contexts.split(",")], args.decode_batch, args.steps,
                   args.analytic, args.repeats, args.ttft_only, args.compile_workers,
                   on_row=lambda rows: save(rows, device=device, jax=jax.__version__))
    efficiency_plot(rows, os.path.join(args.out, "efficiency.png"))
    print(f"device: {device}, jax {jax.__version__}")
    print(table(rows))


if __name__ == "__main__":
    main()
