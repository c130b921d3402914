"""Weight fingerprints: how learner and rollout agree that a weight update arrived intact.

Both sides hash the raw bytes of the same few tensors; a rollout reports the fingerprint of what
its engine loaded, and the learner compares it with what it sent. Hashing a handful of tensors
(first, last and evenly spaced ones, by sorted name) keeps the check cheap for large models while
still catching a missed, truncated or mixed-up update.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from .buffers import byte_view


def fingerprint_names(names: Sequence[str], count: int = 4) -> list[str]:
    """Pick `count` tensor names deterministically (evenly spaced over the sorted names)."""
    ordered = sorted(names)
    if len(ordered) <= count:
        return ordered
    step = (len(ordered) - 1) / (count - 1)
    return sorted({ordered[round(i * step)] for i in range(count)})


def weight_fingerprint(named_bytes: Mapping[str, bytes | memoryview]) -> dict[str, str]:
    """BLAKE2b (16-byte digest, hex) of each tensor's raw bytes, keyed by tensor name."""
    return {name: hashlib.blake2b(byte_view(buf), digest_size=16).hexdigest()
            for name, buf in sorted(named_bytes.items())}
