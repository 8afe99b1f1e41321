"""Every bad checkpoint raises one clear error naming the file or key and what was expected."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import hybrid_jax as hj
from hybrid_jax.convert.hf_import import CheckpointError
from tests.fixtures import write_tiny_checkpoint


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("good"), tokenizer=False, num_hidden_layers=1)


@pytest.fixture
def ckpt(good, tmp_path):
    return shutil.copytree(good, tmp_path / "ckpt")


def _edit_tensors(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory .*nowhere"):
        hj.load_pretrained(tmp_path / "nowhere")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing .*config.json"):
        hj.load_pretrained(ckpt)


def test_missing_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        hj.load_pretrained(ckpt)


def test_missing_shard(ckpt):
    keys = list(load_file(ckpt / "model.safetensors"))
    index = {"weight_map": {k: "model-00002-of-00002.safetensors" for k in keys}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="shard .*model-00002-of-00002.safetensors listed in "
                                                "model.safetensors.index.json .* is missing"):
        hj.load_pretrained(ckpt)


def test_unknown_model_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match=r"model_type 'gpt2'; supported model types: \[.*'qwen3'"):
        hj.load_pretrained(ckpt)


def test_missing_key(ckpt):
    _edit_tensors(ckpt, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys .*\(1\), e.g. \['model.layers.0.mlp.up_proj.weight'\]"):
        hj.load_pretrained(ckpt)


def test_unexpected_key(ckpt):
    _edit_tensors(ckpt, lambda t: t.update({"model.layers.7.mlp.up_proj.weight": np.zeros((2, 2), np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys .*\['model.layers.7.mlp.up_proj.weight'\] in "
                                              "model.safetensors"):
        hj.load_pretrained(ckpt)


def test_shape_mismatch(ckpt):
    _edit_tensors(ckpt, lambda t: t.update({"model.norm.weight": np.ones((63,), np.float32)}))
    with pytest.raises(CheckpointError, match=r"model.norm.weight in model.safetensors has shape \(63,\), "
                                              r"expected \(64,\)"):
        hj.load_pretrained(ckpt)


def test_dtype_mismatch(ckpt):
    _edit_tensors(ckpt, lambda t: t.update({"model.norm.weight": np.ones((64,), np.int32)}))
    with pytest.raises(CheckpointError, match="model.norm.weight in model.safetensors has dtype I32, expected a "
                                              "floating point tensor"):
        hj.load_pretrained(ckpt)


def test_corrupt_safetensors(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + data[100:])
    with pytest.raises(CheckpointError, match="cannot read safetensors file .*model.safetensors: corrupt"):
        hj.load_pretrained(ckpt)


def test_truncated_safetensors(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        hj.load_pretrained(ckpt)
