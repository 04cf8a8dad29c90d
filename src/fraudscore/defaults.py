"""Values several parts of fraudscore share, each written only here.

This module imports only the standard library, so the load balancer, the service and the tools
can all read it without loading each other's code.
"""

import re

PORT = 9999
"""The contract's public port: the load balancer listens on it (and a lone ``fraudscore serve``)."""
MIN_PORT, MAX_PORT = 1, 65535
"""The TCP ports a flag, a variable or a setting may name."""
SCORE_PATH = "/fraud-score"
"""The contract's scoring endpoint: what the load test posts to unless told otherwise."""

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
"""Every command's log lines; the stack runner reads its children's stderr by it."""
LOG_RECORD = re.compile(rb"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ([A-Z]+) ")
"""A line LOG_FORMAT wrote (group 1: the level): on stderr, a log record rather than a message."""

METRICS_PORT = 9101
"""The first instance's metrics port in ``fraudscore stack --metrics-port`` as
deploy/prometheus/prometheus.yml scrapes it (instance i on METRICS_PORT + i)."""
