"""The command line as a user runs it: help everywhere, clear errors, the offline commands."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fraudscore.defaults import LOG_RECORD
from fraudscore.errors import EXIT_CODES, Category

from .conftest import DEV_DATA, INDEX_PATH, ROOT

COMMANDS = [
    [],
    ["index"],
    ["index", "build"],
    ["index", "info"],
    ["serve"],
    ["score"],
    ["eval"],
    ["loadtest"],
]


def fraudscore(
    *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "fraudscore.cli", *args],
        input=stdin,
        capture_output=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def error_line(result: subprocess.CompletedProcess[bytes], category: Category) -> str:
    """The one error line of a failed command, checked against the project's rule.

    The rule: the command exits with its error's category code (1-127); stderr has no traceback;
    besides log records it holds exactly one line, ``fraudscore <command>: <message>``.
    """
    stderr = result.stderr
    assert b"Traceback" not in stderr, stderr.decode()
    assert result.returncode == EXIT_CODES[category], (result.returncode, stderr.decode())
    assert 1 <= result.returncode <= 127
    messages = [line for line in stderr.splitlines() if line.strip() and not LOG_RECORD.match(line)]
    assert len(messages) == 1, stderr.decode()
    assert messages[0].startswith(b"fraudscore"), stderr.decode()
    return messages[0].decode()


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "fraudscore")
def test_every_command_has_help(command: list[str]) -> None:
    result = fraudscore(*command, "--help")
    assert result.returncode == 0
    assert b"usage: fraudscore" in result.stdout


def test_eval_dev_data_all_match(index_path: Path) -> None:
    if not DEV_DATA.exists():
        pytest.skip(f"no dev data at {DEV_DATA}")
    result = fraudscore("eval", "--index", str(index_path), str(DEV_DATA))
    summary = json.loads(result.stdout)
    assert result.returncode == 0, result.stderr
    assert summary["total"] == 20000
    assert summary["score_differs"] == 0
    assert summary["fp"] == summary["fn"] == 0
    assert summary["references_match"] is True


def test_eval_reports_what_differs(index_path: Path, tmp_path: Path) -> None:
    payloads = json.loads((ROOT / "data" / "example-payloads.json").read_text())
    entries = [{"request": p, "expected_approved": False, "expected_fraud_score": 1.0} for p in payloads[:5]]
    (tmp_path / "t.json").write_text(json.dumps({"stats": {}, "entries": entries}))
    result = fraudscore("eval", "--index", str(index_path), str(tmp_path / "t.json"))
    summary = json.loads(result.stdout)
    assert result.returncode == 1
    assert summary["score_differs"] == len(summary["differing"]) > 0
    assert summary["differing"][0]["id"] == payloads[0]["id"]


def test_score_one_line_per_payload(index_path: Path) -> None:
    payloads = json.loads((ROOT / "data" / "example-payloads.json").read_text())
    bad = {"id": "broken", "transaction": 1}
    stdin = json.dumps([*payloads, bad]).encode()
    result = fraudscore("score", "--index", str(index_path), "-", stdin=stdin)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == len(payloads) + 1
    assert lines[0] == {"id": "tx-1329056812", "approved": True, "fraud_score": 0.0}
    assert lines[-1] == {"id": "broken", "at": "[50]", "error": "transaction must be an object"}
    line = error_line(result, Category.BAD_INPUT)
    assert line == (
        "fraudscore score: stdin: 1 of 51 payloads could not be scored "
        "(the first, at [50]: transaction must be an object)"
    )


def test_score_goes_on_past_bad_records_and_names_their_lines(index_path: Path, tmp_path: Path) -> None:
    payloads = _payloads()[:6]
    lines = [json.dumps(p).encode() for p in payloads]
    lines[1] = b'{"id": "cut", "transaction": {'  # line 2: not JSON
    lines[3] = json.dumps({**payloads[3], "customer": {"avg_amount": -1}}).encode()  # line 4: bad field
    path = tmp_path / "payloads.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    result = fraudscore("score", "--index", str(index_path), str(path))
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o.get("at") for o in out] == [None, "line 2", None, "line 4", None, None]
    assert out[1]["error"].startswith("not JSON at column ")
    assert out[3] == {"id": payloads[3]["id"], "at": "line 4", "error": "customer.tx_count_24h is missing"}
    assert all("fraud_score" in o for i, o in enumerate(out) if i not in (1, 3))  # the rest were scored
    line = error_line(result, Category.BAD_INPUT)
    assert line.startswith(
        f"fraudscore score: {path}: 2 of 6 payloads could not be scored (the first, at line 2: "
    )


EDGE = "9999-12-31T23:00:00-03:00"  # in UTC, a moment after the calendar's last day


@pytest.mark.parametrize("command", ["score", "eval"])
def test_a_timestamp_past_the_calendar_is_that_records_error(
    command: str, index_path: Path, tmp_path: Path
) -> None:
    payloads = _payloads()[:5]
    payloads[2] = {**payloads[2], "transaction": {**payloads[2]["transaction"], "requested_at": EDGE}}  # type: ignore[dict-item]
    path = tmp_path / "t.json"
    path.write_bytes(_test_data(payloads))
    result = fraudscore(command, "--index", str(index_path), str(path))
    # vectorize says PayloadError for it (a bad input: 3); a vectorize that lets the OverflowError
    # through still loses only that record, reported as a bug (5)
    internal = b"internal error" in result.stderr
    line = error_line(result, Category.INTERNAL if internal else Category.BAD_INPUT)
    assert "at entries[2]: " in line
    assert internal or "transaction.requested_at" in line
    if command == "score":
        out = [json.loads(x) for x in result.stdout.splitlines()]
        assert [o.get("at") for o in out] == [None, None, "entries[2]", None, None]
    else:
        summary = json.loads(result.stdout)
        assert summary["total"] == 5 and summary["errors"] == 1
        assert summary["tp"] + summary["tn"] + summary["fp"] + summary["fn"] == 4


def test_eval_counts_what_it_can_and_names_the_entries_it_cannot(index_path: Path, tmp_path: Path) -> None:
    document = json.loads(_test_data(_payloads()[:6]))
    document["entries"][1]["expected_approved"] = "yes"
    del document["entries"][3]["request"]["merchant"]
    document["entries"][4]["expected_fraud_score"] = 0.9  # a differing answer, not an error
    path = tmp_path / "t.json"
    path.write_text(json.dumps(document))
    result = fraudscore("eval", "--index", str(index_path), str(path))
    summary = json.loads(result.stdout)
    assert [u["at"] for u in summary["unscored"]] == ["entries[1]", "entries[3]"]
    assert summary["unscored"][1]["error"] == "merchant must be an object"
    assert document["entries"][4]["request"]["id"] in [d["id"] for d in summary["differing"]]
    assert summary["total"] == 6 and summary["tp"] + summary["tn"] + summary["fp"] + summary["fn"] == 4
    line = error_line(result, Category.BAD_INPUT)  # 3 beats "answers differ" (1)
    assert line == (
        f"fraudscore eval: {path}: 2 of 6 entries could not be scored "
        "(the first, at entries[1]: expected_approved must be true or false)"
    )


@pytest.mark.parametrize(
    ("args", "category", "message"),
    [
        (["eval", "/nonexistent.json"], Category.BAD_INPUT, "cannot read /nonexistent.json"),
        (["index", "info", "--index", "/nonexistent.fsidx"], Category.BAD_INPUT, "cannot map index"),
        (
            ["index", "build", "--references", "/nonexistent.json.gz", "--out", "/tmp/x.fsidx"],
            Category.BAD_INPUT,
            "cannot open",
        ),
        (
            ["serve", "--index", "/nonexistent.fsidx", "--references", "/nonexistent"],
            Category.BAD_CONFIG,
            "no index at",
        ),
    ],
)
def test_errors_are_one_clear_line(args: list[str], category: Category, message: str) -> None:
    assert message in error_line(fraudscore(*args), category)


# Paths that are never there: no command may build an index or write anything at them.
MISSING = "/nonexistent/fraudscore-test"
NO_INDEX = ("--index", f"{MISSING}.fsidx", "--references", f"{MISSING}.json.gz")


# -- main(): closed pipes, bugs, the environment, flags -----------------------------------------


def test_a_closed_stdout_is_not_an_error(index_path: Path) -> None:
    """`fraudscore score … | head -1`: head leaves after one line; score stops quietly with 0."""
    payloads = json.loads((ROOT / "data" / "example-payloads.json").read_text())
    stdin = json.dumps(payloads * 400).encode()  # 20,000 answers: they outgrow the pipe's buffer
    script = (
        f"{sys.executable} -m fraudscore.cli score --index {index_path} - | head -1; "
        'echo "status ${PIPESTATUS[0]}" >&2'
    )
    result = subprocess.run(["bash", "-c", script], input=stdin, capture_output=True, cwd=ROOT, timeout=300)
    assert json.loads(result.stdout)["id"] == payloads[0]["id"]
    assert result.stderr.decode().strip() == "status 0"  # nothing else: no "Broken pipe", no traceback


BUG = """
import sys
from fraudscore import cli

def broken(args):
    raise KeyError("a bug")

cli.cmd_index_info = broken
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_bug_is_one_line_and_exit_5_with_the_traceback_only_at_debug() -> None:
    """main() itself, with a command that fails the way a bug does (an exception none of ours)."""
    run = [sys.executable, "-c", BUG]
    result = subprocess.run([*run, "index", "info"], capture_output=True, cwd=ROOT, timeout=60)
    line = error_line(result, Category.INTERNAL)
    assert line.startswith("fraudscore index info: internal error: KeyError: 'a bug'")
    assert "rerun with --log-level DEBUG" in line
    debug = subprocess.run([*run, "--log-level", "DEBUG", "index", "info"], capture_output=True, timeout=60)
    assert debug.returncode == 5
    assert b"Traceback" in debug.stderr and b"in broken" in debug.stderr


@pytest.mark.parametrize("value", ["abc", "70000", "0", "-1", ""])
def test_a_bad_port_variable_is_reported_when_it_matters(value: str) -> None:
    env = {"FRAUDSCORE_PORT": value}
    for command in ([], ["serve"], ["stack"], ["balance"]):  # --help works whatever the variable says
        assert fraudscore(*command, "--help", env=env).returncode == 0
    result = fraudscore("serve", *NO_INDEX, env=env)
    line = error_line(result, Category.BAD_CONFIG)
    assert line == f"fraudscore serve: FRAUDSCORE_PORT must be a port number 1-65535, got {value!r}"
    # a flag that makes the variable irrelevant makes its value irrelevant too
    result = fraudscore("serve", "--port", "9", *NO_INDEX, env=env)
    assert "no index at" in error_line(result, Category.BAD_CONFIG)


def test_a_bad_log_level_variable_is_named() -> None:
    env = {"FRAUDSCORE_LOG_LEVEL": "verbose"}
    assert fraudscore("--help", env=env).returncode == 0
    line = error_line(fraudscore("index", "info", env=env), Category.BAD_CONFIG)
    levels = "DEBUG, INFO, WARNING, ERROR"
    assert line == f"fraudscore index info: FRAUDSCORE_LOG_LEVEL must be one of {levels}, got 'verbose'"
    # any case will do, and the flag wins over the variable
    assert fraudscore("--log-level", "debug", "index", "info", "--index", "/no", env=env).returncode == 3


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["serve", "--max-body-bytes", "-1"], "--max-body-bytes"),
        (["serve", "--max-body-bytes", "lots"], "--max-body-bytes"),
        (["serve", "--max-url-bytes", "0"], "--max-url-bytes"),
        (["serve", "--max-header-bytes", "0"], "--max-header-bytes"),
        (["serve", "--max-headers", "-5"], "--max-headers"),
        (["serve", "--request-timeout", "0"], "--request-timeout"),
        (["serve", "--request-timeout", "-2.5"], "--request-timeout"),
        (["serve", "--request-timeout", "nan"], "--request-timeout"),
        (["serve", "--port", "70000"], "--port"),
        (["serve", "--port", "0"], "--port"),
        (["balance", "--upstream", "/x.sock", "--port", "http"], "--port"),
        (["stack", "--port", "65536"], "--port"),
        (["stack", "--instances", "0"], "--instances"),
        (["--log-level", "chatty", "index", "info"], "--log-level"),
        (["serve", "--no-such-flag"], "--no-such-flag"),
        (["no-such-command"], "COMMAND"),
        (["index"], "ACTION"),
    ],
)
def test_bad_flags_are_one_line_naming_the_flag(args: list[str], flag: str) -> None:
    line = error_line(fraudscore(*args), Category.BAD_CONFIG)
    assert flag in line
    assert line.endswith("--help)")


def test_index_info(index_path: Path) -> None:
    info = json.loads(fraudscore("index", "info", "--index", str(index_path)).stdout)
    assert info["references"] == 3_000_000
    assert info["kernel"] in ("avx2", "scalar")


# -- data files: damaged gzip, JSON errors at their real place, test data that is not -----------


def _payloads() -> list[dict[str, object]]:
    payloads: list[dict[str, object]] = json.loads((ROOT / "data" / "example-payloads.json").read_text())
    return payloads


def _test_data(payloads: list[dict[str, object]]) -> bytes:
    entries = [{"request": p, "expected_approved": True, "expected_fraud_score": 0.0} for p in payloads]
    return json.dumps({"stats": {}, "entries": entries}).encode()


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
@pytest.mark.parametrize("command", ["score", "eval"])
def test_damaged_gzip_names_the_file(command: str, damage: str, tmp_path: Path, index_path: Path) -> None:
    packed = gzip.compress(_test_data(_payloads()))
    if damage == "truncated":
        packed = packed[: len(packed) // 2]  # EOFError inside gzip
    else:
        mid = len(packed) // 2  # flipped bits in the deflate stream
        packed = packed[:mid] + bytes(b ^ 0xFF for b in packed[mid : mid + 64]) + packed[mid + 64 :]
    path = tmp_path / "t.json.gz"
    path.write_bytes(packed)
    line = error_line(fraudscore(command, "--index", str(index_path), str(path)), Category.BAD_INPUT)
    assert line.startswith(f"fraudscore {command}: {path}: damaged gzip data (")


def test_json_lines_are_reported_at_their_line_in_the_file(tmp_path: Path, index_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"entries": []}\n{"entries": [1,]}\n')
    line = error_line(fraudscore("eval", "--index", str(index_path), str(path)), Category.BAD_INPUT)
    assert line == f"fraudscore eval: {path}: line 2: not JSON at column 15: trailing comma is not allowed"


def test_a_broken_document_is_reported_at_its_line_and_column(tmp_path: Path, index_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_bytes(b'{\n  "stats": {},\n  "entries": [}\n}\n')
    line = error_line(fraudscore("eval", "--index", str(index_path), str(path)), Category.BAD_INPUT)
    assert line.startswith(f"fraudscore eval: {path}: not JSON at line 3 column 15: ")


@pytest.mark.parametrize(
    ("content", "what"),
    [
        (b'[{"id": "tx-1"}]', "it is a JSON array"),
        (b'{"stats": {}}', "it is an object without an 'entries' list"),
        (b"42", "it is a JSON int"),
    ],
)
def test_eval_says_when_a_file_is_not_test_data(
    content: bytes, what: str, tmp_path: Path, index_path: Path
) -> None:
    path = tmp_path / "t.json"
    path.write_bytes(content)
    line = error_line(fraudscore("eval", "--index", str(index_path), str(path)), Category.BAD_INPUT)
    assert f"{path} is not the contract's test data" in line and what in line


@pytest.mark.parametrize("command", ["score", "eval"])
def test_an_empty_file_is_named(command: str, tmp_path: Path, index_path: Path) -> None:
    path = tmp_path / "empty.json"
    path.write_bytes(b"\n \n")
    line = error_line(fraudscore(command, "--index", str(index_path), str(path)), Category.BAD_INPUT)
    assert line == f"fraudscore {command}: {path} is empty"


# -- output paths: checked before any long work -----------------------------------------------


def test_loadtest_out_is_checked_before_the_run(tmp_path: Path) -> None:
    """Nothing answers at the URL and there is no data either: the --out check comes first."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    for out, says in ((a_file, "exists and is not a directory"), (a_file / "sub", "is not a directory")):
        result = fraudscore("loadtest", "--url", "http://127.0.0.1:9", "--data", "/no", "--out", str(out))
        line = error_line(result, Category.BAD_CONFIG)
        assert line.startswith(f"fraudscore loadtest: --out {out}: ") and says in line
    assert a_file.read_text() == "not a directory"


@pytest.mark.parametrize("flag", ["--uds", "--handoff"])
def test_serve_socket_paths_are_checked_before_the_index_is_opened(flag: str, tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    cases = [
        (tmp_path / "no-dir" / "x.sock", "directory"),
        (a_file, "exists and is not a socket"),
        (tmp_path / ("s" * 120), "longer than a unix socket path"),
    ]
    for path, says in cases:
        result = fraudscore("serve", *NO_INDEX, flag, str(path))
        line = error_line(result, Category.BAD_CONFIG)
        assert line.startswith(f"fraudscore serve: {flag} {path}: ") and says in line
    assert a_file.read_text() == "keep me"  # the service replaces an old socket, never a file


# -- the sweep: every user error above, through the real CLI, under one rule -------------------


@pytest.fixture(scope="module")
def sweep_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The files and the taken port the sweep's cases name, made once."""
    tmp = tmp_path_factory.mktemp("sweep")
    packed = gzip.compress(_test_data(_payloads()))
    (tmp / "damaged.json.gz").write_bytes(packed[: len(packed) // 2])
    (tmp / "bad-line.jsonl").write_bytes(b'{"entries": []}\n{"entries": [1,]}\n')
    (tmp / "payloads.json").write_text(json.dumps(_payloads()[:3]))
    (tmp / "bad-record.json").write_text(json.dumps([_payloads()[0], {"id": "x", "transaction": 1}]))
    (tmp / "empty.json").write_bytes(b"")
    (tmp / "damaged.fsidx").write_bytes(b"not an index")
    normalization = json.loads((ROOT / "src/fraudscore/contract/normalization.json").read_text())
    (tmp / "normalization.json").write_text(json.dumps({**normalization, "max_amount": "lots"}))
    (tmp / "a-file").write_text("")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        yield {"tmp": str(tmp), "port": str(taken.getsockname()[1]), "index": str(INDEX_PATH)}


SWEEP: list[tuple[str, list[str], dict[str, str], Category, str]] = [
    # (case, command line, environment, category, what the line must name)
    ("port variable", ["serve"], {"FRAUDSCORE_PORT": "abc"}, Category.BAD_CONFIG, "FRAUDSCORE_PORT"),
    ("port variable range", ["stack"], {"FRAUDSCORE_PORT": "70000"}, Category.BAD_CONFIG, "FRAUDSCORE_PORT"),
    ("port variable, balance", ["balance", "--upstream", "/x"], {"FRAUDSCORE_PORT": "0"}, Category.BAD_CONFIG,
     "FRAUDSCORE_PORT"),
    ("log level variable", ["index", "info"], {"FRAUDSCORE_LOG_LEVEL": "loud"}, Category.BAD_CONFIG,
     "FRAUDSCORE_LOG_LEVEL"),
    ("log level flag", ["--log-level", "loud", "index", "info"], {}, Category.BAD_CONFIG, "--log-level"),
    ("body limit", ["serve", "--max-body-bytes", "-1"], {}, Category.BAD_CONFIG, "--max-body-bytes"),
    ("url limit", ["serve", "--max-url-bytes", "0"], {}, Category.BAD_CONFIG, "--max-url-bytes"),
    ("header limit", ["serve", "--max-header-bytes", "x"], {}, Category.BAD_CONFIG, "--max-header-bytes"),
    ("header count", ["serve", "--max-headers", "0"], {}, Category.BAD_CONFIG, "--max-headers"),
    ("timeout", ["serve", "--request-timeout", "0"], {}, Category.BAD_CONFIG, "--request-timeout"),
    ("negative timeout", ["serve", "--request-timeout", "-1"], {}, Category.BAD_CONFIG, "--request-timeout"),
    ("port flag", ["serve", "--port", "70000"], {}, Category.BAD_CONFIG, "--port"),
    ("port zero", ["serve", "--port", "0"], {}, Category.BAD_CONFIG, "--port"),
    ("instances", ["stack", "--instances", "0"], {}, Category.BAD_CONFIG, "--instances"),
    ("unknown command", ["frobnicate"], {}, Category.BAD_CONFIG, "frobnicate"),
    ("missing argument", ["score"], {}, Category.BAD_CONFIG, "file"),
    ("no index", ["serve", "--index", "{tmp}/none.fsidx", "--references", "{tmp}/none.gz"], {},
     Category.BAD_CONFIG, "{tmp}/none.fsidx"),
    ("socket directory", ["serve", *NO_INDEX, "--uds", "{tmp}/no/x.sock"], {}, Category.BAD_CONFIG, "--uds"),
    ("socket over a file", ["serve", *NO_INDEX, "--handoff", "{tmp}/a-file"], {}, Category.BAD_CONFIG,
     "--handoff"),
    ("loadtest --out", ["loadtest", "--out", "{tmp}/a-file"], {}, Category.BAD_CONFIG, "--out {tmp}/a-file"),
    ("missing file", ["eval", "--index", "{index}", "{tmp}/none.json"], {}, Category.BAD_INPUT,
     "{tmp}/none.json"),
    ("damaged gzip, score", ["score", "--index", "{index}", "{tmp}/damaged.json.gz"], {}, Category.BAD_INPUT,
     "{tmp}/damaged.json.gz: damaged gzip data"),
    ("damaged gzip, eval", ["eval", "--index", "{index}", "{tmp}/damaged.json.gz"], {}, Category.BAD_INPUT,
     "{tmp}/damaged.json.gz: damaged gzip data"),
    ("bad JSON line", ["eval", "--index", "{index}", "{tmp}/bad-line.jsonl"], {}, Category.BAD_INPUT,
     "{tmp}/bad-line.jsonl: line 2"),
    ("not test data", ["eval", "--index", "{index}", "{tmp}/payloads.json"], {}, Category.BAD_INPUT,
     "{tmp}/payloads.json is not the contract's test data"),
    ("empty file", ["score", "--index", "{index}", "{tmp}/empty.json"], {}, Category.BAD_INPUT,
     "{tmp}/empty.json is empty"),
    ("bad record", ["score", "--index", "{index}", "{tmp}/bad-record.json"], {}, Category.BAD_INPUT,
     "at [1]: transaction must be an object"),
    ("damaged index", ["index", "info", "--index", "{tmp}/damaged.fsidx"], {}, Category.BAD_INPUT,
     "{tmp}/damaged.fsidx"),
    ("damaged index, serve", ["serve", "--index", "{tmp}/damaged.fsidx"], {}, Category.BAD_INPUT,
     "{tmp}/damaged.fsidx"),
    ("bad constants", ["score", "--normalization", "{tmp}/normalization.json", "{tmp}/payloads.json"], {},
     Category.BAD_INPUT, "{tmp}/normalization.json: max_amount must be a number, got 'lots'"),
    ("port taken, serve", ["serve", "--index", "{index}", "--host", "127.0.0.1", "--port", "{port}"], {},
     Category.TRANSIENT, "('127.0.0.1', {port})"),
    ("port taken, balance", ["balance", "--upstream", "/x", "--host", "127.0.0.1", "--port", "{port}"], {},
     Category.TRANSIENT, "('127.0.0.1', {port})"),
    ("port taken, stack",
     ["stack", "--index", "{index}", "--host", "127.0.0.1", "--port", "{port}", "--no-limits"], {},
     Category.BAD_CONFIG, "('127.0.0.1', {port})"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "env", "category", "names"), [c[1:] for c in SWEEP], ids=[c[0] for c in SWEEP]
)
def test_every_user_error_is_one_line_with_its_categorys_code(
    args: list[str], env: dict[str, str], category: Category, names: str, sweep_files: dict[str, str]
) -> None:
    result = fraudscore(*[a.format(**sweep_files) for a in args], env=env)
    line = error_line(result, category)  # no traceback, one line, the category's code, 1..127
    assert names.format(**sweep_files) in line, line
