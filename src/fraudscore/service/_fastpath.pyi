"""Type stub of the service's native fast path (``_fastpath.c``)."""

from collections.abc import Mapping, Sequence

from typing_extensions import Buffer

from fraudscore.index._knn import Index

def round4(x: float, /) -> float: ...

class FastPath:
    answered: int
    declined: int
    def __init__(
        self,
        index: Index,
        divisors: Sequence[float],
        mcc_risk: Mapping[str, float],
        answers: tuple[bytes, ...],
        max_body: int,
    ) -> None: ...
    def answer(self, data: bytes, /) -> bytes | None: ...
    def vectorize(self, body: Buffer, /) -> list[float] | None: ...
