"""Flax NNX layers; each wraps one kernel op (docs/architecture.md)."""
