"""What every storage format shares: the sample a writer receives and what a verifier reports.

Backend-neutral, so the WebDataset writer (abdist/data/shards.py) and the FFCV one
(abdist/data/ffcv_files.py) import from here rather than from each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_SAMPLE_PROBLEMS = 5  # per file: one corrupt shard should not drown the report


@dataclass(frozen=True)
class Record:
    """One sample as a writer receives it."""

    index: int  # position i within its split (0..N-1), also the sample id
    ext: str  # "jpg" or "png"
    image: bytes
    label: int
    group: int | None = None


@dataclass
class ShardScan:
    """What a verifier read in one file (a tar shard, a .beton): its samples' counts and ids,
    and the problems found (at most MAX_SAMPLE_PROBLEMS listed per file)."""

    num_samples: int
    class_counts: np.ndarray
    group_class_counts: np.ndarray | None
    indices: list[int]
    problems: list[str]
