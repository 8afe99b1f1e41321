"""Pallas kernels for hybrid sequence models: KDA, sliding-window attention, TTT memory."""
