"""Students on an accelerator: the Pallas kernels (backend="auto") inside real models.

Checks, per student (Hybrid-KDA, SWA with sinks, AllMem), float32: the forward with the
kernels equals the forward with the jnp reference backends, and prefill + decode equals the
forward (left-padded batch, T not a multiple of any block). Skipped without a GPU/TPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_jax.models.cache import init_cache
from hybrid_jax.models.hybrid import build_student
from hybrid_jax.models.qwen3 import Qwen3, Qwen3Config, default_positions
from tests.layers.helpers import rms_rel

pytestmark = pytest.mark.skipif(not any(d.platform in ("gpu", "tpu") for d in jax.devices()),
                                reason="needs a GPU or TPU")

CFG = Qwen3Config(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                  initializer_range=0.1, tie_word_embeddings=False)
T = 100


def students(backend):
    kda = {"backend": backend}
    mem = {"window": 16, "sinks": 4, "chunk_size": 16, "lr_init": 0.05, "swa_backend": backend,
           "memory_backend": "auto" if backend == "auto" else "reference"}
    return {
        "hybrid_kda": ("attention:0,2;kda:1,3", {"kda": kda}),
        "swa": ("swa:0-3", {"swa": {"window": 16, "sinks": 4, "backend": backend}}),
        "allmem": ("allmem:0-3", {"allmem": {**mem, "alpha_init": 0.5}}),
    }


@nnx.jit
def forward(model, ids, mask):
    return model(ids, mask)


@nnx.jit
def cached(model, ids, mask, pos, cache):
    out = model.forward(ids, mask, positions=pos, cache=cache)
    return out.logits, out.cache


@pytest.mark.parametrize("name", ["hybrid_kda", "swa", "allmem"])
def test_kernels_in_students(name):
    teacher = Qwen3(CFG, rngs=nnx.Rngs(0))
    spec, mc = students("auto")[name]
    student = build_student(teacher, spec, mc)
    ref_spec, ref_mc = students("reference")[name]
    reference = build_student(teacher, ref_spec, ref_mc)
    nnx.update(reference, nnx.state(student))
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, T), 0, CFG.vocab_size)
    mask = jnp.ones((2, T), jnp.int32).at[0, :7].set(0)
    real = np.asarray(mask) != 0
    full = np.asarray(forward(student, ids, mask))
    err = rms_rel(full[real], np.asarray(forward(reference, ids, mask))[real])
    assert err < 2e-3, f"{name}: kernels vs reference rms-rel {err}"
    pos = default_positions(mask)
    cache = init_cache(student, 2, T + 4)
    outs, t = [], 0
    for n in [70, 20] + [1] * (T - 90):
        logits, cache = cached(student, ids[:, t:t + n], mask[:, t:t + n], pos[:, t:t + n], cache)
        outs.append(np.asarray(logits))
        t += n
    err = rms_rel(np.concatenate(outs, axis=1)[real], full[real])
    assert err < 2e-3, f"{name}: decode vs forward rms-rel {err}"
