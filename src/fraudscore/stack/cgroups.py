"""Hold processes to a service's CPU and memory limits with kernel cgroups (v1 or v2), as compose would.

The local runner uses this so benchmarks run under the same numbers as ``deploy/rinha``. Layout::

    <own cgroup>/<stack name>-<pid>/<service>     (in each of the cpu, cpuacct and memory hierarchies on v1)

New cgroups go under the cgroup this process is already in, so any limit above it still applies.
``detect`` finds that cgroup once, as a ``V1Cgroup`` or a ``V2Cgroup``: each knows its version's
files, and every cgroup made below it is of the same kind.

    with CgroupManager() as cgroups:
        api = cgroups.create(ServiceLimits("api1", 0.45, 165))
        proc = subprocess.Popen(argv, preexec_fn=api.enter)    # limited from its first instruction
        ...
        proc.wait()
        print(api.peak_memory_bytes(), api.cpu_seconds())
    # leaving the block kills what is left inside and removes every cgroup it made
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Literal

from fraudscore.errors import CgroupError
from fraudscore.stack.limits import ServiceLimits, StackLimits

# Docker's CFS period; a quota of cpus x period gives the same throttling pattern as compose.
CPU_PERIOD_US = 100_000
MOUNTINFO = Path("/proc/self/mountinfo")
PROC_CGROUP = Path("/proc/self/cgroup")
# The controllers a service's limits need.
LIMITED_CONTROLLERS = ("cpu", "memory")
# v1 says "no memory limit" with a huge page-aligned number near 2**63.
V1_UNLIMITED_BYTES = 1 << 62
# The name ``detect`` gives this process's own cgroup, the root of the ones made here.
OWN = "(own)"

_ERRNO_HINTS = {
    errno.EACCES: "not permitted: root is needed, or the hierarchy is delegated to another user",
    errno.EPERM: "not permitted: root is needed, or the hierarchy is delegated to another user",
    errno.EROFS: "the cgroup filesystem is mounted read-only",
    errno.ENOENT: "the cgroup is gone, or its controller is not enabled",
    errno.EBUSY: "busy: v2 refuses to enable controllers in a cgroup that holds processes",
    errno.ESRCH: "no such process",
    errno.EINVAL: "the kernel refused the value",
}
# mkdir fails for other reasons than writes do.
_MKDIR_ERRNO_HINTS = {**_ERRNO_HINTS, errno.ENOENT: "its parent directory does not exist"}


def _os_error(action: str, path: Path, exc: OSError, hints: dict[int, str] = _ERRNO_HINTS) -> CgroupError:
    why = exc.strerror or str(exc)
    hint = hints.get(exc.errno or 0)
    return CgroupError(f"cannot {action} {path}: {why}" + (f" ({hint})" if hint else ""))


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        raise _os_error(f"write {value!r} to", path, exc) from exc


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise _os_error("read", path, exc) from exc


def _flat_keyed_value(path: Path, key: str) -> int | None:
    """The value of ``key`` in a flat-keyed file (``cpu.stat``, ``memory.events``), if present."""
    if not path.exists():
        return None
    for line in _read(path).splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return None


def _own_cgroup_paths(proc_cgroup: str) -> dict[str, str]:
    """Controller (or "" for the v2 line) to this process's cgroup path, from /proc/self/cgroup."""
    paths: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                paths[controller] = parts[2]
    return paths


def _own_directory(mountpoint: str, mount_root: str, own: str) -> Path:
    # With a bind-mounted sub-hierarchy the mount root is not "/": strip it from our own path.
    if mount_root != "/" and (own == mount_root or own.startswith(mount_root + "/")):
        own = own[len(mount_root) :]
    return Path(mountpoint, own.lstrip("/"))


def parse_hierarchies(mountinfo: str, proc_cgroup: str) -> tuple[dict[str, Path], Path | None]:
    """Our own cgroup's directory per v1 controller, and on the v2 mount (None if not mounted)."""
    own = _own_cgroup_paths(proc_cgroup)
    v1: dict[str, Path] = {}
    v2: Path | None = None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        mount_root, mountpoint = fields[3], fields[4].replace("\\040", " ")
        if tail[0] == "cgroup2" and "" in own:
            v2 = _own_directory(mountpoint, mount_root, own[""])
        elif tail[0] == "cgroup":
            for controller in tail[2].split(","):
                if controller in ("cpu", "cpuacct", "memory") and controller in own:
                    v1[controller] = _own_directory(mountpoint, mount_root, own[controller])
    return v1, v2


class Cgroup(ABC):
    """One cgroup: its directories and the files that limit and account for what runs inside.

    ``V1Cgroup`` and ``V2Cgroup`` each know one version's files; ``detect`` picks the version once,
    and every cgroup made under the one it returns is of the same kind.  Making a ``Cgroup`` object
    makes no directory: ``make`` does.
    """

    version: ClassVar[Literal[1, 2]]

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.dirs[0]})"

    # -- what each version defines ------------------------------------------------------------

    @property
    @abstractmethod
    def dirs(self) -> tuple[Path, ...]:
        """Every directory of this cgroup (one per mounted hierarchy on v1, one on v2)."""

    @abstractmethod
    def child(self, name: str) -> Cgroup:
        """The cgroup ``name`` below this one, of the same version (not made yet)."""

    @abstractmethod
    def delegate(self) -> None:
        """Let the children of this cgroup have CPU and memory limits."""

    @abstractmethod
    def apply(self, limits: ServiceLimits) -> None:
        """Set the CPU quota and the memory ceiling (swap included, so the ceiling is not dodged)."""

    @abstractmethod
    def cpu_limit(self) -> float | None:
        """The CPU quota in CPUs as the kernel holds it, or None when unlimited."""

    @abstractmethod
    def memory_limit_bytes(self) -> int | None:
        """The memory ceiling as the kernel holds it (rounded to pages), or None when unlimited."""

    @abstractmethod
    def memory_bytes(self) -> int:
        """Memory charged now (anonymous plus page cache first touched from inside)."""

    @abstractmethod
    def peak_memory_bytes(self) -> int | None:
        """The highest charge since creation, or None where the kernel does not keep it."""

    @abstractmethod
    def cpu_seconds(self) -> float | None:
        """CPU time used by everything that ran inside, or None if the kernel does not count it here."""

    @abstractmethod
    def throttled_seconds(self) -> float | None:
        """How long the CPU quota held this cgroup's processes back, or None if the kernel does not say.

        Throttling shows as latency: a process that spent its quota waits for the next period."""

    @abstractmethod
    def oom_kills(self) -> int | None:
        """How many processes the kernel killed here for exceeding the memory limit (None: not counted)."""

    # -- the same on both ---------------------------------------------------------------------

    def make(self) -> None:
        """Create the directories; on failure, remove the ones just made and raise CgroupError."""
        made: list[Path] = []
        for d in self.dirs:
            try:
                d.mkdir()
            except OSError as exc:
                for m in reversed(made):
                    m.rmdir()  # just made and still empty, so this cannot be busy
                if exc.errno == errno.EEXIST:
                    raise CgroupError(f"cannot create {d}: it already exists (a leftover? rmdir it)") from exc
                raise _os_error("create", d, exc, _MKDIR_ERRNO_HINTS) from exc
            made.append(d)

    def add(self, pid: int) -> None:
        """Move a process (all its threads) in. Its children, forked later, stay in too."""
        for d in self.dirs:
            _write(d / "cgroup.procs", str(pid))

    def enter(self) -> None:
        """Move the calling process in: pass as ``subprocess.Popen(..., preexec_fn=cgroup.enter)``."""
        self.add(os.getpid())

    def pids(self) -> list[int]:
        found: set[int] = set()
        for d in self.dirs:
            if d.exists():
                found.update(int(x) for x in _read(d / "cgroup.procs").split())
        return sorted(found)

    def kill(self) -> None:
        """SIGKILL every process inside (the caller still reaps its own children)."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                os.kill(pid, signal.SIGKILL)

    def remove(self, timeout: float = 2.0) -> None:
        """Remove the directories, waiting up to ``timeout`` s for exiting processes to leave. Idempotent."""
        deadline = time.monotonic() + timeout
        for d in self.dirs:
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        left = f"; processes still inside: {self.pids()}" if exc.errno == errno.EBUSY else ""
                        raise CgroupError(f"cannot remove {d}: {exc.strerror}{left}") from exc
                    time.sleep(0.01)


class V1Cgroup(Cgroup):
    """A cgroup v1: a directory in each of the cpu, cpuacct and memory hierarchies (equal when co-mounted)."""

    version = 1

    def __init__(self, name: str, cpu: Path, memory: Path, cpuacct: Path | None = None) -> None:
        super().__init__(name)
        self.cpu_dir, self.memory_dir, self.cpuacct_dir = cpu, memory, cpuacct

    @property
    def dirs(self) -> tuple[Path, ...]:
        return tuple(dict.fromkeys(p for p in (self.cpu_dir, self.cpuacct_dir, self.memory_dir) if p))

    def child(self, name: str) -> V1Cgroup:
        cpuacct = None if self.cpuacct_dir is None else self.cpuacct_dir / name
        return V1Cgroup(name, self.cpu_dir / name, self.memory_dir / name, cpuacct)

    def delegate(self) -> None:
        pass  # on v1, every cgroup of a controller's hierarchy may be limited: nothing to enable

    def apply(self, limits: ServiceLimits) -> None:
        _write(self.cpu_dir / "cpu.cfs_period_us", str(CPU_PERIOD_US))
        _write(self.cpu_dir / "cpu.cfs_quota_us", str(_quota_us(limits)))
        # memsw may not be below the memory limit, so the memory limit is set first.
        _write(self.memory_dir / "memory.limit_in_bytes", str(limits.memory_bytes))
        if (self.memory_dir / "memory.memsw.limit_in_bytes").exists():
            _write(self.memory_dir / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))

    def cpu_limit(self) -> float | None:
        quota = int(_read(self.cpu_dir / "cpu.cfs_quota_us"))
        period = int(_read(self.cpu_dir / "cpu.cfs_period_us"))
        return None if quota < 0 else quota / period  # -1: unlimited

    def memory_limit_bytes(self) -> int | None:
        value = int(_read(self.memory_dir / "memory.limit_in_bytes"))
        # "Unlimited" is a huge page-aligned number near 2**63.
        return None if value >= V1_UNLIMITED_BYTES else value

    def memory_bytes(self) -> int:
        return int(_read(self.memory_dir / "memory.usage_in_bytes"))

    def peak_memory_bytes(self) -> int | None:
        return int(_read(self.memory_dir / "memory.max_usage_in_bytes"))

    def cpu_seconds(self) -> float | None:
        if self.cpuacct_dir is None:
            return None
        return int(_read(self.cpuacct_dir / "cpuacct.usage")) / 1e9

    def throttled_seconds(self) -> float | None:
        ns = _flat_keyed_value(self.cpu_dir / "cpu.stat", "throttled_time")
        return None if ns is None else ns / 1e9

    def oom_kills(self) -> int | None:
        return _flat_keyed_value(self.memory_dir / "memory.oom_control", "oom_kill")


class V2Cgroup(Cgroup):
    """A cgroup v2: one directory in the unified hierarchy."""

    version = 2

    def __init__(self, name: str, directory: Path) -> None:
        super().__init__(name)
        self.directory = directory

    @property
    def dirs(self) -> tuple[Path, ...]:
        return (self.directory,)

    def child(self, name: str) -> V2Cgroup:
        return V2Cgroup(name, self.directory / name)

    def delegate(self) -> None:
        control = self.directory / "cgroup.subtree_control"
        enabled = set(_read(control).split()) if control.exists() else set()
        missing = set(LIMITED_CONTROLLERS) - enabled
        if missing:
            _write(control, " ".join(f"+{c}" for c in sorted(missing)))

    def apply(self, limits: ServiceLimits) -> None:
        _write(self.directory / "cpu.max", f"{_quota_us(limits)} {CPU_PERIOD_US}")
        _write(self.directory / "memory.max", str(limits.memory_bytes))
        if (self.directory / "memory.swap.max").exists():
            _write(self.directory / "memory.swap.max", "0")

    def cpu_limit(self) -> float | None:
        quota, period = _read(self.directory / "cpu.max").split()
        return None if quota == "max" else int(quota) / int(period)

    def memory_limit_bytes(self) -> int | None:
        text = _read(self.directory / "memory.max").strip()
        return None if text == "max" else int(text)

    def memory_bytes(self) -> int:
        return int(_read(self.directory / "memory.current"))

    def peak_memory_bytes(self) -> int | None:
        # memory.peak came with Linux 5.19
        path = self.directory / "memory.peak"
        return int(_read(path)) if path.exists() else None

    def cpu_seconds(self) -> float | None:
        usec = _flat_keyed_value(self.directory / "cpu.stat", "usage_usec")
        return None if usec is None else usec / 1e6

    def throttled_seconds(self) -> float | None:
        usec = _flat_keyed_value(self.directory / "cpu.stat", "throttled_usec")
        return None if usec is None else usec / 1e6

    def oom_kills(self) -> int | None:
        return _flat_keyed_value(self.directory / "memory.events", "oom_kill")

    def kill(self) -> None:
        # cgroup.kill (Linux 5.14) kills everything inside at once, even processes forking meanwhile.
        if (self.directory / "cgroup.kill").exists():
            _write(self.directory / "cgroup.kill", "1")
        else:
            super().kill()


def _quota_us(limits: ServiceLimits) -> int:
    """The CFS quota per ``CPU_PERIOD_US`` for the service's CPUs; the kernel's minimum is 1 ms."""
    return max(1000, round(limits.cpus * CPU_PERIOD_US))


def detect(mountinfo: Path = MOUNTINFO, proc_cgroup: Path = PROC_CGROUP) -> Cgroup:
    """This process's own cgroup in the hierarchy that can limit CPU and memory: v2 if its
    controllers are there, else v1.  New cgroups go below it."""
    if not sys.platform.startswith("linux"):
        raise CgroupError(f"cgroups are a Linux feature; this is {sys.platform}")
    v1, v2 = parse_hierarchies(_read(mountinfo), _read(proc_cgroup))
    # On a hybrid system the v2 mount exists but cpu and memory stay bound to v1; then it cannot limit.
    controllers = v2 / "cgroup.controllers" if v2 is not None else None
    if (
        controllers is not None
        and controllers.exists()
        and set(LIMITED_CONTROLLERS) <= set(_read(controllers).split())
    ):
        return V2Cgroup(OWN, controllers.parent)
    if "cpu" in v1 and "memory" in v1:
        return V1Cgroup(OWN, cpu=v1["cpu"], memory=v1["memory"], cpuacct=v1.get("cpuacct"))
    raise CgroupError(
        f"no cgroup hierarchy with both the cpu and memory controllers is mounted (see {mountinfo})"
    )


class CgroupManager:
    """Makes the stack's cgroups under one parent (default name ``fraudscore-<pid>``), and removes them.

    ``root`` is where the parent goes: by default this process's own cgroup, as ``detect`` finds it.
    """

    def __init__(self, name: str | None = None, *, root: Cgroup | None = None):
        self.root = root if root is not None else detect()
        self.name = name or f"fraudscore-{os.getpid()}"
        self._parent: Cgroup | None = None
        self._children: list[Cgroup] = []

    @staticmethod
    def unavailable_reason() -> str | None:
        """Why cgroups cannot be used here, or None if a cgroup can be made (checked by making one)."""
        try:
            root = detect()
            probe = root.child(f"fraudscore-probe-{os.getpid()}")
            probe.make()
            probe.remove(timeout=0)
            root.delegate()
        except CgroupError as exc:
            return str(exc)
        return None

    @classmethod
    def available(cls) -> bool:
        return cls.unavailable_reason() is None

    def parent(self) -> Cgroup:
        """The stack's own cgroup, made on first use; it has no limits of its own."""
        if self._parent is None:
            self.root.delegate()
            parent = self.root.child(self.name)
            parent.make()
            parent.delegate()
            self._parent = parent
        return self._parent

    def create(self, limits: ServiceLimits) -> Cgroup:
        """A cgroup named after the service, under the stack's parent, with its limits applied."""
        child = self.parent().child(limits.name)
        child.make()
        try:
            child.apply(limits)
        except CgroupError:
            child.remove(timeout=0)
            raise
        self._children.append(child)
        return child

    def create_outer(self, stack: StackLimits, name: str = "stack") -> Cgroup:
        """One cgroup with the stack's total limits, for running every process inside one ceiling."""
        return self.create(ServiceLimits(name, stack.total_cpus, stack.total_memory_mib))

    def cleanup(self, *, kill: bool = False, timeout: float = 2.0) -> None:
        """Remove every cgroup made here; with ``kill``, SIGKILL what is still inside first.

        The processes must have left (exited) for the removal to succeed; what could not be
        removed is kept, so a later call can retry.
        """
        errors: list[str] = []
        kept: list[Cgroup] = []
        for cgroup in reversed(self._children):
            try:
                if kill:
                    cgroup.kill()
                cgroup.remove(timeout)
            except CgroupError as exc:
                errors.append(str(exc))
                kept.insert(0, cgroup)
        self._children = kept
        if self._parent is not None and not kept:
            try:
                self._parent.remove(timeout)
                self._parent = None
            except CgroupError as exc:
                errors.append(str(exc))
        if errors:
            raise CgroupError("; ".join(errors))

    def __enter__(self) -> CgroupManager:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup(kill=True)
