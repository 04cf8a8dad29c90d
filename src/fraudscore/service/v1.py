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
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from fraudscore.contract.vectorize import FEATURES
from fraudscore.errors import ConfigError
from fraudscore.index.search import K
from fraudscore.models.live import CANDIDATE, PRODUCTION, LiveModels, Loaded, ModelSet, split_key
from fraudscore.models.registry import DEFAULT_REGISTRY, Registry, knn_version
from fraudscore.models.scorer import ModelScorer
from fraudscore.scorer import KnnScorer, ScorerId, decision
from fraudscore.service import responses
from fraudscore.service.decode import unsearchable

if TYPE_CHECKING:
    from fraudscore.service.shadow import AfterAnswer
    from fraudscore.service.state import ServiceState

REASONS = 3  # the features that pushed the score most, per answer
REGISTRY_ENV = "FRAUDSCORE_REGISTRY"
# (|contribution|, -feature) sorts largest first with ties in feature order when reversed
_NEGATED_POSITIONS = tuple(-i for i in range(len(FEATURES)))


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

    def describe(self) -> str:
        model = f"model {self._model_version}" if self.model else "no model"
        return f"/v1/score: {self.decided_by['version']} decides, {model} beside the kNN {self.knn_version}"


def _uncounted(scorer: ScorerId, approved: bool, arm: str) -> None:
    """Decisions go uncounted until the server hands the scorer its metrics."""


@dataclass(frozen=True)
class _Active:
    """The answerers of one live set: each arm's, and the version each must hold while in use."""

    models: ModelSet
    production: V1Scorer
    production_hold: Loaded | None
    candidate: V1Scorer | None
    candidate_hold: Loaded | None


class V1Live:
    """``/v1/score``'s answerer: the live set's arms, rebuilt (off the loop) at each swap."""

    def __init__(self, live: LiveModels, knn: KnnScorer) -> None:
        self.live = live
        self.knn = knn
        self.own_knn = knn_version(knn.index.checksum)
        self._count_decision: Callable[[ScorerId, bool, str], None] = _uncounted
        self.after: AfterAnswer | None = None  # drift and shadows, once the server gives a loop
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
        return _Active(models, production, production_hold, candidate, candidate_hold)

    def _swap(self, models: ModelSet) -> None:
        if models is not self.active.models:
            self.active = self._build(models)  # one assignment: a request sees the old or the new

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
