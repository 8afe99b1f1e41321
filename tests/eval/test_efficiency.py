"""Efficiency measurements: analytic cache bytes (closed form), the timed decode loop's tokens,
precompiled executables."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hybrid_jax as hj
from hybrid_jax.eval import efficiency
from hybrid_jax.eval.generate import generate_tokens
from tests.fixtures import TINY_CONFIG, write_tiny_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return hj.load_pretrained(str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_eff"))))


def test_cache_bytes_closed_form(model):
    layers, kv, hd = TINY_CONFIG["num_hidden_layers"], TINY_CONFIG["num_key_value_heads"], TINY_CONFIG["head_dim"]
    for length, batch in ((100, 1), (64, 3)):
        # keys + values in float32, int32 key segment ids, one int32 index per layer
        want = layers * (batch * (2 * length * kv * hd * 4 + length * 4) + 4)
        assert efficiency.cache_bytes_analytic(model, length, batch) == want


def test_measured_cache_bytes_is_none_without_allocator_stats(model):
    assert efficiency.cache_bytes_measured(model, 32) is None  # the CPU keeps no memory statistics


def test_timed_decode_loop_generates_what_generate_does(model):
    graphdef, state = nnx.split(model)
    ids = efficiency._prompt(model, 2, 12)
    logits, cache = efficiency._prefill(graphdef, state, ids, cache_length=12 + 6)
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    last, _ = efficiency._decode(graphdef, state, cache, first, 12, steps=5)
    want = generate_tokens(model, np.asarray(ids).tolist(), max_new_tokens=6, eos_token_id=[], bucket=False)
    np.testing.assert_array_equal(np.asarray(first), want[:, 0])
    np.testing.assert_array_equal(np.asarray(last), want[:, 5])


def test_timings_are_positive(model):
    assert efficiency.time_to_first_token(model, 16, repeats=1) > 0
    assert efficiency.decode_tokens_per_second(model, 16, steps=4, repeats=1) > 0


def test_efficiency_plot(tmp_path):
    rows = [dict(model=m, context=c, ttft_s=c * 1e-4, cache_bytes=c * 1024) for m in ("a", "b") for c in (16, 32)]
    assert open(efficiency.efficiency_plot(rows, str(tmp_path / "e.png")), "rb").read(4) == b"\x89PNG"


def test_efficiency_plot_keeps_rows_without_timings(tmp_path):
    """A run cut short (or --analytic) still plots every cache size it has."""
    import matplotlib.pyplot as plt

    seen = []
    savefig = plt.Figure.savefig

    def spy(fig, *a, **k):
        seen.append([[line.get_label() for line in ax.lines] for ax in fig.axes])
        return savefig(fig, *a, **k)

    plt.Figure.savefig = spy
    try:
        timed = dict(model="a", context=16, ttft_s=1e-3, cache_bytes=1024)
        untimed = dict(model="b", context=32, cache_bytes=2048)
        efficiency.efficiency_plot([timed, untimed], str(tmp_path / "e.png"))
        efficiency.efficiency_plot([untimed], str(tmp_path / "f.png"))
    finally:
        plt.Figure.savefig = savefig
    assert seen == [[["a"], ["a", "b"]], [["b"]]]


def test_ttft_speedups_pair_each_model_with_the_teacher_at_its_context():
    rows = [dict(model="teacher", context=16, ttft_s=4.0), dict(model="teacher", context=32, ttft_s=9.0),
            dict(model="kda", context=32, ttft_s=3.0), dict(model="kda", context=16, ttft_s=8.0),
            dict(model="kda", context=64, ttft_s=1.0),  # no teacher row at 64: no ratio
            dict(model="allmem", context=16, error="OOM")]
    assert efficiency.ttft_speedups(rows) == {"kda": [(16, 0.5), (32, 3.0)]}


def test_load_rows_merges_json_files_and_logs_later_rows_winning(tmp_path):
    import json

    first = tmp_path / "efficiency.json"
    first.write_text(json.dumps({"device": "x", "rows": [
        dict(model="teacher", context=16, cache_bytes=8, ttft_s=4.0),
        dict(model="kda", context=16, cache_bytes=2, ttft_s=3.0)]}))
    log = tmp_path / "eff.log"  # a run cut short: only its printed rows, among other lines
    log.write_text("GPU 0: some card\nprecompiled 4 executables in 9.0 s\n"
                   + json.dumps(dict(model="kda", context=16, cache_bytes=2, ttft_s=2.0)) + "\n"
                   + json.dumps(dict(model="teacher", context=32, cache_bytes=16, ttft_s=9.0)) + "\n"
                   + '{"not": "a row"}\nrc 124\n')
    rows = efficiency.load_rows([str(first), str(log)])
    assert sorted((r["model"], r["context"], r["ttft_s"]) for r in rows) == [
        ("kda", 16, 2.0), ("teacher", 16, 4.0), ("teacher", 32, 9.0)]
    empty = tmp_path / "empty.log"
    empty.write_text("nothing measured\n")
    with pytest.raises(ValueError, match="no efficiency rows"):
        efficiency.load_rows([str(empty)])


def test_efficiency_plot_adds_the_speedup_panel_with_a_teacher(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    seen = []
    savefig = plt.Figure.savefig
    monkeypatch.setattr(plt.Figure, "savefig", lambda fig, *a, **k: (
        seen.append([(ax.get_ylabel(), [line.get_label() for line in ax.lines]) for ax in fig.axes]),
        savefig(fig, *a, **k)))
    rows = [dict(model=m, context=c, ttft_s=t, cache_bytes=c) for m, c, t in
            (("teacher", 16, 2.0), ("teacher", 32, 6.0), ("kda", 16, 1.0), ("kda", 32, 2.0))]
    efficiency.efficiency_plot(rows, str(tmp_path / "e.png"))
    (ttft, cache, speedup), = seen
    assert ttft[1] == cache[1] == ["teacher", "kda"]
    assert speedup[0] == "teacher TTFT / model TTFT" and speedup[1][0] == "kda"


@pytest.fixture
def no_precompiled(monkeypatch):
    """An empty store of precompiled executables for this test only."""
    monkeypatch.setattr(efficiency, "_compiled", {})


def test_precompiled_prefill_and_decode_compute_what_jit_does(model, no_precompiled):
    measurement = efficiency.Measurement(model, 12, batch_size=2, steps=6, decode=True)
    assert efficiency.precompile([measurement], workers=2)[:2] == (2, 0)
    graphdef, state = nnx.split(model)
    ids = efficiency._prompt(model, 2, 12)
    logits, cache = efficiency._aot_call("prefill", efficiency._prefill, graphdef, (state, ids),
                                          cache_length=12 + 6)()
    want_logits, want_cache = efficiency._prefill(graphdef, state, ids, cache_length=12 + 6)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(want_logits))  # bitwise
    jax.tree.map(np.testing.assert_array_equal, cache, want_cache)
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    last, _ = efficiency._aot_call("decode", efficiency._decode, graphdef, (state, cache, first), (12,),
                                     steps=5)()
    want_last, _ = efficiency._decode(graphdef, state, want_cache, first, 12, steps=5)
    np.testing.assert_array_equal(np.asarray(last), np.asarray(want_last))


def test_measurements_run_the_precompiled_executables(model, no_precompiled, monkeypatch):
    plan = [efficiency.Measurement(model, 16, steps=4),  # TTFT and a batch-1 decode share a prefill
            efficiency.Measurement(model, 16, steps=4, decode=True),
            efficiency.Measurement(model, 16, batch_size=2, steps=4, decode=True)]
    assert efficiency.precompile(plan, workers=2)[:2] == (4, 0)
    called = []

    def spy(name, jitted):
        def call(*args, **kwargs):
            called.append(name)
            return jitted(*args, **kwargs)
        return call

    for name in ("_prefill", "_decode"):
        monkeypatch.setattr(efficiency, name, spy(name, getattr(efficiency, name)))
    assert efficiency.time_to_first_token(model, 16, repeats=1, max_new_tokens=4) > 0
    assert efficiency.decode_tokens_per_second(model, 16, steps=4, repeats=1) > 0
    assert efficiency.decode_tokens_per_second(model, 16, batch_size=2, steps=4, repeats=1) > 0
    assert called == []
    efficiency.time_to_first_token(model, 16, repeats=1, max_new_tokens=5)  # not precompiled: jit
    assert called == ["_prefill", "_prefill"]  # the untimed warm-up, then the timed run


def test_precompile_leaves_an_out_of_memory_executable_to_jit(model, no_precompiled, monkeypatch):
    class Traced:  # a traced prefill whose compile fails as `error`
        def __init__(self, error):
            self.error = error

        def lower(self):
            return self

        def compile(self):
            raise self.error

    def prefill_failing_with(error):
        return types.SimpleNamespace(trace=lambda *args, **kwargs: Traced(error))

    oom = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.0GiB.")
    monkeypatch.setattr(efficiency, "_prefill", prefill_failing_with(oom))
    assert efficiency.precompile([efficiency.Measurement(model, 16)], workers=2)[:2] == (0, 1)
    assert efficiency._compiled == {}
    monkeypatch.setattr(efficiency, "_prefill", prefill_failing_with(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        efficiency.precompile([efficiency.Measurement(model, 16)], workers=2)
