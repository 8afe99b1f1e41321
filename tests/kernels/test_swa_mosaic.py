"""The Mosaic GPU forward of sliding-window attention (pallas_kernels/swa/mosaic_gpu.py).

It cannot run on the CPU (Mosaic GPU has no interpreter), so here: its block table against the
visibility rule of reference.py pair by pair, lowering for CUDA (tiles, TMA, barriers and the
shared-memory budget are checked at lowering), and the forward-kernel choice. The numerics run
on the device: tests/gpu/test_swa_gpu.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.swa import gpu as swa_gpu
from pallas_kernels.swa import mosaic_gpu as mg
from pallas_kernels.swa.common import padded_starts
from pallas_kernels.swa.reference import visibility_mask

BQ, BK = 64, 128


def doc_starts(t, boundaries):
    seg = np.zeros((1, t), np.int32)
    for i, b0 in enumerate(boundaries):
        seg[:, b0:] = i + 1
    return padded_starts(jnp.asarray(seg), 1, t, t)


@pytest.mark.parametrize("window,sinks,boundaries", [
    (128, 0, []), (100, 0, []), (1, 0, []), (2048, 0, []), (300, 5, []),
    (200, 8, [0, 333, 700]), (1000, 130, [0, 130, 517, 900]), (64, 200, [0, 250, 251, 640]),
])
def test_tile_table_covers_exactly_the_visible_blocks(window, sinks, boundaries):
    t = 1024
    starts = doc_starts(t, boundaries)
    table = np.asarray(mg.tile_table(starts, window=window, sinks=sinks, block_q=BQ, block_kv=BK))[0]
    vis = np.asarray(visibility_mask(starts, window, sinks))[0]  # [query, key]
    rows = 2 * BQ
    for tile, (lo, hi, sink_lo, n_sink, *full) in enumerate(table):
        sink_blocks = set(range(sink_lo, sink_lo + n_sink))
        window_blocks = set(range(lo, hi))
        assert not sink_blocks & window_blocks
        visited = sink_blocks | window_blocks
        tile_vis = vis[tile * rows:(tile + 1) * rows].reshape(rows, t // BK, BK).any(axis=(0, 2))
        # Every block holding a visible pair is visited, and the window range is tight.
        assert set(np.flatnonzero(tile_vis)) <= visited
        assert tile_vis[lo] and tile_vis[hi - 1]
        for w in range(2):
            full_lo, full_hi = full[2 * w], full[2 * w + 1]
            assert lo <= full_lo <= full_hi <= hi
            q0 = tile * rows + w * BQ
            block_vis = vis[q0:q0 + BQ].reshape(BQ, t // BK, BK).all(axis=(0, 2))
            assert block_vis[full_lo:full_hi].all()  # skipping the mask there is exact
            if not sinks:  # (sinks can make more blocks whole; those are masked, still exact)
                # ...and every whole block is in the unmasked range.
                assert full_hi - full_lo == block_vis[lo:hi].sum()


def shapes(b=1, t=1024, hq=4, hkv=2, d=128):
    sds = jax.ShapeDtypeStruct
    return (sds((b, t, hq, d), jnp.bfloat16), sds((b, t, hkv, d), jnp.bfloat16),
            sds((b, t, hkv, d), jnp.bfloat16))


@pytest.mark.parametrize("window,sinks,segments,hkv", [
    (256, 0, False, 2), (4096, 0, False, 4), (300, 4, True, 1)])
def test_forward_and_triton_backward_lower_for_cuda(window, sinks, segments, hkv):
    q, k, v = shapes(hkv=hkv)
    seg = jax.ShapeDtypeStruct((1, 1000), jnp.int32)

    def loss(q, k, v, segment_ids):
        o = swa_gpu.swa_attention_gpu(q, k, v, window=window, sinks=sinks,
                                      segment_ids=segment_ids if segments else None,
                                      scale=0.088, fwd_kernel="mosaic")
        return o.astype(jnp.float32).sum()

    small = [jax.ShapeDtypeStruct((1, 1000, *x.shape[2:]), x.dtype) for x in (q, k, v)]
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exported = jax.export.export(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))),
                                 platforms=("cuda",), disabled_checks=checks)(*small, seg)
    text = exported.mlir_module()
    assert "mosaic_gpu" in text and "triton" in text  # Mosaic forward, Triton backward kernels


@pytest.mark.parametrize("block_kv,stages", [(128, 2), (64, 3), (64, 4)])  # bench_swa.py --sweep's
def test_swept_configs_lower_for_cuda(block_kv, stages):
    starts = jax.ShapeDtypeStruct((1, 1024), jnp.int32)
    fn = jax.jit(functools.partial(mg.swa_forward_mosaic, window=256, sinks=2, scale=0.088,
                                   block_kv=block_kv, stages=stages))
    assert "mosaic_gpu" in jax.export.export(fn, platforms=("cuda",))(*shapes(), starts).mlir_module()


def test_stages_beyond_shared_memory_are_refused():
    q, k, v = shapes()
    starts = jax.ShapeDtypeStruct((1, 1024), jnp.int32)
    fn = jax.jit(functools.partial(mg.swa_forward_mosaic, window=256, sinks=0, scale=0.088,
                                   block_kv=256, stages=3))
    with pytest.raises(ValueError, match="exceeds available shared memory"):
        jax.export.export(fn, platforms=("cuda",))(q, k, v, starts)


def test_forward_kernel_choice():
    bf = jnp.bfloat16
    assert swa_gpu.forward_kernel("auto", bf, 128, interpret=True) == "triton"
    assert swa_gpu.forward_kernel("auto", bf, 128, interpret=False) == "triton"  # no Hopper here
    assert swa_gpu.forward_kernel("mosaic", bf, 128, interpret=False) == "mosaic"
    with pytest.raises(ValueError, match="head_dim 128"):
        swa_gpu.forward_kernel("mosaic", bf, 64, interpret=False)
    with pytest.raises(ValueError, match="head_dim 128"):
        swa_gpu.forward_kernel("mosaic", jnp.float32, 128, interpret=False)
    with pytest.raises(ValueError, match="fwd_kernel"):
        swa_gpu.forward_kernel("cudnn", bf, 128, interpret=False)
