"""Long-context harness: truncation policy, scoring of replies, plots."""

import re

import pytest
from transformers import AutoTokenizer

import hybrid_jax as hj
from hybrid_jax.eval import long_context
from tests.fixtures import write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_long"), max_position_embeddings=2048)
    return hj.load_pretrained(str(path)), AutoTokenizer.from_pretrained(str(path))


def test_fit_to_context_policies(caplog):
    ids = list(range(10))
    assert long_context.fit_to_context(ids, 10) == ids
    with pytest.raises(ValueError, match="10 tokens, more than the model's limit of 4"):
        long_context.fit_to_context(ids, 4)
    assert long_context.fit_to_context(ids, 4, "left") == [6, 7, 8, 9]
    assert "keeping the last 4" in caplog.text
    with pytest.raises(ValueError, match="truncation policy 'right'"):
        long_context.fit_to_context(ids, 4, "right")


def _oracle_generate(pattern):
    """A stand-in model that reads the answer out of the prompt, as a perfect retriever would."""
    def gen(model, tok, prompts, max_new_tokens):
        return [" " + pattern(p) + "." for p in prompts]
    return gen


def test_passkey_scores_right_and_wrong_replies(tiny, monkeypatch):
    model, tok = tiny
    monkeypatch.setattr(long_context, "generate", _oracle_generate(lambda p: re.search(r"pass key is (\d+)", p).group(1)))
    assert long_context.passkey_accuracy(model, tok, [256, 512], num_examples=3) == {256: 1.0, 512: 1.0}
    monkeypatch.setattr(long_context, "generate", _oracle_generate(lambda p: "12345x"))
    assert long_context.passkey_accuracy(model, tok, [256], num_examples=3) == {256: 0.0}


def test_associative_recall_scores_each_query(tiny, monkeypatch):
    model, tok = tiny

    def lookup(prompt):
        key = re.search(r"value of (\w+)\?$", prompt).group(1)
        return re.search(rf"^{key}: (\d+)$", prompt, re.M).group(1)

    monkeypatch.setattr(long_context, "generate", _oracle_generate(lookup))
    assert long_context.associative_recall_accuracy(model, tok, [256], num_examples=2, num_queries=3) == {256: 1.0}


def test_chat_format_asks_each_prompt_as_a_user_turn(tiny, monkeypatch):
    from hybrid_jax.data.chat import QWEN3_STYLE_TEMPLATE

    model, tok = tiny
    tok.chat_template = QWEN3_STYLE_TEMPLATE  # the tiny tokenizer ships none
    seen = []

    def gen(model, tok, prompts, max_new_tokens):
        seen.extend(prompts)
        return [" " + re.search(r"pass key is (\d+)", p).group(1) for p in prompts]

    monkeypatch.setattr(long_context, "generate", gen)
    assert long_context.passkey_accuracy(model, tok, [256], num_examples=2, chat=True) == {256: 1.0}
    assert all(p.startswith("<|im_start|>user\n") and p.rstrip().endswith("</think>") for p in seen), seen[0][-80:]
    seen.clear()
    assert long_context.passkey_accuracy(model, tok, [256], num_examples=2) == {256: 1.0}
    assert not any("<|im_start|>" in p for p in seen)


def test_prompt_beyond_the_model_limit(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="more than the model's limit"):
        long_context.passkey_accuracy(model, tok, [4096], num_examples=1)


def test_real_model_runs_end_to_end(tiny):
    model, tok = tiny  # random weights: the accuracy is whatever it is, but it must be a fraction
    acc = long_context.passkey_accuracy(model, tok, [128], num_examples=2)
    assert set(acc) == {128} and 0.0 <= acc[128] <= 1.0


def test_accuracy_plot_writes_png(tmp_path):
    path = long_context.accuracy_plot({"teacher": {256: 1.0, 512: 0.5}, "student": {256: 0.5, 512: 0.0}},
                                      str(tmp_path / "p.png"), "passkey")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
