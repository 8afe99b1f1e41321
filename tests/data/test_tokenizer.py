"""The micro-world BPE tokenizer: deterministic, loads with AutoTokenizer, Qwen3 conventions."""

import os

from transformers import AutoTokenizer

from hybrid_jax.data import microworld
from hybrid_jax.data.tokenizer import build_tokenizer, micro_tokenizer


def test_tokenizer_is_deterministic(micro_tokenizer_dir, tmp_path):
    build_tokenizer(str(tmp_path))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        a = open(os.path.join(micro_tokenizer_dir, f), "rb").read()
        assert a == open(tmp_path / f, "rb").read(), f


def test_autotokenizer_loads_with_qwen3_conventions(micro_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(micro_tokenizer_dir)
    assert len(tok) == 1024
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"):
        assert tok.convert_ids_to_tokens(tok(special, add_special_tokens=False).input_ids) == [special]
    w = microworld.World()
    for text in [d["text"] for d in w.corpus()[:20]] + ["Zq 12345 ünïcode ✓\n\n  x"]:
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text
    # Digits split one by one (Qwen's pre-tokeniser), so long-context keys tokenise predictably.
    assert tok.tokenize("9538") == ["9", "5", "3", "8"]
    # The corpus is compact: about one token per word.
    text = " ".join(d["text"] for d in w.corpus())
    assert len(tok(text).input_ids) < 1.5 * len(text.split())
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                     add_generation_prompt=True, enable_thinking=False)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_micro_tokenizer_is_built_once_and_cached(micro_tokenizer_dir, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="hybrid_jax.data.tokenizer"):
        tok = micro_tokenizer(str(tmp_path))
        assert "first use" in caplog.text
        caplog.clear()
        again = micro_tokenizer(str(tmp_path))
        assert "first use" not in caplog.text
    (path,) = list(tmp_path.iterdir())
    ref = open(os.path.join(micro_tokenizer_dir, "tokenizer.json"), "rb").read()
    assert open(path / "tokenizer.json", "rb").read() == ref
    assert tok("Saisfel lives").input_ids == again("Saisfel lives").input_ids
