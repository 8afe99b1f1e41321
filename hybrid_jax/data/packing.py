"""Packing tokenised documents into fixed-length rows with segment ids and positions.

A row holds whole documents one after another; a document that does not fit in the space
left closes the row (the rest is padding) and starts the next one. Rows are dicts of
numpy arrays, each [seq_len]:

* ``input_ids``   int32, the pad id on padding;
* ``segment_ids`` int32, 1, 2, ... per document in the row, **0 on padding**;
* ``positions``   int32, restarting at 0 for every document;
* ``loss_mask``   int32, 1 where the token is a training target: the document's own mask
  (all tokens, or the assistant turns) and never the first token of a segment, which has
  nothing before it in its segment to be predicted from. A trainer predicting token t
  from tokens < t uses ``logits[:, :-1]`` against ``input_ids[:, 1:]`` weighted by
  ``loss_mask[:, 1:]``.

Documents longer than seq_len are split into seq_len pieces (each its own segment) or
dropped, as `overlong` says; either way they are counted in `PackState`.

Packing is a pure function of (documents, state), so a saved state resumes exactly.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)

OVERLONG = ("split", "drop")


@dataclasses.dataclass
class PackState:
    """Where packing stands: the next document in the stream and how many of its tokens
    were already emitted (a split document), plus counters for the logs."""

    index: int = 0
    offset: int = 0
    documents: int = 0  # documents fully emitted or dropped
    overlong_split: int = 0
    overlong_dropped: int = 0
    empty_dropped: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d) -> PackState:
        return cls(**{f.name: int(d[f.name]) for f in dataclasses.fields(cls)})


def _log_overlong(state: PackState, overlong: str, n: int, seq_len: int):
    count = state.overlong_split + state.overlong_dropped
    if count & (count - 1) == 0:  # 1, 2, 4, 8, ...: visible but not noisy
        log.warning("document of %d tokens exceeds seq_len=%d: %s (%d over-long so far: "
                    "%d split, %d dropped)", n, seq_len, "split" if overlong == "split"
                    else "dropped", count, state.overlong_split, state.overlong_dropped)


def pack_rows(get_doc: Callable[[int], tuple[np.ndarray, np.ndarray]], state: PackState,
              num_rows: int, seq_len: int, *, overlong: str = "split",
              pad_id: int = 0) -> tuple[dict, PackState]:
    """Pack `num_rows` rows from documents `get_doc(state.index), ...`.

    `get_doc(i)` returns (ids, mask) of stream document i. Returns ([num_rows, seq_len]
    arrays, new state); `state` itself is not modified.
    """
    if overlong not in OVERLONG:
        raise ValueError(f"overlong={overlong!r}: choose from {OVERLONG}")
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}: need at least 2 tokens per row")
    s = dataclasses.replace(state)
    ids = np.full((num_rows, seq_len), pad_id, np.int32)
    seg = np.zeros((num_rows, seq_len), np.int32)
    pos = np.zeros((num_rows, seq_len), np.int32)
    mask = np.zeros((num_rows, seq_len), np.int32)
    empty_run = 0
    for r in range(num_rows):
        filled, segment = 0, 0
        while filled < seq_len:
            doc_ids, doc_mask = get_doc(s.index)
            n = len(doc_ids)
            if n == 0:
                empty_run += 1
                if empty_run > 100_000:
                    raise ValueError("100000 documents in a row encode to no tokens; check "
                                     "the sources' text fields (or set append_eos=True)")
                s.empty_dropped += 1
                s.documents += 1
                s.index += 1
                continue
            if n > seq_len and s.offset == 0:
                if overlong == "drop":
                    s.overlong_dropped += 1
                    s.documents += 1
                    s.index += 1
                    _log_overlong(s, overlong, n, seq_len)
                    continue
                if filled:  # pieces start on fresh rows, aligned at seq_len boundaries
                    break
                s.overlong_split += 1
                _log_overlong(s, overlong, n, seq_len)
            empty_run = 0
            piece = min(n - s.offset, seq_len)
            if piece > seq_len - filled:
                break
            segment += 1
            sl = slice(filled, filled + piece)
            ids[r, sl] = doc_ids[s.offset:s.offset + piece]
            seg[r, sl] = segment
            pos[r, sl] = np.arange(piece)
            mask[r, sl] = doc_mask[s.offset:s.offset + piece]
            mask[r, filled] = 0
            filled += piece
            s.offset += piece
            if s.offset == n:
                s.offset = 0
                s.index += 1
                s.documents += 1
    return {"input_ids": ids, "segment_ids": seg, "positions": pos, "loss_mask": mask}, s


def unpack(batch: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (ids, loss_mask) of every segment, row by row, in order (for tests and
    inspection): the inverse of packing up to split documents' piece boundaries."""
    out = []
    for r in range(batch["segment_ids"].shape[0]):
        seg = batch["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            sel = seg == s
            out.append((batch["input_ids"][r][sel], batch["loss_mask"][r][sel]))
    return out
