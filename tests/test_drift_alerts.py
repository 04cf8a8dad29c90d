"""deploy/prometheus/alerts.yml: the drift alert, checked and unit-tested with the real promtool.

``promtool test rules`` runs alerts_test.yml (synthetic series of fraudscore_drift_psi) against the
rule; the same tests run against broken copies of the rule (threshold, comparison, duration,
aggregation) must fail, so they pin down what the rule does."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "prometheus"
RULES = DEPLOY / "alerts.yml"
RULE_TESTS = DEPLOY / "alerts_test.yml"
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing (Debian package prometheus)")

EXPRESSION = "expr: max without (window) (fraudscore_drift_psi) > 0.2"


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=60)


def test_rules_are_valid_and_their_unit_tests_pass() -> None:
    checked = promtool("check", "rules", RULES)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", RULE_TESTS)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_the_scrape_configuration_loads_the_rules() -> None:
    checked = promtool("check", "config", DEPLOY / "prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert (
        "alerts.yml" in checked.stdout + checked.stderr and "1 rules found" in checked.stdout + checked.stderr
    )


@pytest.mark.parametrize(
    ("broken", "replacement"),
    [
        ("> 0.2", "> 0.5"),  # merchant_avg_amount at 0.35 would not alert
        ("> 0.2", ">= 0.2"),  # mcc_risk at exactly 0.2 would alert
        ("> 0.2", "> 0.02"),  # the noise of hour (0.05) would alert
        ("max without (window)", "min without (window)"),  # the better window only: late
        ("for: 5m", "for: 1m"),  # fires while it should still be pending
        ("for: 5m", "for: 10m"),  # not yet firing at minute 8
    ],
)
def test_the_unit_tests_fail_for_a_broken_rule(tmp_path: Path, broken: str, replacement: str) -> None:
    text = RULES.read_text()
    assert EXPRESSION in text and "for: 5m" in text
    mutated = text.replace(broken, replacement, 1)
    assert mutated != text
    (tmp_path / "alerts.yml").write_text(mutated)
    shutil.copy(RULE_TESTS, tmp_path / "alerts_test.yml")
    assert promtool("check", "rules", tmp_path / "alerts.yml").returncode == 0  # still a valid rule
    tested = promtool("test", "rules", tmp_path / "alerts_test.yml")
    assert tested.returncode != 0, f"{broken!r} -> {replacement!r} passed the unit tests:\n{tested.stdout}"
