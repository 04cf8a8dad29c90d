"""``POST /v1/score``: the registry's production scorer decides, and the answer shows both scores
and why the model scored as it did.

The answer::

    {"approved": true, "fraud_score": 0.2,                      the deciding scorer's
     "decided_by": {"name": "knn", "version": "knn-3f2a…"},
     "knn": {"approved": true, "fraud_score": 0.2},            the exact kNN (the contract's answer)
     "model": {"name": "gbt", "version": "gbt-2026…", "probability": 0.013},
     "reasons": [{"feature": "amount", "value": 0.41, "contribution": -1.9}, …]}

Which scorers (``load``, run once at start-up, outside the event loop):

- the kNN is the service's own index, always;
- the model is the production version when that is a model, else the newest model version in
  the registry; with no model version (or no registry) ``model`` is null and ``reasons`` empty;
- the production version decides: a model, or the kNN (a ``knn-…`` version, which must be the
  kNN of the index served).  With nothing in production the kNN decides.

The reasons are the model's Saabas attributions (``ModelScorer.explain``), computed in the same
native walk as the probability: the ``REASONS`` features with the largest |contribution|
(log-odds), largest first, ties in feature order.

Everything in the answer that does not depend on the request is serialized once, here, as
``orjson.Fragment``: per request, one ``orjson.dumps`` call joins them with the numbers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from fraudscore.contract.vectorize import FEATURES
from fraudscore.errors import ConfigError
from fraudscore.index.search import K
from fraudscore.models.registry import DEFAULT_REGISTRY, Registry, knn_version
from fraudscore.models.scorer import ModelScorer
from fraudscore.scorer import KnnScorer, ScorerId, decision
from fraudscore.service import metrics, responses
from fraudscore.service.decode import unsearchable

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
        self, knn: KnnScorer, knn_version: str, model: ModelScorer | None, model_decides: bool
    ) -> None:
        if model_decides and model is None:
            raise ValueError("the model cannot decide without a model")
        self.knn = knn
        self.knn_version = knn_version
        self.model = model
        self.model_decides = model_decides
        # each decision, counted for GET /metrics: the server sets ServiceMetrics.decided here
        self.count_decision: Callable[[ScorerId, bool], None] = _uncounted
        self._knn_approves = tuple(decision(n)[0] for n in range(K + 1))
        knn_id = {"name": "knn", "version": knn_version}
        self.decided_by = (
            {"name": model.id.name, "version": model.id.version} if model_decides and model else knn_id
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
        customer = payload["customer"]  # vectorize has checked it is an object
        if "id" in customer and not (isinstance(customer["id"], str) and customer["id"]):
            return responses.error(400, "customer.id must be a non-empty string when present")
        try:
            frauds = self.knn.fraud_count(vector)
        except ValueError as exc:
            return unsearchable(exc)
        model = self.model
        if model is None:
            self.count_decision(self.knn.id, self._knn_approves[frauds])
            return self._knn_only[frauds]
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
        self.count_decision(model.id if self.model_decides else self.knn.id, approved)
        return responses.ok(
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

    def describe(self) -> str:
        model = f"model {self._model_version}" if self.model else "no model"
        return f"/v1/score: {self.decided_by['version']} decides, {model} beside the kNN {self.knn_version}"


def _uncounted(scorer: ScorerId, approved: bool) -> None:
    """Decisions go uncounted until the server hands the scorer its metrics."""


def _load_model(registry: Registry, version: str) -> ModelScorer:
    """A model version, its load counted for GET /metrics (and a failure's error, by category)."""
    try:
        model = ModelScorer.from_registry(registry, version)
    except Exception as exc:
        name = "unknown"
        with contextlib.suppress(Exception):  # the version's metadata may be what is broken
            name = str(registry.meta(version)["name"])
        metrics.model_loaded(name, version, ok=False)
        metrics.count_error(exc)
        raise
    metrics.model_loaded(model.id.name, model.id.version, ok=True)
    return model


def _newest_model(registry: Registry) -> str | None:
    for version in reversed(registry.versions()):
        if registry.meta(version).get("kind") == "model":
            return version
    return None


def load(registry_path: Path | None, knn: KnnScorer) -> V1Scorer:
    """The /v1/score scorers from a registry (None: the kNN alone).  Reads and checks files, so
    it runs outside the event loop; ModelFormatError or ConfigError when the registry's production
    version cannot serve beside this index."""
    own_knn = knn_version(knn.index.checksum)
    if registry_path is None:
        return V1Scorer(knn, own_knn, None, model_decides=False)
    registry = Registry(registry_path)
    production = registry.production()
    kind = registry.meta(production).get("kind") if production else None
    if kind == "knn":
        assert production is not None
        meta = registry.meta(production)
        if meta.get("checksum") != knn.index.checksum:
            raise ConfigError(
                f"--registry {registry_path}: production is {production}, the kNN of {meta.get('index')}, "
                f"not of the index served ({knn.index.path})"
            )
        own_knn = production
    model_version = production if kind == "model" else _newest_model(registry)
    model = _load_model(registry, model_version) if model_version else None
    return V1Scorer(knn, own_knn, model, model_decides=kind == "model")
