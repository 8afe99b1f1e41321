"""A micro-world Qwen3 teacher that learns long-context retrieval, evaluable to 128K tokens on a GPU.

    python -m hybrid_jax.pretrain --config=configs/long_context_teacher.py --workdir=runs/lc_teacher

The shape of configs/teacher_micro.py (4 layers, hidden 128), trained only on the passkey /
MQAR chats of `microworld.long_context_chats` (contexts of 64-160 tokens, replies only in the
loss), packed into rows of 256 tokens, for 2000 steps. max_position_embeddings is 262144 only
so that evaluation may ask at 128K (on a GPU) and 32K (on the CPU): RoPE has no table to
outgrow, and nothing was trained beyond 256 positions (scripts/run_long_context.py measures what
that gives). Five earlier recipes
(corpus and QA mixed in, longer contexts, bare-digit replies, at most 1200 steps) never left
chance; this one learnt passkey retrieval after a loss drop near step 1300 (docs/long_context.md).
"""

import os

from hybrid_jax.pretrain import load_config_file

# Contexts of the training chats in tokens; a chat adds ~25 template and reply tokens, so the
# longest fits one 256-token row unsplit. Retrieval only: with the corpus and QA taking most
# of the steps, no recipe learnt it (docs/long_context.md).
TRAIN_MIN, TRAIN_MAX = 64, 160
TRAIN_SPLIT = f"long_context_{TRAIN_MIN}_{TRAIN_MAX}"


def get_config():
    # configs/teacher_micro.py's model, tokenizer, optimiser and schedule; longer rows, more steps.
    config = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "teacher_micro.py"))
    config.model.max_position_embeddings = 262144
    config.data.split = TRAIN_SPLIT
    config.train.batch_size = 16
    config.train.seq_len = 256
    config.train.checkpoint_every = 100
    config.stages.pretrain.steps = 2000
    return config
