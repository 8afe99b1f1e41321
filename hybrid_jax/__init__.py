"""hybrid_jax: distil pretrained Qwen3 Transformers into hybrid KDA / SWA / TTT-memory models.

Public surface (imported lazily so `import hybrid_jax` stays cheap):

    hj.load_pretrained(path_or_hub_id, dtype="float32")
    hj.save_pretrained(model, out_dir, tokenizer=tok)
    hj.build_student(teacher, layer_spec="attention:0,2;kda:1,3", ...)
    hj.generate(model, tokenizer, prompts, max_new_tokens=32)
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "load_pretrained": "hybrid_jax.convert.hf_import",
    "save_pretrained": "hybrid_jax.convert.hf_export",
    "build_student": "hybrid_jax.models.hybrid",
    "generate": "hybrid_jax.eval.generate",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hybrid_jax' has no attribute {name!r}")


__all__ = sorted(_LAZY)
