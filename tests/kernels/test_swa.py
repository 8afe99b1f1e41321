"""Sliding-window attention: oracle vs a naive loop, Pallas kernels (interpret mode) vs
the oracle, lowering for TPU and CUDA, and bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels.swa import swa_attention
from pallas_kernels.swa.gpu import swa_attention_gpu
from pallas_kernels.swa.reference import swa_attention_reference
from pallas_kernels.swa.tpu import swa_attention_tpu


def rms_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


def make_inputs(b, t, hq, hkv, d, seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, t, hq, d), dtype)
    k = jax.random.normal(ks[1], (b, t, hkv, d), dtype)
    v = jax.random.normal(ks[2], (b, t, hkv, d), dtype)
    do = jax.random.normal(ks[3], (b, t, hq, d), dtype)
    return q, k, v, do


def naive(q, k, v, window, sinks, segment_ids, scale):
    """Independent per-query loop in float64: explicit document runs, window and sinks."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, hq, d = q.shape
    group = hq // k.shape[2]
    seg = np.ones((b, t), int) if segment_ids is None else np.asarray(segment_ids)
    out = np.zeros_like(q)
    for bi in range(b):
        for ti in range(t):
            start = ti
            while start > 0 and seg[bi, start - 1] == seg[bi, ti]:
                start -= 1
            keys = [s for s in range(start, ti + 1) if ti - s < window or s - start < sinks]
            for h in range(hq):
                logits = np.array([q[bi, ti, h] @ k[bi, s, h // group] for s in keys]) * scale
                w = np.exp(logits - logits.max())
                w /= w.sum()
                out[bi, ti, h] = sum(wi * v[bi, s, h // group] for wi, s in zip(w, keys))
    return out


SEG = np.array([[0] * 3 + [1] * 9 + [2] * 7 + [5] * 4,   # left padding, 3 documents
                [4] * 23])


@pytest.mark.parametrize("window,sinks,segments", [
    (1, 0, False), (4, 0, False), (50, 0, False), (3, 2, False), (4, 2, True), (30, 1, True)])
def test_oracle_matches_naive_loop(window, sinks, segments):
    q, k, v, _ = make_inputs(2, 23, 4, 2, 8)
    seg = jnp.asarray(SEG) if segments else None
    got = swa_attention_reference(q, k, v, window=window, sinks=sinks, segment_ids=seg)
    want = naive(q, k, v, window, sinks, seg, 8 ** -0.5)
    assert rms_rel(got, want) < 1e-6


def test_oracle_isolates_documents_and_padding():
    """A packed document computes exactly what it computes alone; padded rows are finite."""
    q, k, v, _ = make_inputs(1, 23, 2, 1, 8)
    seg = jnp.asarray(SEG[:1])
    packed = swa_attention_reference(q, k, v, window=5, sinks=2, segment_ids=seg)
    alone = swa_attention_reference(q[:, 3:12], k[:, 3:12], v[:, 3:12], window=5, sinks=2)
    np.testing.assert_allclose(packed[:, 3:12], alone, rtol=1e-6, atol=1e-6)
    assert np.isfinite(np.asarray(packed)).all()


# Small blocks so windows span several blocks and both masked and unmasked block paths run.
GPU_BLOCKS = dict(block_q=8, block_k=4, dq_block_q=4, dq_block_k=8, dkv_block_q=8, dkv_block_k=4)
TPU_BLOCKS = dict(block_q=8, block_k=8, dq_block_q=8, dq_block_k=8, dkv_block_q=8, dkv_block_k=8)


def kernel_gpu(q, k, v, **kw):
    return swa_attention_gpu(q, k, v, interpret=True, **GPU_BLOCKS, **kw)


def kernel_tpu(q, k, v, **kw):
    return swa_attention_tpu(q, k, v, interpret=True, **TPU_BLOCKS, **kw)


# Each case mixes features so the interpreter runs few (slow) cases: T=23 is not a
# multiple of any block; (4, 2) heads is GQA.
CASES = {
    "window1-gqa": dict(heads=(4, 2), window=1, sinks=0, segments=False),
    "full-causal-mha": dict(heads=(2, 2), window=64, sinks=0, segments=False),
    "window-sinks-gqa": dict(heads=(4, 2), window=5, sinks=3, segments=False),
    "window-sinks-segments-gqa": dict(heads=(6, 2), window=6, sinks=2, segments=True),
    "window-segments-dim24": dict(heads=(2, 1), window=9, sinks=0, segments=True, dim=24),
}


def check_against_oracle(kernel, case):
    hq, hkv = case["heads"]
    q, k, v, do = make_inputs(2, 23, hq, hkv, case.get("dim", 16), seed=hq)
    kw = dict(window=case["window"], sinks=case["sinks"], scale=0.3,
              segment_ids=jnp.asarray(SEG) if case["segments"] else None)

    @jax.jit
    def run(q, k, v, do):
        o, vjp = jax.vjp(functools.partial(kernel, **kw), q, k, v)
        ro, rvjp = jax.vjp(functools.partial(swa_attention_reference, **kw), q, k, v)
        return (o, *vjp(do)), (ro, *rvjp(do))

    got, want = run(q, k, v, do)
    for name, g, w, tol in zip(("o", "dq", "dk", "dv"), got, want, (1e-5, 1e-4, 1e-4, 1e-4)):
        # Interpret mode fills unwritten output tiles with NaN, so a missed tile fails here.
        assert np.isfinite(np.asarray(g)).all(), f"{name} has unwritten (NaN) entries"
        if case["window"] == 1 and name in ("dq", "dk"):
            # One visible key per query: the softmax is constant, the gradient exactly 0.
            # Rounding in p * (dp - delta) leaves float32 noise relative to |dv|.
            assert float(jnp.abs(w).max()) == 0.0
            assert float(jnp.abs(g).max()) < 1e-6 * float(jnp.abs(want[3]).max()) + 1e-6, name
            continue
        err = rms_rel(g, w)
        assert err <= tol, f"{name}: RMS-relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_gpu_kernel_interpret(case):
    check_against_oracle(kernel_gpu, CASES[case])


@pytest.mark.parametrize("case", ["window1-gqa", "full-causal-mha", "window-sinks-segments-gqa"])
def test_tpu_kernel_interpret(case):
    check_against_oracle(kernel_tpu, CASES[case])


def test_interpret_backend_dispatch():
    """backend="interpret" runs the TPU kernel in Pallas's TPU interpreter."""
    q, k, v, _ = make_inputs(1, 20, 2, 1, 8)
    got = swa_attention(q, k, v, window=6, sinks=1, backend="interpret")
    want = swa_attention_reference(q, k, v, window=6, sinks=1)
    assert rms_rel(got, want) < 1e-5
    # auto on CPU is the reference.
    np.testing.assert_array_equal(swa_attention(q, k, v, window=6, sinks=1), want)


def test_interpreter_poisons_unwritten_outputs():
    """The mechanism the kernel tests rely on: an unwritten output tile reads as NaN."""
    from jax.experimental import pallas as pl

    def kernel(x_ref, o_ref):
        @pl.when(pl.program_id(0) == 0)
        def _():
            o_ref[...] = x_ref[...]

    x = jnp.ones((16, 8), jnp.float32)
    out = pl.pallas_call(kernel, grid=(2,), in_specs=[pl.BlockSpec((8, 8), lambda i: (i, 0))],
                         out_specs=pl.BlockSpec((8, 8), lambda i: (i, 0)),
                         out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=True)(x)
    assert np.isnan(np.asarray(out[8:])).all() and not np.isnan(np.asarray(out[:8])).any()


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("sinks,segments", [(0, False), (4, True)])
def test_kernels_lower_for_both_targets(platform, sinks, segments):
    b, t, hq, hkv, d = 1, 384, 6, 2, 128  # 3 blocks of 128, GQA group of 3
    q = jax.ShapeDtypeStruct((b, t, hq, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, t, hkv, d), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32)
    if platform == "tpu":
        fn = functools.partial(swa_attention_tpu, **{key: 128 for key in TPU_BLOCKS})
    else:
        fn = functools.partial(swa_attention_gpu, block_q=128, block_k=64)

    def fwd(q, k, v, s):
        return fn(q, k, v, window=200, sinks=sinks, segment_ids=s if segments else None,
                  scale=0.1)

    def fwd_bwd(q, k, v, s):
        o, vjp = jax.vjp(lambda q, k, v: fwd(q, k, v, s), q, k, v)
        return vjp(o)

    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    for f in (fwd, fwd_bwd):
        exp = export.export(jax.jit(f), platforms=(platform,), disabled_checks=checks)(q, kv, kv, seg)
        text = exp.mlir_module()
        assert ("tpu_custom_call" in text) if platform == "tpu" else ("triton" in text)


def test_bad_inputs_name_the_argument():
    q, k, v, _ = make_inputs(1, 8, 4, 2, 8)
    with pytest.raises(ValueError, match="`window`"):
        swa_attention(q, k, v, window=0)
    with pytest.raises(TypeError, match="`window`"):
        swa_attention(q, k, v, window=2.5)
    with pytest.raises(ValueError, match="`sinks`"):
        swa_attention(q, k, v, window=4, sinks=-1)
    q3, k3, v3, _ = make_inputs(1, 8, 4, 3, 8)
    with pytest.raises(ValueError, match="must divide"):
        swa_attention(q3, k3, v3, window=4)
    with pytest.raises(TypeError, match="share one dtype"):
        swa_attention(q, k.astype(jnp.bfloat16), v, window=4)
    with pytest.raises(ValueError, match="`k`"):
        swa_attention(q, k[:, :7], v[:, :7], window=4)
    with pytest.raises(ValueError, match="`v`"):
        swa_attention(q, k, v[..., :4], window=4)
    with pytest.raises(ValueError, match="4-D"):
        swa_attention(q[0], k, v, window=4)
    with pytest.raises(ValueError, match="`segment_ids`"):
        swa_attention(q, k, v, window=4, segment_ids=jnp.ones((1, 7), jnp.int32))
    with pytest.raises(TypeError, match="`segment_ids`"):
        swa_attention(q, k, v, window=4, segment_ids=jnp.ones((1, 8), jnp.float32))
    with pytest.raises(ValueError, match="`scale`"):
        swa_attention(q, k, v, window=4, scale=-1.0)
    with pytest.raises(ValueError, match="`backend`"):
        swa_attention(q, k, v, window=4, backend="triton")
    with pytest.raises(ValueError, match="cudnn"):
        swa_attention(q, k, v, window=4, sinks=2, backend="cudnn")


@pytest.mark.parametrize("window,sinks,bq,bk,segments", [
    (1, 0, 8, 8, False), (5, 0, 8, 4, False), (13, 3, 4, 8, False), (6, 2, 8, 8, True),
    (100, 0, 8, 8, True), (9, 17, 8, 8, True)])
def test_tpu_block_tables_cover_exactly_the_visible_blocks(window, sinks, bq, bk, segments):
    """Block skipping: each table lists exactly the blocks holding a visible pair."""
    from pallas_kernels.swa.common import padded_starts
    from pallas_kernels.swa.reference import visibility_mask
    from pallas_kernels.swa.tpu import _key_tables, _query_tables

    t, tp = 23, 24
    seg = jnp.asarray(SEG) if segments else None
    starts = padded_starts(seg, 2, t, tp)
    mask = np.asarray(visibility_mask(starts, window, sinks))  # [B, Tp, Tp]
    nq, nk = tp // bq, tp // bk
    blocks = mask.reshape(2, nq, bq, nk, bk).any(axis=(2, 4))  # [B, nq, nk]
    tbl, cnt = map(np.asarray, _key_tables(starts, window=window, sinks=sinks, bq=bq, bk=bk))
    qtbl, qcnt = map(np.asarray, _query_tables(starts, window=window, sinks=sinks, bq=bq, bk=bk))
    for b in range(2):
        for i in range(nq):
            listed = tbl[b, i, :cnt[b, i]]
            assert len(set(listed)) == len(listed)
            assert set(listed) == set(np.flatnonzero(blocks[b, i])), (b, i)
        for j in range(nk):
            listed = set(qtbl[b, j, :qcnt[b, j]])
            # The dK/dV walk is a contiguous range: a superset of the needed blocks.
            assert listed >= set(np.flatnonzero(blocks[b, :, j])), (b, j)
