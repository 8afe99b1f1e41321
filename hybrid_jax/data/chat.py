"""Chat formatting and tokenisation with loss masks.

A chat is rendered through the tokenizer's chat template (Qwen3's with
`enable_thinking=False`) or, when asked for explicitly, the built-in Qwen3-style
template `QWEN3_STYLE_TEMPLATE`. Loss masks:

* ``"all"``: every token is a target (pretraining text, or chats trained on everything);
* ``"completion"``: exactly the assistant turns are targets: each assistant message's
  content plus the end-of-turn token that follows it (so the model learns to stop), not
  the role header, not the empty ``<think>`` block the template adds, not the newline.

Assistant spans are found in the rendered text: the conversation up to turn i must be a
prefix of the whole rendering, and turn i's content must appear verbatim after it; a
template that breaks either raises an error rather than producing a wrong mask. Tokens
are then mapped to spans by their character offsets in one tokenisation of the whole
text, so BPE merges are identical to those of an unmasked encode.
"""

from __future__ import annotations

import numpy as np

# Qwen3's chat template restricted to what the project uses (no tools, no reasoning
# content): the last assistant turn after the last user turn and the generation prompt
# with enable_thinking=False both carry an empty think block, exactly as Qwen3 renders.
QWEN3_STYLE_TEMPLATE = (
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and loop.last and loop.index0 > ns.last_query %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)

END_OF_TURN = "<|im_end|>"
LOSS_MASKS = ("all", "completion")
CHAT_TEMPLATES = ("tokenizer", "builtin")


def _template(tokenizer, chat_template: str) -> str | None:
    """The template string to pass to apply_chat_template (None = the tokenizer's own)."""
    if chat_template == "builtin":
        return QWEN3_STYLE_TEMPLATE
    if chat_template != "tokenizer":
        raise ValueError(f"chat_template={chat_template!r}: choose from {CHAT_TEMPLATES}")
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"tokenizer {name!r} has no chat template but the data has chat messages; use a "
            "tokenizer with one (e.g. Qwen3's, or hybrid_jax.data.tokenizer.build_tokenizer) "
            "or set data.chat_template='builtin' to use the built-in Qwen3-style template")
    return None


def render_chat(tokenizer, messages, *, add_generation_prompt=False,
                chat_template: str = "tokenizer") -> str:
    """The chat as text, thinking disabled (Qwen3's `enable_thinking=False`)."""
    _check_messages(messages)
    return tokenizer.apply_chat_template(
        list(messages), chat_template=_template(tokenizer, chat_template), tokenize=False,
        add_generation_prompt=add_generation_prompt, enable_thinking=False)


def _check_messages(messages):
    if not messages:
        raise ValueError("empty chat: 'messages' needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
                m.get("content"), str):
            raise ValueError(f"message {i} must be a dict with string 'role' and 'content', "
                             f"got {m!r}")


def assistant_spans(tokenizer, messages, *, chat_template="tokenizer") -> tuple[str, list]:
    """(rendered text, [(start, end) character spans of each assistant turn])."""
    full = render_chat(tokenizer, messages, chat_template=chat_template)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render_chat(tokenizer, messages[:i], chat_template=chat_template) if i else ""
        if not full.startswith(prefix):
            raise ValueError(
                f"the chat template renders messages[:{i}] differently inside the full chat, so "
                "assistant turns cannot be located for completion-only masks; use "
                "data.chat_template='builtin' or data.loss_mask='all'")
        if not m["content"]:
            raise ValueError(f"assistant message {i} is empty: nothing to train on; drop the "
                             "turn or the chat")
        start = full.find(m["content"], len(prefix))
        if start < 0:
            raise ValueError(f"assistant message {i} content {m['content']!r} does not appear "
                             "verbatim in the rendered chat (the template rewrites it); use "
                             "data.chat_template='builtin' or data.loss_mask='all'")
        end = start + len(m["content"])
        if full.startswith(END_OF_TURN, end):
            end += len(END_OF_TURN)
        spans.append((start, end))
    return full, spans


def encode_text(tokenizer, texts: list[str], *, append_eos: bool = True):
    """Plain documents -> [(ids int32, mask bool)], every token a target. With append_eos,
    each document ends with the tokenizer's document separator (pad token if it is
    `<|endoftext|>`-like, else eos) so the model learns where documents end."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    sep = document_separator_id(tokenizer) if append_eos else None
    out = []
    for x in ids:
        x = np.asarray(list(x) + ([sep] if sep is not None else []), np.int32)
        out.append((x, np.ones(len(x), bool)))
    return out


def document_separator_id(tokenizer) -> int:
    """Qwen3 separates pretraining documents with `<|endoftext|>` (its pad token)."""
    tid = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if tid is not None and tid != tokenizer.unk_token_id:
        return tid
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has neither <|endoftext|> nor an eos token to end "
                         "documents; set data.append_eos=False or add one")
    return tokenizer.eos_token_id


def encode_chats(tokenizer, chats: list, *, loss_mask: str = "completion",
                 chat_template: str = "tokenizer"):
    """Chats -> [(ids int32, mask bool)]; mask per `loss_mask` (see module doc)."""
    if loss_mask not in LOSS_MASKS:
        raise ValueError(f"loss_mask={loss_mask!r}: choose from {LOSS_MASKS}")
    rendered = [assistant_spans(tokenizer, m, chat_template=chat_template) for m in chats]
    enc = tokenizer([t for t, _ in rendered], add_special_tokens=False,
                    return_offsets_mapping=True)
    out = []
    for (_, spans), ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"], strict=True):
        ids = np.asarray(ids, np.int32)
        if loss_mask == "all":
            mask = np.ones(len(ids), bool)
        else:
            # A token is a target when it starts inside an assistant span.
            starts = np.asarray([s for s, _ in offsets], np.int64)
            mask = np.zeros(len(ids), bool)
            for s, e in spans:
                mask |= (starts >= s) & (starts < e)
        out.append((ids, mask))
    return out
