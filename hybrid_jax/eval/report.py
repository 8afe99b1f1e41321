"""End-of-run evaluation: every model on the same items, both scorings, one table.

`evaluate_models({"teacher": t, "student": s}, tokenizer, config.eval)` scores each model on
the micro-world's multiple-choice items (log-likelihood ranking and generation) and open
questions (generation), optionally on passkey / associative recall at the configured
context lengths, and returns the results with a markdown table; `write_report` saves
`eval.json`, `eval.md` and the long-context plots into a directory.
"""

from __future__ import annotations

import json
import os

from hybrid_jax.data import microworld
from hybrid_jax.eval import long_context, scoring


def _lengths(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def _limit(items: list, n: int) -> list:
    return items[:n] if n > 0 else items


def evaluate_models(models: dict, tokenizer, eval_cfg, *, world=None, log=print) -> dict:
    """{"qa": {name: metrics}, "passkey": {name: {len: acc}}, "mqar": {...}, "table": markdown}.

    world: the `microworld.WorldConfig` whose questions are asked (default: the default world;
    runs pass `microworld.data_world(config.data)`, the world they trained on)."""
    world = microworld.World(world or microworld.WorldConfig())
    mc = _limit(world.multiple_choice(), eval_cfg.max_items)
    opn = _limit(world.open_questions(), eval_cfg.max_items)
    out: dict = {"qa": {}, "passkey": {}, "mqar": {}}
    for name, model in models.items():
        log(f"evaluating {name}: {len(mc)} multiple-choice items (log-likelihood and generation), "
            f"{len(opn)} open questions (generation)")
        out["qa"][name] = scoring.evaluate_qa(model, tokenizer, multiple_choice=mc, open_questions=opn,
                                              batch_size=eval_cfg.batch_size, max_new_tokens=eval_cfg.max_new_tokens)
        if _lengths(eval_cfg.passkey_lengths):
            out["passkey"][name] = long_context.passkey_accuracy(
                model, tokenizer, _lengths(eval_cfg.passkey_lengths), truncation=eval_cfg.truncation,
                chat=eval_cfg.long_context_chat)
        if _lengths(eval_cfg.mqar_lengths):
            out["mqar"][name] = long_context.associative_recall_accuracy(
                model, tokenizer, _lengths(eval_cfg.mqar_lengths), truncation=eval_cfg.truncation,
                chat=eval_cfg.long_context_chat)
    reference = "teacher" if "teacher" in models else next(iter(models))
    out["table"] = scoring.comparison_table(out["qa"], reference=reference)
    return out


def write_report(results: dict, directory: str) -> dict[str, str]:
    """eval.json, eval.md and (when measured) long-context PNGs; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    paths = {"json": os.path.join(directory, "eval.json"), "markdown": os.path.join(directory, "eval.md")}
    with open(paths["json"], "w") as f:
        json.dump({k: v for k, v in results.items() if k != "table"}, f, indent=2, default=str)
    lines = ["# Evaluation", "", results["table"], ""]
    for task in ("passkey", "mqar"):
        if results[task]:
            paths[task] = long_context.accuracy_plot(results[task], os.path.join(directory, f"{task}.png"), task)
            lines += [f"## {task}", "", f"![{task}]({task}.png)", "",
                      "| model | " + " | ".join(str(n) for n in next(iter(results[task].values()))) + " |"]
            lines.append("|---" * (1 + len(next(iter(results[task].values())))) + "|")
            for name, curve in results[task].items():
                lines.append(f"| {name} | " + " | ".join(f"{100 * a:.0f}%" for a in curve.values()) + " |")
            lines.append("")
    with open(paths["markdown"], "w") as f:
        f.write("\n".join(lines))
    return paths
