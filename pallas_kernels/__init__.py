"""Pallas kernels for hybrid sequence models: KDA, sliding-window attention, TTT memory."""


def multiprocessor_count(default: int = 132) -> int:
    """Streaming multiprocessors of the first device (`default`, an H100/H200's, where JAX does
    not say): what the GPU kernels size their grids against."""
    import jax

    return getattr(jax.devices()[0], "core_count", None) or default
