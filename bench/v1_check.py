"""POST /v1/score on all 20,000 dev payloads over a real socket: the kNN part against the contract's
expected answers (exactly), the model's probability against LightGBM's own ``predict`` (1e-6), and
the reasons against the model's attributions.

    python bench/v1_check.py [--registry DIR]

Starts `fraudscore serve --registry DIR` on a free port (default: the registry `serve` finds
itself), sends every payload over one keep-alive connection, and exits 1 on the first check that
fails.  tests/test_v1.py runs the same checks on fewer payloads.
"""

from __future__ import annotations

import argparse
import http.client
import subprocess
import sys
import time
from pathlib import Path

import lightgbm
import numpy as np
import orjson

from _common import DEV_DATA, dev_entries, fraudscore, free_port
from fraudscore.contract.vectorize import FEATURES, vectorize
from fraudscore.models.registry import MODEL_FILE, Registry
from fraudscore.models.scorer import ModelScorer
from fraudscore.service.v1 import REASONS, resolve_registry
from fraudscore.stack.runner import wait_ready

TOLERANCE = 1e-6


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--registry", type=Path, help="the server's --registry")
    args = parser.parse_args()
    registry_path = resolve_registry(args.registry)
    if registry_path is None:
        print("no registry: pass --registry DIR", file=sys.stderr)
        return 2

    entries = dev_entries(DEV_DATA)
    port = free_port()
    server = subprocess.Popen(fraudscore("serve", "--port", str(port), "--registry", str(registry_path)))
    try:
        wait_ready(f"http://127.0.0.1:{port}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        answers = []
        started = time.monotonic()
        for entry in entries:
            conn.request("POST", "/v1/score", body=orjson.dumps(entry["request"]))
            response = conn.getresponse()
            assert response.status == 200, response.read()
            answers.append(orjson.loads(response.read()))
        elapsed = time.monotonic() - started
        conn.close()
    finally:
        server.terminate()
        server.wait(timeout=15)

    version = answers[0]["model"]["version"]
    registry = Registry(registry_path)
    model = ModelScorer.from_registry(registry, version)
    booster = lightgbm.Booster(model_file=str(registry.version_dir(version) / MODEL_FILE))
    vectors = [vectorize(e["request"]) for e in entries]
    expected = booster.predict(np.array(vectors), num_threads=1)
    worst = 0.0
    decided = {orjson.dumps(a["decided_by"]) for a in answers}
    for i, (entry, vector, answer) in enumerate(zip(entries, vectors, answers, strict=True)):
        knn = {"approved": entry["expected_approved"], "fraud_score": entry["expected_fraud_score"]}
        assert answer["knn"] == knn, (i, answer, knn)
        worst = max(worst, abs(answer["model"]["probability"] - expected[i]))
        assert worst <= TOLERANCE, (i, answer, expected[i])
        contributions = model.explain(vector)[1]
        reasons = answer["reasons"]
        assert len(reasons) == REASONS, answer
        named = [FEATURES.index(r["feature"]) for r in reasons]
        magnitudes = [abs(r["contribution"]) for r in reasons]
        assert magnitudes == sorted(magnitudes, reverse=True), answer
        assert all(r["contribution"] == contributions[j] for r, j in zip(reasons, named, strict=True)), answer
        assert all(abs(c) <= magnitudes[-1] for j, c in enumerate(contributions) if j not in named), answer
    disagree = sum(a["approved"] != a["knn"]["approved"] for a in answers)
    deciders = b", ".join(decided).decode()
    print(f"{len(answers):,} answers in {elapsed:.1f} s over one connection; decided by {deciders}")
    print(f"knn part: all {len(answers):,} equal the expected answers")
    print(f"model {version}: largest |probability - LightGBM| {worst:.3g} (tolerance {TOLERANCE:g})")
    print(f"reasons: {REASONS} per answer, sorted, the largest attributions; {disagree} disagreements")
    return 0


if __name__ == "__main__":
    sys.exit(main())
