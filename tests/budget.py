"""How much of the long loops a test run does: all of it, or a sample in the sanitizer run.

``make sanitize`` runs the index, fuzz and fast-path tests against a build of the native code
under AddressSanitizer and UndefinedBehaviorSanitizer, where every native call is several times
slower; it sets FRAUDSCORE_SANITIZER=1, and these tests then run shorter loops of the same checks.
"""

from __future__ import annotations

import os

import pytest

SANITIZER = os.environ.get("FRAUDSCORE_SANITIZER") == "1"


def scaled(full: int, sanitized: int) -> int:
    """``full`` normally, ``sanitized`` under the sanitizer build."""
    return sanitized if SANITIZER else full


# what checks Python (a subprocess CLI) or NumPy rather than the native code, or needs the whole
# reference file: the normal run covers it
not_under_sanitizer = pytest.mark.skipif(SANITIZER, reason="covered by the normal run")
