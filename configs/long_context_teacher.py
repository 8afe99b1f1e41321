"""A micro-world Qwen3 teacher that also learns long-context retrieval, evaluable to 32K tokens.

    python -m hybrid_jax.pretrain --config=configs/long_context_teacher.py --workdir=runs/lc_teacher

The shape of configs/teacher_micro.py (4 layers, hidden 128), trained on the fact corpus, the
chat QA and the passkey / MQAR chats of `microworld.long_context_chats` (contexts of 64-480
tokens, answers only in the loss), packed into rows of 512 tokens. max_position_embeddings
is 65536 only so that evaluation may ask at 32K: RoPE has no table to outgrow, and nothing
was trained beyond 512 positions (scripts/run_long_context.py measures what that gives).
"""

from hybrid_jax.config import default_config, stage_config

# Contexts of the long-context chats in tokens; a chat adds ~25 template and answer tokens,
# so the longest still fits one 512-token row unsplit. Short contexts put many answers in
# each step: with 128-960 tokens and 2:2:1 weights, 300 steps did not teach retrieval at all
# (the model answered a constant 99666, docs/long_context.md).
TRAIN_MIN, TRAIN_MAX = 64, 480
TRAIN_SPLIT = f"corpus+instruct+long_context_{TRAIN_MIN}_{TRAIN_MAX}*4"


def get_config():
    config = default_config()
    config.model.hidden_size = 128
    config.model.intermediate_size = 384
    config.model.num_hidden_layers = 4
    config.model.num_attention_heads = 4
    config.model.num_key_value_heads = 2
    config.model.head_dim = 32
    config.model.max_position_embeddings = 65536
    config.tokenizer.vocab_size = 1024
    config.data.source = "micro_world"
    # Sampled by record: 2/3 of the records and ~90% of the tokens are long-context chats.
    config.data.split = TRAIN_SPLIT
    config.data.loss_mask = "completion"  # chats: the answer only; text documents: every token
    config.train.batch_size = 8
    config.train.seq_len = 512
    config.train.log_every = 25
    config.train.checkpoint_every = 100
    config.stages.pretrain = stage_config(type="sft", steps=300, lr=3e-3, schedule="wsd", warmup_frac=0.05,
                                          decay_frac=0.3, weight_decay=0.0, clip_norm=1.0)
    config.stage_order = "pretrain"
    config.eval.max_items = 0
    return config
