"""Named label protocols for LIDC-IDRI: one function decides every nodule's label.

Published LIDC numbers differ mostly by how nodules are selected and labelled (Baltatzis
et al., MICCAI 2021), so every report names the protocol it used.

* ``mean-excl3`` (default): mean malignancy > 3 malignant, < 3 benign, = 3 left out.
* ``official``: mean > 3 malignant, everything else benign; all nodules kept (the M3Net
  authors' code). About three in four nodules are then benign.
* ``median-excl3``: as ``mean-excl3`` with the median of the readers' ratings.
* ``<protocol>-min3``: any of the above, keeping only nodules marked by >= 3 readers.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

BASE_PROTOCOLS = ("mean-excl3", "official", "median-excl3")
MIN_READERS_SUFFIX = "-min3"
PROTOCOLS = BASE_PROTOCOLS + tuple(p + MIN_READERS_SUFFIX for p in BASE_PROTOCOLS)
DEFAULT_PROTOCOL = "mean-excl3"


def check_protocol(protocol: str) -> str:
    """``protocol`` if it is known; otherwise ``ValueError`` listing the known ones."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown label protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    return protocol


def malignancy_label(ratings: Sequence[int], protocol: str = DEFAULT_PROTOCOL) -> int | None:
    """1 (malignant), 0 (benign) or ``None`` (left out) for one nodule's malignancy ratings.

    Args:
        ratings: each reader's malignancy rating, 1..5.
        protocol: one of :data:`PROTOCOLS`.
    """
    check_protocol(protocol)
    if not ratings:
        raise ValueError("a nodule needs at least one malignancy rating")
    if any(not 1 <= int(r) <= 5 for r in ratings):
        raise ValueError(f"malignancy ratings are 1..5, got {list(ratings)}")
    base = protocol.removesuffix(MIN_READERS_SUFFIX)
    if protocol.endswith(MIN_READERS_SUFFIX) and len(ratings) < 3:
        return None
    score = statistics.median(ratings) if base.startswith("median") else sum(ratings) / len(ratings)
    if score > 3:
        return 1
    if score < 3 or base == "official":
        return 0
    return None
