"""``fraudscore model …``: train, list, show, promote, roll back and explain registry versions.

``register(subparsers)`` adds the command group to the main parser (``fraudscore.cli``).  Every
action takes ``--registry`` (default ``data/registry``, env ``FRAUDSCORE_REGISTRY``) and prints
JSON with ``--json``.  Errors are the main parser's: one line on stderr, a non-zero status.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from fraudscore.models.registry import DEFAULT_REGISTRY, Registry

DEFAULT_TOP = 3


def _print_json(document: Any) -> None:
    sys.stdout.buffer.write(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")


def _summary(registry: Registry, version: str) -> dict[str, Any]:
    meta = registry.meta(version)
    holdout = (meta.get("metrics") or {}).get("holdout") or {}
    return {
        "version": version,
        "kind": meta.get("kind"),
        "created": meta.get("created"),
        "threshold": meta.get("threshold"),
        "auc": holdout.get("auc"),
        "production": version == registry.production(),
    }


def cmd_train(args: argparse.Namespace) -> int:
    from fraudscore.errors import UsageError
    from fraudscore.models.train import TrainConfig, train

    if not args.references.exists():
        raise UsageError(f"--references {args.references}: no such file")
    if args.threads < 1 or (args.rounds is not None and args.rounds < 1):
        raise UsageError("--threads and --rounds must be at least 1")
    rounds = {} if args.rounds is None else {"num_boost_round": args.rounds}
    config = TrainConfig(seed=args.seed, num_threads=args.threads, **rounds)
    report = train(
        args.references,
        Registry(args.registry),
        name=args.name,
        config=config,
        index_path=args.index,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    holdout = report.meta["metrics"]["holdout"]
    agreement = report.meta["metrics"]["knn_agreement"]
    result = {
        "version": report.version,
        "path": str(report.path),
        "auc": report.auc,
        "log_loss": holdout["log_loss"],
        "threshold": report.threshold,
        "precision": holdout["precision"],
        "recall": holdout["recall"],
        "trees": report.best_iteration,
        "train_seconds": round(report.train_seconds, 1),
        "knn_agreement": agreement["agreement"] if agreement else None,
    }
    if args.json:
        _print_json(result)
    else:
        print(
            f"{report.version}: AUC {report.auc:.5f}, threshold {report.threshold:.4f} "
            f"(precision {holdout['precision']:.4f}, recall {holdout['recall']:.4f}), "
            f"{report.best_iteration} trees, trained in {report.train_seconds:.1f} s"
            + (f", agrees with the kNN on {agreement['agreement']:.2%}" if agreement else "")
        )
        print(f"promote it with: fraudscore model promote {report.version}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    registry = Registry(args.registry)
    rows = [_summary(registry, v) for v in registry.versions()]
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print(f"no versions in {registry.root} (see: fraudscore model train --help)")
    for row in rows:
        auc = f"AUC {row['auc']:.5f}" if isinstance(row["auc"], float) else "exact kNN"
        mark = "*" if row["production"] else " "
        print(f"{mark} {row['version']:<36} {row['kind']:<6} {auc:<12} threshold {row['threshold']}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    registry = Registry(args.registry)
    meta = registry.meta(args.version)
    if args.json:
        _print_json(meta)
        return 0
    brief = {k: v for k, v in meta.items() if k not in ("drift", "check_rows")}
    brief["production"] = args.version == registry.production()
    failures = _load_failures(registry, args.version)
    if failures:
        brief["load_failures"] = failures
    _print_json(brief)
    return 0


def _instance_files(registry: Registry) -> list[tuple[Path, dict[str, Any] | None]]:
    from fraudscore.models.live import INSTANCES

    out: list[tuple[Path, dict[str, Any] | None]] = []
    for path in sorted((registry.root / INSTANCES).glob("*.json")):
        try:
            document = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            document = None
        out.append((path, document if isinstance(document, dict) else None))
    return out


def _load_failures(registry: Registry, version: str) -> list[dict[str, Any]]:
    """Each running instance's refusals of ``version`` (from the instance files)."""
    return [
        {"instance": path.stem, **failure}
        for path, document in _instance_files(registry)
        if document is not None
        for failure in document.get("failures") or []
        if isinstance(failure, dict) and failure.get("version") == version
    ]


def _pointer_out(args: argparse.Namespace, pointer: dict[str, Any], verb: str) -> int:
    if args.json:
        _print_json(pointer)
    else:
        print(f"{verb} {pointer['production']} (history: {', '.join(pointer['history']) or 'none'})")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from fraudscore.errors import UsageError

    registry = Registry(args.registry)
    if args.share is not None and not args.candidate:
        raise UsageError("--share goes with --candidate")
    if args.candidate and args.shadow:
        raise UsageError("--candidate and --shadow: choose one")
    if args.candidate:
        if args.share is None:
            raise UsageError("--candidate needs --share PERCENT")
        pointer = registry.promote_candidate(args.version, args.share)
        if args.json:
            _print_json(pointer)
        else:
            production = pointer["production"]
            print(f"candidate {args.version} on {args.share:g} % of customers (production: {production})")
        return 0
    if args.shadow:
        pointer = registry.add_shadow(args.version)
        if args.json:
            _print_json(pointer)
        else:
            print(f"shadows: {', '.join(pointer['shadows'])} (production: {pointer['production']})")
        return 0
    return _pointer_out(args, registry.promote(args.version), "in production:")


def cmd_abort(args: argparse.Namespace) -> int:
    pointer = Registry(args.registry).abort()
    if args.json:
        _print_json(pointer)
    else:
        print(f"no candidate, no shadows: {pointer.get('production')} serves everyone")
    return 0


def _query(admin: str, timeout: float) -> dict[str, Any]:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
    with opener.open(f"{admin}/admin/status", timeout=timeout) as response:
        document = orjson.loads(response.read())
    if not isinstance(document, dict):
        raise ValueError("not a JSON object")
    return document


def instances(registry: Registry, timeout: float = 2.0) -> list[dict[str, Any]]:
    """Every instance file of the registry, with its state: ``live`` (its admin listener
    answered: its status is the answer), ``file`` (no admin listener: its file's status),
    ``unreachable`` or ``stale`` (its pid is not running: the file outlived its process)."""
    import socket

    from fraudscore.models.live import pid_alive

    out: list[dict[str, Any]] = []
    host = socket.gethostname()
    for path, document in _instance_files(registry):
        if document is None:
            out.append({"file": str(path), "state": "unreadable"})
            continue
        row: dict[str, Any] = {"file": str(path), **document}
        pid = document.get("pid")
        if document.get("host") == host and isinstance(pid, int) and not pid_alive(pid):
            row["state"] = "stale"
        elif isinstance(document.get("admin"), str):
            try:
                row.update(_query(document["admin"], timeout))
                row["state"] = "live"
            except (OSError, ValueError) as exc:
                row["state"] = "unreachable"
                row["error"] = str(exc)
        else:
            row["state"] = "file"
        out.append(row)
    return out


def cmd_status(args: argparse.Namespace) -> int:
    registry = Registry(args.registry)
    candidate = registry.candidate()
    document: dict[str, Any] = {
        "registry": str(registry.root),
        "production": registry.production(),
        "candidate": {"version": candidate[0], "share": candidate[1]} if candidate else None,
        "shadows": registry.shadows(),
        "instances": instances(registry, args.timeout),
    }
    if args.json:
        _print_json(document)
        return 0
    trial = f", candidate {candidate[0]} on {candidate[1]:g} %" if candidate else ""
    shadows = f", shadows {', '.join(document['shadows'])}" if document["shadows"] else ""
    print(f"{registry.root}: production {document['production']}{trial}{shadows}")
    if not document["instances"]:
        print("no instances (each serve with --registry writes one under instances/)")
    for row in document["instances"]:
        name = Path(row["file"]).stem
        where = row.get("admin") or "no admin listener"
        state = row["state"] + (f" ({row['error']})" if "error" in row else "")
        print(f"{name}: {row.get('role', '?')} {state}, {where}, started {row.get('started', '?')}")
        if row["state"] == "stale":
            continue
        for v in row.get("versions") or []:
            share = f" {v['share']:g} %" if isinstance(v.get("share"), int | float) else ""
            print(f"  {v['version']:<36} {v['arm']}{share}, in use {v.get('in_use', 0)}")
        print(f"  swaps {row.get('swaps', 0)}, failures {len(row.get('failures') or [])}")
        for failure in row.get("failures") or []:
            print(f"    {failure.get('at')}: {failure.get('version')}: {failure.get('error')}")
        shadow = row.get("shadow")
        if isinstance(shadow, dict) and (shadow.get("scored") or shadow.get("dropped")):
            scored, disagreed, dropped = shadow.get("scored"), shadow.get("disagreed"), shadow.get("dropped")
            print(f"  shadow: scored {scored}, disagreed {disagreed}, dropped {dropped}")
        for version, drift in (row.get("drift") or {}).items():
            if drift:
                print(f"  drift {version}: {orjson.dumps(drift).decode()}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    return _pointer_out(args, Registry(args.registry).rollback(), "rolled back to")


def cmd_add_knn(args: argparse.Namespace) -> int:
    version = Registry(args.registry).register_knn(args.index)
    if args.json:
        _print_json({"version": version})
    else:
        print(version)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """One JSON line per record, like ``fraudscore score``: bad records get an error line naming
    their position, and the command fails at the end with one line about them."""
    from fraudscore.contract.testdata import read_records
    from fraudscore.errors import UsageError
    from fraudscore.models.scorer import ModelScorer
    from fraudscore.offline import Scored, failure, vector_of

    if args.top < 1:
        raise UsageError(f"--top must be at least 1, got {args.top}")
    registry = Registry(args.registry)
    version = args.version or registry.production()
    if version is None:
        raise UsageError(f"{registry.root}: no version in production; name one with --version")
    if registry.meta(version).get("kind") != "model":
        raise UsageError(f"{version} is not a model version: only models give reasons (see --version)")
    scorer = ModelScorer.from_registry(registry, version)
    records = read_records(args.file)
    out = sys.stdout.buffer
    failed: list[Scored] = []
    for record in records:
        ident = record.value.get("id") if isinstance(record.value, dict) else None
        vector = vector_of(record)
        if isinstance(vector, tuple):
            error, category = vector
            failed.append(Scored(ident, None, None, error, record.where, category))
            out.write(orjson.dumps(failed[-1].as_json()) + b"\n")
            continue
        probability, reasons = scorer.reasons(vector, args.top)
        line = {
            "id": ident,
            "approved": scorer.approves(probability),
            "probability": probability,
            "reasons": reasons,
        }
        out.write(orjson.dumps(line) + b"\n")
    if failed:
        out.flush()
        raise failure(args.file, failed, len(records), "payloads")
    return 0


# -- drift ---------------------------------------------------------------------------------------


def _drift_offline(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The drift of a payload file's vectors and the model's scores against the version's reference."""
    from fraudscore.contract.testdata import read_records
    from fraudscore.errors import UsageError
    from fraudscore.models.drift import offline
    from fraudscore.models.scorer import ModelScorer
    from fraudscore.offline import Scored, failure, vector_of

    registry = Registry(args.registry)
    version = args.version or registry.production()
    if version is None:
        raise UsageError(f"{registry.root}: no version in production; name one with --version")
    meta = registry.meta(version)
    if meta.get("kind") != "model":
        raise UsageError(f"{version} is not a model version: only models store a training distribution")
    records = read_records(args.file)
    vectors, failed = [], []
    for record in records:
        vector = vector_of(record)
        if isinstance(vector, tuple):
            failed.append(Scored(None, None, None, vector[0], record.where, vector[1]))
        else:
            vectors.append(vector)
    if failed:
        raise failure(args.file, failed, len(records), "payloads")
    if not vectors:
        raise UsageError(f"{args.file}: holds no payloads")
    scores = ModelScorer.from_registry(registry, version).scores(vectors)
    return [offline(meta, vectors, scores)]


def _get_json(url: str) -> tuple[int, Any]:
    """(status, decoded body) of GET ``url``; TransientError if it cannot be fetched."""
    import urllib.error
    import urllib.request

    from fraudscore.errors import TransientError

    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            status, body = answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TransientError(f"--url {url}: cannot fetch: {reason}") from exc
    try:
        return status, orjson.loads(body)
    except orjson.JSONDecodeError:
        return status, None


def _drift_live(url: str) -> list[dict[str, Any]]:
    """The drift snapshots a running service serves: ``GET <url>/admin/drift``, or the ``drift``
    member of ``GET <url>/admin/status`` where the former is not served (404)."""
    from fraudscore.errors import BadInputError, TransientError, UsageError

    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--url {url}: give the service's admin address, like http://127.0.0.1:9200")
    base = url.rstrip("/")
    status, document = _get_json(f"{base}/admin/drift")
    where = f"{base}/admin/drift"
    if status == 404:
        where = f"{base}/admin/status"
        status, document = _get_json(where)
        if status == 200 and isinstance(document, dict):
            document = document.get("drift")
    if status != 200:
        error = document.get("error") if isinstance(document, dict) else None
        raise TransientError(f"--url {where}: answered {status}" + (f": {error}" if error else ""))
    if document is None:
        raise BadInputError(f"--url {where}: the service tracks no drift (no model serving)")
    snapshots = document if isinstance(document, list) else [document]
    for snapshot in snapshots:
        if not isinstance(snapshot, dict) or not isinstance(snapshot.get("series"), dict):
            raise BadInputError(f"--url {where}: the answer is not a drift snapshot")
    return snapshots


def _format_psi(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def _print_drift(snapshot: dict[str, Any]) -> None:
    windows = snapshot["windows"]
    count = windows["count"]
    parts = [f"count window {count['observations']} of {count['size']} requests"]
    if "time" in windows:
        parts.append(
            f"time window {windows['time']['observations']} requests in {windows['time']['seconds']:g} s"
        )
    print(f"drift of {snapshot['version']} ({', '.join(parts)}); alert above PSI {snapshot['threshold']:g}")
    names = list(windows)
    print(f"  {'feature':<22}" + "".join(f" {'PSI ' + w:>10}" for w in names))
    for name, entry in snapshot["series"].items():
        cells = "".join(f" {_format_psi(entry['psi'].get(w)):>10}" for w in names)
        print(f"  {name:<22}{cells}" + ("  ALERT" if entry["alert"] else ""))
    if any(entry["psi"].get(w) is None for entry in snapshot["series"].values() for w in names):
        print(f"  (-: fewer than {snapshot['min_observations']} requests in the window)")


def cmd_drift(args: argparse.Namespace) -> int:
    """PSI per feature and of the score, offline (a payload file) or live (a service's admin URL)."""
    from fraudscore.errors import UsageError

    if (args.file is None) == (args.url is None):
        raise UsageError("model drift: give a payload FILE or --url of a running service, not both")
    if args.url is not None and args.version is not None:
        raise UsageError("--version: the live view shows the versions the service serves; drop --version")
    snapshots = _drift_offline(args) if args.file is not None else _drift_live(args.url)
    if args.json:
        _print_json(snapshots[0] if len(snapshots) == 1 else snapshots)
        return 0
    for snapshot in snapshots:
        _print_drift(snapshot)
    return 0


def _registry_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--registry",
        type=Path,
        default=DEFAULT_REGISTRY,
        help="registry directory (default: %(default)s, env FRAUDSCORE_REGISTRY)",
    )


def _json_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


def register(subparsers: Any) -> None:
    """Add ``model`` and its actions to the main parser's subcommands."""
    from fraudscore.cli import DEFAULT_INDEX, DEFAULT_REFERENCES

    model = subparsers.add_parser("model", help="train, register, promote and explain fraud models")
    sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")

    train = sub.add_parser("train", help="train a gradient-boosted tree model on the references")
    train.add_argument("--references", type=Path, default=DEFAULT_REFERENCES, help="default: %(default)s")
    train.add_argument("--name", default="gbt", help="the model's name, its versions' prefix (default: gbt)")
    train.add_argument("--seed", type=int, default=1, help="seed of the split and of LightGBM (default: 1)")
    train.add_argument("--rounds", type=int, default=None, help="most boosting rounds (default: 150)")
    train.add_argument("--threads", type=int, default=2, help="LightGBM threads, fixed for repeatability")
    train.add_argument(
        "--index",
        type=Path,
        default=DEFAULT_INDEX,
        help="index of the exact kNN to measure agreement with (default: %(default)s; skipped if absent)",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    _registry_option(train)
    _json_option(train)
    train.set_defaults(func=cmd_train)

    lst = sub.add_parser("list", help="the registry's versions (* marks production)")
    _registry_option(lst)
    _json_option(lst)
    lst.set_defaults(func=cmd_list)

    show = sub.add_parser("show", help="a version's meta.json (metrics, threshold, schema, training)")
    show.add_argument("version")
    _registry_option(show)
    _json_option(show)
    show.set_defaults(func=cmd_show)

    promote = sub.add_parser(
        "promote", help="validate a version and put it in production, or on a share, or in the shadow"
    )
    promote.add_argument("version")
    promote.add_argument(
        "--candidate", action="store_true", help="serve it to --share percent of customers (sticky A/B)"
    )
    promote.add_argument("--share", type=float, help="the candidate's percentage of customers (0-100)")
    promote.add_argument(
        "--shadow", action="store_true", help="score every request with it too, off the response path"
    )
    _registry_option(promote)
    _json_option(promote)
    promote.set_defaults(func=cmd_promote)

    rollback = sub.add_parser("rollback", help="put the previous production version back")
    _registry_option(rollback)
    _json_option(rollback)
    rollback.set_defaults(func=cmd_rollback)

    abort = sub.add_parser("abort", help="end the candidate and the shadows: production serves everyone")
    _registry_option(abort)
    _json_option(abort)
    abort.set_defaults(func=cmd_abort)

    status = sub.add_parser("status", help="what each running instance serves (from <registry>/instances)")
    status.add_argument(
        "--timeout", type=float, default=2.0, help="seconds to wait for each instance (default: 2)"
    )
    _registry_option(status)
    _json_option(status)
    status.set_defaults(func=cmd_status)

    knn = sub.add_parser("add-knn", help="register the exact kNN over an index as a version")
    knn.add_argument("--index", type=Path, default=DEFAULT_INDEX, help="default: %(default)s")
    _registry_option(knn)
    _json_option(knn)
    knn.set_defaults(func=cmd_add_knn)

    explain = sub.add_parser("explain", help="score payloads with a model, with the top reasons of each")
    explain.add_argument("file", help="payloads: JSON array, JSON lines or test data; - for stdin")
    explain.add_argument("--version", help="model version (default: the one in production)")
    explain.add_argument("--top", type=int, default=DEFAULT_TOP, help="reasons per payload (default: 3)")
    _registry_option(explain)
    explain.set_defaults(func=cmd_explain)

    drift = sub.add_parser(
        "drift", help="PSI of payloads (a file, or a running service's) vs the training data"
    )
    drift.add_argument("file", nargs="?", help="payloads: JSON array, JSON lines or test data; - for stdin")
    drift.add_argument("--url", help="a running service's admin address: its live drift (GET /admin/drift)")
    drift.add_argument("--version", help="model version of the file's view (default: the one in production)")
    _registry_option(drift)
    _json_option(drift)
    drift.set_defaults(func=cmd_drift)
