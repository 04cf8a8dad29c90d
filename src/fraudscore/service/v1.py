"""``POST /v1/score``: the registry's production scorer decides, and the answer shows both scores
and why the model scored as it did.

The answer::

    {"approved": true, "fraud_score": 0.2,                      the deciding scorer's
     "decided_by": {"name": "knn", "version": "knn-3f2a…", "arm": "production"},
     "knn": {"approved": true, "fraud_score": 0.2},            the exact kNN (the contract's answer)
     "model": {"name": "gbt", "version": "gbt-2026…", "probability": 0.013},
     "reasons": [{"feature": "amount", "value": 0.41, "contribution": -1.9}, …]}

Which scorers (``load``: loaded before the instance is ready, outside the event loop, then kept
following the registry by ``models.live.LiveModels``, which swaps them without a restart):

- the kNN is the service's own index, always;
- the model is the production version when that is a model, else the newest model version in
  the registry; with no model version (or no registry) ``model`` is null and ``reasons`` empty;
- the production version decides: a model, or the kNN (a ``knn-…`` version, which must be the
  kNN of the index served).  With nothing in production the kNN decides.

The reasons are the model's Saabas attributions (``ModelScorer.explain``), computed in the same
native walk as the probability: the ``REASONS`` features with the largest |contribution|
(log-odds), largest first, ties in feature order.

With a candidate in the registry (``model promote V --candidate --share P``) a customer's arm
(``models.live.arm_of`` of ``customer.id``, else of the transaction's ``id``) picks the
production answerer or the candidate's, and ``decided_by.arm`` says which.  After the answer is
written, ``service.shadow.AfterAnswer`` feeds the version's drift tracker and the shadow versions.

Everything in the answer that does not depend on the request is serialized once, here, as
``orjson.Fragment``: per request, one ``orjson.dumps`` call joins them with the numbers.

**Natively.**  Once the server has its fast path (``serve_natively``), each live set also becomes
a ``_fastpath.V1Plan``: per arm the forest, the threshold, who decides and the answer's fixed parts
serialized here, and the split (the candidate's version and share).  The fast path then answers
``/v1/score`` itself (on the event loop's thread and on the native loop's), with the same answers:
this module still defines them, and answers whatever the fast path declines (tests/test_v1_native.py
holds the two to each other).  Its decisions are counted in the plan (``native_decisions``, merged
into GET /metrics), and its answers queued there for the drift trackers and shadows: the plan
signals an eventfd, and ``drain_native`` feeds ``AfterAnswer`` from the queue on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from fraudscore.contract.vectorize import FEATURES
from fraudscore.errors import ConfigError
from fraudscore.index.search import K
from fraudscore.models.live import (
    AB_BUCKETS,
    AB_KEY,
    CANDIDATE,
    PRODUCTION,
    LiveModels,
    Loaded,
    ModelSet,
    arm_cut,
    split_key,
)
from fraudscore.models.registry import DEFAULT_REGISTRY, Registry, knn_version
from fraudscore.models.scorer import ModelScorer
from fraudscore.scorer import KnnScorer, ScorerId, decision
from fraudscore.service import responses
from fraudscore.service._fastpath import FastPath, V1Plan
from fraudscore.service.decode import unsearchable
from fraudscore.service.shadow import CAPACITY, DELAY_SECONDS

if TYPE_CHECKING:
    from fraudscore.service.shadow import AfterAnswer
    from fraudscore.service.state import ServiceState

log = logging.getLogger(__name__)

REASONS = 3  # the features that pushed the score most, per answer (_fastpath.c's REASONS too)
REGISTRY_ENV = "FRAUDSCORE_REGISTRY"
# (|contribution|, -feature) sorts largest first with ties in feature order when reversed
_NEGATED_POSITIONS = tuple(-i for i in range(len(FEATURES)))
# the native answer's reason openings, up to the value: the rest of each reason is numbers
_REASON_OPENINGS = tuple(b'{"feature":' + orjson.dumps(f) + b',"value":' for f in FEATURES)
ARMS = (PRODUCTION, CANDIDATE)  # the plan's arms, in _fastpath.c's order
Decisions = Counter[tuple[str, str, str, str]]  # (scorer, version, outcome, arm): count


def resolve_registry(explicit: Path | None) -> Path | None:
    """The registry a server reads: ``--registry``, else $FRAUDSCORE_REGISTRY, else data/registry
    when it exists, else none.  One named explicitly (flag or variable) must exist (ConfigError)."""
    if explicit is not None:
        if not explicit.is_dir():
            raise ConfigError(f"--registry {explicit}: no such directory")
        return explicit
    if os.environ.get(REGISTRY_ENV):
        if not DEFAULT_REGISTRY.is_dir():
            raise ConfigError(f"{REGISTRY_ENV}={DEFAULT_REGISTRY}: no such directory")
        return DEFAULT_REGISTRY
    return DEFAULT_REGISTRY if DEFAULT_REGISTRY.is_dir() else None


def _fragment(document: object) -> orjson.Fragment:
    return orjson.Fragment(orjson.dumps(document))


def _decision(frauds: int) -> dict[str, bool | float]:
    approved, score = decision(frauds)
    return {"approved": approved, "fraud_score": score}


class V1Scorer:
    """The scorers behind /v1/score and the parts of its answer that never change."""

    def __init__(
        self,
        knn: KnnScorer,
        knn_version: str,
        model: ModelScorer | None,
        model_decides: bool,
        arm: str = PRODUCTION,
    ) -> None:
        if model_decides and model is None:
            raise ValueError("the model cannot decide without a model")
        self.knn = knn
        self.knn_version = knn_version
        self.model = model
        self.model_decides = model_decides
        # each decision, counted for GET /metrics: the server sets ServiceMetrics.decided here
        self.count_decision: Callable[[ScorerId, bool, str], None] = _uncounted
        self.arm = arm
        self._knn_approves = tuple(decision(n)[0] for n in range(K + 1))
        knn_id = {"name": "knn", "version": knn_version, "arm": arm}
        self.decided_by = (
            {"name": model.id.name, "version": model.id.version, "arm": arm}
            if model_decides and model
            else knn_id
        )
        self._decided_by = _fragment(self.decided_by)
        # _knn[n]: the kNN's part for n frauds among the neighbours
        self._knn = tuple(_fragment(_decision(n)) for n in range(K + 1))
        self._model_name = model.id.name if model else ""
        self._model_version = model.id.version if model else ""
        self._features = FEATURES
        # with no model the whole answer is one of six, built now
        self._knn_only = tuple(
            responses.ok(
                orjson.dumps(
                    {
                        **_decision(n),
                        "decided_by": self._decided_by,
                        "knn": self._knn[n],
                        "model": None,
                        "reasons": [],
                    }
                )
            )
            for n in range(K + 1)
        )

    def answer(self, payload: Any, vector: list[float]) -> bytes:
        """The whole response to one request whose body decoded to ``payload`` and ``vector``."""
        return self.answer_scored(payload, vector)[0]

    def answer_scored(self, payload: Any, vector: list[float]) -> tuple[bytes, float | None, bool]:
        """(the response, the model's probability or None, whether approved)."""
        customer = payload["customer"]  # vectorize has checked it is an object
        if "id" in customer and not (isinstance(customer["id"], str) and customer["id"]):
            return responses.error(400, "customer.id must be a non-empty string when present"), None, False
        try:
            frauds = self.knn.fraud_count(vector)
        except ValueError as exc:
            return unsearchable(exc), None, False
        model = self.model
        if model is None:
            approves = self._knn_approves[frauds]
            self.count_decision(self.knn.id, approves, self.arm)
            return self._knn_only[frauds], None, approves
        probability, contributions = model.explain(vector)  # one native walk: both at once
        ranked = sorted(zip(map(abs, contributions), _NEGATED_POSITIONS, strict=True), reverse=True)
        features = self._features
        reasons = [
            {"feature": features[-i], "value": vector[-i], "contribution": contributions[-i]}
            for _, i in ranked[:REASONS]
        ]
        if self.model_decides:
            approved, score = probability < model.threshold, probability
        else:
            approved, score = decision(frauds)
        self.count_decision(model.id if self.model_decides else self.knn.id, approved, self.arm)
        response = responses.ok(
            orjson.dumps(
                {
                    "approved": approved,
                    "fraud_score": score,
                    "decided_by": self._decided_by,
                    "knn": self._knn[frauds],
                    "model": {
                        "name": self._model_name,
                        "version": self._model_version,
                        "probability": probability,
                    },
                    "reasons": reasons,
                }
            )
        )
        return response, probability, approved

    @property
    def decider(self) -> ScorerId:
        """Whose decisions these answers are (counted for GET /metrics)."""
        return self.model.id if self.model_decides and self.model is not None else self.knn.id

    def native_arm(self) -> tuple[Any, ...]:
        """This answerer as one arm of a ``_fastpath.V1Plan``: (forest or None, threshold, whether
        the model decides, the kNN's approval per fraud count, the whole answers without a model,
        and with one, per fraud count, the body from ``,"decided_by"`` up to the probability)."""
        model = self.model
        middle = None
        if model is not None:
            named = orjson.dumps({"name": self._model_name, "version": self._model_version})
            middle = tuple(
                b',"decided_by":%s,"knn":%s,"model":%s,"probability":'
                % (orjson.dumps(self.decided_by), orjson.dumps(_decision(n)), named[:-1])
                for n in range(K + 1)
            )
        return (
            model.forest if model is not None else None,
            model.threshold if model is not None else 0.0,
            self.model_decides,
            self._knn_approves,
            self._knn_only,
            middle,
        )

    def describe(self) -> str:
        model = f"model {self._model_version}" if self.model else "no model"
        return f"/v1/score: {self.decided_by['version']} decides, {model} beside the kNN {self.knn_version}"


def _uncounted(scorer: ScorerId, approved: bool, arm: str) -> None:
    """Decisions go uncounted until the server hands the scorer its metrics."""


def _plan_decisions(active: _Active) -> Decisions:
    out: Decisions = Counter()
    if active.plan is None:
        return out
    answerers = (active.production, active.candidate)
    for arm, (approved, denied) in enumerate(active.plan.decisions()):
        answerer = answerers[arm]
        assert answerer is not None
        scorer = answerer.decider
        for outcome, count in (("approved", approved), ("denied", denied)):
            if count:
                out[scorer.name, scorer.version, outcome, ARMS[arm]] += count
    return out


@dataclass(frozen=True)
class _Active:
    """The answerers of one live set: each arm's, and the version each must hold while in use."""

    models: ModelSet
    production: V1Scorer
    production_hold: Loaded | None
    candidate: V1Scorer | None
    candidate_hold: Loaded | None
    plan: V1Plan | None = None  # the same answers, for the fast path (once serving natively)


class V1Live:
    """``/v1/score``'s answerer: the live set's arms, rebuilt (off the loop) at each swap."""

    def __init__(self, live: LiveModels, knn: KnnScorer) -> None:
        self.live = live
        self.knn = knn
        self.own_knn = knn_version(knn.index.checksum)
        self._count_decision: Callable[[ScorerId, bool, str], None] = _uncounted
        self.after: AfterAnswer | None = None  # drift and shadows, once the server gives a loop
        # native answers (serve_natively): the fast path, the eventfd its plans signal, the sets
        # swapped out whose plans still hold queued answers or decisions, and the decisions of
        # those already drained
        self.fast: FastPath | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._notify = -1
        self._retired: list[_Active] = []
        self._counted: Decisions = Counter()
        self._native_lock = threading.Lock()  # guards active's replacement, _retired and _counted
        self._swap_lock = threading.Lock()  # one swap at a time: the follower's or serve_natively's
        self.active = self._build(live.current)
        live.listeners.append(self._swap)

    @property
    def count_decision(self) -> Callable[[ScorerId, bool, str], None]:
        return self._count_decision

    @count_decision.setter
    def count_decision(self, count: Callable[[ScorerId, bool, str], None]) -> None:
        self._count_decision = count
        self.active.production.count_decision = count
        if self.active.candidate is not None:
            self.active.candidate.count_decision = count

    def _arm(self, models: ModelSet, loaded: Loaded | None, arm: str) -> tuple[V1Scorer, Loaded | None]:
        if loaded is not None and isinstance(loaded.scorer, ModelScorer):
            answerer = V1Scorer(self.knn, self.own_knn, loaded.scorer, model_decides=True, arm=arm)
            hold: Loaded | None = loaded
        else:
            beside = models.beside
            model = beside.scorer if beside is not None else None
            assert model is None or isinstance(model, ModelScorer)
            knn = loaded.version if loaded is not None else self.own_knn
            answerer = V1Scorer(self.knn, knn, model, model_decides=False, arm=arm)
            hold = beside
        answerer.count_decision = self._count_decision
        return answerer, hold

    def _build(self, models: ModelSet) -> _Active:
        production, production_hold = self._arm(models, models.production, PRODUCTION)
        candidate, candidate_hold = (
            self._arm(models, models.candidate, CANDIDATE) if models.candidate else (None, None)
        )
        plan = None
        if self.fast is not None:
            try:
                plan = V1Plan(
                    (production.native_arm(), *((candidate.native_arm(),) if candidate else ())),
                    _REASON_OPENINGS,
                    responses.OK_HEAD,
                    AB_KEY,
                    models.candidate.version.encode() if models.candidate else None,
                    arm_cut(models.share),
                    AB_BUCKETS,
                    CAPACITY,
                    self._notify,
                )
            except ValueError as exc:  # e.g. a model of other features: Python answers every request
                log.warning("/v1/score answered by Python alone: %s", exc)
        return _Active(models, production, production_hold, candidate, candidate_hold, plan)

    def _swap(self, models: ModelSet) -> None:
        with self._swap_lock:
            if models is not self.active.models:
                self._install(self._build(models))

    def _install(self, active: _Active) -> None:
        """Serve ``active`` from now on.  The fast path first: when set_v1 returns, no native
        answer uses the old plan, whose queue and counts then wait in ``_retired`` for the loop."""
        if self.fast is not None:
            self.fast.set_v1(active.plan)
        with self._native_lock:
            old = self.active
            if old.plan is not None:
                self._retired.append(old)
            self.active = active  # one assignment: a request sees the old or the new
        if old.plan is not None:
            os.eventfd_write(self._notify, 1)  # its queue is drained on the loop

    # -- the native answers ----------------------------------------------------------------

    def serve_natively(self, fast: FastPath, loop: asyncio.AbstractEventLoop) -> None:
        """Let ``fast`` answer /v1/score from now on (see the module's docstring), until
        ``stop_native``."""
        self._notify = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._loop = loop
        loop.add_reader(self._notify, self._wake)
        with self._swap_lock:
            self.fast = fast
            self._install(self._build(self.active.models))

    def stop_native(self) -> None:
        """Python answers /v1/score alone from now on; what the plans queued is fed now."""
        fast, loop = self.fast, self._loop
        if fast is None or loop is None:
            return
        with self._swap_lock:
            fast.set_v1(None)
            self.fast = None
            self._install(self._build(self.active.models))  # the same set, without a plan
        loop.remove_reader(self._notify)
        self.drain_native()
        os.close(self._notify)
        self._notify = -1

    def _wake(self) -> None:
        """A plan's queue stopped being empty: drain it after DELAY_SECONDS, so one wake-up takes
        a batch (the eventfd stays readable, unread, until then)."""
        assert self._loop is not None
        self._loop.remove_reader(self._notify)
        self._loop.call_later(DELAY_SECONDS, self._drain_and_watch)

    def _drain_and_watch(self) -> None:
        if self._notify < 0:  # stopped meanwhile
            return
        self.drain_native()
        assert self._loop is not None
        self._loop.add_reader(self._notify, self._wake)

    def drain_native(self) -> None:
        """Feed the native answers queued since the last drain to the drift trackers and the
        shadows (on the loop, as AfterAnswer wants); fold the retired plans' decisions."""
        with contextlib.suppress(BlockingIOError):  # read by an earlier drain
            os.eventfd_read(self._notify)
        with self._native_lock:
            retired, self._retired = self._retired, []
            for old in retired:  # final: set_v1 replaced them, nothing counts there any more
                self._counted.update(_plan_decisions(old))
            actives = [*retired, self.active]
        after = self.after
        for active in actives:
            if active.plan is None:
                continue
            items, dropped = active.plan.drain()
            if after is None:
                continue
            after.dropped += dropped
            holds = (active.production_hold, active.candidate_hold)
            shadows = active.models.shadows
            for arm, vector, probability, approved in items:
                hold = holds[arm]
                if hold is not None:
                    after.put(hold.drift, vector, probability, approved, shadows)

    def native_decisions(self) -> Decisions:
        """The decisions of the native answers so far, labelled as ServiceMetrics.decided's."""
        with self._native_lock:
            out = Counter(self._counted)
            for active in (*self._retired, self.active):
                out.update(_plan_decisions(active))
        return out

    @property
    def model(self) -> ModelScorer | None:
        return self.active.production.model

    def answer(self, payload: Any, vector: list[float]) -> bytes:
        """The whole response to one request, from its customer's arm."""
        while True:
            active = self.active
            if active.candidate is not None and active.models.arm(split_key(payload)) == CANDIDATE:
                answerer, hold = active.candidate, active.candidate_hold
            else:
                answerer, hold = active.production, active.production_hold
            if hold is None or hold.acquire():
                break
        try:
            response, probability, approved = answerer.answer_scored(payload, vector)
        finally:
            if hold is not None:
                hold.release()
        after = self.after
        if after is not None and probability is not None and hold is not None:
            after.put(hold.drift, vector, probability, approved, active.models.shadows)
        return response

    def describe(self) -> str:
        return self.active.production.describe()

    def status(self) -> dict[str, Any]:
        """What ``GET /admin/status`` and the instance file say of the versions served."""
        after = self.after
        return {**self.live.status(), "shadow": after.status() if after is not None else None}


class LifecycleAdmin:
    """The admin routes of one service (``metrics.MetricsConnection``)."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state

    def status(self) -> dict[str, Any]:
        state = self.state
        base = {"pid": os.getpid(), "role": "service", "ready": state.ready, "address": state.config.address}
        return base if state.v1 is None else {**base, **state.v1.status()}

    async def reload(self) -> dict[str, Any]:
        """Check the registry now, loading off the loop; the result of that check."""
        v1 = self.state.v1
        if v1 is None:
            return {"result": "failed", "error": "the instance is still starting"}
        return await asyncio.get_running_loop().run_in_executor(None, v1.live.refresh, True)


def attach(state: ServiceState, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """Wire the loaded ``state.v1`` into the running server: its metrics, the after-answer queue
    (drift, shadows), SIGHUP, the instance file; the function that undoes it all at shutdown."""
    from fraudscore.models.drift import DriftCollector
    from fraudscore.models.live import InstanceFile, follow_with_file
    from fraudscore.service.shadow import AfterAnswer, LifecycleCollector

    answerer = state.v1
    assert answerer is not None
    answerer.count_decision = state.metrics.decided
    state.metrics.more_decisions = answerer.native_decisions
    after = answerer.after = AfterAnswer(loop)
    live = answerer.live
    state.metrics.registry.register(LifecycleCollector(live, after))
    state.metrics.registry.register(DriftCollector(live.drifts))
    loop.add_signal_handler(signal.SIGHUP, live.reload)
    instance: InstanceFile | None = None
    config = state.config
    if live.registry is not None:
        admin = f"http://{config.metrics_host}:{config.metrics_port}" if config.metrics_port else None
        instance = InstanceFile(live.registry, "service", admin)
        follow_with_file(live, instance, lambda: {"shadow": after.status(), "address": config.address})

    def detach() -> None:
        loop.remove_signal_handler(signal.SIGHUP)
        live.stop()
        answerer.stop_native()
        after.close()
        if instance is not None:
            instance.remove()

    return detach


def load(registry_path: Path | None, knn: KnnScorer) -> V1Live:
    """The /v1/score scorers from a registry (None: the kNN alone), loaded now and then following
    the registry.  Reads and checks files, so it runs outside the event loop; ModelFormatError or
    ConfigError when the registry's versions cannot serve beside this index."""
    registry = Registry(registry_path) if registry_path is not None else None
    live = LiveModels(registry, knn=knn, beside_newest=True)
    try:
        live.refresh()
    except ConfigError as exc:
        raise ConfigError(f"--registry {registry_path}: {exc}") from exc
    answerer = V1Live(live, knn)  # listening before the follower starts: no swap goes unseen
    live.follow()
    return answerer
