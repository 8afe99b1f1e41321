"""An independent PyTorch oracle of the seed paper's released `efficient_qwen` model (written here from the
released code's semantics, sharing nothing with hybrid_jax): transformers' Qwen3 for the attention layers, MLPs
and norms, and `RefEfficientKDA` (token-by-token KDA recurrence, float32 state) under the released key names.

    cfg = efficient_config(...)                        # the config.json EfficientQwenConfig would write
    model = reference_model(cfg, seed=0)               # torch; state_dict() keys follow the released layout
    logits = reference_logits(model, rows)             # each row run alone (no padding)
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

QWEN = dict(vocab_size=272, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0,
            tie_word_embeddings=False, attention_bias=False, initializer_range=0.3, hidden_act="silu",
            bos_token_id=256, eos_token_id=256, pad_token_id=256)


def efficient_config(layer_specs="attention:0,2;efficient_kda:1,3", **ssm_overrides):
    """config.json as transformers 4.54's EfficientQwenConfig.to_dict() writes it (Qwen3 + Mamba leftovers +
    EfficientQwen fields; its stored ssm_cfg is what the released model builds its KDA layers from)."""
    ssm = {"d_state": QWEN["head_dim"], "d_conv": 4, "n_q_heads": QWEN["num_attention_heads"],
           "n_k_heads": QWEN["num_key_value_heads"], "n_v_heads": QWEN["num_key_value_heads"], "expand_q": 1,
           "expand_k": 1, "expand_v": 1, "activation": "identity", "chunk_size": 128, "bias": False, "conv_bias": True,
           "rms_norm_eps": QWEN["rms_norm_eps"], "allow_neg_eigval": False, "use_qk_norm": False,
           "use_post_ssm_norm": False, "use_short_conv": True, "out_gate_activation": "sigmoid",
           "use_gqa_setup": True, "use_gva_setup": False, **ssm_overrides}
    return {
        **QWEN, "architectures": ["EfficientQwenForCausalLM"], "model_type": "efficient_qwen",
        "transformers_version": "4.54.1", "torch_dtype": "float32", "rope_scaling": None, "use_sliding_window": False,
        "sliding_window": None, "max_window_layers": 28, "attention_dropout": 0.0, "use_cache": True,
        # MambaConfig leftovers (EfficientQwenConfig inherits both parents)
        "state_size": 16, "expand": 2, "conv_kernel": 4, "use_bias": False, "use_conv_bias": True,
        "time_step_rank": 2, "residual_in_fp32": True, "layer_norm_epsilon": 1e-5,
        # EfficientQwen fields
        "mixer_type": "attention", "custom_mixer_layers": [], "ssm_cfg": ssm, "run_mlp_component": True,
        "layer_specs": layer_specs, "ssm_activation": None, "use_qk_norm": False,
        "use_post_ssm_norm": ssm["use_post_ssm_norm"], "do_discretization": False, "do_laurel": False,
        "laurel_rank": 16, "qk_head_dim": QWEN["head_dim"], "latent_head_dim": None, "num_query_heads": None,
        "num_key_heads": None, "num_value_heads": None, "num_latent_heads": None, "use_gqa_setup": True,
        "use_gva_setup": False, "d_state": None, "d_model": None, "expand_q": 1, "expand_k": 1, "expand_v": 1,
        "allow_neg_eigval": False, "out_gate_activation": "sigmoid", "use_short_conv": True,
    }


class RefEfficientKDA(nn.Module):
    """The released EfficientKDA's function for unpadded input (every token real, zero initial state)."""

    def __init__(self, d_model, ssm):
        super().__init__()
        H, KH, hd, K = ssm["n_q_heads"], ssm["n_k_heads"], ssm["d_state"], ssm["d_conv"]
        self.H, self.KH, self.hd = H, KH, hd
        self.activation = ssm["activation"]
        self.eps = ssm["rms_norm_eps"]
        self.q_proj = nn.Linear(d_model, H * hd, bias=False)
        self.k_proj = nn.Linear(d_model, KH * hd, bias=False)
        self.v_proj = nn.Linear(d_model, KH * hd, bias=False)
        conv = lambda c: nn.Conv1d(c, c, K, groups=c, padding=K - 1, bias=ssm["conv_bias"])
        self.q_conv1d, self.k_conv1d, self.v_conv1d = conv(H * hd), conv(KH * hd), conv(KH * hd)
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H * hd))
        self.f_proj = nn.Sequential(nn.Linear(d_model, hd, bias=False), nn.Linear(hd, H * hd, bias=False))
        self.b_proj = nn.Linear(d_model, H, bias=False)
        self.g_proj = nn.Sequential(nn.Linear(d_model, hd, bias=False), nn.Linear(hd, H * hd, bias=True))
        if ssm["use_post_ssm_norm"]:
            self.o_norm = nn.Module()
            self.o_norm.weight = nn.Parameter(torch.ones(hd))
        else:
            self.o_norm = None
        self.out_proj = nn.Linear(H * hd, d_model, bias=False)

    def _conv(self, conv, z):  # [B, T, C] causal depthwise conv (tap K-1 = current token), then the activation
        y = conv(z.transpose(1, 2))[..., : z.shape[1]].transpose(1, 2)
        return F.silu(y) if self.activation in ("silu", "swish") else y

    def forward(self, x):
        B, T, _ = x.shape
        H, hd, rep = self.H, self.hd, self.H // self.KH
        q = self._conv(self.q_conv1d, self.q_proj(x)).view(B, T, H, hd)
        k = self._conv(self.k_conv1d, self.k_proj(x)).view(B, T, self.KH, hd).repeat_interleave(rep, dim=2)
        v = self._conv(self.v_conv1d, self.v_proj(x)).view(B, T, self.KH, hd).repeat_interleave(rep, dim=2)
        g = -self.A_log.float().exp()[:, None] * F.softplus(self.f_proj(x).view(B, T, H, hd).float()
                                                            + self.dt_bias.view(H, hd).float())
        beta = torch.sigmoid(self.b_proj(x).float())
        q = q.float() * torch.rsqrt((q.float() ** 2).sum(-1, keepdim=True) + 1e-6) * hd**-0.5
        k = k.float() * torch.rsqrt((k.float() ** 2).sum(-1, keepdim=True) + 1e-6)
        v = v.float()
        S = x.new_zeros(B, H, hd, hd, dtype=torch.float32)
        out = []
        for t in range(T):  # S <- diag(exp g) S;  S <- S + beta k (v - S^T k)^T;  o = S^T q
            S = S * g[:, t].exp()[..., None]
            delta = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, t]))
            S = S + k[:, t, :, :, None] * delta[:, :, None, :]
            out.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
        o = torch.stack(out, dim=1)
        if self.o_norm is not None:
            o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps) * self.o_norm.weight.float()
        o = o * torch.sigmoid(self.g_proj(x).view(B, T, H, hd).float())
        return self.out_proj(o.reshape(B, T, H * hd).to(x.dtype))


class MixerSlot(nn.Module):
    """Where the released EfficientSequenceMixer sits in a decoder layer (`self_attn.mixer.*` keys)."""

    def __init__(self, mixer):
        super().__init__()
        self.mixer = mixer

    def forward(self, hidden_states, **kwargs):
        return self.mixer(hidden_states), None


def reference_model(cfg, seed=0):
    """transformers' Qwen3ForCausalLM with `self_attn` of each efficient_kda layer swapped for the reference KDA,
    every parameter random (A_log, dt_bias in their usual ranges; biases and norm weights non-trivial)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    qwen = {k: cfg[k] for k in QWEN}
    model = Qwen3ForCausalLM(Qwen3Config(**qwen, rope_parameters={"rope_type": "default",
                                                                   "rope_theta": cfg["rope_theta"]}))
    kda_layers = []
    for group in cfg["layer_specs"].split(";"):
        name, _, idx = group.partition(":")
        if name.strip() == "efficient_kda":
            kda_layers += [int(i) for i in idx.split(",")]
    for i in kda_layers:
        model.model.layers[i].self_attn = MixerSlot(RefEfficientKDA(cfg["hidden_size"], cfg["ssm_cfg"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(1, 16, generator=g).log())
            elif name.endswith("dt_bias"):
                dt = torch.exp(torch.empty(p.shape).uniform_(math.log(1e-3), math.log(1e-1), generator=g))
                p.copy_(dt + torch.log(-torch.expm1(-dt)))
            elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.float().eval()


def state_dict_of(model, cfg):
    """The tensors a released checkpoint holds (lm_head dropped when tied, as transformers' save does)."""
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    if cfg["tie_word_embeddings"]:
        sd.pop("lm_head.weight")
    return sd


def reference_logits(model, rows) -> list[np.ndarray]:
    """Float32 logits of each token row run alone (positions 0..n-1)."""
    with torch.no_grad():
        return [model(torch.tensor([r], dtype=torch.long), use_cache=False).logits[0].numpy() for r in rows]
