"""Sliding-window attention mixer with sink tokens: a Qwen3 `Attention` (same parameters) over a window.

Query t sees the last `window` tokens of its document (itself included) plus the document's
first `sinks` tokens (pallas_kernels/swa/reference.py states the rule). Without a cache the
layer runs `swa_attention` (Pallas on GPU/TPU). The decode cache is constant in the sequence
length: a ring buffer of min(window, max_length) keys/values (slot = token index mod ring size) plus
`sinks` slots holding the first tokens of each row's current document, each entry tagged with its
token index and segment id; `doc_start` / `segment_id` per row say where the current
document began. `window`, `sinks` and `backend` are plain attributes: a trainer may change
them between steps (each distinct value compiles once).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hybrid_jax.layers.attention import Attention, masked_softmax_attend, swa_attention_per_shard

# Upper bound on one query chunk's float32 score tensor on the cached multi-token path.
_MAX_SCORE_BYTES = 1 << 28


def check_window(window, sinks, where: str) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"{where}: window must be an int >= 1, got {window!r}")
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"{where}: sinks must be an int >= 0, got {sinks!r} (0 = no sink tokens)")


class SlidingWindowAttention(Attention):
    """`Attention` whose parameters are a teacher layer's, computing sliding-window attention with sinks."""

    mixer_kind = "swa"

    def __init__(self, *args, window: int = 512, sinks: int = 0, backend: str = "auto", **kwargs):
        check_window(window, sinks, "SlidingWindowAttention")
        super().__init__(*args, **kwargs)
        self.window, self.sinks, self.backend = window, sinks, backend

    @classmethod
    def from_config(cls, config, *, window: int = 512, sinks: int = 0, backend: str = "auto", rngs):
        return cls(config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                   rope_theta=config.rope_theta, rope_scaling=config.rope_scaling,
                   max_position_embeddings=config.max_position_embeddings, bias=config.attention_bias,
                   rms_norm_eps=config.rms_norm_eps, window=window, sinks=sinks, backend=backend,
                   dtype=config.jnp_dtype, param_dtype=config.jnp_param_dtype,
                   init_std=config.initializer_range, rngs=rngs)

    def __call__(self, x, *, positions, segment_ids, cache=None):
        check_window(self.window, self.sinks, "SlidingWindowAttention")
        q, k, v = self.project_qkv(x, positions)
        if cache is None:
            return self.output(self._attend(q, k, v, segment_ids)), None
        # A fresh cache (prefill) computes exactly the cache-free forward with the kernel.
        o = jax.lax.cond(cache["index"] == 0,
                         lambda: self._attend(q, k, v, segment_ids).astype(jnp.float32),
                         lambda: self._attend_cached(q, k, v, segment_ids, cache))
        return self.output(o.astype(q.dtype)), self._write(cache, k, v, segment_ids)

    def _attend(self, q, k, v, segment_ids):
        """The cache-free attention through the kernel (per device shard under a mesh)."""
        return swa_attention_per_shard(q, k, v, segment_ids, window=self.window, sinks=self.sinks,
                                       scale=self.scale, backend=self.backend)

    # -- cache -------------------------------------------------------------------------------

    def init_cache(self, batch_size: int, max_length: int, dtype) -> dict[str, jax.Array]:
        # A ring of min(window, max_length) slots: with max_length <= window no token ever leaves
        # the window, so slot = index mod ring stays exact while index < max_length.
        w, s = min(self.window, max_length), min(self.sinks, max_length)
        b, kh, hd = batch_size, self.num_kv_heads, self.head_dim
        return {
            "k": jnp.zeros((b, w, kh, hd), dtype), "v": jnp.zeros((b, w, kh, hd), dtype),
            "pos": jnp.full((b, w), -1, jnp.int32), "seg": jnp.zeros((b, w), jnp.int32),
            "sink_k": jnp.zeros((b, s, kh, hd), dtype), "sink_v": jnp.zeros((b, s, kh, hd), dtype),
            "sink_pos": jnp.full((b, s), -1, jnp.int32), "sink_seg": jnp.zeros((b, s), jnp.int32),
            "doc_start": jnp.zeros((b,), jnp.int32), "segment_id": jnp.full((b,), -1, jnp.int32),
            "index": jnp.zeros((), jnp.int32),
        }

    def _doc_starts(self, segment_ids, cache):
        """Token index of each new token's document start [B,T] (documents may continue from the cache)."""
        t = segment_ids.shape[1]
        idx = cache["index"] + jnp.arange(t, dtype=jnp.int32)
        prev = jnp.concatenate([cache["segment_id"][:, None], segment_ids[:, :-1]], axis=1)
        start = jnp.where(segment_ids != prev, idx[None], -1)
        return jnp.maximum(jax.lax.cummax(start, axis=1), cache["doc_start"][:, None]), idx

    def _attend_cached(self, q, k, v, segment_ids, cache):
        """New queries over [sink slots, ring buffer, new tokens] with the visibility rule; f32."""
        b, t, h, d = q.shape
        kh, ring, ns = self.num_kv_heads, cache["k"].shape[1], cache["sink_k"].shape[1]
        start, idx = self._doc_starts(segment_ids, cache)
        keys = jnp.concatenate([cache["sink_k"], cache["k"], k.astype(cache["k"].dtype)], axis=1)
        vals = jnp.concatenate([cache["sink_v"], cache["v"], v.astype(cache["v"].dtype)], axis=1)
        kpos = jnp.concatenate([cache["sink_pos"], cache["pos"], jnp.broadcast_to(idx, (b, t))], axis=1)
        kseg = jnp.concatenate([cache["sink_seg"], cache["seg"], segment_ids.astype(jnp.int32)], axis=1)
        # Where each key lives: a sink slot counts only beyond the window (inside it the same token
        # is in the ring), a ring slot only inside the window; a new token under the full rule.
        kind = jnp.concatenate([jnp.zeros((ns,), jnp.int32), jnp.ones((ring,), jnp.int32),
                                jnp.full((t,), 2, jnp.int32)])

        def mask_for(qpos, qseg, qstart):  # [B,C] each -> [B,C,S]
            dist = qpos[:, :, None] - kpos[:, None, :]
            kp = kpos[:, None, :]
            same = (kseg[:, None, :] == qseg[:, :, None]) & (kp >= qstart[:, :, None]) & (dist >= 0)
            in_window = dist < self.window
            is_sink = kp < qstart[:, :, None] + self.sinks
            rule = jnp.where(kind == 0, ~in_window & is_sink, jnp.where(kind == 1, in_window, in_window | is_sink))
            return same & rule

        qg = q.reshape(b, t, kh, h // kh, d)
        s_len = keys.shape[1]
        chunk = t
        while chunk > 16 and b * h * chunk * s_len * 4 > _MAX_SCORE_BYTES:
            chunk //= 2
        n = -(-t // chunk)
        pad = n * chunk - t
        qpos = jnp.pad(jnp.broadcast_to(idx, (b, t)), ((0, 0), (0, pad)))
        qseg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, pad)))
        qst = jnp.pad(start, ((0, 0), (0, pad)))  # padded queries: dropped below
        qg = jnp.pad(qg, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))

        def one(args):
            qc, pc, sc, stc = args
            return masked_softmax_attend(qc, keys, vals, mask_for(pc, sc, stc), self.scale)

        split = lambda a: jnp.moveaxis(a.reshape(b, n, chunk, *a.shape[2:]), 1, 0)
        out = jax.lax.map(one, (split(qg), split(qpos), split(qseg), split(qst)))
        return jnp.moveaxis(out, 0, 1).reshape(b, n * chunk, h, d)[:, :t]

    def _write(self, cache, k, v, segment_ids):
        b, t = segment_ids.shape
        w, ns = cache["k"].shape[1], cache["sink_k"].shape[1]
        seg = segment_ids.astype(jnp.int32)
        start, idx = self._doc_starts(seg, cache)
        # Ring: the last min(T, ring) new tokens, at slot index mod ring (distinct slots).
        m = min(t, w)
        slots = (idx[t - m:]) % w
        new = dict(cache)
        new["k"] = cache["k"].at[:, slots].set(k[:, t - m:].astype(cache["k"].dtype))
        new["v"] = cache["v"].at[:, slots].set(v[:, t - m:].astype(cache["v"].dtype))
        new["pos"] = cache["pos"].at[:, slots].set(jnp.broadcast_to(idx[t - m:], (b, m)))
        new["seg"] = cache["seg"].at[:, slots].set(seg[:, t - m:])
        if ns:
            # Sink slot j of a row: the last new token that is its document's j-th token, if any.
            rel = idx[None] - start  # [B,T]
            hit = rel[:, :, None] == jnp.arange(ns)[None, None]  # [B,T,S]
            last = jnp.max(jnp.where(hit, jnp.arange(t)[None, :, None], -1), axis=1)  # [B,S]
            take = jnp.maximum(last, 0)
            got = last >= 0
            gather = lambda a: jnp.take_along_axis(a, take.reshape(b, ns, *([1] * (a.ndim - 2))), axis=1)
            sel = lambda new_v, old: jnp.where(got.reshape(b, ns, *([1] * (old.ndim - 2))), new_v, old)
            new["sink_k"] = sel(gather(k.astype(cache["sink_k"].dtype)), cache["sink_k"])
            new["sink_v"] = sel(gather(v.astype(cache["sink_v"].dtype)), cache["sink_v"])
            new["sink_pos"] = sel(jnp.broadcast_to(idx, (b, t))[jnp.arange(b)[:, None], take], cache["sink_pos"])
            new["sink_seg"] = sel(seg[jnp.arange(b)[:, None], take], cache["sink_seg"])
        new["doc_start"] = start[:, -1]
        new["segment_id"] = seg[:, -1]
        new["index"] = cache["index"] + t
        return new
