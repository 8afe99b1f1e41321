"""One distillation step (teacher forward + student forward and backward + AdamW) through the real trainer.

    python scripts/bench_distill_step.py --out=DIR                  # Qwen3-0.6B teacher -> Hybrid-KDA, seq 4096
    python scripts/bench_distill_step.py --out=DIR --logit_chunk=0  # the same with unchunked [B, T, V] logits
    python scripts/bench_distill_step.py --tiny --seq_len=128       # CPU smoke run of the same code
    python scripts/bench_distill_step.py --out=DIR --breakdown      # also time the step's parts alone
    python scripts/bench_distill_step.py --out=DIR --batch=2        # on 2 GPUs: one row per device (fsdp)
    python scripts/bench_distill_step.py --out=DIR --batch=8 --grad_accum=2   # 8 rows a step, 4 per pass

On several devices the trainer's default mesh puts them all on the fsdp axis (the batch and the
parameters split over it); MFU is then of all their peaks together.

The teacher is built from the Qwen3-0.6B config (random weights; speed does not depend on
them) and the student is its Hybrid-KDA conversion (attention kept at {0,2,6,11,13,18,21}).
A `logit_kd` stage (forward KL) runs `--steps` steps of `hybrid_jax.distill.trainer.Trainer` on
random tokens; tokens/s comes from the trainer's own metrics after the first logging interval
(which holds the compilation). MFU counts matmul FLOPs: 6 per student parameter-token (forward
+ backward), 2 per teacher parameter-token, causal attention 4·h·hd·T/2 per token per layer
(x3 for the student), and the chunked KDA recurrence (per head and token, forward:
2·(2·C·K + 2·C·V + 4·K·V), x3 with backward).

The stage's logit loss runs fused with both lm_heads, `--logit_chunk` positions at a time
(`stages.*.logit_chunk`; 0 = materialise [B, T, V] float32 logits for teacher and student). It
forms the student's lm_head gradient inside the forward scan, so it adds no FLOPs to the count
above; peak memory is the process's peak (run one setting per process to compare).

`--breakdown` times, each jitted alone at the same [B, T]: the teacher's forward, the student's
forward and forward+backward (to the final hidden state, no lm_head), and one mixer of each kind
and one MLP (forward+backward, input and parameter gradients) times their count, the logit
loss from final hidden states (both lm_heads, forward KL, at `--logit_chunk`) and the AdamW
update of every trainable parameter, beside the whole trainer step, so the step's time can be
apportioned without a profiler.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_efficiency import QWEN3_0P6B, TINY  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}


class RandomTokens:
    """An endless iterator of random-token batches with the data-iterator interface."""

    def __init__(self, batch: int, seq_len: int, vocab: int, seed: int = 0):
        import numpy as np

        self.rng, self.shape, self.vocab, self.n = np.random.default_rng(seed), (batch, seq_len), vocab, 0

    def __next__(self):
        import numpy as np

        self.n += 1
        ids = self.rng.integers(0, self.vocab, self.shape, dtype=np.int32)
        ones = np.ones(self.shape, np.int32)
        return dict(input_ids=ids, segment_ids=ones, positions=np.broadcast_to(np.arange(self.shape[1], dtype=np.int32),
                                                                               self.shape).copy(), loss_mask=ones)

    def get_state(self):
        return {"n": self.n}

    def set_state(self, state):
        self.n = state["n"]


def step_flops_per_token(student, teacher, seq_len: int, chunk: int) -> float:
    import jax
    from flax import nnx

    from hybrid_jax.models.hybrid import layer_kinds

    def matmul_params(model):
        return sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)) if x.ndim >= 2)

    c = teacher.config
    h, hd = c.num_attention_heads, c.head_dim
    attn = 4 * h * hd * seq_len / 2  # QK^T and PV, causal
    kda = h * 2 * (2 * chunk * hd + 2 * chunk * hd + 4 * hd * hd)
    kinds = layer_kinds(student)
    student_mixing = sum(attn if k == "attention" else kda for k in kinds)
    # The tied embedding table doubles as lm_head: count it once as a matmul.
    return 6 * matmul_params(student) + 3 * student_mixing + 2 * matmul_params(teacher) + c.num_hidden_layers * attn


def median_ms(fn, args) -> float:
    """Median of 5 timed calls after a warm-up (`hybrid_jax.eval.efficiency.median_seconds`)."""
    from hybrid_jax.eval.efficiency import median_seconds

    return 1e3 * median_seconds(lambda: fn(*args), 5)


def loss_and_update_parts(student, batch: int, seq_len: int, compute: str, stage, steps: int,
                          logit_chunk: int) -> list[dict]:
    """The step's tail, each jitted alone: the logit loss from final hidden states (both
    lm_heads, forward KL, gradients for the student's hidden states and head) and the
    optimizer update of every trainable parameter (`make_optimizer`'s chain)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from hybrid_jax.distill.losses import LogitLoss
    from hybrid_jax.distill.optim import make_optimizer
    from hybrid_jax.distill.trainer import FlatParams
    from hybrid_jax.models.qwen3 import lm_head_logits

    c = student.config
    k = jax.random.split(jax.random.key(2), 4)
    hs, ht = (jax.random.normal(x, (batch, seq_len, c.hidden_size)).astype(compute) for x in k[:2])
    head = 0.02 * jax.random.normal(k[2], (c.hidden_size, c.vocab_size))  # fp32 master, as trained
    t_head = (0.02 * jax.random.normal(k[3], (c.hidden_size, c.vocab_size))).astype(compute)
    ids = jax.random.randint(k[0], (batch, seq_len), 0, c.vocab_size)
    tokens = dict(input_ids=ids, segment_ids=jnp.ones_like(ids), loss_mask=jnp.ones_like(ids))
    kd = LogitLoss()
    if logit_chunk > 0:
        def loss(h, w):
            return kd.compute_loss_from_hidden(h, w, ht, t_head, tokens, chunk=logit_chunk,
                                               student_dtype=compute, teacher_dtype=compute)[0]
    else:
        def loss(h, w):
            return kd.compute_loss(lm_head_logits(h, w, compute), lm_head_logits(ht, t_head, compute), tokens)[0]
    rows = [dict(part=f"logit loss fwd+bwd (chunk {logit_chunk})", count=1,
                 ms=median_ms(jax.jit(jax.grad(loss, argnums=(0, 1))), (hs, head)))]

    # Fresh copies: the update donates its inputs, and the student must stay usable.
    params = jax.jit(lambda t: jax.tree.map(jnp.copy, t))(FlatParams(nnx.state(student, nnx.Param)).values)
    tx, _ = make_optimizer(stage, steps, params)
    opt_state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 2))
    def update(p, g, o):
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    grads = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params)
    state = [params, opt_state]

    def step():
        state[:] = update(state[0], grads, state[1])
        return state[0]

    n = sum(x.size for x in jax.tree.leaves(params))
    rows.append(dict(part=f"optimizer update ({n / 1e6:.3g}M params)", count=1, ms=median_ms(step, ())))
    return rows


def breakdown(teacher, student, batch: int, seq_len: int, compute: str) -> list[dict]:
    """Milliseconds of the step's parts, each jitted alone (see the module docstring)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from hybrid_jax.models.hybrid import layer_kinds

    ids = jnp.asarray(np.random.default_rng(0).integers(0, teacher.config.vocab_size, (batch, seq_len)), jnp.int32)
    seg = jnp.ones((batch, seq_len), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))

    def grads_of(module, apply, wrt_input=True):
        """jit(grad) of mean(apply(module, x)^2) over the module's parameters (and x)."""
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)

        def loss(p, x):
            return jnp.mean(jnp.square(apply(nnx.merge(graphdef, p, rest), x).astype(jnp.float32)))

        return jax.jit(jax.grad(loss, argnums=(0, 1) if wrt_input else 0)), params

    def final_hidden(model, x):
        return model.forward(x, segment_ids=seg, positions=pos, logits="none", output_hidden_states=True).hidden_states[-1]

    rows = []
    fwd = jax.jit(lambda m, x: final_hidden(nnx.merge(*m), x))
    rows.append(dict(part="teacher forward", count=1, ms=median_ms(fwd, (nnx.split(teacher), ids))))
    rows.append(dict(part="student forward", count=1, ms=median_ms(fwd, (nnx.split(student), ids))))
    g, params = grads_of(student, final_hidden, wrt_input=False)  # token ids: no gradient
    rows.append(dict(part="student forward+backward", count=1, ms=median_ms(g, (params, ids))))

    x = jax.random.normal(jax.random.key(1), (batch, seq_len, teacher.config.hidden_size)).astype(compute)
    kinds = layer_kinds(student)
    for kind in dict.fromkeys(kinds):
        block = student.blocks[kinds.index(kind)]
        g, params = grads_of(block.mixer, lambda m, h: m(h, positions=pos, segment_ids=seg)[0])
        rows.append(dict(part=f"{kind} mixer forward+backward", count=kinds.count(kind), ms=median_ms(g, (params, x))))
    g, params = grads_of(student.blocks[0].mlp, lambda m, h: m(h))
    rows.append(dict(part="MLP forward+backward", count=len(kinds), ms=median_ms(g, (params, x))))
    return rows


def train(batch: int, seq_len: int, steps: int, log_every: int = 3, remat: bool = False, logit_chunk: int = 1024,
          tiny: bool = False, fused_conv: bool = True, grad_accum: int = 1, logit_kernel: str = "auto"):
    """Runs the `logit_kd` stage of the real Trainer for `steps` steps on random tokens; returns
    (teacher, student, config, workdir, layer spec, model shape, compute dtype)."""
    from flax import nnx

    import hybrid_jax as hj
    from hybrid_jax.config import default_config, stage_config
    from hybrid_jax.distill.trainer import Trainer
    from hybrid_jax.models.qwen3 import Qwen3, Qwen3Config

    shape = TINY if tiny else QWEN3_0P6B
    compute = "float32" if tiny else "bfloat16"
    teacher = Qwen3(Qwen3Config(**shape, dtype=compute, param_dtype=compute), rngs=nnx.Rngs(0))
    layers = shape["num_hidden_layers"]
    kept = [i for i in (0, 2, 6, 11, 13, 18, 21) if i < layers]
    spec = f"attention:{','.join(map(str, kept))};kda:{','.join(str(i) for i in range(layers) if i not in kept)}"
    # Trained weights are float32 master copies; the student computes in the teacher's dtype.
    student = hj.build_student(teacher, spec, dtype=compute, param_dtype="float32", remat=remat,
                               mixer_config={"kda": {"fused_conv": fused_conv}})
    config = default_config()
    config.train.batch_size, config.train.seq_len = batch, seq_len
    config.train.compute_dtype, config.train.remat, config.train.grad_accum = compute, remat, grad_accum
    config.train.log_every, config.train.checkpoint_every = log_every, 10 ** 9
    config.train.progress, config.train.tensorboard = False, False
    config.stages.kd = stage_config(type="logit_kd", steps=steps, lr=1e-5, logit_chunk=logit_chunk,
                                    logit_kernel=logit_kernel)
    config.stage_order = "kd"
    workdir = tempfile.mkdtemp(prefix="bench_distill_")
    Trainer(config, student, teacher=teacher, workdir=workdir,
            data_fn=lambda stage: RandomTokens(batch, seq_len, shape["vocab_size"])).run()
    return teacher, student, config, workdir, spec, shape, compute


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_distill_step")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq_len", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--log_every", type=int, default=3)
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--grad_accum", type=int, default=1, help="microbatches per step (train.grad_accum)")
    ap.add_argument("--logit_chunk", type=int, default=1024, help="positions per fused lm_head+loss chunk; 0 = unchunked")
    ap.add_argument("--logit_kernel", default="auto", help="stages.kd.logit_kernel: auto, xla, pallas_gpu")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--breakdown", action="store_true", help="also time the step's parts alone")
    ap.add_argument("--xla_conv", action="store_true",
                    help="mixer_config.kda.fused_conv=False: XLA's convolutions and L2 norm instead of the kernel")
    args = ap.parse_args()
    import jax

    teacher, student, config, workdir, spec, shape, compute = train(
        args.batch, args.seq_len, args.steps, args.log_every, args.remat, args.logit_chunk, args.tiny,
        not args.xla_conv, args.grad_accum, args.logit_kernel)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    tps = statistics.median(r["tokens_per_s"] for r in rows[1:]) if len(rows) > 1 else rows[0]["tokens_per_s"]
    flops = step_flops_per_token(student, teacher, args.seq_len, 64) * tps
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_BF16.items() if k in kind), None)
    stats = jax.devices()[0].memory_stats() or {}
    devices = jax.device_count()  # the trainer's default mesh puts every device on fsdp
    result = dict(device=kind, devices=devices, jax=jax.__version__, batch=args.batch, seq_len=args.seq_len,
                  grad_accum=args.grad_accum, remat=args.remat, logit_chunk=args.logit_chunk, logit_kernel=args.logit_kernel, fused_conv=not args.xla_conv,
                  tokens_per_s=tps, achieved_tflops=flops / 1e12, mfu=(flops / (peak * devices)) if peak else None,
                  peak_memory_gib=stats.get("peak_bytes_in_use", 0) / 2**30 or None, layer_spec=spec,
                  loss_means=[r.get("loss_mean") for r in rows])
    if args.breakdown:
        step_ms = 1e3 * args.batch * args.seq_len / tps
        result["breakdown"] = [dict(part="whole trainer step", count=1, ms=step_ms)]
        result["breakdown"] += breakdown(teacher, student, args.batch, args.seq_len, compute)
        result["breakdown"] += loss_and_update_parts(student, args.batch, args.seq_len, compute, config.stages.kd,
                                                     args.steps, args.logit_chunk)
        for r in result["breakdown"]:
            r["total_ms"] = r["ms"] * r["count"]
            print(f"{r['part']:<40} {r['count']:>3} x {r['ms']:9.2f} ms = {r['total_ms']:9.2f} ms "
                  f"({100 * r['total_ms'] / step_ms:5.1f}% of the step)")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "distill_step.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
