"""POST /v1/score in process: ``FastPath.set_v1`` plans, answered on the native loop's thread.

As tests/test_native_loop.py: socket pairs handed to a ``NativeLoop``, no event loop running.
The plans are the ones ``service/v1.py`` builds (``V1Live.serve_natively``) from the small test
model; each answer must parse to exactly ``V1Live.answer``'s.  Also run under ``make sanitize``
(the plan is read on the loop's thread while another thread swaps it).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from fraudscore.contract.vectorize import DEFAULT_CONSTANTS, vectorize
from fraudscore.index.search import Index
from fraudscore.models.live import AB_BUCKETS, AB_KEY, arm_bucket
from fraudscore.scorer import KnnScorer
from fraudscore.service import responses
from fraudscore.service._fastpath import FastPath, NativeLoop, V1Plan, siphash24
from fraudscore.service.metrics import ROUTES, ServiceMetrics
from fraudscore.service.protocol import fast_path
from fraudscore.service.v1 import _REASON_OPENINGS, V1Live, load

from .budget import scaled
from .models_support import small_model
from .test_native_loop import adopted, read_answer

WAIT = 5.0


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source, report = small_model()
    root = tmp_path_factory.mktemp("nlv1") / "registry"
    shutil.copytree(source.root, root)
    done = subprocess.run(
        [sys.executable, "-m", "fraudscore.cli", "model", "promote", report.version, "--registry", str(root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return root


@pytest.fixture
def served(index: Index, registry: Path) -> Iterator[tuple[V1Live, FastPath, ServiceMetrics]]:
    """The registry's /v1/score answerer, its plan set on a fast path (a loop that never runs)."""
    knn = KnnScorer(index)
    live = load(registry, knn)
    metrics = ServiceMetrics(knn.id)
    fast = fast_path(knn, DEFAULT_CONSTANTS, 16384, metrics.native)
    loop = asyncio.new_event_loop()
    live.serve_natively(fast, loop)
    try:
        yield live, fast, metrics
    finally:
        live.stop_native()
        live.live.stop()
        loop.close()


@pytest.fixture
def native(served: tuple[V1Live, FastPath, ServiceMetrics]) -> Iterator[NativeLoop]:
    loop = NativeLoop(served[1], 60.0)
    loop.start()
    yield loop
    loop.stop()


@pytest.fixture(scope="module")
def payloads(example_payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return example_payloads


def v1_request(payload: Any) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return b"POST /v1/score HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def body(response: bytes) -> Any:
    head, _, rest = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK"), response
    return orjson.loads(rest)


def test_the_loop_answers_v1_as_python_does(
    served: tuple[V1Live, FastPath, ServiceMetrics], native: NativeLoop, payloads: list[Any]
) -> None:
    live = served[0]
    client = adopted(native)
    for payload in payloads:
        client.sendall(v1_request(payload))
        assert body(read_answer(client)) == body(live.answer(payload, vectorize(payload)))
    assert native.answered == len(payloads) and native.migrated == 0
    # each decision counted once: natively for the loop's answers, by Python for the others
    native_count = sum(live.native_decisions().values())
    assert native_count == len(payloads)
    client.close()


def test_the_queue_holds_each_native_answer_for_drift(
    served: tuple[V1Live, FastPath, ServiceMetrics], payloads: list[Any]
) -> None:
    live, fast, _ = served
    plan = live.active.plan
    assert plan is not None
    plan.drain()
    model = live.active.production.model
    assert model is not None
    for payload in payloads:
        assert fast.answer(v1_request(payload)) is not None
    items, dropped = plan.drain()
    assert dropped == 0 and len(items) == len(payloads)
    for (arm, vector, probability, approved), payload in zip(items, payloads, strict=True):
        assert arm == 0 and vector == vectorize(payload)
        assert probability == model.explain(vector)[0]
        assert approved == (probability < model.threshold)
    assert plan.drain() == ([], 0)


def test_a_full_queue_drops_and_counts(
    served: tuple[V1Live, FastPath, ServiceMetrics], payloads: list[Any]
) -> None:
    live, fast, _ = served
    small = V1Plan(
        (live.active.production.native_arm(),),
        _REASON_OPENINGS,
        responses.OK_HEAD,
        AB_KEY,
        None,
        0,
        AB_BUCKETS,
        2,
        -1,
    )
    fast.set_v1(small)
    for payload in payloads[:5]:
        assert fast.answer(v1_request(payload)) is not None
    items, dropped = small.drain()
    assert len(items) == 2 and dropped == 3
    assert sum(small.decisions()[0]) == 5  # every answer's decision counted, queued or not


def test_plans_swapped_while_the_loop_answers(
    served: tuple[V1Live, FastPath, ServiceMetrics], native: NativeLoop, payloads: list[Any]
) -> None:
    """set_v1 from another thread, again and again, each time a new plan and the last one let go,
    while the loop's thread answers from the plan: every answer whole and right (under ASan, a
    plan freed while in use would be caught)."""
    live, fast, metrics = served
    models = live.active.models
    stop = threading.Event()
    swaps = [0]

    def swap() -> None:
        while not stop.is_set():
            fast.set_v1(live._build(models).plan)  # the plan replaced goes when set_v1 returns
            swaps[0] += 1

    swapper = threading.Thread(target=swap)
    expected = [body(live.answer(p, vectorize(p))) for p in payloads]
    rounds = scaled(300, 50)
    swapper.start()
    client = adopted(native)
    try:
        for i in range(rounds):
            client.sendall(v1_request(payloads[i % len(payloads)]))
            assert body(read_answer(client)) == expected[i % len(payloads)]
    finally:
        stop.set()
        swapper.join()
        client.close()
    assert swaps[0] > 1
    requests = metrics.native.snapshot()["requests"]
    assert (0, ROUTES.index("/v1/score"), 200, rounds) in requests  # native, /v1/score, 200


def test_without_a_plan_v1_goes_to_python(
    served: tuple[V1Live, FastPath, ServiceMetrics], payloads: list[Any]
) -> None:
    _, fast, _ = served
    fast.set_v1(None)
    assert fast.answer(v1_request(payloads[0])) is None
    bad = {**payloads[0], "customer": {**payloads[0]["customer"], "id": 7}}
    fast.set_v1(served[0].active.plan)
    assert fast.answer(v1_request(bad)) is None  # Python answers 400
    assert fast.answer(v1_request({**payloads[0], "customer": {**payloads[0]["customer"], "id": ""}})) is None
    assert fast.answer(v1_request(payloads[0])) is not None


def test_the_split_hash_is_siphash_2_4() -> None:
    # the reference vector of SipHash's paper: key 00..0f, message 00..0e
    assert siphash24(bytes(range(16)), bytes(range(15))) == 0xA129CA6149BE45E5
    assert arm_bucket("customer-1", "gbt-x") == siphash24(AB_KEY, b"gbt-x\0customer-1") % AB_BUCKETS
    with pytest.raises(ValueError, match="16 bytes"):
        siphash24(b"short", b"")


def test_plan_arguments_are_checked(served: tuple[V1Live, FastPath, ServiceMetrics]) -> None:
    live, fast, _ = served
    arm = live.active.production.native_arm()
    good: dict[str, Any] = {
        "arms": (arm,),
        "features": _REASON_OPENINGS,
        "ok_head": responses.OK_HEAD,
        "ab_key": AB_KEY,
        "candidate": None,
        "cut": 0,
        "buckets": AB_BUCKETS,
        "capacity": 16,
        "notify_fd": -1,
    }
    V1Plan(**good)
    with pytest.raises(ValueError, match="ab_key"):
        V1Plan(**{**good, "ab_key": b"short"})
    with pytest.raises(ValueError, match="candidate"):
        V1Plan(**{**good, "candidate": b"gbt-b"})  # a candidate without its arm
    with pytest.raises(ValueError, match="features"):
        V1Plan(**{**good, "features": _REASON_OPENINGS[:3]})
    with pytest.raises(ValueError, match="cut"):
        V1Plan(**{**good, "cut": AB_BUCKETS + 1})
    with pytest.raises(TypeError):
        fast.set_v1("a plan")  # type: ignore[arg-type]
