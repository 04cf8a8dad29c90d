"""What a running instance reads when it loads a version: each meta.json once, and again only
when the file changed (``live._Metas``)."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest

from fraudscore.models.live import LiveModels
from fraudscore.models.registry import META, POINTER, Registry, write_json_atomic
from tests.models_support import small_model


@pytest.fixture
def two_versions(index_path: Path, tmp_path: Path) -> tuple[Registry, str, str]:
    """A registry of two copies of the small model, writable (to change a meta.json)."""
    registry, report = small_model()
    names = (report.version, report.version + "_b")
    for name in names:
        dst = tmp_path / "versions" / name
        shutil.copytree(registry.version_dir(report.version), dst)
        for p in dst.iterdir():
            p.chmod(stat.S_IRUSR | stat.S_IWUSR)
        meta = json.loads((dst / META).read_text())
        (dst / META).write_text(json.dumps({**meta, "version": name}))
    return Registry(tmp_path), *names


def _point(registry: Registry, version: str) -> None:
    write_json_atomic(registry.root / POINTER, {"production": version, "history": []})


def _reads(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The versions whose meta.json ``registry`` reads from now on, in order."""
    reads: list[str] = []
    meta = registry.meta

    def counted(version: str) -> dict[str, object]:
        reads.append(version)
        return meta(version)

    monkeypatch.setattr(registry, "meta", counted)
    return reads


def test_swapping_back_and_forth_reads_each_meta_json_once(
    two_versions: tuple[Registry, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, a, b = two_versions
    reads = _reads(registry, monkeypatch)
    live = LiveModels(registry)
    _point(registry, a)
    live.refresh()
    for version in (b, a, b, a):
        _point(registry, version)
        assert live.refresh()["result"] == "swapped"
        production = live.current.production
        assert production is not None and production.version == version
        assert production.meta["version"] == version
    assert sorted(reads) == [a, b]


def test_a_changed_meta_json_is_read_again(
    two_versions: tuple[Registry, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, a, b = two_versions
    live = LiveModels(registry)
    _point(registry, a)
    live.refresh()
    _point(registry, b)
    live.refresh()
    path = registry.version_dir(a) / META
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "threshold": 7.0}))  # out of range: the load must fail
    reads = _reads(registry, monkeypatch)
    _point(registry, a)
    result = live.refresh()
    assert result["result"] == "failed" and "threshold" in result["error"]
    assert reads == [a]
    production = live.current.production
    assert production is not None and production.version == b  # b keeps serving
