"""``references.json.gz`` (3M labelled vectors) to an index file, in one streaming pass.

The JSON is decompressed in chunks and parsed by the native core straight into int16
(value x 10000, exact for 4-decimal values); the SHA-256 of the uncompressed bytes is kept
in the index so a test-data file can be checked against the references it was made from.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from fraudscore.errors import ConfigError, ReferenceDataError
from fraudscore.index import _knn

log = logging.getLogger(__name__)

CHUNK_BYTES = 8 << 20
DEFAULT_LEAF_SIZE = 64
DEFAULT_FANOUT_LEVELS = 3  # 8 children per node: measured equal to 16 and better than 2


@dataclass(frozen=True)
class BuildReport:
    """What ``build_index`` made, and how long each step took."""

    path: Path
    n_points: int
    n_fraud: int
    file_bytes: int
    sha256: str
    parse_seconds: float
    build_seconds: float


def _open(path: Path) -> tuple[io.BufferedIOBase, io.BufferedReader]:
    """The decompressed stream, and the raw file whose position measures progress."""
    raw = open(path, "rb")  # noqa: SIM115 - closed by the caller through the pair
    magic = raw.read(2)
    raw.seek(0)
    if magic == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    return raw, raw


def read_references(path: Path, *, progress: bool = True) -> tuple[bytearray, bytearray, bytes]:
    """Parse a reference file (``.json`` or ``.json.gz``) into (int16 vectors, labels, sha256)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency; stay usable without it
        tqdm = None
    vectors, labels = bytearray(), bytearray()
    digest = hashlib.sha256()
    state, offset, pending = 0, 0, b""
    try:
        stream, raw = _open(path)
    except OSError as exc:
        raise ReferenceDataError(f"cannot open {path}: {exc.strerror or exc}") from exc
    total = os.fstat(raw.fileno()).st_size
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="parse", disable=not progress) if tqdm else None
    with raw, stream:
        while True:
            try:
                chunk = stream.read(CHUNK_BYTES)
            except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
                raise ReferenceDataError(f"{path}: cannot decompress: {exc}") from exc
            digest.update(chunk)
            data = pending + chunk
            try:
                used, state, vecs, labs = _knn.parse_references(data, state, not chunk, offset)
            except ValueError as exc:
                raise ReferenceDataError(f"{path}: {exc}") from exc
            vectors += vecs
            labels += labs
            offset += used
            pending = data[used:]
            if bar is not None:
                bar.update(raw.tell() - bar.n)
            if not chunk:
                break
    if bar is not None:
        bar.close()
    if not labels:
        raise ReferenceDataError(f"{path}: no reference vectors")
    return vectors, labels, digest.digest()


def seal(data: bytearray) -> None:
    """Write into an index file's bytes the checksum of what they hold now.

    ``build_index`` seals what it writes; this is for tools and tests that change a file on
    purpose, so that what refuses the change is the structural checks, not the checksum.
    """
    at = _knn.CHECKSUM_OFFSET
    data[at : at + 8] = _knn.checksum(memoryview(data)[at + 8 :]).to_bytes(8, "little")


def _open_output(out: Path) -> tuple[Path, BinaryIO]:
    """The temporary file the index is written to, created now: an output that cannot be written
    (a directory, a folder that cannot be made, no permission) fails before the long work."""
    if out.is_dir():
        raise ConfigError(f"cannot write the index to {out}: it is a directory")
    tmp = out.with_name(out.name + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return tmp, open(tmp, "wb")  # closed by build_index, on every path
    except OSError as exc:
        raise ConfigError(f"cannot write the index to {out}: {exc.strerror or exc}") from exc


def build_index(
    references: Path,
    out: Path,
    *,
    leaf_size: int = DEFAULT_LEAF_SIZE,
    fanout_levels: int = DEFAULT_FANOUT_LEVELS,
    progress: bool = True,
) -> BuildReport:
    """Build the index file for ``references`` at ``out``: written whole to ``out.tmp``, then renamed
    into place.  The output is checked first; ``out.tmp`` is removed on any failure, ^C included."""
    started = time.perf_counter()
    out = Path(out)
    tmp, sink = _open_output(out)
    try:
        with sink:
            vectors, labels, sha = read_references(Path(references), progress=progress)
            parsed = time.perf_counter()
            log.info("parsed %d references in %.1f s", len(labels), parsed - started)
            try:
                blob = _knn.build_index(
                    vectors, labels, sha, leaf_size=leaf_size, fanout_levels=fanout_levels
                )
            except ValueError as exc:
                raise ReferenceDataError(f"{references}: {exc}") from exc
            del vectors
            try:
                sink.write(blob)
            except OSError as exc:
                raise ConfigError(f"cannot write the index to {out}: {exc.strerror or exc}") from exc
        try:
            os.replace(tmp, out)
        except OSError as exc:
            raise ConfigError(f"cannot write the index to {out}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    built = time.perf_counter()
    log.info("built %s (%.1f MB) in %.1f s", out, len(blob) / 1e6, built - parsed)
    return BuildReport(
        path=out,
        n_points=len(labels),
        n_fraud=sum(labels),
        file_bytes=len(blob),
        sha256=sha.hex(),
        parse_seconds=parsed - started,
        build_seconds=built - parsed,
    )
