"""Tools around the service: the load test and its score."""
