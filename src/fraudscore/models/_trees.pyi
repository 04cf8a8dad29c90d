"""Type stub of the native forest evaluator (``_trees.c``)."""

from collections.abc import Sequence
from typing import final

from typing_extensions import Buffer

MAX_FEATURES: int

@final
class Forest:
    n_trees: int
    n_nodes: int
    n_features: int
    bias: float
    sigmoid: float
    def __init__(
        self,
        feature: Buffer,
        threshold: Buffer,
        decision: Buffer,
        left: Buffer,
        right: Buffer,
        value: Buffer,
        roots: Buffer,
        n_features: int,
        sigmoid: float,
        allow_nan: bool = False,
    ) -> None: ...
    def raw(self, row: Sequence[float], /) -> float: ...
    def predict(self, row: Sequence[float], /) -> float: ...
    def explain(self, row: Sequence[float], /) -> tuple[float, list[float]]: ...
    def predict_many(self, rows: Buffer, /) -> bytes: ...
    def raw_many(self, rows: Buffer, /) -> bytes: ...
