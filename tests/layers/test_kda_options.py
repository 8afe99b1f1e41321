"""KDA options of the seed paper's released EfficientKDA (conv activation, conv / output-gate biases, GQA, optional
output norm) against an independent PyTorch oracle; with them decode = prefill and packed = alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from hybrid_jax.layers.kda import KDA
from tests.convert.efficient_qwen_reference import RefEfficientKDA
from tests.layers.helpers import randomize, rms_rel, run, run_in_pieces

D, H, HD, K = 32, 4, 8, 4
OPTIONS = {
    # the released layer's defaults: identity activation, conv + gate biases, 2 k/v heads, no output norm
    "released": dict(num_kv_heads=2, conv_activation="identity", conv_bias=True, output_gate_bias=True,
                     output_norm=False),
    # the other settings (one k/v head for all query heads); no-GQA / no-bias: tests/convert/test_efficient_qwen.py
    "silu_norm_gqa1": dict(num_kv_heads=1, conv_activation="silu", conv_bias=True, output_gate_bias=True,
                           output_norm=True),
}
T = 13  # one sequence length for every test: each layer structure compiles once


def make_layer(options, seed=0):
    layer = KDA(D, H, HD, conv_size=K, conv_init="random", output_gate_init="random", chunk_size=8,
                backend="reference", init_std=0.2, rngs=nnx.Rngs(seed), **options)
    randomize(layer, seed, scale=0.1, skip=("A_log", "dt_bias"))  # biases start at zero: make them non-trivial
    return layer


def torch_layer(layer, options):
    """The oracle with the layer's weights (copied here by hand, not through hybrid_jax.convert)."""
    KH = options["num_kv_heads"] or H
    ssm = {"n_q_heads": H, "n_k_heads": KH, "n_v_heads": KH, "d_state": HD, "d_conv": K,
           "activation": options["conv_activation"], "conv_bias": options["conv_bias"],
           "use_post_ssm_norm": options["output_norm"], "rms_norm_eps": 1e-6}
    ref = RefEfficientKDA(D, ssm)
    a = lambda w: torch.tensor(np.asarray(w[...], np.float32))
    linear_in = lambda w: a(w).reshape(w.shape[0], -1).T  # [D, heads, hd] -> [heads*hd, D]
    with torch.no_grad():
        for n in "qkv":
            getattr(ref, f"{n}_proj").weight.copy_(linear_in(getattr(layer, f"{n}_proj")))
            conv = getattr(ref, f"{n}_conv1d")
            conv.weight.copy_(a(getattr(layer, f"{n}_conv").weight).reshape(K, -1).T[:, None, :])
            if options["conv_bias"]:
                conv.bias.copy_(a(getattr(layer, f"{n}_conv_bias")).reshape(-1))
        ref.A_log.copy_(a(layer.A_log))
        ref.dt_bias.copy_(a(layer.dt_bias).reshape(-1))
        ref.f_proj[0].weight.copy_(a(layer.f_down).T)
        ref.f_proj[1].weight.copy_(linear_in(layer.f_up))
        ref.b_proj.weight.copy_(a(layer.b_proj).T)
        ref.g_proj[0].weight.copy_(a(layer.g_down).T)
        ref.g_proj[1].weight.copy_(linear_in(layer.g_up))
        ref.g_proj[1].bias.copy_(a(layer.g_bias).reshape(-1) if options["output_gate_bias"] else torch.zeros(H * HD))
        if options["output_norm"]:
            ref.o_norm.weight.copy_(a(layer.o_norm.weight))
        ref.out_proj.weight.copy_(a(layer.o_proj).reshape(H * HD, D).T)
    return ref


@pytest.mark.parametrize("name", list(OPTIONS))
def test_matches_the_released_layer(name):
    layer = make_layer(OPTIONS[name])
    assert (layer.k_proj.shape[1], layer.k_conv.weight.shape[1]) == (OPTIONS[name]["num_kv_heads"],) * 2
    x = jax.random.normal(jax.random.PRNGKey(1), (2, T, D), jnp.float32)
    y = run(layer, x, None, jnp.ones((2, T), jnp.int32))
    with torch.no_grad():
        ref = torch_layer(layer, OPTIONS[name])(torch.tensor(np.asarray(x))).numpy()
    print(f"{name}: RMS-relative error {rms_rel(y, ref):.2e}")
    assert rms_rel(y, ref) < 1e-5
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-4, rtol=1e-4)


def test_the_oracle_sees_each_option():
    """Guards the comparison above: an oracle built with any one option flipped disagrees far beyond tolerance."""
    options = OPTIONS["released"]
    layer = make_layer(options)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, T, D), jnp.float32)
    y = run(layer, x, None, jnp.ones((2, T), jnp.int32))
    for key, value in (("conv_activation", "silu"), ("conv_bias", False), ("output_gate_bias", False)):
        with torch.no_grad():
            ref = torch_layer(layer, {**options, key: value})(torch.tensor(np.asarray(x))).numpy()
        assert rms_rel(y, ref) > 1e-2, key


@pytest.mark.parametrize("name", ["released", "silu_norm_gqa1"])
def test_decode_equals_forward_with_packing_and_padding(name):
    layer = make_layer(OPTIONS[name])
    x = jax.random.normal(jax.random.PRNGKey(2), (2, T, D), jnp.float32)
    # row 0: 3 pads then one document; row 1: two packed documents, the second starting at 7.
    seg = jnp.asarray([[0] * 3 + [1] * 10, [1] * 7 + [2] * 6], jnp.int32)
    full = run(layer, x, None, seg)
    cache = layer.init_cache(2, 32, jnp.float32)
    assert cache["k_conv"].shape == (2, K - 1, OPTIONS[name]["num_kv_heads"], HD)
    # prefill, multi-token continuation, decode
    got, cache = run_in_pieces(layer, x, None, seg, cache, [5, 4] + [1] * (T - 9))
    real = np.asarray(seg) != 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(full)[real], atol=1e-5, rtol=1e-5)


def test_packed_and_padded_documents_compute_what_they_compute_alone():
    """Conv biases make padding tokens' k/v non-zero: the state reset at each document start still hides them."""
    layer = make_layer(OPTIONS["released"])
    x = jax.random.normal(jax.random.PRNGKey(3), (1, T, D), jnp.float32)
    x = jnp.concatenate([x, x], axis=0)
    seg = jnp.asarray([[1] * 5 + [2] * 8, [0] * 5 + [1] * 8], jnp.int32)
    y = np.asarray(run(layer, x, None, seg))
    np.testing.assert_allclose(y[0, 5:], y[1, 5:], atol=1e-5, rtol=1e-5)
    # the second document alone, at the start of an unpadded row
    alone = np.asarray(run(layer, jnp.roll(x, -5, axis=1), None, jnp.ones((2, T), jnp.int32)))
    np.testing.assert_allclose(y[1, 5:], alone[0, :8], atol=1e-5, rtol=1e-5)


def test_bad_options():
    with pytest.raises(ValueError, match=r"num_kv_heads=3 must be a positive divisor of num_heads=4"):
        KDA(D, H, HD, num_kv_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"conv_activation='gelu'"):
        KDA(D, H, HD, conv_activation="gelu", rngs=nnx.Rngs(0))
