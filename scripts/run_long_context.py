"""Long-context retrieval, end to end: passkey and MQAR accuracy against context length for
the teacher and its distilled student(s), on the micro-world, on a CPU.

    .venv/bin/python scripts/run_long_context.py                    # ~42 min on 2 CPU cores
    .venv/bin/python scripts/run_long_context.py --students=kda,allmem

1. Teacher: configs/long_context_teacher.py through `hybrid_jax.pretrain.cached_teacher`
   (trained on first use, cached under ~/.cache/hybrid_jax afterwards).
2. Students: `hybrid_jax.distill`'s `run` on configs/long_context.py, one workdir per student
   (WORKDIR/<name>); a student whose export already exists is reused (--retrain deletes the
   workdir and distils it again).
3. Scoring: at each length of `eval.passkey_lengths` / `eval.mqar_lengths`, prompts asked as
   the chats the models were trained on (user: context + question; the assistant's turn is
   generated greedily, 16 tokens); a reply is right when its first number is the answer. A
   length L means the whole chat prompt has at most L tokens (the context is cut to fit), so
   each length compiles one power-of-two prefill. Items come from seed `--seed` of
   `microworld.passkey` / `associative_recall`, not the training chats' streams.
4. Output (--out, default docs/long_context): results.json, results.md, passkey.png, mqar.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STUDENTS = {"kda": "attention:0;kda:1,2,3", "allmem": "allmem:0-3"}
MAX_NEW_TOKENS = 16  # the learnt reply "The pass key is K." is ~11 tokens; its first number is scored


def _lengths(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def chat_prompt(tokenizer, user: str) -> str:
    from hybrid_jax.data import chat

    return chat.render_chat(tokenizer, [{"role": "user", "content": user}], add_generation_prompt=True)


def retrieval_items(task: str, length: int, tokenizer, *, examples: int, queries: int, seed: int):
    """(chat prompts of at most `length` tokens, answers) for "passkey" or "mqar"."""
    from hybrid_jax.data import microworld

    def count(s):
        return len(tokenizer(s, add_special_tokens=False)["input_ids"])

    # Template tokens around the user turn, plus MQAR's question (passkey's budget has its own).
    overhead = count(chat_prompt(tokenizer, "")) + (count("What is the value of broutai?") if task == "mqar" else 0)
    budget = length - overhead - 4  # a few tokens of slack: BPE merges at the joins
    if task == "passkey":
        ex = microworld.passkey(budget, num_examples=examples, seed=seed, count_tokens=count)
        users, answers = [e["context"] + e["question"] for e in ex], [e["answer"] for e in ex]
    elif task == "mqar":
        ex = microworld.associative_recall(budget, num_examples=examples, num_queries=queries, seed=seed,
                                           count_tokens=count)
        users = [microworld.mqar_prompt(e, i) for e in ex for i in range(queries)]
        answers = [a for e in ex for a in e["answers"]]
    else:
        raise ValueError(f"task {task!r}: choose 'passkey' or 'mqar'")
    prompts = [chat_prompt(tokenizer, u) for u in users]
    longest = max(count(p) for p in prompts)
    if longest > length:
        raise RuntimeError(f"{task} at {length}: a prompt has {longest} tokens; the context budget undercounted")
    return prompts, answers, longest


def evaluate_model(name, model, tokenizer, args, lengths, log) -> dict:
    from hybrid_jax.eval.long_context import score_prompts

    out = {}
    for task in ("passkey", "mqar"):
        out[task] = {}
        for n in lengths[task]:
            long = n >= args.long_from
            examples = args.long_examples if long else (args.passkey_examples if task == "passkey"
                                                        else args.mqar_examples)
            t0 = time.perf_counter()
            prompts, answers, longest = retrieval_items(task, n, tokenizer, examples=examples,
                                                        queries=args.mqar_queries, seed=args.seed)
            acc, replies = score_prompts(model, tokenizer, prompts, answers, max_new_tokens=MAX_NEW_TOKENS,
                                         batch_size=args.batch_size)
            dt = time.perf_counter() - t0
            out[task][n] = {"accuracy": acc, "items": len(answers), "longest_prompt": longest, "seconds": dt,
                            "examples": [{"answer": a, "reply": r} for a, r in list(zip(answers, replies))[:4]]}
            log(f"  {name:>8} {task:<7} {n:>6} tokens: {round(acc * len(answers))}/{len(answers)} "
                f"= {100 * acc:5.1f}%  ({dt:.1f} s)")
    return out


def markdown(results: dict) -> str:
    lines = [f"# Long-context retrieval on the micro-world ({results['date_utc'][:10]}, {results['device']})", "",
             f"Teacher trained on contexts of {results['train_context_tokens'][0]}-"
             f"{results['train_context_tokens'][1]} tokens (rows of {results['train_seq_len']}); "
             "accuracy of greedy answers to chat prompts of at most L tokens.", ""]
    for task in ("passkey", "mqar"):
        curves = {m: r[task] for m, r in results["models"].items() if r[task]}
        if not curves:
            continue
        ns = sorted({int(n) for c in curves.values() for n in c})
        lines += [f"## {task}", "", f"![{task}]({task}.png)", "",
                  "| model | " + " | ".join(str(n) for n in ns) + " |", "|---" * (len(ns) + 1) + "|"]
        for m, c in curves.items():
            cells = [f"{100 * c[n]['accuracy']:.0f}% ({c[n]['items']})" if n in c else "-" for n in ns]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines += ["", "(items per cell in brackets)", ""]
    if results.get("qa_table"):
        lines += ["## Micro-world QA (end of distillation)", "", results["qa_table"], ""]
    lines += ["## Timings (s)", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in results["seconds"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/long_context.py")
    p.add_argument("--workdir", default="runs/long_context")
    p.add_argument("--out", default="docs/long_context")
    p.add_argument("--students", default="kda", help=f"comma-separated, from {sorted(STUDENTS)}")
    p.add_argument("--passkey_lengths", default="", help="default: the config's eval.passkey_lengths")
    p.add_argument("--mqar_lengths", default="", help="default: the config's eval.mqar_lengths")
    p.add_argument("--passkey_examples", type=int, default=8)
    p.add_argument("--mqar_examples", type=int, default=4)
    p.add_argument("--mqar_queries", type=int, default=2)
    p.add_argument("--long_from", type=int, default=16384, help="lengths from here get --long_examples items")
    p.add_argument("--long_examples", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--retrain", action="store_true", help="distil the students again even if exported")
    args = p.parse_args(argv)

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every checkpoint file at INFO
    import jax

    import hybrid_jax as hj
    from hybrid_jax.distill.__main__ import load_teacher, run
    from hybrid_jax.eval.long_context import accuracy_plot
    from hybrid_jax.pretrain import load_config_file

    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f} s] {msg}", flush=True)

    unknown = sorted(set(_names(args.students)) - set(STUDENTS))
    if unknown:
        raise SystemExit(f"--students: unknown {unknown}; choose from {sorted(STUDENTS)}")
    config = load_config_file(args.config)
    lengths = {"passkey": _lengths(args.passkey_lengths or config.eval.passkey_lengths),
               "mqar": _lengths(args.mqar_lengths or config.eval.mqar_lengths)}
    teacher_cfg = load_config_file(config.teacher.build)
    # This script scores the long-context tasks itself, as chats; distill's own report keeps the QA.
    config.eval.passkey_lengths = config.eval.mqar_lengths = ""
    seconds = {}

    log(f"teacher from {config.teacher.build}")
    t0 = time.perf_counter()
    teacher, tokenizer = load_teacher(config, print_fn=log)
    seconds["teacher (train or load)"] = time.perf_counter() - t0

    models, qa_tables = {"teacher": teacher}, {}
    for name in _names(args.students):
        workdir = os.path.join(args.workdir, name)
        export = os.path.join(workdir, "export")
        t0 = time.perf_counter()
        if args.retrain or not os.path.exists(os.path.join(export, "config.json")):
            if args.retrain:  # a fresh run: distill would resume from the workdir's checkpoints
                shutil.rmtree(workdir, ignore_errors=True)
            cfg = load_config_file(args.config)
            cfg.eval.passkey_lengths = cfg.eval.mqar_lengths = ""
            cfg.student.layer_spec = STUDENTS[name]
            log(f"distilling student {name!r} ({STUDENTS[name]}) in {workdir}")
            out = run(cfg, workdir, print_fn=lambda m: log(m) if not m.startswith("resolved config") else None)
            if "eval" in out:
                qa_tables[name] = out["eval"]["table"]
        else:
            log(f"reusing the distilled student {export} (--retrain to distil again)")
        models[name] = hj.load_pretrained(export)
        seconds[f"student {name} (distil or load)"] = time.perf_counter() - t0

    curves = {}
    for name, model in models.items():
        log(f"scoring {name}: passkey at {lengths['passkey']}, MQAR at {lengths['mqar']}")
        t0 = time.perf_counter()
        curves[name] = evaluate_model(name, model, tokenizer, args, lengths, log)
        seconds[f"score {name}"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start

    os.makedirs(args.out, exist_ok=True)
    results = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{jax.devices()[0].device_kind} ({os.cpu_count()}-core {platform.machine()} CPU)"
        if jax.devices()[0].platform == "cpu" else jax.devices()[0].device_kind,
        "command": " ".join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
        "config": args.config, "teacher_config": config.teacher.build,
        "train_context_tokens": train_range(teacher_cfg),
        "train_seq_len": teacher_cfg.train.seq_len,
        "students": {n: STUDENTS[n] for n in _names(args.students)},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
        "models": curves, "qa_table": "\n\n".join(f"{n}:\n\n{t}" for n, t in qa_tables.items()),
        "seconds": seconds,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    for task in ("passkey", "mqar"):
        plot = {m: {n: r["accuracy"] for n, r in c[task].items()} for m, c in curves.items() if c[task]}
        if plot:
            accuracy_plot(plot, os.path.join(args.out, f"{task}.png"),
                          f"{task}: accuracy vs prompt length (trained <= {teacher_cfg.train.seq_len})")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(results))
    log(f"wrote {args.out}/results.json, results.md, passkey.png, mqar.png; total {seconds['total'] / 60:.1f} min")


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def train_range(teacher_cfg) -> list[int] | None:
    """[min, max] context tokens of the long-context chats in the teacher's data split."""
    from hybrid_jax.data import microworld

    for part in teacher_cfg.data.split.split("+"):
        task = part.partition("*")[0]
        if task.startswith("long_context"):
            return list(microworld.parse_long_context_task(task))
    return None


if __name__ == "__main__":
    main()
