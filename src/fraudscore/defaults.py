"""Values several parts of fraudscore share, each written only here.

This module imports nothing, so the load balancer, the service and the tools can all read it
without loading each other's code.
"""

PORT = 9999
"""The contract's public port: the load balancer listens on it (and a lone ``fraudscore serve``)."""

METRICS_PORT = 9101
"""The first instance's metrics port in ``fraudscore stack --metrics-port`` as
deploy/prometheus/prometheus.yml scrapes it (instance i on METRICS_PORT + i)."""
