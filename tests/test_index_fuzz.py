"""Damaged and crafted index files: each is refused (IndexFormatError) or answers exactly as the
undamaged file does -- never a crash, a hang or a different answer.

Two lines of defence are tested apart.  The checksum refuses random damage; to test what is
behind it, the structural checks, the damage is also *resealed* (``build.seal``: the checksum
recomputed over the damaged bytes) so that only the structural checks stand between it and the
search.  Most cases use a small index built here, so that thousands of opens stay fast.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fraudscore import Index, IndexFormatError
from fraudscore.index import _knn
from fraudscore.index.build import build_index, seal
from fraudscore.index.search import random_queries

from .test_index import write_references

# the header, as _knn.c's file_header_t lays it out (little-endian)
HEADER_CODES = ["8s", "I", "I", "Q", "Q", "Q", "I", "I", "Q", "Q", "Q", "Q", "Q", "Q", "32s", "Q"]
HEADER = struct.Struct("<" + "".join(HEADER_CODES))
HEADER_FIELDS = [
    "magic", "version", "header_size", "checksum", "n_points", "n_slots", "n_groups", "leaf_size",
    "n_entries", "groups_off", "entries_off", "blocks_off", "ids_off", "file_size", "sha256", "n_fraud",
]  # fmt: skip
GROUP = struct.Struct("<8IQQ12s14h")  # group_t, without its padding to 128 bytes
GROUP_BYTES = 128
ENTRY = struct.Struct("<12h12hii8x")  # entry_t: lo, hi, link, count, reserved
LINK_AT = 48  # offset of entry_t.link; count follows it
ID_PADDING = 0xFFFFFFFF

# a few cases per damage kind and region on the full index, many on the small one
CASES_PER_REGION = int(os.environ.get("FRAUDSCORE_FUZZ_CASES", "150"))


@dataclass
class Layout:
    """Where the sections of an index file are, read from its header."""

    fields: dict[str, Any]
    groups: list[tuple[Any, ...]]  # numbers, and the dimension pairs as bytes

    @classmethod
    def of(cls, data: bytes | bytearray) -> Layout:
        fields = dict(zip(HEADER_FIELDS, HEADER.unpack_from(data), strict=True))
        groups = [
            GROUP.unpack_from(data, fields["groups_off"] + i * GROUP_BYTES) for i in range(fields["n_groups"])
        ]
        return cls(fields, groups)

    def entry_at(self, i: int) -> int:
        return int(self.fields["entries_off"]) + 64 * i

    def regions(self) -> dict[str, tuple[int, int]]:
        f = self.fields
        return {
            "header": (0, HEADER.size),
            "groups": (f["groups_off"], f["groups_off"] + f["n_groups"] * GROUP_BYTES),
            "roots": (self.entry_at(self.groups[0][4]), self.entry_at(self.groups[0][4] + 1)),
            "tree": (f["entries_off"], f["entries_off"] + 64 * f["n_entries"]),
            "blocks": (f["blocks_off"], f["ids_off"]),
            "ids": (f["ids_off"], f["ids_off"] + 4 * f["n_slots"]),
        }

    def entries(self, data: bytes | bytearray) -> Iterator[tuple[int, tuple[int, ...]]]:
        for i in range(self.fields["n_entries"]):
            yield i, ENTRY.unpack_from(data, self.entry_at(i))


class Judge:
    """Opens damaged copies of one index and compares their answers with the original's."""

    def __init__(self, path: Path, workdir: Path, n_queries: int = 40) -> None:
        self.original = path.read_bytes()
        self.layout = Layout.of(self.original)
        self.file = workdir / "damaged.fsidx"
        self.queries = random_queries(n_queries, seed=21, sentinel_share=0.3)
        with Index(path) as idx:
            self.expected = self.answers(idx)
        self.refused: list[str] = []
        self.accepted = 0

    def answers(self, idx: Index) -> list[Any]:
        return [idx.knn(q, 8) for q in self.queries] + [idx.fraud_counts(self.queries)]

    def check(self, data: bytes | bytearray, what: str) -> str | None:
        """The refusal's message, or None when the file was accepted (and answered alike)."""
        self.file.write_bytes(data)
        try:
            idx = Index(self.file)
        except IndexFormatError as exc:
            assert isinstance(exc.__cause__, ValueError), what
            self.refused.append(str(exc))
            return str(exc)
        with idx:
            assert self.answers(idx) == self.expected, f"accepted with different answers: {what}"
            assert idx.brute_force(self.queries[0], 8) == self.expected[0], what
        self.accepted += 1
        return None


def damages(rng: random.Random) -> list[tuple[str, Callable[[int], int]]]:
    return [
        ("bit flip", lambda b: b ^ (1 << rng.randrange(8))),
        ("0x00", lambda b: 0),
        ("0xFF", lambda b: 0xFF),
        ("random", lambda b: rng.randrange(256)),
    ]


@pytest.fixture(scope="module")
def small_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3,000 references, small leaves and fan-out 4: a few hundred entries over several groups."""
    work = tmp_path_factory.mktemp("fuzz")
    rng = random.Random(5)
    records = [
        {"vector": v, "label": "fraud" if rng.random() < 0.3 else "legit"}
        for v in random_queries(3000, seed=13, sentinel_share=0.3)
    ]
    path = work / "small.fsidx"
    build_index(
        write_references(work / "refs.json", records), path, leaf_size=16, fanout_levels=2, progress=False
    )
    return path


@pytest.fixture
def judge(small_index: Path, tmp_path: Path) -> Judge:
    return Judge(small_index, tmp_path)


def test_the_small_index_has_what_the_fuzzing_needs(judge: Judge) -> None:
    f = judge.layout.fields
    assert f["version"] == _knn.FORMAT_VERSION
    assert f["n_groups"] >= 8 and f["n_entries"] > 200
    assert any(e[-1] > 0 for _, e in judge.layout.entries(judge.original))  # leaves
    assert any(e[-1] < 0 for _, e in judge.layout.entries(judge.original))  # internal nodes
    assert judge.check(judge.original, "untouched") is None


def test_checksum_is_xxh64() -> None:
    # the reference values of XXH64 with seed 0
    assert _knn.checksum(b"") == 0xEF46DB3751D8E999
    assert _knn.checksum(b"abc") == 0x44BC2CF5AD770999


def test_random_damage_is_refused_by_the_checksum(judge: Judge) -> None:
    rng = random.Random(1)
    for region, (start, end) in judge.layout.regions().items():
        for kind, damage in damages(rng):
            for _ in range(max(1, CASES_PER_REGION // 8)):
                at = rng.randrange(start, end)
                data = bytearray(judge.original)
                data[at] = damage(data[at])
                message = judge.check(data, f"{region} {kind} at {at}")
                assert message is not None or data == judge.original, (region, kind, at)
    assert judge.refused and all(
        any(why in m for why in ("checksum mismatch", "bad magic", "version", "header says", "header size"))
        for m in judge.refused
    ), {m.split(":")[1] for m in judge.refused}


def test_truncated_or_extended_files_are_refused(judge: Judge) -> None:
    size = len(judge.original)
    for cut in (0, 7, 100, 4095, 4096, size // 2, size - 64, size - 1):
        assert judge.check(judge.original[:cut], f"cut at {cut}") is not None
    for extra in (b"\0", b"\0" * 64, b"\xff" * 4096):
        assert judge.check(judge.original + extra, f"{len(extra)} extra bytes") is not None


@pytest.mark.parametrize("region", ["header", "groups", "roots", "tree", "ids"])
def test_resealed_damage_is_refused_or_harmless(judge: Judge, region: str) -> None:
    """Behind the checksum: damage that carries a valid checksum meets the structural checks.
    (Leaf values are data, not structure: see the next test.)"""
    rng = random.Random(hash(region) & 0xFFFF)
    start, end = judge.layout.regions()[region]
    for kind, damage in damages(rng):
        for _ in range(CASES_PER_REGION):
            at = rng.randrange(start, end)
            data = bytearray(judge.original)
            data[at] = damage(data[at])
            seal(data)
            judge.check(data, f"resealed {region} {kind} at {at}")
    assert judge.refused, "no damage refused: the checks were not reached"
    assert not any("checksum" in m for m in judge.refused)


def test_resealed_leaf_values_out_of_range_are_refused(judge: Judge) -> None:
    """A stored value outside [-1, 1] would index past the distance table; one outside its leaf's
    box would be pruned wrongly.  Both are refused whatever the checksum says."""
    rng = random.Random(3)
    start, end = judge.layout.regions()["blocks"]
    for value in (10001, -10001, 0x7FFF, -0x8000, 20000):
        for _ in range(20):
            at = start + 2 * rng.randrange((end - start) // 2)
            data = bytearray(judge.original)
            struct.pack_into("<h", data, at, value)
            seal(data)
            message = judge.check(data, f"value {value} at {at}")
            assert message is not None and "outside its leaf's box" in message, (value, at)


def _first(judge: Judge, leaf: bool, skip_roots: bool = False) -> int:
    roots = {g[4] for g in judge.layout.groups}
    for i, e in judge.layout.entries(judge.original):
        if (e[-1] > 0) == leaf and not (skip_roots and i in roots):
            return i
    raise AssertionError("no such entry")


def _craft(judge: Judge, at: int, fmt: str, value: int) -> bytearray:
    data = bytearray(judge.original)
    struct.pack_into(fmt, data, at, value)
    seal(data)
    return data


def _entry_cases(judge: Judge) -> list[tuple[str, int, str, int, str]]:
    internal = _first(judge, leaf=False)
    inner = _first(judge, leaf=False, skip_roots=True)
    leaf = _first(judge, leaf=True)
    link, count = judge.layout.entry_at(internal) + LINK_AT, judge.layout.entry_at(internal) + LINK_AT + 4
    leaf_link, leaf_count = judge.layout.entry_at(leaf) + LINK_AT, judge.layout.entry_at(leaf) + LINK_AT + 4
    leaf_points = struct.unpack_from("<i", judge.original, leaf_count)[0]
    leaf_first_block = struct.unpack_from("<i", judge.original, leaf_link)[0]
    return [
        ("a node that is its own child", link, "<i", internal, "child link"),
        ("a link back to the root", judge.layout.entry_at(inner) + LINK_AT, "<i", 0, "child link"),
        ("a link past the end", link, "<i", judge.layout.fields["n_entries"], "child link"),
        ("a negative link", link, "<i", -1, "child link"),
        ("the largest link", link, "<i", 2**31 - 1, "child link"),
        ("fan-out over the limit", count, "<i", -33, "fan-out"),
        ("fan-out of INT32_MIN", count, "<i", -(2**31), "fan-out"),
        ("fan-out of one", count, "<i", -1, "fan-out"),
        ("fan-out of zero", count, "<i", 0, "fan-out"),
        ("a leaf of 2^28 points", leaf_count, "<i", 1 << 28, "leaf"),
        ("a leaf of INT32_MAX points", leaf_count, "<i", 2**31 - 1, "leaf"),
        ("a leaf one point longer", leaf_count, "<i", leaf_points + 1, ""),
        ("a leaf's blocks elsewhere", leaf_link, "<i", leaf_first_block + 1, "leaf blocks"),
        ("a leaf's blocks negative", leaf_link, "<i", -8, "leaf blocks"),
        ("a box outside [-1, 1]", judge.layout.entry_at(leaf), "<h", -30000, "box"),
        ("an inverted box", judge.layout.entry_at(leaf) + 24, "<h", -10000, "box"),
    ]


def test_crafted_tree_entries_are_refused(judge: Judge) -> None:
    for what, at, fmt, value, message in _entry_cases(judge):
        refusal = judge.check(_craft(judge, at, fmt, value), what)
        assert refusal is not None, what
        assert message in refusal, (what, refusal)


def test_crafted_headers_are_refused(judge: Judge) -> None:
    at: dict[str, tuple[int, str]] = {}  # each header field's offset and format
    pos = 0
    for name, code in zip(HEADER_FIELDS, HEADER_CODES, strict=True):
        at[name] = (pos, "<" + code)
        pos += struct.calcsize("<" + code)
    wraps = 2**64 - 64
    cases = [
        ("n_entries", 2**60), ("n_entries", 2**58 + 1), ("n_entries", 0), ("n_slots", 2**62),
        ("n_points", 0), ("n_points", 2**31), ("n_fraud", judge.layout.fields["n_fraud"] + 1),
        ("n_groups", 0), ("n_groups", 33), ("n_groups", 2**32 - 1), ("groups_off", wraps),
        ("entries_off", wraps), ("blocks_off", wraps), ("ids_off", wraps), ("ids_off", 2**63),
        ("blocks_off", judge.layout.fields["blocks_off"] + 64), ("header_size", 0),
        ("n_points", judge.layout.fields["n_points"] - 1),
    ]  # fmt: skip
    for name, value in cases:
        offset, fmt = at[name]
        refusal = judge.check(_craft(judge, offset, fmt, value), f"{name} = {value}")
        assert refusal is not None and "checksum" not in refusal, (name, value, refusal)
    # the version: an old file is refused with what to do about it
    data = bytearray(judge.original)
    struct.pack_into("<I", data, 8, _knn.FORMAT_VERSION - 1)
    refusal = judge.check(data, "old version")
    assert refusal is not None and "fraudscore index build" in refusal


def test_crafted_groups_and_ids_are_refused(judge: Judge) -> None:
    f, groups = judge.layout.fields, judge.layout.groups
    g0 = f["groups_off"]
    cases: list[tuple[str, int, str, int]] = [
        ("group key changed", g0, "<I", groups[0][0] ^ 1),
        ("group key 32", g0, "<I", 32),
        ("group with 7 pairs", g0 + 12, "<I", 7),
        ("group root out of range", g0 + 16, "<I", f["n_entries"]),
        ("group root wraps", g0 + 16, "<I", 2**32 - 1),
        ("group of no entries", g0 + 20, "<I", 0),
        ("group's blocks past the file", g0 + 24, "<I", 2**32 - 1),
        ("group block offset wraps", g0 + 32, "<Q", 2**64 - 32),
        ("group slot offset wraps", g0 + 40, "<Q", 2**64 - 8),
        ("group stores a dimension twice", g0 + 48, "<B", groups[0][10][1]),
        ("group constant changed", g0 + 60 + 2 * 9, "<h", 5000),
        ("group of more points", g0 + 4, "<I", groups[0][1] + 1),
    ]
    ids = f["ids_off"]
    first, second = struct.unpack_from("<II", judge.original, ids)
    cases += [
        ("an id twice", ids + 4, "<I", first),
        ("an id past the references", ids, "<I", f["n_points"]),
        ("a label flipped", ids, "<I", first ^ 0x80000000),
        ("padding among the points", ids, "<I", ID_PADDING),
    ]
    assert second != first
    for what, at, fmt, value in cases:
        refusal = judge.check(_craft(judge, at, fmt, value), what)
        assert refusal is not None and "checksum" not in refusal, (what, refusal)


def test_the_real_index_refuses_damage(index_path: Path, tmp_path: Path) -> None:
    """A few cases on the real 91 MB file: random damage, a resealed self-link, a harmless change."""
    judge = Judge(index_path, tmp_path, n_queries=10)
    rng = random.Random(9)
    regions = judge.layout.regions()
    for region in ("tree", "blocks", "ids"):
        data = bytearray(judge.original)
        at = rng.randrange(*regions[region])
        data[at] ^= 0x10
        refusal = judge.check(data, f"real {region}")
        assert refusal is not None and "checksum mismatch" in refusal
    root = judge.layout.groups[0][4]
    refusal = judge.check(_craft(judge, judge.layout.entry_at(root) + LINK_AT, "<i", root), "real self-link")
    assert refusal is not None and "child link" in refusal
    reserved = judge.layout.entry_at(root) + LINK_AT + 8  # entry_t.reserved: read by nothing
    assert judge.check(_craft(judge, reserved, "<i", 12345), "real reserved field") is None


def chain_index(depth: int) -> bytearray:
    """A valid index written by hand: one group whose tree is a chain of `depth` internal nodes,
    each with a one-point leaf and the rest of the chain as children (the last has two leaves).
    The search's stack needs depth + 1 slots for it."""
    stored = [0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 13, 255]  # group key 0: dimensions 9-11 constant 0
    n_points = depth + 1
    n_entries = 2 * depth + 1
    boxes: list[tuple[int, int]] = []  # per entry: the range of dimension 0 (the point's number)
    links: list[tuple[int, int]] = []  # per entry: (link, count)
    boxes.append((0, depth))
    links.append((1, -2))
    for level in range(depth):  # entries 2*level+1 (a leaf) and 2*level+2 (the chain, or a last leaf)
        boxes.append((level, level))
        links.append((level, 1))
        if level < depth - 1:
            boxes.append((level + 1, depth))
            links.append((2 * level + 3, -2))
        else:
            boxes.append((depth, depth))
            links.append((depth, 1))

    def align(x: int) -> int:
        return (x + 63) // 64 * 64

    entries_off = align(4096 + GROUP_BYTES)
    blocks_off = align(entries_off + 64 * n_entries)
    ids_off = align(blocks_off + n_points * 6 * 2 * 8 * 2)
    file_size = align(ids_off + 4 * 8 * n_points)
    data = bytearray(file_size)
    header = [b"FSKNNIDX", _knn.FORMAT_VERSION, 4096, 0, n_points, 8 * n_points, 1, 8, n_entries, 4096]
    header += [entries_off, blocks_off, ids_off, file_size, bytes(32), 0]
    HEADER.pack_into(data, 0, *header)
    GROUP.pack_into(data, 4096, 0, n_points, 12, 6, 0, n_entries, n_points, 0, 0, 0, bytes(stored), *[0] * 14)
    for i, ((lo, hi), (link, count)) in enumerate(zip(boxes, links, strict=True)):
        ENTRY.pack_into(data, entries_off + 64 * i, lo, *[0] * 11, hi, *[0] * 11, link, count)
    for p in range(n_points):
        for slot in range(8):  # padding slots repeat the point
            struct.pack_into("<h", data, blocks_off + p * 192 + slot * 4, p)  # pair 0, first of the two
            struct.pack_into("<I", data, ids_off + 4 * (8 * p + slot), p if slot == 0 else ID_PADDING)
    seal(data)
    return data


def test_tree_depth_is_bounded_by_the_search_stack(tmp_path: Path) -> None:
    """1023 levels of fan-out 2 fill the 1024-slot traversal stack exactly: accepted and exact;
    one level more would overflow it: refused at open, not found out by a query."""
    path = tmp_path / "chain.fsidx"
    path.write_bytes(chain_index(1023))
    with Index(path) as idx:
        for q in [[0.0] * 14, [0.05] + [0.0] * 13, [1.0] * 9 + [0.0] * 5]:
            assert idx.knn(q) == idx.brute_force(q), q
    path.write_bytes(chain_index(1024))
    with pytest.raises(IndexFormatError, match="too deep"):
        Index(path)
