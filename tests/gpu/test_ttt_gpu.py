"""TTT memory on the accelerator: bf16 fused scan vs the float32 token-level oracle."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ttt import ttt_memory, ttt_memory_reference, ttt_memory_step

B, T, H, D, F, C = 2, 700, 4, 64, 128, 128


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / max(np.mean(b**2), 1e-30)))


def make_inputs(seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 9)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(jax.random.normal(ks[0], (B, T, H, D)))
    k = unit(jax.random.normal(ks[1], (B, T, H, D)))
    v = jax.random.normal(ks[2], (B, T, H, D))
    lr = 0.1 * jax.nn.softplus(jax.random.normal(ks[3], (B, T, H)))
    mom = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
    dec = jax.nn.sigmoid(jax.random.normal(ks[5], (B, T, H)) - 3.0)
    w0 = (jax.random.normal(ks[6], (H, D, F)) / np.sqrt(D),
          jax.random.normal(ks[7], (H, F, D)) / np.sqrt(F),
          jax.random.normal(ks[8], (H, D, F)) / np.sqrt(D))
    seg = np.ones((B, T), np.int32)
    seg[0, :37] = 0          # left padding
    seg[0, 300:] = 2         # a document starting mid-chunk
    seg[1, 650:] = 0         # right padding
    return (q, k, v, lr, mom, dec), w0, jnp.asarray(seg)


def oracle(args, w0, seg):
    with jax.default_matmul_precision("highest"):
        return jax.jit(functools.partial(ttt_memory_reference, chunk_size=C))(
            *args, weights0=w0, segment_ids=seg)[0]


def test_bf16_forward_and_grads_vs_fp32_oracle():
    args, w0, seg = make_inputs()
    o_ref = oracle(args, w0, seg)
    args16 = [a.astype(jnp.bfloat16) for a in args]
    o = jax.jit(functools.partial(ttt_memory, chunk_size=C))(*args16, weights0=w0, segment_ids=seg)[0]
    assert o.dtype == jnp.bfloat16
    err = rel(o.astype(jnp.float32), o_ref)
    print("bf16 forward rel err", err)
    assert err < 2e-2

    cot = jax.random.normal(jax.random.PRNGKey(1), o_ref.shape)

    def loss(fn, args, w0):
        return jnp.sum(fn(*args, weights0=w0, chunk_size=C, segment_ids=seg)[0].astype(jnp.float32) * cot)

    with jax.default_matmul_precision("highest"):
        g_ref = jax.jit(jax.grad(functools.partial(loss, ttt_memory_reference), (0, 1)))(args, w0)
    g = jax.jit(jax.grad(functools.partial(loss, ttt_memory), (0, 1)))(args16, w0)
    for name, got, want in zip(["q", "k", "v", "lr", "momentum", "decay", "w1", "w2", "w3"],
                               jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        err = rel(jnp.asarray(got, jnp.float32), want)
        print(f"bf16 grad {name} rel err {err:.2e}")
        assert np.all(np.isfinite(np.asarray(got, np.float32)))
        assert err < 5e-2


def test_fp32_forward_and_decode_tight():
    """float32 at full matmul precision: the GPU scan equals the oracle to rounding, and
    prefill + decode steps equal the full forward."""
    args, w0, seg = make_inputs(2)
    o_ref = oracle(args, w0, seg)
    with jax.default_matmul_precision("highest"):
        P = 600
        o_pre, st = jax.jit(functools.partial(ttt_memory, chunk_size=C, output_final_state=True))(
            *[a[:, :P] for a in args], weights0=w0, segment_ids=seg[:, :P])
        step = jax.jit(functools.partial(ttt_memory_step, chunk_size=C))
        outs = [o_pre]
        for t in range(P, T):
            o_t, st = step(*[a[:, t] for a in args], st, weights0=w0, segment_ids=seg[:, t])
            outs.append(o_t[:, None])
    err = rel(jnp.concatenate(outs, 1), o_ref)
    print("fp32 prefill+decode rel err", err)
    assert err < 1e-4
