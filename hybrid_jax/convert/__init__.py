"""hybrid_jax.convert"""
