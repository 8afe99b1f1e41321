import os

import jax
import pytest

# No test may reach the network: data sets and models are local files written by the tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Tests compare against float32/float64 oracles; keep matmuls in full precision on CPU.
jax.config.update("jax_default_matmul_precision", "highest")


def _has_accelerator() -> bool:
    return any(d.platform in ("gpu", "tpu") for d in jax.devices())


def pytest_collection_modifyitems(config, items):
    if _has_accelerator():
        return
    skip = pytest.mark.skip(reason="tests/gpu needs a GPU or TPU (run them on the device)")
    for item in items:
        if f"{os.sep}tests{os.sep}gpu{os.sep}" in str(item.fspath):
            item.add_marker(skip)
