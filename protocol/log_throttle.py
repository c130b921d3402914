"""Rate-limited logging of repeated events, so a flood of bad input cannot flood the logs."""

from __future__ import annotations

__all__ = ["LOG_FIRST", "worth_logging"]

#: Occurrences of one kind of event logged in full before logging only at powers of two.
LOG_FIRST = 10


def worth_logging(count: int) -> bool:
    """Whether the ``count``-th occurrence (1-based) of an event should be logged: the first
    :data:`LOG_FIRST`, then only the 16th, 32nd, 64th, ... (powers of two)."""
    return count <= LOG_FIRST or count & (count - 1) == 0
