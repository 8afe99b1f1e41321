"""Main job: `python -m hybrid_jax.distill --config=configs/quickstart.py --workdir=DIR`.

Today: load the teacher (or build a tiny random Qwen3 when `config.teacher.path` is empty),
evaluate it (greedy generation on a few prompts, log-likelihood of a few texts), export it to
DIR/export as a Hugging Face checkpoint and reload the export to check it round-trips exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

import hybrid_jax as hj
from hybrid_jax.config import validate_config
from hybrid_jax.convert.hf_import import load_tokenizer
from hybrid_jax.models.qwen3 import Qwen3, Qwen3Config

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py", "Run configuration file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (exports, metrics).", required=True)

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10"]
# A tiny random Qwen3 (byte-level vocabulary): the whole job runs on a CPU in seconds.
TINY_TEACHER = Qwen3Config(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                           bos_token_id=None, eos_token_id=256, pad_token_id=256)


def byte_tokenizer():
    """256 byte symbols + <|endoftext|>, <|im_start|>, <|im_end|> (ids 256-258), no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab.update({t: 256 + i for i, t in enumerate(specials)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=specials[0], pad_token=specials[0],
                                   padding_side="left")


def load_teacher(config):
    """(model, tokenizer, description) from config.teacher.path, or a tiny random Qwen3."""
    if config.teacher.path:
        model = hj.load_pretrained(config.teacher.path, dtype=config.teacher.dtype)
        tokenizer = load_tokenizer(config.teacher.path)
        if tokenizer is None:
            raise FileNotFoundError(f"teacher.path {config.teacher.path}: no tokenizer files (tokenizer.json)")
        return model, tokenizer, f"teacher from {config.teacher.path}"
    logging.warning("teacher.path is empty: building a TINY RANDOM Qwen3 teacher (untrained weights, "
                    "gibberish generations); set --config.teacher.path to use a real checkpoint")
    cfg = TINY_TEACHER.replace(dtype=config.teacher.dtype, param_dtype=config.teacher.dtype)
    return Qwen3(cfg, rngs=nnx.Rngs(config.seed)), byte_tokenizer(), "tiny random Qwen3 (untrained)"


@nnx.jit
def _token_nll(model, ids, mask):
    logp = jax.nn.log_softmax(model(ids[:, :-1], mask[:, :-1]), axis=-1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return nll * mask[:, 1:]


def evaluate(model, tokenizer) -> dict:
    """Greedy generations for PROMPTS and per-token negative log-likelihood of TEXTS."""
    replies = hj.generate(model, tokenizer, PROMPTS, max_new_tokens=16)
    enc = tokenizer(TEXTS, padding=True, return_tensors="np")
    nll = np.asarray(_token_nll(model, jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"])))
    counts = enc["attention_mask"][:, 1:].sum(axis=1)
    nlls = (nll.sum(axis=1) / counts).tolist()
    return {"generations": dict(zip(PROMPTS, replies, strict=True)),
            "nll_per_token": dict(zip(TEXTS, nlls, strict=True)),
            "perplexity": math.exp(float(nll.sum() / counts.sum()))}


def print_report(title: str, results: dict) -> None:
    rows = [("prompt", "greedy continuation (16 tokens)")]
    rows += [(p, repr(r)) for p, r in results["generations"].items()]
    rows += [("text", "nll / token")] + [(t, f"{v:.3f}") for t, v in results["nll_per_token"].items()]
    width = max(len(a) for a, _ in rows)
    print(f"\n== {title} ==")
    for a, b in rows:
        print(f"  {a:<{width}} | {b}")
    print(f"  perplexity over the texts: {results['perplexity']:.2f}\n")


def export_and_check(model, tokenizer, out_dir: Path) -> float:
    """Export, reload, and return max |logit difference| between original and reloaded (must be 0)."""
    hj.save_pretrained(model, out_dir, tokenizer=tokenizer)
    reloaded = hj.load_pretrained(out_dir, dtype=model.config.dtype, param_dtype=model.config.param_dtype)
    enc = tokenizer(TEXTS, padding=True, return_tensors="np")
    ids, mask = jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"])
    diff = float(jnp.max(jnp.abs(_logits(model, ids, mask) - _logits(reloaded, ids, mask))))
    if diff != 0.0:
        raise RuntimeError(f"export check: {out_dir} reloads with logits differing by {diff}")
    return diff


@nnx.jit
def _logits(model, ids, mask):
    return model(ids, mask)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config.stage_order or config.stages:  # a teacher-only run (no stages yet) has nothing else to check
        validate_config(config)
    elif config.teacher.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"config: teacher.dtype={config.teacher.dtype!r}; use float32, bfloat16 or float16")
    workdir = Path(_WORKDIR.value)
    workdir.mkdir(parents=True, exist_ok=True)
    model, tokenizer, source = load_teacher(config)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    logging.info("teacher: %s, %.2fM parameters, dtype %s", source, n_params / 1e6, model.config.dtype)
    results = evaluate(model, tokenizer)
    print_report(f"teacher: {source}", results)
    diff = export_and_check(model, tokenizer, workdir / "export")
    print(f"exported to {workdir / 'export'}; reloaded logits differ by {diff} (exact round trip)")
    (workdir / "teacher_eval.json").write_text(json.dumps({"source": source, **results}, indent=2))


if __name__ == "__main__":
    app.run(main)
