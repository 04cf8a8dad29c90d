"""The model registry: a directory of immutable versions, one of them in production.

Layout (``data/registry`` unless ``--registry`` or ``FRAUDSCORE_REGISTRY`` say otherwise)::

    <root>/versions/gbt-20261122T121500Z/   model.txt (LightGBM's text format), forest.bin
                                            (its compiled arrays: models/trees.py), meta.json
    <root>/versions/knn-3f2a…/              meta.json naming an index file and its checksum
    <root>/production.json                  {"production": VERSION, "history": [older …]}

A version is written whole under a temporary name and renamed into place, and its files are
made read-only: a version is complete or absent, and never changes.  ``meta.json`` records the
SHA-256 of each of the version's files, the feature schema, and check rows with LightGBM's own
predictions; ``validate`` checks all three before a version is promoted or opened.  A model
version's evaluator is built from ``forest.bin`` (checksummed, bound to its model.txt's
checksum, and checked against the stored predictions like any model), without parsing
model.txt; a version written before forest.bin existed is parsed from model.txt instead.

The production pointer is replaced atomically (a temporary file, fsync, ``os.replace``, fsync
of the directory), so a crash at any point leaves either the old pointer or the new one.  It
carries its own history, so ``rollback`` is one more atomic replace.  A lock file (``flock``)
keeps concurrent promotions from losing each other's history.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
from array import array
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fraudscore.contract.vectorize import FEATURES
from fraudscore.errors import IndexFormatError, ModelFormatError, UsageError

if TYPE_CHECKING:
    from fraudscore.models._trees import Forest

DEFAULT_REGISTRY = Path(os.environ.get("FRAUDSCORE_REGISTRY", "data/registry"))
POINTER = "production.json"
VERSIONS = "versions"
META = "meta.json"
MODEL_FILE = "model.txt"
FOREST_FILE = "forest.bin"  # model.txt compiled (trees.compile_forest): what a load reads
CHECK_TOLERANCE = 1e-6  # the native evaluator must match LightGBM's stored predictions this closely
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
VERSION_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,31}-[0-9a-zA-Z_-]{1,64}$")


def knn_version(checksum: str) -> str:
    """The version name of the exact kNN over the index whose checksum this is."""
    return f"knn-{checksum[:16]}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, document: Any) -> None:
    """Replace ``path`` with ``document`` so that a crash leaves the old file or the new, whole."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(json.dumps(document, indent=2).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Registry:
    """A registry directory.  Reading never writes; ``create``, ``promote`` and ``rollback`` do."""

    def __init__(self, root: Path | str = DEFAULT_REGISTRY) -> None:
        self.root = Path(root)

    # -- versions ---------------------------------------------------------------------------

    @staticmethod
    def check_name(name: str) -> None:
        if not NAME_PATTERN.match(name):
            raise UsageError(f"--name {name!r}: use lowercase letters, digits and _ (starting with a letter)")

    def version_dir(self, version: str) -> Path:
        if not VERSION_PATTERN.match(version):
            raise UsageError(f"{version!r} is not a version name (like gbt-20261122T121500Z)")
        path = self.root / VERSIONS / version
        if not path.is_dir():
            raise UsageError(f"no version {version} in {self.root} (see: fraudscore model list)")
        return path

    def versions(self) -> list[str]:
        """Every version's name, oldest first."""
        base = self.root / VERSIONS
        if not base.is_dir():
            return []
        found = [p for p in base.iterdir() if p.is_dir() and VERSION_PATTERN.match(p.name)]
        return [p.name for p in sorted(found, key=lambda p: (self._created(p), p.name))]

    @staticmethod
    def _created(path: Path) -> str:
        try:
            return str(json.loads((path / META).read_text()).get("created", ""))
        except (OSError, ValueError, AttributeError):
            return ""

    def meta(self, version: str) -> dict[str, Any]:
        """A version's meta.json; ModelFormatError if it cannot be read."""
        path = self.version_dir(version) / META
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelFormatError(f"{path}: cannot read: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("version") != version:
            raise ModelFormatError(f"{path}: not the meta.json of version {version}")
        return meta

    def create(self, name: str, files: Mapping[str, bytes], meta: dict[str, Any]) -> tuple[str, Path]:
        """Write a new version (files + meta.json with their checksums) and return (version, path)."""
        self.check_name(name)
        base = self.root / VERSIONS
        base.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=base))
        try:
            checksums = {}
            for filename, data in files.items():
                (tmp / filename).write_bytes(data)
                checksums[filename] = hashlib.sha256(data).hexdigest()
            for attempt in range(1000):
                version = f"{name}-{stamp}" + (f"-{attempt + 1}" if attempt else "")
                if not (base / version).exists():
                    break
            full = {"version": version, "created": datetime.now(UTC).isoformat(), "files": checksums, **meta}
            (tmp / META).write_text(json.dumps(full, indent=2) + "\n")
            for p in tmp.iterdir():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
                p.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
            os.rename(tmp, base / version)  # fails, rather than merges, if the name was taken meanwhile
            _fsync_dir(base)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return version, base / version

    def register_knn(self, index_path: Path) -> str:
        """Make the exact kNN over ``index_path`` a version (``knn-<checksum>``), once per index."""
        from fraudscore.index.search import Index
        from fraudscore.scorer import APPROVAL_THRESHOLD

        with Index(index_path) as index:
            checksum = str(getattr(index, "checksum", index.sha256))
            references = index.sha256
        for version in self.versions():
            meta = self.meta(version)
            if meta.get("kind") == "knn" and meta.get("checksum") == checksum:
                return version
        base = self.root / VERSIONS
        base.mkdir(parents=True, exist_ok=True)
        version = knn_version(checksum)
        meta = {
            "version": version,
            "created": datetime.now(UTC).isoformat(),
            "kind": "knn",
            "name": "knn",
            "index": str(Path(index_path).resolve()),
            "checksum": checksum,
            "references_sha256": references,
            "threshold": APPROVAL_THRESHOLD,
            "features": list(FEATURES),
            "files": {},
        }
        tmp = Path(tempfile.mkdtemp(prefix=".knn-", dir=base))
        try:
            (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
            (tmp / META).chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
            os.rename(tmp, base / version)
            _fsync_dir(base)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return version

    # -- validation -------------------------------------------------------------------------

    def validate(self, version: str) -> dict[str, Any]:
        """The version's meta.json once its files, schema and stored predictions check out;
        ModelFormatError naming the first thing that does not."""
        return self.validated(version)[0]

    def validated(
        self, version: str, meta: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], Forest | None]:
        """``validate``'s meta.json, and the model's native evaluator that the check built (None
        for a kNN version): a caller that loads the model builds it once, not twice.  ``meta``:
        the version's meta.json as ``meta`` just read it (a large document: parsing it holds the
        GIL, so a loading thread reads it once)."""
        path = self.version_dir(version)
        if meta is None:
            meta = self.meta(version)
        if meta.get("features") != list(FEATURES):
            raise ModelFormatError(f"{version}: its feature schema is not this contract's 14 features")
        threshold = meta.get("threshold")
        if not isinstance(threshold, int | float) or not 0.0 <= threshold <= 2.0:
            raise ModelFormatError(f"{version}: meta.json has no valid threshold")
        if meta.get("kind") == "knn":
            self._validate_knn(version, meta)
            return meta, None
        if meta.get("kind") != "model":
            raise ModelFormatError(f"{version}: unknown kind {meta.get('kind')!r}")
        files = meta.get("files")
        if not isinstance(files, dict) or MODEL_FILE not in files:
            raise ModelFormatError(f"{version}: meta.json lists no checksum for {MODEL_FILE}")
        compiled: bytes | None = None
        for filename, expected in files.items():
            try:
                if filename == FOREST_FILE:  # read once: checksummed here, then built from
                    compiled = (path / filename).read_bytes()
                    actual = hashlib.sha256(compiled).hexdigest()
                else:
                    actual = sha256_file(path / filename)
            except OSError as exc:
                raise ModelFormatError(f"{version}: cannot read {filename}: {exc.strerror or exc}") from exc
            if actual != expected:
                raise ModelFormatError(f"{version}: {filename} does not match its checksum in meta.json")
        return meta, self._check_predictions(version, path, meta, compiled)

    @staticmethod
    def _validate_knn(version: str, meta: dict[str, Any]) -> None:
        from fraudscore.index.search import Index

        try:
            with Index(meta["index"]) as index:
                checksum = str(getattr(index, "checksum", index.sha256))
        except (KeyError, TypeError, IndexFormatError) as exc:
            raise ModelFormatError(f"{version}: its index cannot be opened: {exc}") from exc
        if checksum != meta.get("checksum"):
            raise ModelFormatError(f"{version}: the index at {meta['index']} is not the one registered")

    @staticmethod
    def _check_predictions(version: str, path: Path, meta: dict[str, Any], compiled: bytes | None) -> Forest:
        """The evaluator, from ``compiled`` (forest.bin's checked bytes) or else from model.txt,
        once it predicts meta.json's check rows as LightGBM did."""
        from fraudscore.models.trees import build_forest, load_forest, read_compiled, rows_buffer

        if compiled is None:
            source = MODEL_FILE
            parsed, forest = load_forest(path / MODEL_FILE)
        else:
            source = FOREST_FILE
            where = f"{version}: {FOREST_FILE}"
            parsed = read_compiled(compiled, where, str(meta["files"][MODEL_FILE]))
            forest = build_forest(parsed, where)
        if list(parsed.feature_names) != list(FEATURES):
            raise ModelFormatError(f"{version}: {source}'s features are not this contract's 14 features")
        check = meta.get("check_rows")
        try:
            rows, expected = check["rows"], check["probabilities"]  # type: ignore[index]
            if not rows or len(rows) != len(expected):
                raise ValueError("no rows")
            # one batch call (without the GIL) rather than one call per row: the same numbers
            predicted = array("d")
            predicted.frombytes(forest.predict_many(rows_buffer(rows, forest.n_features)))
            for i, (got, want) in enumerate(zip(predicted, expected, strict=True)):
                if not math.isclose(got, float(want), rel_tol=0.0, abs_tol=CHECK_TOLERANCE):
                    raise ModelFormatError(
                        f"{version}: check row {i}: the model predicts {got:.9f}, meta.json says {want}"
                    )
        except (TypeError, KeyError, ValueError) as exc:
            if isinstance(exc, ModelFormatError):
                raise
            raise ModelFormatError(f"{version}: meta.json's check rows are malformed: {exc}") from exc
        return forest

    # -- production -------------------------------------------------------------------------

    def _pointer(self) -> dict[str, Any]:
        path = self.root / POINTER
        try:
            pointer = json.loads(path.read_text())
        except FileNotFoundError:
            return {"production": None, "history": []}
        except (OSError, ValueError) as exc:
            raise ModelFormatError(f"{path}: cannot read: {exc}") from exc
        if not isinstance(pointer, dict) or not isinstance(pointer.get("history"), list):
            raise ModelFormatError(f"{path}: not a production pointer")
        return pointer

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Promotions and rollbacks one at a time (they read the pointer, then replace it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def production(self) -> str | None:
        """The version in production, if any."""
        version = self._pointer().get("production")
        return str(version) if version else None

    def history(self) -> list[str]:
        """Versions that were in production before the current one, most recent last."""
        return [str(v) for v in self._pointer()["history"]]

    def promote(self, version: str) -> dict[str, Any]:
        """Validate ``version`` and make it production; the previous one joins the history.
        A candidate or shadow trial of the version ends: it now serves everyone."""
        self.validate(version)
        with self._locked():
            pointer = self._pointer()
            current = pointer.get("production")
            if current == version:
                return pointer
            history = [*pointer["history"], current] if current else list(pointer["history"])
            new = {
                **self._trials(pointer, drop=version),
                "production": version,
                "history": history,
                "promoted": datetime.now(UTC).isoformat(),
            }
            write_json_atomic(self.root / POINTER, new)
        return new

    def rollback(self) -> dict[str, Any]:
        """Put the previous production version back (validated first)."""
        with self._locked():
            pointer = self._pointer()
            history = list(pointer["history"])
            if not history:
                raise UsageError(f"{self.root}: no earlier production version to roll back to")
            previous = history.pop()
            self.validate(previous)
            new = {
                **self._trials(pointer, drop=previous),
                "production": previous,
                "history": history,
                "promoted": datetime.now(UTC).isoformat(),
            }
            write_json_atomic(self.root / POINTER, new)
        return new

    # -- trials: a candidate on a share of the customers, shadows beside production -----------

    @staticmethod
    def _trials(pointer: dict[str, Any], drop: str | None = None) -> dict[str, Any]:
        """The pointer's candidate and shadows, without ``drop`` (a version now in production)."""
        candidate = pointer.get("candidate")
        if not isinstance(candidate, dict) or candidate.get("version") == drop:
            candidate = None
        shadows = [str(v) for v in pointer.get("shadows") or [] if v != drop]
        return {"candidate": candidate, "shadows": shadows}

    def candidate(self) -> tuple[str, float] | None:
        """(the candidate version, its share of customers in percent), if a split is running."""
        candidate = self._trials(self._pointer())["candidate"]
        if candidate is None:
            return None
        return str(candidate["version"]), float(candidate["share"])

    def shadows(self) -> list[str]:
        """The versions scoring every request in the shadow of production."""
        return list(self._trials(self._pointer())["shadows"])

    def _change_trials(self, version: str | None, change: Any) -> dict[str, Any]:
        if version is not None:
            self.validate(version)
        with self._locked():
            pointer = self._pointer()
            new = {**pointer, **self._trials(pointer)}
            change(new)
            new["changed"] = datetime.now(UTC).isoformat()
            write_json_atomic(self.root / POINTER, new)
        return new

    def promote_candidate(self, version: str, share: float) -> dict[str, Any]:
        """Send ``share`` percent of customers (by ``live.arm_of``) to ``version``, validated first."""
        if not (isinstance(share, int | float) and 0 < share < 100):
            raise UsageError(f"--share must be a percentage between 0 and 100 (exclusive), got {share}")
        if version == self.production():
            raise UsageError(f"{version} is already in production")

        def change(pointer: dict[str, Any]) -> None:
            pointer["candidate"] = {"version": version, "share": share}

        return self._change_trials(version, change)

    def add_shadow(self, version: str) -> dict[str, Any]:
        """Have ``version`` score every request beside production, off the response path."""
        if version == self.production():
            raise UsageError(f"{version} is already in production")

        def change(pointer: dict[str, Any]) -> None:
            if version not in pointer["shadows"]:
                pointer["shadows"] = [*pointer["shadows"], version]

        return self._change_trials(version, change)

    def abort(self) -> dict[str, Any]:
        """End every trial: no candidate, no shadows; production serves everyone."""

        def change(pointer: dict[str, Any]) -> None:
            pointer["candidate"] = None
            pointer["shadows"] = []

        return self._change_trials(None, change)
