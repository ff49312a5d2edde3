"""Summaries of repeated measurements: median and spread."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Summary:
    n: int
    median: float
    min: float
    max: float
    p90: float
    iqr: float

    def to_json(self) -> dict[str, float]:
        return {key: round(value, 4) for key, value in asdict(self).items()}


def quantile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default), defined for one value too."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("no values to summarize")
    return Summary(
        n=len(values),
        median=statistics.median(values),
        min=min(values),
        max=max(values),
        p90=quantile(values, 0.9),
        iqr=quantile(values, 0.75) - quantile(values, 0.25),
    )
