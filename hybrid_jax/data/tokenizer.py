"""A small byte-level BPE tokenizer for the micro-world, saved as an HF tokenizer directory.

`build_tokenizer(out_dir)` trains it with HF `tokenizers` on the micro-world's corpus,
chats and long-context filler, and saves tokenizer.json + tokenizer_config.json (with the
Qwen3-style chat template; also chat_template.jinja) that
`transformers.AutoTokenizer.from_pretrained` loads. The
pre-tokeniser is Qwen2/3's (digits split one by one), the special tokens are Qwen3's:
`<|endoftext|>` (pad, document separator), `<|im_start|>`, `<|im_end|>` (eos), and the
`<think>`/`</think>` markers. Training is deterministic: the same world and vocabulary
size give the same tokenizer.json byte for byte.
"""

from __future__ import annotations

import logging
import os

from hybrid_jax.data import chat, microworld

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
ADDED_TOKENS = ("<think>", "</think>")
# Qwen2/Qwen3 pre-tokenisation: letters grouped, digits single, punctuation runs, spaces.
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def training_texts(world: microworld.World) -> list[str]:
    """Everything the micro-world shows a model: corpus, rendered chats, MC prompts and
    long-context text (so filler and keys tokenise compactly)."""
    texts = [d["text"] for d in world.corpus()]
    for m in world.instruct():
        texts.append("".join(f"<|im_start|>{x['role']}\n{x['content']}<|im_end|>\n"
                             for x in m["messages"]))
    texts += [microworld.format_multiple_choice(e) for e in world.multiple_choice()]
    texts += [e["context"] for e in microworld.associative_recall(256, 2, seed=world.config.seed)]
    texts += [e["context"] + e["question"] for e in microworld.passkey(1024, 1)]
    return texts


def train_tokenizer(texts: list[str], vocab_size: int = 1024):
    """A `tokenizers.Tokenizer` (byte-level BPE) trained on `texts`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    n_special = len(SPECIAL_TOKENS) + len(ADDED_TOKENS)
    if vocab_size < 256 + n_special:
        raise ValueError(f"vocab_size={vocab_size}: byte-level BPE needs at least "
                         f"{256 + n_special} (256 bytes + special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS + ADDED_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def build_tokenizer(out_dir: str, world_config: microworld.WorldConfig | str | None = None,
                    vocab_size: int = 1024):
    """Train on the micro-world and save an HF tokenizer directory; returns the loaded
    `PreTrainedTokenizerFast`."""
    from transformers import PreTrainedTokenizerFast

    world = microworld.World(microworld.WorldConfig.from_dict(world_config))
    tok = train_tokenizer(training_texts(world), vocab_size)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"], chat_template=chat.QWEN3_STYLE_TEMPLATE,
        clean_up_tokenization_spaces=False, model_max_length=131072)
    hf.save_pretrained(out_dir)
    _portable_config(out_dir)
    log.info("micro-world tokenizer (vocab %d, world %s) saved to %s", len(hf),
             world.config.fingerprint(), out_dir)
    return load_tokenizer(out_dir)


def _portable_config(out_dir: str):
    """Rewrite tokenizer_config.json in the form transformers 4.x and 5.x both load:
    the generic fast-tokenizer class, the chat template inline (5.x also reads
    chat_template.jinja) and `additional_special_tokens` (5.x writes a list under
    `extra_special_tokens`, which 4.x expects to be a dict)."""
    import json

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "additional_special_tokens": ["<|im_start|>"],
        "chat_template": chat.QWEN3_STYLE_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def micro_tokenizer(cache_dir: str | None = None, world="default", vocab_size: int = 1024):
    """The micro-world tokenizer, built on first use into a cache directory named by the
    world's fingerprint and the vocabulary size (a log line says when it is built)."""
    config = microworld.WorldConfig.from_dict(world)
    root = cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser(
        "~/.cache")), "hybrid_jax")
    path = os.path.join(root, f"microworld-tokenizer-{config.fingerprint()}-v{vocab_size}")
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return load_tokenizer(path)
    log.info("building the micro-world tokenizer in %s (first use; cached afterwards)", path)
    tmp = f"{path}.tmp{os.getpid()}"  # written aside and renamed: concurrent users never see half
    build_tokenizer(tmp, config, vocab_size)
    try:
        os.replace(tmp, path)
    except OSError:  # another process got there first; both wrote the same files
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(path)


def load_tokenizer(path: str):
    """AutoTokenizer from a directory or hub id, with a clear error when it is missing."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path) and (path.startswith(".") or os.sep in path):
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist; build the "
                                "micro-world one with `python -m hybrid_jax.data.tokenizer "
                                f"--out={path}`")
    return AutoTokenizer.from_pretrained(path)


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory to write the tokenizer to")
    p.add_argument("--vocab_size", type=int, default=1024)
    p.add_argument("--world", default="default", choices=sorted(microworld.PRESETS),
                   help="micro-world preset to train on")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    build_tokenizer(a.out, microworld.PRESETS[a.world], a.vocab_size)


if __name__ == "__main__":
    main()
