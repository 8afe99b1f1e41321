"""Test helpers: a tiny Qwen3 teacher, a hybrid student with a toy recurrent mixer, and a
deterministic resumable batch iterator. Also runnable as a driver for the resume test:

    python -m tests.distill.helpers WORKDIR [KILL_STAGE KILL_BATCH [sync]]

which SIGKILLs itself when stage KILL_STAGE asks for batch index KILL_BATCH (with `sync`,
checkpoints are written synchronously, so every save before the kill is complete).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hybrid_jax import config as cfglib
from hybrid_jax.layers.params import param
from hybrid_jax.models.qwen3 import Qwen3, Qwen3Config

VOCAB = 64


def tiny_teacher(seed: int = 0, layers: int = 3) -> nnx.Module:
    c = Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False,
        rope_theta=10000.0, initializer_range=0.3,
    )
    return Qwen3(c, rngs=nnx.Rngs(seed))


class ToyRecurrentMixer(nnx.Module):
    """A gated running mean over the tokens of the current segment (a stand-in for KDA)."""

    mixer_kind = "kda"
    gain = 1.0  # a static attribute (part of the graph definition), scales the output

    def __init__(self, hidden: int, heads: int, head_dim: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.3)
        self.v_proj = param(rngs, init, (hidden, heads, head_dim), ("embed", "heads", "head_dim"))
        self.g_proj = param(rngs, init, (hidden, heads, head_dim), ("embed", "heads", "head_dim"))
        self.o_proj = param(rngs, init, (heads, head_dim, hidden), ("heads", "head_dim", "embed"))
        self.dt_bias = param(rngs, nnx.initializers.zeros, (heads,), ("heads",))

    def __call__(self, x, *, positions, segment_ids, cache=None):
        v = jnp.einsum("btd,dhk->bthk", x, self.v_proj[...])
        g = jax.nn.sigmoid(jnp.einsum("btd,dhk->bthk", x, self.g_proj[...]) + self.dt_bias[...][:, None])
        cs = jnp.cumsum(v, axis=1)
        start = jnp.arange(x.shape[1])[None] - positions  # first token of each token's segment
        before = jnp.where((start > 0)[..., None, None], jnp.take_along_axis(cs, jnp.maximum(start - 1, 0)[..., None, None], axis=1), 0.0)
        mean = (cs - before) / (positions + 1)[..., None, None].astype(x.dtype)
        y = jnp.einsum("bthk,hkd->btd", g * mean, self.o_proj[...]) * self.gain
        return jnp.where((segment_ids > 0)[..., None], y, 0.0), None


def tiny_student(teacher, new_layers=(1,), seed: int = 1) -> nnx.Module:
    """A copy of the teacher whose mixers at `new_layers` are ToyRecurrentMixers."""
    student = nnx.clone(teacher)
    c = teacher.config
    rngs = nnx.Rngs(seed)
    for i in new_layers:
        student.blocks[i].mixer = ToyRecurrentMixer(c.hidden_size, c.num_attention_heads, c.head_dim, rngs=rngs)
    return student


class Batches:
    """Deterministic batches [B, T]: two packed documents per row, some right padding.

    `fixed`: the same batch every time (so a loss curve is not batch noise)."""

    def __init__(self, batch_size: int, seq_len: int, *, seed: int = 0, limit: int | None = None, completion: bool = False, fixed: bool = False):
        self.b, self.t, self.seed, self.limit, self.completion, self.fixed = batch_size, seq_len, seed, limit, completion, fixed
        self.index = 0

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = int(state["index"])

    def __iter__(self):
        return self

    def __next__(self):
        if self.limit is not None and self.index >= self.limit:
            raise StopIteration
        rng = np.random.default_rng([self.seed, 0 if self.fixed else self.index])
        self.index += 1
        b, t = self.b, self.t
        # A learnable pattern: token t+1 = (token t + 1) mod 16 + 16 * doc, with random starts.
        ids = np.zeros((b, t), np.int32)
        seg = np.zeros((b, t), np.int32)
        pos = np.zeros((b, t), np.int32)
        lm = np.zeros((b, t), np.int32)
        for r in range(b):
            cut = int(rng.integers(2, t - 2))
            end = t - int(rng.integers(0, 3))
            for s, (lo, hi) in enumerate(((0, cut), (cut, end)), start=1):
                n = hi - lo
                start = int(rng.integers(0, 16))
                ids[r, lo:hi] = (start + np.arange(n)) % 16 + 16 * (s % 4)
                seg[r, lo:hi] = s
                pos[r, lo:hi] = np.arange(n)
                lm[r, lo:hi] = 1 if not self.completion else (np.arange(n) >= n // 2)
        return {"input_ids": ids, "segment_ids": seg, "positions": pos, "loss_mask": lm}


def run_config(steps=(4, 4), *, checkpoint_every=2, batch_size=4, seq_len=16, mesh=None) -> object:
    c = cfglib.default_config()
    c.train.batch_size = batch_size
    c.train.seq_len = seq_len
    c.train.checkpoint_every = checkpoint_every
    c.train.log_every = 1
    c.train.progress = False
    c.train.tensorboard = False
    c.train.async_checkpoints = True
    if mesh:
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    c.stages.align = cfglib.stage_config(type="attention_alignment", steps=steps[0], lr=3e-2, warmup_frac=0.0)
    c.stages.kd = cfglib.stage_config(type="logit_kd", steps=steps[1], lr=1e-2, loss="forward_kl:0.9,ce:0.1", warmup_frac=0.25)
    c.stage_order = "align,kd"
    return c


def main(argv):
    """Driver for the resume test: train the two-stage toy run in argv[1] and print final params' hash."""
    import os
    import signal

    from hybrid_jax.distill.trainer import Trainer

    workdir = argv[1]
    kill = (argv[2], int(argv[3])) if len(argv) > 3 else None

    class Killing(Batches):
        def __next__(self):
            if kill == (self.stage, self.index):
                os.kill(os.getpid(), signal.SIGKILL)
            return super().__next__()

    def data_fn(s):
        it = Killing(s.batch_size, s.seq_len, seed=len(s.name))
        it.stage = s.name
        return it

    teacher = tiny_teacher(layers=2)
    student = tiny_student(teacher)
    cfg = run_config(steps=(3, 5))
    cfg.train.log_every = 3  # log lines average over steps that straddle the checkpoints
    cfg.train.async_checkpoints = "sync" not in argv[4:]
    trainer = Trainer(cfg, student, teacher=teacher, workdir=workdir, data_fn=data_fn)
    trainer.run()
    state = nnx.state(student, nnx.Param)
    np.savez(f"{workdir}/final.npz", *[np.asarray(x) for x in jax.tree.leaves(state)])


if __name__ == "__main__":
    main(sys.argv)
