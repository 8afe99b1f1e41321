"""lm-evaluation-harness adapter: run any lm-eval task against a hybrid_jax model.

    from hybrid_jax.eval.lm_eval_adapter import HybridJaxLM
    lm = HybridJaxLM(model, tokenizer)                 # or HybridJaxLM.create_from_arg_string("pretrained=DIR")
    lm_eval.simple_evaluate(model=lm, tasks=[...])

or from the shell: `lm_eval --model hybrid_jax --model_args pretrained=DIR --tasks ...` after
`import hybrid_jax.eval.lm_eval_adapter` registers the name (lm-eval's `--include_path`
takes local task YAMLs). Pairs are tokenised as transformers' HFLM does: the continuation's
tokens are those of `context + continuation` after the context's tokens, with trailing
whitespace of the context moved into the continuation.
"""

from __future__ import annotations

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from hybrid_jax.eval.generate import generate
from hybrid_jax.eval.scoring import continuation_logprobs


@register_model("hybrid_jax")
class HybridJaxLM(LM):
    def __init__(self, model, tokenizer, *, batch_size: int = 16, max_length: int | None = None,
                 max_gen_toks: int = 256):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or model.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.prefix_token_id = tokenizer.eos_token_id if tokenizer.bos_token_id is None else tokenizer.bos_token_id

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from transformers import AutoTokenizer

        from hybrid_jax.convert.hf_import import load_pretrained

        args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
        if "pretrained" not in args:
            raise ValueError("hybrid_jax lm-eval model needs model_args 'pretrained=<HF directory>'")
        path = args.pop("pretrained")
        extra = {k: v for k, v in (additional_config or {}).items() if k in ("batch_size", "max_length") and v}
        model = load_pretrained(path, dtype=args.pop("dtype", "float32"))
        return cls(model, AutoTokenizer.from_pretrained(path), **{**args, **extra})

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.prefix_token_id], self._encode(continuation)
        ctx = self._encode(context)
        whole = self._encode(context + continuation)
        return ctx, whole[len(ctx):]

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        # Keep the last max_length tokens of context + continuation (lm-eval's left truncation).
        ctxs, conts = [], []
        for ctx, cont in pairs:
            cont = cont[-self.max_length:]
            seq = (ctx + cont)[-(self.max_length + 1):]  # the model sees all but the last token
            ctxs.append(seq[: -len(cont)] or [self.prefix_token_id])
            conts.append(cont)
        logp, greedy = continuation_logprobs(self.model, ctxs, conts, batch_size=self.batch_size,
                                             pad_id=self.tokenizer.pad_token_id or 0)
        return [(float(lp), bool(g)) for lp, g in zip(logp, greedy)]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args) for req in requests]
        return self._score(pairs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self._encode(req.args[0]), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            out.append(sum(lp for lp, _ in self._score(windows)))
        return out

    def _generation_settings(self, kwargs) -> tuple[tuple[str, ...], int, float]:
        kwargs = dict(kwargs or {})
        until = kwargs.get("until") or []
        until = (until,) if isinstance(until, str) else tuple(until)
        temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
        return until, int(kwargs.get("max_gen_toks", self.max_gen_toks)), temperature

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests sharing stop strings, length and temperature are generated in batches."""
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(self._generation_settings(req.args[1]), []).append(i)
        out = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for (until, max_new, temperature), idx in groups.items():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                prompts = [self.tokenizer.decode(self._encode(requests[i].args[0])[-(self.max_length - max_new):])
                           for i in chunk]
                texts = generate(self.model, self.tokenizer, prompts, max_new_tokens=max_new,
                                 temperature=temperature, stop=until)
                for i, text in zip(chunk, texts):
                    out[i] = text
                bar.update(len(chunk))
        bar.close()
        return out
