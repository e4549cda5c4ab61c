"""Response-length buckets: the edges of the predictor's bucket output and of its metrics.

Edges are roughly log-spaced: a 32-token difference matters for a 64-token answer, not for a
1,500-token one.
"""

from __future__ import annotations

import bisect

DEFAULT_EDGES: tuple[int, ...] = (
    16,
    32,
    64,
    96,
    128,
    192,
    256,
    320,
    384,
    512,
    640,
    768,
    1024,
    1536,
    2048,
    3072,
)


def bucket_of(tokens: int, edges: tuple[int, ...] = DEFAULT_EDGES) -> int:
    """Index of the bucket holding `tokens`: bucket i covers [edges[i-1], edges[i])."""
    return bisect.bisect_right(edges, tokens)
