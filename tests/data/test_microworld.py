"""The micro-world generator: determinism, consistency of facts and evaluation sets."""

import dataclasses
import re
from collections import Counter

import pytest

from hybrid_jax.data import microworld as mw


def test_world_is_a_function_of_the_seed():
    a, b, c = mw.World(), mw.World(), mw.World(mw.WorldConfig(seed=1))
    for task in ("corpus", "instruct", "open", "mc"):
        assert a.task(task) == b.task(task)
    assert a.facts != c.facts


def test_sizes_follow_the_config():
    cfg = mw.WorldConfig(num_people=7, num_cities=5, num_companies=4, num_creatures=6,
                         corpus_variants=2, question_templates=2)
    w = mw.World(cfg)
    n_facts = 7 * 3 + 4 * 3 + 6 * 2
    assert len(w.facts) == n_facts == len(w.open_questions()) == len(w.multiple_choice())
    assert len(w.corpus()) == 2 * (7 + 4 + 6)
    assert len(w.instruct()) == (2 + 1) * n_facts  # 2 phrasings + 1 lettered-options chat per fact
    assert len(mw.World(dataclasses.replace(cfg, mc_instruct=0)).instruct()) == 2 * n_facts
    names = w.people + w.cities + w.companies + w.creatures
    assert len(set(names)) == len(names)
    with pytest.raises(ValueError, match="num_cities"):
        mw.WorldConfig(num_cities=3)
    with pytest.raises(ValueError, match="unknown micro-world setting"):
        mw.WorldConfig.from_dict({"num_peoples": 3})
    assert mw.WorldConfig.from_dict("large") == mw.LARGE_WORLD
    assert mw.WorldConfig.from_dict({}) == mw.WorldConfig.from_dict("default")
    with pytest.raises(ValueError, match="preset"):
        mw.WorldConfig.from_dict("huge")


def test_questions_are_unambiguous_and_answers_are_the_facts():
    w = mw.World()
    qs = w.open_questions()
    assert len({q["question"] for q in qs}) == len(qs)
    for q, f in zip(qs, w.facts, strict=True):
        assert q["answer"] == f.value and q["entity"] == f.entity
        assert f.entity in q["question"]
    # Every fact is stated in the corpus and asked (with its answer) in the instruct data.
    corpus = " ".join(d["text"] for d in w.corpus())
    qa = {(c["messages"][0]["content"], c["messages"][1]["content"]) for c in w.instruct()}
    for q, f in zip(qs, w.facts, strict=True):
        spec = w.spec(f)
        assert any(t.format(s=f.entity, v=f.value) in corpus for t in spec.statements)
        assert (q["question"], f.value) in qa


def test_multiple_choice_has_one_correct_option_from_the_same_domain():
    w = mw.World()
    positions = Counter()
    for e, f in zip(w.multiple_choice(), w.facts, strict=True):
        assert len(e["choices"]) == 4 == len(set(e["choices"]))
        assert e["choices"][e["answer_index"]] == f.value
        assert set(e["choices"]) <= set(w.domains[w.spec(f).domain])
        positions[e["answer_index"]] += 1
    assert set(positions) == {0, 1, 2, 3}  # the answer is not always in one place
    text = mw.format_multiple_choice(w.multiple_choice()[0])
    assert text.endswith("\nAnswer:") and "\nD. " in text


def test_lettered_option_chats_teach_the_format_not_the_test_draw():
    w = mw.World()
    evaluation = {mw.options_text(e) for e in w.multiple_choice()}
    chats = [c["messages"] for c in w.instruct() if "\nA. " in c["messages"][0]["content"]]
    assert len(chats) == len(w.facts)
    for (user, assistant), f in zip(chats, w.facts, strict=True):
        assert user["content"].startswith(w.spec(f).questions[0].format(s=f.entity))
        assert assistant["content"] == f.value and f". {f.value}\n" in user["content"] + "\n"
    # Fresh distractors: (almost) no training prompt repeats an evaluation prompt verbatim.
    assert sum(c[0]["content"] in evaluation for c in chats) < len(chats) // 10


@pytest.mark.parametrize("length", [256, 1024])
def test_associative_recall(length):
    exs = mw.associative_recall(length, num_examples=3, num_queries=5, seed=3)
    assert exs == mw.associative_recall(length, num_examples=3, num_queries=5, seed=3)
    for e in exs:
        pairs = dict(re.findall(r"^(\w+): (\d+)$", e["context"], re.M))
        assert len(e["context"].split()) <= length
        assert len(e["context"].split()) > length - 10  # filled up to the budget
        assert [pairs[k] for k in e["queries"]] == e["answers"]
        assert mw.mqar_prompt(e, 0).endswith(f"value of {e['queries'][0]}?")
    # Lengths in tokens of any tokenizer via count_tokens.
    e = mw.associative_recall(length, 1, count_tokens=len)[0]
    assert length - 20 < len(e["context"]) <= length
    with pytest.raises(ValueError, match="num_queries"):
        mw.associative_recall(16, 1, num_queries=8)


def test_passkey():
    for length in (1024, 4096):
        for e in mw.passkey(length, num_examples=4, seed=1):
            assert e["context"].count(e["answer"]) == 2 and len(e["answer"]) == 5
            assert 0.8 * length < len((e["context"] + e["question"]).split()) <= length
            assert 0 <= e["depth_percent"] <= 100
