"""Long-context training chats: well formed, seeded, and carried by the data pipeline with
completion masks on exactly the answer; the run script's evaluation prompts fit their length."""

import re

import numpy as np
import pytest

from hybrid_jax.data import chat, microworld, pipeline
from hybrid_jax.eval import long_context
from tests.fixtures import load_script

run_long_context = load_script("run_long_context")


def _counter(tok):
    return lambda s: len(tok(s, add_special_tokens=False)["input_ids"])


def _answer_in_context(record) -> bool:
    """The answer is where the task put it: the passkey's needle, or the queried key's line."""
    user = record["messages"][0]["content"]
    if record["task"] == "passkey":
        return f"The pass key is {record['answer']}. Remember it." in user
    key = re.search(r"What is the value of (\w+)\?$", user).group(1)
    return re.findall(rf"^{key}: (\d+)$", user, re.M) == [record["answer"]]


def test_chats_are_well_formed(micro_tokenizer):
    count = _counter(micro_tokenizer)
    records = microworld.long_context_chats(24, 100, 600, seed=5, count_tokens=count)
    assert [r["task"] for r in records[:4]] == ["passkey", "mqar", "passkey", "mqar"]
    lengths = [r["context_length"] for r in records]
    assert all(100 <= n <= 600 for n in lengths) and len(set(lengths)) > 12
    for r in records:
        user, assistant = r["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert assistant["content"] == r["reply"] and r["answer"].isdigit()
        # the reply repeats the context's phrase before the answer (an induction copy)
        assert r["reply"] == (f"The pass key is {r['answer']}." if r["task"] == "passkey"
                              else f"{user['content'].rsplit('What is the value of ', 1)[1][:-1]}: {r['answer']}")
        assert len(r["answer"]) == (5 if r["task"] == "passkey" else 4)
        assert _answer_in_context(r), r
        # MQAR's question is asked after a context of at most context_length tokens;
        # passkey's budget includes its question.
        context = user["content"] if r["task"] == "passkey" else user["content"].rsplit("What is", 1)[0]
        assert count(context) <= r["context_length"]
        assert count(context) >= 0.7 * r["context_length"], "the filler should nearly fill the budget"


def test_chats_are_deterministic_in_the_seed():
    a = microworld.long_context_chats(10, 64, 256, seed=1)
    assert a == microworld.long_context_chats(10, 64, 256, seed=1)
    assert microworld.long_context_chats(4, 64, 256, seed=1) == a[:4]  # a longer list extends a shorter one
    b = microworld.long_context_chats(10, 64, 256, seed=2)
    assert [r["answer"] for r in a] != [r["answer"] for r in b]


def test_bad_ranges_and_task_names():
    with pytest.raises(ValueError, match="min_length <= max_length"):
        microworld.long_context_chats(2, 300, 200)
    with pytest.raises(ValueError, match="tasks=.*choose from"):
        microworld.long_context_chats(2, tasks=("needle",))
    assert microworld.parse_long_context_task("long_context") == (microworld.LONG_CONTEXT_MIN,
                                                                  microworld.LONG_CONTEXT_MAX)
    assert microworld.parse_long_context_task("long_context_64_512") == (64, 512)
    with pytest.raises(ValueError, match="long_context_MIN_MAX"):
        microworld.World().task("long_context_64")


def test_loss_mask_covers_exactly_the_reply(micro_tokenizer):
    records = microworld.long_context_chats(6, 80, 300, seed=0, count_tokens=_counter(micro_tokenizer))
    docs = chat.encode_chats(micro_tokenizer, [r["messages"] for r in records], loss_mask="completion")
    for r, (ids, mask) in zip(records, docs, strict=True):
        assert micro_tokenizer.decode(ids[mask]) == r["reply"] + chat.END_OF_TURN
        # one contiguous run at the end of the chat (only the newline after <|im_end|> follows)
        idx = np.flatnonzero(mask)
        assert np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx))) and idx[-1] >= len(ids) - 2


def test_split_mixtures_parse():
    assert pipeline._microworld_split("train") == [("corpus", 1.0), ("instruct", 1.0)]
    assert pipeline._microworld_split("") == [("corpus", 1.0), ("instruct", 1.0)]
    assert pipeline._microworld_split("train*2+long_context_64_512") == [
        ("corpus", 2.0), ("instruct", 2.0), ("long_context_64_512", 1.0)]
    for bad in ("corpus*0", "corpus*x", "corpus++instruct"):
        with pytest.raises(ValueError, match="optional '\\*weight' > 0"):
            pipeline._microworld_split(bad)


def test_long_context_split_flows_through_the_pipeline(micro_tokenizer):
    cfg = {"source": "micro_world", "split": "instruct+long_context_64_200*3", "loss_mask": "completion"}
    stream, (specs, _), _ = pipeline.build_stream(cfg, seed=0, shard=(0, 1))
    assert [(s["task"], s.get("weight", 1.0)) for s in specs] == [("instruct", 1.0), ("long_context_64_200", 3.0)]
    it = pipeline.make_batches(cfg, micro_tokenizer, seq_len=256, batch_size=4, seed=0, shard=(0, 1), prefetch=0)
    replies = {r["reply"] for r in microworld.World().task("long_context_64_200")}
    targets = []
    for _ in range(3):
        batch = next(it)
        ids, mask, seg = (np.asarray(batch[k]) for k in ("input_ids", "loss_mask", "segment_ids"))
        for row in range(ids.shape[0]):
            for s in np.unique(seg[row][seg[row] > 0]):
                sel = (seg[row] == s) & mask[row].astype(bool)
                targets.append(micro_tokenizer.decode(ids[row][sel]))
    lc = [t for t in targets if t.removesuffix(chat.END_OF_TURN) in replies]
    assert len(lc) >= 6, "the weighted long-context chats should make up much of the stream"
    assert all(t.endswith(chat.END_OF_TURN) for t in targets)


@pytest.mark.parametrize("task", ["passkey", "mqar"])
def test_evaluation_prompts_fit_their_length(micro_tokenizer, task):
    count = _counter(micro_tokenizer)
    prompts, answers, longest = run_long_context.retrieval_items(task, 512, micro_tokenizer, examples=2,
                                                                 queries=2, seed=3)
    assert len(prompts) == len(answers) == (2 if task == "passkey" else 4)
    assert longest == max(count(p) for p in prompts) and 440 <= longest <= 512
    for p, a in zip(prompts, answers, strict=True):
        assert p.startswith("<|im_start|>user\n") and p.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert a in p
    assert long_context.first_number(" 12345.</s>") == "12345"
    assert long_context.first_number("none") is None
