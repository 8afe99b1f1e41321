"""make_batches: exact resume, mixtures, sharding, over-long documents, masks."""

import json
import logging
import sys

import numpy as np
import pytest

from hybrid_jax.data import microworld, packing, pipeline


def _long_docs(tmp_path, n=40):
    rng = np.random.default_rng(0)
    p = tmp_path / "long.jsonl"
    words = microworld.OCCUPATIONS + microworld.COLOURS
    p.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, rng.integers(3, 60)))})
                         + "\n" for _ in range(n)))
    return str(p)


def _cfg(tmp_path, **kw):
    return {"sources": [{"kind": "jsonl", "path": _long_docs(tmp_path), "weight": 1.0},
                        {"kind": "microworld", "task": "instruct", "weight": 2.0}], **kw}


def _equal(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_mid_epoch_is_exact(tmp_path, micro_tokenizer, prefetch):
    cfg = _cfg(tmp_path)
    ref = pipeline.make_batches(cfg, micro_tokenizer, 32, 4, seed=3, shard=(0, 1), prefetch=0)
    expected = [next(ref) for _ in range(14)]
    it = pipeline.make_batches(cfg, micro_tokenizer, 32, 4, seed=3, shard=(0, 1),
                               prefetch=prefetch)
    states = []
    for i in range(10):
        assert _equal(next(it), expected[i])
        states.append(json.loads(json.dumps(it.get_state())))  # survives a checkpoint
    it.close()
    # Some saved state is in the middle of a split document (offset > 0).
    assert any(s["offset"] > 0 for s in states)
    for k, s in enumerate(states):
        fresh = pipeline.make_batches(cfg, micro_tokenizer, 32, 4, seed=3, shard=(0, 1),
                                      prefetch=prefetch)
        fresh.set_state(s)
        for j in range(k + 1, min(k + 4, 14)):
            assert _equal(next(fresh), expected[j]), (k, j)
        fresh.close()
    assert ref.stats["overlong_split"] > 0


def test_seed_determines_the_order(tmp_path, micro_tokenizer):
    cfg = _cfg(tmp_path)
    make = lambda seed: pipeline.make_batches(cfg, micro_tokenizer, 32, 4, seed=seed,  # noqa
                                              shard=(0, 1), prefetch=0)
    a, b, c = make(0), make(0), make(1)
    xa, xb, xc = next(a), next(b), next(c)
    assert _equal(xa, xb) and not _equal(xa, xc)


def test_state_from_another_configuration_is_rejected(tmp_path, micro_tokenizer):
    cfg = _cfg(tmp_path)
    a = pipeline.make_batches(cfg, micro_tokenizer, 32, 4, seed=0, shard=(0, 1), prefetch=0)
    b = pipeline.make_batches(cfg, micro_tokenizer, 32, 8, seed=0, shard=(0, 1), prefetch=0)
    with pytest.raises(ValueError, match="different configuration"):
        b.set_state(a.get_state())


def test_mixture_follows_the_weights_and_rejects_bad_ones(tmp_path):
    cfg = {"sources": [{"kind": "microworld", "task": "corpus", "weight": 3.0},
                       {"kind": "microworld", "task": "instruct", "weight": 1.0}]}
    stream, _, _ = pipeline.build_stream(cfg, seed=0)
    tags = [stream[i][0] for i in range(4000)]
    assert abs(tags.count(0) / 4000 - 0.75) < 0.01
    for w in (0, -1.0):
        bad = {"sources": [dict(cfg["sources"][0], weight=w), cfg["sources"][1]]}
        with pytest.raises(ValueError, match=r"data.sources\[0\].weight=.*must be > 0"):
            pipeline.build_stream(bad)
        named = {"sources": {"a": bad["sources"][0], "b": bad["sources"][1]}}
        with pytest.raises(ValueError, match=r"data.sources.a.weight=.*must be > 0"):
            pipeline.build_stream(named)
    with pytest.raises(ValueError, match="data.sources is empty"):
        pipeline.build_stream({"sources": []})


def test_hosts_get_disjoint_shards():
    cfg = {"sources": [{"kind": "microworld", "task": "open"}], "shuffle": True}
    n = len(microworld.World().open_questions())
    seen = []
    for host in range(3):
        stream, _, _ = pipeline.build_stream(cfg, seed=0, shard=(host, 3))
        size = len(range(host, n, 3))
        epoch = [stream[i][2]["question"] for i in range(size)]
        assert len(set(epoch)) == size  # one epoch visits each of its records once
        again = [stream[i][2]["question"] for i in range(size, 2 * size)]
        assert set(again) == set(epoch) and again != epoch  # reshuffled every epoch
        seen.append(set(epoch))
    assert set.union(*seen) == {q["question"] for q in microworld.World().open_questions()}
    assert sum(map(len, seen)) == n
    with pytest.raises(ValueError, match="shard"):
        pipeline.build_stream(cfg, shard=(3, 3))


@pytest.mark.parametrize("overlong", ["split", "drop"])
def test_overlong_documents_are_counted_and_logged(tmp_path, micro_tokenizer, caplog, overlong):
    cfg = {"sources": [{"kind": "jsonl", "path": _long_docs(tmp_path)}], "overlong": overlong}
    it = pipeline.make_batches(cfg, micro_tokenizer, 24, 4, shard=(0, 1), prefetch=0)
    with caplog.at_level(logging.WARNING, logger="hybrid_jax.data.packing"):
        batches = [next(it) for _ in range(10)]
    stats = it.stats
    assert stats[f"overlong_{overlong}" if overlong == "split" else "overlong_dropped"] > 0
    assert stats["overlong_dropped" if overlong == "split" else "overlong_split"] == 0
    assert "exceeds seq_len=24" in caplog.text
    if overlong == "drop":  # nothing longer than 24 tokens got in
        assert all(len(ids) <= 24 for b in batches for ids, _ in packing.unpack(b))


def test_completion_masks_in_batches(micro_tokenizer):
    cfg = {"sources": [{"kind": "microworld", "task": "instruct"}], "shuffle": False}
    it = pipeline.make_batches(cfg, micro_tokenizer, 64, 2, shard=(0, 1), prefetch=0)
    batch = next(it)
    answers = [c["messages"][1]["content"] + "<|im_end|>" for c in microworld.World().instruct()]
    got = [micro_tokenizer.decode(ids[m.astype(bool)]) for ids, m in packing.unpack(batch)]
    assert got == answers[:len(got)] and len(got) >= 2


def test_bad_settings_and_records(tmp_path, micro_tokenizer):
    with pytest.raises(ValueError, match="data.loss_mask"):
        pipeline.build_stream({"sources": [{"kind": "microworld", "task": "open"}],
                               "loss_mask": "assistant"})
    p = tmp_path / "x.jsonl"
    p.write_text('{"body": "hello"}\n')
    it = pipeline.make_batches({"sources": [{"kind": "jsonl", "path": str(p)}]},
                               micro_tokenizer, 16, 1, shard=(0, 1), prefetch=2)
    with pytest.raises(ValueError, match=r"fields \['body'\].*text_field"):
        next(it)
    it = pipeline.make_batches({"sources": [{"kind": "jsonl", "path": str(p),
                                             "text_field": "body"}]},
                               micro_tokenizer, 16, 1, shard=(0, 1), prefetch=0)
    b = next(it)
    assert micro_tokenizer.decode(b["input_ids"][0][b["segment_ids"][0] == 1]) == "hello<|endoftext|>"


def test_missing_grain_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "grain", None)
    with pytest.raises(ImportError, match="'grain' package"):
        pipeline.build_stream({"sources": [{"kind": "microworld", "task": "open"}]})


def test_single_source_shorthand(tmp_path, micro_tokenizer):
    """hybrid_jax.config's `data` section names one source: source / path / split."""
    short = pipeline.make_batches({"source": "micro_world", "split": "train", "shuffle": False},
                                  micro_tokenizer, 64, 2, shard=(0, 1), prefetch=0)
    full = pipeline.make_batches(
        {"sources": [{"kind": "microworld", "task": "corpus"},
                     {"kind": "microworld", "task": "instruct"}], "shuffle": False},
        micro_tokenizer, 64, 2, shard=(0, 1), prefetch=0)
    assert _equal(next(short), next(full))
    p = _long_docs(tmp_path)
    a = pipeline.make_batches({"source": "jsonl", "path": p}, micro_tokenizer, 32, 2, shard=(0, 1),
                              prefetch=0)
    b = pipeline.make_batches({"sources": [{"kind": "jsonl", "path": p}]}, micro_tokenizer, 32, 2,
                              shard=(0, 1), prefetch=0)
    assert _equal(next(a), next(b))


def test_documents_are_tokenised_once_across_epochs(micro_tokenizer, monkeypatch):
    encoded = []
    real = pipeline.chat.encode_chats
    monkeypatch.setattr(pipeline.chat, "encode_chats",
                        lambda tok, chats, **kw: encoded.extend(chats) or real(tok, chats, **kw))
    cfg = {"sources": [{"kind": "microworld", "task": "instruct"}]}
    it = pipeline.make_batches(cfg, micro_tokenizer, 128, 8, shard=(0, 1), prefetch=0)
    for _ in range(60):
        next(it)
    n = len(microworld.World().instruct())
    assert it.stats["records_read"] > 2 * n  # more than two epochs...
    assert len(encoded) == n  # ...each chat rendered and tokenised once


def test_named_sources_in_a_frozen_config(micro_tokenizer):
    """A mapping of named sources survives ml_collections (lists of dicts cannot be
    frozen) and equals the list in sorted name order."""
    ml_collections = pytest.importorskip("ml_collections")
    corpus = {"kind": "microworld", "task": "corpus", "weight": 2.0}
    chats = {"kind": "microworld", "task": "instruct", "weight": 1.0}
    frozen = ml_collections.FrozenConfigDict({"data": {"sources": {"b_chat": chats,
                                                                   "a_text": corpus}}})
    a = pipeline.make_batches(frozen.data, micro_tokenizer, 64, 2, shard=(0, 1), prefetch=0)
    b = pipeline.make_batches({"sources": [corpus, chats]}, micro_tokenizer, 64, 2,
                              shard=(0, 1), prefetch=0)
    for _ in range(3):
        assert _equal(next(a), next(b))
