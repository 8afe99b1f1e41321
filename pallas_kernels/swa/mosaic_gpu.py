"""Sliding-window flash attention forward in Pallas Mosaic GPU (Hopper: TMA, wgmma, warp
specialisation).

One CTA per (query tile of 2 x block_q rows, query head, batch row), three warpgroups:
  * a producer warpgroup streams the key/value blocks the tile needs (the sink blocks of its
    first document, then the window's blocks) with TMA into a ring of `stages` shared-memory
    slots, refilling a slot once both consumers have released it;
  * two consumer warpgroups each own block_q query rows and run the online softmax over the
    same block sequence: S = Q Kᵀ and O += P V on the tensor cores (wgmma), with a shared
    "schedule" barrier that staggers them so one warpgroup's softmax overlaps the other's
    products (the ping-pong schedule of FlashAttention-3).
Blocks every row of a consumer sees whole skip the mask arithmetic; the rest apply the rule of
reference.py per (query, key) pair. The output and the base-2 log-sum-exp have the layouts of
gpu.py's Triton forward, whose backward kernels consume them.

Block ranges per tile come from a small int32 table computed by XLA before the call (document
starts are data), so the kernel reads eight scalars instead of scanning `starts`.

jax 0.11 lowers Mosaic GPU kernels through `plgpu.kernel` only (not `pl.pallas_call`), and they
do not run in the CPU interpreter: CI checks that this kernel lowers for CUDA, the device runs
tests/gpu/test_swa_gpu.py against the float32 oracle.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.swa.common import LOG2E, MASK_VALUE, visible

F32 = jnp.float32
COMPUTE_WARPGROUPS = 2
# Table columns: the tile's window blocks [lo, hi), its sink blocks [sink_lo, sink_lo + n_sink),
# and for each consumer the blocks [full_lo, full_hi) that all its rows see whole.
LO, HI, SINK_LO, N_SINK, FULL0 = range(5)
META_WIDTH = FULL0 + 2 * COMPUTE_WARPGROUPS

# jax 0.10 names the shared-memory transpose plgpu.transpose_ref and loads with an index
# argument; jax 0.11 has ref.transpose and load(src, *, layout).
_LOAD_TAKES_INDEX = "idx" in inspect.signature(plgpu.load).parameters


def _transposed(ref):
    if hasattr(ref, "transpose"):
        return ref.transpose((1, 0))
    return plgpu.transpose_ref(ref, (1, 0))


def _load_rows(ref):
    layout = plgpu.Layout.WGMMA.reduce(1)
    if _LOAD_TAKES_INDEX:
        return plgpu.load(ref, (), layout=layout)
    return plgpu.load(ref, layout=layout)


def tile_table(starts, *, window, sinks, block_q, block_kv):
    """int32 [B, n_tiles, META_WIDTH]: the key-block ranges of each query tile (see LO...)."""
    b, tp = starts.shape
    rows = COMPUTE_WARPGROUPS * block_q
    nk = tp // block_kv
    c0 = jnp.arange(0, tp, rows, dtype=jnp.int32)[None, :]
    first = starts[:, ::rows]
    lo = jnp.maximum(c0 - window + 1, first) // block_kv
    hi = jnp.minimum(pl.cdiv(c0 + rows, block_kv), nk) + jnp.zeros_like(lo)
    sink_lo = first // block_kv
    if sinks:
        n_sink = jnp.clip(jnp.minimum(pl.cdiv(first + sinks, block_kv), lo) - sink_lo, 0, None)
    else:
        n_sink = jnp.zeros_like(lo)
    cols = [lo, hi, sink_lo, n_sink]
    for w in range(COMPUTE_WARPGROUPS):
        qw = c0 + w * block_q
        last = starts[:, block_q * (w + 1) - 1::rows]
        full_lo = jnp.clip(pl.cdiv(jnp.maximum(qw + block_q - window, last), block_kv), lo, hi)
        cols += [full_lo, jnp.clip((qw + 1) // block_kv, full_lo, hi)]
    return jnp.stack(cols, axis=-1).astype(jnp.int32)


def swizzled_tiling(dtype, minor):
    """Tiling + swizzle transforms of a shared-memory block whose last dim has `minor`
    elements: the layout wgmma reads its operands from and the TMA engine writes."""
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(minor * bits)
    return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def _kernel(meta_ref, starts_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, scoped, *, scale2,
            window, sinks, groups, bq, bk, stages):
    smem, loaded, released, schedule = scoped
    q_smem2, k_smem, v_smem, qstart_smem2, lse_smem2 = smem
    k_loaded, v_loaded, q_loaded, qstart_loaded = loaded
    k_released, v_released = released
    b = lax.axis_index("batch")
    h = lax.axis_index("heads")
    tile = lax.axis_index("tiles")
    wg = lax.axis_index("wg")
    lo, hi = meta_ref[b, tile, LO], meta_ref[b, tile, HI]
    sink_lo, n_sink = meta_ref[b, tile, SINK_LO], meta_ref[b, tile, N_SINK]
    n_steps = n_sink + hi - lo

    def block_of(step):
        return jnp.where(step < n_sink, sink_lo + step, lo + step - n_sink)

    def slot_of(step):
        return lax.rem(step, jnp.int32(stages))

    def schedule_sync():
        plgpu.barrier_arrive(schedule)
        plgpu.barrier_wait(schedule)

    @pl.when(wg < COMPUTE_WARPGROUPS)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        q_smem, qstart_smem, lse_smem = q_smem2.at[wg], qstart_smem2.at[wg], lse_smem2.at[wg]
        q0 = (tile * COMPUTE_WARPGROUPS + wg) * bq
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, bq), h], q_smem, q_loaded.at[wg])
        plgpu.copy_gmem_to_smem(starts_ref.at[b, pl.ds(q0, bq)], qstart_smem,
                                qstart_loaded.at[wg])
        plgpu.barrier_wait(q_loaded.at[wg])
        plgpu.barrier_wait(qstart_loaded.at[wg])
        qstart = lax.broadcast_in_dim(_load_rows(qstart_smem), (bq, bk), [0])
        qpos = q0 + plgpu.broadcasted_iota(jnp.int32, (bq, bk), 0, layout=plgpu.Layout.WGMMA)
        col = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=plgpu.Layout.WGMMA)

        def step(i, carry, *, masked):
            acc, m, l = carry
            slot = slot_of(i)
            plgpu.barrier_wait(k_loaded.at[slot])

            def scores(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, _transposed(k_smem.at[slot]))
                schedule_sync()
                return acc_ref[...]

            s = pl.run_scoped(scores, plgpu.ACC((bq, bk), F32))
            plgpu.barrier_arrive(k_released.at[slot])
            if masked:
                kpos = block_of(i) * bk + col
                s = jnp.where(visible(qpos, kpos, qstart, window, sinks), s, MASK_VALUE)
            m_new = jnp.maximum(m, s.max(axis=1) * scale2)
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s * scale2 - lax.broadcast_in_dim(m_new, s.shape, [0]))
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            l = l * alpha + p.sum(axis=1)
            p16 = p.astype(q_smem.dtype)
            # The softmax must be computed before the arrival below tells the other warpgroup
            # that the tensor cores are free.
            acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
            plgpu.barrier_arrive(schedule)  # softmax done: the other warpgroup may multiply
            plgpu.barrier_wait(v_loaded.at[slot])
            plgpu.barrier_wait(schedule)

            def values(acc_ref):
                plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

            acc = pl.run_state(values)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_released.at[slot])
            return acc, m_new, l

        d = q_smem.shape[-1]
        carry = (plgpu.layout_cast(jnp.zeros((bq, d), F32), plgpu.Layout.WGMMA),
                 plgpu.layout_cast(jnp.full((bq,), MASK_VALUE, F32), plgpu.Layout.WGMMA.reduce(1)),
                 plgpu.layout_cast(jnp.zeros((bq,), F32), plgpu.Layout.WGMMA.reduce(1)))
        full_lo = n_sink + meta_ref[b, tile, FULL0 + 2 * wg] - lo
        full_hi = n_sink + meta_ref[b, tile, FULL0 + 2 * wg + 1] - lo
        masked = functools.partial(step, masked=True)
        pl.when(wg == 1)(schedule_sync)  # start one phase behind warpgroup 0
        carry = lax.fori_loop(0, full_lo, masked, carry)
        carry = lax.fori_loop(full_lo, full_hi, functools.partial(step, masked=False), carry)
        acc, m, l = lax.fori_loop(full_hi, n_steps, masked, carry)
        pl.when(wg == 0)(schedule_sync)

        acc = acc / lax.broadcast_in_dim(l, acc.shape, [0])
        q_smem[...] = acc.astype(q_smem.dtype)
        lse_smem[...] = m + jnp.log(l) * LOG2E
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, pl.ds(q0, bq), h])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(q0, bq)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WARPGROUPS)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(h, jnp.int32(groups))

        def load(step, slot):
            keys = (b, pl.ds(block_of(step) * bk, bk), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_loaded.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_loaded.at[slot])

        for i in range(stages):
            pl.when(i < n_steps)(functools.partial(load, i, i))

        @pl.loop(stages, jnp.maximum(n_steps, stages))
        def _refill(i):
            slot = slot_of(i)
            plgpu.barrier_wait(k_released.at[slot])
            plgpu.barrier_wait(v_released.at[slot])
            load(i, slot)


def swa_forward_mosaic(q, k, v, starts, *, window, sinks, scale, block_q=64, block_kv=128,
                       stages=2):
    """(o [B, Tp, Hq, D], base-2 lse [B, Hq, Tp] f32) for padded inputs (Tp a multiple of
    2 * block_q and of block_kv; `starts` from common.padded_starts)."""
    b, tp, hq, d = q.shape
    hkv = k.shape[2]
    rows = COMPUTE_WARPGROUPS * block_q
    if tp % rows or tp % block_kv:
        raise ValueError(f"swa_forward_mosaic: padded length {tp} must be a multiple of "
                         f"2 * block_q = {rows} and of block_kv = {block_kv}")
    if q.dtype not in (jnp.bfloat16, jnp.float16) or d != 128:
        # head_dim 64 lowers but gave NaNs on an H200 (session 8): the Triton forward serves it.
        raise ValueError(f"swa_forward_mosaic: needs bf16/fp16 and head_dim 128, "
                         f"got {q.dtype} and {d}")
    meta = tile_table(starts, window=window, sinks=sinks, block_q=block_q, block_kv=block_kv)

    def entry(meta_ref, starts_ref, q_ref, k_ref, v_ref, o_ref, lse_ref):
        tiled = swizzled_tiling(q.dtype, d)
        scratch = (
            plgpu.SMEM((COMPUTE_WARPGROUPS, block_q, d), q.dtype, transforms=tiled),
            plgpu.SMEM((stages, block_kv, d), q.dtype, transforms=tiled),
            plgpu.SMEM((stages, block_kv, d), q.dtype, transforms=tiled),
            plgpu.SMEM((COMPUTE_WARPGROUPS, block_q), jnp.int32),
            plgpu.SMEM((COMPUTE_WARPGROUPS, block_q), F32),
        )
        pl.run_scoped(
            lambda *scoped: _kernel(meta_ref, starts_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
                                    scoped, scale2=scale * LOG2E, window=window, sinks=sinks,
                                    groups=hq // hkv, bq=block_q, bk=block_kv, stages=stages),
            scratch,
            (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
             plgpu.Barrier(num_barriers=COMPUTE_WARPGROUPS),
             plgpu.Barrier(num_barriers=COMPUTE_WARPGROUPS)),
            (plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, tp), F32)),
        grid=(hq, tp // rows, b),
        grid_names=("heads", "tiles", "batch"),
        num_threads=COMPUTE_WARPGROUPS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(meta, starts, q, k, v)
