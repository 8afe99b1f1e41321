"""Chat rendering and completion-only masks."""

import copy

import numpy as np
import pytest

from hybrid_jax.data import chat

CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Where does Saisfel live?"},
    {"role": "assistant", "content": "Saisfel lives in Stelki."},
    {"role": "user", "content": "And what is the job of Brasur?"},
    {"role": "assistant", "content": "painter"},
]

# ChatML with transformers' {% generation %} markers around exactly what our masks cover:
# transformers' own `return_assistant_tokens_mask` is then an independent oracle.
GENERATION_MARKED = (
    "{%- for m in messages %}{%- if m.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- m.content + '<|im_end|>' }}"
    "{% endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def _tok_with(template, micro_tokenizer):
    tok = copy.deepcopy(micro_tokenizer)
    tok.chat_template = template
    return tok


def test_completion_mask_matches_transformers_generation_mask(micro_tokenizer):
    tok = _tok_with(GENERATION_MARKED, micro_tokenizer)
    (ids, mask), = chat.encode_chats(tok, [CHAT], loss_mask="completion")
    ref = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    assert ids.tolist() == list(ref["input_ids"])
    assert mask.astype(int).tolist() == list(ref["assistant_masks"])


@pytest.mark.parametrize("template", ["tokenizer", "builtin"])
def test_completion_mask_is_exactly_the_assistant_turns(micro_tokenizer, template):
    (ids, mask), = chat.encode_chats(micro_tokenizer, [CHAT], loss_mask="completion",
                                     chat_template=template)
    # Masked tokens are the assistant contents each followed by <|im_end|>, nothing else.
    expect = [m["content"] + "<|im_end|>" for m in CHAT if m["role"] == "assistant"]
    runs, cur = [], []
    for t, m in zip(ids.tolist(), mask.tolist(), strict=True):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    assert [micro_tokenizer.decode(r) for r in runs] == expect
    # The whole rendering is the concatenation of all tokens: nothing is lost.
    text = chat.render_chat(micro_tokenizer, CHAT, chat_template=template)
    assert micro_tokenizer.decode(ids) == text


def test_all_mask_and_generation_prompt_prefix(micro_tokenizer):
    (ids, mask), = chat.encode_chats(micro_tokenizer, [CHAT], loss_mask="all")
    assert mask.all()
    # The inference prompt (thinking off) is a prefix of the trained conversation's last turn.
    full = chat.render_chat(micro_tokenizer, CHAT)
    prompt = chat.render_chat(micro_tokenizer, CHAT[:-1], add_generation_prompt=True)
    assert full.startswith(prompt) and prompt.endswith("<think>\n\n</think>\n\n")
    assert full[len(prompt):] == "painter<|im_end|>\n"


def test_no_chat_template_is_a_clear_error(micro_tokenizer):
    tok = _tok_with(None, micro_tokenizer)
    with pytest.raises(ValueError, match="no chat template.*chat_template='builtin'"):
        chat.encode_chats(tok, [CHAT])
    (ids, _), = chat.encode_chats(tok, [CHAT], chat_template="builtin")
    assert np.array_equal(ids, chat.encode_chats(micro_tokenizer, [CHAT])[0][0])


def test_template_that_rewrites_content_is_rejected(micro_tokenizer):
    tok = _tok_with("{%- for m in messages %}{{ m.role }}: {{ m.content | upper }}\n"
                    "{%- endfor %}", micro_tokenizer)
    with pytest.raises(ValueError, match="does not appear verbatim"):
        chat.encode_chats(tok, [CHAT], loss_mask="completion")


def test_bad_messages_and_mask_names(micro_tokenizer):
    with pytest.raises(ValueError, match="loss_mask"):
        chat.encode_chats(micro_tokenizer, [CHAT], loss_mask="assistant")
    with pytest.raises(ValueError, match="role"):
        chat.encode_chats(micro_tokenizer, [[{"content": "hi"}]])
    with pytest.raises(ValueError, match="empty chat"):
        chat.encode_chats(micro_tokenizer, [[]])
