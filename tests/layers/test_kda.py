"""KDA / GDN mixer: transformers' PyTorch KimiLinearDeltaAttention as the oracle; decode = forward; segments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_jax.layers.kda import KDA, inverse_softplus
from tests.layers.helpers import randomize, rms_rel, run, run_cached, run_in_pieces

D, H, HD = 32, 2, 16


def make_layer(gate="channel", seed=0):
    layer = KDA(D, H, HD, gate=gate, output_gate_init="random", conv_init="random", chunk_size=8,
                backend="reference", init_std=0.2, rngs=nnx.Rngs(seed))
    randomize(layer, seed, scale=0.1, skip=("A_log", "dt_bias"))
    return layer


def torch_layer(layer):
    import torch
    from transformers import KimiLinearConfig
    from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearDeltaAttention

    cfg = KimiLinearConfig(hidden_size=D, linear_num_heads=H, linear_head_dim=HD, linear_conv_kernel_dim=4,
                           rms_norm_eps=1e-6, num_hidden_layers=1, layer_types=["linear_attention"],
                           mlp_layer_types=["dense"])
    tl = KimiLinearDeltaAttention(cfg, 0).float()
    t = lambda a: torch.tensor(np.asarray(a, np.float32))
    flat_in = lambda w: t(np.asarray(w[...]).reshape(w.shape[0], -1).T)  # [D, H, hd] -> [H*hd, D]
    conv = lambda c: np.asarray(c.weight[...]).reshape(4, H * HD).T  # [H*hd, 4]
    with torch.no_grad():
        tl.q_proj.weight.copy_(flat_in(layer.q_proj))
        tl.k_proj.weight.copy_(flat_in(layer.k_proj))
        tl.v_proj.weight.copy_(flat_in(layer.v_proj))
        tl.conv1d.weight.copy_(t(np.concatenate([conv(layer.q_conv), conv(layer.k_conv), conv(layer.v_conv)])[:, None]))
        tl.forget_gate.f_a_proj.weight.copy_(t(np.asarray(layer.f_down[...]).T))
        tl.forget_gate.f_b_proj.weight.copy_(flat_in(layer.f_up))
        tl.forget_gate.dt_bias.copy_(t(np.asarray(layer.dt_bias[...]).reshape(-1)))
        tl.forget_gate.A_log.copy_(t(np.asarray(layer.A_log[...]).reshape(1, 1, H, 1)))
        tl.b_proj.weight.copy_(t(np.asarray(layer.b_proj[...]).T))
        tl.g_a_proj.weight.copy_(t(np.asarray(layer.g_down[...]).T))
        tl.g_b_proj.weight.copy_(flat_in(layer.g_up))
        tl.o_norm.weight.copy_(t(layer.o_norm.weight[...]))
        tl.o_proj.weight.copy_(t(np.asarray(layer.o_proj[...]).reshape(H * HD, D).T))
    return tl


def test_matches_transformers_kimi_delta_attention():
    import torch

    layer = make_layer()
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 21, D), jnp.float32)
    seg = jnp.ones((2, 21), jnp.int32)
    y = run(layer, x, None, seg)
    with torch.no_grad():
        ref = torch_layer(layer)(torch.tensor(np.asarray(x))).numpy()
    assert rms_rel(y, ref) < 1e-5, rms_rel(y, ref)
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-4, rtol=1e-4)


def test_decode_equals_forward_with_packing_and_padding():
    layer = make_layer()
    T = 13
    x = jax.random.normal(jax.random.PRNGKey(2), (2, T, D), jnp.float32)
    # row 0: 3 pads then one document; row 1: two packed documents, the second starting at 7.
    seg = jnp.asarray([[0] * 3 + [1] * 10, [1] * 7 + [2] * 6], jnp.int32)
    full = run(layer, x, None, seg)
    cache = layer.init_cache(2, 32, jnp.float32)
    # prefill, multi-token continuation, decode
    got, cache = run_in_pieces(layer, x, None, seg, cache, [5, 4] + [1] * (T - 9))
    real = np.asarray(seg) != 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(full)[real], atol=1e-5, rtol=1e-5)
    assert int(cache["index"]) == T


@pytest.mark.parametrize("gate", ["channel", "scalar"])
def test_packed_documents_compute_what_they_compute_alone(gate):
    layer = make_layer(gate)
    # Row 0 packs two documents; row 1 holds the second one alone (left-padded).
    x = jax.random.normal(jax.random.PRNGKey(3), (1, 12, D), jnp.float32)
    x = jnp.concatenate([x, x], axis=0)
    seg = jnp.asarray([[1] * 5 + [2] * 7, [0] * 5 + [1] * 7], jnp.int32)
    y = np.asarray(run(layer, x, None, seg))
    np.testing.assert_allclose(y[0, 5:], y[1, 5:], atol=1e-5, rtol=1e-5)
    alone = np.asarray(run(layer, x[:1, :5], None, jnp.ones((1, 5), jnp.int32)))
    np.testing.assert_allclose(y[0, :5], alone[0], atol=1e-5, rtol=1e-5)


def test_gdn_gate_is_one_value_per_head():
    layer = make_layer("scalar")
    assert layer.mixer_kind == "gdn" and layer.dt_bias.shape == (H,)
    g = layer.log_decay(jax.random.normal(jax.random.PRNGKey(4), (1, 3, D)))
    assert g.shape == (1, 3, H, HD)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(jnp.broadcast_to(g[..., :1], g.shape)))
    assert float(g.max()) <= 0.0


def test_initialisation_ranges():
    layer = KDA(D, 4, HD, rngs=nnx.Rngs(0))
    A = np.exp(np.asarray(layer.A_log[...]))
    assert ((A >= 1) & (A <= 16)).all()
    dt = np.asarray(jax.nn.softplus(layer.dt_bias[...]))
    assert ((dt >= 1e-3 * 0.999) & (dt <= 1e-1 * 1.001)).all()
    np.testing.assert_allclose(np.asarray(jax.nn.softplus(inverse_softplus(jnp.asarray([1e-3, 0.05])))), [1e-3, 0.05],
                               rtol=1e-5)
    # output gate exactly 0.5, conv taps identity
    assert not np.asarray(layer.g_up[...]).any()
    w = np.asarray(layer.q_conv.weight[...])
    assert (w[-1] == 1).all() and not w[:-1].any()


def test_bad_arguments():
    with pytest.raises(ValueError, match="gate"):
        KDA(D, H, HD, gate="vector", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="A_init_range"):
        KDA(D, H, HD, A_init_range=(0.0, 1.0), rngs=nnx.Rngs(0))


def test_fused_conv_kernel_matches_the_jnp_convolutions():
    # fused_conv=True (one Pallas kernel for conv + silu + q/k L2 norm, interpret mode here)
    # computes the layer's output and parameter gradients as the jnp convolutions do, with
    # packed segments and GQA k/v heads (repeated after the kernel); the oracle layer is
    # transformers-checked above.
    def build(fused):
        layer = KDA(D, H, HD, output_gate_init="random", conv_init="random", conv_bias=True, chunk_size=32,
                    num_kv_heads=1, backend="interpret", fused_conv=fused, init_std=0.2,
                    rngs=nnx.Rngs(3))
        randomize(layer, 3, scale=0.1, skip=("A_log", "dt_bias"))
        return layer

    x = jax.random.normal(jax.random.PRNGKey(2), (2, 37, D), jnp.float32)
    seg = jnp.concatenate([jnp.ones((2, 20), jnp.int32), jnp.full((2, 17), 2, jnp.int32)], axis=1)

    def loss_and_grads(layer):
        graphdef, params = nnx.split(layer)

        def loss(p):
            y, _ = nnx.merge(graphdef, p)(x, positions=None, segment_ids=seg)
            return jnp.sum(y * jnp.cos(y)), y

        (_, y), g = jax.value_and_grad(loss, has_aux=True)(params)
        return y, g

    y1, g1 = loss_and_grads(build(True))
    y0, g0 = loss_and_grads(build(False))
    assert rms_rel(y1, y0) < 1e-5
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        assert rms_rel(a, b) < 1e-4


def test_fused_conv_serves_a_prefill_into_an_empty_cache():
    # fused_conv=True (interpret mode) prefills into a fresh cache through the kernel (a cond on
    # cache["index"] == 0): the same output and cache entries as the jnp convolutions, and
    # continuing from that cache (a multi-token piece, then single tokens) equals the full forward.
    def build(fused):
        layer = KDA(D, H, HD, output_gate_init="random", conv_init="random", conv_bias=True, chunk_size=32,
                    num_kv_heads=1, backend="interpret", fused_conv=fused, init_std=0.2, rngs=nnx.Rngs(5))
        randomize(layer, 5, scale=0.1, skip=("A_log", "dt_bias"))
        return layer

    T, P = 15, 9
    x = jax.random.normal(jax.random.PRNGKey(4), (2, T, D), jnp.float32)
    # row 0: 2 pads then one document; row 1: two packed documents, the second starting at 6.
    seg = jnp.asarray([[0] * 2 + [1] * 13, [1] * 6 + [2] * 9], jnp.int32)
    fused, plain = build(True), build(False)
    graphdef, params = nnx.split(fused)
    prefill = jax.make_jaxpr(lambda p, c: nnx.merge(graphdef, p)(x[:, :P], positions=None,
                                                                 segment_ids=seg[:, :P], cache=c))
    assert str(prefill(params, fused.init_cache(2, 32, jnp.float32))).count("name=kda_short_conv\n") == 3  # q, k, v

    y1, c1 = run_cached(fused, x[:, :P], None, seg[:, :P], fused.init_cache(2, 32, jnp.float32))
    y0, c0 = run_cached(plain, x[:, :P], None, seg[:, :P], plain.init_cache(2, 32, jnp.float32))
    real = np.asarray(seg) != 0
    assert rms_rel(np.asarray(y1)[real[:, :P]], np.asarray(y0)[real[:, :P]]) < 1e-5
    assert sorted(c1) == sorted(c0)
    for name in c0:
        np.testing.assert_allclose(np.asarray(c1[name]), np.asarray(c0[name]), rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    rest, c1 = run_in_pieces(fused, x[:, P:], None, seg[:, P:], c1, [3] + [1] * (T - P - 3))
    got = np.concatenate([np.asarray(y1), np.asarray(rest)], axis=1)
    full = np.asarray(run(plain, x, None, seg))
    assert rms_rel(got[real], full[real]) < 1e-5
    assert int(c1["index"]) == T
