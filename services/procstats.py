"""Numbers about this process that reports compare across profiles."""

from __future__ import annotations

import resource


def peak_rss_kib() -> int:
    """Peak resident memory of this process so far, in KiB (Linux ru_maxrss)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
