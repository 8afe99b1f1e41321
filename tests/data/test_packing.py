"""Packing: documents come back exactly; segments, positions and masks follow the contract."""

import numpy as np
import pytest

from hybrid_jax.data import packing


def _docs(n, max_len, seed=0):
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        length = int(rng.integers(1, max_len + 1))
        docs.append((rng.integers(1, 1000, length).astype(np.int32),
                     rng.integers(0, 2, length).astype(bool)))
    return docs


def _pack_all(docs, seq_len, rows, overlong):
    state, batches = packing.PackState(), []
    sentinel = (np.zeros(1, np.int32), np.zeros(1, bool))  # fills the last rows; ignored
    get = lambda i: docs[i] if i < len(docs) else sentinel  # noqa: E731
    while state.index < len(docs):
        batch, state = packing.pack_rows(get, state, rows, seq_len, overlong=overlong, pad_id=-1)
        batches.append(batch)
    return batches, state


def _check_layout(batch, seq_len):
    for r in range(batch["input_ids"].shape[0]):
        seg, pos = batch["segment_ids"][r], batch["positions"][r]
        real = seg > 0
        # Padding only at the end of a row, with pad id, zero mask and zero position.
        assert not np.any(np.diff(real.astype(int)) > 0)
        assert np.all(batch["input_ids"][r][~real] == -1)
        assert np.all(batch["loss_mask"][r][~real] == 0) and np.all(pos[~real] == 0)
        # Segments number 1, 2, ... in order; positions restart at 0 for each.
        ids = seg[real]
        assert np.all(np.diff(ids) >= 0) and (len(ids) == 0 or ids[0] == 1)
        for s in np.unique(ids):
            assert np.array_equal(pos[seg == s], np.arange((seg == s).sum()))
            assert batch["loss_mask"][r][np.argmax(seg == s)] == 0  # first token of a segment


def test_packing_round_trip_with_split():
    seq_len = 16
    docs = _docs(60, 40)  # many longer than seq_len
    batches, state = _pack_all(docs, seq_len, rows=3, overlong="split")
    pieces = [p for b in batches for p in packing.unpack(b)]
    for b in batches:
        _check_layout(b, seq_len)
    # Rejoin pieces: each document is ceil(len / seq_len) consecutive pieces.
    k = 0
    assert all(len(p[0]) == 1 and p[0][0] == 0 for p in pieces[sum(-(-len(d[0]) // seq_len) for d in docs):])
    for ids, mask in docs:
        n = -(-len(ids) // seq_len)
        got_ids = np.concatenate([p[0] for p in pieces[k:k + n]])
        got_mask = np.concatenate([p[1] for p in pieces[k:k + n]])
        assert np.array_equal(got_ids, ids)
        expect = mask.astype(np.int32).copy()
        expect[::seq_len] = 0  # each piece's first token has no context in its segment
        assert np.array_equal(got_mask, expect)
        k += n
    assert state.overlong_split == sum(len(d[0]) > seq_len for d in docs)
    assert state.overlong_dropped == 0


def test_packing_drop_counts_and_keeps_the_rest():
    seq_len = 16
    docs = _docs(60, 40, seed=1)
    batches, state = _pack_all(docs, seq_len, rows=2, overlong="drop")
    kept = [d for d in docs if len(d[0]) <= seq_len]
    pieces = [p for b in batches for p in packing.unpack(b)]
    assert all(len(p[0]) == 1 and p[0][0] == 0 for p in pieces[len(kept):])
    for (ids, mask), (pids, pmask) in zip(kept, pieces[:len(kept)], strict=True):
        assert np.array_equal(ids, pids)
        assert np.array_equal(pmask[1:], mask[1:].astype(np.int32)) and pmask[0] == 0
    assert state.overlong_dropped == len(docs) - len(kept) > 0
    assert state.overlong_split == 0


def test_pack_rows_is_a_pure_function_of_the_state():
    docs = _docs(30, 20, seed=2)
    get = lambda i: docs[i % len(docs)]  # noqa: E731
    s0 = packing.PackState(index=5, offset=3)
    a, sa = packing.pack_rows(get, s0, 2, 8)
    b, sb = packing.pack_rows(get, s0, 2, 8)
    assert s0 == packing.PackState(index=5, offset=3)
    assert sa == sb and all(np.array_equal(a[k], b[k]) for k in a)


def test_bad_packing_settings():
    with pytest.raises(ValueError, match="overlong"):
        packing.pack_rows(lambda i: None, packing.PackState(), 1, 8, overlong="truncate")
    with pytest.raises(ValueError, match="seq_len"):
        packing.pack_rows(lambda i: None, packing.PackState(), 1, 1)
