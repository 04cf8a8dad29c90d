"""Values several parts of fraudscore share, each written only here.

This module imports nothing, so the load balancer, the service and the tools can all read it
without loading each other's code.
"""

SCORE_PATH = "/fraud-score"
"""The contract's scoring endpoint: what the load test posts to unless told otherwise."""

PORT = 9999
"""The contract's public port: the load balancer listens on it (and a lone ``fraudscore serve``)."""
