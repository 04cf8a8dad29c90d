"""`fraudscore loadtest`: its options, and the run they ask for (``driver.py`` does the run).

Python does what k6 cannot: it gunzips the test data into the plain JSON that k6's ``open()`` reads,
finds the binary, and checks that the service answers (``k6.py``).  k6 runs ``loadtest.js`` with the
profile of ``profile.py``, judges every answer, and hands back its end-of-test summary and, for the
chart, every latency sample (read by ``results.py``).  From those the run writes the contest's
score (``contest.py``) into ``result.json`` and draws ``latency.png`` (``chart.py``).

The score comes from the summary alone.  Writing and compressing every sample costs k6 CPU on the
machine it measures, which shows in the tail (BENCHMARKS.md): ``--no-chart`` leaves the samples and
the chart out, for a run closer to plain k6 with only its summary.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from fraudscore.defaults import PORT, SCORE_PATH
from fraudscore.flags import positive_float
from fraudscore.loadtest.profile import DURATION_S, START_RATE, TARGET_RATE, Profile

DEFAULT_URL = f"http://localhost:{PORT}"
DEFAULT_OUT = "loadtest-results"
SHARED_DATA = Path("../shared/data/dev-data.json.gz")
LOCAL_DATA = Path("data/dev-data.json.gz")


# --- command line -------------------------------------------------------------------------------------


def default_data() -> str:
    """$FRAUDSCORE_TEST_DATA, else the shared dev data next to the checkout, else data/dev-data.json.gz."""
    env = os.environ.get("FRAUDSCORE_TEST_DATA")
    if env:
        return env
    return str(SHARED_DATA if SHARED_DATA.exists() else LOCAL_DATA)


def _endpoint_path(text: str) -> str:
    if not text.startswith("/") or any(c.isspace() for c in text) or "?" in text or "#" in text:
        raise argparse.ArgumentTypeError(f"not an absolute path like /v1/score: {text!r}")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `fraudscore loadtest`."""
    parser.add_argument(
        "--url",
        default=os.environ.get("FRAUDSCORE_URL", DEFAULT_URL),
        help=f"base URL of the service; requests go to URL + --path "
        f"(default: $FRAUDSCORE_URL, else {DEFAULT_URL})",
    )
    parser.add_argument(
        "--path",
        type=_endpoint_path,
        default=SCORE_PATH,
        help=f"the endpoint posted to, e.g. /v1/score; its answers are judged by their `approved` "
        f"and `fraud_score` fields (default: {SCORE_PATH})",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=default_data(),
        help=f"test data, .json or .json.gz (default: $FRAUDSCORE_TEST_DATA, else {SHARED_DATA} "
        f"if it exists, else {LOCAL_DATA})",
    )
    parser.add_argument(
        "--rate-multiplier",
        type=positive_float,
        default=1.0,
        metavar="X",
        help=f"multiply the start and target rates ({START_RATE:g} -> {TARGET_RATE:g} req/s) by X; "
        "each entry is still sent at most once (default: 1)",
    )
    parser.add_argument(
        "--duration",
        type=positive_float,
        default=DURATION_S,
        metavar="SECONDS",
        help="length of the ramp; once the entries run out the rest of the ramp sends nothing "
        f"(default: {DURATION_S:g})",
    )
    parser.add_argument(
        "--cycle",
        action="store_true",
        help="when the entries run out, start again from the first (so a small data file can drive "
        "the whole ramp); every answer is still judged",
    )
    parser.add_argument(
        "--no-chart",
        action="store_true",
        help="skip k6's per-request samples and latency.png: k6 then spends less CPU beside the "
        "service, as plain k6 with only its summary; the score comes from that summary either way",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(DEFAULT_OUT),
        metavar="DIR",
        help=f"where to write result.json and latency.png (default: {DEFAULT_OUT}/)",
    )
    parser.add_argument(
        "--k6",
        default=None,
        metavar="PATH",
        help="the k6 binary (default: the k6 beside this Python, which the k6 package installs, else PATH)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the load test as the options say; 0 when it ran (whatever the score).  When it cannot,
    its error goes up to the command line, which ends with the error's category's exit code."""
    # The run's code is imported here, not with the command: every `fraudscore` command registers
    # this one, and `fraudscore balance` should not load what reads test data and k6's results.
    from fraudscore.loadtest.driver import human_summary, load_test

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = load_test(
        url=args.url,
        path=args.path,
        data=Path(args.data),
        profile=Profile(rate_multiplier=args.rate_multiplier, duration_s=args.duration),
        out_dir=Path(args.out),
        k6_binary=args.k6,
        cycle=args.cycle,
        draw_chart=not args.no_chart,
    )
    print(human_summary(result, Path(args.out)))
    return 0
