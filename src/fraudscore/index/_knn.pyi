"""Type stub of the native core (``_knn.c``)."""

from collections.abc import Sequence

from typing_extensions import Buffer

DIMS: int
K: int
SCALE: int
FORMAT_VERSION: int
CHECKSUM_OFFSET: int

def parse_references(
    chunk: Buffer, state: int, final: bool, offset: int, /
) -> tuple[int, int, bytes, bytes]: ...
def checksum(data: Buffer, /) -> int: ...
def build_index(
    vectors: Buffer, labels: Buffer, sha256: Buffer, leaf_size: int = 64, fanout_levels: int = 3
) -> bytes: ...

class Index:
    n_points: int
    n_fraud: int
    n_groups: int
    n_entries: int
    leaf_size: int
    kernel: str
    sha256: str
    checksum: str
    def __init__(self, buffer: Buffer, kernel: str | None = None) -> None: ...
    def fraud_count(self, query: Sequence[float], /) -> int: ...
    def knn(self, query: Sequence[float], k: int = 5) -> list[tuple[int, float, bool]]: ...
    def search_stats(self, query: Sequence[float], /) -> dict[str, int]: ...
    def brute_force(self, query: Sequence[float], k: int = 5) -> list[tuple[int, float, bool]]: ...
    def fraud_counts(self, queries: Buffer, /) -> bytes: ...
    def warm(self) -> int: ...
