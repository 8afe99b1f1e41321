"""A ~1M-parameter Qwen3 teacher trained on the micro-world on a CPU in minutes.

    python -m hybrid_jax.pretrain --config=configs/teacher_micro.py --workdir=runs/teacher_micro

Data: the micro-world's fact corpus (every token) and its chat QA (assistant turns only),
mixed; the evaluation asks the open questions about the same facts by greedy generation.
"""

from hybrid_jax.config import default_config, stage_config


def get_config():
    config = default_config()
    config.model.hidden_size = 128
    config.model.intermediate_size = 384
    config.model.num_hidden_layers = 4
    config.model.num_attention_heads = 4
    config.model.num_key_value_heads = 2
    config.model.head_dim = 32
    config.model.max_position_embeddings = 4096
    config.tokenizer.vocab_size = 1024
    config.data.source = "micro_world"
    config.data.split = "train"  # corpus + instruct
    config.data.loss_mask = "completion"  # chats: assistant turns only; text documents: every token
    config.train.batch_size = 16
    config.train.seq_len = 128
    config.train.log_every = 25
    config.train.checkpoint_every = 200
    config.stages.pretrain = stage_config(type="sft", steps=400, lr=3e-3, schedule="wsd", warmup_frac=0.05,
                                          decay_frac=0.3, weight_decay=0.0, clip_norm=1.0)
    config.stage_order = "pretrain"
    config.eval.max_items = 0
    return config
