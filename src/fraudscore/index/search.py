"""A memory-mapped index file and its exact 5-nearest-neighbour search.

The search itself is native (``_knn``): see the comment at the top of ``_knn.c`` for why it
is exact.  This module owns the file: it maps it read-only, so several processes share one
copy in the page cache, and it turns native errors into ``IndexFormatError``.  Opening a file
checks it whole (its checksum, then every tree entry: see ``check_file`` in ``_knn.c``), so a
damaged or crafted file is refused rather than trusted.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import random
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from fraudscore.errors import IndexFormatError
from fraudscore.index import _knn

K = _knn.K
DIMS = _knn.DIMS


def random_queries(n: int, seed: int = 0, *, sentinel_share: float = 0.2) -> list[list[float]]:
    """Queries anywhere in the space, on the contract's 4-decimal grid, in every group (including
    the online-and-card-present ones no reference is in): for warming up, and for tests.

    >>> [len(q) for q in random_queries(2)]
    [14, 14]
    """
    rng = random.Random(seed)
    queries = []
    for _ in range(n):
        q = [round(rng.random(), 4) for _ in range(DIMS)]
        for d in (9, 10, 11):
            q[d] = float(rng.random() < 0.5)
        if rng.random() < sentinel_share:
            q[5] = q[6] = -1.0
        queries.append(q)
    return queries


class Neighbour(NamedTuple):
    """One reference among a query's nearest: its position in the reference file, distance, label."""

    position: int
    distance: float
    is_fraud: bool


class Index:
    """An index file, mapped.  ``fraud_count(vector)`` is the hot path.

    ``kernel`` forces the leaf kernel ("avx2" or "scalar"); by default the best the CPU runs.
    """

    def __init__(self, path: str | os.PathLike[str], *, kernel: str | None = None) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise IndexFormatError(f"cannot map index {self.path}: {exc}") from exc
        try:
            self._core = _knn.Index(self._map, kernel)
        except ValueError as exc:
            self._map.close()
            raise IndexFormatError(f"{self.path}: {exc}") from exc

    @property
    def n_points(self) -> int:
        return self._core.n_points

    @property
    def n_fraud(self) -> int:
        return self._core.n_fraud

    @property
    def kernel(self) -> str:
        return self._core.kernel

    @property
    def sha256(self) -> str:
        """SHA-256 of the uncompressed reference file the index was built from."""
        return self._core.sha256

    @property
    def checksum(self) -> str:
        """The file's checksum (XXH64, 16 hex digits), verified when it was opened: names this index."""
        return self._core.checksum

    @property
    def native(self) -> _knn.Index:
        """The native index, for other native code (the service's fast path)."""
        return self._core

    @property
    def file_bytes(self) -> int:
        return len(self._map)

    def describe(self) -> dict[str, object]:
        """What the file holds and how it is searched."""
        core = self._core
        return {
            "path": str(self.path),
            "references": core.n_points,
            "fraud": core.n_fraud,
            "groups": core.n_groups,
            "tree_entries": core.n_entries,
            "leaf_size": core.leaf_size,
            "kernel": core.kernel,
            "file_bytes": self.file_bytes,
            "references_sha256": core.sha256,
            "checksum": f"xxh64:{core.checksum}",
        }

    def fraud_count(self, vector: Iterable[float]) -> int:
        """How many of the 5 nearest references are frauds."""
        return self._core.fraud_count(vector)

    def knn(self, vector: Iterable[float], k: int = K) -> list[Neighbour]:
        """The k nearest references, nearest first (ties: lower position first)."""
        return [Neighbour(*n) for n in self._core.knn(vector, k)]

    def brute_force(self, vector: Iterable[float], k: int = K) -> list[Neighbour]:
        """The k nearest by scanning every reference: slow, and the oracle the tests trust."""
        return [Neighbour(*n) for n in self._core.brute_force(vector, k)]

    def fraud_counts(self, vectors: Iterable[Sequence[float]]) -> list[int]:
        """``fraud_count`` of many vectors in one native call, without the GIL."""
        flat = array("d")
        for vector in vectors:
            if len(vector) != DIMS:
                raise ValueError(f"each query must have {DIMS} numbers, got {len(vector)}")
            flat.extend(vector)
        return list(self._core.fraud_counts(flat))

    def search_stats(self, vector: Iterable[float]) -> dict[str, int]:
        """Nodes visited, blocks scanned and exact distances computed by one search."""
        return self._core.search_stats(vector)

    def warm(self, queries: Iterable[Sequence[float]] = ()) -> None:
        """Fault every page in, then run ``queries`` so the first real request is not the slow one."""
        self._core.warm()
        for vector in queries:
            self._core.fraud_count(vector)

    def close(self) -> None:
        """Unmap the file; while a native user (``native``) still holds it, the last one does."""
        del self._core
        with contextlib.suppress(BufferError):  # still exported: the mapping ends with its last reference
            self._map.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
