"""hybrid_jax.distill"""
