"""AllMem for Qwen3-0.6B (arXiv 2602.13680): every attention layer becomes SWA + alpha * TTT memory.

    python -m hybrid_jax.distill --config=configs/qwen3_0p6b_allmem.py --workdir=runs/allmem \
        --config.teacher.path=/path/to/Qwen3-0.6B --config.data.path=/data/pretrain.jsonl

Memory-efficient fine-tuning: only the memory and the gate alpha train (the SWA part keeps the
teacher's attention weights), with a KL loss against the original model. alpha starts at 0,
so step 0 computes exactly the sliding-window model. Window, sinks and memory chunk are drawn
per step within the paper's ranges (window 512-8192, sinks 0-256, chunk 512-4096); evaluation
and export use the configured values (window 4096, 64 sinks, chunk 1024).
"""

from hybrid_jax.config import default_config, stage_config
from hybrid_jax.layers.allmem import ALLMEM_TRAINABLE_REGEX


def get_config():
    config = default_config()
    config.teacher.dtype = "bfloat16"
    config.student.preset = "all_allmem"
    config.student.mixers.allmem = dict(window=4096, sinks=64, chunk_size=1024)
    config.student.randomize.enabled = True
    config.train.batch_size = 64
    config.train.seq_len = 4096
    config.train.compute_dtype = "bfloat16"
    config.train.param_dtype = "float32"
    config.train.remat = True
    config.train.checkpoint_every = 500
    config.data.source = "jsonl"
    config.data.loss_mask = "all"
    config.stages.memory = stage_config(type="logit_kd", tokens=500_000_000, loss="forward_kl", lr=2.5e-5,
                                        schedule="wsd", warmup_frac=0.1, decay_frac=0.1,
                                        trainable=f"re:{ALLMEM_TRAINABLE_REGEX}")
    config.stage_order = "memory"
    return config
