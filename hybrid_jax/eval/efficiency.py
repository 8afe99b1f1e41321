"""Efficiency of any DecoderLM: decode-cache bytes, time to first token, decode throughput.

* `cache_bytes_analytic`: bytes of the per-layer decode caches for one sequence, from the
  shapes each mixer's `init_cache` would allocate (`jax.eval_shape`: nothing is allocated).
* `cache_bytes_measured`: the device allocator's growth when that cache is really built
  (GPU/TPU; None where the backend keeps no memory statistics, e.g. the CPU).
* `time_to_first_token`: median wall time of the jit-compiled prefill of one prompt, compile
  excluded, ending when the first token's logits are on the device.
* `decode_tokens_per_second`: a jit-compiled greedy decode loop of `steps` tokens after a
  prefill, per second and per sequence × batch.
* `precompile`: compiles ahead of time, several at once, every executable that a list of such
  measurements will run, so that a benchmark's timed runs compile nothing.
* `load_rows`: the measured rows of several runs (their efficiency.json or their logs) as one
  list, for a table and plot of a measurement that took more than one run.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from hybrid_jax.models.cache import init_cache


def cache_bytes_analytic(model, context_length: int, batch_size: int = 1) -> int:
    shapes = jax.eval_shape(lambda: init_cache(model, batch_size, context_length))
    return sum(math.prod(s.shape) * jnp.dtype(s.dtype).itemsize for s in jax.tree_util.tree_leaves(shapes))


def _bytes_in_use() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats or "bytes_in_use" not in stats else int(stats["bytes_in_use"])


def cache_bytes_measured(model, context_length: int, batch_size: int = 1) -> int | None:
    before = _bytes_in_use()
    if before is None:
        return None
    cache = jax.block_until_ready(init_cache(model, batch_size, context_length))
    grown = _bytes_in_use() - before
    del cache
    return grown


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_length"))
def _prefill(graphdef, state, input_ids, *, cache_length):
    model = nnx.merge(graphdef, state)
    cache = init_cache(model, input_ids.shape[0], cache_length)
    out = model.forward(input_ids, cache=cache, logits="last")
    return out.logits[:, -1], out.cache


@functools.partial(jax.jit, static_argnames=("graphdef", "steps"))
def _decode(graphdef, state, cache, first, start, *, steps):
    model = nnx.merge(graphdef, state)

    def body(i, carry):
        tok, cache = carry
        pos = jnp.full((tok.shape[0], 1), start + i, jnp.int32)
        out = model.forward(tok[:, None], positions=pos, segment_ids=jnp.ones_like(pos), cache=cache, logits="last")
        return jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32), out.cache

    return jax.lax.fori_loop(0, steps, body, (first, cache))


# Executables compiled ahead of time by `precompile`, keyed like jit's own cache (static arguments,
# shapes and dtypes of the others). An AOT-compiled executable never enters jit's dispatch cache,
# so the measurements look here before calling the jitted function.
_compiled: dict[tuple, jax.stages.Compiled] = {}


def _abstract(x) -> jax.ShapeDtypeStruct:
    # with the sharding, so that the executable runs where the weights live, as jit's would
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


def _key(name: str, graphdef, arrays: tuple, static: dict) -> tuple:
    """`name`'s executable for these array shapes and dtypes and static arguments."""
    shapes = tuple((tuple(x.shape), x.dtype) for x in jax.tree_util.tree_leaves(arrays))
    return name, graphdef, shapes, tuple(sorted(static.items()))


def _aot_call(name: str, jitted, graphdef, arrays: tuple, scalars: tuple = (), **static):
    """`jitted(graphdef, *arrays, *scalars, **static)` as a call of no arguments: `precompile`'s
    executable for it if there is one (static arguments are baked into it), else jit."""
    compiled = _compiled.get(_key(name, graphdef, arrays, static))
    if compiled is None:
        return lambda: jitted(graphdef, *arrays, *scalars, **static)
    return lambda: compiled(*arrays, *scalars)


def is_out_of_memory(error: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


class Measurement(NamedTuple):
    """One `time_to_first_token` call (`decode=False`; `steps` is its `max_new_tokens`) or one
    `decode_tokens_per_second` call (`decode=True`)."""

    model: nnx.Module
    context_length: int
    batch_size: int = 1
    steps: int = 64
    decode: bool = False


class Precompiled(NamedTuple):
    compiled: int  # executables now ready (shared ones counted once)
    out_of_memory: int  # left to jit: the measurement compiles it again and records any OOM
    lowering_seconds: float  # tracing and lowering, one after another on the calling thread


def precompile(measurements: list[Measurement], workers: int) -> Precompiled:
    """Compiles, `workers` at a time, every executable that `measurements` will run and that is not
    compiled yet, so that their first (untimed) calls compile nothing.

    Tracing and lowering stay on this thread, on abstract inputs (`jax.ShapeDtypeStruct`: nothing
    is allocated); XLA compiles on the pool's threads, which release the GIL. An executable that
    runs out of memory while compiling (e.g. GPU autotuning beside other compiles) is skipped."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix="precompile")
    futures = {}

    def submit(key, traced):
        if key not in _compiled and key not in futures:
            futures[key] = pool.submit(traced.lower().compile)

    try:
        t0 = time.perf_counter()
        for m in measurements:
            graphdef, state = nnx.split(m.model)
            state = jax.tree.map(_abstract, state)
            ids = jax.ShapeDtypeStruct((m.batch_size, m.context_length), jnp.int32)
            cache_length = m.context_length + m.steps
            prefill = _prefill.trace(graphdef, state, ids, cache_length=cache_length)
            submit(_key("prefill", graphdef, (state, ids), dict(cache_length=cache_length)), prefill)
            if m.decode:
                _, cache = prefill.out_info
                first = jax.ShapeDtypeStruct((m.batch_size,), jnp.int32)
                # `start` a Python int, as `decode_tokens_per_second` passes it (weak-typed)
                decode = _decode.trace(graphdef, state, cache, first, m.context_length,
                                       steps=m.steps)
                submit(_key("decode", graphdef, (state, cache, first), dict(steps=m.steps)), decode)
        lowering_seconds = time.perf_counter() - t0
        out_of_memory = 0
        for key, future in futures.items():
            try:
                _compiled[key] = future.result()
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                out_of_memory += 1
    finally:
        pool.shutdown(cancel_futures=True)  # after an error, compile nothing more
    return Precompiled(len(futures) - out_of_memory, out_of_memory, lowering_seconds)


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `repeats` synchronised calls of `fn()`, after one untimed call (compile, warm-up)."""
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _prompt(model, batch_size: int, length: int, seed: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch_size, length), 0, model.config.vocab_size, jnp.int32)


def time_to_first_token(model, context_length: int, *, batch_size: int = 1, repeats: int = 3,
                        max_new_tokens: int = 1) -> float:
    """Seconds from a prompt of `context_length` tokens to its first token's logits.

    The prefill fills a cache of `context_length + max_new_tokens` entries; passing the `steps`
    of a following `decode_tokens_per_second` call lets both reuse one compiled prefill (at
    long contexts each compile costs 5-25 s on an H200)."""
    graphdef, state = nnx.split(model)
    ids = _prompt(model, batch_size, context_length)
    prefill = _aot_call("prefill", _prefill, graphdef, (state, ids),
                        cache_length=context_length + max_new_tokens)
    return median_seconds(lambda: prefill()[0], repeats)


def decode_tokens_per_second(model, context_length: int, *, batch_size: int = 1, steps: int = 64,
                             repeats: int = 3) -> float:
    """Generated tokens per second (all rows together) after a prompt of `context_length`."""
    graphdef, state = nnx.split(model)
    ids = _prompt(model, batch_size, context_length)
    logits, cache = _aot_call("prefill", _prefill, graphdef, (state, ids),
                              cache_length=context_length + steps)()
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    decode = _aot_call("decode", _decode, graphdef, (state, cache, first), (context_length,), steps=steps)
    seconds = median_seconds(lambda: decode()[0], repeats)
    return batch_size * steps / seconds


def _json_or_none(line: str):
    try:
        return json.loads(line)
    except ValueError:
        return None


def load_rows(paths: list[str]) -> list[dict]:
    """The rows of several runs of `scripts/bench_efficiency.py`, one per (model, context), a later
    file's row replacing an earlier one's. Each file is an efficiency.json ({"rows": [...]}) or a
    log holding the rows as the script prints them, one JSON object per line; other lines are
    skipped."""
    merged: dict[tuple[str, int], dict] = {}
    for path in paths:
        with open(path) as f:
            text = f.read()
        try:
            rows = json.loads(text)["rows"]
        except (ValueError, KeyError, TypeError):
            rows = [row for row in map(_json_or_none, text.splitlines())
                    if isinstance(row, dict) and {"model", "context", "cache_bytes"} <= row.keys()]
        if not rows:
            raise ValueError(f"{path}: no efficiency rows (an efficiency.json, or a log of printed rows)")
        for row in rows:
            merged[(row["model"], row["context"])] = row
    return list(merged.values())


def ttft_speedups(rows: list[dict], reference: str = "teacher") -> dict[str, list[tuple[int, float]]]:
    """{model: [(context, reference's TTFT / model's TTFT), ...]} by context, for every other model
    timed at a context where `reference` was timed too."""
    ref = {r["context"]: r["ttft_s"] for r in rows if r["model"] == reference and "ttft_s" in r}
    out: dict[str, list[tuple[int, float]]] = {}
    for r in sorted(rows, key=lambda r: r["context"]):
        if r["model"] != reference and "ttft_s" in r and r["context"] in ref:
            out.setdefault(r["model"], []).append((r["context"], ref[r["context"]] / r["ttft_s"]))
    return out


def efficiency_plot(rows: list[dict], path: str) -> str:
    """PNG of cache bytes against context length per model, beside time to first token where
    any row has it, and each model's speed-up over the teacher's TTFT where a teacher row has it.

    rows: {"model", "context", "cache_bytes"} dicts, with "ttft_s" where it was measured
    (rows without it appear in the cache panel only; with no timings at all, only that panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("cache_bytes", 2**-20, "decode cache per sequence (MiB)")]
    if any("ttft_s" in r for r in rows):
        panels.insert(0, ("ttft_s", 1e3, "time to first token (ms)"))
    speedups = ttft_speedups(rows)
    columns = len(panels) + bool(speedups)
    fig, axes = plt.subplots(1, columns, figsize=(5 * columns, 3.8), squeeze=False)
    colors = {name: f"C{i}" for i, name in enumerate(dict.fromkeys(r["model"] for r in rows))}  # one per model
    for ax, (key, scale, label) in zip(axes[0], panels):
        for name, color in colors.items():
            rs = sorted((r for r in rows if r["model"] == name and key in r), key=lambda r: r["context"])
            if rs:
                ax.plot([r["context"] for r in rs], [scale * r[key] for r in rs], marker="o", label=name,
                        color=color)
        ax.set_yscale("log")
        ax.set_ylabel(label)
    if speedups:
        ax = axes[0][-1]
        for name, points in speedups.items():
            ax.plot(*zip(*points), marker="o", label=name, color=colors[name])
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_ylabel("teacher TTFT / model TTFT")
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
