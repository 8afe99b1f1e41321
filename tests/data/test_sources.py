"""Every source format gives identical examples for the same data; bad inputs fail clearly."""

import json
import sys

import grain
import pytest

from hybrid_jax.data import microworld, sources

TASKS = ("instruct", "mc", "open", "corpus", "mqar", "passkey")


@pytest.fixture(scope="module")
def tfds_builders():
    pytest.importorskip("tensorflow_datasets")
    from hybrid_jax.data import tfds_builders

    return tfds_builders


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory, tfds_builders):
    d = tmp_path_factory.mktemp("tfds")
    for task in TASKS:
        tfds_builders.prepare(f"microworld/{task}", str(d))
    return str(d)


@pytest.mark.parametrize("task", TASKS)
def test_tfds_microworld_through_grain_equals_generator(tfds_builders, tfds_dir, task):
    src = sources.open_source({"kind": "tfds", "name": f"microworld/{task}",
                               "split": tfds_builders.task_split(task), "data_dir": tfds_dir})
    ds = grain.MapDataset.source(src)
    expected = tfds_builders.task_records(task, microworld.WorldConfig())
    assert len(ds) == len(expected)
    assert [ds[i] for i in range(len(ds))] == expected


def _write_all_formats(records, tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    ar = tmp_path / "d.array_record"
    sources.write_array_record(str(ar), records)
    specs = [{"kind": "jsonl", "path": str(jsonl)}, {"kind": "array_record", "path": str(ar)}]
    import datasets  # the dev extras install pyarrow and datasets: every format is checked
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet", row_group_size=7)
    specs.append({"kind": "parquet", "path": str(tmp_path / "d.parquet")})
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "hf"))
    specs.append({"kind": "hf_disk", "path": str(tmp_path / "hf")})
    return specs


@pytest.mark.parametrize("task", ["instruct", "mc"])
def test_every_source_gives_identical_examples(tmp_path_factory, tmp_path, task):
    records = microworld.World().task(task)
    specs = _write_all_formats(records, tmp_path) + [{"kind": "microworld", "task": task}]
    from hybrid_jax.data import tfds_builders

    specs.append({"kind": "tfds", "name": f"microworld/{task}", "data_dir": str(tmp_path_factory.mktemp("tfds")),
                  "split": tfds_builders.task_split(task)})
    assert {s["kind"] for s in specs} == {"jsonl", "array_record", "parquet", "hf_disk", "microworld", "tfds"}
    for spec in specs:
        src = sources.open_source(spec)
        assert [src[i] for i in range(len(src))] == records, spec["kind"]


def test_missing_file(tmp_path):
    for kind in ("jsonl", "parquet", "array_record"):
        with pytest.raises(FileNotFoundError, match="nope.data"):
            sources.open_source({"kind": kind, "path": str(tmp_path / "nope.data")})
    with pytest.raises(FileNotFoundError, match="no file matches"):
        sources.open_source({"kind": "jsonl", "path": str(tmp_path / "*.jsonl")})


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": oops}\n')
    src = sources.open_source({"kind": "jsonl", "path": str(p)})
    assert len(src) == 3 and src[1] == {"text": "b"}
    with pytest.raises(ValueError, match=rf"{p}:4: malformed JSON"):
        src[2]
    p.write_text('[1, 2]\n')
    with pytest.raises(ValueError, match=rf"{p}:1: expected a JSON object"):
        sources.open_source({"kind": "jsonl", "path": str(p)})[0]


def test_bad_source_specs(tmp_path):
    with pytest.raises(ValueError, match="kind='csv'.*choose from"):
        sources.open_source({"kind": "csv", "path": "x"})
    with pytest.raises(ValueError, match="unknown key.*'paht'"):
        sources.open_source({"kind": "jsonl", "paht": "x"})
    with pytest.raises(ValueError, match="needs 'path'"):
        sources.open_source({"kind": "jsonl"})
    with pytest.raises(ValueError, match="unknown micro-world task"):
        sources.open_source({"kind": "microworld", "task": "nope"})
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        sources.open_source({"kind": "jsonl", "path": str(tmp_path / "empty.jsonl")})



def test_unknown_tfds_data_set(tfds_builders, tmp_path):
    with pytest.raises(FileNotFoundError, match="could not be opened"):
        sources.open_source({"kind": "tfds", "name": "no_such_dataset_xyz",
                             "data_dir": str(tmp_path)})


def test_missing_optional_package_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match="'tensorflow-datasets' package"):
        sources.open_source({"kind": "tfds", "name": "microworld/open"})
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(ImportError, match="'pyarrow' package"):
        sources.open_source({"kind": "parquet", "path": str(tmp_path / "x.parquet")})
