"""hybrid_jax.data: sources, grain pipelines, chat masks, packing, micro-world, tokenizer.

    from hybrid_jax.data import make_batches
    it = make_batches(cfg.data, tokenizer, seq_len, batch_size, seed=0)

See docs/data.md. grain, tensorflow-datasets, pyarrow, array-record and datasets are
imported only where used.
"""

from hybrid_jax.data.pipeline import BatchIterator, make_batches

__all__ = ["BatchIterator", "make_batches"]
