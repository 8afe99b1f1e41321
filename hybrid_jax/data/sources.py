"""Random-access record sources: JSONL, Parquet, ArrayRecord, TFDS, HF datasets on disk,
and the in-memory micro-world.

Every source has `len()` and `[i]`, and returns plain Python records (str, int, float,
lists, dicts; bytes decoded as UTF-8), so the same data gives identical examples from any
format. Optional back-ends (pyarrow, array_record, tensorflow_datasets, datasets) are
imported only by the source that needs them, with an error naming the package.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

KINDS = ("jsonl", "parquet", "array_record", "tfds", "hf_disk", "microworld")


def _require(module: str, package: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{what} needs the '{package}' package, which is not installed "
                          f"(pip install {package})") from e


def _expand(path) -> list[str]:
    """A path, a glob pattern or a list of them -> sorted existing files."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    files = []
    for p in paths:
        p = os.fspath(p)
        hits = sorted(glob.glob(p)) if glob.has_magic(p) else [p] if os.path.exists(p) else []
        if not hits:
            raise FileNotFoundError(f"data file {p!r} does not exist (no file matches it); "
                                    "check the source's 'path'")
        files += hits
    return files


def to_python(x):
    """numpy / bytes (as TFDS and ArrayRecord return them) -> plain Python values."""
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, np.ndarray):
        return [to_python(v) for v in x.tolist()] if x.ndim else to_python(x.item())
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Mapping):
        return {k: to_python(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_python(v) for v in x]
    return x


def _messages_from_columns(record: dict) -> dict:
    """TFDS stores a sequence of dicts as a dict of sequences; turn it back into a list."""
    m = record.get("messages")
    if isinstance(m, dict):
        keys = list(m)
        record["messages"] = [dict(zip(keys, vals, strict=True))
                              for vals in zip(*(m[k] for k in keys), strict=True)]
    return record


class JsonlSource:
    """One JSON object per line (blank lines skipped); several files are concatenated."""

    def __init__(self, path):
        self.files = _expand(path)
        self._index = []  # (file number, byte offset, line number)
        for fi, f in enumerate(self.files):
            with open(f, "rb") as fh:
                offset = 0
                for lineno, line in enumerate(fh, 1):
                    if line.strip():
                        self._index.append((fi, offset, lineno))
                    offset += len(line)

    def __len__(self):
        return len(self._index)

    def __getitem__(self, i):
        fi, offset, lineno = self._index[i]
        with open(self.files[fi], "rb") as fh:
            fh.seek(offset)
            line = fh.readline()
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.files[fi]}:{lineno}: malformed JSON line ({e})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{self.files[fi]}:{lineno}: expected a JSON object, got "
                             f"{type(record).__name__}")
        return record


class ParquetSource:
    """Rows of Parquet files, read into one memory-mapped Arrow table (random access to a
    row is a zero-copy slice; decoding row groups per access would make shuffling slow)."""

    def __init__(self, path):
        pq = _require("pyarrow.parquet", "pyarrow", "reading Parquet")
        pa = _require("pyarrow", "pyarrow", "reading Parquet")
        self.files = _expand(path)
        self._table = pa.concat_tables([pq.read_table(f, memory_map=True) for f in self.files])

    def __len__(self):
        return self._table.num_rows

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._table.slice(i, 1).to_pylist()[0]


class ArrayRecordSource:
    """ArrayRecord files whose records are UTF-8 JSON objects (see `write_array_record`).
    ArrayRecord files written by TFDS hold tf.Examples: read those with kind='tfds'."""

    def __init__(self, path):
        _require("array_record.python.array_record_data_source", "array-record",
                 "reading ArrayRecord")
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self.files = _expand(path)
        self._src = ArrayRecordDataSource(self.files)

    def __len__(self):
        return len(self._src)

    def __getitem__(self, i):
        raw = self._src[i]
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.files}: record {i} is not a UTF-8 JSON object ({e}); "
                             "ArrayRecord files written by TFDS are read with kind='tfds'"
                             ) from None


def write_array_record(path: str, records: Sequence[dict]):
    """Write records as JSON lines into one ArrayRecord file (readable by ArrayRecordSource)."""
    _require("array_record.python.array_record_module", "array-record", "writing ArrayRecord")
    from array_record.python.array_record_module import ArrayRecordWriter

    w = ArrayRecordWriter(os.fspath(path), "group_size:1")
    for r in records:
        w.write(json.dumps(r).encode("utf-8"))
    w.close()


class TfdsSource:
    """A prepared TFDS data set through `tfds.data_source` (no TensorFlow needed)."""

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None):
        tfds = _require("tensorflow_datasets", "tensorflow-datasets", f"TFDS source {name!r}")
        if name.split("/")[0] == "microworld":
            from hybrid_jax.data import tfds_builders

            tfds_builders.prepare(name, data_dir)
        try:
            self._src = tfds.data_source(name, split=split, data_dir=data_dir)
        except Exception as e:  # tfds raises several types for "not prepared / not found"
            raise FileNotFoundError(
                f"TFDS data set {name!r} split {split!r} could not be opened from data_dir="
                f"{data_dir!r} ({type(e).__name__}: {e}); prepare it first (tfds build "
                f"{name} --data_dir=...) or fix 'name'/'split'/'data_dir'") from e

    def __len__(self):
        return len(self._src)

    def __getitem__(self, i):
        return _messages_from_columns(to_python(self._src[i]))


class HfDiskSource:
    """An HF `datasets` data set saved with `save_to_disk`."""

    def __init__(self, path: str, split: str | None = None):
        datasets = _require("datasets", "datasets", "kind='hf_disk'")
        if not os.path.exists(path):
            raise FileNotFoundError(f"HF dataset directory {path!r} does not exist")
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{path!r} holds splits {sorted(ds)}; set 'split' to one")
            ds = ds[split]
        self._ds = ds

    def __len__(self):
        return len(self._ds)

    def __getitem__(self, i):
        return to_python(self._ds[int(i)])


class ListSource:
    """Records held in memory (the micro-world generated on the fly)."""

    def __init__(self, records: Sequence[dict]):
        self._records = list(records)

    def __len__(self):
        return len(self._records)

    def __getitem__(self, i):
        return self._records[i]


SOURCE_KEYS = {
    "jsonl": {"path"}, "parquet": {"path"}, "array_record": {"path"},
    "tfds": {"name", "split", "data_dir"}, "hf_disk": {"path", "split"},
    "microworld": {"task", "world"},
}
# Keys every source may carry; they are read by the pipeline, not the source.
COMMON_KEYS = {"kind", "weight", "loss_mask", "text_field", "messages_field"}


def open_source(spec: Mapping):
    """Build a source from one entry of `data.sources` (see docs/data.md)."""
    spec = dict(spec)
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ValueError(f"data source kind={kind!r}: choose from {KINDS}")
    unknown = sorted(set(spec) - SOURCE_KEYS[kind] - COMMON_KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} for a {kind!r} source; allowed: "
                         f"{sorted(SOURCE_KEYS[kind] | COMMON_KEYS)}")
    for key in {"jsonl": ["path"], "parquet": ["path"], "array_record": ["path"],
                "tfds": ["name"], "hf_disk": ["path"], "microworld": ["task"]}[kind]:
        if not spec.get(key):
            raise ValueError(f"a {kind!r} source needs {key!r}")
    if kind == "jsonl":
        src = JsonlSource(spec["path"])
    elif kind == "parquet":
        src = ParquetSource(spec["path"])
    elif kind == "array_record":
        src = ArrayRecordSource(spec["path"])
    elif kind == "tfds":
        src = TfdsSource(spec["name"], spec.get("split") or "train", spec.get("data_dir"))
    elif kind == "hf_disk":
        src = HfDiskSource(spec["path"], spec.get("split"))
    else:
        from hybrid_jax.data import microworld

        world = microworld.World(microworld.WorldConfig.from_dict(spec.get("world")))
        src = ListSource(world.task(spec["task"]))
    if len(src) == 0:
        raise ValueError(f"data source {spec} is empty")
    return src
