"""GET /metrics: what it counts equals what was sent, promtool accepts it, Prometheus scrapes it.

The counts are checked exactly: N scoring requests the native fast path answers, M the Python
path answers, some 400s, 404s and a 405, and every counter and histogram count must say just
that, in process (over the in-memory transport) and over real sockets.  promtool (Debian's
prometheus package) checks the real output and the committed scrape configuration; a real
Prometheus server scrapes a real `fraudscore serve` and its query API must report the count.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fraudscore.contract.vectorize import DEFAULT_CONSTANTS
from fraudscore.defaults import METRICS_PORT
from fraudscore.errors import Category, ModelFormatError
from fraudscore.index.search import Index
from fraudscore.models.registry import Registry
from fraudscore.scorer import KnnScorer
from fraudscore.service import metrics, responses, v1
from fraudscore.service.memory import memory_connection
from fraudscore.service.protocol import fast_path
from fraudscore.service.state import ServiceConfig, ServiceState
from fraudscore.stack.limits import DEFAULT_STACK
from fraudscore.stack.runner import wait_ready

from .conftest import ROOT, Server, check_native_loop_log, free_port, start_server

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing (Debian package prometheus)")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus missing (Debian package)")
DEPLOY_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"

# how many of each kind of request the count tests send
N_FAST, N_PYTHON, N_BAD, N_MISSING = 7, 5, 3, 2

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 30 s: nothing is left running."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples that carry these labels (0 when there are none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def scoring(payload: Any, target: str = "/fraud-score") -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    head = f"POST {target} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n".encode()
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


def plain(method: str, target: str, body: bytes = b"") -> bytes:
    return f"{method} {target} HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def workload(payloads: list[Any]) -> list[tuple[bytes, int]]:
    """(request, expected status): N_FAST ordinary scoring requests (the fast path's), N_PYTHON
    with a query string (the fast path declines them, the Python path scores them), N_BAD
    malformed bodies, N_MISSING unknown paths and one wrong method."""
    sent = [(scoring(payloads[i]), 200) for i in range(N_FAST)]
    sent += [(scoring(payloads[i], "/fraud-score?via=python"), 200) for i in range(N_PYTHON)]
    sent += [(plain("POST", "/fraud-score", b"{not json"), 400) for _ in range(N_BAD)]
    sent += [(plain("GET", f"/nowhere/{i}"), 404) for i in range(N_MISSING)]
    sent += [(plain("GET", "/fraud-score"), 405)]
    return sent


def approvals(answers: list[bytes]) -> tuple[int, int]:
    """(approved, denied) among scoring answers."""
    decided = [json.loads(a.split(b"\r\n\r\n", 1)[1])["approved"] for a in answers if a in responses.SCORES]
    return sum(decided), len(decided) - sum(decided)


def check_counts(
    samples: Samples, answers: list[bytes], knn_version: str, outside: dict[Category, int] | None = None
) -> None:
    """Every count of the workload, as ``workload`` sent it; ``outside``: the errors outside any
    request the process had counted before it (in process, other tests' too: a refused model)."""
    before = outside or {}
    requests = "fraudscore_http_requests_total"
    score = {"route": "/fraud-score"}
    assert value(samples, requests, **score, status="200", answerer="native") == N_FAST
    assert value(samples, requests, **score, status="200", answerer="python") == N_PYTHON
    assert value(samples, requests, **score, status="400") == N_BAD
    assert value(samples, requests, **score, status="405") == 1
    assert value(samples, requests, route="other", status="404") == N_MISSING
    assert value(samples, requests, **score) == N_FAST + N_PYTHON + N_BAD + 1
    # each histogram counted each answer once, in the answerer's series
    latency = "fraudscore_http_request_duration_seconds_count"
    assert value(samples, latency, **score, answerer="native") == N_FAST
    assert value(samples, latency, **score, answerer="python") == N_PYTHON + N_BAD + 1
    assert value(samples, latency, route="other") == N_MISSING
    inf = {"le": "+Inf"}
    assert (
        value(samples, "fraudscore_http_request_duration_seconds_bucket", **score, **inf)
        == N_FAST + N_PYTHON + N_BAD + 1
    )
    assert value(samples, "fraudscore_knn_search_duration_seconds_count", answerer="native") == N_FAST
    assert value(samples, "fraudscore_knn_search_duration_seconds_count", answerer="python") == N_PYTHON
    assert value(samples, "fraudscore_knn_search_duration_seconds_sum") > 0
    approved, denied = approvals(answers)
    assert approved + denied == N_FAST + N_PYTHON
    knn = {"scorer": "knn", "version": knn_version}
    assert value(samples, "fraudscore_decisions_total", **knn, outcome="approved") == approved
    assert value(samples, "fraudscore_decisions_total", **knn, outcome="denied") == denied
    errors = "fraudscore_errors_total"
    bad, internal = before.get(Category.BAD_INPUT, 0), before.get(Category.INTERNAL, 0)
    assert value(samples, errors, category=Category.BAD_INPUT.value) == bad + N_BAD + N_MISSING + 1
    assert value(samples, errors, category=Category.INTERNAL.value) == internal
    # a real server's /ready says 503 while warming up, to the fixture's polls: transient errors
    warming = value(samples, requests, route="/ready", status="503")
    assert (
        value(samples, errors, category=Category.TRANSIENT.value)
        == before.get(Category.TRANSIENT, 0) + warming
    )
    assert (errors, frozenset({("category", Category.BAD_CONFIG.value)})) in samples  # every category, 0 too


# -- in process -------------------------------------------------------------------------------


@pytest.fixture
def state(index: Index) -> ServiceState:
    scorer = KnnScorer(index)
    config = ServiceConfig(index_path=index.path, port=9999)  # never listens
    state = ServiceState(config=config, scorer=scorer, constants=DEFAULT_CONSTANTS, ready=True)
    state.fast = fast_path(scorer, DEFAULT_CONSTANTS, config.max_body_bytes, state.metrics.native)
    return state


def test_counts_equal_the_requests_sent(state: ServiceState, example_payloads: list[Any]) -> None:
    outside = dict(metrics._errors)  # process-wide: what earlier tests in this process counted
    conn, transport = memory_connection(state)
    answers = []
    for request, status in workload(example_payloads):
        conn.data_received(request)
        answer = bytes(transport.writes[-1])
        assert answer.startswith(f"HTTP/1.1 {status} ".encode()), (request, answer)
        answers.append(answer)
    assert state.fast is not None and state.fast.answered == N_FAST
    conn.data_received(plain("GET", "/metrics"))
    scrape = bytes(transport.writes[-1])
    head, body = scrape.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Type: text/plain; version=0.0.4" in head
    samples = parse(body.decode())
    check_counts(samples, answers, state.scorer.id.version, outside)
    # every read the fast path passed on, the scrape's own included
    declined = N_PYTHON + N_BAD + N_MISSING + 1 + 1
    assert value(samples, "fraudscore_fast_path_declined_total") == declined
    # the scrape is counted once written: the next one sees it
    conn.data_received(plain("GET", "/metrics"))
    later = parse(bytes(transport.writes[-1]).split(b"\r\n\r\n", 1)[1].decode())
    assert value(later, "fraudscore_http_requests_total", route="/metrics", status="200") == 1


def test_metrics_is_get_or_head_only(state: ServiceState) -> None:
    conn, transport = memory_connection(state)
    conn.data_received(plain("POST", "/metrics", b"x"))
    assert bytes(transport.writes[-1]) == responses.METRICS_METHOD
    conn.data_received(b"HEAD /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
    head = bytes(transport.writes[-1])
    assert head.startswith(b"HTTP/1.1 200 OK") and head.endswith(b"\r\n\r\n")


class BrokenScorer(KnnScorer):
    """A scorer with a bug: the client gets a 500, counted as an internal error."""

    def fraud_count(self, vector: Any) -> int:
        raise RuntimeError("a bug")


def test_errors_by_category_follow_the_status(state: ServiceState, example_payloads: list[Any]) -> None:
    """A 503 while warming is transient; an answer that breaks is internal (status 500)."""
    state.ready, state.fast = False, None
    conn, transport = memory_connection(state, eof=False)  # an error answer closes at once
    conn.data_received(plain("GET", "/ready"))
    assert bytes(transport.writes[-1]) == responses.WARMING
    state.ready = True
    state.scorer = BrokenScorer(state.scorer.index)
    conn.data_received(scoring(example_payloads[0]))
    assert bytes(transport.writes[-1]) == responses.INTERNAL_ERROR
    samples = parse(state.metrics.exposition().decode())
    assert value(samples, "fraudscore_errors_total", category=Category.TRANSIENT.value) == 1
    assert value(samples, "fraudscore_errors_total", category=Category.INTERNAL.value) == 1
    assert value(samples, "fraudscore_http_requests_total", route="/ready", status="503") == 1
    assert value(samples, "fraudscore_http_requests_total", route="/fraud-score", status="500") == 1


def test_model_loads_and_errors_outside_requests(state: ServiceState) -> None:
    metrics.model_loaded("gbt-test", "v1", ok=True)
    metrics.model_loaded("gbt-test", "v1", ok=True)
    metrics.model_loaded("gbt-test", "v2", ok=False)
    before = value(parse(state.metrics.exposition().decode()), "fraudscore_errors_total")
    metrics.count_error(ModelFormatError("v2: model.txt does not match its checksum"))
    samples = parse(state.metrics.exposition().decode())
    loads = "fraudscore_model_loads_total"
    assert value(samples, loads, model="gbt-test", version="v1", result="ok") == 2
    assert value(samples, loads, model="gbt-test", version="v2", result="failed") == 1
    assert value(samples, loads, model="gbt-test", version="v2", result="ok") == 0
    assert value(samples, "fraudscore_errors_total") == before + 1
    # another scorer's decisions, as a route scoring with a model counts them
    from fraudscore.scorer import ScorerId

    state.metrics.decided(ScorerId("model", "gbt-test", "v1"), approved=False)
    samples = parse(state.metrics.exposition().decode())
    assert (
        value(samples, "fraudscore_decisions_total", scorer="gbt-test", version="v1", outcome="denied") == 1
    )


# -- a real server ------------------------------------------------------------------------------


def exchange(sock: socket.socket, request: bytes) -> bytes:
    """Send one request and read its whole answer (head and Content-Length body), not pipelined."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"Content-Length: (\d+)", head, re.IGNORECASE).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return head + b"\r\n\r\n" + body


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        text: str = r.read().decode()
        return text


@pytest.fixture(scope="module", params=["fast path", "native loop"])
def served(
    index_path: Path, example_payloads: list[Any], request: pytest.FixtureRequest
) -> Iterator[tuple[Server, int, list[bytes]]]:
    """A real `fraudscore serve --metrics-port P`, sent the workload over one keep-alive connection:
    on its port, or behind the balancer on the native loop (which answers the ordinary requests,
    then moves the connection to Python at the first other one)."""
    metrics_port = free_port()
    srv = start_server(index_path, request.param, "--metrics-port", str(metrics_port))
    try:
        answers = []
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
            for sent, status in workload(example_payloads):
                answer = exchange(sock, sent)
                assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer
                answers.append(answer)
        yield srv, metrics_port, answers
    finally:
        code, log = srv.stop()
        assert code == 0 and "Traceback" not in log, log
        assert f"metrics on http://127.0.0.1:{metrics_port}/metrics" in log, log
        if request.param == "native loop":
            check_native_loop_log(log)


def test_server_counts_equal_the_requests_sent(served: tuple[Server, int, list[bytes]], index: Index) -> None:
    srv, metrics_port, answers = served
    for url in (f"{srv.url}/metrics", f"http://127.0.0.1:{metrics_port}/metrics"):
        check_counts(parse(get(url)), answers, index.checksum)


def test_metrics_listener_serves_metrics_only(served: tuple[Server, int, list[bytes]]) -> None:
    _, metrics_port, _ = served
    with socket.create_connection(("127.0.0.1", metrics_port), timeout=5) as sock:
        assert exchange(sock, plain("POST", "/fraud-score", b"{}")).startswith(b"HTTP/1.1 404 ")
        assert exchange(sock, plain("POST", "/metrics", b"x")).startswith(b"HTTP/1.1 405 ")
        assert exchange(sock, plain("GET", "/metrics?x=1")).startswith(b"HTTP/1.1 200 OK")  # kept alive


@needs_promtool
def test_promtool_accepts_the_real_output(served: tuple[Server, int, list[bytes]]) -> None:
    srv, _, _ = served
    text = get(f"{srv.url}/metrics")
    assert "fraudscore_http_request_duration_seconds_bucket" in text
    assert PROMTOOL is not None
    checked = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
    assert checked.stdout.strip() == b"" and checked.stderr.strip() == b"", checked  # no lint either


def test_bad_metrics_port_is_one_line(index_path: Path) -> None:
    argv = [
        sys.executable,
        "-m",
        "fraudscore.cli",
        "serve",
        "--index",
        str(index_path),
        "--metrics-port",
        "70000",
    ]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run
    assert run.stderr.strip().count("\n") == 0 and "--metrics-port" in run.stderr and "70000" in run.stderr, (
        run
    )


# -- Prometheus itself ---------------------------------------------------------------------------


@needs_promtool
def test_deploy_config_is_valid_and_scrapes_the_stack() -> None:
    assert PROMTOOL is not None
    checked = subprocess.run(
        [PROMTOOL, "check", "config", str(DEPLOY_CONFIG)], capture_output=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
    # the targets are the stack's: instance i of `fraudscore stack --metrics-port METRICS_PORT`
    targets = re.findall(r'targets: \["([^"]+)"\]', DEPLOY_CONFIG.read_text())
    assert targets == [f"127.0.0.1:{METRICS_PORT + i}" for i in range(len(DEFAULT_STACK.apis))]


def query(prometheus_url: str, promql: str) -> list[dict[str, Any]]:
    url = f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    answer = json.loads(get(url))
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


@needs_prometheus
def test_prometheus_scrapes_a_real_server(served: tuple[Server, int, list[bytes]], tmp_path: Path) -> None:
    _, metrics_port, _ = served
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: fraudscore\n    static_configs:\n"
        f'      - targets: ["127.0.0.1:{metrics_port}"]\n'
    )
    port = free_port()
    assert PROMETHEUS is not None
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    promql = 'sum(fraudscore_http_requests_total{route="/fraud-score",status="200"})'
    try:
        deadline = time.monotonic() + 60
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                result = query(url, promql)
            except OSError:
                result = []
            if result:
                break
            time.sleep(0.25)
        assert result, (tmp_path / "prometheus.log").read_text()[-3000:]
        assert float(result[0]["value"][1]) == N_FAST + N_PYTHON
        up = query(url, 'up{job="fraudscore"}')
        assert [float(r["value"][1]) for r in up] == [1.0]
        native = query(url, 'fraudscore_knn_search_duration_seconds_count{answerer="native"}')
        assert float(native[0]["value"][1]) == N_FAST
    finally:
        terminate(proc)
        log.close()


# -- the stack -------------------------------------------------------------------------------------


def free_port_pair() -> int:
    """A port p with p and p + 1 both free now."""
    for _ in range(50):
        base = free_port()
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", base))
                b.bind(("127.0.0.1", base + 1))
            return base
        except OSError:
            continue
    raise AssertionError("no two consecutive free ports")


def test_stack_exposes_each_instance(index_path: Path, example_payloads: list[Any], tmp_path: Path) -> None:
    port, base = free_port(), free_port_pair()
    argv = [sys.executable, "-m", "fraudscore.cli", "stack", "--index", str(index_path)]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--no-limits", "--metrics-port", str(base)]
    err = (tmp_path / "stack.log").open("wb")
    proc = subprocess.Popen(argv, stderr=err)
    sent = 6
    try:
        wait_ready(f"http://127.0.0.1:{port}", process=proc, timeout=60)
        for i in range(sent):  # a connection each: the balancer hands them out in turn
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                assert exchange(sock, scoring(example_payloads[i])).startswith(b"HTTP/1.1 200 OK")
        counts = []
        for i in range(len(DEFAULT_STACK.apis)):
            samples = parse(get(f"http://127.0.0.1:{base + i}/metrics"))
            counts.append(
                value(samples, "fraudscore_http_requests_total", route="/fraud-score", status="200")
            )
        assert sum(counts) == sent and all(c > 0 for c in counts), counts
    finally:
        terminate(proc)
        err.close()
    log = (tmp_path / "stack.log").read_text()
    for i, api in enumerate(DEFAULT_STACK.apis):
        assert f"{api.name} metrics: http://127.0.0.1:{base + i}/metrics" in log, log


# -- /v1/score: models loaded and their decisions ---------------------------------------------------


def test_v1_counts_model_loads_and_the_deciding_scorer(
    index_path: Path, tmp_path: Path, example_payloads: list[Any]
) -> None:
    """A server whose registry has a model in production: the load is counted once, and each
    /v1/score decision under the model's name and version (the model decides)."""
    from .models_support import small_model

    source, report = small_model()
    registry = tmp_path / "registry"
    shutil.copytree(source.root, registry)
    Registry(registry).promote(report.version)
    metrics_port = free_port()
    srv = Server(index_path, "--registry", str(registry), "--metrics-port", str(metrics_port))
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
            answers = [exchange(sock, scoring(p, "/v1/score")) for p in example_payloads[:N_FAST]]
        samples = parse(get(f"http://127.0.0.1:{metrics_port}/metrics"))
    finally:
        srv.stop()
    decided = [json.loads(a.split(b"\r\n\r\n", 1)[1]) for a in answers]
    assert all(d["decided_by"]["version"] == report.version for d in decided), decided
    name = decided[0]["decided_by"]["name"]
    loads = "fraudscore_model_loads_total"
    assert value(samples, loads, model=name, version=report.version, result="ok") == 1
    assert value(samples, loads, version=report.version, result="failed") == 0
    requests = "fraudscore_http_requests_total"  # /v1/score is the fast path's too (V1Plan)
    assert value(samples, requests, route="/v1/score", status="200", answerer="native") == N_FAST
    model = {"scorer": name, "version": report.version}
    approved = sum(d["approved"] for d in decided)
    assert value(samples, "fraudscore_decisions_total", **model, outcome="approved") == approved
    assert value(samples, "fraudscore_decisions_total", **model, outcome="denied") == N_FAST - approved


def test_a_model_that_fails_to_load_is_counted(tmp_path: Path, state: ServiceState) -> None:
    """A damaged version: its load counted as failed, and one error in its category (bad input)."""
    from .models_support import small_model

    source, report = small_model()
    registry = tmp_path / "registry"
    shutil.copytree(source.root, registry)
    model_file = registry / "versions" / report.version / "model.txt"
    model_file.write_text(model_file.read_text() + "\n# altered\n")
    before = parse(state.metrics.exposition().decode())
    with pytest.raises(ModelFormatError):
        v1.load(registry, state.scorer)  # the newest model beside the kNN: the damaged one
    after = parse(state.metrics.exposition().decode())
    loads = "fraudscore_model_loads_total"
    failed = {"version": report.version, "result": "failed"}
    assert value(after, loads, **failed) == value(before, loads, **failed) + 1
    bad = {"category": Category.BAD_INPUT.value}
    assert (
        value(after, "fraudscore_errors_total", **bad) == value(before, "fraudscore_errors_total", **bad) + 1
    )
