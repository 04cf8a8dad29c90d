"""Type stub of drift's native binning (``_drift.c``, see models/drift.py)."""

from collections.abc import Sequence
from typing import final

from typing_extensions import Buffer

@final
class Binner:
    """Bins requests against each series' edges into ``out``'s int16 rows."""

    def __init__(self, edges: Sequence[Sequence[float]], out: Buffer) -> None: ...
    def bin(self, vector: list[float], score: float, row: int, /) -> None:
        """Write the codes of one request's features and score into row ``row``."""
    @property
    def rows(self) -> int:
        """Rows the codes buffer holds."""
