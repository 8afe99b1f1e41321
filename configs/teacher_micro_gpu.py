"""A ~100M-parameter Qwen3 teacher trained on the large micro-world on one H100 / H200 in minutes.

    python -m hybrid_jax.pretrain --config=configs/teacher_micro_gpu.py --workdir=/tmp/teacher_gpu

Model: Qwen3 shape, 12 layers, hidden 768, 8 query / 4 key-value heads of 128 (GQA, q/k norm),
MLP 2560, tied embeddings, vocabulary 4096 (the micro-world BPE of the large world):
102.3M parameters. bf16 compute, fp32 master weights and optimiser state.

World: `microworld.LARGE_WORLD` (2000 people, 100 cities, 500 companies, 500 creatures;
8500 facts): 12,000 fact documents and 34,000 chats (3 question phrasings and one lettered-
options chat per fact), mixed with equal weights, loss on every corpus token and on the
assistant turns of chats. Packed 64 x 512 tokens per step (about 1,230 documents; 97.5%
of the positions are real tokens), so one pass over the chats takes about 55 steps.

Budget, estimated from FLOPs (not measured when this file was written): a step computes
64 x 512 = 32,768 positions at 6 x 102.2M (dense) + 6 x 12 x 1024 x 512 (causal attention)
= 651 MFLOP each, 21.3 TFLOP per step. At 30-40% MFU of ~800 TFLOP/s (the bf16 matrix rate
measured on this workplace's H100/H200; the datasheet says 989) that is 240-320 TFLOP/s,
67-89 ms a step, 370K-490K tokens/s. 3000 steps (98M tokens, about 55 passes over every
chat and 150 over every fact document) then take 3.3-4.5 minutes, leaving room for the
compile (~1 min), the first epoch's tokenisation (data-bound for ~50 steps), the export and
the evaluation of all 8500 facts within a 9-minute device call. The run prints and writes
(WORKDIR/pretrain_results.json) the measured tokens/s and MFU; if they are higher than this
estimate, there is room for more steps.

Evaluation (at the end, on the large world): the 8500 open questions by greedy generation,
and the 8500 four-option questions by log-likelihood ranking and by generation.
"""

from hybrid_jax.config import default_config, stage_config


def get_config():
    config = default_config()
    config.model.hidden_size = 768
    config.model.intermediate_size = 2560
    config.model.num_hidden_layers = 12
    config.model.num_attention_heads = 8
    config.model.num_key_value_heads = 4
    config.model.head_dim = 128
    config.model.max_position_embeddings = 4096
    config.tokenizer.vocab_size = 4096
    config.data.source = "micro_world"
    config.data.split = "train"  # corpus + instruct
    config.data.world = "large"
    config.data.loss_mask = "completion"  # chats: assistant turns only; text documents: every token
    config.train.batch_size = 64
    config.train.seq_len = 512
    config.train.compute_dtype = "bfloat16"
    config.train.param_dtype = "float32"
    config.train.log_every = 100
    config.train.checkpoint_every = 1_000_000  # only the final checkpoint: a save costs a step's time
    config.train.keep_checkpoints = 1
    config.train.tensorboard = False  # metrics.jsonl only; tensorboardX is not on the GPU machine
    config.stages.pretrain = stage_config(type="sft", steps=3000, lr=1e-3, schedule="wsd", warmup_frac=0.05,
                                          decay_frac=0.2, weight_decay=0.0, clip_norm=1.0)
    config.stage_order = "pretrain"
    config.eval.max_items = 0  # all 8500 facts
    config.eval.batch_size = 500  # divides 8500 and 34000 (4 options each): no ragged last batch to compile
    return config
