"""Long-context retrieval: passkey and multi-query associative recall against context length.

Both tasks come from `hybrid_jax.data.microworld` and are scored by greedy generation: a
reply is right when the first number it contains is the expected one. Context lengths are
measured in the model's own tokens. `accuracy_plot` draws accuracy against length (log x).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from hybrid_jax.data import microworld
from hybrid_jax.data.chat import render_chat
from hybrid_jax.eval.generate import generate

log = logging.getLogger(__name__)

TRUNCATION_POLICIES = ("error", "left")


def fit_to_context(token_ids: list[int], limit: int, policy: str = "error", *, what: str = "prompt") -> list[int]:
    """A prompt that fits `limit` tokens: unchanged, cut from the left with a warning, or an error."""
    if policy not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation policy {policy!r}: choose from {TRUNCATION_POLICIES}")
    if len(token_ids) <= limit:
        return token_ids
    if policy == "error":
        raise ValueError(f"{what} has {len(token_ids)} tokens, more than the model's limit of {limit} "
                         "(max_position_embeddings minus the tokens to generate); shorten it or set "
                         "eval.truncation='left' to keep its last tokens")
    log.warning("%s: %d tokens > limit %d; keeping the last %d", what, len(token_ids), limit, limit)
    return token_ids[-limit:]


def first_number(text: str) -> str | None:
    """The first run of digits in a reply (how both tasks are scored), or None."""
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def score_prompts(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], *, max_new_tokens: int = 8,
                  batch_size: int = 8, truncation: str = "error", chat: bool = False) -> tuple[float, list[str]]:
    """(accuracy, replies): greedy replies to `prompts` (fitted to the model's limit by
    `truncation`), right when their first number is the answer."""
    if chat:  # asked as a user turn, the reply generated as the assistant's
        prompts = [render_chat(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]
    limit = model.config.max_position_embeddings - max_new_tokens
    ids = [fit_to_context(tokenizer(p, add_special_tokens=False)["input_ids"], limit, truncation) for p in prompts]
    texts = [tokenizer.decode(i) for i in ids]
    replies = []
    for start in range(0, len(texts), batch_size):
        replies += generate(model, tokenizer, texts[start:start + batch_size], max_new_tokens=max_new_tokens)
    return sum(first_number(r) == a for r, a in zip(replies, answers)) / len(answers), replies


def passkey_accuracy(model, tokenizer, lengths: Sequence[int], *, num_examples: int = 8, batch_size: int = 8,
                     truncation: str = "error", seed: int = 0, chat: bool = False) -> dict[int, float]:
    """Accuracy of retrieving a 5-digit key hidden in filler, per context length (tokens).

    chat: ask each prompt as a chat's user turn (the tokenizer's template, thinking off), for
    models trained on chats; otherwise the raw text is continued."""
    def count(s):
        return len(tokenizer(s, add_special_tokens=False)["input_ids"])

    out = {}
    for n in lengths:
        ex = microworld.passkey(n, num_examples=num_examples, seed=seed, count_tokens=count)
        out[n] = score_prompts(model, tokenizer, [e["context"] + e["question"] for e in ex], [e["answer"] for e in ex],
                               batch_size=batch_size, truncation=truncation, chat=chat)[0]
    return out


def associative_recall_accuracy(model, tokenizer, lengths: Sequence[int], *, num_examples: int = 4,
                                num_queries: int = 4, batch_size: int = 8, truncation: str = "error",
                                seed: int = 0, chat: bool = False) -> dict[int, float]:
    """Multi-query associative recall accuracy (all queries of all examples) per context length
    (chat: as in `passkey_accuracy`)."""
    def count(s):
        return len(tokenizer(s, add_special_tokens=False)["input_ids"])

    out = {}
    for n in lengths:
        ex = microworld.associative_recall(n, num_examples=num_examples, num_queries=num_queries, seed=seed,
                                           count_tokens=count)
        prompts = [microworld.mqar_prompt(e, i) for e in ex for i in range(num_queries)]
        answers = [a for e in ex for a in e["answers"]]
        out[n] = score_prompts(model, tokenizer, prompts, answers, batch_size=batch_size, truncation=truncation,
                               chat=chat)[0]
    return out


def accuracy_plot(curves: dict[str, dict[int, float]], path: str, title: str) -> str:
    """PNG of accuracy vs context length, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, curve in curves.items():
        xs = sorted(curve)
        ax.plot(xs, [100 * curve[x] for x in xs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
