"""scripts/profile_ops.py: kernels are charged to the source line that created them."""

import inspect

import jax
import jax.numpy as jnp

from tests.fixtures import load_script

profile_ops = load_script("profile_ops")


def _work(x):
    y = jnp.sin(x) @ x
    return jnp.tanh(y).sum(axis=0)


def _line_of(text):
    lines, start = inspect.getsourcelines(_work)
    return start + next(i for i, line in enumerate(lines) if text in line)


def test_compiled_ops_map_to_their_lines():
    module, ops = profile_ops.parse_hlo(jax.jit(_work).lower(jnp.ones((64, 64))).compile().as_text())
    assert module == "jit__work"
    labels = {label for label, _ in ops.values()}
    # Each of the two lines that compute something owns at least one op of the compiled module.
    for text in ("jnp.sin(x) @ x", "jnp.tanh(y)"):
        assert f"test_profile_ops.py:{_line_of(text)} (_work)" in labels, labels


def test_trace_rows_add_up_to_the_device_events(tmp_path):
    x = jnp.ones((256, 256))
    fn = jax.jit(_work)
    fn(x).block_until_ready()
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True, profiler_options=options):
        for _ in range(2):
            fn(x).block_until_ready()
    events = profile_ops.device_events(str(tmp_path))
    _, ops = profile_ops.parse_hlo(fn.lower(x).compile().as_text())
    sources = {("jit__work", op): v for op, v in ops.items()}
    result = profile_ops.attribute(events, sources, calls=2, modules_re="^jit__work$")
    work_us = sum(float(e["dur"]) for e in events if (e.get("args") or {}).get("hlo_module") == "jit__work")
    assert abs(result["total_ms"] - work_us / 1e3 / 2) <= 1e-9
    labels = [r["label"] for r in result["rows"]]
    assert any(f"test_profile_ops.py:{_line_of('jnp.sin(x) @ x')}" in label for label in labels), labels
