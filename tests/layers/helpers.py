"""Shared helpers for the layer and student tests."""

import numpy as np
from flax import nnx


@nnx.jit
def run(layer, x, pos, seg):
    """A mixer's output over a whole sequence (positions may be None)."""
    return layer(x, positions=pos, segment_ids=seg)[0]


@nnx.jit
def run_cached(layer, x, pos, seg, cache):
    """(output, updated cache) of a mixer continuing from `cache`."""
    return layer(x, positions=pos, segment_ids=seg, cache=cache)


def run_in_pieces(layer, x, pos, seg, cache, pieces):
    """(output over all of x, final cache) of a mixer fed `pieces` tokens at a time from `cache`
    (e.g. a prefill, a multi-token continuation, then single-token decode steps)."""
    import jax.numpy as jnp

    outs, t = [], 0
    for n in pieces:
        y, cache = run_cached(layer, x[:, t:t + n], None if pos is None else pos[:, t:t + n],
                              seg[:, t:t + n], cache)
        outs.append(y)
        t += n
    return jnp.concatenate(outs, axis=1), cache


def rms_rel(x, ref):
    """RMS-relative error of x against ref (float64)."""
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.sqrt(np.mean((x - ref) ** 2) / max(np.mean(ref**2), 1e-30)))


def randomize(module, seed=0, scale=0.3, skip=()):
    """Give every parameter of `module` random values (so zero/identity inits cannot hide bugs)."""
    import jax
    from flax import nnx

    key = jax.random.PRNGKey(seed)
    for path, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Param) and not any(s in "/".join(map(str, path)) for s in skip):
            key, sub = jax.random.split(key)
            v = var[...]
            var.set_value(v + scale * jax.random.normal(sub, v.shape, v.dtype))
