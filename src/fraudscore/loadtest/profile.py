"""The contract's k6 profile: the one place its rates, durations and limits are written.

The profile is an open-model ramp (``ramping-arrival-rate``): new requests start at a rate that
grows linearly from ``START_RATE`` to ``TARGET_RATE`` over the run, whether or not the service has
answered the earlier ones.  ``loadtest.js`` holds none of these numbers: ``k6.py`` writes
``Profile.k6_scenario()`` into the JSON file that the script reads with ``open()``.

>>> Profile().k6_scenario()["stages"], Profile().iterations
([{'target': 900, 'duration': '120000ms'}], 54060)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

START_RATE = 1.0
"""Requests started per second at t = 0."""
TARGET_RATE = 900.0
"""Requests started per second at the end of the ramp."""
DURATION_S = 120.0
"""Length of the ramp."""
MAX_VUS = 250
"""k6's virtual users: at most this many requests are in flight at once."""
REQUEST_TIMEOUT_MS = 2001
"""A request not answered by then counts as an HTTP error."""
GRACEFUL_STOP_S = 5
"""After the ramp, requests in flight may finish for this long: longer than the request timeout,
so every request sent is judged."""
# VUs allocated before the run: enough for the peak rate at 100 ms per request (k6 adds more, up
# to MAX_VUS, when the service is slower), and never fewer than 5.
_PREALLOCATED_S_PER_REQUEST = 0.1
_MIN_PREALLOCATED_VUS = 5


@dataclass(frozen=True)
class Profile:
    """The contract's ramp, its rates multiplied by ``rate_multiplier``, lasting ``duration_s``."""

    rate_multiplier: float = 1.0
    duration_s: float = DURATION_S

    @property
    def start_rate(self) -> float:
        return START_RATE * self.rate_multiplier

    @property
    def target_rate(self) -> float:
        return TARGET_RATE * self.rate_multiplier

    @property
    def iterations(self) -> int:
        """About how many requests the ramp starts: its mean rate times its duration.

        >>> Profile(rate_multiplier=0.1, duration_s=3).iterations
        135
        """
        return round((self.start_rate + self.target_rate) / 2 * self.duration_s)

    def k6_scenario(self) -> dict[str, Any]:
        """The scenario as k6's ``options.scenarios`` takes it.

        k6 takes whole numbers of iterations per ``timeUnit``, so a fractional rate is expressed per
        1000 s instead:

        >>> s = Profile(rate_multiplier=0.1, duration_s=3).k6_scenario()
        >>> s["startRate"], s["stages"], s["timeUnit"], s["preAllocatedVUs"]
        (100, [{'target': 90000, 'duration': '3000ms'}], '1000s', 9)
        """
        start, target = self.start_rate, self.target_rate
        if start.is_integer() and target.is_integer():
            start_rate, target_per_unit, time_unit = int(start), int(target), "1s"
        else:
            start_rate, target_per_unit, time_unit = _per_1000s(start), _per_1000s(target), "1000s"
        preallocated = math.ceil(target * _PREALLOCATED_S_PER_REQUEST)
        return {
            "executor": "ramping-arrival-rate",
            "startRate": start_rate,
            "timeUnit": time_unit,
            "stages": [{"target": target_per_unit, "duration": f"{round(self.duration_s * 1000)}ms"}],
            "preAllocatedVUs": min(MAX_VUS, max(_MIN_PREALLOCATED_VUS, preallocated)),
            "maxVUs": MAX_VUS,
            "gracefulStop": f"{GRACEFUL_STOP_S}s",
        }

    def describe(self) -> dict[str, Any]:
        """The profile as ``result.json`` records it."""
        return {
            "executor": "ramping-arrival-rate",
            "start_rate": self.start_rate,
            "target_rate": self.target_rate,
            "duration_s": self.duration_s,
            "rate_multiplier": self.rate_multiplier,
            "max_vus": MAX_VUS,
            "timeout_ms": REQUEST_TIMEOUT_MS,
        }


def _per_1000s(rate: float) -> int:
    # Half rounds up, as JavaScript's Math.round did when the script computed it.
    return math.floor(rate * 1000 + 0.5)
