"""The contract's load test: k6 drives the service, and the contest's score is computed from its results."""
