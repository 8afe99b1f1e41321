"""Is the default micro-world learnable by a tiny Qwen3? An independent check in PyTorch.

    PYTHONPATH=. python scripts/microworld_learnability_torch.py [--steps 400] [--hidden 128]

Trains transformers' own `Qwen3ForCausalLM` (random init, no project model code) on the
corpus + instruct mixture from `hybrid_jax.data.make_batches` (packed rows; segments become
a block-diagonal causal mask, positions restart per document) and reports greedy
open-question accuracy on the world's facts every `--eval_every` steps. Counts steps and
tokens, so the result does not depend on how busy the CPU is.
"""

import argparse
import math
import tempfile
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from hybrid_jax.data import chat, make_batches, microworld
from hybrid_jax.data.tokenizer import build_tokenizer


def accuracy(model, tok, questions, batch=90) -> float:
    model.eval()
    tok.padding_side = "left"
    correct = 0
    with torch.no_grad():
        for i in range(0, len(questions), batch):
            qs = questions[i:i + batch]
            prompts = [chat.render_chat(tok, [{"role": "user", "content": q["question"]}],
                                        add_generation_prompt=True) for q in qs]
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=8, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            for q, o in zip(qs, out[:, enc.input_ids.shape[1]:], strict=True):
                correct += tok.decode(o, skip_special_tokens=True).strip() == q["answer"]
    model.train()
    return correct / len(questions)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    tok = build_tokenizer(tempfile.mkdtemp())
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=a.hidden,
                      intermediate_size=a.hidden * 8 // 3 // 32 * 32,
                      num_hidden_layers=a.layers, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=a.hidden // 4, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=None)
    cfg._attn_implementation = "sdpa"
    model = Qwen3ForCausalLM(cfg)
    print(f"params {sum(x.numel() for x in model.parameters()) / 1e6:.2f}M", flush=True)
    data = {"sources": [{"kind": "microworld", "task": "corpus"},
                        {"kind": "microworld", "task": "instruct"}]}
    it = make_batches(data, tok, a.seq_len, a.batch, seed=0, shard=(0, 1), prefetch=2)
    questions = microworld.World().open_questions()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.01)
    T = a.seq_len
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    t0 = time.time()
    for step in range(1, a.steps + 1):
        b = {k: torch.from_numpy(v).long() for k, v in next(it).items()}
        seg = b["segment_ids"]
        allowed = (seg[:, :, None] == seg[:, None, :]) & causal & (seg[:, None, :] > 0)
        allowed |= torch.eye(T, dtype=torch.bool)  # padding rows attend to themselves: no NaN
        mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, float("-inf"))
        logits = model(input_ids=b["input_ids"], attention_mask=mask[:, None],
                       position_ids=b["positions"]).logits
        w = b["loss_mask"][:, 1:].float().reshape(-1)
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               b["input_ids"][:, 1:].reshape(-1), reduction="none")
        loss = (ce * w).sum() / w.sum()
        warm = min(1.0, step / 30)
        cos = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / a.steps))
        for g in opt.param_groups:
            g["lr"] = a.lr * warm * cos
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0:
            print(f"step {step} {time.time() - t0:.0f}s loss {loss.item():.3f}", flush=True)
        if step % a.eval_every == 0 or step == a.steps:
            acc = accuracy(model, tok, questions)
            print(f"step {step} tokens {step * a.batch * T} open-question accuracy {acc:.3f}",
                  flush=True)
    it.close()


if __name__ == "__main__":
    main()
