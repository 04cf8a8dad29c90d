"""LightGBM's ``model.txt`` read into the flat arrays the native evaluator (``_trees.c``) walks.

The text format is LightGBM's own: a header of ``key=value`` lines (``objective=binary sigmoid:1``,
``max_feature_idx``, ``feature_names``, …), then one block per tree (``Tree=i``, ``num_leaves``,
``split_feature``, ``threshold``, ``decision_type``, ``left_child``, ``right_child`` — a negative
child ``c`` is leaf ``~c`` —, ``leaf_value``, ``leaf_count``, ``internal_count``, …) and
``end of trees``.  Only what a binary model of numerical splits needs is read; anything else
(categorical splits, linear trees, several classes) is refused with ``ModelFormatError``.

Each tree's nodes are laid out in pre-order, leaves included, so every child lies after its
parent; each node carries its expected value (the leaf values below it, weighted by their
training counts), from which the walk derives Saabas attributions.

**The compiled form.**  Parsing model.txt is Python work that holds the GIL (a running instance
loads versions in a thread beside its event loop), so a version also stores those arrays as
they are, ``forest.bin`` (``compile_forest``): a fixed header, the feature names, then each
array in little-endian order.  Its header names the SHA-256 of the model.txt it was compiled
from, so it cannot be paired with another one; reading it (``read_compiled``) is a few copies.
"""

from __future__ import annotations

import hashlib
import math
import struct
import sys
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fraudscore.errors import ModelFormatError
from fraudscore.models import _trees

CATEGORICAL_BIT = 1
COMPILED_MAGIC = b"FSFOREST"
COMPILED_FORMAT = 1  # bumped when the layout changes: an unknown format is refused, not guessed
# magic, format, n_features, n_trees, n_nodes, sigmoid, model.txt's SHA-256, names' length, 0
_HEADER = struct.Struct("<8sIIIId32sII")


@dataclass
class _Tree:
    """One tree's arrays as model.txt states them (LightGBM's own numbering)."""

    num_leaves: int
    split_feature: list[int] = field(default_factory=list)
    threshold: list[float] = field(default_factory=list)
    decision_type: list[int] = field(default_factory=list)
    left_child: list[int] = field(default_factory=list)
    right_child: list[int] = field(default_factory=list)
    leaf_value: list[float] = field(default_factory=list)
    leaf_count: list[float] = field(default_factory=list)
    internal_value: list[float] = field(default_factory=list)
    internal_count: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class ParsedModel:
    """A binary LightGBM model: its header facts and the forest in flat arrays."""

    feature_names: tuple[str, ...]
    sigmoid: float
    n_trees: int
    feature: array[int]
    threshold: array[float]
    decision: bytes
    left: array[int]
    right: array[int]
    value: array[float]
    roots: array[int]

    def forest(self, *, allow_nan: bool = False) -> _trees.Forest:
        """The native evaluator of this model; with ``allow_nan``, NaN is LightGBM's missing value."""
        return _trees.Forest(
            self.feature,
            self.threshold,
            self.decision,
            self.left,
            self.right,
            self.value,
            self.roots,
            len(self.feature_names),
            self.sigmoid,
            allow_nan,
        )


def _numbers(raw: str, where: str, kind: type[int] | type[float]) -> list[float] | list[int]:
    try:
        if kind is int:
            return [int(x) for x in raw.split()]
        return [float(x) for x in raw.split()]
    except ValueError:
        raise ModelFormatError(f"{where}: not a list of numbers") from None


def _blocks(text: str, source: str) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The header's key=value pairs and each tree block's, in order."""
    header: dict[str, str] = {}
    trees: list[dict[str, str]] = []
    current = header
    ended = False
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line == "end of trees":
            ended = True
            break
        key, sep, value = line.partition("=")
        if key == "Tree":
            current = {"Tree": value}
            trees.append(current)
        elif sep:
            current[key] = value
        elif current is header:
            current.setdefault("_kind", line)
    if not ended:
        raise ModelFormatError(f"{source}: no 'end of trees': not a complete LightGBM model")
    return header, trees


def _parse_tree(block: dict[str, str], where: str) -> _Tree:
    def ints(key: str, n: int) -> list[int]:
        values = _numbers(block.get(key, ""), f"{where} {key}", int)
        if len(values) != n:
            raise ModelFormatError(f"{where}: {key} has {len(values)} values, expected {n}")
        return [int(v) for v in values]

    def floats(key: str, n: int) -> list[float]:
        values = _numbers(block.get(key, ""), f"{where} {key}", float)
        if len(values) != n:
            raise ModelFormatError(f"{where}: {key} has {len(values)} values, expected {n}")
        return [float(v) for v in values]

    try:
        num_leaves = int(block["num_leaves"])
    except (KeyError, ValueError):
        raise ModelFormatError(f"{where}: no num_leaves") from None
    if num_leaves < 1:
        raise ModelFormatError(f"{where}: num_leaves must be positive")
    if int(block.get("num_cat", "0") or 0) != 0:
        raise ModelFormatError(f"{where}: categorical splits are not supported")
    if block.get("is_linear", "0") not in ("0", ""):
        raise ModelFormatError(f"{where}: linear trees are not supported")
    tree = _Tree(num_leaves, leaf_value=floats("leaf_value", num_leaves))
    n_internal = num_leaves - 1
    if n_internal:
        tree.split_feature = ints("split_feature", n_internal)
        tree.threshold = floats("threshold", n_internal)
        tree.decision_type = ints("decision_type", n_internal)
        tree.left_child = ints("left_child", n_internal)
        tree.right_child = ints("right_child", n_internal)
        tree.leaf_count = floats("leaf_count", num_leaves)
        tree.internal_value = floats("internal_value", n_internal)
        tree.internal_count = floats("internal_count", n_internal)
    return tree


def _expected_values(tree: _Tree) -> tuple[list[float], list[float]]:
    """Each internal node's expected value and count, from the leaves below it, bottom up.

    A node with no counted training rows below (never the case for a trained model) keeps the
    value LightGBM stored for it."""
    n_internal = tree.num_leaves - 1
    value = [math.nan] * n_internal
    count = [0.0] * n_internal

    def child(c: int) -> tuple[float, float]:
        if c < 0:
            return tree.leaf_value[~c], tree.leaf_count[~c]
        return value[c], count[c]

    # LightGBM numbers a child before or after its parent: resolve in post-order explicitly
    stack: list[tuple[int, bool]] = [(0, False)]
    while stack:
        node, expanded = stack.pop()
        if not expanded:
            stack.append((node, True))
            for c in (tree.left_child[node], tree.right_child[node]):
                if c >= 0:
                    stack.append((c, False))
            continue
        (lv, lc), (rv, rc) = child(tree.left_child[node]), child(tree.right_child[node])
        total = lc + rc
        value[node] = (lv * lc + rv * rc) / total if total > 0 else tree.internal_value[node]
        count[node] = total
    return value, count


def _preorder(tree: _Tree, where: str) -> Iterator[tuple[int, bool]]:
    """(node, is_leaf) in pre-order; ModelFormatError if the child links do not form one tree."""
    n_internal = tree.num_leaves - 1
    if n_internal == 0:
        yield 0, True
        return
    seen_internal, seen_leaves = set(), set()
    stack = [0]
    while stack:
        c = stack.pop()
        if c < 0:
            leaf = ~c
            if leaf >= tree.num_leaves or leaf in seen_leaves:
                raise ModelFormatError(f"{where}: leaf {leaf} is out of range or reached twice")
            seen_leaves.add(leaf)
            yield leaf, True
            continue
        if c >= n_internal or c in seen_internal:
            raise ModelFormatError(f"{where}: node {c} is out of range or reached twice")
        seen_internal.add(c)
        yield c, False
        stack.append(tree.right_child[c])  # popped after the left subtree
        stack.append(tree.left_child[c])
    if len(seen_leaves) != tree.num_leaves:
        raise ModelFormatError(f"{where}: {tree.num_leaves - len(seen_leaves)} leaves are unreachable")


def parse_model(text: str, source: str | Path = "model.txt") -> ParsedModel:
    """A binary LightGBM model from its text; ModelFormatError naming ``source`` if it is not one."""
    header, blocks = _blocks(text, str(source))
    if header.get("_kind") != "tree":
        raise ModelFormatError(f"{source}: not a LightGBM tree model")
    objective = header.get("objective", "").split()
    if not objective or objective[0] != "binary":
        raise ModelFormatError(f"{source}: objective {header.get('objective')!r} is not binary")
    sigmoid = 1.0
    for part in objective[1:]:
        if part.startswith("sigmoid:"):
            try:
                sigmoid = float(part.partition(":")[2])
            except ValueError:
                raise ModelFormatError(f"{source}: bad sigmoid in {header['objective']!r}") from None
    if header.get("num_class", "1") != "1" or header.get("num_tree_per_iteration", "1") != "1":
        raise ModelFormatError(f"{source}: a model of one class is needed")
    try:
        n_features = int(header["max_feature_idx"]) + 1
    except (KeyError, ValueError):
        raise ModelFormatError(f"{source}: no max_feature_idx") from None
    names = tuple(header.get("feature_names", "").split())
    if len(names) != n_features:
        raise ModelFormatError(f"{source}: {len(names)} feature names for {n_features} features")
    if not blocks:
        raise ModelFormatError(f"{source}: no trees")

    feature, left, right, roots = array("i"), array("i"), array("i"), array("i")
    threshold, value = array("d"), array("d")
    decision = bytearray()
    for i, block in enumerate(blocks):
        where = f"{source}: Tree={block.get('Tree', i)}"
        tree = _parse_tree(block, where)
        order = list(_preorder(tree, where))
        expected, _ = _expected_values(tree) if tree.num_leaves > 1 else ([], [])
        base = len(feature)
        position = {key: base + k for k, key in enumerate(order)}
        roots.append(base)
        for node, is_leaf in order:
            if is_leaf:
                feature.append(-1)
                threshold.append(0.0)
                decision.append(0)
                left.append(0)
                right.append(0)
                value.append(tree.leaf_value[node])
                continue
            f, d = tree.split_feature[node], tree.decision_type[node]
            if not 0 <= f < n_features:
                raise ModelFormatError(f"{where}: split on feature {f} of {n_features}")
            if d & CATEGORICAL_BIT or not 0 <= d < 256:
                raise ModelFormatError(f"{where}: categorical splits are not supported")
            lc, rc = tree.left_child[node], tree.right_child[node]
            feature.append(f)
            threshold.append(tree.threshold[node])
            decision.append(d)
            left.append(position[(~lc, True) if lc < 0 else (lc, False)])
            right.append(position[(~rc, True) if rc < 0 else (rc, False)])
            value.append(expected[node])
    return ParsedModel(
        feature_names=names,
        sigmoid=sigmoid,
        n_trees=len(blocks),
        feature=feature,
        threshold=threshold,
        decision=bytes(decision),
        left=left,
        right=right,
        value=value,
        roots=roots,
    )


def load_forest(path: Path, *, allow_nan: bool = False) -> tuple[ParsedModel, _trees.Forest]:
    """Read ``path`` (a model.txt) and build its native evaluator."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"cannot read {path}: {exc}") from exc
    parsed = parse_model(text, path)
    return parsed, build_forest(parsed, path, allow_nan=allow_nan)


def _aligned(n: int) -> int:
    return (n + 7) // 8 * 8


def _little(items: array[int] | array[float]) -> bytes:
    if sys.byteorder == "big":  # pragma: no cover - the file is little-endian everywhere
        items = array(items.typecode, items)
        items.byteswap()
    return items.tobytes()


def compile_forest(parsed: ParsedModel, model_text: bytes) -> bytes:
    """``forest.bin``: ``parsed`` (the parse of ``model_text``) as the arrays the evaluator takes."""
    names = " ".join(parsed.feature_names).encode()
    n = len(parsed.feature)
    header = _HEADER.pack(
        COMPILED_MAGIC,
        COMPILED_FORMAT,
        len(parsed.feature_names),
        parsed.n_trees,
        n,
        parsed.sigmoid,
        hashlib.sha256(model_text).digest(),
        len(names),
        0,
    )
    parts = [header, names.ljust(_aligned(len(names)), b"\0")]
    parts += [_little(a) for a in (parsed.threshold, parsed.value, parsed.feature, parsed.left, parsed.right)]
    parts += [_little(parsed.roots), parsed.decision]
    return b"".join(parts)


def read_compiled(data: bytes, source: str | Path, model_sha256: str) -> ParsedModel:
    """The arrays of a ``forest.bin``, compiled from the model.txt whose SHA-256 is
    ``model_sha256``; ModelFormatError naming ``source`` if it is not such a file.  The
    evaluator's constructor checks the arrays' structure (``_trees.c``)."""
    if len(data) < _HEADER.size or not data.startswith(COMPILED_MAGIC):
        raise ModelFormatError(f"{source}: not a compiled forest")
    _, fmt, n_features, n_trees, n, sigmoid, digest, names_len, _ = _HEADER.unpack_from(data)
    if fmt != COMPILED_FORMAT:
        raise ModelFormatError(f"{source}: compiled forest format {fmt}, not {COMPILED_FORMAT}")
    if digest.hex() != model_sha256:
        raise ModelFormatError(f"{source}: compiled from another model.txt than the version's")
    start = _HEADER.size + _aligned(names_len)
    if len(data) != start + 29 * n + 4 * n_trees:
        raise ModelFormatError(f"{source}: {len(data)} bytes, not the size its header gives")
    names = tuple(data[_HEADER.size : _HEADER.size + names_len].decode(errors="replace").split())
    if len(names) != n_features:
        raise ModelFormatError(f"{source}: {len(names)} feature names for {n_features} features")
    view = memoryview(data)
    offset = [start]

    def doubles(count: int) -> array[float]:
        items = array("d")
        items.frombytes(view[offset[0] : offset[0] + 8 * count])
        offset[0] += 8 * count
        if sys.byteorder == "big":  # pragma: no cover
            items.byteswap()
        return items

    def ints(count: int) -> array[int]:
        items = array("i")
        items.frombytes(view[offset[0] : offset[0] + 4 * count])
        offset[0] += 4 * count
        if sys.byteorder == "big":  # pragma: no cover
            items.byteswap()
        return items

    threshold, value = doubles(n), doubles(n)
    feature, left, right, roots = ints(n), ints(n), ints(n), ints(n_trees)
    return ParsedModel(
        feature_names=names,
        sigmoid=sigmoid,
        n_trees=n_trees,
        feature=feature,
        threshold=threshold,
        decision=bytes(view[offset[0] :]),
        left=left,
        right=right,
        value=value,
        roots=roots,
    )


def build_forest(parsed: ParsedModel, source: str | Path, *, allow_nan: bool = False) -> _trees.Forest:
    """``parsed``'s native evaluator; ModelFormatError naming ``source`` if its arrays are wrong."""
    try:
        return parsed.forest(allow_nan=allow_nan)
    except ValueError as exc:
        raise ModelFormatError(f"{source}: {exc}") from exc


def rows_buffer(rows: Sequence[Sequence[float]], n_features: int) -> array[float]:
    """Rows as one flat buffer of doubles, for the evaluator's batch calls."""
    flat = array("d")
    for row in rows:
        if len(row) != n_features:
            raise ValueError(f"a row must have {n_features} numbers, got {len(row)}")
        flat.extend(row)
    return flat
