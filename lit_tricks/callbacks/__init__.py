"""Callbacks and tricks: one file per technique."""

__all__: list[str] = []
