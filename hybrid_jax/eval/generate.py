"""Cached generation: `hj.generate(model, tokenizer, prompts, max_new_tokens=32)` and `generate_tokens`.

Prompts are left-padded to a power-of-two bucket (so recompiles stay bounded), prefilled by one
jit-compiled call over a preallocated cache, then decoded by a jit-compiled `lax.while_loop`
that stops when every row has produced EOS (or after max_new_tokens). The loop knows nothing of
mixer internals: it builds the per-layer caches with `init_cache` and passes them through the model.
Greedy (temperature 0), temperature, top-k and top-p sampling; stop strings cut the decoded text.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hybrid_jax.models.cache import init_cache
from hybrid_jax.models.qwen3 import default_positions

MIN_BUCKET = 16


def bucket_length(n: int, minimum: int = MIN_BUCKET) -> int:
    """Smallest power of two >= n (at least `minimum`): prompt lengths share compiled programs."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def sample_logits(logits, rng, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
    """Next tokens [B] from float32 logits [B, V]; temperature 0 is greedy (argmax)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the most likely token always stays).
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _step(model, tokens, positions, cache):
    out = model.forward(tokens, positions=positions, segment_ids=jnp.ones_like(tokens), cache=cache, logits="last")
    return out.logits[:, -1], out.cache


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_length"))
def _prefill(graphdef, state, input_ids, attention_mask, *, cache_length):
    model = nnx.merge(graphdef, state)
    cache = init_cache(model, input_ids.shape[0], cache_length)
    positions = default_positions(attention_mask)
    out = model.forward(input_ids, attention_mask, positions=positions, cache=cache, logits="last")
    return out.logits[:, -1], out.cache, positions[:, -1]


def _init_carry(first, last_pos, cache, rng, max_new_tokens, eos, pad_id):
    b = first.shape[0]
    tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    return (jnp.int32(1), tokens, cache, first, last_pos, jnp.isin(first, eos), rng)


def _body(model, carry, *, eos, pad_id, sampling):
    step, tokens, cache, last, pos, done, rng = carry
    pos = pos + 1
    logits, cache = _step(model, last[:, None], pos[:, None], cache)
    rng, sub = jax.random.split(rng)
    nxt = jnp.where(done, pad_id, sample_logits(logits, sub, **sampling))
    tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, step))
    return (step + 1, tokens, cache, nxt, pos, done | jnp.isin(nxt, eos), rng)


# The cache is donated and returned so the loop updates it in place (no copy of a large cache).
@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos", "pad_id", "sampling"),
                   donate_argnames=("cache",))
def _decode_while(graphdef, state, cache, first, last_pos, rng, *, max_new_tokens, eos, pad_id, sampling):
    model = nnx.merge(graphdef, state)
    eos_arr = jnp.asarray(eos, jnp.int32)
    carry = _init_carry(first, last_pos, cache, rng, max_new_tokens, eos_arr, pad_id)
    carry = jax.lax.while_loop(
        lambda c: (c[0] < max_new_tokens) & ~jnp.all(c[5]),
        lambda c: _body(model, c, eos=eos_arr, pad_id=pad_id, sampling=dict(sampling)),
        carry)
    return carry[1], carry[2]


@functools.partial(jax.jit, static_argnames=("graphdef", "eos", "pad_id", "sampling"), donate_argnames=("carry",))
def _decode_one(graphdef, state, carry, *, eos, pad_id, sampling):
    model = nnx.merge(graphdef, state)
    return _body(model, carry, eos=jnp.asarray(eos, jnp.int32), pad_id=pad_id, sampling=dict(sampling))


def _eos_tuple(eos) -> tuple[int, ...]:
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, Sequence) else (int(eos),)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, length: int | None = None):
    """(input_ids, attention_mask) int32 [B, length], prompts right-aligned."""
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"generate: prompt {i} is empty; every prompt needs at least one token")
    length = length or max(len(p) for p in prompts)
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = p
        mask[i, length - len(p):] = 1
    return ids, mask


def generate_tokens(model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, *, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, eos_token_id=None, pad_token_id: int | None = None,
                    seed: int = 0, loop: str = "while", bucket: bool = True) -> np.ndarray:
    """Generated token ids [B, max_new_tokens]; after a row's EOS the rest is `pad_token_id`.

    eos_token_id: int, list of ints, or None (default: the model's generation config).
    loop: "while" (the whole decode in one lax.while_loop) or "python" (a jitted step per token).
    """
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 1")
    if loop not in ("while", "python"):
        raise ValueError(f"generate: loop={loop!r}; use 'while' or 'python'")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"generate: need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got "
                         f"{temperature}, {top_p}, {top_k}")
    gen = model.generation_config
    eos = _eos_tuple(gen.get("eos_token_id") if eos_token_id is None else eos_token_id)
    if pad_token_id is None:
        pad_token_id = gen.get("pad_token_id")
        pad_token_id = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    longest = max(len(p) for p in prompts) if prompts else 0
    if not prompts:
        raise ValueError("generate: no prompts")
    length = bucket_length(longest) if bucket else longest
    ids, mask = left_pad(prompts, pad_token_id, length)
    cache_length = length + -(-max_new_tokens // 32) * 32

    graphdef, state = nnx.split(model)
    sampling = tuple(sorted(dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p)).items()))
    rng = jax.random.key(seed)
    logits, cache, last_pos = _prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), cache_length=cache_length)
    rng, sub = jax.random.split(rng)
    first = sample_logits(logits, sub, **dict(sampling))
    kw = dict(eos=eos, pad_id=int(pad_token_id), sampling=sampling)
    if loop == "while":
        tokens, _ = _decode_while(graphdef, state, cache, first, last_pos, rng, max_new_tokens=max_new_tokens, **kw)
    else:
        carry = _init_carry(first, last_pos, cache, rng, max_new_tokens, jnp.asarray(eos, jnp.int32), int(pad_token_id))
        for _ in range(max_new_tokens - 1):
            if bool(jnp.all(carry[5])):
                break
            carry = _decode_one(graphdef, state, carry, **kw)
        tokens = carry[1]
    return np.asarray(tokens)


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[: min(cuts)] if cuts else text


def generate(model, tokenizer, prompts: str | Sequence[str], max_new_tokens: int = 32, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, stop: Sequence[str] | None = None, eos_token_id=None,
             seed: int = 0, loop: str = "while") -> list[str]:
    """Texts generated after each prompt (special tokens dropped, cut before the first stop string)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if eos_token_id is None and model.generation_config.get("eos_token_id") is None:
        eos_token_id = tokenizer.eos_token_id
    pad = model.generation_config.get("pad_token_id")
    if pad is None:
        pad = tokenizer.pad_token_id
    tokens = generate_tokens(model, encoded, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             eos_token_id=eos_token_id, pad_token_id=pad, seed=seed, loop=loop)
    eos = set(_eos_tuple(eos_token_id if eos_token_id is not None else model.generation_config.get("eos_token_id")))
    texts = []
    for row in tokens.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        texts.append(_cut_at_stop(tokenizer.decode(row[:cut], skip_special_tokens=True), stop or ()))
    return texts
