"""cgroup limits on real processes (skipped, with the reason, where cgroups cannot be written).

The real tests run on whichever version this machine mounts; the other version's files are
checked on a stand-in directory tree (formats only: no kernel behind them).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fraudscore.errors import CgroupError
from fraudscore.stack.cgroups import OWN, CgroupManager, V1Cgroup, V2Cgroup, detect, parse_hierarchies
from fraudscore.stack.limits import DEFAULT_STACK, MIB, ServiceLimits

# Grows by 8 MiB a step, touching every byte so the pages are really charged.
HOG = "chunks = []\nwhile True:\n    chunks.append(b'\\x01' * (8 << 20))"
HOLD_64_MIB = "import sys\nblock = b'\\x01' * (64 << 20)\nsys.exit(0)"
SPIN_1S = "import time\nend = time.monotonic() + 1.0\nwhile time.monotonic() < end:\n    pass"


@pytest.fixture
def cgroups() -> Iterator[CgroupManager]:
    reason = CgroupManager.unavailable_reason()
    if reason is not None:
        pytest.skip(f"cgroups not writable here: {reason}")
    manager = CgroupManager(f"fraudscore-test-{os.getpid()}")
    yield manager
    manager.cleanup(kill=True)


def run_in(enter: Callable[[], None], code: str) -> subprocess.Popen[bytes]:
    """Start Python code with ``enter`` run in the child before exec: limited from its first instruction."""
    return subprocess.Popen([sys.executable, "-c", code], preexec_fn=enter)


def test_memory_limit_kills_a_child_that_exceeds_it(cgroups: CgroupManager) -> None:
    hog = cgroups.create(ServiceLimits("hog", 1.0, 32))
    assert hog.memory_limit_bytes() == 32 * MIB
    child = run_in(hog.enter, HOG)
    assert child.wait(timeout=15) == -signal.SIGKILL
    assert hog.oom_kills() in (None, 1)
    peak = hog.peak_memory_bytes()
    if peak is not None:
        assert 16 * MIB < peak <= 32 * MIB


def test_peak_memory_of_a_child_within_its_limit(cgroups: CgroupManager) -> None:
    cgroup = cgroups.create(ServiceLimits("holder", 1.0, 128))
    child = run_in(cgroup.enter, HOLD_64_MIB)
    assert child.wait(timeout=15) == 0
    peak = cgroup.peak_memory_bytes()
    if peak is None:
        pytest.skip("this kernel does not report peak memory (v2 before 5.19)")
    assert 64 * MIB <= peak <= 128 * MIB
    assert cgroup.oom_kills() in (None, 0)


def test_cpu_quota_throttles_a_busy_child(cgroups: CgroupManager) -> None:
    spin = cgroups.create(ServiceLimits("spin", 0.2, 64))
    assert spin.cpu_limit() == pytest.approx(0.2)
    started = time.monotonic()
    child = run_in(spin.enter, SPIN_1S)
    assert child.wait(timeout=15) == 0
    assert time.monotonic() - started >= 1.0
    used = spin.cpu_seconds()
    if used is None:
        pytest.skip("no CPU accounting in this hierarchy (v1 without cpuacct)")
    # Unthrottled it would use ~1 s of CPU in its 1 s of wall time; 0.2 CPU allows ~0.2 s.
    assert 0.05 < used < 0.5
    # ...and the kernel counts the time it held the child back: most of that second
    throttled = spin.throttled_seconds()
    assert throttled is not None and throttled > 0.3


def test_outer_cgroup_holds_the_whole_stack_limit(cgroups: CgroupManager) -> None:
    outer = cgroups.create_outer(DEFAULT_STACK)
    assert outer.cpu_limit() == pytest.approx(DEFAULT_STACK.total_cpus)
    assert outer.memory_limit_bytes() == DEFAULT_STACK.total_memory_mib * MIB


def test_cleanup_removes_every_directory(cgroups: CgroupManager) -> None:
    api = cgroups.create(ServiceLimits("api1", 0.45, 165))
    child = subprocess.Popen(["sleep", "30"], preexec_fn=api.enter)
    try:
        assert api.pids() == [child.pid]
        # Still inside: removing is refused, naming the process.
        with pytest.raises(CgroupError, match=rf"cannot remove .*api1.*{child.pid}"):
            api.remove(timeout=0.05)
    finally:
        child.kill()
        child.wait()
    made = [*api.dirs, *cgroups.parent().dirs]
    assert all(d.is_dir() for d in made)
    cgroups.cleanup()
    assert not any(d.exists() for d in made)
    cgroups.cleanup()  # idempotent


def test_the_kernel_holds_the_limits_in_its_version_s_files(cgroups: CgroupManager) -> None:
    api = cgroups.create(ServiceLimits("api1", 0.45, 165))
    assert type(api) is type(cgroups.root) and type(api) in (V1Cgroup, V2Cgroup)
    if isinstance(api, V1Cgroup):
        assert (api.cpu_dir / "cpu.cfs_quota_us").read_text().strip() == "45000"
        assert (api.cpu_dir / "cpu.cfs_period_us").read_text().strip() == "100000"
        assert int((api.memory_dir / "memory.limit_in_bytes").read_text()) == 165 * MIB
    else:
        assert isinstance(api, V2Cgroup)
        assert (api.directory / "cpu.max").read_text().split() == ["45000", "100000"]
        assert int((api.directory / "memory.max").read_text()) == 165 * MIB


def test_errors_name_the_file(cgroups: CgroupManager, tmp_path: Path) -> None:
    api = cgroups.create(ServiceLimits("api1", 0.45, 165))
    with pytest.raises(
        CgroupError, match=r"cannot write '999999999' to .*api1/cgroup.procs: No such process"
    ):
        api.add(999_999_999)


# Without root: parsing, error messages, and the v2 file protocol on a stand-in directory tree.

V1_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V1_CGROUP = "4:memory:/box/7\n2:cpu,cpuacct:/\n0::/\n"


def test_parse_v1_with_comounted_cpu_and_cpuacct() -> None:
    v1, v2 = parse_hierarchies(V1_MOUNTINFO, V1_CGROUP)
    assert v1 == {
        "cpu": Path("/sys/fs/cgroup/cpu,cpuacct"),
        "cpuacct": Path("/sys/fs/cgroup/cpu,cpuacct"),
        "memory": Path("/sys/fs/cgroup/memory/box/7"),
    }
    assert v2 == Path("/sys/fs/cgroup/unified")
    root = V1Cgroup(OWN, v1["cpu"], v1["memory"], v1["cpuacct"])
    assert root.dirs == (v1["cpu"], v1["memory"])  # co-mounted: one directory for cpu and cpuacct


def test_parse_v2_in_a_container() -> None:
    mountinfo = "30 25 0:26 /kubepods/pod1 /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"
    assert parse_hierarchies(mountinfo, "0::/kubepods/pod1/app\n") == ({}, Path("/sys/fs/cgroup/app"))


def _mounts(tmp_path: Path, v2_controllers: str | None) -> tuple[Path, Path]:
    """/proc/self/mountinfo and /proc/self/cgroup of a hybrid machine whose mounts are under tmp_path;
    the v2 mount's cgroup.controllers lists ``v2_controllers`` (None: the v2 tree is absent)."""
    (tmp_path / "cpu").mkdir()
    (tmp_path / "memory").mkdir()
    if v2_controllers is not None:
        (tmp_path / "unified").mkdir()
        (tmp_path / "unified" / "cgroup.controllers").write_text(v2_controllers + "\n")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        f"32 31 0:29 / {tmp_path}/cpu rw - cgroup cgroup rw,cpu\n"
        f"35 31 0:32 / {tmp_path}/memory rw - cgroup cgroup rw,memory\n"
        f"41 31 0:38 / {tmp_path}/unified rw - cgroup2 cgroup2 rw\n"
    )
    proc_cgroup = tmp_path / "cgroup"
    proc_cgroup.write_text("4:memory:/\n1:cpu:/\n0::/\n")
    return mountinfo, proc_cgroup


def test_detect_picks_v2_when_it_has_the_controllers(tmp_path: Path) -> None:
    root = detect(*_mounts(tmp_path, "cpuset cpu io memory pids"))
    assert isinstance(root, V2Cgroup) and root.dirs == (tmp_path / "unified",)


def test_detect_picks_v1_when_v2_cannot_limit(tmp_path: Path) -> None:
    # hybrid: cpu and memory stay bound to v1, so v2 lists neither
    root = detect(*_mounts(tmp_path, "pids"))
    assert isinstance(root, V1Cgroup)
    assert (root.cpu_dir, root.memory_dir, root.cpuacct_dir) == (tmp_path / "cpu", tmp_path / "memory", None)
    assert root.cpu_seconds() is None  # no cpuacct hierarchy, so no CPU accounting


def test_detect_on_this_machine() -> None:
    try:
        root = detect()
    except CgroupError as exc:
        pytest.skip(f"no cgroup hierarchy here: {exc}")
    controllers = Path(next(iter(root.dirs)), "cgroup.controllers")
    assert isinstance(root, V2Cgroup) == controllers.exists()


def test_detect_without_a_hierarchy_is_a_clear_error(tmp_path: Path) -> None:
    mountinfo, proc_cgroup = tmp_path / "mountinfo", tmp_path / "cgroup"
    mountinfo.write_text("31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n")
    proc_cgroup.write_text("0::/\n")
    with pytest.raises(CgroupError, match="no cgroup hierarchy with both the cpu and memory controllers"):
        detect(mountinfo, proc_cgroup)


def test_missing_hierarchy_is_a_clear_error(tmp_path: Path) -> None:
    gone = tmp_path / "not-mounted"
    manager = CgroupManager("stack", root=V1Cgroup(OWN, gone / "cpu", gone / "memory"))
    with pytest.raises(
        CgroupError, match=rf"cannot create {gone}/cpu/stack: .*parent directory does not exist"
    ):
        manager.create(ServiceLimits("api1", 0.45, 165))


def test_v1_files_on_a_stand_in_tree(tmp_path: Path) -> None:
    cpu, memory = tmp_path / "cpu,cpuacct", tmp_path / "memory"
    cpu.mkdir()
    memory.mkdir()
    manager = CgroupManager("stack", root=V1Cgroup(OWN, cpu, memory, cpu))
    api = manager.create(ServiceLimits("api1", 0.45, 165))
    assert isinstance(api, V1Cgroup)
    assert api.dirs == (cpu / "stack" / "api1", memory / "stack" / "api1")
    assert not (cpu / "cgroup.subtree_control").exists()  # v1 has nothing to enable
    assert (api.cpu_dir / "cpu.cfs_period_us").read_text() == "100000"
    assert (api.cpu_dir / "cpu.cfs_quota_us").read_text() == "45000"
    assert api.cpu_limit() == pytest.approx(0.45)
    assert api.memory_limit_bytes() == 165 * MIB
    api.add(4242)
    assert api.pids() == [4242]
    assert (api.memory_dir / "cgroup.procs").read_text() == "4242"  # in every hierarchy
    (api.cpu_dir / "cpuacct.usage").write_text("1500000000\n")
    (api.cpu_dir / "cpu.stat").write_text("nr_periods 20\nnr_throttled 5\nthrottled_time 250000000\n")
    (api.memory_dir / "memory.max_usage_in_bytes").write_text(f"{100 * MIB}\n")
    (api.memory_dir / "memory.usage_in_bytes").write_text(f"{90 * MIB}\n")
    (api.memory_dir / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert api.cpu_seconds() == 1.5
    assert api.throttled_seconds() == 0.25
    assert api.peak_memory_bytes() == 100 * MIB
    assert api.memory_bytes() == 90 * MIB
    assert api.oom_kills() == 2
    (api.cpu_dir / "cpu.cfs_quota_us").write_text("-1\n")
    (api.memory_dir / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert (api.cpu_limit(), api.memory_limit_bytes()) == (None, None)


def test_v1_memsw_is_limited_when_swap_is_accounted(tmp_path: Path) -> None:
    memory = tmp_path / "memory"
    memory.mkdir()
    (memory / "memory.memsw.limit_in_bytes").write_text("")
    api = V1Cgroup("api1", tmp_path, memory)
    api.apply(ServiceLimits("api1", 0.45, 165))
    assert (memory / "memory.memsw.limit_in_bytes").read_text() == str(165 * MIB)


def test_v2_files_on_a_stand_in_tree(tmp_path: Path) -> None:
    (tmp_path / "cgroup.subtree_control").write_text("")
    manager = CgroupManager("stack", root=V2Cgroup(OWN, tmp_path))
    api = manager.create(ServiceLimits("api1", 0.45, 165))
    assert isinstance(api, V2Cgroup)
    assert api.dirs == (tmp_path / "stack" / "api1",)
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+cpu +memory"
    assert (tmp_path / "stack" / "cgroup.subtree_control").read_text() == "+cpu +memory"
    assert (api.directory / "cpu.max").read_text() == "45000 100000"
    assert api.cpu_limit() == pytest.approx(0.45)
    assert api.memory_limit_bytes() == 165 * MIB
    api.add(4242)
    assert api.pids() == [4242]
    (api.directory / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1000000\nthrottled_usec 250000\n")
    (api.directory / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (api.directory / "memory.current").write_text(f"{90 * MIB}\n")
    assert api.cpu_seconds() == 1.5
    assert api.throttled_seconds() == 0.25
    assert api.oom_kills() == 1
    assert api.memory_bytes() == 90 * MIB
    assert api.peak_memory_bytes() is None  # no memory.peak before Linux 5.19
    (api.directory / "memory.max").write_text("max\n")
    (api.directory / "cpu.max").write_text("max 100000\n")
    assert (api.cpu_limit(), api.memory_limit_bytes()) == (None, None)
