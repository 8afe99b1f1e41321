"""Long-context retrieval after distillation: passkey and MQAR accuracy against context length.

    python scripts/run_long_context.py            # teacher, student(s), tables and plots
    python -m hybrid_jax.distill --config=configs/long_context.py --workdir=runs/long_context

The teacher is configs/long_context_teacher.py (the micro-world Qwen3 trained on passkey and
MQAR chats with contexts of 64-160 tokens only; trained on first use and cached). The student
keeps softmax attention in layer 0 and replaces layers 1-3 with KDA, as configs/quickstart.py,
and every stage reads the same chats: the alignment and logit-KD stages every token, the last
stage the replies only. `eval.passkey_lengths` / `eval.mqar_lengths` are the lengths the script
scores, in tokens of the whole chat prompt, far beyond the 512 tokens of any training row.
"""

import importlib.util
import os

from hybrid_jax.config import default_config, stage_config

_TEACHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "long_context_teacher.py")


def _teacher_module():
    spec = importlib.util.spec_from_file_location("_long_context_teacher", _TEACHER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config():
    teacher = _teacher_module()
    long_context = f"long_context_{teacher.TRAIN_MIN}_{teacher.TRAIN_MAX}"
    config = default_config()
    config.teacher.build = "configs/long_context_teacher.py"
    config.student.layer_spec = "attention:0;kda:1,2,3"
    config.student.mixers.kda = dict(chunk_size=32)
    config.data.source = "micro_world"
    config.train.batch_size = 8
    config.train.seq_len = 512
    config.train.log_every = 10
    config.train.checkpoint_every = 100
    # the teacher knows only these chats (no corpus, no QA), so the student learns from them alone
    text = dict(source="micro_world", split=long_context, loss_mask="all")
    answers = dict(source="micro_world", split=long_context, loss_mask="completion")
    config.stages.align = stage_config(type="attention_alignment", steps=20, lr=3e-3, data=text)
    config.stages.blocks = stage_config(type="hidden_alignment", steps=20, lr=1e-3, data=text)
    config.stages.kd = stage_config(type="logit_kd", steps=50, lr=1e-3, data=text)
    config.stages.instruct = stage_config(type="instruct_kd", steps=60, lr=5e-4, data=answers)
    config.stage_order = "align,blocks,kd,instruct"
    config.eval.enabled = False  # no micro-world QA report: the teacher never learnt the QA
    config.eval.passkey_lengths = "256,512,1024,2048,4096,8192,16384,32768"
    config.eval.mqar_lengths = "256,512,1024,2048,4096"
    config.eval.long_context_chat = True  # the models learnt these tasks as chats
    return config
