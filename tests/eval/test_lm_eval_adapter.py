"""The lm-eval adapter on local task YAMLs over local data files (no hub access).

Oracles: transformers' PyTorch model for log-likelihoods (multiple choice) and for greedy
generation (generate_until); lm-eval must report the accuracies those oracles imply.
"""

import json
import textwrap

import numpy as np
import pytest

pytest.importorskip("lm_eval", reason="lm-eval is in the dev extras")

import lm_eval  # noqa: E402
import torch  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import hybrid_jax as hj  # noqa: E402
from hybrid_jax.eval.lm_eval_adapter import HybridJaxLM  # noqa: E402
from tests.fixtures import hf_logits, load_hf, write_tiny_checkpoint  # noqa: E402

QUESTIONS = ["Where does Vorak live?", "What does Brel make?", "Which colour is Zint?", "Who founded Kaloo?"]
CHOICES = [["Brel", "Zin", "Ka", "Mounsel"], ["lamps", "boats", "tea", "glass"], ["red", "blue", "pink", "white"],
           ["Tra", "Dousil", "Kroon", "Vest"]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_lmeval"))
    return path, hj.load_pretrained(str(path)), AutoTokenizer.from_pretrained(str(path)), load_hf(path)


def _write_task(directory, name, yaml_body, docs):
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (directory / f"{name}.yaml").write_text(textwrap.dedent(f"""\
        task: {name}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        """) + textwrap.dedent(yaml_body))


def _oracle_logprob(hf_model, tok, context, continuation):
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    logits = hf_logits(hf_model, np.asarray([whole]))[0].astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return sum(logp[t - 1, whole[t]] for t in range(len(ctx), len(whole)))


def test_multiple_choice_task_matches_the_torch_oracle(tiny, tmp_path):
    path, model, tok, hf_model = tiny
    docs = [{"question": q, "choices": c, "label": i % 4} for i, (q, c) in enumerate(zip(QUESTIONS, CHOICES))]
    _write_task(tmp_path, "micro_mc", """\
        output_type: multiple_choice
        doc_to_text: "Question: {{question}}\\nAnswer:"
        doc_to_choice: "{{choices}}"
        doc_to_target: label
        metric_list:
          - metric: acc
        """, docs)
    want = np.mean([int(np.argmax([_oracle_logprob(hf_model, tok, f"Question: {d['question']}\nAnswer:", " " + c)
                                   for c in d["choices"]]) == d["label"]) for d in docs])
    out = lm_eval.simple_evaluate(model=HybridJaxLM(model, tok, batch_size=4), tasks=["micro_mc"],
                                  task_manager=TaskManager(include_path=str(tmp_path)))
    assert out["results"]["micro_mc"]["acc,none"] == pytest.approx(want)


def test_loglikelihood_values_and_rolling(tiny):
    _, model, tok, hf_model = tiny

    class Req:
        def __init__(self, *args):
            self.args = args

    lm = HybridJaxLM(model, tok, batch_size=2)
    pairs = [("Question: where?\nAnswer:", " Brel"), ("abc ", "def"), ("x", " yz w")]
    got = lm.loglikelihood([Req(*p) for p in pairs])
    for (ctx, cont), (lp, _) in zip(pairs, got):
        stripped = len(ctx) - len(ctx.rstrip())
        c2, x2 = (ctx[:-stripped], ctx[-stripped:] + cont) if stripped else (ctx, cont)
        assert lp == pytest.approx(_oracle_logprob(hf_model, tok, c2, x2), abs=1e-3)
    text = "The sun is yellow. The sky is blue."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    rolling = lm.loglikelihood_rolling([Req(text)])[0]
    want = _oracle_logprob(hf_model, tok, tok.decode([lm.prefix_token_id]), text)
    assert len(ids) > 1 and rolling == pytest.approx(want, abs=1e-3)
    # Windows shorter than the text: the sum over disjoint windows still covers every token once.
    short = HybridJaxLM(model, tok, max_length=8).loglikelihood_rolling([Req(text)])[0]
    assert np.isfinite(short) and short != pytest.approx(rolling, abs=1e-6)


def test_generate_until_task_matches_transformers_generate(tiny, tmp_path):
    path, model, tok, hf_model = tiny
    prompts = [f"Q: {q}\nA:" for q in QUESTIONS]
    hf_texts = []
    for p in prompts:
        ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = hf_model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        hf_texts.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0])
    # Half the targets are what transformers generates, half are not: exact match must be 0.5.
    docs = [{"question": q, "answer": t if i % 2 == 0 else t + "#"} for i, (q, t) in enumerate(zip(QUESTIONS, hf_texts))]
    (tmp_path / "utils.py").write_text(
        "def exact(doc, results):\n    return {'em': float(results[0] == doc['answer'])}\n")
    _write_task(tmp_path, "micro_open", """\
        output_type: generate_until
        doc_to_text: "Q: {{question}}\\nA:"
        doc_to_target: answer
        process_results: !function utils.exact
        generation_kwargs:
          until: ["\\n"]
          max_gen_toks: 6
          do_sample: false
        metric_list:
          - metric: em
            aggregation: mean
            higher_is_better: true
        """, docs)
    out = lm_eval.simple_evaluate(model=HybridJaxLM(model, tok, batch_size=4), tasks=["micro_open"],
                                  task_manager=TaskManager(include_path=str(tmp_path)))
    assert out["results"]["micro_open"]["em,none"] == pytest.approx(0.5)


def test_create_from_arg_string(tiny):
    path, *_ = tiny
    lm = HybridJaxLM.create_from_arg_string(f"pretrained={path}", {"batch_size": 3})
    assert lm.batch_size == 3 and lm.max_length == 256
    with pytest.raises(ValueError, match="pretrained=<HF directory>"):
        HybridJaxLM.create_from_arg_string("dtype=float32")
