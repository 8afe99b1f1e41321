"""hybrid_jax.data"""
