"""Scoring: log-likelihoods against transformers' PyTorch model, answer extraction, tables."""

import numpy as np
import pytest
from transformers import AutoTokenizer

import hybrid_jax as hj
from hybrid_jax.eval import scoring
from tests.fixtures import hf_logits, load_hf, write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_scoring"))
    return path, hj.load_pretrained(str(path)), load_hf(path)


def _torch_continuation_logprob(hf_model, ctx, cont):
    seq = np.asarray([list(ctx) + list(cont)], np.int64)
    logits = hf_logits(hf_model, seq)[0].astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    positions = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    return sum(logp[t, seq[0, t + 1]] for t in positions), all(np.argmax(logits[t]) == seq[0, t + 1] for t in positions)


def test_continuation_logprobs_match_transformers(tiny):
    _, model, hf_model = tiny
    rng = np.random.default_rng(0)
    contexts = [rng.integers(0, 256, n).tolist() for n in (3, 9, 1, 17, 5)]
    conts = [rng.integers(0, 256, n).tolist() for n in (2, 1, 6, 3, 4)]
    # batch_size 2 splits into several batches, including a short last one.
    got, greedy = scoring.continuation_logprobs(model, contexts, conts, batch_size=2)
    for i, (c, x) in enumerate(zip(contexts, conts)):
        want, want_greedy = _torch_continuation_logprob(hf_model, c, x)
        assert got[i] == pytest.approx(want, abs=1e-3, rel=1e-5)
        assert greedy[i] == want_greedy


def test_greedy_flag_true_for_models_own_argmax(tiny):
    _, model, hf_model = tiny
    ctx = [5, 17, 200, 3]
    seq = list(ctx)
    for _ in range(3):  # extend the context by the model's own argmax tokens
        seq.append(int(np.argmax(hf_logits(hf_model, np.asarray([seq]))[0, -1])))
    _, greedy = scoring.continuation_logprobs(model, [ctx], [seq[len(ctx):]])
    assert greedy[0]


def test_loglikelihood_mc_picks_the_oracles_best_option(tiny):
    path, model, hf_model = tiny
    tok = AutoTokenizer.from_pretrained(str(path))
    items = [{"question": "Where does Vorak live?", "choices": ["Brel", "Zintaroo", "Ka", "Mounsel"], "answer_index": a}
             for a in range(4)]
    ctx = tok(scoring.chat_prompt(tok, items[0]["question"], "builtin"), add_special_tokens=False)["input_ids"]
    conts = [tok(c, add_special_tokens=False)["input_ids"] for c in items[0]["choices"]]
    oracle = [_torch_continuation_logprob(hf_model, ctx, x)[0] for x in conts]
    best = int(np.argmax(oracle))
    best_norm = int(np.argmax(np.asarray(oracle) / np.asarray([len(c) for c in items[0]["choices"]])))
    res = scoring.score_multiple_choice_loglikelihood(model, tok, items, chat_template="builtin")
    # Exactly one of the four items names the oracle's choice as the answer.
    assert res["acc"] == 0.25 and res["acc_norm"] == 0.25
    res_one = scoring.score_multiple_choice_loglikelihood(model, tok, [items[best]], chat_template="builtin")
    assert res_one["acc"] == 1.0
    res_norm = scoring.score_multiple_choice_loglikelihood(model, tok, [items[best_norm]], chat_template="builtin")
    assert res_norm["acc_norm"] == 1.0


@pytest.mark.parametrize("reply, want", [
    ("B", 1), ("B. blue", 1), ("(c)", 2), ("  d) green", 3), ("It is blue.", 1), ("Blue", 1),
    ("red or blue", None), ("purple", None), ("", None), ("Both", None),
])
def test_extract_choice(reply, want):
    assert scoring.extract_choice(reply, ["red", "blue", "white", "green"]) == want


def test_extract_choice_single_letter_option_text_is_not_a_letter():
    # Option texts "b" and "a": a reply "a" names option 1's text, not letter A.
    assert scoring.extract_choice("a", ["b", "a", "x", "y"]) == 1


def test_open_generation_exact_match(tiny, monkeypatch):
    path, model, _ = tiny
    tok = AutoTokenizer.from_pretrained(str(path))
    replies = iter([["Brel.", " the brel ", "Zintaroo"]])
    monkeypatch.setattr(scoring, "generate", lambda *a, **k: next(replies))
    items = [{"question": "q1", "answer": "Brel"}, {"question": "q2", "answer": "The Brel"},
             {"question": "q3", "answer": "Ka"}]
    res = scoring.score_open_generation(model, tok, items, chat_template="builtin")
    assert res["acc"] == pytest.approx(2 / 3)


def test_comparison_table_retention_and_gap():
    teacher = dict(mc_loglik_acc=0.9, mc_loglik_acc_norm=0.9, mc_generation_acc=0.8, open_generation_acc=0.6)
    student = dict(mc_loglik_acc=0.85, mc_loglik_acc_norm=0.8, mc_generation_acc=0.4, open_generation_acc=0.3)
    table = scoring.comparison_table({"teacher": teacher, "student": student})
    lines = table.splitlines()
    assert lines[2].endswith("| +10.0 pts | 100.0% |")
    assert lines[3].endswith("| +45.0 pts | 50.0% |")
    with pytest.raises(ValueError, match="reference model 'teacher'"):
        scoring.comparison_table({"student": student})


def test_empty_inputs_are_rejected(tiny):
    _, model, _ = tiny
    with pytest.raises(ValueError, match="pair 0 has an empty"):
        scoring.continuation_logprobs(model, [[]], [[1]])
    with pytest.raises(ValueError, match="must not be empty"):
        scoring.evaluate_qa(model, None, multiple_choice=[], open_questions=[])
