"""The load-balanced stack: limits, cgroups, balancer configurations, and the runner."""
