"""PyTorch model of hybrid Qwen3 students exported by hybrid_jax (model_type "hybrid_qwen3").

    model = AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)
    out = model.generate(**tokenizer(prompts, return_tensors="pt", padding=True), max_new_tokens=32)

Each layer is `x + mixer(input_layernorm(x))`, then `x + mlp(post_attention_layernorm(x))`, with the
mixer named per layer by `config.mixer_types`:

    attention  transformers' Qwen3Attention parameters, causal softmax attention
    swa        the same parameters; query t sees the last `window` tokens of its sequence and the
               sequence's first `sinks` tokens
    kda        Kimi Delta Attention: S_t = (I - b k k^T) Diag(exp g_t) S_{t-1} + b k v^T, o_t = S_t^T q_t
               (chunked form for prompts, recurrent form for single-token decoding; fla's kernels on CUDA
               when `fla` is installed)
    gdn        KDA with one decay per head
    allmem     swa(x) + alpha * memory(x): a test-time-training memory (residual SwiGLU fast weights
               updated every `chunk_size` tokens by gradient descent with momentum and decay)

Attention masks must hold one contiguous run of ones per row (left padding, as `generate` uses, or
right padding). Padding tokens are skipped by the recurrent mixers (their state passes through
unchanged), so a left-padded prompt computes what the unpadded prompt computes. Positions default
to the index of each token among the row's real tokens. `HybridCache` keeps each layer's decode state:
keys/values for attention, a `window`-token ring plus sink slots for swa, the K x V state and the
convolution tails for kda/gdn, the fast weights for allmem.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3Attention,
    Qwen3MLP,
    Qwen3RMSNorm,
    Qwen3RotaryEmbedding,
    apply_rotary_pos_emb,
)

from .configuration_hybrid_qwen3 import HybridQwen3Config

try:  # fla's Triton kernels, used for KDA on CUDA when installed
    from fla.ops.kda import chunk_kda as _fla_chunk_kda
    from fla.ops.kda import fused_recurrent_kda as _fla_recurrent_kda
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _fla_chunk_kda = _fla_recurrent_kda = None

L2NORM_EPS = 1e-6
TTT_EPS = 1e-6


def _l2norm(x):
    x = x.float()
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2NORM_EPS)


# ------------------------------------------------------------------------------------------ cache


class HybridCache(Cache):
    """Per-layer decode state of a hybrid model, plus the attention mask of every token seen so far.

    `states[i]` is a dict of tensors owned by layer i's mixer. All rows advance together (prompts
    are left-padded), so `seen` is one number.
    """

    def __init__(self, num_layers: int):
        # Cache's own constructor (its per-layer key/value API) differs between transformers versions;
        # generate only needs the methods below.
        if isinstance(self, nn.Module):
            nn.Module.__init__(self)
        self.states = [None] * num_layers
        self.seen = 0
        self.mask = None  # [B, seen] bool
        self.layers = []

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_max_cache_shape(self, layer_idx: int = 0):
        return None

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_linear(self):
        return [False] * len(self.states)

    def __len__(self):
        return len(self.states)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        """Keep / reorder batch rows (beam search, expanded prompts)."""
        self.mask = self.mask.index_select(0, beam_idx.to(self.mask.device))
        self.states = [_select_rows(st, beam_idx) for st in self.states]

    def batch_repeat_interleave(self, repeats: int):
        self.reorder_cache(torch.arange(self.mask.shape[0], device=self.mask.device).repeat_interleave(repeats))


def _select_rows(obj, index, key=None):
    if obj is None or key == "ring_cols":  # ring_cols is per column, shared by the rows
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.index_select(0, index.to(obj.device))
    if isinstance(obj, dict):
        return {k: _select_rows(v, index, k) for k, v in obj.items()}
    if key == "count":  # python ints, one per row
        return [obj[i] for i in index.tolist()]
    return [_select_rows(v, index) for v in obj]


@dataclass
class _Context:
    """What every mixer needs about the tokens of this call."""

    mask: torch.Tensor  # [B, T] bool, real tokens of this call
    cols: torch.Tensor  # [T] long, column of each new token in the row (seen + t)
    doc: torch.Tensor  # [B, T] long, index of each token among its row's real tokens
    all_mask: torch.Tensor  # [B, seen + T] bool
    all_doc: torch.Tensor  # [B, seen + T] long
    seen: int
    cache: HybridCache | None


# -------------------------------------------------------------------------------------- attention


def _attend(q, k, v, visible, scale):
    """q [B,H,T,d], k/v [B,KH,S,d], visible [B,T,S] bool -> [B,T,H*d]; float32 softmax, no-key rows give 0."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1).float()
    v = v.repeat_interleave(groups, dim=1).float()
    s = torch.matmul(q.float(), k.transpose(-1, -2)) * scale
    vis = visible[:, None]
    s = s.masked_fill(~vis, torch.finfo(torch.float32).min)
    p = torch.softmax(s, dim=-1) * vis
    o = torch.matmul(p, v)
    b, h, t, d = o.shape
    return o.transpose(1, 2).reshape(b, t, h * d).to(q.dtype)


def attention_mixer(attn: Qwen3Attention, x, cos, sin, ctx: _Context, state, window=None, sinks=0):
    """Qwen3 attention (window=None) or sliding-window attention with sinks; returns (y, new state)."""
    b, t, _ = x.shape
    hd = attn.head_dim
    q = attn.q_norm(attn.q_proj(x).view(b, t, -1, hd)).transpose(1, 2)
    k = attn.k_norm(attn.k_proj(x).view(b, t, -1, hd)).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, -1, hd).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    qcol = ctx.cols[None, :, None]  # [1,T,1]

    def new_keys_visible(kcols, kmask, kdoc):  # keys under the full rule: causal, real, window or sink
        dist = qcol - kcols[None, None, :]
        vis = (dist >= 0) & kmask[:, None, :]
        if window is not None:
            vis = vis & ((dist < window) | (kdoc[:, None, :] < sinks))
        return vis

    if window is None:
        ks = k if state is None else torch.cat([state["k"], k], dim=2)
        vs = v if state is None else torch.cat([state["v"], v], dim=2)
        cols = torch.arange(ks.shape[2], device=x.device)
        o = _attend(q, ks, vs, new_keys_visible(cols, ctx.all_mask, ctx.all_doc), attn.scaling)
        new_state = None if ctx.cache is None else {"k": ks, "v": vs}
        return attn.o_proj(o), new_state

    # Sliding window: [sink slots | ring of the last `window` columns | new tokens].
    parts_k, parts_v, parts_vis = [], [], []
    if state is not None:
        if sinks:  # a sink slot counts only beyond the window (inside it the token is in the ring)
            dist = qcol - state["sink_cols"][:, None, :]
            parts_vis.append(state["sink_ok"][:, None, :] & (dist >= window))
            parts_k.append(state["sink_k"])
            parts_v.append(state["sink_v"])
        dist = qcol - state["ring_cols"][None, None, :]
        parts_vis.append(state["ring_ok"][:, None, :] & (dist >= 0) & (dist < window))
        parts_k.append(state["ring_k"])
        parts_v.append(state["ring_v"])
    parts_vis.append(new_keys_visible(ctx.cols, ctx.mask, ctx.doc))
    parts_k.append(k)
    parts_v.append(v)
    o = _attend(q, torch.cat(parts_k, 2), torch.cat(parts_v, 2), torch.cat(parts_vis, 2), attn.scaling)
    new_state = None if ctx.cache is None else _swa_write(state, k, v, ctx, window, sinks)
    return attn.o_proj(o), new_state


def _swa_write(state, k, v, ctx: _Context, window, sinks):
    b, kh, t, hd = k.shape
    if state is None:
        state = {
            "ring_k": k[:, :, :0], "ring_v": v[:, :, :0], "ring_ok": ctx.mask[:, :0],
            "ring_cols": ctx.cols[:0],
            "sink_k": k.new_zeros(b, kh, sinks, hd), "sink_v": v.new_zeros(b, kh, sinks, hd),
            "sink_ok": torch.zeros(b, sinks, dtype=torch.bool, device=k.device),
            "sink_cols": torch.zeros(b, sinks, dtype=torch.long, device=k.device),
        }
    new = {
        "ring_k": torch.cat([state["ring_k"], k], 2)[:, :, -window:],
        "ring_v": torch.cat([state["ring_v"], v], 2)[:, :, -window:],
        "ring_ok": torch.cat([state["ring_ok"], ctx.mask], 1)[:, -window:],
        "ring_cols": torch.cat([state["ring_cols"], ctx.cols])[-window:],
    }
    sink_k, sink_v = state["sink_k"].clone(), state["sink_v"].clone()
    sink_ok, sink_cols = state["sink_ok"].clone(), state["sink_cols"].clone()
    rows = torch.arange(b, device=k.device)
    for j in range(sinks):  # the row's j-th real token, if it arrived in this call
        hit = ctx.mask & (ctx.doc == j)  # [B, T], at most one per row
        got = hit.any(1)
        at = hit.long().argmax(1)
        sink_k[:, :, j] = torch.where(got[:, None, None], k[rows, :, at], sink_k[:, :, j])
        sink_v[:, :, j] = torch.where(got[:, None, None], v[rows, :, at], sink_v[:, :, j])
        sink_cols[:, j] = torch.where(got, ctx.cols[at], sink_cols[:, j])
        sink_ok[:, j] = sink_ok[:, j] | got
    new.update(sink_k=sink_k, sink_v=sink_v, sink_ok=sink_ok, sink_cols=sink_cols)
    return new


# -------------------------------------------------------------------------------------------- KDA


def recurrent_kda(q, k, v, g, beta, state):
    """Token by token. q (normalised, scaled), k [B,T,H,K]; v [B,T,H,V]; g [B,T,H,K]; beta [B,T,H]; state [B,H,K,V]."""
    out = []
    for t in range(q.shape[1]):
        state = state * g[:, t].exp()[..., None]
        kv = torch.einsum("bhk,bhkv->bhv", k[:, t], state)
        state = state + torch.einsum("bhk,bhv->bhkv", k[:, t], beta[:, t, :, None] * (v[:, t] - kv))
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    return torch.stack(out, 1), state


def chunk_kda(q, k, v, g, beta, state, chunk_size=64):
    """Chunkwise-parallel KDA (UT transform inside each chunk, float32 state between chunks); same contract."""
    b, t, h, dk = q.shape
    c = chunk_size
    pad = (-t) % c
    n = (t + pad) // c

    def chunks(x):  # [B,T,H,...] -> [B,H,N,C,...]; zero padding tokens leave the state unchanged
        x = x.transpose(1, 2)
        x = F.pad(x, [0, 0] * (x.ndim - 3) + [0, pad])
        return x.reshape(b, h, n, c, *x.shape[3:])

    qc, kc, vc, gc, bc = (chunks(x) for x in (q, k, v, g, beta))
    idx = torch.arange(c, device=q.device)
    causal = idx[:, None] >= idx[None, :]
    strict = idx[:, None] > idx[None, :]
    eye = torch.eye(c, device=q.device, dtype=q.dtype)
    out = []
    for i in range(n):
        qi, ki, vi, bi = qc[:, :, i], kc[:, :, i], vc[:, :, i], bc[:, :, i]
        cum = gc[:, :, i].cumsum(-2)  # [B,H,C,K]
        diff = cum[..., :, None, :] - cum[..., None, :, :]  # [B,H,C,C,K]
        decay = diff.masked_fill(~causal[..., None], float("-inf")).exp()  # masked before exp: exponents <= 0
        a = torch.einsum("bhtk,bhjk,bhtjk->bhtj", ki, ki, decay) * strict
        p = torch.einsum("bhtk,bhjk,bhtjk->bhtj", qi, ki, decay)
        tm = torch.linalg.solve_triangular(eye + bi[..., :, None] * a, torch.diag_embed(bi), upper=False,
                                           unitriangular=True)
        gam = cum.exp()
        u = tm @ vi - (tm @ (ki * gam)) @ state
        out.append((qi * gam) @ state + p @ u)
        kdec = ki * (cum[..., -1:, :] - cum).exp()
        state = gam[..., -1, :, None] * state + kdec.transpose(-1, -2) @ u
    o = torch.stack(out, 2).reshape(b, h, n * c, -1)[:, :, :t]
    return o.transpose(1, 2), state


class KimiDeltaAttention(nn.Module):
    """KDA (gate="channel") or GDN (gate="scalar") mixer with q/k/v short convolutions and a gated output norm."""

    def __init__(self, config, hparams, gate="channel"):
        super().__init__()
        h, hd, d = config.num_attention_heads, config.head_dim, config.hidden_size
        self.num_heads, self.head_dim, self.gate = h, hd, gate
        self.conv_size = int(hparams.get("conv_size", 4))
        self.chunk_size = min(int(hparams.get("chunk_size", 64)), 64)
        self.q_proj = nn.Linear(d, h * hd, bias=False)
        self.k_proj = nn.Linear(d, h * hd, bias=False)
        self.v_proj = nn.Linear(d, h * hd, bias=False)
        for name in ("q_conv1d", "k_conv1d", "v_conv1d"):
            setattr(self, name, nn.Conv1d(h * hd, h * hd, self.conv_size, groups=h * hd, bias=False))
        if gate == "channel":
            self.f_a_proj = nn.Linear(d, hd, bias=False)
            self.f_b_proj = nn.Linear(hd, h * hd, bias=False)
            self.dt_bias = nn.Parameter(torch.zeros(h * hd))
        else:
            self.f_proj = nn.Linear(d, h, bias=False)
            self.dt_bias = nn.Parameter(torch.zeros(h))
        self.A_log = nn.Parameter(torch.zeros(h))
        self.b_proj = nn.Linear(d, h, bias=False)
        self.g_a_proj = nn.Linear(d, hd, bias=False)
        self.g_b_proj = nn.Linear(hd, h * hd, bias=False)
        self.o_norm = Qwen3RMSNorm(hd, eps=config.rms_norm_eps)
        self.o_proj = nn.Linear(h * hd, d, bias=False)

    def _conv(self, conv, x, tail):
        """Causal depthwise conv of x [B,T,C] after the previous K-1 inputs `tail` [B,C,K-1]; silu."""
        xs = torch.cat([tail, x.transpose(1, 2)], dim=-1)
        y = F.conv1d(xs.float(), conv.weight.float(), groups=xs.shape[1]).to(x.dtype)
        return F.silu(y).transpose(1, 2), xs[..., xs.shape[-1] - (self.conv_size - 1):]

    def forward(self, x, ctx: _Context, state):
        b, t, _ = x.shape
        h, hd = self.num_heads, self.head_dim
        m = ctx.mask[..., None].to(x.dtype)
        x = x * m  # padding contributes nothing to the convolutions ...
        if state is None:
            zero = x.new_zeros(b, h * hd, self.conv_size - 1)
            state = {"q_conv": zero, "k_conv": zero, "v_conv": zero,
                     "state": x.new_zeros(b, h, hd, hd, dtype=torch.float32)}
        q, q_tail = self._conv(self.q_conv1d, self.q_proj(x), state["q_conv"])
        k, k_tail = self._conv(self.k_conv1d, self.k_proj(x), state["k_conv"])
        v, v_tail = self._conv(self.v_conv1d, self.v_proj(x), state["v_conv"])
        q = _l2norm(q.view(b, t, h, hd)) * hd**-0.5
        k = _l2norm(k.view(b, t, h, hd))
        v = v.view(b, t, h, hd).float()
        a = -self.A_log.float().exp()[:, None]
        if self.gate == "channel":
            raw = self.f_b_proj(self.f_a_proj(x)).view(b, t, h, hd).float()
            g = a * F.softplus(raw + self.dt_bias.float().view(h, hd))
        else:
            raw = self.f_proj(x).float()[..., None]
            g = (a * F.softplus(raw + self.dt_bias.float().view(h, 1))).expand(b, t, h, hd)
        # ... and leaves the state as it was: no decay (g = 0), no write (beta = 0).
        g = g * m[..., None].float()
        beta = torch.sigmoid(self.b_proj(x).float()) * m.float()
        o, final = self._kda(q, k, v, g, beta, state["state"], decode=ctx.seen > 0 and t == 1)
        gate = self.g_b_proj(self.g_a_proj(x)).view(b, t, h, hd).float()
        o = self.o_norm(o.float()) * torch.sigmoid(gate)
        y = self.o_proj(o.reshape(b, t, h * hd).to(x.dtype))
        new_state = None if ctx.cache is None else {"q_conv": q_tail, "k_conv": k_tail, "v_conv": v_tail,
                                                    "state": final}
        return y, new_state

    def _kda(self, q, k, v, g, beta, state, decode):
        if _fla_chunk_kda is not None and q.is_cuda:
            op = _fla_recurrent_kda if decode else _fla_chunk_kda
            o, final = op(q=q, k=k, v=v, g=g, beta=beta, scale=1.0, initial_state=state, output_final_state=True)
            return o.float(), final.float()
        if decode:
            return recurrent_kda(q, k, v, g, beta, state)
        return chunk_kda(q, k, v, g, beta, state, self.chunk_size)


# ------------------------------------------------------------------------------------- TTT memory


def _read_and_grad(w, q, k, v, lr):
    """Per head: f_W(q) and grad_W sum_t lr_t/2 |f_W(k_t) - v_t|^2 at W = (w1 [H,D,F], w2 [H,F,D], w3 [H,D,F]);
    q, k, v [H,L,D], lr [H,L]. f_W(x) = x + (silu(x w1) * (x w3)) w2."""
    w1, w2, w3 = w
    read = q + (F.silu(q @ w1) * (q @ w3)) @ w2
    a, c = k @ w1, k @ w3
    hid = F.silu(a) * c
    e = (k + hid @ w2 - v) * lr[..., None]
    dh = e @ w2.transpose(-1, -2)
    sig = torch.sigmoid(a)
    da = dh * c * sig * (1 + a * (1 - sig))  # silu'(a)
    dc = dh * F.silu(a)
    kt = k.transpose(-1, -2)
    return read, (kt @ da, hid.transpose(-1, -2) @ e, kt @ dc)


class TTTMemory(nn.Module):
    """AllMem's memory: fast weights read at q, trained on k -> v, updated once per `chunk_size` tokens.

    Per row and head, token by token: read o_t = f_W(q_t) with the weights of the last complete chunk,
    add lr_t * grad 1/2|f_W(k_t) - v_t|^2 to G; when the chunk is full (mu, a = momentum, decay at its
    last token): S <- mu S - G, W <- (1 - a) W + S, G <- 0. Output: RMS-normalised read, then o_proj.
    """

    def __init__(self, config, hparams):
        super().__init__()
        h, hd, d = config.num_attention_heads, config.head_dim, config.hidden_size
        f = int(hparams.get("memory_hidden") or hd)
        self.num_heads, self.head_dim = h, hd
        self.chunk_size = int(hparams.get("chunk_size", 512))
        self.qk_l2norm = bool(hparams.get("qk_l2norm", True))
        self.q_proj = nn.Linear(d, h * hd, bias=False)
        self.k_proj = nn.Linear(d, h * hd, bias=False)
        self.v_proj = nn.Linear(d, h * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, d, bias=False)
        for name in ("lr", "momentum", "decay"):
            setattr(self, f"{name}_proj", nn.Linear(d, h, bias=False))
            setattr(self, f"{name}_bias", nn.Parameter(torch.zeros(h)))
        self.w1 = nn.Parameter(torch.zeros(h, hd, f))
        self.w2 = nn.Parameter(torch.zeros(h, f, hd))
        self.w3 = nn.Parameter(torch.zeros(h, hd, f))
        self.alpha = nn.Parameter(torch.zeros(d))  # AllMem's per-channel gate on the memory output

    def forward(self, x, ctx: _Context, state):
        b, t, _ = x.shape
        h, hd, c = self.num_heads, self.head_dim, self.chunk_size
        q = self.q_proj(x).view(b, t, h, hd)
        k = self.k_proj(x).view(b, t, h, hd)
        v = self.v_proj(x).view(b, t, h, hd).float()
        if self.qk_l2norm:
            q, k = _l2norm(q).to(x.dtype), _l2norm(k).to(x.dtype)
        q, k = q.float(), k.float()
        lr = F.softplus(self.lr_proj(x).float() + self.lr_bias.float())
        mom = torch.sigmoid(self.momentum_proj(x).float() + self.momentum_bias.float())
        dec = torch.sigmoid(self.decay_proj(x).float() + self.decay_bias.float())
        if state is None:
            w0 = [w.float()[None].expand(b, *w.shape) for w in (self.w1, self.w2, self.w3)]
            state = {"w": w0, "s": [torch.zeros_like(w) for w in w0], "g": [torch.zeros_like(w) for w in w0],
                     "count": [0] * b}
        new = {"w": [], "s": [], "g": [], "count": []}
        out = torch.zeros(b, t, h, hd, device=x.device, dtype=torch.float32)
        for row in range(b):  # chunks count from each row's first real token, so rows are processed alone
            w = [z[row] for z in state["w"]]
            s = [z[row] for z in state["s"]]
            g = [z[row] for z in state["g"]]
            count = state["count"][row]
            real = ctx.mask[row].nonzero().squeeze(-1)
            start = 0
            while start < real.numel():
                piece = real[start:start + c - count]
                qp, kp, vp, lrp = (z[row, piece].transpose(0, 1) for z in (q, k, v, lr))  # [H, L, ...]
                read, grad = _read_and_grad(w, qp, kp, vp, lrp)
                out[row, piece] = read.transpose(0, 1)
                g = [gi + di for gi, di in zip(g, grad)]
                count += piece.numel()
                if count == c:  # the chunk is complete: update with the closing token's momentum and decay
                    mu = mom[row, piece[-1]][:, None, None]
                    al = dec[row, piece[-1]][:, None, None]
                    s = [mu * si - gi for si, gi in zip(s, g)]
                    w = [(1 - al) * wi + si for wi, si in zip(w, s)]
                    g = [torch.zeros_like(gi) for gi in g]
                    count = 0
                start += piece.numel()
            for key, val in (("w", w), ("s", s), ("g", g)):
                new[key].append(val)
            new["count"].append(count)
        out = out * torch.rsqrt((out * out).mean(-1, keepdim=True) + TTT_EPS)
        y = self.o_proj(out.reshape(b, t, h * hd).to(x.dtype))
        if ctx.cache is None:
            return y, None
        return y, {"w": [torch.stack(z) for z in zip(*new["w"])], "s": [torch.stack(z) for z in zip(*new["s"])],
                   "g": [torch.stack(z) for z in zip(*new["g"])], "count": new["count"]}


# ----------------------------------------------------------------------------------------- layers


class HybridQwen3DecoderLayer(nn.Module):
    def __init__(self, config: HybridQwen3Config, layer_idx: int):
        super().__init__()
        self.mixer_type = config.mixer_types[layer_idx]
        hp = dict(config.mixer_configs[layer_idx] or {})
        self.window = self.sinks = None
        if self.mixer_type in ("attention", "swa", "allmem"):
            self.self_attn = Qwen3Attention(config, layer_idx)
        if self.mixer_type in ("swa", "allmem"):
            self.window, self.sinks = int(hp.get("window", 512)), int(hp.get("sinks", 0))
        if self.mixer_type in ("kda", "gdn"):
            self.linear_attn = KimiDeltaAttention(config, hp, gate="channel" if self.mixer_type == "kda" else "scalar")
        if self.mixer_type == "allmem":
            self.memory = TTTMemory(config, hp)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, cos, sin, ctx: _Context, state):
        hn = self.input_layernorm(x)
        if self.mixer_type in ("kda", "gdn"):
            y, new_state = self.linear_attn(hn, ctx, state)
        elif self.mixer_type == "allmem":
            y, swa_state = attention_mixer(self.self_attn, hn, cos, sin, ctx, state and state["swa"],
                                           self.window, self.sinks)
            mem, mem_state = self.memory(hn, ctx, state and state["memory"])
            y = y + self.memory.alpha.to(y.dtype) * mem.to(y.dtype)
            new_state = None if ctx.cache is None else {"swa": swa_state, "memory": mem_state}
        else:
            y, new_state = attention_mixer(self.self_attn, hn, cos, sin, ctx, state, self.window, self.sinks or 0)
        x = x + y
        return x + self.mlp(self.post_attention_layernorm(x)), new_state


# transformers renamed the outputs' `past_key_values` to `cache` (5.x); use whichever this version has.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class HybridQwen3PreTrainedModel(PreTrainedModel):
    config_class = HybridQwen3Config
    base_model_prefix = "model"
    _no_split_modules = ["HybridQwen3DecoderLayer"]
    _is_stateful = True
    supports_gradient_checkpointing = False

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own HybridCache


class HybridQwen3Model(HybridQwen3PreTrainedModel):
    def __init__(self, config: HybridQwen3Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([HybridQwen3DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(config=config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("HybridQwen3Model: pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = x.shape[:2]
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = HybridCache(len(self.layers))
        if cache is not None and not isinstance(cache, HybridCache):
            raise TypeError(f"HybridQwen3Model: cache must be a HybridCache (or None), got {type(cache).__name__}")
        seen = cache.seen if cache is not None else 0
        mask = (torch.ones(b, t, dtype=torch.bool, device=x.device) if attention_mask is None
                else attention_mask[:, -t:].to(device=x.device, dtype=torch.bool))
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("HybridQwen3Model: attention_mask must be a 2D [batch, length] 0/1 mask")
        past = cache.mask if cache is not None and cache.mask is not None else mask[:, :0]
        all_mask = torch.cat([past, mask], dim=1)
        _check_mask(all_mask)
        all_doc = (all_mask.long().cumsum(1) - 1).clamp(min=0)
        ctx = _Context(mask=mask, cols=torch.arange(seen, seen + t, device=x.device), doc=all_doc[:, seen:],
                       all_mask=all_mask, all_doc=all_doc, seen=seen, cache=cache)
        if position_ids is None:
            position_ids = ctx.doc
        cos, sin = self.rotary_emb(x, position_ids)
        for i, layer in enumerate(self.layers):
            x, st = layer(x, cos, sin, ctx, None if cache is None else cache.states[i])
            if cache is not None:
                cache.states[i] = st
        if cache is not None:
            cache.mask, cache.seen = all_mask, seen + t
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), **{_CACHE_FIELD: cache})


def _check_mask(mask):
    """One contiguous run of ones per row (left or right padding); anything else is refused."""
    m = mask.long()
    starts = (m[:, 1:] > m[:, :-1]).sum(1) + m[:, 0]
    if bool((starts > 1).any()):
        raise ValueError("HybridQwen3Model: each attention_mask row must be one contiguous run of ones "
                         "(left or right padding); packed or holed masks are not supported")


_TIED = ({"lm_head.weight": "model.embed_tokens.weight"} if int(transformers.__version__.split(".")[0]) >= 5
         else ["lm_head.weight"])


class HybridQwen3ForCausalLM(HybridQwen3PreTrainedModel, GenerationMixin):
    _tied_weights_keys = _TIED

    def __init__(self, config: HybridQwen3Config):
        super().__init__(config)
        self.model = HybridQwen3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
                         use_cache=use_cache)
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, position_ids=None, inputs_embeds=None,
                                      use_cache=True, logits_to_keep=None, **kwargs):
        cache = kwargs.get("cache")
        cache = cache if cache is not None else kwargs.get("past_key_values")
        seen = cache.get_seq_length() if cache is not None else 0
        inputs = {"attention_mask": attention_mask, "cache": cache, "use_cache": use_cache}
        if inputs_embeds is not None and seen == 0:
            inputs.update(input_ids=None, inputs_embeds=inputs_embeds)
            n = inputs_embeds.shape[1]
        else:
            inputs["input_ids"] = input_ids[:, seen:]
            n = input_ids.shape[1] - seen
        if position_ids is not None:
            inputs["position_ids"] = position_ids[:, -n:]
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        return inputs
