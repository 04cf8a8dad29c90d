"""Type stub of the service's native fast path (``_fastpath.c``)."""

from typing import final

from typing_extensions import Buffer

from fraudscore.index._knn import Index

def round4(x: float, /) -> float: ...

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
    ) -> None: ...
    def answer(self, data: bytes, /) -> bytes | None: ...
    def vectorize(self, body: Buffer, /) -> list[float] | None: ...
