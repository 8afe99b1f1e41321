"""GenDistill's Hybrid-KDA recipe for Qwen3-0.6B (arXiv 2603.26556), on your data.

    python -m hybrid_jax.distill --config=configs/qwen3_0p6b_kda.py --workdir=runs/kda \
        --config.teacher.path=/path/to/Qwen3-0.6B \
        --config.stages.align.data.path=/data/pretrain.jsonl --config.stages.blocks.data.path=/data/pretrain.jsonl \
        --config.stages.kd.data.path=/data/pretrain.jsonl --config.stages.instruct.data.path=/data/chat.jsonl

Attention is kept at layers {0,2,6,11,13,18,21} (1:3, 75% less KV cache), the other 21 become
KDA. Stages and token budgets as in the paper: attention-output alignment 30M, block-wise
hidden-state alignment 30M, logit KD on pretraining-style text 500M, KD on instruction data
with completion-only masks and frozen attention 250M; pure forward KL; lr 2.5e-5, batch 64 x
4096, warmup-stable-decay with 10% warmup and 10% decay. Text records are {"text": ...}, chats
{"messages": [...]} (docs/data.md); any source kind works (jsonl, parquet, tfds, hf_disk).

The batch of 64 rows is global. Where 64 rows do not fit your GPUs at once, split it into
microbatches with --config.train.grad_accum=N (N x data x fsdp must divide 64;
docs/training.md). For scale: one H200 ran 4 rows of 4096 tokens per pass without remat and
ran out of memory at 8 (this config turns remat on, which was not measured).
"""

from hybrid_jax.config import default_config, stage_config


def get_config():
    config = default_config()
    config.teacher.dtype = "bfloat16"
    config.student.preset = "qwen3_0p6b_hybrid_kda"
    config.train.batch_size = 64
    config.train.seq_len = 4096
    config.train.compute_dtype = "bfloat16"
    config.train.param_dtype = "float32"
    config.train.remat = True
    config.train.checkpoint_every = 500
    config.data.source = "jsonl"
    text = dict(source="jsonl", loss_mask="all")
    chats = dict(source="jsonl", loss_mask="completion")
    common = dict(lr=2.5e-5, schedule="wsd", warmup_frac=0.1, decay_frac=0.1)
    config.stages.align = stage_config(type="attention_alignment", tokens=30_000_000, data=text, **common)
    config.stages.blocks = stage_config(type="hidden_alignment", tokens=30_000_000, data=text, **common)
    config.stages.kd = stage_config(type="logit_kd", tokens=500_000_000, loss="forward_kl", data=text, **common)
    config.stages.instruct = stage_config(type="instruct_kd", tokens=250_000_000, loss="forward_kl", data=chats,
                                          **common)
    config.stage_order = "align,blocks,kd,instruct"
    return config
