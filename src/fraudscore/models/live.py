"""The versions a running instance serves, following the registry without a restart.

**Following.**  A ``LiveModels`` holds the live set: the production version, a candidate with
its share of customers, shadow versions (and, for ``/v1/score``, the model shown beside a kNN
production).  A thread of its own polls ``production.json`` every ``POLL_SECONDS`` (a stat: the
pointer is replaced atomically, so each change is a new inode); ``reload()`` (SIGHUP,
``POST /admin/reload``) wakes it at once.  A changed pointer's versions are loaded and validated
(files, schema, stored predictions: ``Registry.validate``) in that thread, never on an event
loop, and the new set replaces the old in one assignment.  A version that fails leaves the
current set serving, and is logged, counted and recorded (``failures``, the instance file).

**Releasing.**  Each loaded version (``Loaded``) is reference counted: the live set holds one
reference while the version is in it, and every use (a request, a worker's batch, a shadow
batch) holds one for its duration.  A version leaving the set is closed when its last user lets
go, whenever that is: no sleep, no grace period.

**A/B.**  ``arm_of`` is the one split function, used by the service and the stream worker: a
keyed SipHash-2-4 of the customer's id (the transaction's when absent) and of the candidate's
version, so a customer keeps its arm on every instance and across restarts, and a new candidate
draws a new sample of customers.  The hash is native (``service._fastpath.siphash24``), the one
the fast path also computes when it answers ``/v1/score`` itself.

**Discovery.**  Each instance writes ``<registry>/instances/<host>-<pid>.json`` (its role, pid,
start, admin address and status), rewrites it at each swap or failure and removes it at stop;
``fraudscore model status`` reads them.

**Drift.**  Each loaded model version carries a ``drift`` tracker (``models.drift.Drift``:
``observe``, ``snapshot``) against the reference distribution in its meta.json; a kNN version
has none (``NoDrift``).  Trackers are fed and read on the event loop only (the after-answer
queue, ``GET /admin/status``); the instance file, written from the follower thread, leaves
drift out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from fraudscore.errors import ConfigError, FraudscoreError
from fraudscore.models.registry import META, POINTER, Registry, write_json_atomic
from fraudscore.scorer import KnnScorer, Scorer, ScorerId
from fraudscore.service._fastpath import siphash24

log = logging.getLogger(__name__)

# a promotion takes effect within this plus the version's load time; the variable lets a test (or
# an operator who only wants SIGHUP and /admin/reload) slow the polling down
POLL_ENV = "FRAUDSCORE_REGISTRY_POLL"
POLL_SECONDS = float(os.environ.get(POLL_ENV, "0.2"))
# while a version loads (Python work between calls that release the GIL), the interpreter
# hands the GIL to a waiting thread (the event loop) after this long instead of the default 5 ms:
# measured (bench/lifecycle_lag.py), a waiting thread's median wake-up lag during loads drops from
# 1.4-2.0 to 0.7 ms and its p99 from 9-10 to 6-7.5 ms; the longest (about 10 ms) stays: one C call
LOAD_SWITCH_INTERVAL = 0.0005
AB_KEY = b"fraudscore/ab-v2"  # the split hash's 16-byte key: changing it reshuffles every customer
AB_BUCKETS = 10_000  # shares resolve to 0.01 %
INSTANCES = "instances"
MAX_FAILURES = 20  # the failures an instance remembers (the newest)
RECENT_METAS = 8  # meta.json documents an instance keeps between refreshes (see _Metas)
PRODUCTION, CANDIDATE, SHADOW = "production", "candidate", "shadow"


# -- the split -----------------------------------------------------------------------------------


def arm_bucket(key: str, candidate: str) -> int:
    """The bucket (0 … AB_BUCKETS-1) of a customer key for a candidate version."""
    return siphash24(AB_KEY, candidate.encode() + b"\0" + key.encode()) % AB_BUCKETS


def arm_cut(share: float) -> int:
    """The buckets below this one are the candidate's, for ``share`` percent of keys."""
    return round(share * AB_BUCKETS / 100)


def arm_of(key: str, candidate: str, share: float) -> str:
    """``"candidate"`` for ``share`` percent of keys, ``"production"`` for the rest."""
    return CANDIDATE if arm_bucket(key, candidate) < arm_cut(share) else PRODUCTION


def split_key(payload: Any) -> str:
    """What the split hashes: ``customer.id``, else the transaction's ``id``, else nothing."""
    customer = payload.get("customer") if isinstance(payload, dict) else None
    if isinstance(customer, dict):
        ident = customer.get("id")
        if isinstance(ident, str) and ident:
            return ident
    ident = payload.get("id") if isinstance(payload, dict) else None
    return ident if isinstance(ident, str) else ""


# -- drift hook ----------------------------------------------------------------------------------


class DriftLike(Protocol):
    def observe(self, vector: list[float], score: float, /) -> None: ...
    def snapshot(self) -> dict[str, Any]: ...


class NoDrift:
    """No drift tracking: a version without a reference distribution (the kNN)."""

    def observe(self, vector: list[float], score: float, /) -> None:
        """Nothing to track."""

    def snapshot(self) -> dict[str, Any]:
        return {}


def drift_for(meta: dict[str, Any]) -> DriftLike:
    """The drift tracker of a version: a model's against its training distribution."""
    if meta.get("kind", "model") != "model":
        return NoDrift()
    from fraudscore.models.drift import Drift

    return Drift.for_meta(meta)


# -- one loaded version --------------------------------------------------------------------------


class Loaded:
    """A loaded version and its users: closed when the last reference goes."""

    def __init__(self, version: str, meta: dict[str, Any], scorer: Scorer, owned: bool) -> None:
        self.version = version
        self.meta = meta
        self.kind = str(meta.get("kind", "model"))
        self.scorer = scorer
        self.drift = drift_for(meta)
        self._owned = owned  # close the scorer when released (not the service's own kNN)
        self._refs = 1  # the live set's
        self._held = True  # by the live set (until ``retire``)
        self._closed = False
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        """Take a reference; False once the version is closed (the caller reads the set again)."""
        with self._lock:
            if self._closed:
                return False
            self._refs += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            last = self._refs == 0
            if last:
                self._closed = True
        if last:
            log.info("released %s", self.version)
            if self._owned:
                self.scorer.close()

    def retire(self) -> None:
        """The live set lets go: closed now, or when its last user ends."""
        with self._lock:
            if not self._held:
                return
            self._held = False
        self.release()

    @property
    def in_use(self) -> int:
        """References held beyond the live set's own: requests or batches using the version."""
        return self._refs - (1 if self._held else 0)

    @property
    def closed(self) -> bool:
        return self._closed


@dataclass(frozen=True)
class ModelSet:
    """What one instance serves at one moment; replaced whole, never changed."""

    production: Loaded | None = None
    candidate: Loaded | None = None
    share: float = 0.0
    shadows: tuple[Loaded, ...] = ()
    beside: Loaded | None = None  # a model shown beside a kNN production (/v1/score's "model")

    def arm(self, key: str) -> str:
        if self.candidate is None:
            return PRODUCTION
        return arm_of(key, self.candidate.version, self.share)

    def members(self) -> dict[str, Loaded]:
        out: dict[str, Loaded] = {}
        for loaded in (self.production, self.candidate, self.beside, *self.shadows):
            if loaded is not None:
                out[loaded.version] = loaded
        return out

    def key(self) -> tuple[object, ...]:
        def v(x: Loaded | None) -> str | None:
            return x.version if x else None

        return (
            v(self.production),
            v(self.candidate),
            self.share,
            tuple(s.version for s in self.shadows),
            v(self.beside),
        )

    def describe(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for arm, loaded, share in (
            (PRODUCTION, self.production, 100.0 - (self.share if self.candidate else 0.0)),
            (CANDIDATE, self.candidate, self.share),
            ("beside", self.beside, None),
            *((SHADOW, s, None) for s in self.shadows),
        ):
            if loaded is not None:
                rows.append(
                    {
                        "version": loaded.version,
                        "kind": loaded.kind,
                        "arm": arm,
                        "share": share,
                        "in_use": loaded.in_use,
                    }
                )
        return rows


@dataclass(frozen=True)
class Failure:
    version: str | None
    error: str
    at: str

    def as_json(self) -> dict[str, Any]:
        return {"version": self.version, "error": self.error, "at": self.at}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


# -- the follower --------------------------------------------------------------------------------


@contextlib.contextmanager
def _yielding_gil() -> Iterator[None]:
    """Loads run with a short GIL switch interval (LOAD_SWITCH_INTERVAL); refreshes are serial
    (``_refresh_lock``), so the interval put back is the one found."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(min(previous, LOAD_SWITCH_INTERVAL))
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


_Stamp = tuple[int, int, int, int]


class _Metas:
    """The meta.json of each version, read at most once per refresh, and not again at a later
    refresh while its file is unchanged (``recent``, shared between refreshes): a model's is a
    large document (check rows, drift reference) whose parse is one call holding the GIL for
    about 1.5 ms, and promotions and rollbacks swap between the same few versions.  The
    documents are read-only for everyone (the live set's versions hold the same ones)."""

    def __init__(self, registry: Registry, recent: OrderedDict[str, tuple[_Stamp, dict[str, Any]]]) -> None:
        self.registry = registry
        self._recent = recent
        self._read: dict[str, dict[str, Any]] = {}

    def get(self, version: str) -> dict[str, Any]:
        if version in self._read:
            return self._read[version]
        try:
            st = os.stat(self.registry.version_dir(version) / META)
            stamp: _Stamp | None = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except OSError:
            stamp = None  # registry.meta says why
        known = self._recent.get(version)
        if stamp is not None and known is not None and known[0] == stamp:
            meta = known[1]
            self._recent.move_to_end(version)
        else:
            meta = self.registry.meta(version)  # stat before read: a later change shows in the stamp
            if stamp is not None:
                self._recent[version] = (stamp, meta)
                while len(self._recent) > RECENT_METAS:
                    self._recent.popitem(last=False)
        self._read[version] = meta
        return meta


@dataclass
class _Wanted:
    production: str | None
    candidate: str | None
    share: float
    shadows: tuple[str, ...]
    beside: str | None

    def versions(self) -> list[str]:
        return [v for v in (self.production, self.candidate, self.beside, *self.shadows) if v]


class LiveModels:
    """The live set of one instance, following its registry (``start``) until ``stop``.

    ``knn``: the instance's own kNN, which serves a ``knn-…`` version of the same index (any
    other index is refused); without it, kNN versions open their own index.  ``beside_newest``:
    with a kNN production, also load the newest model version (``/v1/score`` shows it)."""

    def __init__(
        self, registry: Registry | None, *, knn: KnnScorer | None = None, beside_newest: bool = False
    ) -> None:
        self.registry = registry
        self.knn = knn
        self.beside_newest = beside_newest
        self.current = ModelSet()
        self.swaps = 0
        self.failures: list[Failure] = []
        self.listeners: list[Callable[[ModelSet], None]] = []
        self._stamp: tuple[int, int, int] | None = None
        self._refresh_lock = threading.Lock()
        self._recent_metas: OrderedDict[str, tuple[_Stamp, dict[str, Any]]] = OrderedDict()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- loading --------------------------------------------------------------------------

    def _pointer_stamp(self) -> tuple[int, int, int] | None:
        assert self.registry is not None
        try:
            st = os.stat(self.registry.root / POINTER)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _wanted(self, metas: _Metas) -> _Wanted:
        assert self.registry is not None
        registry = self.registry
        production = registry.production()
        candidate = registry.candidate()
        beside = None
        kind = metas.get(production).get("kind") if production else None
        if self.beside_newest and kind != "model":
            beside = next(
                (v for v in reversed(registry.versions()) if metas.get(v).get("kind") == "model"), None
            )
        return _Wanted(
            production,
            candidate[0] if candidate else None,
            candidate[1] if candidate else 0.0,
            tuple(registry.shadows()),
            beside,
        )

    def _load(self, version: str, metas: _Metas) -> Loaded:
        from fraudscore.models.scorer import ModelScorer
        from fraudscore.service import metrics

        assert self.registry is not None
        registry = self.registry
        name = "unknown"
        try:
            meta = metas.get(version)
            name = str(meta.get("name", name))
            if meta.get("kind") == "knn" and self.knn is not None:
                # the instance's own index, open already: the version must be its kNN
                if meta.get("checksum") != self.knn.index.checksum:
                    raise ConfigError(
                        f"{version} is the kNN of {meta.get('index')}, not of the index served "
                        f"({self.knn.index.path})"
                    )
                scorer: Scorer = self.knn
                owned = False
            else:
                meta, forest = registry.validated(version, meta)  # built once (by its check)
                if forest is None:
                    scorer = KnnScorer.open(meta["index"])
                    scorer.id = ScorerId("knn", "knn", version)
                else:
                    scorer = ModelScorer(forest, meta)
                owned = True
        except Exception as exc:
            metrics.model_loaded(name, version, ok=False)
            metrics.count_error(exc)
            raise
        metrics.model_loaded(name, version, ok=True)
        return Loaded(version, meta, scorer, owned)

    def refresh(self, force: bool = False) -> dict[str, Any]:
        """Load what the registry says now, if it changed (or ``force``): {"result": "swapped" |
        "unchanged" | "failed", …}.  Raises only at the first load (``start`` refuses to serve
        without a working set); later failures keep the current set."""
        if self.registry is None:
            return {"result": "unchanged", "versions": self.current.describe()}
        with self._refresh_lock:
            stamp = self._pointer_stamp()
            first = self._stamp is None and not self.current.members()
            if not force and not first and stamp == self._stamp:
                return {"result": "unchanged", "versions": self.current.describe()}
            self._stamp = stamp
            current = self.current.members()
            loaded: dict[str, Loaded] = {}
            version: str | None = None
            metas = _Metas(self.registry, self._recent_metas)
            try:
                wanted = self._wanted(metas)
                with _yielding_gil():
                    for version in wanted.versions():
                        if version not in current and version not in loaded:
                            loaded[version] = self._load(version, metas)
            except Exception as exc:
                for new in loaded.values():
                    new.retire()
                if first:
                    raise
                return self._failed(version, exc)
            pool = {**current, **loaded}

            def get(v: str | None) -> Loaded | None:
                return pool[v] if v else None

            new_set = ModelSet(
                production=get(wanted.production),
                candidate=get(wanted.candidate),
                share=wanted.share,
                shadows=tuple(pool[v] for v in wanted.shadows),
                beside=get(wanted.beside),
            )
            if new_set.key() == self.current.key():
                return {"result": "unchanged", "versions": self.current.describe()}
            old = self.current
            if not first:
                self.swaps += 1  # counted before anyone can see the new set
            self.current = new_set
            for listener in self.listeners:
                listener(new_set)
            keep = new_set.members()
            for v, gone in old.members().items():
                if v not in keep:
                    gone.retire()  # closed now, or when its last user ends
            log.info("serving %s", ", ".join(f"{r['version']} ({r['arm']})" for r in new_set.describe()))
            return {"result": "swapped", "versions": new_set.describe()}

    def _failed(self, version: str | None, exc: Exception) -> dict[str, Any]:
        message = str(exc) if isinstance(exc, FraudscoreError) else f"{type(exc).__name__}: {exc}"
        log.warning("keeping the current versions: %s cannot be loaded: %s", version, message)
        self.failures = [*self.failures, Failure(version, message, _now())][-MAX_FAILURES:]
        for listener in self.listeners:
            listener(self.current)
        return {"result": "failed", "version": version, "error": message, "versions": self.current.describe()}

    # -- using ----------------------------------------------------------------------------

    def use(self, arm_key: str) -> tuple[str, Loaded] | None:
        """(the arm, its version, acquired: release it when done) for one customer key."""
        while True:
            models = self.current
            arm = models.arm(arm_key)
            loaded = models.candidate if arm == CANDIDATE else models.production
            if loaded is None:
                return None
            if loaded.acquire():
                return arm, loaded

    def score_batch(
        self, keys: Sequence[str], vectors: Sequence[Sequence[float]]
    ) -> list[tuple[float, bool, str]]:
        """(score, approved, "kind:name:version") of each vector, each scored by its key's arm:
        one batch call per arm.  The stream worker's scoring."""
        while True:
            models = self.current
            arms = [models.arm(k) for k in keys]
            users: dict[str, Loaded] = {}
            for arm, loaded in ((PRODUCTION, models.production), (CANDIDATE, models.candidate)):
                if loaded is not None and arm in arms:
                    users[arm] = loaded
            taken = [x for x in users.values() if x.acquire()]
            if len(taken) == len(users):
                break
            for x in taken:  # a version closed between the read and the acquire: read the set again
                x.release()
        if PRODUCTION in arms and PRODUCTION not in users:
            raise ConfigError("no version in production (see: fraudscore model promote)")
        try:
            out: list[tuple[float, bool, str]] = [(0.0, False, "")] * len(keys)
            for arm, loaded in users.items():
                where = [i for i, a in enumerate(arms) if a == arm]
                scorer = loaded.scorer
                sid = scorer.id
                name = f"{sid.kind}:{sid.name}:{loaded.version}"
                for i, score in zip(where, scorer.scores([vectors[i] for i in where]), strict=True):
                    out[i] = (score, scorer.approves(score), name)
            return out
        finally:
            for x in users.values():
                x.release()

    # -- following ------------------------------------------------------------------------

    def start(self) -> None:
        """Load the registry's versions now (raising if they cannot be), then follow it."""
        self.refresh()
        self.follow()

    def follow(self) -> None:
        """Follow the registry in a thread of its own, from now until ``stop``."""
        if self.registry is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._follow, name="registry-follower", daemon=True)
        self._thread.start()

    def reload(self) -> None:
        """Check the registry now (SIGHUP): safe from a signal handler or another thread."""
        self._wake.set()

    def _follow(self) -> None:
        while not self._stop.is_set():
            forced = self._wake.wait(POLL_SECONDS)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.refresh(force=forced)
            except Exception:  # the follower must outlive anything one refresh meets
                log.exception("following the registry")

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def status(self, *, drift: bool = True) -> dict[str, Any]:
        """Versions, swaps and failures; with ``drift`` (only on the event loop, whose requests
        feed the trackers) each model version's drift snapshot."""
        out: dict[str, Any] = {
            "versions": self.current.describe(),
            "swaps": self.swaps,
            "failures": [f.as_json() for f in self.failures],
        }
        if drift:
            out["drift"] = {v: loaded.drift.snapshot() for v, loaded in self.current.members().items()}
        return out

    def drifts(self) -> list[Any]:
        """The drift trackers of the versions loaded now (for the metrics collector)."""
        from fraudscore.models.drift import Drift

        return [x.drift for x in self.current.members().values() if isinstance(x.drift, Drift)]


# -- instance files ------------------------------------------------------------------------------


@dataclass
class InstanceFile:
    """``<registry>/instances/<host>-<pid>.json``: this instance, for ``fraudscore model status``."""

    registry: Registry
    role: str  # "service" or "worker"
    admin: str | None  # http://127.0.0.1:PORT of the admin listener, if any
    started: str = field(default_factory=_now)
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)

    @property
    def path(self) -> Path:
        return self.registry.root / INSTANCES / f"{self.host}-{self.pid}.json"

    def write(self, status: dict[str, Any]) -> None:
        """Write (or rewrite) the file; a registry that is not writable only costs discovery."""
        document = {
            "host": self.host,
            "pid": self.pid,
            "role": self.role,
            "admin": self.admin,
            "started": self.started,
            "updated": _now(),
            **status,
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, document)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.path, exc)

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


def follow_with_file(live: LiveModels, instance: InstanceFile, extra: Callable[[], dict[str, Any]]) -> None:
    """Keep ``instance``'s file up to date with ``live``'s swaps and failures."""
    live.listeners.append(lambda _: instance.write({**live.status(drift=False), **extra()}))
    instance.write({**live.status(drift=False), **extra()})


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
