"""hybrid_jax.eval"""
