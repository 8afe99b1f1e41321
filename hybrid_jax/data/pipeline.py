"""Training batches from a mixture of sources: grain index pipeline + tokenising + packing.

    it = make_batches(cfg.data, tokenizer, seq_len=512, batch_size=8, seed=0)
    batch = next(it)          # {input_ids, segment_ids, positions, loss_mask}: [8, 512]
    state = it.get_state()    # small JSON-able dict; save it with the checkpoint
    it.set_state(state)       # resume: the next batches are exactly those that followed

Index side (grain `MapDataset`): each source is sharded across hosts
(`shard=(process_index, process_count)`, disjoint records per host), shuffled with its own
seed (reshuffled every epoch), repeated forever, and the sources are mixed by weight.
Record i of the mixed stream is a pure function of (config, seed, shard, i), so the
iterator state is just the stream position plus the packer's offset into a split document
(`packing.PackState`): resuming re-reads nothing it does not need.

Record side: a record with `messages` (or `prompt` + `completion`) is a chat, rendered
with the chat template and masked per `loss_mask`; a record with `text` is a document
trained on every token and ended with `<|endoftext|>`. Records are tokenised in blocks
(one batched call to the fast tokenizer) and packed by `packing.pack_rows`.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
from collections.abc import Mapping

import numpy as np

from hybrid_jax.data import chat, packing, sources

DEFAULTS = {
    "loss_mask": "completion",  # chats: "completion" (assistant turns) or "all"
    "chat_template": "tokenizer",  # or "builtin" (Qwen3-style, for tokenizers without one)
    "overlong": "split",  # documents longer than seq_len: "split" or "drop"
    "shuffle": True,
    "append_eos": True,  # end text documents with <|endoftext|>
    "cache_documents": 500_000,  # tokenised documents kept for later epochs (0: none)
}
ENCODE_BLOCK = 256  # records tokenised per batched tokenizer call


def _grain():
    try:
        import grain
    except ImportError as e:
        raise ImportError("hybrid_jax.data pipelines need the 'grain' package (pip install "
                          "grain; on the GPU machine install the wheel from .whl/)") from e
    return grain


def _as_dict(cfg) -> dict:
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict
        return cfg.to_dict()
    return dict(cfg)


def _settings(cfg: dict) -> dict:
    s = {k: cfg.get(k, v) for k, v in DEFAULTS.items()}
    if s["loss_mask"] not in chat.LOSS_MASKS:
        raise ValueError(f"data.loss_mask={s['loss_mask']!r}: choose from {chat.LOSS_MASKS}")
    if s["chat_template"] not in chat.CHAT_TEMPLATES:
        raise ValueError(f"data.chat_template={s['chat_template']!r}: choose from "
                         f"{chat.CHAT_TEMPLATES}")
    if s["overlong"] not in packing.OVERLONG:
        raise ValueError(f"data.overlong={s['overlong']!r}: choose from {packing.OVERLONG}")
    return s


def _shorthand(cfg: dict) -> list[dict]:
    """The single-source form of hybrid_jax.config's `data` section (source/path/split)."""
    src, path, split = cfg["source"], cfg.get("path") or "", cfg.get("split") or ""
    if src in ("microworld", "micro_world"):
        world = {"world": cfg["world"]} if cfg.get("world") else {}
        return [{"kind": "microworld", "task": t, **({"weight": w} if w != 1.0 else {}), **world}
                for t, w in _microworld_split(split)]
    if src == "tfds":
        return [{"kind": "tfds", "name": path, "split": split or "train",
                 "data_dir": cfg.get("data_dir")}]
    if src == "hf_disk":
        return [{"kind": "hf_disk", "path": path, "split": split or None}]
    return [{"kind": src, "path": path}]


def _microworld_split(split: str) -> list[tuple[str, float]]:
    """[(task, weight)] of a micro-world split: "" or "train" (corpus + instruct), a task name
    ("corpus", "long_context_128_1024", ...), or a mixture of those joined by "+", each with an
    optional "*weight" ("train+long_context*2"), so one stage's `data.split` names a mixture."""
    out = []
    for part in (split or "train").split("+"):
        task, _, w = part.strip().partition("*")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            weight = -1.0
        if not task or not weight > 0:
            raise ValueError(f"micro-world split {split!r}: each '+'-joined part is a task with an optional "
                             "'*weight' > 0, e.g. 'train+long_context*2'")
        out += [("corpus", weight), ("instruct", weight)] if task == "train" else [(task, weight)]
    return out


def _source_specs(cfg: dict) -> tuple[list[dict], list[str]]:
    """(source specs, their names for error messages). `sources` is a list, or a mapping
    name -> spec (taken in sorted name order), which ml_collections can freeze and
    override from the command line (`--config.data.sources.chat.weight=2`)."""
    if not cfg.get("sources") and cfg.get("source"):
        specs = _shorthand(cfg)
        return specs, [f"data.source[{i}]" for i in range(len(specs))]
    raw = cfg.get("sources") or []
    if isinstance(raw, Mapping) or hasattr(raw, "items"):
        items = sorted(raw.items())
        specs = [_as_dict(v) for _, v in items]
        names = [f"data.sources.{k}" for k, _ in items]
    else:
        specs = [_as_dict(v) for v in raw]
        names = [f"data.sources[{i}]" for i in range(len(specs))]
    if not specs:
        raise ValueError("data.sources is empty: list at least one source, e.g. "
                         "[{'kind': 'jsonl', 'path': 'train.jsonl'}]")
    for name, s in zip(names, specs, strict=True):
        w = s.get("weight", 1.0)
        if not isinstance(w, (int, float)) or not w > 0:
            raise ValueError(f"{name}.weight={w!r}: mixture weights must be > 0 "
                             "(remove the source to leave it out)")
        m = s.get("loss_mask")
        if m is not None and m not in chat.LOSS_MASKS:
            raise ValueError(f"{name}.loss_mask={m!r}: choose from {chat.LOSS_MASKS}")
    return specs, names


class RecordEncoder:
    """Records -> (ids, mask) documents, per their source's settings."""

    def __init__(self, tokenizer, specs: list[dict], names: list[str], settings: dict):
        self.tokenizer = tokenizer
        self.specs = specs
        self.names = names
        self.settings = settings
        # Small data sets (the micro-world) repeat every epoch: rendering chats through
        # Jinja dominates the cost, so documents are kept by (source, record index).
        self._cache: dict[tuple[int, int], tuple] = {}

    def _kind(self, k: int, record: Mapping):
        spec = self.specs[k]
        mf, tf = spec.get("messages_field", "messages"), spec.get("text_field", "text")
        if mf in record:
            return "chat", record[mf]
        if "prompt" in record and "completion" in record:
            return "chat", [{"role": "user", "content": record["prompt"]},
                            {"role": "assistant", "content": record["completion"]}]
        if tf in record:
            if not isinstance(record[tf], str):
                raise ValueError(f"{self.names[k]} field {tf!r} must be a string, got "
                                 f"{type(record[tf]).__name__}")
            return "text", record[tf]
        raise ValueError(f"{self.names[k]} ({spec.get('kind')}): record has fields "
                         f"{sorted(record)}, none of {mf!r}, {tf!r} or 'prompt'+'completion'; "
                         "set the source's 'text_field' or 'messages_field'")

    def __call__(self, tagged: list[tuple[int, int, Mapping]]):
        """[(source number, record index, record)] -> [(ids, mask)]."""
        out = [self._cache.get((k, i)) for k, i, _ in tagged]
        groups: dict[tuple, list[int]] = {}
        payload, first = {}, {}
        for j, (k, i, record) in enumerate(tagged):
            if out[j] is not None or first.setdefault((k, i), j) != j:
                continue  # cached, or repeated in this block (an epoch boundary)
            kind, payload[j] = self._kind(k, record)
            mask = self.specs[k].get("loss_mask") or self.settings["loss_mask"]
            groups.setdefault((kind, mask if kind == "chat" else "all"), []).append(j)
        room = self.settings["cache_documents"] - len(self._cache)
        for (kind, mask), js in groups.items():
            if kind == "text":
                docs = chat.encode_text(self.tokenizer, [payload[j] for j in js],
                                        append_eos=self.settings["append_eos"])
            else:
                docs = chat.encode_chats(self.tokenizer, [payload[j] for j in js],
                                         loss_mask=mask,
                                         chat_template=self.settings["chat_template"])
            for j, d in zip(js, docs, strict=True):
                out[j] = d
                if room > 0:
                    self._cache[tagged[j][:2]] = d
                    room -= 1
        return [d if d is not None else out[first[tagged[j][:2]]] for j, d in enumerate(out)]


def _epoch_shuffle(grain):
    """A grain MapDataset that permutes its parent with a fresh permutation every epoch.

    Same semantics as `MapDataset.shuffle` (epoch e of index i reads parent index
    perm_e[i mod n] + e n), but one numpy permutation per epoch instead of grain's
    per-element index_shuffle: 25 vs 42 us per record read through the repeated data set
    (scripts/bench_data_pipeline.py, 2 busy CPU cores). The permutation comes from numpy's
    PCG64 stream, so resuming exactly needs the same numpy major version.
    """

    class EpochShuffle(grain.MapDataset):
        def __init__(self, parent, seed: int):
            super().__init__(parent)
            self._seed, self._n, self._perms = seed, len(parent), {}

        def __len__(self):
            return self._n

        def _perm(self, epoch):
            if epoch not in self._perms:
                if len(self._perms) > 1:  # keep the current and the previous epoch
                    self._perms.pop(min(self._perms))
                rng = np.random.default_rng([self._seed, epoch])
                self._perms[epoch] = rng.permutation(self._n)
            return self._perms[epoch]

        def __getitem__(self, index):
            if isinstance(index, slice):
                return self.slice(index)
            epoch, j = divmod(index, self._n)
            return self._parent[int(self._perm(epoch)[j]) + epoch * self._n]

    return EpochShuffle


def build_stream(cfg, seed: int = 0, shard: tuple[int, int] = (0, 1)):
    """(the infinite grain MapDataset of (source number, record index, record) mixed by
    weight, (source specs, source names), settings)."""
    grain = _grain()
    cfg = _as_dict(cfg)
    specs, names = _source_specs(cfg)
    settings = _settings(cfg)
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard={shard}: need 0 <= process_index < process_count")
    streams = []
    for k, spec in enumerate(specs):
        src = sources.open_source(spec)
        if len(src) < count:
            raise ValueError(f"{names[k]} has {len(src)} records, fewer than the "
                             f"{count} hosts sharing it")
        n = len(src)
        # Indices past the end (later epochs) wrap around in grain's source; keep i < n.
        ds = grain.MapDataset.source(src).map_with_index(lambda i, r, n=n: (i % n, r))
        ds = ds[index::count]
        if settings["shuffle"]:
            ds = _epoch_shuffle(grain)(ds, seed=(seed * 1_000_003 + k) % 2**31)
        ds = ds.repeat().map(lambda ir, k=k: (k, *ir))
        streams.append(ds)
    if len(streams) == 1:
        return streams[0], (specs, names), settings
    weights = [float(s.get("weight", 1.0)) for s in specs]
    return grain.MapDataset.mix(streams, weights), (specs, names), settings


class BatchIterator:
    """Packed batches with exact save / restore (see module doc). `prefetch` > 0 builds
    that many batches ahead in a background thread; the state always describes the batches
    already returned."""

    def __init__(self, stream, encoder: RecordEncoder, seq_len: int, batch_size: int,
                 overlong: str, pad_id: int, fingerprint: str, prefetch: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        if seq_len < 2:
            raise ValueError(f"seq_len={seq_len}: need at least 2 tokens per row")
        self._stream, self._encode = stream, encoder
        self.seq_len, self.batch_size = seq_len, batch_size
        self._overlong, self._pad_id = overlong, pad_id
        self._fingerprint = fingerprint
        self._prefetch = prefetch
        self._state = packing.PackState()
        self._cache_start, self._cache = 0, []
        self._thread = None

    # ---- documents ------------------------------------------------------------------
    def _doc(self, i: int):
        j = i - self._cache_start
        if not 0 <= j < len(self._cache):
            self._cache_start = i
            self._cache = self._encode([self._stream[i + t] for t in range(ENCODE_BLOCK)])
            j = 0
        return self._cache[j]

    def _next_batch(self, state):
        return packing.pack_rows(self._doc, state, self.batch_size, self.seq_len,
                                 overlong=self._overlong, pad_id=self._pad_id)

    # ---- prefetching ----------------------------------------------------------------
    def _start(self):
        q, stop = queue.Queue(maxsize=self._prefetch), threading.Event()

        def put(item):
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def work(state):
            try:
                while not stop.is_set():
                    batch, state = self._next_batch(state)
                    put((batch, state))
            except BaseException as e:  # surfaced in __next__
                put((e, None))

        t = threading.Thread(target=work, args=(self._state,), daemon=True)
        t.start()
        self._thread = (t, q, stop)

    def _stop(self):
        if self._thread is not None:
            t, _, stop = self._thread
            stop.set()
            t.join()
            self._thread = None

    # ---- iterator protocol ----------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._prefetch <= 0:
            batch, self._state = self._next_batch(self._state)
            return batch
        if self._thread is None:
            self._start()
        batch, state = self._thread[1].get()
        if isinstance(batch, BaseException):
            self._thread = None
            raise batch
        self._state = state
        return batch

    def get_state(self) -> dict:
        return {"fingerprint": self._fingerprint, **self._state.to_dict()}

    def set_state(self, state: Mapping):
        if state.get("fingerprint") != self._fingerprint:
            raise ValueError("data iterator state was saved by a pipeline with a different "
                             "configuration (sources, seed, shard, seq_len, batch_size or "
                             "tokenizer); restore it into the same configuration")
        self._stop()
        self._state = packing.PackState.from_dict(state)
        self._cache_start, self._cache = 0, []

    @property
    def stats(self) -> dict:
        """Counters for the logs: documents, overlong_split, overlong_dropped, ..."""
        d = self._state.to_dict()
        d.pop("offset")
        d["records_read"] = d.pop("index")
        return d

    def close(self):
        self._stop()


def _fingerprint(cfg, tokenizer, seq_len, batch_size, seed, shard) -> str:
    cfg = {k: v for k, v in _as_dict(cfg).items() if k != "cache_documents"}  # no effect on data
    blob = json.dumps({"cfg": cfg, "vocab": len(tokenizer), "seq_len": seq_len,
                       "batch_size": batch_size, "seed": seed, "shard": list(shard),
                       "tokenizer": getattr(tokenizer, "name_or_path", "")},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_batches(cfg, tokenizer, seq_len: int, batch_size: int, seed: int = 0,
                 shard: tuple[int, int] | None = None, prefetch: int = 2) -> BatchIterator:
    """Packed training batches from `cfg` (the `data` section: `sources` and the keys in
    `DEFAULTS`; see docs/data.md). `tokenizer` is an HF tokenizer or a path to one;
    `shard` defaults to (jax.process_index(), jax.process_count())."""
    if isinstance(tokenizer, str):
        from hybrid_jax.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    if shard is None:
        import jax

        shard = (jax.process_index(), jax.process_count())
    stream, (specs, names), settings = build_stream(cfg, seed, shard)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return BatchIterator(stream, RecordEncoder(tokenizer, specs, names, settings), seq_len,
                         batch_size, settings["overlong"], pad_id,
                         _fingerprint(cfg, tokenizer, seq_len, batch_size, seed, shard),
                         prefetch)


__all__ = ["make_batches", "BatchIterator", "build_stream", "DEFAULTS"]
