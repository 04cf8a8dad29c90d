"""Type stub of the service's native fast path (``_fastpath.c``)."""

from typing import Any, final

from typing_extensions import Buffer

from fraudscore.index._knn import Index

# the histograms' bucket upper bounds, in seconds (a last bucket holds what is above)
LATENCY_BOUNDS: tuple[float, ...]
SEARCH_BOUNDS: tuple[float, ...]

def round4(x: float, /) -> float: ...

@final
class RequestMetrics:
    def __init__(self, routes: tuple[bytes, ...], answers: tuple[bytes, ...]) -> None: ...
    def record(self, target: bytes | list[bytes], response: bytes, started: float, /) -> None: ...
    def searched(self, ns: int, /) -> None: ...
    def snapshot(self) -> dict[str, Any]: ...

@final
class FastPath:
    @property
    def answered(self) -> int: ...
    @property
    def declined(self) -> int: ...
    def __init__(
        self,
        index: Index,
        divisors: dict[str, float],
        mcc_risk: dict[str, float],
        unknown_mcc_risk: float,
        answers: tuple[bytes, ...],
        max_body: int,
        *,
        metrics: RequestMetrics | None = None,
    ) -> None: ...
    def answer(self, data: bytes, started: float = -1.0, /) -> bytes | None: ...
    def vectorize(self, body: Buffer, /) -> list[float] | None: ...
