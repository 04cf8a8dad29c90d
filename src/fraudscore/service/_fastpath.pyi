"""Type stub of the service's native fast path (``_fastpath.c``)."""

from typing import Any, final

from typing_extensions import Buffer

from fraudscore.index._knn import Index
from fraudscore.models._trees import Forest

# the histograms' bucket upper bounds, in seconds (a last bucket holds what is above)
LATENCY_BOUNDS: tuple[float, ...]
SEARCH_BOUNDS: tuple[float, ...]

def round4(x: float, /) -> float: ...
def siphash24(key: Buffer, data: Buffer, /) -> int: ...

# one arm of a plan: (forest, threshold, model_decides, knn_approves, knn_only, middle)
_Arm = tuple[Forest | None, float, bool, tuple[bool, ...], tuple[bytes, ...], tuple[bytes, ...] | None]

@final
class V1Plan:
    def __init__(
        self,
        arms: tuple[_Arm, ...],
        features: tuple[bytes, ...],
        ok_head: bytes,
        ab_key: Buffer,
        candidate: bytes | None,
        cut: int,
        buckets: int,
        capacity: int,
        notify_fd: int,
    ) -> None: ...
    def drain(self) -> tuple[list[tuple[int, list[float], float, bool]], int]: ...
    def decisions(self) -> tuple[tuple[int, int], ...]: ...

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
        max_url: int = ...,
        max_headers: int = ...,
        max_header_bytes: int = ...,
    ) -> None: ...
    def answer(self, data: bytes, started: float = -1.0, /) -> bytes | None: ...
    def set_v1(self, plan: V1Plan | None, /) -> None: ...
    def vectorize(self, body: Buffer, /) -> list[float] | None: ...

@final
class NativeLoop:
    @property
    def migrate_fd(self) -> int: ...
    @property
    def answered(self) -> int: ...
    @property
    def migrated(self) -> int: ...
    @property
    def idle_closed(self) -> int: ...
    @property
    def open(self) -> int: ...
    def __init__(self, fast: FastPath, idle_timeout: float) -> None: ...
    def start(self) -> None: ...
    def adopt(self, fd: int, /) -> None: ...
    def take(self) -> list[tuple[int, bytes]]: ...
    def stop(self) -> None: ...
