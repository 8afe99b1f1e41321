"""Prefill and decode throughput of hybrid_jax generation vs transformers (PyTorch, sdpa), same card.

    python scripts/bench_generate.py --out=DIR                 # Qwen3-0.6B config, random bf16 weights
    python scripts/bench_generate.py --compare_loops           # while_loop vs python-loop decode, tiny model

The default mode runs one worker process per framework (so JAX's and PyTorch's allocators never
share the card), each over batch {1, 16} x context {4K, 32K}: prefill of `context` prompt tokens,
then `--new_tokens` greedy decode steps. It prints a table, writes DIR/bench_generate.json, and
reports each number's fraction of the card's physical limit (HBM bytes for decode, bf16 FLOPs
for prefill). A configuration that runs out of memory is recorded as "OOM", not skipped silently.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

QWEN3_0P6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1_000_000.0,
                  max_position_embeddings=40960, tie_word_embeddings=True, rms_norm_eps=1e-6)
CASES = [(1, 4096), (16, 4096), (1, 32768), (16, 32768)]
# Card limits used for "fraction of the physical limit" (dense bf16; H100 SXM / H200).
PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}


def _emit(rec):
    print("RESULT " + json.dumps(rec), flush=True)


def model_bytes_and_flops(batch, context, new_tokens):
    c = QWEN3_0P6B
    d, L, hd, kvh, h = c["hidden_size"], c["num_hidden_layers"], c["head_dim"], c["num_key_value_heads"], c["num_attention_heads"]
    per_layer = d * hd * (h + 2 * kvh) + h * hd * d + 3 * d * c["intermediate_size"]
    weights = L * per_layer + c["vocab_size"] * d  # tied lm_head read once per step
    kv_per_token = L * 2 * kvh * hd * 2  # bf16 bytes
    decode_ctx = context + new_tokens / 2
    decode_bytes = 2 * weights + batch * decode_ctx * kv_per_token  # per step
    prefill_flops = 2 * L * per_layer * batch * context + 2 * L * h * hd * batch * context * context  # causal QK+PV
    return decode_bytes, prefill_flops


# ------------------------------------------------------------------------------- JAX worker

def jax_worker(cases, new_tokens):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from hybrid_jax.eval import generate as g
    from hybrid_jax.eval.efficiency import is_out_of_memory
    from hybrid_jax.layers import attention
    from hybrid_jax.models.qwen3 import Qwen3, Qwen3Config

    model = Qwen3(Qwen3Config(**QWEN3_0P6B, dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    # The flash-kernel path must compute what the masked-jnp oracle path computes (padded batch).
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 151936, (2, 1024)), jnp.int32)
    mask = jnp.asarray(np.arange(1024)[None, :] >= np.asarray([[0], [300]]), jnp.int32)
    outs = {}
    for backend in ("xla", "auto"):
        attention.ATTENTION_BACKEND = backend
        outs[backend] = np.asarray(nnx.jit(lambda m, i, a: m(i, a))(model, ids, mask), np.float32)
    real = np.asarray(mask) == 1
    diff = outs["auto"][real] - outs["xla"][real]
    _emit(dict(framework="jax", check="flash_vs_masked_jnp_logits", device=jax.devices()[0].device_kind,
               max_abs=float(np.abs(diff).max()),
               rms_rel=float(np.sqrt((diff**2).mean() / (outs["xla"][real] ** 2).mean()))))
    sampling = tuple(sorted(dict(temperature=0.0, top_k=0, top_p=1.0).items()))
    for batch, context in cases:
        rec = dict(framework="jax", batch=batch, context=context, new_tokens=new_tokens,
                   device=jax.devices()[0].device_kind)
        try:
            rng = np.random.default_rng(0)
            ids = jnp.asarray(rng.integers(0, 151936, (batch, context)), jnp.int32)
            mask = jnp.ones((batch, context), jnp.int32)
            cache_length = context + -(-new_tokens // 32) * 32
            t0 = time.perf_counter()
            prefill = g._prefill.lower(graphdef, state, ids, mask, cache_length=cache_length).compile()
            rec["prefill_compile_s"] = time.perf_counter() - t0
            reps = 3 if context <= 4096 else 1
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                logits, cache, last_pos = prefill(state, ids, mask)  # static graphdef is baked in
                jax.block_until_ready((logits, cache))
                times.append(time.perf_counter() - t0)
                if len(times) < reps:
                    del cache
            rec["prefill_s"] = min(times)
            first = jnp.argmax(logits, -1).astype(jnp.int32)
            kw = dict(max_new_tokens=new_tokens, eos=(), pad_id=0, sampling=sampling)
            t0 = time.perf_counter()
            decode = g._decode_while.lower(graphdef, state, cache, first, last_pos, jax.random.key(0), **kw).compile()
            rec["decode_compile_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            tokens, cache = decode(state, cache, first, last_pos, jax.random.key(0))
            jax.block_until_ready(tokens)
            rec["decode_s"] = time.perf_counter() - t0
            del cache
        except Exception as e:  # out of memory on the largest case is a result, not a crash
            rec["error"] = "OOM" if is_out_of_memory(e) else repr(e)[:300]
        _emit(rec)


# ------------------------------------------------------------------------------- torch worker

def torch_worker(cases, new_tokens):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(**QWEN3_0P6B, attn_implementation="sdpa")
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(cfg).to(torch.bfloat16).eval()
    warm = torch.randint(0, 151936, (1, 128), device="cuda")
    with torch.no_grad():
        model.generate(warm, max_new_tokens=8, do_sample=False)
    for batch, context in cases:
        rec = dict(framework="torch", batch=batch, context=context, new_tokens=new_tokens,
                   device=torch.cuda.get_device_name())
        try:
            ids = torch.randint(0, 151936, (batch, context), device="cuda")
            mask = torch.ones_like(ids)
            with torch.no_grad():
                reps = 3 if context <= 4096 else 1
                times = []
                for _ in range(reps):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                rec["prefill_s"] = min(times)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False)
                torch.cuda.synchronize()
                # generate = one prefill + (new_tokens - 1) decode steps
                rec["decode_s"] = time.perf_counter() - t0 - rec["prefill_s"]
        except torch.cuda.OutOfMemoryError:
            rec["error"] = "OOM"
        torch.cuda.empty_cache()
        _emit(rec)


# ------------------------------------------------------------------------------- driver

def run_worker(framework, args):
    timeout = {"jax": args.jax_timeout, "torch": args.torch_timeout}[framework]
    cmd = [sys.executable, __file__, f"--worker={framework}", f"--new_tokens={args.new_tokens}",
           f"--cases={args.cases}"]
    env = {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.94", "PYTHONUNBUFFERED": "1"}
    recs = []
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        out = proc.stdout
        if proc.returncode:
            print(f"[{framework} worker exited {proc.returncode}]\n{proc.stderr[-3000:]}", flush=True)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        print(f"[{framework} worker timed out after {timeout}s]\n{(e.stderr or b'')[-3000:]}", flush=True)
    for line in out.splitlines():
        if line.startswith("RESULT "):
            recs.append(json.loads(line[7:]))
    return recs


def summarise(recs, new_tokens):
    rows = {}
    for r in recs:
        if "check" in r:
            continue
        key = (r["batch"], r["context"])
        if "error" in r:
            rows.setdefault(key, {})[r["framework"]] = r["error"]
            continue
        r["prefill_tok_s"] = r["batch"] * r["context"] / r["prefill_s"]
        r["decode_tok_s"] = r["batch"] * (new_tokens - 1) / r["decode_s"]
        dbytes, pflops = model_bytes_and_flops(r["batch"], r["context"], new_tokens)
        card = "H200" if "H200" in r["device"] else "H100"
        flops_peak, bw_peak = PEAKS[card]
        r["decode_fraction_of_hbm"] = dbytes * (new_tokens - 1) / r["decode_s"] / bw_peak
        r["prefill_fraction_of_bf16_peak"] = pflops / r["prefill_s"] / flops_peak
        rows.setdefault(key, {})[r["framework"]] = r
    lines = ["| batch | context | prefill tok/s jax | torch | ratio | decode tok/s jax | torch | ratio | "
             "jax decode % HBM | jax prefill % bf16 |", "|" + "---|" * 10]
    for (b, c), d in sorted(rows.items()):
        j, t = d.get("jax"), d.get("torch")

        def f(x, k):
            return x if isinstance(x, str) else ("-" if x is None else f"{x[k]:,.0f}")

        def ratio(k, j=j, t=t):
            return f"{j[k] / t[k]:.2f}x" if isinstance(j, dict) and isinstance(t, dict) else "-"

        lines.append(f"| {b} | {c} | {f(j, 'prefill_tok_s')} | {f(t, 'prefill_tok_s')} | {ratio('prefill_tok_s')} | "
                     f"{f(j, 'decode_tok_s')} | {f(t, 'decode_tok_s')} | {ratio('decode_tok_s')} | "
                     + (f"{100 * j['decode_fraction_of_hbm']:.0f}% | {100 * j['prefill_fraction_of_bf16_peak']:.0f}% |"
                        if isinstance(j, dict) else "- | - |"))
    return "\n".join(lines)


def compare_loops(steps=64):
    """CPU question: decode as one lax.while_loop, or a jitted step called from Python?"""
    import jax
    import numpy as np
    from flax import nnx

    from hybrid_jax.eval.generate import generate_tokens
    from hybrid_jax.models.qwen3 import Qwen3, Qwen3Config

    cfg = Qwen3Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    model = Qwen3(cfg, rngs=nnx.Rngs(0))
    prompts = [list(np.random.default_rng(i).integers(0, 512, 20 + 5 * i)) for i in range(4)]
    out = {"device": str(jax.devices()[0]), "steps": steps}
    for loop in ("while", "python"):
        generate_tokens(model, prompts, steps, eos_token_id=[], loop=loop)  # compile
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            generate_tokens(model, prompts, steps, eos_token_id=[], loop=loop)
            times.append(time.perf_counter() - t0)
        out[f"{loop}_s"] = min(times)
    print(json.dumps(out))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--cases", default=",".join(f"{b}x{c}" for b, c in CASES), help="BATCHxCONTEXT,...")
    ap.add_argument("--frameworks", default="torch,jax")
    ap.add_argument("--worker", choices=["jax", "torch"])
    ap.add_argument("--jax_timeout", type=int, default=330)
    ap.add_argument("--torch_timeout", type=int, default=200)
    ap.add_argument("--compare_loops", action="store_true")
    args = ap.parse_args()
    if args.compare_loops:
        return compare_loops()
    cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",")]
    if args.worker:
        return (jax_worker if args.worker == "jax" else torch_worker)(cases, args.new_tokens)
    recs = []
    for fw in args.frameworks.split(","):
        recs += run_worker(fw, args)
    table = summarise(recs, args.new_tokens)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_generate.json"), "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "new_tokens": args.new_tokens, "records": recs,
                   "table": table}, f, indent=2)


if __name__ == "__main__":
    main()
