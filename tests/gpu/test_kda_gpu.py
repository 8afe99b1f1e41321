"""KDA Pallas kernel on the accelerator: bf16 inputs vs the fp32 jnp oracle (T=4096, K=V=128)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location(
    "kda_accuracy", Path(__file__).resolve().parents[2] / "scripts" / "kda_accuracy.py")
kda_accuracy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kda_accuracy)


@pytest.mark.parametrize("chunk_size,segments,diagonal", [
    (64, False, "levels"), (64, True, "levels"), (32, False, "levels"), (64, True, "loop")])
def test_bf16_kernel_matches_fp32_oracle(chunk_size, segments, diagonal):
    # Output, final state and the gradients of q, k, v, g, beta and the initial state.
    errs = kda_accuracy.errors(dict(diagonal=diagonal), chunk_size=chunk_size, segments=segments,
                               seed=chunk_size + segments)
    print(errs)
    assert all(np.isfinite(e) for e in errs.values()), errs
    assert all(e <= 5e-3 for e in errs.values()), errs
