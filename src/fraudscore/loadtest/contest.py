"""The contract's load-test score: a latency part from p99 plus a detection part from the errors.

    p99 score        1000·log10(1000 ms / max(p99, 1 ms)), or -3000 when p99 > 2000 ms
    detection score  1000·log10(1 / max(E/N, 0.001)) - 300·log10(1 + E), E = FP + 3·FN + 5·errors,
                     or -3000 when (FP + FN + errors) / N > 15 %
    final            p99 score + detection score

The contract's published examples:

>>> round(final_score(1.0, Counts(tp=2500, tn=2500, fp=0, fn=0, http_errors=0)), 2)
6000.0
>>> round(final_score(3.0, Counts(tp=2495, tn=2495, fp=5, fn=5, http_errors=0)), 2)
4524.15
>>> round(final_score(10.0, Counts(tp=2200, tn=2000, fp=500, fn=300, http_errors=0)), 2)
-1000.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fraudscore.contract.costs import FN_WEIGHT, FP_WEIGHT, HTTP_ERROR_WEIGHT

FAILED = -3000.0
"""What either part scores when its limit is crossed."""
P99_LIMIT_MS = 2000.0
ERROR_SHARE_LIMIT = 0.15


@dataclass(frozen=True)
class Counts:
    """The judged requests of one run; a deny (approved=false) is the positive class."""

    tp: int
    tn: int
    fp: int
    fn: int
    http_errors: int

    @property
    def requests(self) -> int:
        """N: every request sent, answered or not."""
        return self.tp + self.tn + self.fp + self.fn + self.http_errors

    @property
    def weighted_errors(self) -> int:
        """E = FP + 3·FN + 5·HTTP errors.

        >>> Counts(tp=0, tn=0, fp=1, fn=1, http_errors=1).weighted_errors
        9
        """
        return FP_WEIGHT * self.fp + FN_WEIGHT * self.fn + HTTP_ERROR_WEIGHT * self.http_errors

    @property
    def error_share(self) -> float:
        """(FP + FN + HTTP errors) / N, unweighted; raises ValueError when no request was sent."""
        if self.requests <= 0:
            raise ValueError("no request was sent: the detection score is undefined")
        return (self.fp + self.fn + self.http_errors) / self.requests


def p99_score(p99_ms: float) -> float:
    """Latency part: 3000 at 1 ms or faster, 0 at 1 s, -3000 past 2 s.

    >>> p99_score(0.2), p99_score(1000.0), round(p99_score(2000.0), 2), p99_score(2000.1)
    (3000.0, 0.0, -301.03, -3000.0)
    """
    if p99_ms > P99_LIMIT_MS:
        return FAILED
    return 1000.0 * math.log10(1000.0 / max(p99_ms, 1.0))


def detection_score(counts: Counts) -> float:
    """Detection part: 3000 with no error, falling with the weighted error rate and count.

    >>> detection_score(Counts(tp=10, tn=10, fp=0, fn=0, http_errors=0))
    3000.0
    >>> detection_score(Counts(tp=0, tn=84, fp=16, fn=0, http_errors=0))
    -3000.0
    """
    if counts.error_share > ERROR_SHARE_LIMIT:
        return FAILED
    e = counts.weighted_errors
    rate = max(e / counts.requests, 0.001)
    return 1000.0 * math.log10(1.0 / rate) - 300.0 * math.log10(1.0 + e)


def final_score(p99_ms: float, counts: Counts) -> float:
    """The run's score: p99 score + detection score."""
    return p99_score(p99_ms) + detection_score(counts)
