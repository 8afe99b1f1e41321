"""A micro-world Qwen3 teacher that also learns long-context retrieval, evaluable to 32K tokens.

    python -m hybrid_jax.pretrain --config=configs/long_context_teacher.py --workdir=runs/lc_teacher

The shape of configs/teacher_micro.py (4 layers, hidden 128), trained on the fact corpus, the
chat QA and the passkey / MQAR chats of `microworld.long_context_chats` (contexts of 64-480
tokens, answers only in the loss), packed into rows of 512 tokens. max_position_embeddings
is 65536 only so that evaluation may ask at 32K: RoPE has no table to outgrow, and nothing
was trained beyond 512 positions (scripts/run_long_context.py measures what that gives).
"""

import os

from hybrid_jax.pretrain import load_config_file

# Contexts of the long-context chats in tokens; a chat adds ~25 template and answer tokens,
# so the longest still fits one 512-token row unsplit. Short contexts put many answers in
# each step: with 128-960 tokens and 2:2:1 weights, 300 steps did not teach retrieval at all
# (the model answered a constant 99666, docs/long_context.md).
TRAIN_MIN, TRAIN_MAX = 64, 480
TRAIN_SPLIT = f"corpus+instruct+long_context_{TRAIN_MIN}_{TRAIN_MAX}*4"


def get_config():
    # configs/teacher_micro.py's model, tokenizer, optimiser and schedule; longer rows, fewer steps.
    config = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "teacher_micro.py"))
    config.model.max_position_embeddings = 65536
    # Sampled by record: 2/3 of the records and ~90% of the tokens are long-context chats.
    config.data.split = TRAIN_SPLIT
    config.train.batch_size = 8
    config.train.seq_len = 512
    config.train.checkpoint_every = 100
    config.stages.pretrain.steps = 300
    return config
