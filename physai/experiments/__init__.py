"""Experiments built on the public API: ``eos`` (edge of stability)."""
