"""The exceptions fraudscore raises; their types say what went wrong, their category what to do.

Every error belongs to one of four categories, so a caller can branch on what it can do about
it without knowing every type: a stream worker dead-letters ``BAD_INPUT`` (the event will never
score) and retries ``TRANSIENT`` (the next try may work)::

    FraudscoreError                     (category: INTERNAL unless a subclass says otherwise)
    ├── BadInputError                   BAD_INPUT: the data given cannot be used
    │   ├── PayloadError                a transaction payload that cannot be scored (HTTP 400)
    │   ├── ReferenceDataError          the reference file is malformed
    │   ├── IndexFormatError            an index file that is damaged, truncated or of another version
    │   ├── DataFileError               a data file (constants, test data, payloads) missing or malformed
    │   ├── ModelFormatError            a model or registry version that is damaged or fails validation
    │   ├── EventError                  a stream event that cannot be used (dead-lettered)
    │   └── LoadTestError               k6's results cannot be read
    ├── ConfigError                     BAD_CONFIG: a flag, variable or setting that cannot work
    │   ├── UsageError                  a command line that cannot be carried out as given
    │   ├── CgroupError                 cgroups cannot be used as asked
    │   ├── LimitsError                 resource limits that do not add up
    │   ├── ProxyError                  nginx or haproxy missing, or refusing its configuration
    │   └── StackError                  a process of the stack cannot start or keeps dying
    │       └── StackStopped            the stack was stopped while starting
    ├── TransientError                  TRANSIENT: the same call may work later (a busy port, a
    │                                   server not answering yet)
    └── InternalError                   INTERNAL: a bug: fraudscore broke its own rules

``exit_code`` is the one map from category to a command's exit status, used by every command.
Errors raised by native code are re-raised as one of these with the native error as ``__cause__``.

>>> err = PayloadError("transaction.amount: must be a number")
>>> err.category is Category.BAD_INPUT, exit_code(err), isinstance(err, ValueError)
(True, 3, True)
"""

from __future__ import annotations

import enum
from typing import ClassVar


class Category(enum.Enum):
    """What kind of failure an error is, i.e. what the caller can do about it."""

    BAD_INPUT = "bad input"  # fix the data (or drop it): retrying the same input fails the same way
    BAD_CONFIG = "bad configuration"  # fix the flags, variables or files named
    TRANSIENT = "transient"  # retry, with backoff: nothing is wrong with the request
    INTERNAL = "internal"  # a bug: report it


# Exit statuses: one map for every command.  1 is a command's own "ran, and the answer is no"
# (``eval``: answers differ); 2 is also argparse's status for a malformed command line.
EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_CODES: dict[Category, int] = {
    Category.BAD_CONFIG: 2,
    Category.BAD_INPUT: 3,
    Category.TRANSIENT: 4,
    Category.INTERNAL: 5,
}
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention


class FraudscoreError(Exception):
    """Base of every error fraudscore raises on purpose."""

    category: ClassVar[Category] = Category.INTERNAL


class BadInputError(FraudscoreError, ValueError):
    """Data that cannot be used as given; the message names the file, record or field."""

    category = Category.BAD_INPUT


class PayloadError(BadInputError):
    """A payload that is not a valid transaction; the message names the field."""


class ReferenceDataError(BadInputError):
    """The reference vectors file cannot be read as the contract defines it."""


class IndexFormatError(BadInputError):
    """An index file that cannot be used: damaged, truncated, crafted, or of another version."""


class DataFileError(BadInputError):
    """A data file (normalization, MCC risk, test data, payloads) that is missing or malformed."""


class ModelFormatError(BadInputError):
    """A model file or registry version that cannot be used: unreadable, of another schema, or one
    whose files or stored predictions do not check out."""


class EventError(BadInputError):
    """A raw stream event that is malformed; the message names the field.  It is dead-lettered."""


class LoadTestError(BadInputError):
    """The load test cannot run or its results cannot be read."""


class ConfigError(FraudscoreError, ValueError):
    """A setting (flag, environment variable, configuration) that cannot work; the message names it."""

    category = Category.BAD_CONFIG


class UsageError(ConfigError):
    """A command line that cannot be carried out as given."""


class CgroupError(ConfigError):
    """cgroups cannot be created, limited or read as asked."""


class TransientError(FraudscoreError):
    """A failure of something outside fraudscore that may pass: retry with backoff."""

    category = Category.TRANSIENT


class InternalError(FraudscoreError):
    """fraudscore broke one of its own rules: a bug."""

    category = Category.INTERNAL


class LimitsError(ConfigError):
    """CPU and memory limits that are invalid or exceed the stack's total."""


class ProxyError(ConfigError):
    """An external load balancer (nginx, haproxy) that is missing or refuses its configuration."""


class StackError(ConfigError):
    """A process of the stack could not be started or kept running; the message has its own error."""


class StackStopped(StackError):
    """The stack was asked to stop (a signal) while it was still starting."""


def category_of(exc: BaseException) -> Category:
    """The category of any exception: ours say it; anything else escaped our checks (a bug)."""
    if isinstance(exc, FraudscoreError):
        return exc.category
    return Category.INTERNAL


def exit_code(exc: BaseException) -> int:
    """The exit status a command ends with when ``exc`` stops it."""
    return EXIT_CODES[category_of(exc)]
