"""hybrid_jax.models"""
