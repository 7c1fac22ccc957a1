"""Error types shared across modules: one class per kind of failure."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint (a converted jaxlora directory or a training checkpoint) is missing,
    incomplete, unreadable, or does not fit the model or run that reads it."""
