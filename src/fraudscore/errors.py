"""The exceptions fraudscore raises; their types say what went wrong.

    FraudscoreError
    ├── PayloadError           a transaction payload that cannot be scored (HTTP 400)
    ├── ReferenceDataError     the reference file is malformed
    ├── IndexFormatError       an index file that is not one, is truncated, or is of another version
    └── DataFileError          a contract file (constants, test data) that is missing or malformed

Each also derives from ValueError, so callers that only know the standard library still catch them.
Errors raised by the native core are re-raised as one of these with the native error as ``__cause__``.
"""

from __future__ import annotations


class FraudscoreError(Exception):
    """Base of every error fraudscore raises on purpose."""


class PayloadError(FraudscoreError, ValueError):
    """A payload that is not a valid transaction; the message names the field."""


class ReferenceDataError(FraudscoreError, ValueError):
    """The reference vectors file cannot be read as the contract defines it."""


class IndexFormatError(FraudscoreError, ValueError):
    """An index file that cannot be used: wrong magic, version, size or layout."""


class DataFileError(FraudscoreError, ValueError):
    """A data file (normalization, MCC risk, test data) that is missing or malformed."""
