"""Type stub of drift's native answer-path work (``_drift.c``, see models/drift.py)."""

from collections.abc import Callable, Sequence
from typing import final

from typing_extensions import Buffer

@final
class Tracker:
    """Bins requests against each series' edges and counts them in both windows."""

    def __init__(
        self,
        edges: Sequence[Sequence[float]],
        ring: Buffer,
        counts: Buffer,
        slot_counts: Buffer,
        slot_ids: Buffer,
        slot_seconds: float,
        every: int,
        clock: Callable[[], float] | None,
        on_every: Callable[[], object],
    ) -> None: ...
    def observe(self, vector: list[float], score: float, /) -> None:
        """Count one request in both windows at the clock's time."""
    @property
    def filled(self) -> int:
        """Requests in the count window."""
    @property
    def observed(self) -> int:
        """Requests observed in all."""
