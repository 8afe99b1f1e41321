"""Shared test helpers: tiny Qwen3 checkpoints written by transformers itself, and a tiny tokenizer.

    path = write_tiny_checkpoint(tmp_path, tie_word_embeddings=True, num_key_value_heads=1)
    model = hj.load_pretrained(path)
    logits = hf_logits(path, ids, mask, positions)   # transformers' Qwen3ForCausalLM, float32
    ablations = load_script("run_ablations")          # a scripts/ file as a module
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """scripts/<name>.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

TINY_CONFIG = dict(
    vocab_size=272, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
    tie_word_embeddings=False, attention_bias=False,
    # Larger than Qwen's 0.02 so random logits are peaked: greedy decoding has clear argmax margins.
    initializer_range=0.3,
    bos_token_id=256, eos_token_id=256, pad_token_id=256,
)


def tiny_tokenizer():
    """Byte-level tokenizer (256 byte symbols + Qwen's 3 special tokens, no merges): any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for t in SPECIAL_TOKENS:
        vocab[t] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", padding_side="left")


def hf_config(**overrides):
    from transformers import Qwen3Config

    kw = {**TINY_CONFIG, **overrides}
    rope_scaling = kw.pop("rope_scaling", None)
    cfg = Qwen3Config(**kw)
    if rope_scaling is not None:
        cfg.rope_parameters = {**rope_scaling, "rope_theta": kw["rope_theta"]}
    return cfg


def write_tiny_checkpoint(directory, *, seed: int = 0, tokenizer: bool = True, **overrides) -> Path:
    """transformers writes a random Qwen3ForCausalLM (float32 safetensors) from a tiny config into `directory`."""
    import torch
    from transformers import GenerationConfig, Qwen3ForCausalLM

    directory = Path(directory)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(hf_config(**overrides)).float().eval()
    model.save_pretrained(directory, safe_serialization=True)
    GenerationConfig(bos_token_id=256, eos_token_id=256, pad_token_id=256).save_pretrained(directory)
    if tokenizer:
        tiny_tokenizer().save_pretrained(directory)
    return directory


def load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype="float32", attn_implementation="eager").eval()


def hf_logits(path_or_model, input_ids, attention_mask=None, position_ids=None) -> np.ndarray:
    """transformers' float32 logits for numpy inputs."""
    import torch

    model = load_hf(path_or_model) if isinstance(path_or_model, str | Path) else path_or_model
    kw = {}
    if attention_mask is not None:
        kw["attention_mask"] = torch.tensor(np.asarray(attention_mask))
    if position_ids is not None:
        kw["position_ids"] = torch.tensor(np.asarray(position_ids))
    with torch.no_grad():
        return model(torch.tensor(np.asarray(input_ids)), **kw).logits.float().numpy()


def random_padded_batch(rng: np.random.Generator, batch: int, length: int, vocab: int, min_len: int = 2):
    """Random ids with random left padding: (input_ids, attention_mask) as int32 numpy arrays."""
    ids = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    for b in range(batch):
        mask[b, : length - rng.integers(min_len, length + 1)] = 0
    mask[0] = 1  # one unpadded row
    return np.where(mask == 1, ids, 0).astype(np.int32), mask


def _logits(model, input_ids, attention_mask, segment_ids):
    return model(input_ids, attention_mask, segment_ids=segment_ids)


def logits_of(model, input_ids, attention_mask=None, segment_ids=None):
    """model(...) compiled once per shape: eager NNX dispatch is slow on a busy 2-core machine."""
    from flax import nnx

    global _JIT_LOGITS
    if "_JIT_LOGITS" not in globals():
        _JIT_LOGITS = nnx.jit(_logits)
    return _JIT_LOGITS(model, input_ids, attention_mask, segment_ids)
