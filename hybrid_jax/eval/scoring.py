"""Scoring the same items two ways: log-likelihood ranking and generation.

The papers' central claim is that log-likelihood ranking (what lm-eval's multiple-choice
tasks do) hides failures that generation reveals. So every multiple-choice item is scored
both ways on the same prompt:

* log-likelihood: the option whose continuation has the highest total log-probability
  (`acc`) or the highest log-probability per character (`acc_norm`, lm-eval's
  length-normalised variant);
* generation: the model answers greedily in the chat format and the answer is extracted
  (an option letter, or exactly one option's text in the reply).

Open questions are scored by generation with a normalised exact match.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hybrid_jax.data.chat import render_chat
from hybrid_jax.data.microworld import options_text
from hybrid_jax.eval.generate import bucket_length, generate


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_logprobs(graphdef, state, input_ids, attention_mask, targets):
    """log p(target_t | tokens ≤ t) and whether the target is the argmax, both [B, T]."""
    model = nnx.merge(graphdef, state)
    logits = model(input_ids, attention_mask=attention_mask).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets


def continuation_logprobs(model, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                          *, batch_size: int = 32, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """For each (context, continuation) pair: (sum of log p(continuation | context), greedy).

    `greedy` is True when every continuation token is the model's argmax (lm-eval's
    `is_greedy`). Sequences are right-padded to power-of-two buckets so compiles are shared.
    """
    if len(contexts) != len(continuations):
        raise ValueError(f"continuation_logprobs: {len(contexts)} contexts but {len(continuations)} continuations")
    for i, (ctx, cont) in enumerate(zip(contexts, continuations)):
        if not ctx or not cont:
            raise ValueError(f"continuation_logprobs: pair {i} has an empty context or continuation")
    graphdef, state = nnx.split(model)
    totals = np.zeros(len(contexts), np.float64)
    greedy = np.zeros(len(contexts), bool)
    for start in range(0, len(contexts), batch_size):
        pairs = list(zip(contexts[start:start + batch_size], continuations[start:start + batch_size]))
        length = bucket_length(max(len(c) + len(x) - 1 for c, x in pairs))
        rows = batch_size if len(contexts) > batch_size else len(pairs)  # fixed batch: one compile
        ids = np.full((rows, length), pad_id, np.int32)
        tgt = np.zeros((rows, length), np.int32)
        mask = np.zeros((rows, length), np.int32)
        score = np.zeros((rows, length), bool)
        for r, (ctx, cont) in enumerate(pairs):
            seq = list(ctx) + list(cont)
            n = len(seq) - 1
            ids[r, :n], tgt[r, :n], mask[r, :n] = seq[:-1], seq[1:], 1
            score[r, len(ctx) - 1:n] = True
        logp, hit = _token_logprobs(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(tgt))
        logp, hit = np.asarray(logp, np.float64), np.asarray(hit)
        for r in range(len(pairs)):
            totals[start + r] = logp[r][score[r]].sum()
            greedy[start + r] = hit[r][score[r]].all()
    return totals, greedy


def chat_prompt(tokenizer, question: str, chat_template: str = "tokenizer") -> str:
    """The user turn and the assistant header, thinking disabled: where the answer starts."""
    return render_chat(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True,
                       chat_template=chat_template)


def normalise_answer(text: str) -> str:
    text = text.lower().strip()
    text = text.translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def extract_choice(reply: str, choices: Sequence[str]) -> int | None:
    """The option a generated reply picks: a leading letter ("B", "B.", "(B)") or exactly one
    option's text; None when the reply names none or several."""
    m = re.match(r"^\W*([A-Da-d])(?:\W|$)", reply.strip())
    if m and m.group(1).upper() in "ABCD"[: len(choices)]:
        letter = "ABCD".index(m.group(1).upper())
        # A one-letter word that is itself an option's text is not a letter answer.
        if not any(normalise_answer(c) == m.group(1).lower() for c in choices):
            return letter
    said = normalise_answer(reply)
    found = [i for i, c in enumerate(choices) if re.search(rf"\b{re.escape(normalise_answer(c))}\b", said)]
    return found[0] if len(found) == 1 else None


def score_multiple_choice_loglikelihood(model, tokenizer, items: Sequence[dict], *, chat_template: str = "tokenizer",
                                        batch_size: int = 32) -> dict:
    """lm-eval style ranking: the context is the chat prompt of the bare question, each
    continuation is one option's text (the reply the model would give)."""
    contexts, conts, owners, lengths = [], [], [], []
    for n, item in enumerate(items):
        ctx = tokenizer(chat_prompt(tokenizer, item["question"], chat_template), add_special_tokens=False)["input_ids"]
        for choice in item["choices"]:
            contexts.append(ctx)
            conts.append(tokenizer(choice, add_special_tokens=False)["input_ids"])
            owners.append(n)
            lengths.append(len(choice))
    logp, _ = continuation_logprobs(model, contexts, conts, batch_size=batch_size,
                                    pad_id=tokenizer.pad_token_id or 0)
    owners, lengths = np.asarray(owners), np.asarray(lengths)
    acc = acc_norm = 0
    for n, item in enumerate(items):
        sel = owners == n
        acc += int(np.argmax(logp[sel]) == item["answer_index"])
        acc_norm += int(np.argmax(logp[sel] / lengths[sel]) == item["answer_index"])
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items)}


def _generate_replies(model, tokenizer, questions: Sequence[str], *, chat_template: str, batch_size: int,
                      max_new_tokens: int) -> list[str]:
    prompts = [chat_prompt(tokenizer, q, chat_template) for q in questions]
    replies = []
    for start in range(0, len(prompts), batch_size):
        replies += generate(model, tokenizer, prompts[start:start + batch_size], max_new_tokens=max_new_tokens)
    return replies


def score_multiple_choice_generation(model, tokenizer, items: Sequence[dict], *, chat_template: str = "tokenizer",
                                     batch_size: int = 32, max_new_tokens: int = 16) -> dict:
    """The model sees the question with lettered options and answers; the reply is parsed."""
    replies = _generate_replies(model, tokenizer, [options_text(i) for i in items], chat_template=chat_template,
                                batch_size=batch_size, max_new_tokens=max_new_tokens)
    picked = [extract_choice(r, item["choices"]) for r, item in zip(replies, items)]
    acc = sum(p == item["answer_index"] for p, item in zip(picked, items)) / len(items)
    return {"acc": acc, "unparsed": sum(p is None for p in picked) / len(items), "replies": replies}


def score_open_generation(model, tokenizer, items: Sequence[dict], *, chat_template: str = "tokenizer",
                          batch_size: int = 32, max_new_tokens: int = 16) -> dict:
    """Exact match of the normalised greedy reply against the normalised answer."""
    replies = _generate_replies(model, tokenizer, [i["question"] for i in items], chat_template=chat_template,
                                batch_size=batch_size, max_new_tokens=max_new_tokens)
    hits = [normalise_answer(r) == normalise_answer(i["answer"]) for r, i in zip(replies, items)]
    return {"acc": sum(hits) / len(items), "replies": replies}


def evaluate_qa(model, tokenizer, *, multiple_choice: Sequence[dict], open_questions: Sequence[dict],
                chat_template: str = "tokenizer", batch_size: int = 32, max_new_tokens: int = 16) -> dict:
    """The micro-world QA suite: multiple choice both ways, open questions by generation."""
    if not multiple_choice or not open_questions:
        raise ValueError("evaluate_qa: the multiple-choice and open-question sets must not be empty")
    kw = dict(chat_template=chat_template, batch_size=batch_size)
    ll = score_multiple_choice_loglikelihood(model, tokenizer, multiple_choice, **kw)
    gen = score_multiple_choice_generation(model, tokenizer, multiple_choice, max_new_tokens=max_new_tokens, **kw)
    opn = score_open_generation(model, tokenizer, open_questions, max_new_tokens=max_new_tokens, **kw)
    return {"mc_loglik_acc": ll["acc"], "mc_loglik_acc_norm": ll["acc_norm"], "mc_generation_acc": gen["acc"],
            "mc_generation_unparsed": gen["unparsed"], "open_generation_acc": opn["acc"],
            "examples": [{"question": i["question"], "answer": i["answer"], "reply": r}
                         for i, r in zip(open_questions[:5], opn["replies"][:5])]}


SCORE_COLUMNS = (("mc_loglik_acc", "MC log-lik"), ("mc_loglik_acc_norm", "MC log-lik (norm)"),
                 ("mc_generation_acc", "MC generation"), ("open_generation_acc", "open generation"))


def comparison_table(results: dict[str, dict], reference: str = "teacher") -> str:
    """Markdown: accuracy under each scoring per model, retention vs the reference model, and
    the log-likelihood-minus-generation gap on the same multiple-choice items."""
    if reference not in results:
        raise ValueError(f"comparison_table: reference model {reference!r} not among {sorted(results)}")
    head = "| model | " + " | ".join(name for _, name in SCORE_COLUMNS) + " | LL − gen gap | retention (gen) |"
    rows = [head, "|" + "---|" * (len(SCORE_COLUMNS) + 3)]
    ref = results[reference]
    for name, r in results.items():
        cells = [f"{100 * r[k]:.1f}%" for k, _ in SCORE_COLUMNS]
        gap = 100 * (r["mc_loglik_acc"] - r["mc_generation_acc"])
        gen = r["mc_generation_acc"] + r["open_generation_acc"]
        ref_gen = ref["mc_generation_acc"] + ref["open_generation_acc"]
        retention = f"{100 * gen / ref_gen:.1f}%" if ref_gen > 0 else "n/a"
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {gap:+.1f} pts | {retention} |")
    return "\n".join(rows)
